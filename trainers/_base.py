"""The compatibility-loss interface."""

from __future__ import annotations

import abc

import torch
from torch import nn

__all__ = ["CompatibilityLoss"]


class CompatibilityLoss(nn.Module, abc.ABC):
    """A loss that pulls query-network embeddings into the fixed gallery embedding space.

    ``forward(query, target, labels)`` takes the query network's L2-normalised embeddings
    of a batch ``(B, D)``, the gallery model's embeddings of the *same* images (the cached
    targets, ``(B, D)``) and their class labels ``(B,)``, and returns a scalar. Losses that
    need no labels ignore them. A batch of the wrong shape is a ``ValueError`` that names
    the loss and the shapes (see :meth:`check_batch`).

    ``bind(targets, labels, classifier, scale)`` is called once before training (by
    :func:`trainers.train_compatible`) with the gallery embeddings and labels of *all*
    training images, the gallery model's classifier weight ``(num_classes, D)`` (``None``
    when the gallery checkpoint has none) and that classifier's logit scale. Losses that
    need more than the batch keep what they need from it (an anchor bank, the frozen
    classifier) and raise ``ValueError`` when something they need is missing; the default
    does nothing. Binding again replaces what an earlier call kept.
    """

    name: str = ""
    #: Whether the loss uses class labels (then every training image needs one).
    needs_labels: bool = False

    @abc.abstractmethod
    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss for one batch."""

    def bind(
        self,
        targets: torch.Tensor,
        labels: torch.Tensor,
        classifier: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> None:
        """Keep what the loss needs beyond a batch; the default needs nothing."""

    def check_batch(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``query`` and ``target`` are ``(B, D)`` of one shape and ``labels`` is ``(B,)``."""
        if query.ndim != 2 or target.ndim != 2 or query.shape != target.shape:
            raise ValueError(
                f"Loss {self.name!r}: query and target must both be (batch, dim) with the same shape, "
                f"but got {tuple(query.shape)} and {tuple(target.shape)}."
            )
        if labels.ndim != 1 or len(labels) != len(query):
            raise ValueError(f"Loss {self.name!r}: labels must be ({len(query)},), one per embedding, but got {tuple(labels.shape)}.")
