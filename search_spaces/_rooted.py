"""Structured prunings of any supported timm gallery model: :class:`Root` and its members.

A *root* is a timm model with its (gallery) weights. Which channels are coupled (across
residual additions, depthwise convolutions, normalisation layers, squeeze-excitation) is
read from the model itself by Torch-Pruning's dependency graph (DepGraph: Fang et al.,
"DepGraph: Towards Any Structural Pruning", CVPR 2023; the ``torch-pruning`` package): every
coupled group is a set of channels that must be kept or removed together. Once, from the
root's own weights, each group's channels are ranked by importance: the mean over the
group's layers of each channel's squared L2 weight norm (Torch-Pruning's
``GroupMagnitudeImportance(p=2)``, without normalisation). A member keeps, in every group,
the most important ``round(width x size)`` channels (at least one), where ``width`` is its
stage's width ratio; so a member at width 1 everywhere and full depth *is* the root.

A member is data (:class:`Pruning`: a width ratio per stage, a depth per stage; for a ViT
the heads per block and the resolution); the stages and which blocks may be dropped are the
only family-specific facts, one small rule per family (:data:`FAMILIES`): ResNet (basic and
bottleneck blocks), EfficientNet / EfficientNet-Lite and MobileNetV3 (timm's ``EfficientNet``
and ``MobileNetV3`` classes), ConvNeXt, and the vision transformer (``VisionTransformer``:
DeiT, ViT). Depth drops a stage's trailing residual blocks (blocks that keep their input's
shape); the first block of a stage is always kept. Widths apply to every group whose first
producer lies in the stage (``stem`` before the first stage, ``head`` after the last); a
ViT's width units are its blocks (the MLP's hidden width), its ``stem`` group is the residual
stream (patch embedding, class token, position embeddings, every block's output), and an
attention's ``qkv`` group is cut by whole heads, ranked by the summed importance of their
query, key and value channels (removing a head computes exactly what zeroing its output
does). A model of another family is a ``ValueError`` that names its class.

:meth:`Root.member` returns a :class:`PrunedNet`: the pruned backbone through timm's own
``forward_features`` and ``forward_head(pre_logits=True)`` (MobileNetV3's head convolution after
pooling included), then, where output channels were cut, a linear map back into the root's
feature space, initialised as the selection of the kept channels (and counted in the
member's MFLOPs): the member's output lives where the root's does, and the unpruned member
computes exactly what the root computes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["Root", "Pruning", "PrunedNet", "FAMILIES", "Family", "Axis", "keeps_shape"]


@dataclass(frozen=True)
class Family:
    """What one model family needs beyond the dependency graph: its stages and its droppable blocks.

    ``classes``: timm model class names of the family. ``stages(model)``: stage name -> the
    ``nn.Sequential`` of its blocks, in order (what depth counts). ``units(model)``: the names
    that width ratios are given for, where they are not the stages (a ViT's blocks, one by one).
    """

    name: str
    classes: tuple[str, ...]
    stages: Callable[[nn.Module], dict[str, nn.Sequential]]
    #: the names width ratios (and a ViT's heads) are given for; default: the stages
    units: Callable[[nn.Module], list[str]] | None = None


def _resnet_stages(model: nn.Module) -> dict[str, nn.Sequential]:
    return {name: getattr(model, name) for name in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(model, name, None), nn.Sequential)}


def _efficientnet_stages(model: nn.Module) -> dict[str, nn.Sequential]:
    return {f"blocks.{i}": stage for i, stage in enumerate(model.blocks)}


def _convnext_stages(model: nn.Module) -> dict[str, nn.Sequential]:
    return {f"stages.{i}": stage.blocks for i, stage in enumerate(model.stages)}


def _vit_stages(model: nn.Module) -> dict[str, nn.Sequential]:
    return {"blocks": model.blocks}


def _vit_units(model: nn.Module) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


#: The supported families, by timm model class.
FAMILIES = (
    Family("resnet", ("ResNet",), _resnet_stages),
    Family("efficientnet", ("EfficientNet", "MobileNetV3"), _efficientnet_stages),
    Family("convnext", ("ConvNeXt",), _convnext_stages),
    Family("vit", ("VisionTransformer",), _vit_stages, _vit_units),
)


def family_of(model: nn.Module) -> Family:
    """The family rule of ``model``; ``ValueError`` naming its class when none covers it."""
    cls = type(model).__name__
    for family in FAMILIES:
        if cls in family.classes:
            return family
    supported = ", ".join(c for f in FAMILIES for c in f.classes)
    raise ValueError(
        f"No pruning rule covers gallery models of class {cls!r} (timm's {type(model).__module__}); "
        f"rooted prunings support {supported}. Use another gallery model or a space trained from scratch."
    )


@dataclass(frozen=True)
class Pruning:
    """A pruning of a root: a width ratio in (0, 1] per stage (missing: 1), a depth per stage (missing: all
    blocks), for a ViT the attention heads kept per block (missing: all), and the input resolution (``None``:
    the root's; a ViT's position embeddings are resampled to it as timm does)."""

    widths: Mapping[str, float] = field(default_factory=dict)
    depths: Mapping[str, int] = field(default_factory=dict)
    heads: Mapping[str, int] = field(default_factory=dict)
    resolution: int | None = None

    #: the text form's key per field
    _KEYS = (("w", "widths", float), ("d", "depths", int), ("h", "heads", int))

    def to_text(self) -> str:
        """Canonical text (no resolution): ``w:layer2=0.5,d:layer1=1,h:blocks.0=2``, fields then names sorted;
        ``-`` for the unpruned member."""
        parts = [
            f"{key}:{name}={value:g}" if kind is float else f"{key}:{name}={int(value)}"
            for key, attr, kind in self._KEYS for name, value in sorted(getattr(self, attr).items())
        ]
        return ",".join(parts) or "-"

    @classmethod
    def from_text(cls, text: str, resolution: int | None = None) -> Pruning:
        """Parse :meth:`to_text`; ``ValueError`` names a bad part."""
        fields: dict[str, dict] = {"widths": {}, "depths": {}, "heads": {}}
        kinds = {key: (attr, kind) for key, attr, kind in cls._KEYS}
        for part in [] if text in ("", "-") else text.split(","):
            key, _, rest = part.partition(":")
            name, _, value = rest.partition("=")
            if key not in kinds or not name or not value:
                raise ValueError(f"pruning part {part!r} is not of the form w:STAGE=RATIO, d:STAGE=BLOCKS or h:BLOCK=HEADS.")
            attr, kind = kinds[key]
            fields[attr][name] = kind(value)
        return cls(**fields, resolution=resolution)


@dataclass(frozen=True)
class _Group:
    modules: tuple[str, ...]  # the modules whose output channels form the group, in the dependency graph's order
    stage: str
    order: tuple[int, ...]  # channel indices (heads, for an attention's qkv), most important first
    head_dim: int = 0  # an attention's qkv projection: whole heads are kept or removed; 0: channels


class PrunedNet(nn.Module):
    """A pruned backbone, its pre-logits features mapped back into the root's feature space (see the module docstring)."""

    def __init__(self, backbone: nn.Module, kept: torch.Tensor, root_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        if len(kept) == root_features:  # every feature kept: nothing to map (and nothing to count)
            self.to_root: nn.Module = nn.Identity()
            return
        self.to_root = nn.Linear(len(kept), root_features, bias=False)
        with torch.no_grad():
            self.to_root.weight.zero_()
            self.to_root.weight[kept, torch.arange(len(kept))] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_root(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))


def _stage_of(name: str, stages: list[str], first_stage_at: int, position: int) -> str:
    """The stage holding module ``name``; outside every stage: ``stem`` before the first stage, ``head`` after."""
    for stage in stages:
        if name == stage or name.startswith(stage + "."):
            return stage
    return "stem" if position < first_stage_at else "head"


class Root:
    """A timm model and its weights, whose structured prunings are the members (see the module docstring).

    ``model``: the timm model with its weights and no classifier (``num_classes=0``);
    ``in_chans`` and ``resolution``: the input the dependency graph is traced with (default: a
    ViT's own image size, 64 px for a convolutional network).
    """

    def __init__(self, model: nn.Module, in_chans: int = 3, resolution: int | None = None) -> None:
        import torch_pruning as tp

        self.family = family_of(model)
        self.model = model.eval()
        patch_embed = getattr(model, "patch_embed", None)
        self.in_chans = in_chans
        self.resolution = resolution or (int(patch_embed.img_size[0]) if patch_embed is not None else 64)
        self.stages = list(self.family.stages(model))  # what depth counts
        self.units = self.family.units(model) if self.family.units else self.stages  # what widths are given for
        self.num_features = self._features(model).shape[1]
        graph = self._graph(model)
        names = {module: name for name, module in model.named_modules()}
        position = {name: k for k, name in enumerate(names.values())}
        first_stage_at = min(position[s] for s in position if any(s == st or s.startswith(st + ".") for st in self.units))
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
        out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)
        groups = []
        self.axes: dict[str, dict[int, Axis]] = {}  # tensor name -> dimension -> which group channels it holds
        for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
            members = tuple(dict.fromkeys(names[d.target.module] for d, _ in group if d.handler in out_handlers and d.target.module in names))
            scores = importance(group)
            if scores is None or not members:
                continue
            self._record_axes(model, group, len(groups))
            first = min(members, key=position.__getitem__)  # the group's first producer in the model's order decides its stage
            stage = _stage_of(first, self.units, first_stage_at, position[first])
            attention = _attention_of(model, first)
            if attention is not None:  # rank whole heads: the sum of their q, k and v channels' importance
                heads, head_dim = attention.num_heads, attention.head_dim
                per_head = scores.view(3, heads, head_dim).sum(dim=(0, 2))
                order = tuple(int(i) for i in torch.argsort(per_head, descending=True, stable=True))
                groups.append(_Group(members, stage, order, head_dim))
                continue
            order = tuple(int(i) for i in torch.argsort(scores, descending=True, stable=True))
            groups.append(_Group(members, stage, order))
        self.groups = groups
        self._final = self._final_group(model)

    def _record_axes(self, model: nn.Module, group, number: int) -> None:
        """Record, for every tensor dimension ``group`` cuts, which of the group's channels each of its indices holds."""
        params = {id(p): n for n, p in model.named_parameters()}
        modules = {id(m): n for n, m in model.named_modules()}
        for item in group:
            dep, idxs, channels = item.dep, item.idxs, item.root_idxs
            target = dep.target.module
            if isinstance(target, nn.Parameter):  # an unwrapped parameter: cut along its registered dimension
                cuts = [(params[id(target)], dep.target.pruning_dim % target.dim(), target.shape)]
            elif id(target) in modules:
                prefix = modules[id(target)]
                cuts = [(f"{prefix}.{n}" if prefix else n, d, shape) for n, d, shape in _cuts(target, dep)]
            else:
                continue
            for name, dim, shape in cuts:
                axis = self.axes.setdefault(name, {}).setdefault(dim, Axis(np.full(shape[dim], -1), np.full(shape[dim], -1)))
                taken = axis.group[idxs]
                if ((taken >= 0) & ((taken != number) | (axis.channel[idxs] != channels))).any():
                    raise ValueError(f"dimension {dim} of {name} belongs to two coupled groups; no pruning rule covers it.")
                axis.group[idxs], axis.channel[idxs] = number, channels

    # ------------------------------------------------------------------ tracing
    def _example(self) -> torch.Tensor:
        return torch.randn(1, self.in_chans, self.resolution, self.resolution, generator=torch.Generator().manual_seed(0))

    def _features(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model.forward_head(model.forward_features(self._example()), pre_logits=True)

    def _graph(self, model: nn.Module):
        import torch_pruning as tp

        unwrapped = [(p, 0) for n, p in model.named_parameters() if n.endswith(".gamma") and p.dim() == 1]  # ConvNeXt's layer scale
        unwrapped += [(p, 2) for n, p in model.named_parameters() if n in ("cls_token", "pos_embed", "reg_token")]  # a ViT's tokens
        try:
            with torch.enable_grad():  # the graph is traced through autograd
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=self._example(), forward_fn=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True),
                    unwrapped_parameters=unwrapped, verbose=False,
                )
        except Exception as exc:  # an operator the dependency graph does not know
            raise ValueError(f"The dependency analysis of {type(model).__name__} failed ({type(exc).__name__}: {exc}); "
                             f"no pruning rule covers it.") from None

    def _final_group(self, model: nn.Module) -> _Group | None:
        """The group whose channels are the features' (the last module, in the model's order, of any group's); None: not pruned."""
        position = {name: k for k, (name, _) in enumerate(model.named_modules())}
        best = max(self.groups, key=lambda g: max(position[m] for m in g.modules))
        return best if len(best.order) == self.num_features else None

    # ------------------------------------------------------------------ members
    def kept_indices(self, pruning: Pruning) -> dict[str, dict[int, np.ndarray]]:
        """For every tensor of the root that ``pruning`` cuts: per cut dimension, the indices its member keeps (sorted).

        Exactly what :meth:`pruned` keeps (both follow :meth:`keep`); the tensors of dropped blocks are listed too
        (see :meth:`dropped`). Milliseconds: no model is copied or traced.
        """
        masks = []
        for group in self.groups:
            mask = np.zeros(3 * len(group.order) * group.head_dim if group.head_dim else len(group.order), dtype=bool)
            mask[self.keep(group, pruning)] = True
            masks.append(mask)
        kept: dict[str, dict[int, np.ndarray]] = {}
        for name, dims in self.axes.items():
            for dim, axis in dims.items():
                keep = np.ones(len(axis.group), dtype=bool)
                for number in np.unique(axis.group[axis.group >= 0]):
                    at = axis.group == number
                    keep[at] = masks[number][axis.channel[at]]
                if not keep.all():
                    kept.setdefault(name, {})[dim] = np.flatnonzero(keep)
        return kept

    def kept_features(self, pruning: Pruning) -> list[int] | None:
        """Which of the root's feature channels (its pre-logits features) ``pruning``'s member computes, in order;
        ``None``: all of them (no group cuts them)."""
        return self.keep(self._final, pruning) if self._final is not None else None

    def dropped(self, pruning: Pruning) -> list[str]:
        """The module names (``layer1.1``) of the blocks ``pruning``'s depths drop."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return [names[id(blocks[k])] for stage, blocks in self.family.stages(self.model).items()
                for k in range(int(pruning.depths.get(stage, len(blocks))), len(blocks))]

    def keep(self, group: _Group, pruning: Pruning) -> list[int]:
        """The channels of ``group`` that ``pruning`` keeps (the most important ones), in their original order."""
        if group.head_dim:  # an attention's qkv: the q, k and v channels of the most important heads
            heads = len(group.order)
            n = int(pruning.heads.get(group.stage, heads))
            if not 1 <= n <= heads:
                raise ValueError(f"heads of {group.stage!r} must be between 1 and {heads}, but got {n}.")
            kept = sorted(group.order[:n])
            return [part * heads * group.head_dim + h * group.head_dim + i for part in range(3) for h in kept for i in range(group.head_dim)]
        width = float(pruning.widths.get(group.stage, 1.0))
        if not 0.0 < width <= 1.0:
            raise ValueError(f"width of stage {group.stage!r} must be in (0, 1], but got {width}.")
        n = max(1, round(width * len(group.order)))
        return sorted(group.order[:n])

    def member(self, pruning: Pruning) -> PrunedNet:
        """The pruned network of ``pruning``: a copy of the root with the dropped blocks removed and every group cut,
        its features mapped back into the root's."""
        net, kept = self.pruned(pruning)
        return PrunedNet(net, kept, self.num_features).eval()

    def pruned(self, pruning: Pruning) -> tuple[nn.Module, torch.Tensor]:
        """The pruned timm model of ``pruning`` (the root's weights, cut) and which of the root's feature channels
        its pre-logits features are, in order."""
        import torch_pruning as tp

        known = dict.fromkeys(["stem", *self.units, *self.stages, "head"])
        for stage in [*pruning.widths, *pruning.depths, *pruning.heads]:
            if stage not in known:
                raise ValueError(f"unknown stage {stage!r}: {type(self.model).__name__} has {', '.join(known)}.")
        net = copy.deepcopy(self.model)
        for stage, blocks in self.family.stages(net).items():
            depth = pruning.depths.get(stage, len(blocks))
            if not 1 <= depth <= len(blocks):
                raise ValueError(f"depth of stage {stage!r} must be between 1 and {len(blocks)}, but got {depth}.")
            for k in range(len(blocks) - 1, depth - 1, -1):
                if not keeps_shape(blocks[k]):
                    raise ValueError(f"block {stage}.{k} changes its input's shape: stage {stage!r} cannot drop it (depth >= {k + 1}).")
                del blocks[k]
        graph = self._graph(net)
        modules = dict(net.named_modules())
        for group in self.groups:
            kept = set(self.keep(group, pruning))
            if len(kept) == len(group.order):
                continue
            root = next((modules[m] for m in group.modules if m in modules), None)
            if root is None:  # every module of the group was in dropped blocks
                continue
            handler = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
            size = 3 * len(group.order) * group.head_dim if group.head_dim else len(group.order)
            graph.get_pruning_group(root, handler, idxs=[i for i in range(size) if i not in kept]).prune()
            attention = _attention_of(net, group.modules[0])
            if attention is not None:  # the attention reshapes by its head count
                attention.num_heads = len(kept) // (3 * group.head_dim)
                attention.attn_dim = attention.num_heads * attention.head_dim
        if pruning.resolution and hasattr(net, "set_input_size"):  # a ViT: position embeddings resampled as timm does
            net.set_input_size(img_size=(pruning.resolution, pruning.resolution))
        features = self.kept_features(pruning)
        final = torch.tensor(features if features is not None else list(range(self.num_features)))
        return net.eval(), final


