"""How much an infeasible candidate costs: sample, build and budget-check, no training.

Samples random architectures from a search space, measures the wall time of
``space.sample -> build -> check_budgets`` for each, and prints a table of the
candidates that were rejected (and, for comparison, of those that passed and would be
trained next). Nothing is trained.

    .venv/bin/python experiments/benchmarks/rejection_cost.py --max-mflops 3 --candidates 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import optuna
import torch

from nas.config import BudgetConfig, LatencyConfig
from nas.hardware import check_budgets, make_budgets
from search_spaces import build, create_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mobilenet")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[16, 20, 24, 28])
    parser.add_argument("--max-mflops", type=float, default=3.0)
    parser.add_argument("--max-params-m", type=float, default=1.0)
    parser.add_argument("--max-latency-ms", type=float, default=6.0)
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(2)

    space = create_space(args.space, embed_dim=128, in_chans=1, resolutions=args.resolutions)
    budgets = make_budgets(
        BudgetConfig(args.max_mflops, args.max_params_m, args.max_latency_ms, LatencyConfig(threads=1, warmup=5, repeats=20))
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed))
    rejected, accepted = [], []
    for _ in range(args.candidates):
        trial = study.ask()
        start = time.perf_counter()
        arch = space.sample(trial)
        model = build(arch)
        report = check_budgets(model, arch.resolution, arch.in_chans, budgets)
        seconds = time.perf_counter() - start
        (accepted if report.feasible else rejected).append((seconds, report))
        study.tell(trial, 0.0)

    print(f"space {args.space}, budgets: " + "; ".join(b.describe() for b in budgets))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads for building, latency measured with 1 thread\n")
    print(f"{'candidates':<22} {'count':>5} {'median s':>9} {'p90 s':>7} {'max s':>7}")
    for name, rows in (("rejected (infeasible)", rejected), ("accepted (checked)", accepted)):
        times = sorted(s for s, _ in rows)
        if not times:
            print(f"{name:<22} {0:>5}")
            continue
        p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
        print(f"{name:<22} {len(times):>5} {statistics.median(times):>9.3f} {p90:>7.3f} {max(times):>7.3f}")
    reasons: dict[str, int] = {}
    for _, report in rejected:
        first = report.violations[0].split()[0]
        reasons[first] = reasons.get(first, 0) + 1
    print("\nrejected by (first budget exceeded): " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))


if __name__ == "__main__":
    main()
