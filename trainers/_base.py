"""The compatibility-loss interface and the gallery-side data a loss is bound to."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CompatibilityLoss", "GalleryTargets"]


@dataclass(frozen=True, eq=False)
class GalleryTargets:
    """What the fixed gallery model says about *all* training images, handed to a loss once.

    - ``targets``: the gallery model's L2-normalised embeddings of the training images, ``(N, D)``;
      image ``i``'s training target.
    - ``labels``: their class labels, ``(N,)`` integers (all zeros when a loss needs none).
    - ``classifier``: the gallery model's cosine-classifier weight ``(num_classes, D)``, not
      normalised; ``None`` when the gallery checkpoint has none.
    - ``classifier_scale``: the logit scale that classifier was trained with (> 0), or ``None``.

    A loss that needs more than this gets it by a new field with a default, so that neither
    :func:`trainers.train_compatible` nor its callers change. ``eq=False``: tensors have no
    single truth value, so two bundles compare by identity.
    """

    targets: torch.Tensor
    labels: torch.Tensor
    classifier: torch.Tensor | None = None
    classifier_scale: float | None = None


class CompatibilityLoss(nn.Module, abc.ABC):
    """A loss that pulls query-network embeddings into the fixed gallery embedding space.

    ``forward(query, target, labels)`` takes the query network's L2-normalised embeddings
    of a batch ``(B, D)``, the gallery model's embeddings of the *same* images (the cached
    targets, ``(B, D)``) and their class labels ``(B,)``, and returns a scalar. Losses that
    need no labels ignore them. A batch of the wrong shape is a ``ValueError`` that names
    the loss and the shapes (see :meth:`check_batch`).

    ``bind(targets)`` is called once before training (by :func:`trainers.train_compatible`)
    with a :class:`GalleryTargets`: the gallery embeddings and labels of *all* training
    images, the gallery model's classifier weight ``(num_classes, D)`` (``None`` when the
    gallery checkpoint has none) and that classifier's logit scale. Losses that need more
    than the batch keep what they need from it (an anchor bank, the frozen classifier) and
    raise ``ValueError`` when something they need is missing; the default does nothing.
    Binding again replaces what an earlier call kept.
    """

    name: str = ""
    #: Whether the loss uses class labels (then every training image needs one).
    needs_labels: bool = False

    @abc.abstractmethod
    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar loss for one batch."""

    def bind(self, targets: GalleryTargets) -> None:
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
