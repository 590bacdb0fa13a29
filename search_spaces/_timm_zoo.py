"""``timm_zoo``: off-the-shelf timm families at a searched width and input resolution.

The hand-designed nets a user would otherwise pick, as a search space: MobileNetV3
small / large (Howard et al., ICCV 2019), LCNet (Cui et al., 2021), EfficientNet-Lite
(timm's EfficientNet without SE and with ReLU6) and ResNet-18 (He et al., CVPR 2016).
Each family offers the widths timm registers a model for (``mobilenetv3_small_075`` is
width 0.75); ResNet-18 takes any width, applied to its stem and stage channels. The nets
are timm's own, classifier replaced by the embedding head; their stems downsample 32x,
as designed for 224-pixel ImageNet inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna

from search_spaces._base import Architecture, SearchSpace
from search_spaces._macs import count_macs
from search_spaces._registry import register_space
from search_spaces._timm_models import FAMILIES, timm_architecture

__all__ = ["TimmZooSpace"]


@register_space("timm_zoo")
class TimmZooSpace(SearchSpace):
    """Parameters: ``family``, ``width_<family>`` (conditional on the family) and ``resolution``."""

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        families: Sequence[str] = tuple(FAMILIES),
        resolutions: Sequence[int] = (32, 48, 64),
        widths: dict[str, Sequence[float]] | None = None,
    ) -> None:
        super().__init__(embed_dim, in_chans)
        families = tuple(families)
        if not families:
            raise ValueError("timm_zoo families needs at least one family, but got an empty list.")
        for family in families:
            if family not in FAMILIES:
                raise ValueError(f"Unknown timm_zoo family {family!r}; valid families: {', '.join(FAMILIES)}.")
        if len(set(families)) != len(families):
            raise ValueError(f"timm_zoo families must be distinct, but got {list(families)}.")
        self.families = families
        resolutions = tuple(resolutions)
        if not resolutions or any(isinstance(r, bool) or not isinstance(r, int) or r < 32 for r in resolutions):
            raise ValueError(f"timm_zoo resolutions must be integers >= 32 (timm's nets downsample 32x), but got {list(resolutions)}.")
        self.resolutions = tuple(sorted(set(resolutions)))
        widths = dict(widths or {})
        for family in widths:
            if family not in families:
                raise ValueError(f"timm_zoo widths names family {family!r}, which is not among the families {list(families)}.")
        self.widths: dict[str, tuple[float, ...]] = {}
        for family in families:
            allowed = tuple(sorted(FAMILIES[family]))
            chosen = tuple(sorted(float(w) for w in widths.get(family, allowed)))
            bad = [w for w in chosen if w not in FAMILIES[family]]
            if bad or not chosen:
                raise ValueError(f"timm_zoo family {family!r} has widths {list(allowed)}, but got {list(chosen)}.")
            self.widths[family] = chosen
        self._ranking: list[tuple[str, float]] | None = None

    def make(self, family: str, width: float, resolution: int) -> Architecture:
        return timm_architecture(FAMILIES[family][width], resolution, self.embed_dim, self.in_chans, width=width, space=self.name)

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        family = trial.suggest_categorical("family", list(self.families))
        width = trial.suggest_categorical(f"width_{family}", list(self.widths[family]))
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        return self.make(family, width, resolution)

    def _ranked(self) -> list[tuple[str, float]]:
        """(family, width) pairs by multiply-accumulates at the largest resolution, smallest first."""
        if self._ranking is None:
            res = max(self.resolutions)
            macs = {(f, w): count_macs(self.make(f, w, res)) for f in self.families for w in self.widths[f]}
            self._ranking = sorted(macs, key=macs.__getitem__)
        return self._ranking

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        family, width = self._ranked()[0 if smallest else -1]
        res = resolution if resolution is not None else (min if smallest else max)(self.resolutions)
        return self.make(family, width, res)

    def describe(self) -> dict[str, Any]:
        return {
            "space": self.name,
            "families": list(self.families),
            "widths": {f: list(w) for f, w in self.widths.items()},
            "models": {f: [FAMILIES[f][w] for w in self.widths[f]] for f in self.families},
            "resolutions": list(self.resolutions),
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "num_architectures": sum(len(w) for w in self.widths.values()) * len(self.resolutions),
        }
