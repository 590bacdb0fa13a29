"""The study driver: what one trial does, and the Optuna study around it.

A trial samples an architecture, reuses the result of an identical earlier one, checks
the hardware budgets (an infeasible candidate is recorded with its reason and never
trained), trains the candidate toward the cached gallery embeddings with per-epoch
reports to the pruner, and scores it by asymmetric retrieval against the gallery index.
The objective is the asymmetric mAP of the **val** images; the reported scores are those
of the **query** images, which the search never sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from safetensors.torch import save_file

from nas.budgets import Budget, check_budgets, make_budgets
from nas.config import ExperimentConfig, SearchConfig, config_to_dict
from nas.data import ImageSet, Split, preprocess
from nas.errors import BudgetError, ConfigError, GalleryError
from nas.gallery import GalleryEmbeddings, GalleryNet, embed, file_sha256, gallery_embeddings, load_gallery, train_gallery
from nas.locks import file_lock, study_lock
from nas.metrics import compatibility_ratios
from nas.retrieval_data import RetrievalData, load_retrieval_data, score_part
from nas.report import write_report
from nas.tracking import NullTracker, Tracker, flatten
from search_spaces import Architecture, QueryNet, SearchSpace, build, create_space
from trainers import CompatibilityLoss, EpochResult, TrainingDiverged, create_loss_from_config, train_compatible

__all__ = [
    "Context",
    "Objective",
    "best_trial",
    "build_seeded",
    "counted_trials",
    "make_sampler",
    "paragon_scores",
    "make_tracker",
    "open_tracked_study",
    "check_reachable",
    "ensure_gallery",
    "open_study",
    "pareto_front",
    "pareto_table",
    "front_cost",
    "prepare",
    "resolve_device",
    "results_table",
    "run_search",
    "summary",
    "train_and_score",
]

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)


@dataclass
class Context:
    """Everything a trial needs, built once per process by :func:`prepare`."""

    config: ExperimentConfig
    data: ImageSet
    split: Split
    gallery: GalleryNet
    gallery_sha: str
    embeddings: GalleryEmbeddings
    space: SearchSpace
    budgets: list[Budget]
    loss: CompatibilityLoss
    device: torch.device
    smallest: dict[str, float]  # budgets measured on the space's smallest member
    retrieval: RetrievalData  # data, split and (revisited Oxford/Paris) ground truth: how parts are scored


def ensure_gallery(config: ExperimentConfig, data: ImageSet, split: Split, log: Log = print, retrain: bool = False) -> tuple[GalleryNet, Path]:
    """Load the configured gallery checkpoint, or train one under ``<out>/gallery`` if there is none."""
    if config.gallery.checkpoint is not None:
        path = Path(config.gallery.checkpoint)
        return load_gallery(config.gallery, path, data.channels), path
    path = config.out_dir / "gallery" / "gallery.safetensors"
    if path.is_file() and not retrain:
        log(f"Gallery model: loading {path}")
        return load_gallery(config.gallery, path, data.channels), path
    log(f"Gallery model: no checkpoint configured; training {config.gallery.model} on {len(split.train)} images -> {path}")
    model = train_gallery(config.gallery, data, split, path, resolve_device(config.train.device), seed=config.data.seed, log=log)
    return model, path


def check_reachable(space: SearchSpace, budgets: list[Budget]) -> dict[str, float]:
    """Measure the space's smallest member; a budget even it exceeds is a :class:`BudgetError`."""
    smallest = space.extreme(smallest=True)
    report = check_budgets(build(smallest), smallest.resolution, smallest.in_chans, budgets, measure_all=True)
    if not report.feasible:
        reached = ", ".join(f"{k} {v:.4g}" for k, v in report.values.items())
        raise BudgetError(
            f"No architecture in search space {space.name!r} meets the budgets: even its smallest member "
            f"({smallest.to_string()}) measures {reached}, and {report.reason}. Raise the limit(s) "
            f"(--max-mflops / --max-params-m / --max-memory-mb / --max-latency-ms) to at least what the smallest member reaches, "
            f"or give the space smaller choices (space.options)."
        )
    return report.values


def _classifier(gallery: GalleryNet) -> torch.Tensor | None:
    """The gallery model's frozen cosine-classifier weights (for the bct loss), if it has one."""
    return None if gallery.classifier is None else gallery.classifier.detach().cpu()


