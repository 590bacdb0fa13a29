"""Which timm models the ``timm_zoo`` space offers, and the :class:`Architecture` of any timm model.

Data and small functions only (no net is built here), so that both the net builder
(:mod:`search_spaces._net`, which needs :func:`timm_kwargs`) and the space
(:mod:`search_spaces._timm_zoo`, which needs :data:`FAMILIES` and
:func:`timm_architecture`) import it without importing each other.
"""

from __future__ import annotations

from typing import Any

from search_spaces._base import Architecture
from search_spaces._timm_builder import scale_channels

__all__ = ["FAMILIES", "timm_kwargs", "timm_architecture"]

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
