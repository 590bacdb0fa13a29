"""An elastic supernet over a search space: one set of weights, every member a slice of it.

The supernet holds the :class:`~search_spaces.QueryNet` of the space's largest member
(``space.extreme(smallest=False)``). A smaller member of the same space (fewer blocks per
stage, a smaller kernel, a smaller expansion ratio, a narrower width, a lower resolution)
uses, for every tensor of its own ``QueryNet``, a slice of the supernet's tensor of the
same name (the weight-sharing rule of Once-for-All, Cai et al., ICLR 2020, and BigNAS,
Yu et al., ECCV 2020):

- a stage of depth ``d`` uses the stage's first ``d`` blocks (its other blocks are skipped);
- channels (expanded, squeeze-excitation, and with a width multiplier all others): the
  first ``n`` (:meth:`Supernet.sort_channels` orders expanded and squeeze-excitation
  channels by importance first, so that a slice keeps the most useful ones);
- a ``k x k`` depthwise kernel: the centre ``k x k`` of the largest kernel.

:meth:`Supernet.forward` runs a member on those slices with ``torch.func.functional_call``
on the member's own module structure (built once per member on the ``meta`` device), so
gradients of every member land on the shared weights, and the member computes exactly
what its extracted standalone network (:meth:`Supernet.extract`: the same ``QueryNet``
with the slices copied in) computes. Batch-norm statistics are not shared between
members: training uses batch statistics (the supernet's running statistics stay as they
were), and a member's running statistics are recalibrated on training images before it is
scored (:func:`recalibrate_bn`, :meth:`Supernet.recalibrate`). With ``frozen_bn`` every
member normalises with its slice of the running statistics instead, in training too, and
they never change (for weights, such as a pretrained gallery model's, whose statistics
are worth keeping).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

from search_spaces._base import Architecture, SearchSpace
from search_spaces._net import QueryNet, build

__all__ = ["Supernet", "SupernetError", "layer_positions", "recalibrate_bn", "run_member", "slice_tensor"]

_SKELETONS = 64  # members whose module structure is kept (built on the meta device; no memory for weights)


class SupernetError(ValueError):
    """An architecture that is not a member of the supernet (another space, or wider than its largest member)."""


def slice_tensor(big: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The part of supernet tensor ``big`` a member's tensor of ``shape`` uses (a view).

    Every dimension keeps its first entries, except the two spatial dimensions of a
    4-d convolution weight, which keep their centre (a smaller kernel inside a larger one).
    """
    if big.dim() != len(shape) or any(s > b for s, b in zip(shape, big.shape)):
        raise SupernetError(f"a tensor of shape {tuple(shape)} is not a slice of one of shape {tuple(big.shape)}")
    index = []
    for dim, (s, b) in enumerate(zip(shape, big.shape)):
        if big.dim() == 4 and dim >= 2:
            start = (b - s) // 2
            index.append(slice(start, start + s))
        else:
            index.append(slice(0, s))
    return big[tuple(index)]


