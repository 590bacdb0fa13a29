"""The one-shot strategy's supernet: rooted in the gallery model where it can be, trained once, reused.

:func:`open_supernet` returns the trained supernet of a study's setting (gallery weights,
data and split, space, supernet and training settings, seed), training it first when no
finished one is on disk under ``<cache>/supernet/<key>/`` (``cache:``, default ``out``):

- **Root.** With the ``gallery`` space (an EfficientNet-layout MBConv gallery model) or
  the ``pruned`` space (any supported timm family: :class:`search_spaces.RootedSupernet`)
  and a gallery model of the same timm name, the largest member is the gallery model
  itself: its backbone weights, and as embedding layer the gallery's projection (none
  when the gallery embeds its pooled features; a member that cuts them projects back
  with the identity's kept columns). Every member is then a structured pruning of the
  gallery model, compatible with its index before any training. Otherwise the
  supernet's weights are initialised from the seed.
- **Training** (:func:`train_supernet`): the sandwich rule with in-place distillation (see
  :class:`nas.config.SupernetConfig`), seeded per step, so a run is reproducible. Within a
  budget (``supernet.max_mflops``, by default the study's): the sandwich's largest member
  is the largest within it (:func:`sandwich_largest`; for a rooted supernet the gallery
  model itself at the highest resolution that fits, where one does) and its random
  members are drawn within it, so no step pays for members no device can run. After
  every epoch a checkpoint (weights, optimizer, schedule, history) is written atomically;
  a killed run resumes from the last one and ends where an uninterrupted run would.
- **Scoring a member** (:func:`member_network`): extracted as an ordinary
  :class:`~search_spaces.QueryNet` with copied weights, then its batch-norm statistics
  recalibrated on a fixed, seeded subset of the *training* images at its resolution.
- **Batch norm** (``supernet.batch_norm``, :func:`frozen_batch_norm`): a supernet rooted
  in the gallery model over the ``gallery`` space keeps the gallery's running statistics everywhere (``auto``):
  the gallery embeddings were computed with them, and re-estimating them on the training
  photos moves even the unpruned gallery model away from its own index (CUB-100, the
  pretrained EfficientNet-Lite2: val mAP 0.97 with its statistics, 0.79 recalibrated).
  Members then train, are scored and fine-tuned with those statistics (sliced) and learn
  to fit them; no recalibration. A supernet from random weights has no statistics worth
  keeping: batch statistics in training, recalibration before scoring; nor, for its members,
  one over the ``pruned`` space, whose width cuts change what every normalisation layer sees
  (measured on the quickstart, 0.927 of the paragon frozen and 0.981 recalibrated, before a fix to the members' resolution; to repeat).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nas.data import StreamingImages, eval_batches
from nas.errors import ConfigError, NasError
from search_spaces import Architecture, GallerySpace, PrunedQueryNet, PrunedSpace, QueryNet, RootedSupernet, SearchSpace, Supernet, build, recalibrate_bn, supernet_over
from search_spaces._head import EmbeddingHead
from trainers import CheckpointError, TrainingDiverged, check_state_dict, load_checkpoint, make_optimizer, make_scheduler, read_safetensors, save_checkpoint

if TYPE_CHECKING:  # the context imports this module's users
    from nas.config import ExperimentConfig
    from nas.search.context import Context

__all__ = ["sandwich_mflops", "sandwich_largest", "largest_within", "largest_per_resolution", "frozen_batch_norm", "rooted", "open_supernet", "train_supernet", "supernet_key", "root_network", "member_network", "recalibrated", "recalibration_indices", "random_member", "SupernetInfo", "gallery_supernet", "fine_tune_starts"]

Log = Callable[[str], None]
FORMAT = "asymnas-supernet-v1"
CHECKPOINT = "checkpoint.safetensors"  # after every epoch; removed when the training ends


@dataclass
class SupernetInfo:
    """What a trained supernet's folder records beside its weights (``supernet.json``)."""

    key: str
    rooted: bool
    largest: str
    epochs: int
    seconds: float
    history: list[dict[str, float]]
    format: str = FORMAT


# ----------------------------------------------------------------------------- members


