"""The compatibility-loss interface."""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["CompatibilityLoss"]


class CompatibilityLoss(nn.Module, abc.ABC):
    """A loss that pulls query-network embeddings into the fixed gallery embedding space.

    ``forward(query, target, labels)`` takes the query network's L2-normalised embeddings
    of a batch, the gallery model's embeddings of the *same* images (the cached targets)
    and their class labels, and returns a scalar. Losses that need no labels ignore them.
    """

    name: str = ""

    @abc.abstractmethod
    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss for one batch."""