def layer_positions(skeleton: nn.Module, in_chans: int, resolution: int) -> dict[str, int]:
    """Per convolution of ``skeleton`` (a network on the meta device) at ``resolution``: its output positions
    (height x width); per linear layer: the vectors it maps (tokens; 1 after pooling). Its multiply-accumulates are
    its weight's size times that (fvcore's count)."""
    counts: dict[str, int] = {}

    def record(name: str, module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        counts[name] = out.shape[-2] * out.shape[-1] if isinstance(module, nn.Conv2d) else inputs[0].numel() // inputs[0].shape[-1]

    hooks = [m.register_forward_hook(lambda m, i, o, name=n: record(name, m, i, o))
             for n, m in skeleton.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            skeleton(torch.empty(1, in_chans, resolution, resolution, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def run_member(skeleton: nn.Module, tensors: dict[str, torch.Tensor], x: torch.Tensor, training: bool, frozen_bn: bool) -> torch.Tensor:
    """``skeleton`` run on ``tensors`` (views of, or gathered from, shared weights): batch statistics in training (running
    statistics updated on copies, never on the shared ones), running statistics in eval mode and always with ``frozen_bn``."""
    skeleton.train(training)
    if frozen_bn:
        for bn in _batch_norms(skeleton):
            bn.eval()
    if training and not frozen_bn:  # running statistics are the member's own business: updates go to copies
        tensors = {k: (v.clone() if k.endswith(("running_mean", "running_var", "num_batches_tracked")) else v) for k, v in tensors.items()}
    return functional_call(skeleton, tensors, (x,), strict=True)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> int:
    """Re-estimate every batch-norm layer's running statistics of ``model`` on ``batches``.

    The statistics are reset and then set to the plain average over the batches of the
    batch means and (unbiased) variances (``momentum=None``); no weight changes. The model
    is left in eval mode. Returns the number of images seen.
    """
    norms = _batch_norms(model)
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.to(device).train()
    seen = 0
    try:
        for x in batches:
            model(x.to(device))
            seen += len(x)
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("Batch-norm recalibration got no images.")
    return seen


class Supernet(nn.Module):
    """The weights of ``space``'s largest member, shared by every member (see the module docstring).

    ``largest`` (optional) is that member's network with weights to start from, e.g. the
    gallery model's own (:mod:`search_spaces._gallery_space`); without it the weights are
    initialised as a query network's are.
    """

    def __init__(self, space: SearchSpace, largest: QueryNet | None = None, frozen_bn: bool = False) -> None:
        super().__init__()
        self.space = space
        self.frozen_bn = frozen_bn
        self.largest_arch = space.extreme(smallest=False)
        if largest is not None and _structure(largest.arch) != _structure(self.largest_arch):
            raise SupernetError(f"the network given as the largest member is {largest.arch.to_string()}, but the space's largest is {self.largest_arch.to_string()}")
        self.net = largest if largest is not None else build(self.largest_arch)
        self._skeletons: OrderedDict[str, QueryNet] = OrderedDict()
        self._positions: dict[int, dict[str, int]] = {}

    # ------------------------------------------------------------------ members
    def _skeleton(self, arch: Architecture) -> QueryNet:
        """``arch``'s module structure (parameters on the meta device), cached."""
        key = _structure(arch)
        skeleton = self._skeletons.get(key)
        if skeleton is None:
            if (arch.space, arch.embed_dim, arch.in_chans) != (self.largest_arch.space, self.largest_arch.embed_dim, self.largest_arch.in_chans):
                raise SupernetError(
                    f"architecture {arch.to_string()} is not a member of this supernet over space {self.largest_arch.space!r} "
                    f"(embed {self.largest_arch.embed_dim}, in {self.largest_arch.in_chans})"
                )
            with torch.random.fork_rng(devices=[]):  # built on the CPU and moved: faster than building on meta
                skeleton = build(arch).to("meta")
            self._skeletons[key] = skeleton
            if len(self._skeletons) > _SKELETONS:
                self._skeletons.popitem(last=False)
        else:
            self._skeletons.move_to_end(key)
        return skeleton

    def _conv_positions(self, resolution: int) -> dict[str, int]:
        """Output positions (height x width) of every convolution of the largest member at ``resolution``.

        A member's convolution of the same name has the same: a skipped block has stride 1,
        and a smaller kernel keeps the output size (padding follows the kernel).
        """
        positions = self._positions.get(resolution)
        if positions is None:
            positions = layer_positions(self._skeleton(self.largest_arch).eval(), self.largest_arch.in_chans, resolution)
            self._positions[resolution] = positions
        return positions

    def mflops(self, arch: Architecture) -> float:
        """Millions of multiply-accumulates of one batch-1 forward pass of member ``arch`` (convolutions and linear layers).

        The count the budgets' fvcore measurement gives (``nas.hardware.count_mflops``), from
        the member's weight shapes and the convolutions' output sizes, without running it:
        milliseconds, for drawing members within a budget.
        """
        positions = self._conv_positions(arch.resolution)
        total = 0
        for name, module in self._skeleton(arch).named_modules():
            if isinstance(module, nn.Conv2d):
                total += module.weight.numel() * positions[name]
            elif isinstance(module, nn.Linear):
                total += module.weight.numel()
        return total / 1e6

    def member_tensors(self, arch: Architecture) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of ``arch``'s network, as views of the supernet's tensors."""
        ours = dict(self.net.named_parameters())
        ours.update(self.net.named_buffers())
        tensors = {}
        for name, t in self._skeleton(arch).state_dict(keep_vars=True).items():
            if name not in ours:
                raise SupernetError(f"architecture {arch.to_string()} has tensor {name!r}, which the supernet's largest member lacks")
            tensors[name] = slice_tensor(ours[name], t.shape)
        return tensors

    def forward(self, x: torch.Tensor, arch: Architecture) -> torch.Tensor:
        """Member ``arch``'s embeddings of ``x`` with the shared weights.

        In training mode batch statistics are used and the supernet's running statistics
        are left untouched; in eval mode, and always with ``frozen_bn``, the running
        statistics (slices) are used.
        """
        return run_member(self._skeleton(arch), self.member_tensors(arch), x, self.training, self.frozen_bn)

    def extract(self, arch: Architecture) -> QueryNet:
        """A standalone network of ``arch`` with the supernet's weights copied in (an ordinary ``QueryNet``)."""
        tensors = self.member_tensors(arch)
        with torch.random.fork_rng(devices=[]):
            model = build(arch)
        model.load_state_dict({k: v.detach().clone() for k, v in tensors.items()})
        return model.eval()

    @torch.no_grad()
    def recalibrate(self, arch: Architecture, batches: Iterable[torch.Tensor]) -> int:
        """Set the running statistics of ``arch``'s slices from ``batches`` (as :func:`recalibrate_bn` does for a network)."""
        skeleton = self._skeleton(arch)
        tensors = self.member_tensors(arch)
        stats = {k: v for k, v in tensors.items() if k.endswith(("running_mean", "running_var"))}
        for name, view in stats.items():
            view.fill_(0.0 if name.endswith("running_mean") else 1.0)
        # fresh counters: momentum None averages over batches counted from zero
        tensors.update({k: torch.zeros((), dtype=torch.long) for k in tensors if k.endswith("num_batches_tracked")})
        norms = _batch_norms(skeleton)
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.momentum = None
        skeleton.train()
        seen = 0
        try:
            for x in batches:
                functional_call(skeleton, tensors, (x,), strict=True)  # updates the views in place
                seen += len(x)
        finally:
            for bn, momentum in zip(norms, momenta):
                bn.momentum = momentum
        if seen == 0:
            raise ValueError("Batch-norm recalibration got no images.")
        return seen

    # ------------------------------------------------------------------ channel order
    @torch.no_grad()
    def sort_channels(self) -> None:
        """Order every inverted-residual block's expanded channels, and its squeeze-excitation channels, by importance.

        Importance of an expanded channel: the L1 norm of its weights in the block's
        projection (``conv_pwl``); of a squeeze-excitation channel: of its weights in
        ``conv_expand`` (Once-for-All's rule). The permutation is applied to every tensor
        that indexes those channels, so the largest member computes exactly what it did.
        """
        for stage in self.net.blocks:
            for block in stage:
                if not hasattr(block, "conv_pwl"):
                    continue
                order = torch.argsort(block.conv_pwl.weight.abs().sum(dim=(0, 2, 3)), descending=True, stable=True)
                _permute(block.conv_pw.weight, order, 0)
                _permute_bn(block.bn1, order)
                _permute(block.conv_dw.weight, order, 0)
                _permute_bn(block.bn2, order)
                _permute(block.conv_pwl.weight, order, 1)
                se = block.se
                if hasattr(se, "conv_reduce"):
                    _permute(se.conv_reduce.weight, order, 1)
                    _permute(se.conv_expand.weight, order, 0)
                    _permute(se.conv_expand.bias, order, 0)
                    se_order = torch.argsort(se.conv_expand.weight.abs().sum(dim=(0, 2, 3)), descending=True, stable=True)
                    _permute(se.conv_reduce.weight, se_order, 0)
                    _permute(se.conv_reduce.bias, se_order, 0)
                    _permute(se.conv_expand.weight, se_order, 1)


def _structure(arch: Architecture) -> str:
    """``arch``'s text form without its resolution (the modules do not depend on it)."""
    return dataclasses.replace(arch, resolution=8).to_string()


def _permute(t: torch.Tensor, order: torch.Tensor, dim: int) -> None:
    t.copy_(t.index_select(dim, order))


def _permute_bn(bn: nn.Module, order: torch.Tensor) -> None:
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        _permute(t, order, 0)