class _RandomTrial:
    """Enough of an Optuna trial for ``space.sample``: every categorical choice drawn from ``rng``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        return choices[int(self.rng.integers(len(choices)))]


def random_member(space: SearchSpace, rng: np.random.Generator) -> Architecture:
    """A member of ``space`` drawn uniformly per choice from ``rng``."""
    return space.sample(_RandomTrial(rng))  # type: ignore[arg-type]


def sandwich_mflops(config: ExperimentConfig) -> float | None:
    """The MFLOPs the sandwich's members keep within (``supernet.max_mflops``), or ``None``: the whole space."""
    cap = config.supernet.max_mflops
    return config.budgets.max_mflops if cap == "budget" else (None if cap is None else float(cap))


class _Choosing:
    """Enough of an Optuna trial for ``space.sample``: the choices in ``picks``, every other dimension at its largest; records the dimensions."""

    def __init__(self, picks: dict[str, Any]) -> None:
        self.picks = picks
        self.dims: dict[str, list[Any]] = {}

    def suggest_categorical(self, name: str, choices: list[Any]) -> Any:
        self.dims[name] = sorted(choices)
        return self.picks.get(name, self.dims[name][-1])


def sandwich_largest(space: SearchSpace, mflops: Callable[[Architecture], float], cap: float | None) -> Architecture:
    """The sandwich's largest member within ``cap`` MFLOPs (``mflops`` counts a member): :func:`largest_within` at any
    resolution (for a supernet rooted in the gallery model and room for it: the gallery model itself). ``NasError`` when
    not even the smallest member fits."""
    if cap is None:
        return space.extreme(smallest=False)
    member = largest_within(space, mflops, cap)
    if member is None:
        smallest = mflops(space.extreme(smallest=True))
        raise NasError(f"supernet.max_mflops is {cap:g} MFLOPs, but the space's smallest member needs {smallest:.3f}; raise it (or budgets.max_mflops) or choose a smaller space.")
    return member


def largest_within(space: SearchSpace, mflops: Callable[[Architecture], float], cap: float, resolution: int | None = None) -> Architecture | None:
    """The largest member within ``cap`` MFLOPs (``mflops`` counts a member), at ``resolution`` or at any; None when not
    even the smallest member (there) fits.

    The space's largest member at ``resolution`` (or at the highest resolution where it fits); where it does not fit, the
    largest member at ``resolution`` (or at the lowest resolution) shrunk greedily, one choice one step down at a time,
    always the step that keeps the most MFLOPs, until it fits, then grown again one step at a time (the largest step
    that still fits) until no step up fits. With ``resolution`` given, the resolution is never stepped.
    """
    resolutions = sorted({space.extreme(smallest=True).resolution, space.extreme(smallest=False).resolution, *getattr(space, "resolutions", ())})
    for res in reversed(resolutions if resolution is None else [resolution]):
        member = space.extreme(smallest=False, resolution=res)
        if mflops(member) <= cap:
            return member
    start = resolutions[0] if resolution is None else resolution
    if mflops(space.extreme(smallest=True, resolution=start)) > cap:
        return None
    probe = _Choosing({"resolution": start})
    member = space.sample(probe)  # type: ignore[arg-type]
    cost = mflops(member)

    def neighbours(up: bool) -> list[tuple[float, _Choosing, Architecture]]:
        """Every member one choice one step up (or down) from ``probe``'s, with its MFLOPs."""
        found = []
        for name, values in probe.dims.items():
            if resolution is not None and name == "resolution":
                continue
            i = values.index(probe.picks.get(name, values[-1])) + (1 if up else -1)
            if 0 <= i < len(values):
                option = _Choosing({**probe.picks, name: values[i]})
                candidate = space.sample(option)  # type: ignore[arg-type]
                found.append((mflops(candidate), option, candidate))
        return found

    while cost > cap:  # down: the step that keeps the most (there is one while over the cap: the smallest fits)
        cost, probe, member = max(neighbours(up=False), key=lambda step: step[0])
    while True:  # then up again while a step fits: the largest such
        fitting = [step for step in neighbours(up=True) if step[0] <= cap]
        if not fitting:
            return member
        cost, probe, member = max(fitting, key=lambda step: step[0])


