"""The embedding head every query and gallery net ends with: a linear projection, then L2 normalisation.

Retrieval compares embeddings by cosine similarity, so every net's output is unit length
(``F.normalize(x, dim=1)``: ``x / max(||x||, 1e-12)`` per row). Defined once here so that
the query nets (:mod:`search_spaces._net`), their per-piece latency head and the gallery
model (``nas.gallery.GalleryNet``) compute exactly the same thing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingHead", "L2Normalise"]


class EmbeddingHead(nn.Linear):
    """``nn.Linear(in_features, out_features)`` whose output is L2-normalised per row.

    Input ``(B, in_features)`` pooled features, output ``(B, out_features)`` unit-length
    embeddings. A subclass of ``nn.Linear`` with the same parameters (``weight``, ``bias``),
    initialisation and random-number use, so a module that held an ``nn.Linear`` under the
    same attribute keeps its ``state_dict`` keys and its checkpoints load unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear rather than super().forward: TorchScript cannot compile super() calls
        return F.normalize(F.linear(x, self.weight, self.bias), dim=1)


class L2Normalise(nn.Module):
    """The head without a projection: L2-normalise ``(B, D)`` features per row. No parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)
