"""Shared by the benchmark scripts: random members of a search space."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import optuna

from nas.hardware import check_budgets, count_mflops
from nas.search.context import Context
from nas.study_nets import random_members
from nas.supernet import random_member
from search_spaces import Architecture, QueryNet, SearchSpace, build

__all__ = ["random_members", "median_member", "members_within_budget"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def median_member(space: SearchSpace, n: int = 41, seed: int = 0) -> Architecture:
    """The member with the median MFLOPs among ``n`` random ones."""
    ranked = sorted(random_members(space, n, seed), key=lambda a: count_mflops(build(a), a.resolution, a.in_chans))
    return ranked[len(ranked) // 2]


def members_within_budget(ctx: Context, supernet, seed: int) -> Iterator[tuple[Architecture, QueryNet, float]]:
    """Distinct random members of ``ctx.space`` within the study's MFLOPs budget, in a seeded order: each with its network
    extracted from ``supernet`` and its MFLOPs (fvcore multiply-accumulates, batch 1)."""
    limit = [b for b in ctx.budgets if b.name == "mflops"]
    cap = limit[0].limit if limit and limit[0].limit is not None else float("inf")
    rng = np.random.default_rng(seed)
    seen = set()
    while True:
        arch = random_member(ctx.space, rng)
        if arch.arch_id in seen:
            continue
        seen.add(arch.arch_id)
        if supernet.mflops(arch) > cap * (1 + 1e-9):  # counted from the member's shapes in milliseconds (fvcore's count)
            continue
        model = supernet.extract(arch)
        report = check_budgets(model, arch.resolution, arch.in_chans, limit, measure_all=True)
        if report.feasible:
            yield arch, model, report.values["mflops"]
