"""Training images per second: streamed from JPEG files against a preprocessed tensor in memory.

One fixed candidate, a member of the ``mobilenet`` space at 128 px (width ``--width`` 0.5,
depthwise kernel ``--kernel`` 3, expansion 4, two blocks per searched stage, squeeze-excitation
on; embedding of 1280 dims, tf_efficientnet_lite2's width; about 15 MFLOPs), is trained for
one epoch by ``trainers.train_compatible`` (AdamW, cosine schedule, batch ``--batch``) with
the regression loss toward random unit targets, on ``--images`` images drawn (seeded) from an
image folder, by default the 227 px JPEGs of ``../shared/data/cub100`` (beside the checkout)
(``nas.data.load_image_folder``), fed two ways:

* **streamed**: a ``nas.data.StreamingImages`` over the folder's ``FileImages``: every batch
  decoded, randomly crop-resized (the default ``Augmentation()``) and normalised on the fly,
  with 0, 1, 2 ... ``DataLoader`` worker processes (``--workers``). The epoch includes
  starting the workers, as every epoch of a search does (they are not persistent).
* **in memory**: a ``trainers.TensorImages`` of the same images decoded once up front with the
  evaluation transform (resize, centre crop): no decoding and no augmentation while training.

Both use the gallery-style preprocessing of tf_efficientnet_lite2 (mean and std 0.5, bicubic,
crop fraction 0.89). The up-front decoding reads every file first, so the streamed epochs
read from the page cache, not the disk. Before the timed epochs a few batches
(``--warmup-batches``) are trained on a throwaway model to warm up PyTorch. Each epoch trains
a fresh model from the same seed; with ``--repeats R`` the feeds are timed in R rounds (every
feed once per round) and the median epoch is reported with its range.

Prints the candidate, the torch thread count and the CPU count, the time of the up-front
decoding, and one row per feed: workers, epoch seconds, images per second and the ratio to
the in-memory feed. Loader workers are processes of their own: on a 2-core machine they
compete with the training threads (torch uses one per core), so more workers need not be
faster there, and an oversubscribed machine slows the training threads more than its share.
A kernel of 5 or 7 makes PyTorch's CPU depthwise-convolution backward several times slower,
which hides the loader behind the training step.

    .venv/bin/python experiments/benchmarks/streaming_throughput.py --workers 0,1,2 --repeats 3

Cost: on a quiet 2-core machine the in-memory feed trains about 80 images/s and decoding
about 190 images/s, so the defaults (1024 images, feeds in memory, 0 and 2 workers) take about
a minute, or 3 CPU-minutes with ``--workers 0,1,2 --repeats 3``; on a loaded machine many times
that. ``--images 128`` is a smoke run of about 20 seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas.data import Augmentation, Preprocessing, StreamingImages, eval_batches, load_image_folder
from nas.hardware.measure import count_mflops
from search_spaces import build, create_space
from trainers import GalleryTargets, TensorImages, create_loss, train_compatible

RESOLUTION = 128
EMBED_DIM = 1280  # tf_efficientnet_lite2's pooled features
#: tf_efficientnet_lite2's data config (timm's resolve_data_config): what a gallery model of that family imposes
PREPROCESSING = Preprocessing((0.5,) * 3, (0.5,) * 3, "bicubic", 0.89)


def candidate(width: float, kernel: int) -> torch.nn.Module:
    """The fixed member of the mobilenet space at 128 px (the only member of this restricted space)."""
    space = create_space(
        "mobilenet", embed_dim=EMBED_DIM, in_chans=3, resolutions=[RESOLUTION], widths=[width], kernels=[kernel],
        expansions=[4], depths=[[2], [2], [2], [2]], se=[True],
    )
    torch.manual_seed(0)
    return build(space.extreme(smallest=False))


def train_epoch(images, targets: GalleryTargets, args: argparse.Namespace) -> float:
    """Seconds of one epoch of ``train_compatible`` on a fresh candidate."""
    model = candidate(args.width, args.kernel)
    history = train_compatible(model, images, targets, create_loss("regression"), epochs=1, batch_size=args.batch, seed=0)
    return history[0].seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data" / "cub100", help="image folder (one sub-folder per class)")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts of the streamed feed")
    parser.add_argument("--warmup-batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all feeds; the median epoch is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--width", type=float, default=0.5, help="the candidate's width multiplier")
    parser.add_argument("--kernel", type=int, default=3, choices=(3, 5, 7), help="the candidate's depthwise kernel")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_image_folder(args.data)
    source = data.images
    if args.images > len(source):
        parser.error(f"--images {args.images} is more than the {len(source)} images of {args.data}")
    indices = np.sort(np.random.default_rng(0).choice(len(source), args.images, replace=False))
    generator = torch.Generator().manual_seed(0)
    targets = GalleryTargets(
        targets=F.normalize(torch.randn(args.images, EMBED_DIM, generator=generator), dim=1),
        labels=torch.from_numpy(data.labels[indices]),
    )
    trained = max(args.images // args.batch, 1) * args.batch if args.images >= args.batch else args.images

    start = time.perf_counter()
    tensor = torch.cat(list(eval_batches(source, indices, PREPROCESSING.eval_transform(RESOLUTION), args.batch, workers=0)))
    decode_seconds = time.perf_counter() - start

    warm = min(args.warmup_batches * args.batch, args.images)
    train_epoch(TensorImages(tensor[:warm], args.batch, seed=1), GalleryTargets(targets.targets[:warm], targets.labels[:warm]), args)

    transform = PREPROCESSING.train_transform(RESOLUTION, Augmentation())
    feeds = [("in memory (TensorImages)", "-", lambda: TensorImages(tensor, args.batch, seed=0))]
    feeds += [
        ("streamed (StreamingImages)", str(w), lambda w=w: StreamingImages(source, indices, transform, args.batch, seed=0, workers=w))
        for w in workers
    ]
    seconds: list[list[float]] = [[] for _ in feeds]
    for _ in range(args.repeats):  # rounds over all feeds: a change in the machine's load hits every feed alike
        for k, (_, _, make) in enumerate(feeds):
            seconds[k].append(train_epoch(make(), targets, args))
    rows = [(feed, w, statistics.median(s), min(s), max(s)) for (feed, w, _), s in zip(feeds, seconds)]

    model = candidate(args.width, args.kernel)
    with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns that it is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        mflops = count_mflops(model, RESOLUTION, 3)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"data: {args.data} ({len(source)} images), {args.images} used, {trained} trained per epoch in batches of {args.batch}; "
          f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()} ({affinity} usable)")
    print(f"candidate: {model.arch.to_string()}; {mflops:.1f} MFLOPs at {RESOLUTION} px")
    print(f"decoding once for the in-memory tensor: {decode_seconds:.1f} s ({args.images / decode_seconds:.0f} images/s, "
          f"{tensor.numel() * tensor.element_size() / 2**20:.0f} MiB)")
    print()
    base = rows[0][2]
    spread = f" {'min-max s':>13}" if args.repeats > 1 else ""
    print(f"{'feed':<27} {'workers':>7} {'epoch s':>8}{spread} {'images/s':>9} {'ratio to in-memory':>18}")
    for feed, w, median, lo, hi in rows:
        span = f" {f'{lo:.2f}-{hi:.2f}':>13}" if args.repeats > 1 else ""
        print(f"{feed:<27} {w:>7} {median:>8.2f}{span} {trained / median:>9.1f} {base / median:>18.2f}")
    if args.repeats > 1:
        print(f"(epoch s: median of {args.repeats} rounds)")

if __name__ == "__main__":
    main()
