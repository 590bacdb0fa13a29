"""``gallery``: the query networks that are structured prunings of an MBConv gallery model.

When the gallery model is one of timm's EfficientNet-layout networks (``efficientnet_*``,
``tf_efficientnet_*``, ``efficientnet_lite*``, ``tf_efficientnet_lite*``: a conv stem,
stages of depthwise-separable and inverted-residual blocks, a 1x1 head conv, then
pooling), :func:`mbconv_architecture` reads its layout back into an
:class:`~search_spaces.Architecture` whose :class:`~search_spaces.QueryNet` has exactly
the gallery backbone's layers and ``state_dict`` keys. This space's members are that
architecture shrunk (the dimensions of Once-for-All, Cai et al., ICLR 2020):

- per stage, the depth: its first ``d`` blocks;
- per stage, the depthwise kernel: 3, 5 or 7, at most the gallery's (a centre crop of
  its kernel);
- per stage, the expansion ratio: at most the gallery's (a slice of its expanded
  channels, sorted by importance first: :class:`search_spaces.Supernet`);
- the input resolution.

Channels between stages, the stem, the head conv, squeeze-excitation (present where the
gallery has it; its width follows the expansion) and activations stay the gallery's,
so the largest member at the gallery's resolution *is* the gallery model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
import torch
from torch import nn

from search_spaces._base import Architecture, SearchSpace, choices
from search_spaces._blocks import decode_block, encode_block, format_number
from search_spaces._net import QueryNet
from search_spaces._registry import register_space
from search_spaces._timm_builder import create_timm_model

__all__ = ["GallerySpace", "mbconv_architecture", "RootError"]

#: timm activation modules and the names :func:`search_spaces._timm_builder.activation` takes for them.
_ACT_NAMES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "swish", nn.Hardswish: "hard_swish", nn.Mish: "mish"}
_ACT_CODES = {"relu": "re", "relu6": "r6", "hard_swish": "hs", "swish": "sw", "mish": "mi"}


class RootError(ValueError):
    """A model that cannot root the ``gallery`` space (not an EfficientNet-layout MBConv network)."""


def _act_name(module: nn.Module) -> str:
    act = getattr(module, "act", module)
    for cls, name in _ACT_NAMES.items():
        if type(act) is cls:
            return name
    raise RootError(f"activation {type(act).__name__} is not one of {', '.join(c.__name__ for c in _ACT_NAMES)}")


def _block_string(block: nn.Module, act: str) -> str:
    """The block string of one timm block (repeats 1)."""
    kind = type(block).__name__
    se = not isinstance(block.se, nn.Identity)
    if kind == "InvertedResidual":
        in_chs, mid, out = block.conv_pw.in_channels, block.conv_pw.out_channels, block.conv_pwl.out_channels
        text = f"ir_r1_k{block.conv_dw.kernel_size[0]}_s{block.conv_dw.stride[0]}_e{format_number(mid / in_chs)}_c{out}"
        skip_possible = in_chs == out and block.conv_dw.stride[0] == 1
    elif kind == "DepthwiseSeparableConv":
        in_chs, out = block.conv_dw.in_channels, block.conv_pw.out_channels
        text = f"ds_r1_k{block.conv_dw.kernel_size[0]}_s{block.conv_dw.stride[0]}_c{out}"
        skip_possible = in_chs == out and block.conv_dw.stride[0] == 1
    else:
        raise RootError(f"block type {kind} is not a depthwise-separable or inverted-residual block")
    if se:
        text += "_se0.25"
    block_act = _act_name(block.bn1)
    if block_act != act:
        text += f"_n{_ACT_CODES[block_act]}"
    if skip_possible and not block.has_skip:
        text += "_noskip"
    return text


def mbconv_architecture(model: nn.Module, space: str, embed_dim: int, in_chans: int, resolution: int) -> Architecture:
    """The :class:`Architecture` of timm EfficientNet-layout ``model`` (``RootError`` for any other model).

    Every stage becomes one block string per run of identical blocks; the result is
    checked by building it and comparing every ``state_dict`` key and shape with the
    model's (the classifier aside).
    """
    for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2"):
        if not hasattr(model, name):
            layout = "pools before its head conv (MobileNetV3 layout)" if hasattr(model, "norm_head") else f"has no {name!r}"
            raise RootError(f"{type(model).__name__} {layout}; the gallery space needs timm's EfficientNet layout (conv stem, blocks, conv head, pool)")
    act = _act_name(model.bn1)
    padding = "same" if type(model.conv_stem).__name__ == "Conv2dSame" else ""
    stages = []
    for stage in model.blocks:
        strings: list[str] = []
        for block in stage:
            text = _block_string(block, act)
            if strings and _same_but_stride(strings[-1], text):
                spec = decode_block(strings[-1])
                strings[-1] = encode_block(type(spec)(**{**spec.__dict__, "repeats": spec.repeats + 1}))
            else:
                strings.append(text)
        stages.append(tuple(strings))
    arch = Architecture(
        space=space, resolution=resolution, width=1.0, stem_chs=model.conv_stem.out_channels, stages=tuple(stages),
        head_chs=model.conv_head.out_channels, embed_dim=embed_dim, in_chans=in_chans, act=act, padding=padding, bn_eps=float(model.bn1.eps),
    )
    with torch.device("meta"):
        built = QueryNet(arch).state_dict()
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    ours = {k: tuple(v.shape) for k, v in built.items() if not k.startswith("embed.")}
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise RootError(f"its layers do not match the architecture read from it ({arch.to_string()}); first differences: {differ}")
    return arch


def _same_but_stride(previous: str, text: str) -> bool:
    """Whether block ``text`` (stride 1) repeats the block string ``previous`` (whose first block may have stride 2)."""
    a, b = decode_block(previous), decode_block(text)
    return b.stride == 1 and {**a.__dict__, "stride": 1, "repeats": 1} == {**b.__dict__, "repeats": 1}


@register_space("gallery")
class GallerySpace(SearchSpace):
    """Structured prunings of the timm MBConv model ``model`` (see the module docstring).

    ``model`` is filled in from ``gallery.model`` when a config names this space (alone,
    e.g. ``nas space show gallery``, it defaults to ``tf_efficientnet_lite0``). Per
    stage of the model: depths ``min_depth`` .. its depth, the ``kernels`` up to its
    kernel, the ``expansions`` up to its expansion ratio (stages of one block, or of
    depthwise-separable blocks, keep theirs). ``identity_head`` (set in a config when
    ``gallery.embed_dim`` is null: the gallery embeds its pooled features): members have no
    embedding layer, their pooled features (the gallery's width) are the embedding.
    """

    def __init__(
        self,
        embed_dim: int,
        in_chans: int,
        model: str = "tf_efficientnet_lite0",
        resolutions: Sequence[int] = (96, 112, 128, 160),
        kernels: Sequence[int] = (3, 5, 7),
        expansions: Sequence[float] = (3, 4, 6),
        min_depth: int = 1,
        identity_head: bool = False,
    ) -> None:
        super().__init__(embed_dim, in_chans)
        self.identity_head = bool(identity_head)
        if not model:
            raise ValueError("The gallery space needs option 'model': the timm name of the gallery model it prunes (filled in from gallery.model in a config).")
        self.model = model
        self.resolutions = choices("resolutions", resolutions, int)
        if min(self.resolutions) < 32:
            raise ValueError(f"gallery resolutions must be >= 32 (the net downsamples 32x), but got {min(self.resolutions)}.")
        self.kernels = choices("kernels", kernels, int)
        if any(k not in (3, 5, 7) for k in self.kernels):
            raise ValueError(f"gallery kernels must be among 3, 5, 7, but got {list(self.kernels)}.")
        self.expansions = choices("expansions", expansions, float)
        if any(e < 1 for e in self.expansions):
            raise ValueError(f"gallery expansions must be >= 1, but got {list(self.expansions)}.")
        if min_depth < 1:
            raise ValueError(f"gallery min_depth must be >= 1, but got {min_depth}.")
        self.min_depth = min_depth
        with torch.device("meta"):
            timm_model = create_timm_model(model, in_chans)
        try:
            self.root = mbconv_architecture(timm_model, self.name, embed_dim, in_chans, max(self.resolutions))
        except RootError as exc:
            raise ValueError(f"timm model {model!r} cannot root the gallery space: {exc}.") from None
        # per stage: (spec of its one block string, depth choices, kernel choices, expansion choices)
        self.stage_choices: list[tuple[Any, tuple[int, ...], tuple[int, ...], tuple[float, ...]]] = []
        for strings in self.root.stages:
            spec = decode_block(strings[0])
            if len(strings) > 1 or spec.block_type != "ir":  # mixed stages and ds blocks: kept as they are
                self.stage_choices.append((strings, (spec.repeats,), (spec.kernel,), (spec.exp_ratio,)))
                continue
            depths = tuple(range(min(self.min_depth, spec.repeats), spec.repeats + 1))
            ks = tuple(k for k in self.kernels if k <= spec.kernel) or (spec.kernel,)
            es = tuple(e for e in self.expansions if e <= spec.exp_ratio) or (spec.exp_ratio,)
            self.stage_choices.append((spec, depths, ks, es))

    def make(self, resolution: int, stages: Sequence[tuple[int, int, float]]) -> Architecture:
        """The member with one ``(depth, kernel, expansion)`` per stage of the gallery model."""
        blocks = []
        for (spec, depths, ks, es), (depth, kernel, exp) in zip(self.stage_choices, stages, strict=True):
            if isinstance(spec, tuple):  # a fixed stage
                blocks.append(spec)
                continue
            if depth not in depths or kernel not in ks or exp not in es:
                raise ValueError(f"stage choice {(depth, kernel, exp)} is outside depths {depths}, kernels {ks}, expansions {es}")
            blocks.append((encode_block(type(spec)(**{**spec.__dict__, "repeats": depth, "kernel": kernel, "exp_ratio": float(exp)})),))
        return Architecture(**{**self.root.__dict__, "resolution": int(resolution), "stages": tuple(blocks), "projection": not self.identity_head})

    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        resolution = trial.suggest_categorical("resolution", list(self.resolutions))
        stages = []
        for i, (_, depths, ks, es) in enumerate(self.stage_choices):
            stages.append((
                trial.suggest_categorical(f"s{i}_depth", list(depths)),
                trial.suggest_categorical(f"s{i}_kernel", list(ks)),
                trial.suggest_categorical(f"s{i}_expansion", list(es)),
            ))
        return self.make(resolution, stages)

    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        pick = min if smallest else max
        res = resolution if resolution is not None else pick(self.resolutions)
        return self.make(res, [(pick(d), pick(k), pick(e)) for _, d, k, e in self.stage_choices])

    def describe(self) -> dict[str, Any]:
        return {
            "space": self.name,
            "model": self.model,
            "root": self.root.to_string(),
            "resolutions": list(self.resolutions),
            "stages": [
                {"depths": list(d), "kernels": list(k), "expansions": list(e)} for _, d, k, e in self.stage_choices
            ],
            "embed_dim": self.embed_dim,
            "identity_head": self.identity_head,
            "in_chans": self.in_chans,
            "num_architectures": len(self.resolutions) * math.prod(len(d) * len(k) * len(e) for _, d, k, e in self.stage_choices),
        }
