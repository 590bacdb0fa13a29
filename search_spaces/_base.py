"""The architecture value type and the search-space interface."""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import optuna

from search_spaces._blocks import RESNET_BLOCK_TYPES, decode_block, encode_block, format_number
from search_spaces._rooted import Pruning

__all__ = ["Architecture", "SearchSpace", "choices"]


@dataclass(frozen=True)
class Architecture:
    """A query network as data: block strings plus resolution, widths and embedding head.

    Hashable and comparable; :meth:`to_string` is its canonical text form and
    :attr:`arch_id` a stable hash of that text, used to recognise duplicates.
    ``stages`` holds timm block strings (canonical form), one tuple per stage; channel
    counts in them are before the ``width`` multiplier. ``head_chs`` 0 means no 1x1 head
    convolution (the ResNet layout: pool the last stage directly).

    An architecture may instead name a timm model (``timm_model``, e.g.
    ``mobilenetv3_small_075``): then it is that model as timm builds it, at ``resolution``,
    with ``width`` scaling its channels where the family allows (see the ``timm_zoo``
    space); ``stages`` is empty and ``stem_chs``/``head_chs`` are 0.

    With ``pruning`` (the text form of a :class:`search_spaces.Pruning`, ``-`` for none), a
    timm-model architecture is that structured pruning of the model (the ``pruned`` space):
    its widths, depths and heads cut as the pruning says, at ``resolution``.

    ``root``: for a pruning, the first 16 hex digits of the SHA-256 of the weights whose
    channel ranks chose the kept channels (the gallery model's), so that the string names
    everything that rebuilds the member from them (text form ``root=``; empty: not recorded).

    ``projection`` False: no embedding layer, the pooled features L2-normalised are the
    embedding (they must have ``embed_dim`` channels): for a member whose pooled features
    are those of a gallery model that embeds its own pooled features (``gallery.embed_dim``
    null), which needs no parameters to land in its space. Text form ``proj=none``.

    ``padding`` ``same`` and ``bn_eps`` 0.001 are the TensorFlow conventions of timm's
    ``tf_*`` models (asymmetric "same" padding of stride-2 convolutions, batch-norm epsilon
    1e-3), so that a subnet of such a gallery model (the ``gallery`` space) computes what
    it computes; the defaults (symmetric padding, 1e-5) are PyTorch's. They appear in the
    text form only when not the default, so earlier architecture ids are unchanged.
    """

    space: str
    resolution: int
    width: float
    stem_chs: int
    stages: tuple[tuple[str, ...], ...]
    head_chs: int
    embed_dim: int
    in_chans: int
    act: str = "hard_swish"
    timm_model: str = ""
    padding: str = ""
    bn_eps: float = 1e-5
    pruning: str = ""
    projection: bool = True
    root: str = ""

    def __post_init__(self) -> None:
        if self.padding not in ("", "same"):
            raise ValueError(f"Architecture padding must be '' (symmetric) or 'same' (TensorFlow), but got {self.padding!r}.")
        if not 0 < self.bn_eps < 1:
            raise ValueError(f"Architecture bn_eps must be in (0, 1), but got {self.bn_eps}.")
        if self.resolution < 8:
            raise ValueError(f"Architecture resolution must be >= 8, but got {self.resolution}.")
        if not 0 < self.width <= 4:
            raise ValueError(f"Architecture width multiplier must be in (0, 4], but got {self.width}.")
        if self.in_chans not in (1, 3):
            raise ValueError(f"Architecture in_chans must be 1 or 3, but got {self.in_chans}.")
        if self.embed_dim < 2:
            raise ValueError(f"Architecture embed_dim must be >= 2, but got {self.embed_dim}.")
        if self.root and (not self.pruning or len(self.root) != 16 or any(c not in "0123456789abcdef" for c in self.root)):
            raise ValueError(f"Architecture root must be 16 lower-case hex digits of a pruning's root weights, but got {self.root!r}.")
        if self.pruning:
            if not self.timm_model:
                raise ValueError(f"A pruning ({self.pruning!r}) is a pruning of a timm model: name it (timm_model).")
            object.__setattr__(self, "pruning", Pruning.from_text(self.pruning).to_text())  # canonical
        if self.timm_model:
            if self.stages or self.stem_chs or self.head_chs:
                raise ValueError(
                    f"An architecture naming timm model {self.timm_model!r} takes its layers from timm: "
                    f"stages must be empty and stem/head 0, but got stages={self.stages!r}, stem={self.stem_chs}, head={self.head_chs}."
                )
            object.__setattr__(self, "stages", ())
            return
        if self.stem_chs < 1 or self.head_chs < 0:
            raise ValueError(f"Architecture stem channels must be >= 1 and head channels >= 0, but got {self.stem_chs} and {self.head_chs}.")
        if not self.stages or any(not stage for stage in self.stages):
            raise ValueError(f"Architecture needs at least one non-empty stage, but got {self.stages!r}.")
        specs = [[decode_block(b) for b in stage] for stage in self.stages]
        for stage in specs:
            # timm's builder gives every block after a stage's first one stride 1
            if any(spec.stride != 1 for spec in stage[1:]):
                raise ValueError(
                    f"Only the first block string of a stage may have stride 2, but got stage {[encode_block(s) for s in stage]}; "
                    f"start a new stage for the downsampling block."
                )
        kinds = {spec.block_type in RESNET_BLOCK_TYPES for stage in specs for spec in stage}
        if len(kinds) > 1:
            raise ValueError(
                f"An architecture uses either ResNet blocks ({', '.join(RESNET_BLOCK_TYPES)}) or EfficientNet-builder blocks, "
                f"not both, but got {[encode_block(s) for stage in specs for s in stage]}."
            )
        object.__setattr__(self, "stages", tuple(tuple(encode_block(spec) for spec in stage) for stage in specs))

    @property
    def is_resnet(self) -> bool:
        """Whether the stages are ResNet blocks (``bb`` / ``bt``)."""
        return bool(self.stages) and decode_block(self.stages[0][0]).block_type in RESNET_BLOCK_TYPES

    # ------------------------------------------------------------------ text form
    def to_string(self) -> str:
        """Canonical one-line form: ``key=value`` fields, stages joined by ``/``, blocks by ``+``."""
        if self.timm_model:
            return (
                f"space={self.space} res={self.resolution} width={format_number(self.width)} model={self.timm_model} "
                f"embed={self.embed_dim} in={self.in_chans}" + (f" prune={self.pruning}" if self.pruning else "")
                + (f" root={self.root}" if self.root else "") + ("" if self.projection else " proj=none")
            )
        stages = "/".join("+".join(stage) for stage in self.stages)
        text = (
            f"space={self.space} res={self.resolution} width={format_number(self.width)} stem={self.stem_chs} "
            f"stages={stages} head={self.head_chs} embed={self.embed_dim} in={self.in_chans} act={self.act}"
        )
        if self.padding:
            text += f" pad={self.padding}"
        if self.bn_eps != 1e-5:
            text += f" bn_eps={format_number(self.bn_eps)}"
        if not self.projection:
            text += " proj=none"
        return text

    @classmethod
    def from_string(cls, text: str) -> Architecture:
        """Parse :meth:`to_string` output; ``ValueError`` names a missing or bad field."""
        fields: dict[str, str] = {}
        for token in text.split():
            key, sep, value = token.partition("=")
            if not sep:
                raise ValueError(f"Architecture string token {token!r} is not of the form key=value.")
            fields[key] = value
        if "model" in fields:
            return cls._timm_from_fields(fields, text)
        required = ("space", "res", "width", "stem", "stages", "head", "embed", "in")
        missing = [k for k in required if k not in fields]
        if missing:
            raise ValueError(f"Architecture string is missing field(s) {', '.join(missing)}: {text!r}.")
        try:
            return cls(
                space=fields["space"],
                resolution=int(fields["res"]),
                width=float(fields["width"]),
                stem_chs=int(fields["stem"]),
                stages=tuple(tuple(stage.split("+")) for stage in fields["stages"].split("/")),
                head_chs=int(fields["head"]),
                embed_dim=int(fields["embed"]),
                in_chans=int(fields["in"]),
                act=fields.get("act", "hard_swish"),
                padding=fields.get("pad", ""),
                bn_eps=float(fields.get("bn_eps", 1e-5)),
                projection=_projection(fields),
            )
        except ValueError as exc:
            raise ValueError(f"Invalid architecture string {text!r}: {exc}") from None

    @classmethod
    def _timm_from_fields(cls, fields: dict[str, str], text: str) -> Architecture:
        missing = [k for k in ("space", "res", "width", "embed", "in") if k not in fields]
        if missing:
            raise ValueError(f"Architecture string is missing field(s) {', '.join(missing)}: {text!r}.")
        try:
            return cls(
                space=fields["space"], resolution=int(fields["res"]), width=float(fields["width"]), stem_chs=0, stages=(),
                head_chs=0, embed_dim=int(fields["embed"]), in_chans=int(fields["in"]), timm_model=fields["model"],
                pruning=fields.get("prune", ""),
                root=fields.get("root", ""),
                projection=_projection(fields),
            )
        except ValueError as exc:
            raise ValueError(f"Invalid architecture string {text!r}: {exc}") from None

    # ------------------------------------------------------------------ JSON form
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = [list(stage) for stage in self.stages]
        data["arch_id"] = self.arch_id
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Architecture:
        data = dict(data)
        expected = data.pop("arch_id", None)
        data["stages"] = tuple(tuple(stage) for stage in data["stages"])
        arch = cls(**data)
        if expected is not None and expected != arch.arch_id:
            raise ValueError(f"Architecture id {expected} does not match its fields (hash {arch.arch_id}).")
        return arch

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        return cls.from_dict(json.loads(text))

    @property
    def arch_id(self) -> str:
        """A stable 16-hex-digit hash of the canonical string."""
        return hashlib.sha256(self.to_string().encode()).hexdigest()[:16]