@dataclass(frozen=True)
class Axis:
    """One dimension of one tensor of a root: per index, the number of the coupled group (in :attr:`Root.groups`) it
    belongs to and its channel in that group (-1, -1: in none, never cut)."""

    group: np.ndarray
    channel: np.ndarray


_CUTS: dict[tuple[type, object], list[tuple[str, int]]] = {}


def _cuts(module: nn.Module, dep) -> list[tuple[str, int, torch.Size]]:
    """Which of ``module``'s own tensors (name, dimension, shape) the dependency's handler cuts: found once per module
    type and handler by letting the handler cut index 0 of a copy and seeing which dimensions shrank."""
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    key = (type(module), dep.handler, dep.target.pruning_dim, tuple(tensors))
    if key not in _CUTS:
        probe = copy.deepcopy(module)
        dep.handler.__self__.pruning_dim = dep.target.pruning_dim  # as torch-pruning's Dependency does before calling it
        dep.handler(probe, [0])
        after = dict(probe.named_parameters())
        after.update(probe.named_buffers())
        _CUTS[key] = [(n, d) for n, t in tensors.items() if n in after and t.dim() > 0
                      for d in range(t.dim()) if after[n].shape[d] == t.shape[d] - 1]
    return [(n, d, tensors[n].shape) for n, d in _CUTS[key]]


def _attention_of(model: nn.Module, name: str) -> nn.Module | None:
    """The attention module whose ``qkv`` projection module ``name`` is, if it is one."""
    if not name.endswith(".qkv"):
        return None
    attention = model.get_submodule(name.rsplit(".", 1)[0])
    return attention if hasattr(attention, "num_heads") and hasattr(attention, "head_dim") else None


def keeps_shape(block: nn.Module) -> bool:
    """Whether ``block`` is residual with an identity shortcut (its output has its input's shape)."""
    if hasattr(block, "has_skip"):  # timm's EfficientNet / MobileNetV3 blocks
        return bool(block.has_skip)
    if hasattr(block, "downsample"):  # timm's ResNet blocks
        return block.downsample is None
    shortcut = getattr(block, "shortcut", None)  # timm's ConvNeXt blocks; a ViT block has none and keeps its shape
    return shortcut is None or isinstance(shortcut, nn.Identity)
