"""The block-string grammar, decoded into typed specs and encoded back.

A block string is the notation of timm's EfficientNet builder, e.g.
``ir_r2_k5_s2_e3_c40_se0.25_nhs``: block type first, then options in any order
(``r`` repeats, ``k`` depthwise kernel, ``s`` stride, ``e`` expansion ratio,
``c`` output channels, ``se`` squeeze-excitation ratio, ``n`` activation override,
``noskip``). Two ResNet block types extend timm's grammar: ``bb`` (basic block, two 3x3
convs) and ``bt`` (bottleneck, 1x1-3x3-1x1 with the middle width a quarter of ``c``), e.g.
``bb_r2_k3_s2_c128``; they are built from timm's ResNet blocks. Unlike timm's decoder, a malformed string raises :class:`ValueError` naming
the offending token, and :func:`encode_block` writes one canonical form so that
``encode_block(decode_block(s))`` is stable.
"""

from __future__ import annotations

import re
from decimal import Decimal
from dataclasses import dataclass

__all__ = ["BlockSpec", "decode_block", "encode_block", "format_number", "BLOCK_TYPES", "RESNET_BLOCK_TYPES", "ACTIVATIONS"]

#: Block types we accept: inverted residual, depthwise-separable (with/without pointwise
#: activation), edge residual, conv-bn-act, and the ResNet basic and bottleneck blocks.
BLOCK_TYPES = ("ir", "ds", "dsa", "er", "cn", "bb", "bt")
#: Block types built from timm's ResNet blocks rather than its EfficientNet builder.
RESNET_BLOCK_TYPES = ("bb", "bt")
#: Activation codes of the ``n`` option and the timm activation names they stand for.
ACTIVATIONS = {"re": "relu", "r6": "relu6", "hs": "hard_swish", "sw": "swish", "mi": "mish"}

_NUMERIC = re.compile(r"^(se|[rksec])(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class BlockSpec:
    """One stage entry: ``repeats`` identical blocks, the first with ``stride``."""

    block_type: str
    repeats: int
    kernel: int
    stride: int
    out_chs: int
    exp_ratio: float = 1.0
    se_ratio: float = 0.0
    act: str | None = None
    noskip: bool = False

    def __post_init__(self) -> None:
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(f"Block type must be one of {', '.join(BLOCK_TYPES)}, but got {self.block_type!r}.")
        if self.repeats < 1:
            raise ValueError(f"Block repeats must be >= 1, but got {self.repeats}.")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"Block kernel must be a positive odd number, but got {self.kernel}.")
        if self.stride not in (1, 2):
            raise ValueError(f"Block stride must be 1 or 2, but got {self.stride}.")
        if self.out_chs < 1:
            raise ValueError(f"Block output channels must be >= 1, but got {self.out_chs}.")
        if self.exp_ratio <= 0:
            raise ValueError(f"Block expansion ratio must be > 0, but got {self.exp_ratio}.")
        if self.block_type not in ("ir", "er") and self.exp_ratio != 1.0:
            raise ValueError(f"Block type {self.block_type!r} has no expansion ratio, but got e{format_number(self.exp_ratio)}.")
        if not 0.0 <= self.se_ratio < 1.0:
            raise ValueError(f"Squeeze-excitation ratio must be in [0, 1), but got {self.se_ratio}.")
        if self.block_type in ("cn", *RESNET_BLOCK_TYPES) and self.se_ratio > 0:
            raise ValueError(f"Block type {self.block_type!r} has no squeeze-excitation, but got se{format_number(self.se_ratio)}.")
        if self.block_type in RESNET_BLOCK_TYPES:
            if self.kernel != 3:
                raise ValueError(f"Block type {self.block_type!r} (ResNet) has 3x3 convolutions only, but got k{self.kernel}.")
            if self.noskip:
                raise ValueError(f"Block type {self.block_type!r} (ResNet) always has its residual connection, but got noskip.")
            if self.block_type == "bt" and self.out_chs % 4:
                raise ValueError(f"Block type 'bt' (bottleneck) needs output channels divisible by 4, but got c{self.out_chs}.")
        if self.act is not None and self.act not in ACTIVATIONS:
            raise ValueError(f"Activation code must be one of {', '.join(ACTIVATIONS)}, but got {self.act!r}.")


def format_number(value: float) -> str:
    """Shortest exact decimal form, never in exponent notation: 3.0 -> '3', 1e-05 -> '0.00001'."""
    text = format(Decimal(repr(float(value))), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def decode_block(block: str) -> BlockSpec:
    """Parse one block string into a :class:`BlockSpec`; ``ValueError`` names a bad token."""
    if not isinstance(block, str) or not block:
        raise ValueError(f"A block string must be a non-empty string, but got {block!r}.")
    block_type, *tokens = block.split("_")
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"Unknown block type {block_type!r} in {block!r}; valid types: {', '.join(BLOCK_TYPES)}.")
    values: dict[str, str] = {}
    act = None
    noskip = False
    for token in tokens:
        if token == "noskip":
            noskip = True
            continue
        if token.startswith("n") and token[1:] in ACTIVATIONS:
            if act is not None:
                raise ValueError(f"Token {token!r} repeats the activation option in block string {block!r}.")
            act = token[1:]
            continue
        match = _NUMERIC.match(token)
        if match is None:
            raise ValueError(
                f"Invalid token {token!r} in block string {block!r}: expected r<int>, k<int>, s<int>, "
                f"e<float>, c<int>, se<float>, n<{'|'.join(ACTIVATIONS)}> or noskip."
            )
        key, value = match.groups()
        if key in values:
            raise ValueError(f"Token {token!r} repeats option {key!r} in block string {block!r}.")
        values[key] = value
    for key in ("r", "k", "s", "c"):
        if key not in values:
            raise ValueError(f"Block string {block!r} is missing the required option {key!r} (e.g. {key}1).")
    if block_type in ("ir", "er") and "e" not in values:
        raise ValueError(f"Block string {block!r} is missing the expansion ratio 'e' required by {block_type!r} blocks.")
    for key in ("r", "k", "s", "c"):
        if "." in values[key]:
            raise ValueError(f"Option {key!r} of block string {block!r} must be an integer, but got {values[key]!r}.")
    try:
        return BlockSpec(
            block_type=block_type,
            repeats=int(values["r"]),
            kernel=int(values["k"]),
            stride=int(values["s"]),
            out_chs=int(values["c"]),
            exp_ratio=float(values.get("e", 1)),
            se_ratio=float(values.get("se", 0)),
            act=act,
            noskip=noskip,
        )
    except ValueError as exc:
        raise ValueError(f"Invalid block string {block!r}: {exc}") from None


def encode_block(spec: BlockSpec) -> str:
    """Write ``spec`` in the canonical block-string form (inverse of :func:`decode_block`)."""
    parts = [spec.block_type, f"r{spec.repeats}", f"k{spec.kernel}", f"s{spec.stride}"]
    if spec.block_type in ("ir", "er"):
        parts.append(f"e{format_number(spec.exp_ratio)}")
    parts.append(f"c{spec.out_chs}")
    if spec.se_ratio > 0:
        parts.append(f"se{format_number(spec.se_ratio)}")
    if spec.act is not None:
        parts.append(f"n{spec.act}")
    if spec.noskip:
        parts.append("noskip")
    return "_".join(parts)
