"""How many sampled candidates are over a tight budget, by sampler.

For a budget that only a small share of the space meets, runs the study's ask -> sample ->
build -> budget-check loop (MFLOPs and params; nothing is trained) with Optuna's random
sampler and with the study's constrained TPE sampler (``nas.search.optuna_setup.make_sampler``), and
prints the share of proposals that were over budget, overall and in the second half.

A feasible candidate needs a score for TPE to rank it; training is what this benchmark
avoids, so the score is a stated proxy: ``capacity`` (the candidate's MFLOPs: accuracy
grows with capacity, which pushes the search toward the budget's edge, the realistic
hard case) or ``flat`` (every feasible candidate scores the same: only the constraints
guide TPE).

    .venv/bin/python experiments/benchmarks/infeasible_share.py --proposals 200 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import optuna
import torch

from nas.config import BudgetConfig, SearchConfig
from nas.hardware import check_budgets, count_mflops, make_budgets
from nas.search.optuna_setup import make_sampler
from _members import random_members
from search_spaces import build, create_space


def run(space, budgets, sampler: optuna.samplers.BaseSampler, proposals: int, proxy: str) -> tuple[list[bool], list[float]]:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    infeasible, seconds = [], []
    for _ in range(proposals):
        trial = study.ask()
        start = time.perf_counter()
        arch = space.sample(trial)
        report = check_budgets(build(arch), arch.resolution, arch.in_chans, budgets)
        seconds.append(time.perf_counter() - start)
        for budget, value in zip(budgets, report.constraints, strict=True):
            trial.set_constraint(budget.name, value)
        infeasible.append(not report.feasible)
        value = 0.0 if not report.feasible else (report.values["mflops"] if proxy == "capacity" else 1.0)
        study.tell(trial, value)
    return infeasible, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="mobilenet")
    parser.add_argument("--quantile", type=float, default=0.1, help="budget = this quantile of random members' MFLOPs")
    parser.add_argument("--proposals", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)

    space = create_space(args.space, embed_dim=128, in_chans=1)
    mflops = [count_mflops(build(arch), arch.resolution, 1) for arch in random_members(space, 300, seed=12345)]
    limit = float(np.quantile(mflops, args.quantile))
    budgets = make_budgets(BudgetConfig(max_mflops=limit))[:2]  # params and MFLOPs: the cheap budgets
    print(
        f"space {args.space}: budget {limit:.3f} MFLOPs (millions of multiply-accumulates, fvcore, batch 1) = the "
        f"{args.quantile:.0%} quantile of 300 random members; {args.proposals} proposals per run, seeds {args.seeds}"
    )
    print(f"{'sampler':<16} {'proxy':<9} {'over budget':>12} {'2nd half':>9} {'median s/proposal':>18}")
    search = SearchConfig()
    for proxy in ("capacity", "flat"):
        for name in ("random", "constrained TPE"):
            shares, late, secs = [], [], []
            for seed in args.seeds:
                if name == "random":
                    sampler = optuna.samplers.RandomSampler(seed=seed)
                else:
                    sampler = make_sampler(SearchConfig(seed=seed, n_startup_trials=search.n_startup_trials))
                infeasible, seconds = run(space, budgets, sampler, args.proposals, proxy)
                shares.append(np.mean(infeasible))
                late.append(np.mean(infeasible[len(infeasible) // 2 :]))
                secs.extend(seconds)
            print(
                f"{name:<16} {proxy:<9} {np.mean(shares):>7.1%} ±{np.std(shares):>4.1%} {np.mean(late):>8.1%} "
                f"{statistics.median(secs):>18.3f}"
            )


if __name__ == "__main__":
    main()
