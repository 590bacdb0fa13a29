"""The streaming data path: batches decoded, augmented and resized on the fly.

Every step that reads images (the gallery model's embeddings, a candidate's training,
val / query scoring, baselines, export verification) goes through a
``torch.utils.data.DataLoader`` over an :class:`~nas.data.sources.ImageSource`: only the
batches in flight are in memory, never the data set.

* :func:`eval_batches`: the images of a part, in order, with the evaluation transform.
* :class:`StreamingImages`: a training part, shuffled per epoch, with the training
  transform; every image's augmentation is drawn from a seed given by ``(seed, epoch,
  position)``, so a run is identical with any number of loader workers.
  It is a :class:`trainers.TrainingImages`, as is :class:`trainers.TensorImages` (a tensor
  already in memory: tests, the throughput benchmark's reference loop).

A source already in memory as one uint8 array (Fashion-MNIST, digits;
:meth:`~nas.data.sources.ImageSource.pixels`) skips the loader: each batch is gathered
from the array and transformed at once on tensors (``apply_batch`` of the transforms, equal
to PIL's output pixel for pixel), in the training process; ``workers`` does not apply.

``workers=None`` chooses: no worker process for a source already in memory (nothing to
decode); otherwise the cores PyTorch's own threads leave free (``CPUs - torch threads``, at
most 4), so that loader processes do not compete with the training threads. On a 2-core
machine that is none, and batches are decoded in the training process: measured on CUB
photos at 128 px, 0.86 of the in-memory feed's speed against 0.67 with 2 workers
(``experiments/benchmarks/streaming_throughput.py``). A GPU machine, whose training
threads mostly wait, gets more: with ``for_gpu`` (set by every caller that trains or embeds
on a CUDA device) the automatic choice is all cores but one, at most 8, and batches come in
page-locked memory so that the copy to the GPU does not block. An unreadable image stops the loop
with a :class:`~nas.data.sources.ImageReadError` naming the file (raised in the main
process, not wrapped in a worker traceback).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nas.data.sources import ImageReadError, ImageSource
from nas.data.transforms import EvalTransform, TrainTransform
from nas.progress_bars import progress

__all__ = ["StreamingImages", "eval_batches", "resolve_workers"]

Transform = EvalTransform | TrainTransform


def resolve_workers(source: ImageSource, workers: int | None, for_gpu: bool = False) -> int:
    """Loader worker processes for ``source``: ``workers``, or the automatic choice when ``None`` (``for_gpu``: the
    batches feed a GPU, whose training process mostly waits: all cores but one, at most 8)."""
    if workers is not None:
        return workers
    if source.in_memory:
        return 0
    if for_gpu:
        return max(1, min(8, (os.cpu_count() or 1) - 1))
    return max(0, min(4, (os.cpu_count() or 1) - torch.get_num_threads()))


@dataclass(frozen=True)
class _Failed:
    """What a loader item is when its image could not be read: the message, raised in the main process."""

    message: str


class _Items(Dataset):
    """Item ``(position, seed)`` -> ``(tensor, position)``: image ``indices[position]`` transformed
    with a ``random.Random(seed)`` (``seed`` is ``None`` for the deterministic evaluation transform)."""

    def __init__(self, source: ImageSource, indices: np.ndarray, transform: Transform) -> None:
        self.source, self.indices, self.transform = source, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor | _Failed, int]:
        position, seed = key
        try:
            img = self.source.open(int(self.indices[position]), self.transform.decode_side)
        except ImageReadError as exc:
            return _Failed(str(exc)), position
        return self.transform(img, None if seed is None else random.Random(seed)), position


def _collate(items: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor] | _Failed:
    for x, _ in items:
        if isinstance(x, _Failed):
            return x
    return torch.stack([x for x, _ in items]), torch.tensor([p for _, p in items], dtype=torch.int64)


class _Keys(Sampler):
    """Batches of ``(position, seed)`` keys: in order (evaluation), or shuffled per epoch with
    one augmentation seed per image (training), drawn in the main process."""

    def __init__(self, n: int, batch_size: int, shuffle_seed: int | None = None, drop_last: bool = False) -> None:
        self.n, self.batch_size, self.shuffle_seed, self.drop_last = n, batch_size, shuffle_seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        if self.drop_last:  # fewer images than one batch: one smaller batch
            return max(self.n // self.batch_size, 1) if self.n else 0
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        if self.shuffle_seed is None:
            order, seeds = np.arange(self.n), [None] * self.n
        else:
            rng = np.random.default_rng([self.shuffle_seed, self.epoch])
            order = rng.permutation(self.n)
            seeds = rng.integers(0, 2**63 - 1, size=self.n).tolist()
        for b in range(len(self)):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(int(p), seeds[k]) for k, p in enumerate(rows, start=b * self.batch_size)]


def _loader(source: ImageSource, indices: np.ndarray, transform: Transform, keys: _Keys, workers: int | None, for_gpu: bool) -> DataLoader:
    n_workers = resolve_workers(source, workers, for_gpu)
    return DataLoader(
        _Items(source, indices, transform),
        batch_sampler=keys,
        num_workers=n_workers,
        collate_fn=_collate,
        prefetch_factor=2 if n_workers else None,
        pin_memory=for_gpu,
    )


def _checked(batches: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in batches:
        if isinstance(batch, _Failed):
            raise ImageReadError(batch.message)
        yield batch


def _in_memory(
    source: ImageSource, indices: np.ndarray, transform: Transform, keys: _Keys, for_gpu: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of ``keys`` from an array source, each transformed at once (see the module docstring)."""
    for batch in keys:
        positions = np.fromiter((p for p, _ in batch), dtype=np.int64, count=len(batch))
        x = transform.apply_batch(source.pixels(indices[positions]), [seed for _, seed in batch])
        yield (x.pin_memory() if for_gpu else x), torch.from_numpy(positions)