def prepare(config: ExperimentConfig, log: Log = print) -> Context:
    """Load data, split, gallery model and its cached embeddings; build space, budgets and loss."""
    if config.search.threads:
        torch.set_num_threads(config.search.threads)
    retrieval = load_retrieval_data(config.data)
    data, split = retrieval.data, retrieval.split
    mode = "query = gallery, own entry excluded" if split.query_is_gallery else "query and gallery disjoint"
    log(f"Data: {data.name}, {len(data.classes)} classes, {config.data.resolved_protocol} protocol ({mode}), split {split.sizes()}")
    try:
        space = create_space(config.space.name, embed_dim=config.gallery.embed_dim or 2, in_chans=data.channels, **config.space.options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        loss = create_loss_from_config(config.train.loss, config.train.loss_options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if loss.needs_labels and (data.labels[split.train] < 0).any():
        raise ConfigError(
            f"train.loss {loss.name!r} uses class labels, but the training images of {data.name} have none; "
            f"use a loss that needs no labels (regression or csd)."
        )
    budgets = make_budgets(config.budgets)
    smallest = check_reachable(space, budgets)  # before any gallery training: fail fast
    gallery, path = ensure_gallery(config, data, split, log)
    if config.gallery.embed_dim is None:  # the space must project to the backbone's own width
        space = create_space(config.space.name, embed_dim=gallery.embed_dim, in_chans=data.channels, **config.space.options)
    device = resolve_device(config.train.device)
    sha = file_sha256(path)
    emb, cached = gallery_embeddings(
        gallery, sha, data, split, config.gallery.resolution, config.out_dir / "cache", config.gallery.batch_size, device, log
    )
    if cached:
        log("Gallery embeddings: loaded from cache (content hash verified)")
    try:  # fail before any trial, e.g. the bct loss on a gallery model without a classifier
        loss.bind(torch.from_numpy(emb.train), torch.from_numpy(data.labels[split.train]), _classifier(gallery), config.gallery.train.scale)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return Context(config, data, split, gallery, sha, emb, space, budgets, loss, device, smallest, retrieval)


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler (``search.sampler``), seeded by ``search.seed``.

    Constraint-aware: Optuna's TPE ranks a trial whose ``trial.set_constraint`` values are
    positive (over budget) below every feasible one, NSGA-II uses constrained domination,
    and the GP sampler models the constraints; so each learns where the budget lies from
    the candidates it was refused. ``random`` ignores them: the baseline for comparisons.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if search.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials)
        if search.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=search.seed)
        if search.sampler == "gp":
            return optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=search.n_startup_trials)
        return optuna.samplers.RandomSampler(seed=search.seed)


def make_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The per-epoch pruner of a single-objective study (multi-objective ones use the promotion rule)."""
    if len(search.objectives) > 1 or search.pruner == "none":
        return optuna.pruners.NopPruner()
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)
    below = 50.0 if search.pruner == "median" else search.prune_below_percentile
    # Optuna's percentile is the share of trials kept (for maximisation it prunes below the
    # (100 - p)-th percentile), so keeping all but the bottom `below` percent is p = 100 - below.
    return optuna.pruners.PercentilePruner(
        100.0 - below, n_startup_trials=search.prune_startup_trials, n_warmup_steps=search.prune_warmup_epochs
    )


def open_study(
    config: ExperimentConfig,
    on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
) -> optuna.Study:
    """Create or load the study named in ``config`` (constrained TPE, median pruner).

    The RDB storage runs a heartbeat, so a trial left running by a killed process is
    failed (and ``on_stale_trial`` called for it) once its grace period has passed, when
    any worker starts or asks for its next trial: the study stays resumable.
    """
    config.out_dir.mkdir(parents=True, exist_ok=True)
    url = config.storage_url
    storage: optuna.storages.BaseStorage
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        # SQLite serialises writers: let a worker wait for the lock instead of failing at once
        engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
        with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna; we rely on them deliberately
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=config.search.heartbeat_interval,
                grace_period=config.search.grace_period,
                heartbeat_stale_trial_callback=on_stale_trial,
            )
    elif url.startswith("journal://"):
        # Optuna's journal file backend: concurrent writers on one machine (no heartbeats)
        path = Path(url[len("journal://") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    else:
        raise ConfigError(f"Unsupported Optuna storage URL {url!r}: use sqlite:///PATH, postgresql://..., or journal:///PATH.")
    sampler = make_sampler(config.search)
    pruner = make_pruner(config.search, config.train.epochs)
    directions = ["maximize"] + ["minimize"] * (len(config.search.objectives) - 1)
    try:
        study = optuna.create_study(
            study_name=config.search.study_name, storage=storage, sampler=sampler, pruner=pruner, directions=directions, load_if_exists=True
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


def paragon_scores(ctx: Context) -> dict[str, dict[str, float]]:
    """The gallery model's own (symmetric) scores on the query and val parts."""
    emb = ctx.embeddings
    return {"query": score_part(ctx.retrieval, "query", emb.query, emb), "val": score_part(ctx.retrieval, "val", emb.val, emb)}


def _paragon(ctx: Context, study: optuna.Study) -> dict[str, dict[str, float]]:
    """Symmetric scores of the gallery model (computed once, stored on the study)."""
    stored_hash = study.user_attrs.get("gallery_sha256")
    if stored_hash is not None and stored_hash != ctx.gallery_sha:
        raise GalleryError(
            f"Study {study.study_name!r} was searched against gallery weights {stored_hash[:12]}, but the configured gallery "
            f"model hashes to {ctx.gallery_sha[:12]}: its trials are not comparable. Use a new --study-name or the original checkpoint."
        )
    if "paragon" in study.user_attrs:
        return study.user_attrs["paragon"]
    paragon = paragon_scores(ctx)
    study.set_user_attr("gallery_sha256", ctx.gallery_sha)
    study.set_user_attr("gallery_model", ctx.config.gallery.model)
    study.set_user_attr("paragon", paragon)
    return paragon


