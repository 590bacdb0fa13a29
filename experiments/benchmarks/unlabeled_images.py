"""What images without labels add to a query network's training (``data.unlabeled``), on Fashion-MNIST.

The quickstart uses 10,000 of Fashion-MNIST's 70,000 images (``data.max_per_class: 1000``); the
60,000 others are in no part of its split, as a user's own uncaptioned photos would be. ``--sizes``
of them (a seeded draw) are written as PNG files to ``<out>/unlabeled-N/`` and given as
``data.unlabeled``: the quickstart's gallery model (ResNet-18, trained on first use) embeds them,
and one fixed query architecture (the one of ``losses.py``: ``mobilenet`` at 28 px, width 0.5,
every searched stage depth 2, kernel 5, expansion 4, SE; 1.011 MFLOPs) is trained as a search
trial is (quickstart loss, epochs, optimizer), seeds ``--seeds``. More images also mean more steps
per epoch, so each size has a control: the split's training images only, for as many steps
(epochs scaled by the images' ratio). Query mAP, R@1 and the ratio to the paragon, mean and
standard deviation over the seeds, and seconds per run.

    .venv/bin/python experiments/benchmarks/unlabeled_images.py [--sizes 6000 24000] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
from PIL import Image

from nas.config import load_config
from nas.data import load_retrieval_data
from nas.scoring import paragon_scores
from nas.search.context import prepare
from nas.search.evaluators import TrainFromScratch


def write_unused(config, n: int, folder: Path) -> Path:
    """``n`` images of the data set in no part of the split (seeded draw), as PNG files in ``folder`` (written once)."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        return folder
    retrieval = load_retrieval_data(config.data)
    split = retrieval.split
    used = np.concatenate([np.asarray(getattr(split, part)) for part in ("train", "val", "query", "gallery")])
    unused = np.setdiff1d(np.arange(len(retrieval.data.images)), used)
    chosen = np.sort(np.random.default_rng(0).choice(unused, size=n, replace=False))
    folder.mkdir(parents=True, exist_ok=True)
    pixels = retrieval.data.images.pixels(chosen)
    for k, picture in enumerate(pixels):
        Image.fromarray(picture[..., 0], "L").save(folder / f"{int(chosen[k]):05d}.png")
    return folder


def runs(ctx, paragon, arch, seeds, epochs: int) -> tuple[np.ndarray, float]:
    """Query mAP, R@1 and mAP ratio per seed of ``arch`` trained ``epochs`` epochs in ``ctx``; seconds per run."""
    run_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, train=dataclasses.replace(ctx.config.train, epochs=epochs)))
    rows, start = [], time.perf_counter()
    for seed in seeds:
        evaluator = TrainFromScratch(run_ctx, paragon)
        m = evaluator.evaluate(evaluator.build(arch, seed), seed).metrics
        rows.append((m["query_mAP"], m["query_R@1"], m["query_mAP_ratio"]))
    return np.array(rows), (time.perf_counter() - start) / len(seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 24000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/unlabeled-images")
    args = parser.parse_args()
    config = load_config(args.config, {"tracking.enabled": False})
    ctx = prepare(config, log=print)
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    arch = ctx.space.make(28, 0.5, [(2, 5, 4, True)] * 4)
    epochs, n_train = config.train.epochs, len(ctx.split.train)
    print(f"\nQuery architecture: {arch.to_string()}; {epochs} epochs; seeds {args.seeds}; {n_train} training images. "
          f"Paragon ({config.gallery.model}): query mAP {paragon['query']['mAP']:.4f}, R@1 {paragon['query']['R@1']:.4f}\n")
    print(f"{'training images':<44} {'query mAP':>16} {'R@1':>16} {'mAP ratio':>16} {'s/run':>6}")

    def show(label: str, rows: np.ndarray, seconds: float) -> None:
        cells = "".join(f" {m:>8.4f} ± {s:.4f}" for m, s in zip(rows.mean(0), rows.std(0)))
        print(f"{label:<44}{cells} {seconds:>6.1f}", flush=True)

    show(f"the split's {n_train}, {epochs} epochs", *runs(ctx, paragon, arch, args.seeds, epochs))
    for n in args.sizes:
        folder = write_unused(config, n, Path(args.out) / f"unlabeled-{n}")
        with_unlabeled = prepare(dataclasses.replace(config, data=dataclasses.replace(config.data, unlabeled=str(folder))), log=print)
        show(f"+ {n} unlabeled, {epochs} epochs", *runs(with_unlabeled, paragon, arch, args.seeds, epochs))
        same_steps = round(epochs * (n_train + n) / n_train)
        show(f"the split's {n_train}, {same_steps} epochs (as many steps)", *runs(ctx, paragon, arch, args.seeds, same_steps))


if __name__ == "__main__":
    main()
