"""Registered compatibility losses."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from trainers._base import CompatibilityLoss

__all__ = ["RegressionLoss", "register_loss", "create_loss", "list_losses"]

_LOSSES: dict[str, type[CompatibilityLoss]] = {}


def register_loss(name: str) -> Callable[[type[CompatibilityLoss]], type[CompatibilityLoss]]:
    """Class decorator: make a :class:`CompatibilityLoss` available as ``name``."""

    def decorator(cls: type[CompatibilityLoss]) -> type[CompatibilityLoss]:
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return decorator


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **options: Any) -> CompatibilityLoss:
    """Instantiate loss ``name``; unknown names and options are a ``ValueError`` listing the valid ones."""
    if name not in _LOSSES:
        close = difflib.get_close_matches(name, list(_LOSSES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown compatibility loss {name!r}.{hint} Valid losses: {', '.join(list_losses())}.")
    cls = _LOSSES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in options:
        if key not in valid:
            raise ValueError(f"Unknown option {key!r} for loss {name!r}. Valid options: {', '.join(valid) or 'none'}.")
    return cls(**options)


@register_loss("regression")
class RegressionLoss(CompatibilityLoss):
    """Pull the query embedding of an image onto the gallery embedding of the same image.

    ``distance='l2'``: mean squared Euclidean distance; ``'cosine'``: mean ``1 - cos``.
    For L2-normalised embeddings the two differ by a factor of 2. This is the
    "regression" of asymmetric metric learning (Budnik & Avrithis, CVPR 2021).
    """

    def __init__(self, distance: str = "l2") -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"regression distance must be 'l2' or 'cosine', but got {distance!r}.")
        self.distance = distance

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.distance == "l2":
            return (query - target).pow(2).sum(1).mean()
        return (1.0 - (query * target).sum(1)).mean()
