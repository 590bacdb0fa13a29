"""The one module that builds timm layers: its private EfficientNet builder, its ResNet
blocks and its model factory.

timm keeps ``_efficientnet_builder`` private, so every use of it goes through the
functions here and timm is pinned exactly in ``setup.cfg``. The split is timm's own:
decode block strings into keyword arguments, then build modules from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import timm
from torch import nn

from timm.layers import create_conv2d, get_act_layer
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import (
    EfficientNetBuilder,
    decode_arch_def,
    efficientnet_init_weights,
    round_channels,
)
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from search_spaces._blocks import RESNET_BLOCK_TYPES, decode_block

__all__ = ["build_stages", "scale_channels", "init_weights", "activation", "create_timm_model", "timm_model_exists", "stem_conv"]

#: Activations whose nets use EfficientNet's squeeze-excitation (sigmoid gate, SiLU inside,
#: reduction from the block's input channels); all others use MobileNetV3's (hard-sigmoid
#: gate, ReLU inside, reduction from the expanded channels).
_EFFICIENTNET_SE_ACTS = ("swish", "silu")


def activation(name: str) -> type[nn.Module]:
    """The activation module class timm registers under ``name`` (e.g. ``hard_swish``)."""
    layer = get_act_layer(name)
    if layer is None:
        raise ValueError(f"Unknown activation {name!r}.")
    return layer


def scale_channels(channels: int, width: float) -> int:
    """Channels after a width multiplier, rounded to a multiple of 8 as timm does."""
    return int(round_channels(channels, multiplier=width))


def build_stages(
    stages: Sequence[Sequence[str]], in_chs: int, width: float, act: str, padding: str = "", bn_eps: float = 1e-5
) -> tuple[nn.Sequential, int]:
    """Build the stages of block strings ``stages`` with width multiplier ``width``.

    ``padding`` is timm's ``pad_type`` (``''`` symmetric, ``'same'`` TensorFlow's) and
    ``bn_eps`` the batch-norm epsilon (see :class:`search_spaces.Architecture`).

    Returns one ``nn.Sequential`` of stages (each an ``nn.Sequential`` of blocks) and the
    number of output channels. ResNet block strings (``bb``/``bt``) are built from timm's
    ``BasicBlock``/``Bottleneck``; all others by timm's EfficientNet builder.
    """
    first = decode_block(stages[0][0])
    if first.block_type in RESNET_BLOCK_TYPES:
        return _build_resnet_stages(stages, in_chs, width, act)
    block_args = decode_arch_def([list(stage) for stage in stages], depth_multiplier=1.0)
    if act in _EFFICIENTNET_SE_ACTS:
        se_layer, se_from_exp = partial(SqueezeExcite, gate_layer="sigmoid"), False
    else:
        se_layer = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
        se_from_exp = True
    builder = EfficientNetBuilder(
        output_stride=32,
        pad_type=padding,
        round_chs_fn=partial(round_channels, multiplier=width),
        se_from_exp=se_from_exp,
        act_layer=activation(act),
        norm_layer=partial(nn.BatchNorm2d, eps=bn_eps) if bn_eps != 1e-5 else nn.BatchNorm2d,
        se_layer=se_layer,
    )
    blocks = nn.Sequential(*builder(in_chs, block_args))
    return blocks, int(builder.in_chs)


def stem_conv(in_chs: int, out_chs: int, padding: str = "") -> nn.Module:
    """The 3x3 stride-2 stem convolution: symmetric padding 1, or TensorFlow "same" padding (timm's ``Conv2dSame``)."""
    if padding:
        return create_conv2d(in_chs, out_chs, 3, stride=2, padding=padding, bias=False)
    return nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False)


def _build_resnet_stages(stages: Sequence[Sequence[str]], in_chs: int, width: float, act: str) -> tuple[nn.Sequential, int]:
    act_layer = activation(act)
    built = []
    for stage in stages:
        blocks: list[nn.Module] = []
        for text in stage:
            spec = decode_block(text)
            out_chs = scale_channels(spec.out_chs, width)
            block_cls = BasicBlock if spec.block_type == "bb" else Bottleneck
            planes = out_chs // block_cls.expansion
            for i in range(spec.repeats):
                stride = spec.stride if i == 0 else 1
                downsample = None
                if stride != 1 or in_chs != out_chs:
                    downsample = downsample_conv(in_chs, out_chs, kernel_size=1, stride=stride, norm_layer=nn.BatchNorm2d)
                blocks.append(block_cls(in_chs, planes, stride=stride, downsample=downsample, act_layer=act_layer))
                in_chs = out_chs
        built.append(nn.Sequential(*blocks))
    return nn.Sequential(*built), in_chs


def init_weights(model: nn.Module) -> None:
    """timm's EfficientNet weight initialisation (fan-out normal convs, uniform linear)."""
    efficientnet_init_weights(model)


def timm_model_exists(name: str) -> bool:
    """Whether timm registers a model called ``name``."""
    return name in timm.list_models()


def create_timm_model(name: str, in_chans: int, **kwargs: Any) -> nn.Module:
    """timm model ``name`` without its classifier, randomly initialised (never downloads)."""
    if not timm_model_exists(name):
        raise ValueError(f"timm has no model named {name!r}; `timm.list_models('{name.split('_')[0]}*')` lists the names it knows.")
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