def largest_per_resolution(ctx: Context, cap: float | None) -> list[Architecture]:
    """The space's largest member at each of its resolutions; within ``cap`` MFLOPs on a space rooted in the gallery model,
    the largest member that fits at each resolution where one does (:func:`largest_within`, counted on the supernet's
    skeletons): the simple answers a search should never lose to, e.g. the unpruned gallery model at the highest
    resolution that fits and, at each higher one, the gallery model narrowed or made shallower until it fits."""
    resolutions = sorted(ctx.space.resolutions)
    if cap is None or not rooted(ctx):
        return [ctx.space.extreme(smallest=False, resolution=r) for r in resolutions]
    counter = supernet_over(ctx.space, root_network(ctx, ctx.space))
    found = (largest_within(ctx.space, counter.mflops, cap, resolution=r) for r in resolutions)
    return [arch for arch in found if arch is not None]


def recalibration_indices(ctx: Context) -> np.ndarray:
    """The fixed, seeded subset of training images every member's batch-norm statistics are recalibrated on."""
    train = np.asarray(ctx.split.train)
    n = min(ctx.config.supernet.recalibration_images, len(train))
    rng = np.random.default_rng([ctx.config.search.seed, 0x5EED])
    return np.sort(rng.choice(train, size=n, replace=False))


def recalibrated(ctx: Context, model: QueryNet, force: bool = False) -> QueryNet:
    """``model`` with its batch-norm statistics recalibrated on :func:`recalibration_indices` at its resolution (in place);
    unchanged when :func:`frozen_batch_norm` (its statistics are the root's) unless ``force``."""
    if frozen_batch_norm(ctx) and not force:
        return model
    transform = ctx.preprocessing.for_channels(ctx.data.channels).eval_transform(model.arch.resolution)
    batches = eval_batches(ctx.data.images, recalibration_indices(ctx), transform, ctx.config.train.batch_size, ctx.workers,
                           for_gpu=ctx.device.type == "cuda")
    recalibrate_bn(model, batches, ctx.device)
    return model.cpu()


def member_network(ctx: Context, supernet: Supernet | RootedSupernet, arch: Architecture) -> QueryNet:
    """``arch`` extracted from ``supernet`` (copied weights) with its batch-norm statistics recalibrated on training images."""
    return recalibrated(ctx, supernet.extract(arch))


# ----------------------------------------------------------------------------- the root


def rooted(ctx: Context, space: SearchSpace | None = None) -> bool:
    """Whether the supernet over ``space`` (default ``ctx.space``) is rooted in the gallery model."""
    space = ctx.space if space is None else space
    return isinstance(space, (GallerySpace, PrunedSpace)) and space.model == ctx.gallery.model_name


def frozen_batch_norm(ctx: Context) -> bool:
    """Whether members keep the largest member's batch-norm statistics (``supernet.batch_norm``; ``auto``: when rooted)."""
    mode = ctx.config.supernet.batch_norm
    # auto: frozen for the gallery space's members, whose channels are the gallery's; the pruned space's width cuts change
    # every normalisation layer's input, so its members recalibrate (quickstart_one_shot.yaml, before a fix to members' resolutions: 0.927 of the paragon
    # frozen, 0.981 recalibrated)
    return mode == "frozen" or (mode == "auto" and rooted(ctx) and not isinstance(ctx.space, PrunedSpace))


