"""Compatibility losses and hand-designed baselines on Fashion-MNIST, with the quickstart's gallery.

Part 1: one fixed mid-size query architecture (``mobilenet``: 28 px, width 0.5, every
searched stage depth 2, kernel 5, expansion 4, SE) trained with each loss exactly as a
search trial is (quickstart data, split, epochs, optimizer; seeds 0, 1, 2), then scored
on the query set against the gallery model's gallery index: asymmetric mAP, R@1 and
their ratio to the paragon, mean and standard deviation over the seeds.

Part 2: ``nas baseline`` on the same data: off-the-shelf timm models at 32 px, trained
the same way (regression loss), with their budgets.

The gallery model is the quickstart's (``runs/quickstart/gallery``; trained on first use).

    .venv/bin/python experiments/benchmarks/losses.py
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from nas.baselines import DEFAULT_BASELINES, run_baselines
from nas.config import load_config
from nas.hardware import count_mflops, count_params_m
from nas.scoring import paragon_scores
from nas.results import baselines_table
from nas.search.context import prepare
from nas.search.evaluators import TrainFromScratch, build_seeded
from trainers import create_loss_from_config

LOSSES = {
    "regression (l2)": ("regression", {"distance": "l2"}),
    "contrastive": ("contrastive", {}),
    "bct": ("bct", {}),
    "csd": ("csd", {}),
    "relational": ("relational", {}),
    "regression + 0.5 contrastive": ({"regression": 1.0, "contrastive": 0.5}, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baselines", default=",".join(DEFAULT_BASELINES))
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()
    config = load_config(args.config, {"tracking.enabled": False})
    torch.set_num_threads(torch.get_num_threads())
    ctx = prepare(config, log=print)
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    arch = ctx.space.make(28, 0.5, [(2, 5, 4, True)] * 4)
    net = build_seeded(arch, 0)
    print(
        f"\nQuery architecture: {arch.to_string()}\n  {count_mflops(net, 28, arch.in_chans):.3f} MFLOPs (multiply-accumulates, fvcore), "
        f"{count_params_m(net):.3f} M params; {config.train.epochs} epochs, seeds {args.seeds}. "
        f"Paragon ({config.gallery.model}): query mAP {paragon['query']['mAP']:.4f}, R@1 {paragon['query']['R@1']:.4f}\n"
    )
    print(f"{'loss':<30} {'asym mAP':>16} {'R@1':>16} {'mAP ratio':>16} {'s/run':>6}")
    for label, (loss_spec, options) in LOSSES.items():
        loss = create_loss_from_config(loss_spec, options)
        run_ctx = dataclasses.replace(ctx, loss=loss)
        rows = []
        start = time.perf_counter()
        for seed in args.seeds:
            evaluator = TrainFromScratch(run_ctx, paragon)
            metrics = evaluator.evaluate(evaluator.build(arch, seed), seed).metrics
            rows.append((metrics["query_mAP"], metrics["query_R@1"], metrics["query_mAP_ratio"]))
        seconds = (time.perf_counter() - start) / len(args.seeds)
        a = np.array(rows)
        cells = "".join(f" {m:>8.4f} ± {s:.4f}" for m, s in zip(a.mean(0), a.std(0)))
        print(f"{label:<30}{cells} {seconds:>6.1f}", flush=True)
    if args.skip_baselines:
        return
    print("\nHand-designed baselines (32 px, regression loss, seed rule of the study):")
    baseline_config = load_config(args.config, {"search.study_name": "loss-benchmark", "out": "runs/loss-benchmark",
                                                "gallery.checkpoint": str(config.out_dir / "gallery" / "gallery.safetensors")})
    study = run_baselines(baseline_config, [m for m in args.baselines.split(",") if m], [32], log=lambda _: None)
    print(baselines_table(study))


if __name__ == "__main__":
    main()