def build_seeded(arch: Architecture, seed: int) -> QueryNet:
    """Build ``arch`` with weights initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(arch)


def train_and_score(
    ctx: Context,
    model: QueryNet,
    seed: int,
    paragon: dict[str, dict[str, float]],
    on_epoch: Callable[[EpochResult, dict[str, float]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Train ``model`` toward the gallery embeddings of the training images, then score it.

    After every epoch the val images are scored against the gallery index and
    ``on_epoch(result, val_metrics)`` is called (it may raise ``optuna.TrialPruned``).
    Returns the val and query metrics (``val_*``, ``query_*``), their paragon ratios and
    the training time. Deterministic for a given ``seed`` on the same device.
    """
    arch, tc, labels, split = model.arch, ctx.config.train, ctx.data.labels, ctx.split
    images = preprocess(ctx.data.images[split.train], arch.resolution)
    start = time.perf_counter()
    last_val: dict[str, float] = {}

    def score(part: str) -> dict[str, float]:
        emb = embed(model, ctx.data.images[getattr(split, part)], arch.resolution, 256, ctx.device)
        return score_part(ctx.retrieval, part, emb, ctx.embeddings)

    def after_epoch(result: EpochResult) -> None:
        nonlocal last_val
        model.to(ctx.device)
        last_val = score("val")
        if on_epoch is not None:
            on_epoch(result, last_val)

    train_compatible(
        model,
        images,
        torch.from_numpy(ctx.embeddings.train),
        torch.from_numpy(labels[split.train]),
        ctx.loss,
        epochs=tc.epochs,
        batch_size=tc.batch_size,
        optimizer=tc.optimizer,
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        momentum=tc.momentum,
        schedule=tc.schedule,
        device=ctx.device,
        seed=seed,
        on_epoch=after_epoch,
        classifier=_classifier(ctx.gallery),
        classifier_scale=ctx.config.gallery.train.scale,
        should_stop=should_stop,
    )
    train_seconds = time.perf_counter() - start
    asym = score("query")
    return {
        **{f"val_{k}": v for k, v in last_val.items() if k not in ("queries", "skipped")},
        **{f"query_{k}": v for k, v in asym.items() if k not in ("queries", "skipped")},
        **{f"query_{k}": v for k, v in compatibility_ratios(asym, paragon["query"]).items()},
        "val_mAP_ratio": last_val["mAP"] / paragon["val"]["mAP"],
        "train_seconds": train_seconds,
    }


