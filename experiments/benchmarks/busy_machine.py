"""How much slower training gets when another CPU-bound job shares the machine, per thread policy.

Two steps of the quickstart (``experiments/quickstart.yaml``), each on the first ``--images``
of its 6,000 training images:

* **gallery epoch**: one epoch of ``nas.gallery.train_gallery`` (ResNet-18 at 32 px, batch 128);
* **trial epoch**: one epoch of ``trainers.train_compatible`` of the quickstart's
  ``mobilenet`` member at 28 px (width 0.75), batch 128.

Each is timed alone and beside a competitor: another process training a small convolutional
network on one torch thread without pause (a second single-threaded search's load), started
before the timed step and stopped by its PID after it. Thread policies:

* **all cores**: torch's default, one thread per core, whatever else runs;
* **1 thread**;
* **free cores** (``nas.threads.ThreadSizer``, what a search does unless ``search.threads``
  is set): before the step, the cores other processes used are read from ``/proc/stat``
  and torch gets the rest.

Prints each step's seconds alone and beside the competitor, and the slowdown (beside / alone;
a fair share of 2 cores with one other job costs at most 2x for a step that used both).

    .venv/bin/python experiments/benchmarks/busy_machine.py

Cost: about 1-2 minutes on a quiet 2-core machine with the defaults.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from nas.config import load_config
from nas.data import LEGACY_PREPROCESSING, ImageSet, Split, StreamingImages, load_retrieval_data
from nas.gallery import train_gallery
from nas.threads import ThreadSizer
from search_spaces import build, create_space
from trainers import GalleryTargets, create_loss, train_compatible

QUICKSTART = Path(__file__).resolve().parents[1] / "quickstart.yaml"
COMPETITOR = """
import torch
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                          torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
while True:
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    args = parser.parse_args()
    config = load_config(QUICKSTART)
    retrieval = load_retrieval_data(config.data)
    data, full = retrieval.data, retrieval.split
    split = Split(full.train[: args.images], full.val, full.query, full.gallery)
    gallery_config = replace(config.gallery, train=replace(config.gallery.train, epochs=1))
    embed_dim, tc = config.gallery.embed_dim, config.train
    targets = GalleryTargets(
        targets=F.normalize(torch.randn(len(split.train), embed_dim, generator=torch.Generator().manual_seed(0)), dim=1),
        labels=torch.from_numpy(data.labels[split.train]),
    )
    space = create_space("mobilenet", embed_dim=embed_dim, in_chans=1, resolutions=[28], widths=[0.75], kernels=[3], expansions=[4],
                         depths=[[2]] * 4, se=[True])

    def gallery_epoch(sizer: ThreadSizer) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train_gallery(gallery_config, ImageSet(data.name, data.images, data.labels, data.classes), split, Path(tmp) / "g.safetensors",
                          torch.device("cpu"), log=lambda _: None, threads=sizer)
            return time.perf_counter() - start

    def trial_epoch(sizer: ThreadSizer) -> float:
        torch.manual_seed(0)
        model = build(space.extreme(smallest=False))
        start = time.perf_counter()
        sizer.resize()
        images = StreamingImages(data.images, split.train, LEGACY_PREPROCESSING.eval_transform(28), tc.batch_size, 0)
        train_compatible(model, images, targets, create_loss("regression"), epochs=1, batch_size=tc.batch_size, seed=0)
        return time.perf_counter() - start

    cpus = os.cpu_count() or 1
    policies: dict[str, Callable[[], ThreadSizer]] = {
        f"all cores ({cpus} threads)": lambda: ThreadSizer(cpus),
        "1 thread": lambda: ThreadSizer(1),
        "free cores (ThreadSizer)": lambda: ThreadSizer(),
    }
    steps = {"gallery epoch": gallery_epoch, "trial epoch": trial_epoch}
    trial_epoch(ThreadSizer(cpus))  # warm-up
    rows = []
    for step_name, step in steps.items():
        for policy, make in policies.items():
            alone = step(make())
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            try:
                time.sleep(1.0)  # let it start and take its core
                sizer = make()
                beside = step(sizer)
                threads_beside = torch.get_num_threads()
            finally:
                competitor.kill()
                competitor.wait()
            time.sleep(1.0)
            rows.append((step_name, policy, alone, beside, threads_beside))
            torch.set_num_threads(cpus)
    print(f"CPUs {cpus}, {len(split.train)} training images, torch {torch.__version__}")
    print(f"{'step':<15}{'threads':<28}{'alone s':>9}{'beside s':>10}{'slowdown':>10}{'threads beside':>16}")
    for step_name, policy, alone, beside, threads_beside in rows:
        print(f"{step_name:<15}{policy:<28}{alone:>9.2f}{beside:>10.2f}{beside / alone:>9.2f}x{threads_beside:>16}")


if __name__ == "__main__":
    main()
