"""``resnet``: ResNet-style query networks (He et al., CVPR 2016), depth and width per stage.

Plain 3x3 convolutions and no depthwise kernels: the fast choice on CPUs and GPUs whose
runtimes handle depthwise convolutions poorly. Layout for small inputs (a 3x3 stride-2
stem instead of ResNet's 7x7 + max-pool, so the net downsamples 16x):

=====  ==========================  ======  ===============================
stage  block                       stride  channels
=====  ==========================  ======  ===============================
stem   3x3 conv                    2       ``stem_chs``
1      basic or bottleneck blocks  1       64 x width (x4 out, bottleneck)
2      basic or bottleneck blocks  2       128 x width
3      basic or bottleneck blocks  2       256 x width
4      basic or bottleneck blocks  2       512 x width
embed  avg pool, linear + L2 norm  -       gallery dim
=====  ==========================  ======  ===============================

Searched: input resolution, the block type (``basic``: two 3x3 convs; ``bottleneck``:
1x1-3x3-1x1 with a 4x wider output), and per stage the number of blocks and a width
multiplier of the stage's channels (rounded to 8). Activation ReLU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna

from search_spaces._base import Architecture, SearchSpace, choices
from search_spaces._macs import count_macs
from search_spaces._registry import register_space
from search_spaces._timm_builder import scale_channels

__all__ = ["ResNetSpace"]

_BASE_CHANNELS = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)
_BLOCKS = {"basic": "bb", "bottleneck": "bt"}


@register_space("resnet")
class ResNetSpace(SearchSpace):
    """ResNet-style space; every option is a list of choices (``depths``, ``widths`` per stage)."""

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        resolutions: Sequence[int] = (20, 24, 28, 32),
        blocks: Sequence[str] = ("basic", "bottleneck"),
        depths: Sequence[Sequence[int]] = ((1, 2), (1, 2), (1, 2, 3), (1, 2)),
        widths: Sequence[Sequence[float]] = ((0.125, 0.25, 0.5),) * 4,
        stem_chs: int = 16,
    ) -> None:
        super().__init__(embed_dim, in_chans)
        self.resolutions = choices("resolutions", resolutions, int)
        if min(self.resolutions) < 16:
            raise ValueError(f"resnet resolutions must be >= 16 (the net downsamples 16x), but got {min(self.resolutions)}.")
        self.blocks = tuple(blocks)
        if not self.blocks or any(b not in _BLOCKS for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"resnet blocks must be distinct names among {', '.join(_BLOCKS)}, but got {list(self.blocks)}.")
        if len(depths) != 4 or len(widths) != 4:
            raise ValueError(f"resnet depths and widths need one list per stage (4), but got {len(depths)} and {len(widths)}.")
        self.depths = tuple(choices(f"depths[{i}]", d, int) for i, d in enumerate(depths))
        if any(d < 1 for ds in self.depths for d in ds):
            raise ValueError(f"resnet depths must be >= 1, but got {[list(d) for d in self.depths]}.")
        self.widths = tuple(choices(f"widths[{i}]", w, float) for i, w in enumerate(widths))
        if any(not 0 < w <= 4 for ws in self.widths for w in ws):
            raise ValueError(f"resnet widths must be in (0, 4], but got {[list(w) for w in self.widths]}.")
        if stem_chs < 8:
            raise ValueError(f"resnet stem_chs must be >= 8, but got {stem_chs}.")
        self.stem_chs = stem_chs

    def make(self, resolution: int, block: str, stages: Sequence[tuple[int, float]]) -> Architecture:
        """Architecture from explicit choices: the block type and one ``(depth, width)`` per stage."""
        if block not in _BLOCKS:
            raise ValueError(f"resnet block must be one of {', '.join(_BLOCKS)}, but got {block!r}.")
        code = _BLOCKS[block]
        texts = []
        for base, stride, (depth, width) in zip(_BASE_CHANNELS, _STRIDES, stages, strict=True):
            chs = scale_channels(base, width) * (4 if block == "bottleneck" else 1)
            texts.append((f"{code}_r{depth}_k3_s{stride}_c{chs}",))
        return Architecture(
            space=self.name, resolution=int(resolution), width=1.0, stem_chs=self.stem_chs, stages=tuple(texts),
            head_chs=0, embed_dim=self.embed_dim, in_chans=self.in_chans, act="relu",
        )

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        block = trial.suggest_categorical("block", list(self.blocks))
        stages = [
            (trial.suggest_categorical(f"s{i}_depth", list(self.depths[i - 1])), trial.suggest_categorical(f"s{i}_width", list(self.widths[i - 1])))
            for i in range(1, 5)
        ]
        return self.make(resolution, block, stages)

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        pick = min if smallest else max
        res = resolution if resolution is not None else pick(self.resolutions)
        stages = [(pick(d), pick(w)) for d, w in zip(self.depths, self.widths, strict=True)]
        candidates = [self.make(res, block, stages) for block in self.blocks]
        return pick(candidates, key=count_macs) if len(candidates) > 1 else candidates[0]

    def describe(self) -> dict[str, Any]:
        per_stage = [len(d) * len(w) for d, w in zip(self.depths, self.widths, strict=True)]
        return {
            "space": self.name,
            "resolutions": list(self.resolutions),
            "blocks": list(self.blocks),
            "depths": [list(d) for d in self.depths],
            "widths": [list(w) for w in self.widths],
            "stem_chs": self.stem_chs,
            "embed_dim": self.embed_dim,
            "in_chans": self.in_chans,
            "num_architectures": len(self.resolutions) * len(self.blocks) * math.prod(per_stage),
        }