class _DeferredInterrupt:
    """Ctrl-C during a search, deferred to a safe point.

    A ``KeyboardInterrupt`` raised at an arbitrary bytecode can land inside a database
    transaction (Optuna's or MLflow's SQLite store) and leave a write lock held, so the
    clean-up that marks the trial interrupted would wait on it. While :meth:`installed`,
    the first Ctrl-C only sets a flag; training checks :meth:`requested` before every step
    and the search loop between trials, and both raise ``KeyboardInterrupt`` there. A
    second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def requested(self) -> bool:
        return self._event.is_set()

    def _handler(self, signum: int, frame: object) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers live in the main thread only
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Objective:
    """One trial, as described in the module docstring. Returns the val asymmetric mAP."""

    def __init__(self, ctx: Context, study: optuna.Study, tracker: Tracker | NullTracker, parent_run: str, paragon: dict) -> None:
        self.ctx = ctx
        self.study = study
        self.tracker = tracker
        self.parent_run = parent_run
        self.paragon = paragon
        self.weights_dir = ctx.config.out_dir / "checkpoints"
        self.interrupt = _DeferredInterrupt()

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        trial.set_user_attr("worker", f"{socket.gethostname()}-{os.getpid()}")
        run_id = self.tracker.start_trial(self.parent_run, trial)
        try:
            return self._run(trial, run_id)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("state", "pruned")
            trial.set_user_attr("reason", str(exc))
            self.tracker.end_trial(run_id, "pruned", str(exc))
            raise
        except TrainingDiverged as exc:
            trial.set_user_attr("state", "failed")
            trial.set_user_attr("reason", str(exc))
            self.tracker.end_trial(run_id, "failed", str(exc))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("state", "interrupted")
            trial.set_user_attr("reason", "interrupted by the user (Ctrl-C)")
            self.tracker.end_trial(run_id, "interrupted", "interrupted by the user (Ctrl-C)")
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            trial.set_user_attr("state", "failed")
            trial.set_user_attr("reason", reason)
            self.tracker.end_trial(run_id, "failed", reason)
            raise

    # ---------------------------------------------------------------- steps
    def _duplicate_of(self, arch: Architecture, number: int) -> optuna.trial.FrozenTrial | None:
        for other in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if other.number != number and other.user_attrs.get("arch_id") == arch.arch_id and "duplicate_of" not in other.user_attrs:
                return other
        return None

    def _values(self, val_map: float, budgets: dict[str, float]) -> float | tuple[float, ...]:
        """The objective value(s): val mAP, then each cost objective (a cost not measured counts as 1e9)."""
        costs = self.ctx.config.search.objectives[1:]
        if not costs:
            return float(val_map)
        return (float(val_map), *(float(budgets.get(name, 1e9)) for name in costs))

    def _architecture(self, trial: optuna.Trial) -> Architecture:
        """The enqueued architecture of a warm-start trial, else the space's sample."""
        fixed = trial.user_attrs.get("warm_start_arch")
        if fixed is not None:
            return Architecture.from_string(fixed)
        return self.ctx.space.sample(trial)

    def _run(self, trial: optuna.Trial, run_id: str) -> float | tuple[float, ...]:
        ctx = self.ctx
        arch = self._architecture(trial)
        trial.set_user_attr("arch", arch.to_string())
        trial.set_user_attr("arch_id", arch.arch_id)
        self.tracker.log(run_id, params={**trial.params, "trial_number": trial.number, "arch": arch.to_string()}, tags={"asymnas.arch_id": arch.arch_id})
        self.tracker.log_text(run_id, arch.to_json(), "arch.json")

        original = self._duplicate_of(arch, trial.number)
        if original is not None:
            for key, value in original.constraints.items():
                if key not in trial.constraints:
                    trial.set_constraint(key, value)
            for key in ("state", "reason", "budgets", "metrics", "weights"):
                if key in original.user_attrs:
                    trial.set_user_attr(key, original.user_attrs[key])
            trial.set_user_attr("duplicate_of", original.number)
            metrics = {**original.user_attrs.get("budgets", {}), **original.user_attrs.get("metrics", {})}
            self.tracker.log(run_id, tags={"asymnas.duplicate_of": original.number})
            self.tracker.end_trial(run_id, original.user_attrs.get("state", "complete"), f"same architecture as trial {original.number}; result reused", metrics)
            return original.values[0] if len(original.values) == 1 else tuple(original.values)

        seed = ctx.config.search.seed * 100003 + trial.number
        trial.set_user_attr("seed", seed)
        model = build_seeded(arch, seed)
        report = check_budgets(model, arch.resolution, arch.in_chans, ctx.budgets)
        for budget, value in zip(ctx.budgets, report.constraints, strict=True):
            if budget.name not in trial.constraints:  # a retried trial keeps its original's (same architecture)
                trial.set_constraint(budget.name, value)
        trial.set_user_attr("budgets", report.values)
        trial.set_user_attr("budget_seconds", report.seconds)
        if not report.feasible:
            trial.set_user_attr("state", "infeasible")
            trial.set_user_attr("reason", report.reason)
            self.tracker.end_trial(run_id, "infeasible", report.reason, {**report.values, "budget_check_seconds": report.seconds})
            return self._values(0.0, report.values)
        self.tracker.log(run_id, metrics=report.values)
        return self._train_and_score(trial, run_id, model, seed)

    def _train_and_score(self, trial: optuna.Trial, run_id: str, model: QueryNet, seed: int) -> float | tuple[float, ...]:
        search = self.ctx.config.search
        multi = len(search.objectives) > 1
        budgets = trial.user_attrs.get("budgets", {})
        curve: dict[str, float] = {}

        def on_epoch(result: EpochResult, val: dict[str, float]) -> None:
            self.tracker.log(run_id, metrics={"train_loss": result.train_loss, "val_mAP": val["mAP"], "epoch_seconds": result.seconds}, step=result.epoch)
            if multi:  # Optuna's pruners do not support multi-objective studies: the promotion rule
                curve[str(result.epoch)] = val["mAP"]
                trial.set_user_attr("val_curve", curve)
                if result.epoch == search.promotion_epoch:
                    beaten_by = self._dominating_at_epoch(trial.number, result.epoch, val["mAP"], budgets)
                    if beaten_by >= search.promotion_dominated_by:
                        raise optuna.TrialPruned(
                            f"not promoted: at epoch {result.epoch} {beaten_by} earlier trials beat its val mAP {val['mAP']:.4f} "
                            f"at lower or equal {', '.join(search.objectives[1:])}"
                        )
                return
            trial.report(val["mAP"], result.epoch)
            # after the last epoch the training is done: a result, never a pruned trial
            if result.epoch < self.ctx.config.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val mAP {val['mAP']:.4f} at epoch {result.epoch} is below what the {search.pruner} pruner keeps")

        metrics = train_and_score(self.ctx, model, seed, self.paragon, on_epoch, should_stop=self.interrupt.requested)
        trial.set_user_attr("metrics", metrics)
        trial.set_user_attr("weights", str(self._save_weights(trial.number, model)))
        trial.set_user_attr("state", "complete")
        # val_mAP is already in the run, once per epoch; the last epoch's value is the final one
        self.tracker.end_trial(run_id, "complete", None, {k: v for k, v in metrics.items() if k != "val_mAP"})
        return self._values(metrics["val_mAP"], budgets)

    def _dominating_at_epoch(self, number: int, epoch: int, val_map: float, budgets: dict[str, float]) -> int:
        """How many earlier trials had a higher val mAP at ``epoch`` at no higher cost on every cost objective."""
        costs = self.ctx.config.search.objectives[1:]
        count = 0
        for other in self.study.get_trials(deepcopy=False):
            theirs = other.user_attrs.get("val_curve", {}).get(str(epoch))
            if other.number == number or theirs is None:
                continue
            cheaper = all(other.user_attrs.get("budgets", {}).get(c, float("inf")) <= budgets.get(c, float("inf")) for c in costs)
            if theirs > val_map and cheaper:
                count += 1
        return count

    def _save_weights(self, number: int, model: torch.nn.Module) -> Path:
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        path = (self.weights_dir / f"trial-{number}.safetensors").resolve()
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        return path


