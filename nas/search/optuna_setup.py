"""Optuna as the search engine: the sampler, pruner and storage registries, and opening a study.

Proposing candidates stays with Optuna's samplers and pruners; this module only names
them for the config (``search.sampler``, ``search.pruner``, the scheme of
``search.storage``) and opens the study with them. The config checks names against these
registries when a file is loaded, so this module imports nothing of :mod:`nas.config` at
run time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from nas.errors import ConfigError
from nas.registry import Registry

if TYPE_CHECKING:
    from nas.config import ExperimentConfig, SearchConfig

__all__ = ["SAMPLERS", "PRUNERS", "STORAGES", "make_sampler", "make_pruner", "make_storage", "storage_scheme", "open_study", "StaleTrialCallback"]

StaleTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

#: ``search.sampler``: a factory from the search config to a seeded sampler.
SAMPLERS: Registry[Callable[[SearchConfig], optuna.samplers.BaseSampler]] = Registry("search.sampler")
#: ``search.pruner``: a factory from the search config and the training epochs to a pruner.
PRUNERS: Registry[Callable[[SearchConfig, int], optuna.pruners.BasePruner]] = Registry("search.pruner")
#: The scheme of ``search.storage`` (``sqlite:///...`` -> ``sqlite``): a factory from the URL, the search
#: config and the stale-trial callback to an Optuna storage.
STORAGES: Registry[Callable[[str, SearchConfig, StaleTrialCallback | None], optuna.storages.BaseStorage]] = Registry("search.storage (URL scheme)")


# ----------------------------------------------------------------------------- samplers
# Constraint-aware: Optuna's TPE ranks a trial whose ``trial.set_constraint`` values are
# positive (over budget) below every feasible one, NSGA-II uses constrained domination,
# and the GP sampler models the constraints; so each learns where the budget lies from
# the candidates it was refused. ``random`` and ``qmc`` ignore them.


@SAMPLERS.register("tpe")
def _tpe(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials)


@SAMPLERS.register("nsga2")
def _nsga2(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=search.seed)


@SAMPLERS.register("gp")
def _gp(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=search.n_startup_trials)


@SAMPLERS.register("random")
def _random(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """The baseline every claim is measured against."""
    return optuna.samplers.RandomSampler(seed=search.seed)


@SAMPLERS.register("qmc")
def _qmc(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """Scrambled Sobol points (Optuna's ``QMCSampler``): covers the space more evenly than ``random``.

    Categorical choices (most of a space's parameters) are drawn by its independent
    random sampler, seeded the same way.
    """
    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=search.seed, warn_independent_sampling=False)


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler (``search.sampler``), seeded by ``search.seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS.get(search.sampler)(search)


# ----------------------------------------------------------------------------- pruners


@PRUNERS.register("median")
def _median(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return _percentile_below(search, 50.0)


@PRUNERS.register("percentile")
def _percentile(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return _percentile_below(search, search.prune_below_percentile)


def _percentile_below(search: SearchConfig, below: float) -> optuna.pruners.BasePruner:
    # Optuna's percentile is the share of trials kept (for maximisation it prunes below the
    # (100 - p)-th percentile), so keeping all but the bottom `below` percent is p = 100 - below.
    return optuna.pruners.PercentilePruner(
        100.0 - below, n_startup_trials=search.prune_startup_trials, n_warmup_steps=search.prune_warmup_epochs
    )


@PRUNERS.register("successive_halving")
def _successive_halving(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


@PRUNERS.register("hyperband")
def _hyperband(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)


@PRUNERS.register("none")
def _none(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def make_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The per-epoch pruner of a single-objective study (multi-objective ones use the promotion rule)."""
    if len(search.objectives) > 1:
        return optuna.pruners.NopPruner()
    return PRUNERS.get(search.pruner)(search, epochs)


# ----------------------------------------------------------------------------- storages


def _rdb(url: str, search: SearchConfig, on_stale_trial: StaleTrialCallback | None) -> optuna.storages.BaseStorage:
    """SQLAlchemy storage with heartbeats: a trial left running by a killed process is failed after the grace period."""
    # SQLite serialises writers: let a worker wait for the lock instead of failing at once
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna; we rely on them deliberately
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=search.heartbeat_interval,
            grace_period=search.grace_period,
            heartbeat_stale_trial_callback=on_stale_trial,
        )


for _scheme in ("sqlite", "postgresql", "mysql"):
    STORAGES.add(_scheme, _rdb)


@STORAGES.register("journal")
def _journal(url: str, search: SearchConfig, on_stale_trial: StaleTrialCallback | None) -> optuna.storages.BaseStorage:
    """Optuna's journal file backend (``journal:///PATH``): concurrent writers on one machine, no heartbeats."""
    path = Path(url[len("journal://") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def storage_scheme(url: str) -> str:
    """``sqlite`` of ``sqlite:///x.db``, ``postgresql`` of ``postgresql+psycopg2://...``."""
    return url.split(":", 1)[0].split("+", 1)[0]


def make_storage(url: str, search: SearchConfig, on_stale_trial: StaleTrialCallback | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage of ``url``, by its scheme."""
    scheme = storage_scheme(url)
    if scheme not in STORAGES:
        raise ConfigError(f"Unsupported Optuna storage URL {url!r}: use sqlite:///PATH, postgresql://..., or journal:///PATH.")
    return STORAGES.get(scheme)(url, search, on_stale_trial)



# ----------------------------------------------------------------------------- the study


def open_study(config: ExperimentConfig, on_stale_trial: StaleTrialCallback | None = None) -> optuna.Study:
    """Create or load the study named in ``config`` with its sampler and pruner.

    The RDB storages run a heartbeat, so a trial left running by a killed process is
    failed (and ``on_stale_trial`` called for it) once its grace period has passed, when
    any worker starts or asks for its next trial: the study stays resumable.
    """
    config.out_dir.mkdir(parents=True, exist_ok=True)
    storage = make_storage(config.storage_url, config.search, on_stale_trial)
    directions = ["maximize"] + ["minimize"] * (len(config.search.objectives) - 1)
    try:
        study = optuna.create_study(
            study_name=config.search.study_name,
            storage=storage,
            sampler=make_sampler(config.search),
            pruner=make_pruner(config.search, config.train.epochs),
            directions=directions,
            load_if_exists=True,
        )
    except ValueError as exc:  # an existing study with other objectives
        raise ConfigError(
            f"Study {config.search.study_name!r} exists with other objectives than {list(config.search.objectives)} ({exc}); "
            f"use a new --study-name or the study's own objectives."
        ) from None
    if len(study.directions) != len(directions):
        raise ConfigError(
            f"Study {config.search.study_name!r} has {len(study.directions)} objective(s) but search.objectives lists "
            f"{list(config.search.objectives)}; use a new --study-name or the study's own objectives."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study
