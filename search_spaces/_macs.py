"""Multiply-accumulates of an architecture, counted on the built net.

Its own module because counting builds the net (:mod:`search_spaces._net`) and the spaces
that order their members by it (``resnet``, ``timm_zoo``) sit above the net builder.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from search_spaces._base import Architecture
from search_spaces._net import build

__all__ = ["count_macs"]


def count_macs(arch: Architecture) -> float:
    """Multiply-accumulates of one batch-1 forward pass (torch's FLOP counter, halved).

    Used to order a space's members (e.g. to find its smallest); the budgets' MFLOPs are
    fvcore's count (``nas.hardware.count_mflops``), which agrees on conv / linear layers.
    """
    model = build(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, arch.in_chans, arch.resolution, arch.resolution))
    return counter.get_total_flops() / 2
