"""The quickstart's gallery epoch and trial epoch, fed three ways from Fashion-MNIST in memory.

The data are the quickstart's (``experiments/quickstart.yaml``: 6,000 training images of
Fashion-MNIST, 28 x 28 grey, held in memory as one uint8 array). Two timed steps:

* **gallery epoch**: one epoch of ``nas.gallery.train_gallery`` (ResNet-18 at 32 px, batch
  128, random horizontal flips), as the quickstart's first run trains it for 8 epochs;
* **trial epoch**: one epoch of ``trainers.train_compatible`` of a fixed member of the
  quickstart's ``mobilenet`` space at 28 px (width 0.75, every stage 2 blocks, kernel 3,
  expansion 4, squeeze-excitation), regression loss toward random unit targets, batch 128,
  no augmentation (the quickstart trains on the evaluation view).

Each step is fed three ways:

* **PIL, image by image**: the streaming path of a source that is not in memory: every image
  made a PIL image, resized, flipped and converted on its own (the quickstart's feed before
  in-memory batches were transformed on tensors);
* **batched tensors**: the path of an in-memory source now: each batch gathered from the array
  and resized, flipped and normalised at once (``apply_batch``, equal to PIL pixel for pixel);
* **preprocessed tensor**: every image resized once up front and kept as a float tensor
  (``trainers.TensorImages``; no flips), how training was fed before the streaming data path.

Feeds take turns within each of ``--repeats`` rounds; the median epoch and its range are
printed with images per second. The machine's load and torch's thread count are printed:
compare rows of one run only.

    .venv/bin/python experiments/benchmarks/in_memory_feed.py --repeats 3

Cost: about 30-40 s per round on a quiet 2-core machine (the gallery epochs dominate).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas.config import load_config
from nas.data import LEGACY_PREPROCESSING, ImageSet, StreamingImages, load_retrieval_data
from nas.data.sources import ArrayImages
from nas.gallery import train_gallery
from search_spaces import build, create_space
from trainers import GalleryTargets, TensorImages, create_loss, train_compatible

QUICKSTART = Path(__file__).resolve().parents[1] / "quickstart.yaml"


class OneByOne(ArrayImages):
    """The same array, decoded image by image through PIL."""

    in_memory = False

    def pixels(self, indices: np.ndarray) -> None:
        return None


def trial_model(embed_dim: int) -> torch.nn.Module:
    space = create_space(
        "mobilenet", embed_dim=embed_dim, in_chans=1, resolutions=[28], widths=[0.75], kernels=[3], expansions=[4],
        depths=[[2]] * 4, se=[True],
    )
    torch.manual_seed(0)
    return build(space.extreme(smallest=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(QUICKSTART)
    retrieval = load_retrieval_data(config.data)
    data, split = retrieval.data, retrieval.split
    array = data.images.array
    gallery_config = replace(config.gallery, train=replace(config.gallery.train, epochs=1))
    embed_dim = config.gallery.embed_dim
    tc = config.train
    n_train = len(split.train)
    targets = GalleryTargets(
        targets=F.normalize(torch.randn(n_train, embed_dim, generator=torch.Generator().manual_seed(0)), dim=1),
        labels=torch.from_numpy(data.labels[split.train]),
    )
    model = trial_model(embed_dim)
    trial_transform = LEGACY_PREPROCESSING.eval_transform(28)  # a gallery trained by nas: mean = std = 0.5, bilinear, no crop
    upfront = time.perf_counter()
    trial_tensor = torch.cat([trial_transform(OneByOne(array).open(int(i)))[None] for i in split.train])
    upfront = time.perf_counter() - upfront

    def gallery_epoch(source: ArrayImages) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                train_gallery(gallery_config, ImageSet(data.name, source, data.labels, data.classes), split, Path(tmp) / "g.safetensors",
                              torch.device("cpu"), log=lambda _: None)
                return time.perf_counter() - start
        return run

    def trial_epoch(images: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            m = trial_model(embed_dim)
            m.load_state_dict(model.state_dict())
            return train_compatible(m, images(), targets, create_loss("regression"), epochs=1, batch_size=tc.batch_size, seed=0)[0].seconds
        return run

    rows: dict[tuple[str, str], Callable[[], float]] = {
        ("gallery epoch", "PIL, image by image"): gallery_epoch(OneByOne(array)),
        ("gallery epoch", "batched tensors"): gallery_epoch(ArrayImages(array)),
        ("trial epoch", "PIL, image by image"): trial_epoch(lambda: StreamingImages(OneByOne(array), split.train, trial_transform, tc.batch_size, 0)),
        ("trial epoch", "batched tensors"): trial_epoch(lambda: StreamingImages(ArrayImages(array), split.train, trial_transform, tc.batch_size, 0)),
        ("trial epoch", "preprocessed tensor"): trial_epoch(lambda: TensorImages(trial_tensor, tc.batch_size, 0)),
    }
    times: dict[tuple[str, str], list[float]] = {k: [] for k in rows}
    rows[("trial epoch", "preprocessed tensor")]()  # warm-up
    for _ in range(args.repeats):
        for key, run in rows.items():
            times[key].append(run())

    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; "
          f"{n_train} training images; preprocessing all of them up front took {upfront:.2f} s (PIL); {args.repeats} rounds")
    print(f"{'step':<15}{'feed':<24}{'epoch s (median)':>18}{'range':>16}{'images/s':>10}{'vs PIL':>8}")
    for (step, feed), values in times.items():
        median = statistics.median(values)
        pil = statistics.median(times[(step, "PIL, image by image")])
        print(f"{step:<15}{feed:<24}{median:>18.2f}{f'{min(values):.2f}-{max(values):.2f}':>16}{n_train / median:>10.0f}{pil / median:>7.2f}x")


if __name__ == "__main__":
    main()
