"""The ``pruned`` space: structured prunings of any supported timm gallery model (:class:`search_spaces.Root`).

Dimensions: the input resolution; per width unit (a stage; a ViT's block, and its ``stem``,
the residual stream) a width ratio among ``widths``; per stage a depth from ``min_depth`` to
its number of blocks (a ViT: its blocks as one stage; a stage whose trailing blocks change
shape keeps them); per ViT block the heads among ``heads`` (counts up to the block's).
The embedding layer: a linear projection from the member's pooled features, except with
``identity_head`` (set in a config when ``gallery.embed_dim`` is null: the gallery embeds
its own pooled features) for a member that keeps all of them: it has none, its pooled
features are the embedding. A member that cuts them projects its features back into the
gallery's (``features x embed_dim`` parameters, counted in its cost).
Members are :class:`Architecture` values naming the model with a pruning (``prune=...``) and,
with ``root_sha`` (set in a config: the gallery weights' SHA-256), the weights that ranked
its channels (``root=``);
built alone they have random weights, and the ``fine_tune_pruned`` strategy of the search
fills them with the gallery's own before fine-tuning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
import torch

from search_spaces._base import Architecture, SearchSpace, choices
from search_spaces._registry import register_space
from search_spaces._rooted import Pruning, Root, keeps_shape
from search_spaces._timm_builder import create_timm_model

__all__ = ["PrunedSpace"]


@register_space("pruned")
class PrunedSpace(SearchSpace):
    """Structured prunings of the timm model ``model`` (see the module docstring; ``model`` is filled in from
    ``gallery.model`` when a config names this space)."""

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        model: str = "resnet18",
        resolutions: Sequence[int] = (64, 96, 128),
        widths: Sequence[float] = (0.5, 0.75, 1.0),
        min_depth: int = 1,
        heads: Sequence[int] = (),
        identity_head: bool = False,
        root_sha: str = "",
    ) -> None:
        super().__init__(embed_dim, in_chans)
        self.model = model
        self.identity_head = bool(identity_head)
        self.root_sha = root_sha[:16]
        self.resolutions = choices("resolutions", resolutions, int)
        self.widths = choices("widths", widths, float)
        if any(not 0 < w <= 1 for w in self.widths):
            raise ValueError(f"pruned widths must be in (0, 1], but got {list(self.widths)}.")
        if min_depth < 1:
            raise ValueError(f"pruned min_depth must be >= 1, but got {min_depth}.")
        with torch.random.fork_rng(devices=[]):
            timm_model = create_timm_model(model, in_chans).eval()
            self.root = Root(timm_model, in_chans)  # the structure only: which stages, blocks and heads there are
        if hasattr(timm_model, "patch_embed"):
            fixed = int(timm_model.patch_embed.patch_size[0])
            if any(r % fixed for r in self.resolutions):
                raise ValueError(f"pruned resolutions of {model} must be multiples of its patch size {fixed}, but got {list(self.resolutions)}.")
        cut = {g.stage for g in self.root.groups if not g.head_dim}
        self.units = [u for u in ["stem", *self.root.units, "head"] if u in cut]  # what a width ratio changes
        #: what the space cannot cut, and why (``nas space show`` prints it)
        self.not_pruned = [f"{u}: no coupled channel group starts there" for u in ["stem", *self.root.units, "head"]
                           if u not in cut and u not in {g.stage for g in self.root.groups}]
        self.depths: dict[str, tuple[int, ...]] = {}
        for stage, blocks in self.root.family.stages(timm_model).items():
            fixed_blocks = next((k + 1 for k in range(len(blocks) - 1, 0, -1) if not keeps_shape(blocks[k])), 1)
            low = max(min(min_depth, len(blocks)), fixed_blocks)
            self.depths[stage] = tuple(range(low, len(blocks) + 1))
            if fixed_blocks == len(blocks) > 1:
                self.not_pruned.append(f"depth of {stage}: its last block changes its input's shape (not residual), so all {len(blocks)} stay")
        counts = {g.stage: len(g.order) for g in self.root.groups if g.head_dim}
        self.heads: dict[str, tuple[int, ...]] = {
            unit: tuple(sorted({h for h in heads if 1 <= h < counts[unit]} | {counts[unit]})) for unit in self.root.units if unit in counts
        }

    def make(self, resolution: int, pruning: Pruning) -> Architecture:
        features = self.root.kept_features(pruning)
        all_features = features is None or len(features) == self.root.num_features
        return Architecture(
            space=self.name, resolution=int(resolution), width=1.0, stem_chs=0, stages=(), head_chs=0, embed_dim=self.embed_dim,
            in_chans=self.in_chans, timm_model=self.model, pruning=pruning.to_text(), root=self.root_sha,
            projection=not (self.identity_head and all_features and self.embed_dim == self.root.num_features),
        )

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        widths = {u: trial.suggest_categorical(f"w_{u}", list(self.widths)) for u in self.units if len(self.widths) > 1}
        depths = {s: trial.suggest_categorical(f"d_{s}", list(d)) for s, d in self.depths.items() if len(d) > 1}
        heads = {b: trial.suggest_categorical(f"h_{b}", list(h)) for b, h in self.heads.items() if len(h) > 1}
        return self.make(resolution, _trimmed(Pruning(widths, depths, heads), self))

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        pick = min if smallest else max
        res = resolution if resolution is not None else pick(self.resolutions)
        pruning = Pruning(
            {u: pick(self.widths) for u in self.units}, {s: pick(d) for s, d in self.depths.items()}, {b: pick(h) for b, h in self.heads.items()}
        )
        return self.make(res, _trimmed(pruning, self))

    def describe(self) -> dict[str, Any]:
        return {
            "space": self.name,
            "model": self.model,
            "family": self.root.family.name,
            "resolutions": list(self.resolutions),
            "widths": {u: list(self.widths) for u in self.units},
            "depths": {s: list(d) for s, d in self.depths.items()},
            "heads": {b: list(h) for b, h in self.heads.items()},
            "embed_dim": self.embed_dim,
            "identity_head": self.identity_head,
            "in_chans": self.in_chans,
            "not_pruned": self.not_pruned or "nothing: every stage's width and every residual block's depth",
            "num_architectures": len(self.resolutions) * len(self.widths) ** len(self.units)
            * math.prod(len(d) for d in self.depths.values()) * math.prod(len(h) for h in self.heads.values()),
        }


def _trimmed(pruning: Pruning, space: PrunedSpace) -> Pruning:
    """``pruning`` without the entries that say "as the root": one text per member."""
    return Pruning(
        {u: w for u, w in pruning.widths.items() if w != 1.0},
        {s: d for s, d in pruning.depths.items() if d != max(space.depths[s])},
        {b: h for b, h in pruning.heads.items() if h != max(space.heads[b])},
    )
