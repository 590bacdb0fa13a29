"""The one module that touches timm's private EfficientNet block builder.

timm keeps ``_efficientnet_builder`` private, so every use of it goes through the two
functions here and timm is pinned exactly in ``setup.cfg``. The split is timm's own:
decode block strings into keyword arguments, then build modules from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from timm.layers import get_act_layer
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import (
    EfficientNetBuilder,
    decode_arch_def,
    efficientnet_init_weights,
    round_channels,
)

__all__ = ["build_stages", "scale_channels", "init_weights", "activation"]


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
    stages: Sequence[Sequence[str]], in_chs: int, width: float, act: str, se_gate: str = "hard_sigmoid"
) -> tuple[nn.Sequential, int]:
    """Build the stages of block strings ``stages`` with width multiplier ``width``.

    Returns the stages as one ``nn.Sequential`` and the number of output channels.
    Squeeze-excitation is MobileNetV3's: reduction from the expanded channels, a ReLU
    inside and a hard-sigmoid (or ``se_gate``) gate.
    """
    block_args = decode_arch_def([list(stage) for stage in stages], depth_multiplier=1.0)
    se_layer = partial(SqueezeExcite, gate_layer=se_gate, force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    builder = EfficientNetBuilder(
        output_stride=32,
        round_chs_fn=partial(round_channels, multiplier=width),
        se_from_exp=True,
        act_layer=activation(act),
        norm_layer=nn.BatchNorm2d,
        se_layer=se_layer,
    )
    blocks = nn.Sequential(*builder(in_chs, block_args))
    return blocks, int(builder.in_chs)


def init_weights(model: nn.Module) -> None:
    """timm's EfficientNet weight initialisation (fan-out normal convs, uniform linear)."""
    efficientnet_init_weights(model)
