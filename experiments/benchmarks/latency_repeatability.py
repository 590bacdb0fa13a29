"""Latency repeatability: the same candidate measured 5 times, per CPU runtime.

Each measurement is what a budget check does (``nas.hardware.measure_latency``: warm-up,
then the median of the timed runs). For the smallest, a median and the largest member of
the space, prints the 5 medians' mean, standard deviation and coefficient of variation
(std / mean) on each runtime.

    .venv/bin/python experiments/benchmarks/latency_repeatability.py --threads 1
"""

from __future__ import annotations

import argparse

import numpy as np
import optuna
import torch

from nas.config import LatencyConfig
from nas.hardware import count_mflops, measure_latency
from _members import median_member
from search_spaces import build, create_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mobilenet")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--times", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    space = create_space(args.space, embed_dim=128, in_chans=1)
    candidates = [("smallest", space.extreme(True)), ("median", median_member(space, 21)), ("largest", space.extreme(False))]
    print(f"{args.times} measurements per candidate; each the median of 30 runs after 10 warm-up; {args.threads} thread(s), batch {args.batch_size}")
    print(f"{'runtime':<12} {'candidate':<9} {'MFLOPs':>7} {'mean ms':>8} {'std ms':>7} {'CV':>6}  medians (ms)")
    for runtime in ("torch", "onnxruntime"):
        config = LatencyConfig(runtime=runtime, threads=args.threads, batch_size=args.batch_size)
        for label, arch in candidates:
            net = build(arch).eval()
            medians = np.array([measure_latency(net, arch.resolution, 1, config)[0] for _ in range(args.times)])
            cv = medians.std() / medians.mean()
            mflops = count_mflops(net, arch.resolution, 1)
            print(
                f"{runtime:<12} {label:<9} {mflops:>7.3f} {medians.mean():>8.3f} {medians.std():>7.3f} {cv:>6.1%}  "
                + " ".join(f"{m:.3f}" for m in medians)
            )


if __name__ == "__main__":
    main()
