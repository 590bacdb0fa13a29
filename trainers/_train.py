"""Training a query network toward fixed gallery targets."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from trainers._base import CompatibilityLoss, GalleryTargets
from trainers._speed import Speed

__all__ = ["train_compatible", "TrainingDiverged", "EpochResult", "TrainingImages", "TensorImages", "WeightAverage", "make_optimizer", "make_scheduler"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and with which learning rate."""


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    seconds: float


class TrainingImages(Protocol):
    """What :func:`trainers.train_compatible` trains on: ``len(images)`` images and, per epoch, shuffled
    batches ``(x, positions)`` of exactly ``batch_size`` (the last incomplete batch dropped; with fewer
    images than ``batch_size``, one batch of all of them)."""

    batch_size: int

    def __len__(self) -> int: ...

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class TensorImages:
    """Preprocessed images ``(N, C, H, W)`` already in memory, shuffled per epoch from ``seed``; no augmentation."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int) -> None:
        self.images, self.batch_size, self.seed = images, batch_size, seed

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(len(self.images)))
        for b in range(max(len(self.images) // self.batch_size, 1) if len(self.images) else 0):
            positions = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.images[positions], positions


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters and buffers (batch-norm statistics too),
    updated after every optimiser step: ``avg = d * avg + (1 - d) * current``. The decay warms up as
    ``d = min(decay, (1 + step) / (10 + step))`` so that the first steps are not frozen into the average
    (the warm-up of timm's ``ModelEmaV3`` and of TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"the weight-average decay must be in (0, 1), but got {decay}.")
        self.decay, self.steps = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, value in model.state_dict().items():
            if name in self.shadow:
                self.shadow[name].lerp_(value.detach(), 1 - decay)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block, its own again after it (also on an exception)."""
        own = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(own, strict=False)


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', but got {name!r}.")


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(total_steps // 3, 1), gamma=0.1)
    if name == "none":
        return None
    raise ValueError(f"schedule must be 'cosine', 'step' or 'none', but got {name!r}.")


def train_compatible(
    model: nn.Module,
    images: TrainingImages | torch.Tensor,
    targets: GalleryTargets,
    loss_fn: CompatibilityLoss,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str = "adamw",
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    schedule: str = "cosine",
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[EpochResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    freeze_bn: bool = False,
    speed: Speed | None = None,
    average_decay: float | None = None,
) -> list[EpochResult]:
    """Train ``model`` so that ``model(image i)`` lands on ``targets.targets[i]``.

    ``images``: the ``N`` training images at the model's input resolution, streamed
    (a :class:`nas.data.StreamingImages`: decoded and augmented on the fly, shuffled per
    epoch) or a preprocessed tensor ``(N, C, H, W)`` in memory (shuffled per epoch from
    ``seed``, batches of ``batch_size``); ``targets`` is what the gallery model says about the same ``N`` images (their
    embeddings ``(N, D)`` and labels ``(N,)``, and the gallery's classifier and its logit
    scale when it has one; see :class:`GalleryTargets`). Before training, the loss is bound
    to all of it: ``loss_fn.bind(targets)``; a loss that needs what is missing raises
    ``ValueError`` there, before any step. ``on_epoch`` is called after every
    epoch (it may raise, e.g. ``optuna.TrialPruned``, to stop training). A NaN or
    infinite loss raises :class:`TrainingDiverged`. ``should_stop`` is asked before every
    step; when it answers true training stops with ``KeyboardInterrupt`` (a Ctrl-C the
    caller deferred to this safe point). With ``freeze_bn`` every batch-norm layer
    normalises with its running statistics and keeps them (its affine weights still
    train): for a model started from pretrained weights whose statistics the targets were
    computed with. ``speed``: precision, memory format and compilation of the steps
    (:class:`trainers.Speed`; default float32, NCHW, eager). The model is left in eval mode
    on the CPU, in the default memory format. ``average_decay``: keep a :class:`WeightAverage` with that decay
    (e.g. 0.99); ``on_epoch`` then sees the averaged weights, and the model ends with them.
    """
    embeddings, labels = targets.targets, targets.labels
    if len(images) != len(embeddings) or len(images) != len(labels):
        raise ValueError(f"images, targets and labels must have the same length, but got {len(images)}, {len(embeddings)}, {len(labels)}.")
    if isinstance(images, torch.Tensor):
        images = TensorImages(images, batch_size, seed)
    elif images.batch_size != batch_size:
        raise ValueError(f"images deliver batches of {images.batch_size}, but batch_size is {batch_size}: build them with the same batch size.")
    device = torch.device(device)
    torch.manual_seed(seed)
    loss_fn.bind(targets)
    speed = speed or Speed()
    model.to(device)
    loss_fn.to(device)
    opt = make_optimizer(model, optimizer, lr, weight_decay, momentum)
    scaler = speed.scaler(device)
    step_model = speed.model(model)
    steps_per_epoch = max(len(images) // images.batch_size, 1)
    sched = make_scheduler(opt, schedule, epochs * steps_per_epoch)
    history: list[EpochResult] = []
    average = None if average_decay is None else WeightAverage(model, average_decay)
    try:
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            model.train()
            if freeze_bn:
                for module in model.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
            total = 0.0
            for step, (xb, idx) in enumerate(images.batches(epoch)):
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt(f"interrupted at epoch {epoch}, step {step + 1}")
                non_blocking = device.type == "cuda"
                xb = speed.batch(xb.to(device, non_blocking=non_blocking))
                tb, yb = embeddings[idx].to(device, non_blocking=non_blocking), labels[idx].to(device, non_blocking=non_blocking)
                with speed.autocast(device):
                    out = step_model(xb)
                loss = loss_fn(out.float(), tb, yb)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss became {value} at epoch {epoch}, step {step + 1} (optimizer {optimizer}, lr {lr:g}); "
                        f"lower train.lr or check the data."
                    )
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                if sched is not None:
                    sched.step()
                if average is not None:
                    average.update(model)
                total += value
            result = EpochResult(epoch, total / steps_per_epoch, time.perf_counter() - start)
            history.append(result)
            if on_epoch is not None:
                model.eval()
                if average is None:
                    on_epoch(result)
                else:
                    with average.applied(model):
                        on_epoch(result)
        if average is not None:
            model.load_state_dict(average.shadow, strict=False)
    finally:
        model.eval().cpu()
        if speed.channels_last:
            model.to(memory_format=torch.contiguous_format)
    return history
