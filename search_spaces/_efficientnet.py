"""``efficientnet``: EfficientNet-style query networks (SiLU, squeeze-excitation).

Layout of EfficientNet-B0 (Tan & Le, ICML 2019; channels before the width multiplier,
repeats before the depth multiplier), with the last two stride-2 steps removed so that
16-32 pixel inputs still end on a 2x2 or larger map:

=========  ======================  ======  ========  =======
stage      block                   stride  channels  repeats
=========  ======================  ======  ========  =======
stem       3x3 conv                2       32        1
1 (fixed)  depthwise-separable k3  1       16        1
2          MBConv                  2       24        2
3          MBConv                  2       40        2
4          MBConv                  2       80        3
5          MBConv                  1       112       3
6          MBConv                  1       192       4
7          MBConv                  1       320       1
head       1x1 conv, avg pool      -       1280      -
embed      linear + L2 norm        -       gallery   -
=========  ======================  ======  ========  =======

Searched: input resolution, width multiplier (channels, head included, rounded to 8),
depth multiplier (repeats ``ceil(r * d)``, as EfficientNet scales depth), and per stage
2-7 the depthwise kernel, expansion ratio and squeeze-excitation (ratio 0.25 of the
block's input channels, sigmoid gate) on or off. Activation SiLU (swish) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from search_spaces._base import Architecture, SearchSpace, choices
from search_spaces._registry import register_space

__all__ = ["EfficientNetSpace"]

# (output channels, stride, base repeats) of the searched stages 2-7
_STAGES: tuple[tuple[int, int, int], ...] = ((24, 2, 2), (40, 2, 2), (80, 2, 3), (112, 1, 3), (192, 1, 4), (320, 1, 1))
_FIXED_FIRST = "ds_r1_k3_s1_c16"
_SE_RATIO = 0.25


@register_space("efficientnet")
class EfficientNetSpace(SearchSpace):
    """EfficientNet-B0-style space; every option is a list of choices."""

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        resolutions: Sequence[int] = (20, 24, 28, 32),
        widths: Sequence[float] = (0.25, 0.35, 0.5, 0.75, 1.0),
        depth_multipliers: Sequence[float] = (0.34, 0.5, 0.75, 1.0),
        kernels: Sequence[int] = (3, 5),
        expansions: Sequence[float] = (3, 4, 6),
        se: Sequence[bool] = (False, True),
        stem_chs: int = 32,
        head_chs: int = 1280,
    ) -> None:
        super().__init__(embed_dim, in_chans)
        self.resolutions = choices("resolutions", resolutions, int)
        if min(self.resolutions) < 16:
            raise ValueError(f"efficientnet resolutions must be >= 16 (the net downsamples 16x), but got {min(self.resolutions)}.")
        self.widths = choices("widths", widths, float)
        if any(not 0 < w <= 4 for w in self.widths):
            raise ValueError(f"efficientnet widths must be in (0, 4], but got {list(self.widths)}.")
        self.depth_multipliers = choices("depth_multipliers", depth_multipliers, float)
        if any(not 0 < d <= 4 for d in self.depth_multipliers):
            raise ValueError(f"efficientnet depth_multipliers must be in (0, 4], but got {list(self.depth_multipliers)}.")
        self.kernels = choices("kernels", kernels, int)
        if any(k not in (3, 5, 7) for k in self.kernels):
            raise ValueError(f"efficientnet kernels must be among 3, 5, 7, but got {list(self.kernels)}.")
        self.expansions = choices("expansions", expansions, float)
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"efficientnet expansions must be >= 1, but got {list(self.expansions)}.")
        self.se = tuple(sorted({bool(s) for s in se}))
        if len(self.se) != len(tuple(se)) or not self.se:
            raise ValueError(f"efficientnet se must be a non-empty list of distinct booleans, but got {list(se)}.")
        if stem_chs < 8 or head_chs < 8:
            raise ValueError(f"efficientnet stem_chs and head_chs must be >= 8, but got {stem_chs} and {head_chs}.")
        self.stem_chs, self.head_chs = stem_chs, head_chs

    @staticmethod
    def repeats(base: int, depth_multiplier: float) -> int:
        """EfficientNet's depth scaling: ``ceil(base * d)``, at least 1."""
        return max(1, math.ceil(base * depth_multiplier - 1e-9))

    def make(self, resolution: int, width: float, depth_multiplier: float, stages: Sequence[tuple[int, float, bool]]) -> Architecture:
        """Architecture from explicit choices: one ``(kernel, expansion, se)`` per searched stage."""
        blocks = [(_FIXED_FIRST,)]
        for (chs, stride, base), (kernel, exp, se) in zip(_STAGES, stages, strict=True):
            text = f"ir_r{self.repeats(base, depth_multiplier)}_k{kernel}_s{stride}_e{exp:g}_c{chs}"
            if se:
                text += f"_se{_SE_RATIO}"
            blocks.append((text,))
        return Architecture(
            space=self.name, resolution=int(resolution), width=float(width), stem_chs=self.stem_chs,
            stages=tuple(blocks), head_chs=self.head_chs, embed_dim=self.embed_dim, in_chans=self.in_chans, act="swish",
        )

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        width = trial.suggest_categorical("width", list(self.widths))
        depth = trial.suggest_categorical("depth_multiplier", list(self.depth_multipliers))
        stages = [
            (
                trial.suggest_categorical(f"s{i}_kernel", list(self.kernels)),
                trial.suggest_categorical(f"s{i}_expansion", list(self.expansions)),
                trial.suggest_categorical(f"s{i}_se", list(self.se)),
            )
            for i in range(2, len(_STAGES) + 2)
        ]
        return self.make(resolution, width, depth, stages)

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        pick = min if smallest else max
        res = resolution if resolution is not None else pick(self.resolutions)
        stages = [(pick(self.kernels), pick(self.expansions), pick(self.se))] * len(_STAGES)
        return self.make(res, pick(self.widths), pick(self.depth_multipliers), stages)

    def describe(self) -> dict[str, Any]:
        # distinct depth multipliers can give the same repeats; count distinct repeat tuples
        depth_variants = len({tuple(self.repeats(b, d) for _, _, b in _STAGES) for d in self.depth_multipliers})
        per_stage = len(self.kernels) * len(self.expansions) * len(self.se)
        return {
            "space": self.name,
            "resolutions": list(self.resolutions),
            "widths": list(self.widths),
            "depth_multipliers": list(self.depth_multipliers),
            "kernels": list(self.kernels),
            "expansions": list(self.expansions),
            "se": list(self.se),
            "stem_chs": self.stem_chs,
            "head_chs": self.head_chs,
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "num_architectures": len(self.resolutions) * len(self.widths) * depth_variants * per_stage ** len(_STAGES),
        }
