"""An elastic supernet over the ``pruned`` space: every structured pruning of a root is a view of the root's weights.

:class:`Supernet` shares one MBConv network's weights by slicing the first channels of
every tensor, which works for networks built channel-sorted from the start. A pruning of an
arbitrary timm model keeps, in every coupled group, the channels its root ranked most
important (:class:`search_spaces.Root`), which are not the first ones. So here a member's
tensor is the root's tensor *gathered* along every dimension a coupled group cuts, with the
indices :meth:`Root.kept_indices` gives, which are those :meth:`Root.pruned` (Torch-Pruning)
keeps: the member's view of the shared weights is exactly the pruned network that
Torch-Pruning would cut from them, and gradients of every member land on the shared ones
(the weight sharing of Once-for-All, Cai et al., ICLR 2020, with channel ranks from the
root's own weights instead of a sorting pass). A tensor no group cuts is the root's own
(no copy); the unpruned member is the root, at no cost.

A member runs through ``torch.func.functional_call`` on its own module structure (a
*skeleton*: the root's modules on the ``meta`` device, the dropped blocks deleted, every
layer's channel attributes set from its tensors' shapes; built in milliseconds, cached).
:meth:`RootedSupernet.extract` copies a member's tensors into an ordinary
:class:`~search_spaces.PrunedQueryNet`. :meth:`RootedSupernet.mflops` counts a member's
multiply-accumulates from its tensor shapes (fvcore's count: convolutions and linear layers,
per output position or token), without building it. A ViT member at another resolution
resamples the shared position embeddings as timm's ``set_input_size`` does, differentiably.

Batch norm follows :class:`Supernet`: with ``frozen_bn`` every member normalises with its
slice of the root's running statistics, which never change; otherwise training uses batch
statistics and leaves the running ones untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from search_spaces._base import Architecture
from search_spaces._head import EmbeddingHead, L2Normalise
from search_spaces._net import PrunedQueryNet, build
from search_spaces._pruned_space import PrunedSpace
from search_spaces._rooted import Pruning, Root
from search_spaces._supernet import Supernet, SupernetError, layer_positions, run_member

__all__ = ["RootedSupernet", "supernet_over"]

_SKELETONS = 64  # members whose module structure is kept (on the meta device: no memory for weights)


@dataclass
class _Member:
    """What a member takes of the shared tensors: per tensor of its network, the indices kept per cut dimension."""

    gathers: dict[str, list[tuple[int, torch.Tensor]]]  # net tensor name -> (dim, kept indices); absent: the whole tensor
    names: list[str]  # the member's tensors (the root's without the dropped blocks')
    shapes: dict[str, torch.Size]
    skeleton: nn.Module | None = None


class RootedSupernet(nn.Module):
    """The weights of a :class:`PrunedSpace`'s root, shared by all its members (see the module docstring).

    ``largest``: the unpruned member with the weights to start from (e.g. the gallery model's own, see
    ``nas.supernet.root_network``); without it, the space's largest member with random weights. The channel
    ranks are read from these weights once, here: load trained weights only after construction.
    """

    def __init__(self, space: PrunedSpace, largest: PrunedQueryNet | None = None, frozen_bn: bool = False) -> None:
        super().__init__()
        if not isinstance(space, PrunedSpace):
            raise SupernetError(f"a rooted supernet holds the prunings of the 'pruned' space, not of space {space.name!r}")
        self.space = space
        self.frozen_bn = frozen_bn
        self.largest_arch = space.extreme(smallest=False)
        if largest is None:
            with torch.random.fork_rng(devices=[]):
                largest = build(self.largest_arch)
        if not isinstance(largest, PrunedQueryNet) or _structure(largest.arch) != _structure(self.largest_arch):  # resolution aside
            raise SupernetError(f"the network given as the largest member is not the space's largest, {self.largest_arch.to_string()}")
        if not isinstance(largest.embed, EmbeddingHead):  # the largest embeds its pooled features: members that cut
            largest.embed = EmbeddingHead(largest.num_features, largest.arch.embed_dim)  # them share an identity projection
            with torch.no_grad():
                largest.embed.weight.copy_(torch.eye(largest.num_features))
                largest.embed.bias.zero_()
        self.net = largest
        self.root = Root(largest.model, space.in_chans)  # channel ranks: from the weights given, once
        self._vit = hasattr(largest.model, "patch_embed") and hasattr(largest.model, "pos_embed")
        object.__setattr__(self, "_meta", copy.deepcopy(largest).to("meta"))  # not a submodule: no state, never moved
        self._members: OrderedDict[str, _Member] = OrderedDict()
        self._positions: dict[int, dict[str, int]] = {}

    # ------------------------------------------------------------------ members
    def _key(self, arch: Architecture) -> str:
        return (arch.to_string() if self._vit else _structure(arch))  # a ViT's position embeddings depend on the resolution

    def _member(self, arch: Architecture, skeleton: bool = True) -> _Member:
        """``arch``'s gathers (and its skeleton), cached."""
        if (arch.space, arch.timm_model, arch.embed_dim, arch.in_chans, arch.root) != (
            self.largest_arch.space, self.largest_arch.timm_model, self.largest_arch.embed_dim, self.largest_arch.in_chans, self.largest_arch.root
        ) or not arch.pruning:
            raise SupernetError(f"architecture {arch.to_string()} is not a member of this supernet over {self.largest_arch.to_string()}")
        key = self._key(arch)
        member = self._members.get(key)
        if member is None:
            member = self._plan(arch)
            self._members[key] = member
            if len(self._members) > _SKELETONS:
                self._members.popitem(last=False)
        else:
            self._members.move_to_end(key)
        if skeleton and member.skeleton is None:
            member.skeleton = self._skeleton(arch, member)
        return member

    def _plan(self, arch: Architecture) -> _Member:
        try:
            pruning = Pruning.from_text(arch.pruning, arch.resolution)
            kept = self.root.kept_indices(pruning)
            dropped = tuple(f"model.{name}." for name in self.root.dropped(pruning))
        except ValueError as exc:
            raise SupernetError(f"architecture {arch.to_string()} is not a member of this supernet: {exc}") from None
        features = self.root.kept_features(pruning)
        gathers: dict[str, list[tuple[int, torch.Tensor]]] = {}
        shapes: dict[str, torch.Size] = {}
        names = []
        for name, tensor in self._tensors().items():
            if name.startswith(dropped) or (name.startswith("embed.") and not arch.projection):
                continue
            cuts = kept.get(name[len("model."):], {}) if name.startswith("model.") else {}
            if name == "embed.weight" and features is not None and len(features) < tensor.shape[1]:
                cuts = {1: features}
            gathers[name] = [(dim, torch.as_tensor(idx, dtype=torch.long)) for dim, idx in sorted(cuts.items())]
            shape = list(tensor.shape)
            for dim, idx in cuts.items():
                shape[dim] = len(idx)
            shapes[name] = torch.Size(shape)
            names.append(name)
        return _Member({k: v for k, v in gathers.items() if v}, names, shapes)

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.net.named_parameters())
        tensors.update(self.net.named_buffers())
        return tensors

    def _skeleton(self, arch: Architecture, member: _Member) -> nn.Module:
        """``arch``'s module structure on the meta device: the root's, its dropped blocks deleted, every layer fitted to
        its tensors' shapes."""
        skeleton = copy.deepcopy(self._meta)
        pruning = Pruning.from_text(arch.pruning)
        for stage, blocks in self.root.family.stages(skeleton.model).items():
            for k in range(len(blocks) - 1, int(pruning.depths.get(stage, len(blocks))) - 1, -1):
                del blocks[k]
        for name, shape in member.shapes.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = skeleton.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=owner._parameters[leaf].requires_grad)
            else:
                owner._buffers[leaf] = torch.empty(shape, dtype=owner._buffers[leaf].dtype, device="meta")
        for module in skeleton.modules():
            _fit(module)
        if not arch.projection:
            skeleton.embed = L2Normalise()
        if self._vit and arch.resolution != self.root.resolution:
            skeleton.model.set_input_size(img_size=(arch.resolution, arch.resolution))
            member.shapes["model.pos_embed"] = skeleton.model.pos_embed.shape
        features = self.root.kept_features(pruning)
        skeleton.num_features = len(features) if features is not None else self.root.num_features
        return skeleton

    def member_tensors(self, arch: Architecture) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of ``arch``'s network: the shared tensors, gathered where the member cuts them."""
        member = self._member(arch, skeleton=False)
        ours = self._tensors()
        tensors = {}
        for name in member.names:
            t = ours[name]
            gathers = member.gathers.get(name, ())
            if gathers and gathers[0][1].device != t.device:  # the indices move to the weights' device once, not every step
                gathers = member.gathers[name] = [(dim, idx.to(t.device)) for dim, idx in gathers]
            for dim, idx in gathers:
                t = t.index_select(dim, idx)
            tensors[name] = t
        if self._vit and arch.resolution != self.root.resolution:
            model = self.net.model
            grid = (arch.resolution // model.patch_embed.patch_size[0], arch.resolution // model.patch_embed.patch_size[1])
            prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            tensors["model.pos_embed"] = resample_abs_pos_embed(tensors["model.pos_embed"], new_size=grid, old_size=model.patch_embed.grid_size,
                                                                num_prefix_tokens=prefix, verbose=False)
        return tensors

    def forward(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        """Member ``arch``'s embeddings of ``x`` with the shared weights (batch norm as :class:`Supernet` does)."""
        return run_member(self._member(arch).skeleton, self.member_tensors(arch), x, self.training, self.frozen_bn)

    def extract(self, arch: Architecture) -> PrunedQueryNet:
        """A standalone network of ``arch`` with the shared weights copied in (an ordinary ``PrunedQueryNet``)."""
        skeleton = self._member(arch).skeleton
        model = copy.deepcopy(skeleton).to_empty(device="cpu")
        model.arch = arch  # a skeleton serves every resolution of its structure (it holds the root's arch): the member's own
        with torch.no_grad():
            model.load_state_dict({k: v.detach().clone() for k, v in self.member_tensors(arch).items()})
        return model.eval()

    # ------------------------------------------------------------------ cost
    def _counts(self, resolution: int) -> dict[str, int]:
        """Per convolution and linear layer of the root at ``resolution``: its output positions (a linear layer: its
        tokens), which every member shares (a dropped block has none; a cut channel changes no position)."""
        counts = self._positions.get(resolution)
        if counts is None:
            largest = dataclasses.replace(self.largest_arch, resolution=resolution, projection=True)  # every layer a member may have
            counts = layer_positions(self._member(largest).skeleton.eval(), self.space.in_chans, resolution)
            self._positions[resolution] = counts
        return counts

    def mflops(self, arch: Architecture) -> float:
        """Millions of multiply-accumulates of one batch-1 forward pass of member ``arch``: fvcore's count
        (``nas.hardware.count_mflops``: convolutions and linear layers; timm's fused attention is not counted by it,
        nor here), from the member's tensor shapes; milliseconds."""
        member = self._member(arch, skeleton=False)
        counts = self._counts(arch.resolution)
        total = 0
        for name, shape in member.shapes.items():
            module = name[: -len(".weight")] if name.endswith(".weight") else None
            if module in counts:
                total += shape.numel() * counts[module]
        return total / 1e6

    def sort_channels(self) -> None:
        """Nothing to do: a member keeps each group's channels in the root's ranking (see the module docstring)."""


def supernet_over(space, largest: nn.Module | None = None, frozen_bn: bool = False) -> Supernet | RootedSupernet:
    """The supernet of ``space``: a :class:`RootedSupernet` over the ``pruned`` space, a :class:`Supernet` over a space
    of MBConv blocks."""
    if isinstance(space, PrunedSpace):
        return RootedSupernet(space, largest, frozen_bn)
    return Supernet(space, largest, frozen_bn)


def _fit(module: nn.Module) -> None:
    """Set ``module``'s channel attributes from its tensors' shapes (as Torch-Pruning's pruners do)."""
    if isinstance(module, nn.Conv2d):
        out_chs, in_per_group = module.weight.shape[:2]
        if module.groups > 1:  # depthwise: its groups are its channels, which are coupled
            module.groups = module.in_channels = out_chs
        else:
            module.in_channels = in_per_group
        module.out_channels = out_chs
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.running_mean if module.running_mean is not None else module.weight).shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = (module.weight.shape[0],)
    elif hasattr(module, "qkv") and hasattr(module, "num_heads") and hasattr(module, "head_dim"):  # timm's attention
        module.num_heads = module.qkv.weight.shape[0] // (3 * module.head_dim)
        if hasattr(module, "attn_dim"):
            module.attn_dim = module.num_heads * module.head_dim


def _structure(arch: Architecture) -> str:
    """``arch``'s text form without its resolution."""
    return dataclasses.replace(arch, resolution=8).to_string()