def root_network(ctx: Context, space: SearchSpace) -> QueryNet | None:
    """The gallery model as the space's largest member, or ``None`` when it cannot be (see the module docstring)."""
    if not rooted(ctx, space):
        return None
    gallery = ctx.gallery
    largest = space.extreme(smallest=False)
    if isinstance(space, PrunedSpace):  # every member a structured pruning of the gallery's own timm model
        net = PrunedQueryNet(largest, copy.deepcopy(gallery.backbone))
        if isinstance(net.embed, EmbeddingHead):
            with torch.no_grad():
                if isinstance(gallery.proj, EmbeddingHead):
                    net.embed.weight.copy_(gallery.proj.weight)
                    net.embed.bias.copy_(gallery.proj.bias)
                else:  # the gallery embeds its pooled features: the identity
                    net.embed.weight.copy_(torch.eye(net.num_features))
                    net.embed.bias.zero_()
        return net.eval()
    with torch.random.fork_rng(devices=[]):
        net = build(largest)
    state = {k: v for k, v in gallery.backbone.state_dict().items() if not k.startswith("classifier.")}
    if isinstance(gallery.proj, EmbeddingHead):
        state["embed.weight"], state["embed.bias"] = gallery.proj.weight.detach(), gallery.proj.bias.detach()
    elif largest.projection:  # the gallery embeds its pooled features: the identity (no layer at all without projection)
        state["embed.weight"], state["embed.bias"] = torch.eye(net.num_features), torch.zeros(net.num_features)
    missing = net.load_state_dict(state, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise NasError(f"The gallery model's weights do not fit its own architecture read back ({missing}); this is a bug.")
    return net.eval()


def gallery_supernet(ctx: Context) -> Supernet | RootedSupernet | None:
    """The supernet over ``ctx.space`` as it is before any training: every member a structured pruning of the gallery model
    with the gallery's own weights, channels in the order training sorts them in (so a member keeps the same channels as in
    the trained supernet); None when the space is not rooted in the gallery model."""
    root = root_network(ctx, ctx.space)
    if root is None:
        return None
    supernet = supernet_over(ctx.space, root, frozen_bn=frozen_batch_norm(ctx))
    supernet.sort_channels()
    return supernet.eval()


def fine_tune_starts(ctx: Context) -> tuple[str, ...]:
    """The weights a chosen member's fine-tuning starts from (``supernet.fine_tune_from`` resolved): ``("supernet",)``,
    ``("gallery",)`` or both; ``gallery`` needs a supernet rooted in the gallery model (a :class:`ConfigError` otherwise)."""
    mode = ctx.config.supernet.fine_tune_from
    if mode == "auto":
        return ("gallery", "supernet") if rooted(ctx) else ("supernet",)
    if mode != "supernet" and not rooted(ctx):
        raise ConfigError(
            f"supernet.fine_tune_from {mode!r} starts fine-tuning from the gallery model's own pruned weights, but the supernet over the "
            f"{ctx.config.space.name!r} space is not rooted in the gallery model {ctx.gallery.model_name}; use 'supernet' or 'auto'."
        )
    return {"gallery": ("gallery",), "both": ("gallery", "supernet")}.get(mode, ("supernet",))


# ----------------------------------------------------------------------------- cache key


def supernet_key(ctx: Context) -> str:
    """A hash of everything the trained supernet depends on."""
    c = ctx.config
    data = {
        "format": FORMAT,
        "gallery": ctx.gallery_sha,
        "embeddings": ctx.embeddings.checksum(),  # data, split, resolution and preprocessing of the gallery side
        "space": ctx.space.describe(),
        "supernet": {k: getattr(c.supernet, k) for k in ("epochs", "lr", "random_subnets", "distill")},  # not how members are scored
        **({"frozen_batch_norm": True} if frozen_batch_norm(ctx) else {}),  # absent otherwise: earlier supernets keep their keys
        **({"sandwich_mflops": sandwich_mflops(c)} if sandwich_mflops(c) is not None else {}),  # likewise
        "train": {k: getattr(c.train, k) for k in ("loss", "loss_options", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "schedule")},
        "augment": asdict(c.train.augment),
        "preprocessing": ctx.preprocessing.to_dict(),
        "seed": c.search.seed,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def supernet_dir(ctx: Context) -> Path:
    return ctx.config.cache_dir / "supernet" / supernet_key(ctx)


# ----------------------------------------------------------------------------- training


_DRAWS = 200  # random draws per member before a sandwich within a budget takes the smallest instead


def _step_members(
    space: SearchSpace, largest: Architecture, smallest: Architecture, random_subnets: int, seed: int, epoch: int, step: int,
    fits: Callable[[Architecture], bool] | None = None,
) -> list[Architecture]:
    """The sandwich of one step: largest, smallest, then ``random_subnets`` random members (seeded by step), each drawn until ``fits``."""
    rng = np.random.default_rng([seed, epoch, step])
    members = [largest, smallest]
    for _ in range(random_subnets):
        for _ in range(_DRAWS):
            member = random_member(space, rng)
            if fits is None or fits(member):
                break
        else:  # the budget leaves (almost) nothing but the smallest member
            member = smallest
        members.append(member)
    return members


def train_supernet(
    ctx: Context,
    supernet: Supernet | RootedSupernet,
    folder: Path,
    log: Log = print,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict[str, float]]:
    """Train ``supernet`` as :class:`nas.config.SupernetConfig` says, resuming from ``folder/checkpoint.safetensors``; the per-epoch history."""
    c, sc = ctx.config, ctx.config.supernet
    seed = c.search.seed
    space = ctx.space
    cap = sandwich_mflops(c)
    largest, smallest = sandwich_largest(space, supernet.mflops, cap), space.extreme(smallest=True)
    fits = None if cap is None else (lambda member: supernet.mflops(member) <= cap)
    top_res = max(space.extreme(smallest=False).resolution, smallest.resolution)  # random members may use the highest
    transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(top_res, ctx.augmentation)
    images = StreamingImages(ctx.training.source, ctx.training.indices, transform, c.train.batch_size, seed, ctx.workers, desc="supernet",
                             for_gpu=ctx.device.type == "cuda")
    targets, labels = ctx.targets.targets, ctx.targets.labels
    loss_fn = ctx.loss
    loss_fn.bind(ctx.targets)
    device = ctx.device
    speed = ctx.speed  # precision and memory format; a supernet changes shape every step, so it is never compiled
    scaler = speed.scaler(device)  # float16 on CUDA
    supernet.to(device)
    if speed.channels_last:
        supernet.to(memory_format=torch.channels_last)
    loss_fn.to(device)
    lr = sc.lr or c.train.lr
    opt = make_optimizer(supernet, c.train.optimizer, lr, c.train.weight_decay, c.train.momentum)
    steps_per_epoch = max(len(images) // images.batch_size, 1)
    sched = make_scheduler(opt, c.train.schedule, sc.epochs * steps_per_epoch)
    checkpoint = folder / CHECKPOINT
    history: list[dict[str, float]] = []
    start_epoch = 1
    if checkpoint.exists():
        try:
            state = load_checkpoint(checkpoint, supernet.net, opt, sched)
        except CheckpointError as exc:
            raise NasError(str(exc)) from None
        history = state["history"]
        start_epoch = state["epoch"] + 1
        log(f"Supernet: resuming from its checkpoint after epoch {state['epoch']} of {sc.epochs}.")
    if cap is not None:
        log(f"Supernet: sandwich within {cap:g} MFLOPs: largest member {largest.to_string()} ({supernet.mflops(largest):.3f} MFLOPs), "
            f"random members drawn within it")
    torch.manual_seed(seed)
    try:
        for epoch in range(start_epoch, sc.epochs + 1):
            ctx.threads.resize()
            began = time.perf_counter()
            supernet.train()
            totals = {"loss_largest": 0.0, "loss_smallest": 0.0, "loss_random": 0.0}
            for step, (xb, idx) in enumerate(images.batches(epoch)):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt(f"interrupted at supernet epoch {epoch}, step {step + 1}")
                xb = speed.batch(xb.to(device, non_blocking=device.type == "cuda"))
                tb, yb = targets[idx].to(device), labels[idx].to(device)
                opt.zero_grad(set_to_none=True)
                teacher = None
                for i, arch in enumerate(_step_members(space, largest, smallest, sc.random_subnets, seed, epoch, step, fits)):
                    x = xb if arch.resolution == xb.shape[-1] else F.interpolate(xb, size=arch.resolution, mode="bilinear", antialias=True, align_corners=False)
                    with speed.autocast(device):
                        out = supernet(speed.batch(x), arch)
                    out = out.float()
                    loss = loss_fn(out, tb, yb)
                    if i == 0:
                        teacher = out.detach()
                    elif sc.distill > 0:
                        loss = loss + sc.distill * (out - teacher).pow(2).sum(dim=1).mean()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingDiverged(f"supernet loss became {value} at epoch {epoch}, step {step + 1} (lr {lr:g}); lower supernet.lr.")
                    (loss if scaler is None else scaler.scale(loss)).backward()  # one member at a time: gradients add up, graphs are freed
                    totals["loss_largest" if i == 0 else "loss_smallest" if i == 1 else "loss_random"] += value / (1 if i < 2 else max(sc.random_subnets, 1))
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
                    scaler.update()
                if sched is not None:
                    sched.step()
            row = {k: v / steps_per_epoch for k, v in totals.items()}
            row.update(epoch=epoch, seconds=time.perf_counter() - began)
            history.append(row)
            save_checkpoint(checkpoint, supernet.net, opt, sched, {"history": history, "epoch": epoch})
            log(f"Supernet epoch {epoch}/{sc.epochs}: loss largest {row['loss_largest']:.4f}, smallest {row['loss_smallest']:.4f}, "
                f"random {row['loss_random']:.4f} ({row['seconds']:.0f} s)")
            if on_epoch is not None:
                on_epoch(row)
    finally:
        supernet.eval().cpu()
        if speed.channels_last:
            supernet.to(memory_format=torch.contiguous_format)
    return history


def open_supernet(
    ctx: Context,
    log: Log = print,
    train: bool = True,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Supernet | RootedSupernet, SupernetInfo]:
    """The trained supernet of ``ctx``'s setting: loaded from ``<cache>/supernet/<key>/`` or trained there first.

    With ``train=False`` a missing supernet is a :class:`NasError` saying how to train it.
    """
    space = ctx.space
    folder = supernet_dir(ctx)
    weights, info_path = folder / "supernet.safetensors", folder / "supernet.json"
    root = root_network(ctx, space)
    largest = root if root is not None else _seeded_largest(space, ctx.config.search.seed)
    supernet = supernet_over(space, largest, frozen_bn=frozen_batch_norm(ctx))
    if weights.exists() and info_path.exists():
        _load_trained(supernet, weights)
        try:
            info = SupernetInfo(**json.loads(info_path.read_text()))
        except (OSError, ValueError, TypeError) as exc:  # cut short, not JSON, or not this record's fields
            raise NasError(f"The trained supernet's record {info_path} is damaged ({type(exc).__name__}: {exc}); delete its folder "
                           f"{folder} to train it again.") from None
        log(f"Supernet: trained one reused from {folder} ({info.epochs} epochs, {'rooted in the gallery model' if info.rooted else 'random start'}).")
        return supernet.eval(), info
    if not train:
        raise NasError(f"No trained supernet for this setting under {folder}; run 'nas supernet train CONFIG' (or 'nas search') first.")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / CHECKPOINT).exists():
        supernet.sort_channels()  # before any training: the order every later epoch (and a resume) shares
    log(
        f"Supernet: {'rooted in the gallery model ' + ctx.gallery.model_name + ' (its largest member is the gallery model)' if root is not None else 'random start (the gallery model is not an MBConv network of this space)'}; "
        f"largest member {supernet.largest_arch.to_string()}; training {ctx.config.supernet.epochs} epochs into {folder}"
    )
    began = time.perf_counter()
    history = train_supernet(ctx, supernet, folder, log, on_epoch, should_stop)
    seconds = sum(row["seconds"] for row in history)
    info = SupernetInfo(supernet_key(ctx), root is not None, supernet.largest_arch.to_string(), ctx.config.supernet.epochs, seconds, history)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in supernet.net.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    info_path.write_text(json.dumps(asdict(info), indent=2))
    (folder / CHECKPOINT).unlink(missing_ok=True)
    log(f"Supernet: trained in {time.perf_counter() - began:.0f} s, saved to {weights}")
    return supernet.eval(), info


def _load_trained(supernet: Supernet | RootedSupernet, path: Path) -> None:
    """Load a trained supernet's weights, checked name by name and shape by shape; a damaged file says what to delete."""
    advice = f"delete its folder {path.parent} to train it again"
    state, _ = read_safetensors(path, "The trained supernet", advice, NasError)
    check_state_dict(state, supernet.net, f"The trained supernet {path}", advice, NasError, "this setting's network")
    supernet.net.load_state_dict(state)


def _seeded_largest(space: SearchSpace, seed: int) -> QueryNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(space.extreme(smallest=False))