def _projection(fields: dict[str, str]) -> bool:
    value = fields.get("proj", "linear")
    if value not in ("linear", "none"):
        raise ValueError(f"Architecture field proj must be 'none' (no embedding layer) or absent, but got {value!r}.")
    return value == "linear"


class SearchSpace(abc.ABC):
    """A declarative space of query architectures.

    Implementations sample an :class:`Architecture` from an Optuna trial with stable
    parameter names, and name the extreme members so that budgets can be checked against
    what the space can reach at all.
    """

    name: str = ""

    def __init__(self, embed_dim: int, in_chans: int) -> None:
        if embed_dim < 2:
            raise ValueError(f"embed_dim must be >= 2, but got {embed_dim}.")
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, but got {in_chans}.")
        self.embed_dim = embed_dim
        self.in_chans = in_chans

    @abc.abstractmethod
    def sample(self, trial: optuna.trial.BaseTrial) -> Architecture:
        """Draw one architecture; parameter names are stable across versions of the space."""

    @abc.abstractmethod
    def extreme(self, smallest: bool = True, resolution: int | None = None) -> Architecture:
        """The smallest (or largest) member, at ``resolution`` or at the extreme resolution."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The choices of every dimension and the number of distinct architectures."""


def choices(name: str, values: Sequence[Any], kind: type) -> tuple:
    """``values`` as a sorted tuple of ``kind``; ``ValueError`` for an empty, mistyped or repeated list."""
    values = tuple(values)
    if not values:
        raise ValueError(f"Search space option {name!r} needs at least one choice, but got an empty list.")
    for v in values:
        if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"Every choice of {name!r} must be an integer, but got {v!r}.")
        if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"Every choice of {name!r} must be a number, but got {v!r}.")
    if len(set(values)) != len(values):
        raise ValueError(f"Choices of {name!r} must be distinct, but got {list(values)}.")
    return tuple(sorted(kind(v) for v in values))
