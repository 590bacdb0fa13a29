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
from search_spaces._registry import register_space
from search_spaces._timm_builder import scale_channels

__all__ = ["TimmZooSpace", "FAMILIES", "timm_kwargs", "timm_architecture"]

#: family -> {width multiplier: timm model name}. EfficientNet-Lite's widths are its
#: compound-scaled variants (lite1 has lite0's width and is left out).
FAMILIES: dict[str, dict[float, str]] = {
    "mobilenetv3_small": {0.5: "mobilenetv3_small_050", 0.75: "mobilenetv3_small_075", 1.0: "mobilenetv3_small_100"},
    "mobilenetv3_large": {0.75: "mobilenetv3_large_075", 1.0: "mobilenetv3_large_100"},
    "lcnet": {0.35: "lcnet_035", 0.5: "lcnet_050", 0.75: "lcnet_075", 1.0: "lcnet_100", 1.5: "lcnet_150"},
    "efficientnet_lite": {1.0: "efficientnet_lite0", 1.1: "efficientnet_lite2", 1.2: "efficientnet_lite3", 1.4: "efficientnet_lite4"},
    "resnet": {0.25: "resnet18", 0.5: "resnet18", 0.75: "resnet18", 1.0: "resnet18"},
}
#: timm ResNets whose channels a width multiplier may scale (stem and the four stages).
_SCALABLE_RESNETS = {"resnet10t": (64, 128, 256, 512), "resnet18": (64, 128, 256, 512), "resnet34": (64, 128, 256, 512)}
_NOMINAL_WIDTH = {name: width for family in FAMILIES.values() for width, name in family.items() if name not in _SCALABLE_RESNETS}


def timm_kwargs(arch: Architecture) -> dict[str, Any]:
    """Extra ``timm.create_model`` arguments that give ``arch.timm_model`` the width ``arch.width``."""
    name = arch.timm_model
    if name in _SCALABLE_RESNETS:
        if arch.width == 1.0:
            return {}
        return {
            "channels": tuple(scale_channels(c, arch.width) for c in _SCALABLE_RESNETS[name]),
            "stem_width": scale_channels(64, arch.width),
        }
    nominal = _NOMINAL_WIDTH.get(name, 1.0)
    if arch.width != nominal:
        raise ValueError(
            f"timm model {name!r} has a fixed width ({nominal:g}), but the architecture asks for width {arch.width:g}; "
            f"pick the timm variant of that width instead (e.g. mobilenetv3_small_075 for 0.75)."
        )
    return {}


def timm_architecture(name: str, resolution: int, embed_dim: int, in_chans: int, width: float | None = None, space: str = "timm") -> Architecture:
    """The architecture of timm model ``name`` (any timm name) at ``resolution``."""
    if width is None:
        width = _NOMINAL_WIDTH.get(name, 1.0)
    return Architecture(
        space=space, resolution=int(resolution), width=float(width), stem_chs=0, stages=(), head_chs=0,
        embed_dim=embed_dim, in_chans=in_chans, timm_model=name,
    )


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
            from search_spaces._net import count_macs

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