def _batches(
    source: ImageSource, indices: np.ndarray, transform: Transform, keys: _Keys, workers: int | None, for_gpu: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``for_gpu``: page-locked batches (copied to the GPU without waiting) and loader workers chosen for a GPU."""
    if transform.batched and source.in_memory:
        return _in_memory(source, indices, transform, keys, for_gpu)
    return _checked(_loader(source, indices, transform, keys, workers, for_gpu))


def eval_batches(
    source: ImageSource, indices: Sequence[int] | np.ndarray, transform: EvalTransform, batch_size: int, workers: int | None = None,
    for_gpu: bool = False,
) -> Iterator[torch.Tensor]:
    """The images ``indices`` of ``source`` in order, through ``transform``, as float batches ``(B, C, H, W)``
    (``for_gpu``: page-locked, loader workers chosen for a GPU)."""
    indices = np.asarray(indices, dtype=np.int64)
    if not len(indices):
        return
    for x, _ in _batches(source, indices, transform, _Keys(len(indices), batch_size), workers, for_gpu):
        yield x


class StreamingImages:
    """A training part streamed from ``source`` (see the module docstring)."""

    def __init__(
        self,
        source: ImageSource,
        indices: Sequence[int] | np.ndarray,
        transform: Transform,
        batch_size: int,
        seed: int,
        workers: int | None = None,
        desc: str | None = None,
        for_gpu: bool = False,
    ) -> None:
        self.source, self.transform, self.batch_size, self.seed, self.workers = source, transform, batch_size, seed, workers
        self.for_gpu = for_gpu  # page-locked batches, loader workers chosen for a GPU
        self.indices = np.asarray(indices, dtype=np.int64)
        self.desc = desc  # label of a progress bar per epoch (nas.progress_bars); None: no bar

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = _Keys(len(self.indices), self.batch_size, shuffle_seed=self.seed, drop_last=True)
        keys.epoch = epoch
        batches = _batches(self.source, self.indices, self.transform, keys, self.workers, self.for_gpu)
        if self.desc is None:
            return batches
        return progress(batches, len(keys) * self.batch_size if len(self.indices) >= self.batch_size else len(self.indices), f"{self.desc}, epoch {epoch}", scale=self.batch_size)
