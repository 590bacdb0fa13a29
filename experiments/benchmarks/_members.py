"""Shared by the benchmark scripts: random members of a search space."""

from __future__ import annotations

import optuna

from nas.hardware import count_mflops
from search_spaces import Architecture, SearchSpace, build


def random_members(space: SearchSpace, n: int, seed: int) -> list[Architecture]:
    """``n`` architectures drawn by Optuna's random sampler (seeded)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    archs = []
    for _ in range(n):
        trial = study.ask()
        archs.append(space.sample(trial))
        study.tell(trial, 0.0)
    return archs


def median_member(space: SearchSpace, n: int = 41, seed: int = 0) -> Architecture:
    """The member with the median MFLOPs among ``n`` random ones."""
    ranked = sorted(random_members(space, n, seed), key=lambda a: count_mflops(build(a), a.resolution, a.in_chans))
    return ranked[len(ranked) // 2]