# ------------------------------------------------------------------------- results


def _feasible_complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in trials if t.user_attrs.get("state") == "complete" and all(v <= 0 for v in t.constraints.values())]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The feasible complete trial with the highest objective (val mAP); ``None`` if there is none."""
    trials = _feasible_complete(study)
    return max(trials, key=lambda t: (t.values[0], -t.number)) if trials else None


def pareto_front(study: optuna.Study, cost: str = "mflops") -> list[optuna.trial.FrozenTrial]:
    """Feasible complete trials that no other beats on both val mAP (higher) and ``cost`` (lower).

    Ordered by the cost, smallest first: ``pareto:K`` in ``nas export`` is the K-th (from 0)
    of the MFLOPs front.
    """
    trials = [t for t in _feasible_complete(study) if cost in t.user_attrs["budgets"]]
    front = []
    for t in trials:
        value, c = t.values[0], t.user_attrs["budgets"][cost]
        dominated = any(
            o.values[0] >= value and o.user_attrs["budgets"][cost] <= c and (o.values[0] > value or o.user_attrs["budgets"][cost] < c)
            for o in trials
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.user_attrs["budgets"][cost], -t.values[0]))


def front_cost(study: optuna.Study) -> str:
    """The cost the study's Pareto front is taken against: its first cost objective, else MFLOPs."""
    objectives = study.user_attrs.get("config", {}).get("search", {}).get("objectives", ["mAP"])
    return objectives[1] if len(objectives) > 1 else "mflops"


def pareto_table(study: optuna.Study, cost: str | None = None) -> str:
    """The Pareto front of val mAP against ``cost`` (default :func:`front_cost`), with the ``pareto:K`` index of each point."""
    cost = cost or front_cost(study)
    lines = [f"{'K':>3} {'trial':>5} {'MFLOPs':>7} {'lat ms':>6} {'val mAP':>7} {'query mAP':>9} {'ratio':>6}"]
    for k, t in enumerate(pareto_front(study, cost)):
        b, m = t.user_attrs["budgets"], t.user_attrs["metrics"]
        lines.append(
            f"{k:>3} {t.number:>5} {b['mflops']:>7.3f} {b['latency_ms']:>6.2f} {m['val_mAP']:>7.4f} {m['query_mAP']:>9.4f} {m['query_mAP_ratio']:>6.3f}"
        )
    return "\n".join(lines)


def _keep_best_weights(study: optuna.Study, keep: int) -> None:
    """Delete the weights of all but the ``keep`` best trials and the Pareto front's.

    Duplicates share their original's file. An export of a trial whose weights are gone
    retrains it with its seed.
    """
    ranked = sorted(_feasible_complete(study), key=lambda t: -t.values[0])
    keep_paths = {t.user_attrs.get("weights") for t in ranked[:keep] + pareto_front(study)}
    for trial in ranked[keep:]:
        path = trial.user_attrs.get("weights")
        if path and path not in keep_paths and os.path.exists(path):
            os.remove(path)


def _fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec's width when there is no value."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


