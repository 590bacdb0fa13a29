"""Latency lookup table: predicted against measured latency on random feasible candidates.

For each CPU runtime, starts an empty lookup table in a temporary folder, draws random
members of the space until ``--candidates`` of them fit the budget (MFLOPs and params; the
quickstart's limits by default), and for each one predicts its latency from the table
(measuring and caching any piece not yet in it) and measures it as a budget check does.
Prints, per runtime, the Spearman rank correlation and the median absolute percentage error
of prediction against measurement, the time a prediction takes once the table holds the
pieces, and the table's size; then how often the table's guards against measurements taken
under load fired: the share of pieces refused (noisy, or the machine busy) while filling
it, the share of candidates it made no prediction for, and the share of candidates whose
measurement was more than the margin from the prediction, with the share of the table's
pieces re-measured because of it (see ``LatencyTable.reconcile``).

    .venv/bin/python experiments/benchmarks/latency_table.py --candidates 60
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import optuna
import torch

from nas.config import BudgetConfig, LatencyConfig
from nas.hardware import LatencyTable, check_budgets, make_budgets, measure_latency
from search_spaces import build, create_space


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mobilenet")
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--max-mflops", type=float, default=2.0)
    parser.add_argument("--max-params-m", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    space = create_space(args.space, embed_dim=128, in_chans=1)
    budgets = make_budgets(BudgetConfig(max_mflops=args.max_mflops, max_params_m=args.max_params_m))[:2]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    archs = []
    while len(archs) < args.candidates:
        trial = study.ask()
        arch = space.sample(trial)
        study.tell(trial, 0.0)
        if check_budgets(build(arch), arch.resolution, 1, budgets).feasible and arch not in archs:
            archs.append(arch)
    print(
        f"{len(archs)} random feasible members of {args.space!r} (<= {args.max_mflops:g} MFLOPs, <= {args.max_params_m:g} M params); "
        f"{args.threads} thread(s), batch 1; latency = median of 30 runs after 10 warm-up"
    )
    print(
        f"{'runtime':<12} {'Spearman':>8} {'MdAPE':>6} {'pred/meas p10-p90':>17} {'fill s':>7} {'predict ms':>10} {'pieces':>6} "
        f"{'refused':>7} {'no pred':>7} {'disagree':>8} {'re-meas':>7}"
    )
    for runtime in ("torch", "onnxruntime"):
        config = LatencyConfig(runtime=runtime, threads=args.threads)
        with tempfile.TemporaryDirectory() as folder:
            table = LatencyTable(config, f"{folder}/table.json", log=None)
            nets = [build(a).eval() for a in archs]
            start = time.perf_counter()
            for net, arch in zip(nets, archs):
                table.predict(net, arch.resolution, 1)  # fills the table
            fill = time.perf_counter() - start
            refused = table.refused / max(table.measured, 1)
            predicted, seconds = [], []
            for net, arch in zip(nets, archs):
                start = time.perf_counter()
                predicted.append(table.predict(net, arch.resolution, 1))
                seconds.append(time.perf_counter() - start)
            measured = [measure_latency(net, arch.resolution, 1, config)[0] for net, arch in zip(nets, archs)]
            pieces = len(table)
            disagree = sum(table.reconcile(net, a.resolution, 1, p, m) for net, a, p, m in zip(nets, archs, predicted, measured))
            known = [i for i, p in enumerate(predicted) if p is not None]
            pred, meas = np.array([predicted[i] for i in known]), np.array([measured[i] for i in known])
            ratio = pred / meas
            mdape = float(np.median(np.abs(ratio - 1)))
            print(
                f"{runtime:<12} {spearman(pred, meas):>8.3f} {mdape:>6.1%} "
                f"{np.percentile(ratio, 10):>8.2f}-{np.percentile(ratio, 90):<8.2f} {fill:>7.1f} "
                f"{1e3 * statistics.median(seconds):>10.1f} {pieces:>6} {refused:>7.1%} {1 - len(known) / len(archs):>7.1%} "
                f"{disagree / len(archs):>8.1%} {table.rechecked / max(pieces, 1):>7.1%}"
            )


if __name__ == "__main__":
    main()
