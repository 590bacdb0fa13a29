"""Shared by the benchmark scripts: random members of a search space."""

from __future__ import annotations

import optuna

from nas.hardware import count_mflops
from nas.study_nets import random_members
from search_spaces import Architecture, SearchSpace, build

__all__ = ["random_members", "median_member"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def median_member(space: SearchSpace, n: int = 41, seed: int = 0) -> Architecture:
    """The member with the median MFLOPs among ``n`` random ones."""
    ranked = sorted(random_members(space, n, seed), key=lambda a: count_mflops(build(a), a.resolution, a.in_chans))
    return ranked[len(ranked) // 2]