def results_table(study: optuna.Study, top: int | None = None) -> str:
    """A plain-text table of the study's trials (best first when ``top`` is given)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.RUNNING]
    if top is not None:
        trials = sorted(_feasible_complete(study), key=lambda t: -t.values[0])[:top]
    best = best_trial(study)
    header = f"{'trial':>5} {'state':<11} {'res':>3} {'width':>5} {'MFLOPs':>7} {'params M':>8} {'lat ms':>6} {'val mAP':>7} {'mAP':>6} {'R@1':>6} {'ratio':>6}"
    lines = [header, "-" * len(header)]
    for t in trials:
        b, m = t.user_attrs.get("budgets", {}), t.user_attrs.get("metrics", {})
        state = t.user_attrs.get("state", t.state.name.lower())
        if t.state == optuna.trial.TrialState.FAIL:
            state = "failed"
        if "duplicate_of" in t.user_attrs:
            state = f"dup of {t.user_attrs['duplicate_of']}"
        mark = "*" if best is not None and t.number == best.number else " "
        lines.append(
            f"{t.number:>4}{mark} {state:<11} {_fmt(t.params.get('resolution'), '>3')} {_fmt(t.params.get('width'), '>5')} "
            f"{_fmt(b.get('mflops'), '7.3f')} {_fmt(b.get('params_m'), '8.3f')} {_fmt(b.get('latency_ms'), '6.2f')} "
            f"{_fmt(m.get('val_mAP'), '7.4f')} {_fmt(m.get('query_mAP'), '6.4f')} {_fmt(m.get('query_R@1'), '6.4f')} {_fmt(m.get('query_mAP_ratio'), '6.3f')}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------- driver


class _Progress:
    """One line per finished trial: k of N (candidates rejected over budget do not count), state, scores, best so far, elapsed and remaining."""

    def __init__(self, total: int, timeout: float | None, log: Log) -> None:
        self.total, self.timeout, self.log = total, timeout, log
        self.start = time.perf_counter()
        self.done = 0
        self.rejected = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        rejected = trial.user_attrs.get("state") == "infeasible"
        if rejected:
            self.rejected += 1
            b = trial.user_attrs.get("budgets", {})
            self.log(
                f"[trial {trial.number:>3} | rejected] over budget in {trial.user_attrs.get('budget_seconds', 0):.2f} s, not trained: "
                f"{trial.user_attrs.get('reason', '')} ({self.rejected} rejected so far)"
            )
            return
        self.done += 1
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / self.done * (self.total - self.done)
        if self.timeout is not None:
            remaining = min(remaining, max(self.timeout - elapsed, 0.0))
        state = trial.user_attrs.get("state", trial.state.name.lower())
        if trial.state == optuna.trial.TrialState.FAIL:
            state = "failed"
        m, b = trial.user_attrs.get("metrics", {}), trial.user_attrs.get("budgets", {})
        detail = ""
        if "duplicate_of" in trial.user_attrs:
            detail = f"same architecture as trial {trial.user_attrs['duplicate_of']} (result reused)"
        elif state == "complete":
            detail = f"val mAP {m['val_mAP']:.4f}, query mAP {m['query_mAP']:.4f} ({m['query_mAP_ratio']:.3f} of paragon)"
        elif "reason" in trial.user_attrs:
            detail = trial.user_attrs["reason"]
        budgets = ", ".join(f"{k} {b[k]:.3g}" for k in ("mflops", "params_m", "latency_ms") if k in b)
        best = best_trial(study)
        if best:
            bb = best.user_attrs.get("budgets", {})
            best_text = (f"best #{best.number} val mAP {best.values[0]:.4f} ("
                         + ", ".join(f"{k} {bb[k]:.3g}" for k in ("mflops", "latency_ms") if k in bb) + ")")
        else:
            best_text = "no feasible trial yet"
        self.log(
            f"[trial {trial.number:>3} | {self.done}/{self.total}] {state:<10} {detail} [{budgets}] | {best_text} | "
            f"elapsed {elapsed / 60:.1f} min, ~{remaining / 60:.1f} min left"
        )


def counted_trials(study: optuna.Study) -> int:
    """Trials that count toward the study's trial budget.

    Every trial counts (complete, pruned, failed, running, waiting) except an infeasible
    one (over budget: rejected before any training) and a failed one that is being
    retried (its retry counts instead).
    """
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(
        1 for t in trials
        if not (t.state == optuna.trial.TrialState.FAIL and t.number in retried) and t.user_attrs.get("state") != "infeasible"
    )


def _run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """Run ``objective`` on an asked trial with heartbeats, then tell the study its outcome.

    ``study.optimize`` cannot be used here: asking for a trial must happen under the
    study lock (see :func:`run_search`). The heartbeat thread is Optuna's own, the same
    one ``optimize`` runs; it is private API (pinned with optuna==5.0.0 in setup.cfg) and
    this is the one place that uses it.
    """
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        except TrainingDiverged:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # that trial fails, the study goes on
            return
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
    study.tell(trial, value)


def _warm_start_architectures(config: ExperimentConfig, ctx: Context, study: optuna.Study) -> list[Architecture]:
    """The architectures ``search.warm_start`` names (see :class:`nas.config.SearchConfig`)."""
    from search_spaces import timm_architecture

    spec = config.search.warm_start
    if spec in (None, "none"):
        return []
    if spec == "baselines":
        recorded = study.user_attrs.get("baselines", {})
        return [Architecture.from_string(r["arch"]) for _, r in sorted(recorded.items()) if r.get("fits")]
    archs = []
    for entry in spec:
        try:
            if "space=" in entry:
                arch = Architecture.from_string(entry)
            else:
                name, sep, res = entry.partition("@")
                if not sep or not res.isdigit():
                    raise ValueError(f"expected 'timm_model@resolution' (e.g. lcnet_050@32) or an architecture string, but got {entry!r}")
                arch = timm_architecture(name, int(res), ctx.space.embed_dim, ctx.data.channels)
                build(arch)  # an unknown timm name fails here, before the search starts
        except ValueError as exc:
            raise ConfigError(f"search.warm_start: {exc}") from None
        if (arch.embed_dim, arch.in_chans) != (ctx.space.embed_dim, ctx.data.channels):
            raise ConfigError(
                f"search.warm_start: {entry!r} has embed={arch.embed_dim} in={arch.in_chans}, but this study needs "
                f"embed={ctx.space.embed_dim} in={ctx.data.channels}."
            )
        archs.append(arch)
    return archs


def _warm_start(config: ExperimentConfig, ctx: Context, study: optuna.Study, log: Log) -> None:
    """Enqueue the warm-start architectures not enqueued before, as the next trials."""
    done = list(study.user_attrs.get("warm_started", []))
    new = [a for a in _warm_start_architectures(config, ctx, study) if a.to_string() not in done]
    for arch in new:
        study.enqueue_trial({}, user_attrs={"warm_start_arch": arch.to_string()}, skip_if_exists=False)
        done.append(arch.to_string())
    if new:
        study.set_user_attr("warm_started", done)
        log(f"Warm start: enqueued {len(new)} architecture(s) as the next trials: " + "; ".join(a.timm_model or a.arch_id for a in new))
    elif config.search.warm_start == "baselines" and not study.user_attrs.get("baselines"):
        log("Warm start: no baselines recorded for this study yet; run 'nas baseline' first.")


def make_tracker(config: ExperimentConfig, log: Log = print) -> Tracker | NullTracker:
    """The MLflow tracker of ``config`` (a no-op one when tracking is off)."""
    if not config.tracking.enabled:
        return NullTracker()
    return Tracker(config.tracking_uri, config.tracking.experiment or config.search.study_name, config.out_dir / "mlartifacts", log=log)


def open_tracked_study(
    config: ExperimentConfig,
    ctx: Context,
    tracker: Tracker | NullTracker,
    log: Log = print,
    on_stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
    describe: bool = True,
) -> tuple[optuna.Study, str, dict[str, dict[str, float]], dict[str, float]]:
    """Open the study and its MLflow parent run; returns the study, the parent run id, the
    paragon scores and the gallery model's budgets. Call under the study lock.

    ``describe`` (re)writes the study's config, space and gallery description; a joining
    worker only writes them when the study has none yet.
    """
    study = open_study(config, on_stale_trial=on_stale_trial)
    closed = tracker.reconcile(study)
    if closed:
        log(f"Tracking: closed {closed} MLflow run(s) left open by an interrupted earlier search.")
    paragon = _paragon(ctx, study)
    description = ctx.space.describe()
    gallery_mflops = check_budgets(ctx.gallery, config.gallery.resolution, ctx.data.channels, ctx.budgets[:2], measure_all=True).values
    if "config" not in study.user_attrs or describe:
        study.set_user_attr("config", config_to_dict(config))
        study.set_user_attr("out_dir", str(config.out_dir.resolve()))
        study.set_user_attr("space", description)
        study.set_user_attr("gallery_budgets", gallery_mflops)
    parent = tracker.start_study(
        study,
        params=flatten({**config_to_dict(config), "split": ctx.split.sizes()}),
        tags={
            "gallery.sha256": ctx.gallery_sha,
            "gallery.model": config.gallery.model,
            "budgets": "; ".join(b.describe() for b in ctx.budgets),
            "space.num_architectures": description["num_architectures"],
        },
        texts={"config.yaml": yaml.safe_dump(config_to_dict(config), sort_keys=False), "space.json": json.dumps(description, indent=2)},
    )
    tracker.log(
        parent,
        metrics={
            **{f"paragon_query_{k}": v for k, v in paragon["query"].items() if k not in ("queries", "skipped")},
            **{f"paragon_val_{k}": v for k, v in paragon["val"].items() if k not in ("queries", "skipped")},
            **{f"gallery_{k}": v for k, v in gallery_mflops.items()},
            **{f"smallest_candidate_{k}": v for k, v in ctx.smallest.items()},
        },
    )
    return study, parent, paragon, gallery_mflops


def run_search(config: ExperimentConfig, log: Log = print, total_trials: int | None = None, worker: str = "") -> optuna.Study:
    """Run (or resume) the study of ``config``.

    Without ``total_trials`` this adds ``config.search.trials`` trials to the study. With
    it (``nas worker``) the process runs trials until the study as a whole holds
    ``total_trials``, however many workers share it; "count, then ask" is serialised by
    :func:`nas.locks.study_lock`, so the total is exact. ``search.timeout`` stops this
    process from starting new trials after that many seconds.
    """
    prefix = f"[{worker}] " if worker else ""
    log = (lambda text, _log=log: _log(prefix + text)) if worker else log
    with file_lock(config.out_dir / ".gallery.lock"):  # the first worker builds, the others wait and load
        ctx = prepare(config, log)
    tracker: Tracker | NullTracker = NullTracker()  # replaced under the study lock below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.search.max_retries)

    def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tracker.close_stale_trial(study, trial)
        retry(study, trial)
        log(f"Trial {trial.number} stopped sending heartbeats (its worker died): marked failed and queued for a retry.")

    lock = lambda: study_lock(config.storage_url, config.search.study_name, config.out_dir)  # noqa: E731
    with lock():  # first-time creation of the study and tracking tables, one worker at a time
        tracker = make_tracker(config, log)
        study, parent, paragon, gallery_mflops = open_tracked_study(config, ctx, tracker, log, on_stale_trial, describe=total_trials is None)
        before = counted_trials(study)
        target = total_trials if total_trials is not None else before + config.search.trials
        _warm_start(config, ctx, study, log)  # the enqueued trials are among this run's trials
    log(
        f"Paragon (gallery model on both sides): query mAP {paragon['query']['mAP']:.4f}, {_recall_text(paragon['query'])}; "
        f"val mAP {paragon['val']['mAP']:.4f}"
    )
    log(
        f"Study {study.study_name!r} at {config.storage_url}: {before} earlier trial(s); running until it holds {target}. "
        f"Budgets: {'; '.join(b.describe() for b in ctx.budgets)}. Gallery model: {gallery_mflops['mflops']:.2f} MFLOPs."
    )
    objective = Objective(ctx, study, tracker, parent, paragon)
    progress = _Progress(max(target - before, 0), config.search.timeout, log)
    start = time.monotonic()
    status = "FINISHED"
    infeasible_in_a_row = 0
    try:
        while config.search.timeout is None or time.monotonic() - start < config.search.timeout:
            if infeasible_in_a_row >= config.search.max_infeasible_in_a_row:
                log(
                    f"Stopping: the last {infeasible_in_a_row} candidates were all over budget. Few members of the space fit; "
                    f"narrow the space's choices (space.options, see 'nas space show {config.space.name}') or loosen the budgets."
                )
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, then retried
            with lock():
                # waiting trials (warm starts, retries of a dead worker's trial) are counted already: run them even at the target
                waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                if counted_trials(study) >= target and not waiting:
                    break
                with warnings.catch_warnings():  # we run Optuna's heartbeat thread ourselves (see _run_one)
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                    trial = study.ask()
            with objective.interrupt.installed():
                _run_one(study, trial, objective)
            if objective.interrupt.requested():  # Ctrl-C outside training: the trial finished, stop here
                raise KeyboardInterrupt
            finished = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
            infeasible_in_a_row = infeasible_in_a_row + 1 if finished.user_attrs.get("state") == "infeasible" else 0
            progress(study, finished)
            _keep_best_weights(study, config.search.keep_best)
    except KeyboardInterrupt:
        status = "KILLED"
        log("Interrupted (Ctrl-C): a trial stopped in training is marked failed (state interrupted); run the same command again to resume the study.")
        raise
    finally:
        best = best_trial(study)
        metrics = {f"best_{k}": v for k, v in best.user_attrs.get("metrics", {}).items()} if best else {}
        for path in write_report(study, config.out_dir / "report"):
            tracker.log_artifact(parent, path)
        wall = time.monotonic() - start
        if wall > 0 and config.tracking.enabled:
            log(f"Tracking: {tracker.seconds:.1f} s of this process's {wall:.0f} s search ({100 * tracker.seconds / wall:.1f}%).")
        still_running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
        if still_running and status == "FINISHED":
            tracker.log(parent, metrics=metrics, tags={"best_trial": best.number if best else "none"})  # other workers go on
        else:
            tracker.end_study(parent, metrics=metrics, tags={"best_trial": best.number if best else "none"}, status=status)
    return study


def _recall_text(metrics: dict[str, float], prefix: str = "") -> str:
    """``R@1 x``, or for the revisited Oxford/Paris protocols (no R@K) ``mP@10 (medium) x``."""
    if f"{prefix}R@1" in metrics:
        return f"R@1 {metrics[f'{prefix}R@1']:.4f}"
    if f"{prefix}mP@10_medium" in metrics:
        return f"mP@10 (medium) {metrics[f'{prefix}mP@10_medium']:.4f}"
    return "no R@1"


def summary(study: optuna.Study, config: ExperimentConfig) -> str:
    """Results table, the best trial against the paragon, and where to look next."""
    paragon = study.user_attrs.get("paragon", {}).get("query", {})
    gallery = study.user_attrs.get("gallery_budgets", {})
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        state = "failed" if t.state == optuna.trial.TrialState.FAIL else t.user_attrs.get("state", t.state.name.lower())
        counts[state] = counts.get(state, 0) + 1
    lines = [results_table(study), ""]
    objectives = list(config.search.objectives)
    if len(objectives) > 1:
        for cost in objectives[1:]:
            lines.append(f"Pareto front, the result of this multi-objective study (val mAP against {cost}; export one with --trial pareto:K):")
            lines += [pareto_table(study, cost), ""]
    lines.append(f"Trials: {len(study.trials)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    if paragon:
        lines.append(
            f"Paragon ({config.gallery.model} on both sides, {gallery.get('mflops', float('nan')):.2f} MFLOPs): "
            f"query mAP {paragon['mAP']:.4f}, {_recall_text(paragon)}"
        )
    best = best_trial(study)
    if best is None:
        lines.append("No feasible trial has completed yet.")
    else:
        m, b = best.user_attrs["metrics"], best.user_attrs["budgets"]
        share = b["mflops"] / gallery["mflops"] if gallery.get("mflops") else float("nan")
        lines.append(
            f"Best trial #{best.number}: asymmetric query mAP {m['query_mAP']:.4f} = {m['query_mAP_ratio']:.3f} of the paragon; "
            f"{_recall_text(m, 'query_')}; {b['mflops']:.3f} MFLOPs (1/{1 / share:.1f} of the gallery model), "
            f"{b['params_m']:.3f} M params, {b['latency_ms']:.2f} ms"
        )
        lines.append(f"  architecture: {best.user_attrs['arch']}")
    lines.append("")
    lines.append("Browse the trials in the MLflow UI:")
    if config.tracking.uri:
        lines.append(f"  .venv/bin/nas ui --tracking-uri {config.tracking_uri}")
    else:
        lines.append(f"  .venv/bin/nas ui --run-dir {config.out_dir}")
    storage = f" --storage {config.search.storage}" if config.search.storage else f" --run-dir {config.out_dir}"
    lines.append("Export the best query network:")
    lines.append(f"  .venv/bin/nas export --study-name {study.study_name}{storage} --out {config.out_dir / 'export'}")
    return "\n".join(lines)

