"""``mobilenet``: MobileNetV3-style query networks for small images.

Layout (channels before the width multiplier; strides relative to the input):

=========  ======================  ======  ============  ==========
stage      block                   stride  channels      activation
=========  ======================  ======  ============  ==========
stem       3x3 conv                2       16            hard-swish
0 (fixed)  depthwise-separable k3  1       16            ReLU
1          inverted residual       2       24            ReLU
2          inverted residual       2       40            hard-swish
3          inverted residual       1       48            hard-swish
4          inverted residual       2       96            hard-swish
head       1x1 conv, avg pool      -       256           hard-swish
embed      linear + L2 norm        -       gallery dim   -
=========  ======================  ======  ============  ==========

Searched per stage 1-4: depth, depthwise kernel, expansion ratio and squeeze-excitation
on/off; globally: width multiplier and input resolution. The layout follows MobileNetV3
(Howard et al., ICCV 2019), with the early stride-2 steps removed for 16-32 pixel inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from search_spaces._base import Architecture, SearchSpace, choices as _choices
from search_spaces._registry import register_space

__all__ = ["MobileNetSpace"]

# (output channels, stride, activation code or None for the network default)
_STAGES: tuple[tuple[int, int, str | None], ...] = ((24, 2, "re"), (40, 2, None), (48, 1, None), (96, 2, None))
_FIXED_FIRST = "ds_r1_k3_s1_c16_nre"
_SE_RATIO = 0.25


@register_space("mobilenet")
class MobileNetSpace(SearchSpace):
    """MobileNetV3-style space; every option is a list of choices.

    ``depths`` lists, per searched stage, the allowed numbers of blocks.
    """

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        resolutions: Sequence[int] = (20, 24, 28, 32),
        widths: Sequence[float] = (0.35, 0.5, 0.75, 1.0),
        kernels: Sequence[int] = (3, 5, 7),
        expansions: Sequence[float] = (3, 4, 6),
        depths: Sequence[Sequence[int]] = ((1, 2), (1, 2, 3), (1, 2), (1, 2, 3)),
        se: Sequence[bool] = (False, True),
        stem_chs: int = 16,
        head_chs: int = 256,
    ) -> None:
        super().__init__(embed_dim, in_chans)
        self.resolutions = _choices("resolutions", resolutions, int)
        if min(self.resolutions) < 16:
            raise ValueError(f"mobilenet resolutions must be >= 16 (the net downsamples 16x), but got {min(self.resolutions)}.")
        self.widths = _choices("widths", widths, float)
        if any(not 0 < w <= 4 for w in self.widths):
            raise ValueError(f"mobilenet widths must be in (0, 4], but got {list(self.widths)}.")
        self.kernels = _choices("kernels", kernels, int)
        if any(k not in (3, 5, 7) for k in self.kernels):
            raise ValueError(f"mobilenet kernels must be among 3, 5, 7, but got {list(self.kernels)}.")
        self.expansions = _choices("expansions", expansions, float)
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"mobilenet expansions must be >= 1, but got {list(self.expansions)}.")
        if len(depths) != len(_STAGES):
            raise ValueError(f"mobilenet depths needs one list per searched stage ({len(_STAGES)}), but got {len(depths)}.")
        self.depths = tuple(_choices(f"depths[{i}]", d, int) for i, d in enumerate(depths))
        if any(d < 1 for ds in self.depths for d in ds):
            raise ValueError(f"mobilenet depths must be >= 1, but got {[list(d) for d in self.depths]}.")
        self.se = tuple(sorted({bool(s) for s in se}))
        if len(self.se) != len(tuple(se)) or not self.se:
            raise ValueError(f"mobilenet se must be a non-empty list of distinct booleans, but got {list(se)}.")
        if stem_chs < 8 or head_chs < 8:
            raise ValueError(f"mobilenet stem_chs and head_chs must be >= 8, but got {stem_chs} and {head_chs}.")
        self.stem_chs = stem_chs
        self.head_chs = head_chs

    # ------------------------------------------------------------------ building
    def make(
        self, resolution: int, width: float, stages: Sequence[tuple[int, int, float, bool]]
    ) -> Architecture:
        """Architecture from explicit choices: one ``(depth, kernel, expansion, se)`` per stage."""
        blocks = [(_FIXED_FIRST,)]
        for (chs, stride, act), (depth, kernel, exp, se) in zip(_STAGES, stages, strict=True):
            text = f"ir_r{depth}_k{kernel}_s{stride}_e{exp:g}_c{chs}"
            if se:
                text += f"_se{_SE_RATIO}"
            if act:
                text += f"_n{act}"
            blocks.append((text,))
        return Architecture(
            space=self.name,
            resolution=int(resolution),
            width=float(width),
            stem_chs=self.stem_chs,
            stages=tuple(blocks),
            head_chs=self.head_chs,
            embed_dim=self.embed_dim,
            in_chans=self.in_chans,
            act="hard_swish",
        )

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        width = trial.suggest_categorical("width", list(self.widths))
        stages = []
        for i in range(1, len(_STAGES) + 1):
            stages.append(
                (
                    trial.suggest_categorical(f"s{i}_depth", list(self.depths[i - 1])),
                    trial.suggest_categorical(f"s{i}_kernel", list(self.kernels)),
                    trial.suggest_categorical(f"s{i}_expansion", list(self.expansions)),
                    trial.suggest_categorical(f"s{i}_se", list(self.se)),
                )
            )
        return self.make(resolution, width, stages)

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        pick = min if smallest else max
        res = resolution if resolution is not None else pick(self.resolutions)
        stages = [(pick(d), pick(self.kernels), pick(self.expansions), pick(self.se)) for d in self.depths]
        return self.make(res, pick(self.widths), stages)

    def describe(self) -> dict[str, Any]:
        per_stage = [len(d) * len(self.kernels) * len(self.expansions) * len(self.se) for d in self.depths]
        return {
            "space": self.name,
            "resolutions": list(self.resolutions),
            "widths": list(self.widths),
            "kernels": list(self.kernels),
            "expansions": list(self.expansions),
            "depths": [list(d) for d in self.depths],
            "se": list(self.se),
            "stem_chs": self.stem_chs,
            "head_chs": self.head_chs,
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "num_architectures": len(self.resolutions) * len(self.widths) * math.prod(per_stage),
        }
