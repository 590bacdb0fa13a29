"""Typed, validated experiment configuration.

One YAML file describes one experiment (see ``experiments/quickstart.yaml``). It is loaded
into the frozen dataclasses below; an unknown or misspelled key is an error that names the
key and the nearest valid one, and every value is checked in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.data_config import AugmentConfig, DataConfig, GalleryConfig, GalleryTrainConfig, PreprocessingConfig
from nas.errors import ConfigError
from nas.hardware.budgets import BUDGETS, relative_fraction
from nas.hardware.runtimes import RUNTIMES
from nas.search.optuna_setup import PRUNERS, SAMPLERS
from nas.secrets import resolve_url
from nas.typed_config import build_dataclass, check_config, set_dotted

__all__ = [
    "DataConfig", "GalleryTrainConfig", "GalleryConfig", "PreprocessingConfig", "AugmentConfig", "SpaceConfig", "LatencyConfig", "BudgetConfig", "TrainConfig",
    "SearchConfig", "SupernetConfig", "TrackingConfig", "ExperimentConfig", "COST_OBJECTIVES", "load_config", "config_from_dict", "config_to_dict",
]


_check = check_config


@dataclass(frozen=True)
class SpaceConfig:
    """The search space: a registered name and the options its constructor takes."""

    name: str = "mobilenet"
    options: dict[str, Any] = field(default_factory=dict)


#: Costs a multi-objective study may minimise beside the val mAP (names of budget values).
COST_OBJECTIVES = BUDGETS.names()


@dataclass(frozen=True)
class LatencyConfig:
    """How latency is measured: runtime, threads, batch size, warm-up and timed runs.

    ``runtime`` names an entry of :data:`nas.hardware.runtimes.RUNTIMES`: ``torch`` (eager,
    CPU), ``onnxruntime`` (ONNX Runtime, CPU execution provider), ``cuda`` (eager on the
    GPU) or ``onnxruntime-basic`` (ONNX Runtime, basic graph optimisations only). With
    ``predict`` a per-piece latency lookup table (cached in ``table_dir``; null means
    ``$XDG_CACHE_HOME/asymnas/latency`` or ``~/.cache/asymnas/latency``) predicts a
    candidate's latency first, and one predicted more than ``margin`` (a fraction: 0.15 is
    15%) over ``max_latency_ms`` is rejected without being measured.
    """

    runtime: str = "torch"
    threads: int = 1
    batch_size: int = 1
    warmup: int = 10
    repeats: int = 30
    table_dir: str | None = None
    predict: bool = True
    margin: float = 0.15

    def __post_init__(self) -> None:
        RUNTIMES.check(self.runtime)
        _check(self.threads >= 1, f"budgets.latency.threads must be >= 1, but got {self.threads}.")
        _check(self.batch_size >= 1, f"budgets.latency.batch_size must be >= 1, but got {self.batch_size}.")
        _check(self.warmup >= 0, f"budgets.latency.warmup must be >= 0, but got {self.warmup}.")
        _check(self.repeats >= 3, f"budgets.latency.repeats must be >= 3, but got {self.repeats}.")
        _check(self.table_dir is None or bool(self.table_dir), "budgets.latency.table_dir must be a directory or null, but got ''.")
        _check(0 <= self.margin < float("inf"), f"budgets.latency.margin must be a finite fraction >= 0, but got {self.margin}.")


@dataclass(frozen=True)
class BudgetConfig:
    """Hardware budgets; a null limit means that quantity is measured but not limited.

    ``max_mflops`` is in millions of multiply-accumulates (fvcore's count, batch 1, at the
    candidate's input resolution); ``max_params_m`` in millions of parameters;
    ``max_latency_ms`` the median latency on ``latency.runtime``; ``max_memory_mb`` the peak
    MiB of one inference forward pass (parameters and buffers + live activations) at
    ``latency.batch_size``.

    Each limit may instead be a fraction of the gallery model's own figure, measured the
    same way at ``gallery.resolution``: ``"1/10"`` or ``"10%"``. Such a limit is resolved
    once the gallery model is loaded (:meth:`resolved`); ``relative`` then records what was
    written (``{"max_mflops": "1/10"}``) beside the absolute limit it became.
    """

    max_mflops: Any = None
    max_params_m: Any = None
    max_latency_ms: Any = None
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    max_memory_mb: Any = None
    relative: dict[str, str] = field(default_factory=dict)

    LIMITS = ("max_mflops", "max_params_m", "max_latency_ms", "max_memory_mb")

    def __post_init__(self) -> None:
        for name in self.LIMITS:
            value = getattr(self, name)
            if relative_fraction(value) is not None:
                continue
            _check(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0),
                f"'budgets.{name}' must be > 0, a fraction of the gallery model's own figure ('1/10' or '10%'), or null, but got {value!r}.",
            )
            if isinstance(value, int):
                object.__setattr__(self, name, float(value))

    @property
    def unresolved(self) -> dict[str, float]:
        """The limits still written relative to the gallery model: ``{"max_mflops": 0.1}``."""
        return {name: fraction for name in self.LIMITS if (fraction := relative_fraction(getattr(self, name))) is not None}

    def resolved(self, gallery: dict[str, float]) -> BudgetConfig:
        """These budgets with every relative limit made absolute from ``gallery`` (the gallery model's
        figures by budget name: ``{"mflops": 575.2, ...}``)."""
        fractions = self.unresolved
        absolute = {name: fraction * gallery[name.removeprefix("max_")] for name, fraction in fractions.items()}
        return dataclasses.replace(self, **absolute, relative={**self.relative, **{n: str(getattr(self, n)) for n in fractions}})


@dataclass(frozen=True)
class TrainConfig:
    """How a candidate query network is trained toward the gallery embedding space.

    ``loss`` is one compatibility loss by name, with ``loss_options`` its options
    (``loss: regression``, ``loss_options: {distance: l2}``), or a weighted sum as a mapping
    ``{loss name: weight > 0}``, with ``loss_options`` mapping some of those names to their
    options (``loss: {regression: 1.0, contrastive: 0.5}``,
    ``loss_options: {contrastive: {margin: 0.5}}``). Names and options are checked against
    the loss registry when the study is prepared (``trainers.create_loss_from_config``).
    """

    # str | dict[str, float]; typed Any so that the loader passes either form through to __post_init__
    loss: Any = "regression"
    loss_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    device: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: float32, bfloat16 or float16 (CUDA only) autocast; auto: bfloat16 (float16 where unsupported) on CUDA, float32 on a CPU
    precision: str = "auto"
    #: the model and its batches in NHWC memory format (measured 1.05-1.5x faster on CPU: experiments/benchmarks/train_speed.py)
    channels_last: bool = True
    #: torch.compile each trained network (its compile time is paid once per trial)
    compile: bool = False
    #: weight averaging: an exponential moving average of the weights with this decay per step (e.g. 0.99), scored and
    #: kept in place of the last step's weights (trainers.WeightAverage); null: none
    average_decay: float | None = None

    def __post_init__(self) -> None:
        self._check_loss()
        _check(
            self.precision in ("auto", "float32", "bfloat16", "float16"),
            f"train.precision must be 'auto', 'float32', 'bfloat16' or 'float16', but got {self.precision!r}.",
        )
        _check(
            not (self.precision == "float16" and self.device == "cpu"),
            "train.precision float16 needs a CUDA device (train.device); on a CPU use bfloat16 or float32.",
        )
        _check(self.epochs >= 1, f"train.epochs must be >= 1, but got {self.epochs}.")
        _check(self.batch_size >= 2, f"train.batch_size must be >= 2, but got {self.batch_size}.")
        _check(self.optimizer in ("adamw", "sgd"), f"train.optimizer must be 'adamw' or 'sgd', but got {self.optimizer!r}.")
        _check(self.lr > 0, f"train.lr must be > 0, but got {self.lr}.")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, but got {self.weight_decay}.")
        _check(self.schedule in ("cosine", "step", "none"), f"train.schedule must be 'cosine', 'step' or 'none', but got {self.schedule!r}.")
        _check(self.average_decay is None or 0 < self.average_decay < 1,
               f"train.average_decay must be in (0, 1) (e.g. 0.99) or null, but got {self.average_decay}.")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"train.device must be 'auto', 'cpu' or 'cuda[:N]', but got {self.device!r}.",
        )

    def _check_loss(self) -> None:
        """The shape of ``loss`` / ``loss_options``; a weighted mapping is stored as a plain dict of float weights."""
        if isinstance(self.loss, str):
            _check(bool(self.loss), "train.loss must not be empty: name a loss such as 'regression'.")
            return
        _check(
            isinstance(self.loss, dict) and bool(self.loss),
            f"'train.loss' must be a loss name or a mapping {{loss name: weight}}, but got {self.loss!r}.",
        )
        weights: dict[str, float] = {}
        for name, weight in self.loss.items():
            _check(isinstance(name, str) and bool(name), f"'train.loss' keys must be loss names, but got {name!r}.")
            _check(
                not isinstance(weight, bool) and isinstance(weight, (int, float)) and weight > 0 and weight != float("inf"),
                f"'train.loss.{name}' is a weight and must be a number > 0, but got {weight!r}.",
            )
            weights[name] = float(weight)
        object.__setattr__(self, "loss", weights)
        for name, options in self.loss_options.items():
            if name not in weights:
                raise ConfigError(
                    f"Unknown key 'train.loss_options.{name}': with train.loss a mapping of weights, loss_options maps "
                    f"each of those losses ({', '.join(weights)}) to its options, e.g. {{{next(iter(weights))}: {{...}}}}."
                )
            _check(isinstance(options, dict), f"'train.loss_options.{name}' must be a mapping of that loss's options, but got {options!r}.")


@dataclass(frozen=True)
class SearchConfig:
    """The Optuna study: name, storage, how many trials this invocation adds, sampler and pruner.

    ``pruner: median`` stops a trial whose val mAP after an epoch is below the median of
    earlier trials at that epoch; ``percentile`` one below their
    ``prune_below_percentile``-th percentile (25: only the bottom quarter is stopped). Either acts once ``prune_startup_trials``
    trials have reported and only after ``prune_warmup_epochs`` epochs. A running trial sends a heartbeat every
    ``heartbeat_interval`` seconds; one silent for ``grace_period`` seconds (its process
    was killed) is failed when any worker next asks for a trial, and retried up to
    ``max_retries`` times (on the machine that ran it, as soon as its process is gone).

    ``sampler`` names an entry of :data:`nas.search.optuna_setup.SAMPLERS`: ``tpe``
    (constrained TPE, the default), ``nsga2`` (NSGA-II with constrained domination), ``gp``
    (Optuna's Gaussian-process sampler), ``qmc`` (scrambled Sobol points) or ``random`` (the
    baseline every claim is measured against); all seeded by ``seed``. ``pruner`` names an
    entry of :data:`~nas.search.optuna_setup.PRUNERS`.

    ``strategy`` names how a candidate is evaluated, an entry of
    :data:`nas.search.evaluators.EVALUATORS` (checked when a search starts, before any data
    is loaded): ``train_from_scratch`` (the default) trains every candidate from random
    weights toward the gallery embeddings; ``one_shot`` scores candidates with weights
    inherited from a trained supernet and fine-tunes the best (see :class:`SupernetConfig`).
    ``objectives``: ``[mAP]``
    (maximise the val asymmetric mAP), or with one or more costs to minimise as well
    (``mflops``, ``latency_ms``, ``params_m``, ``memory_mb``): a multi-objective study whose
    result is its Pareto front.

    Multi-fidelity: single-objective studies report val mAP after every epoch to the
    ``pruner`` (``median``, ``percentile``, ``successive_halving``, ``hyperband`` or
    ``none``). Optuna's pruners do not support multi-objective studies; there a trial
    trains ``promotion_epoch`` epochs first and is promoted to the full schedule unless at
    least ``promotion_dominated_by`` earlier trials beat it on val mAP at that epoch and on
    every cost objective (it is then recorded as pruned).

    ``warm_start``: ``baselines`` enqueues the hand-designed baselines recorded by
    ``nas baseline`` that fit the budgets as the first trials; ``largest`` enqueues the
    space's largest member at each of its resolutions (with the ``gallery`` space: the
    unpruned gallery model at every query resolution); on a space rooted in the gallery
    model under ``max_mflops``, the largest member within it at each resolution where one
    fits (the gallery model itself, else the least pruning of it that fits:
    :func:`nas.supernet.largest_within`); a list enqueues the given timm models (``name@resolution``) or architecture
    strings. Each is enqueued once, as the first trials of the run, and counts toward
    ``trials`` (all are run, even where they outnumber it).

    A candidate over budget is recorded as an infeasible trial (its constraint values teach
    the sampler where the budget lies) but does not count toward ``trials``: it costs a
    fraction of a second, not a training run; nor does a duplicate (an architecture another
    trial evaluated or is evaluating). ``max_infeasible_in_a_row`` stops a search whose
    sampler keeps proposing candidates over budget or duplicates.
    """

    study_name: str = "quickstart"
    storage: str | None = None
    trials: int = 14
    timeout: float | None = None
    seed: int = 0
    n_startup_trials: int = 8
    sampler: str = "tpe"
    objectives: tuple[str, ...] = ("mAP",)
    pruner: str = "median"
    prune_below_percentile: float = 25.0
    prune_startup_trials: int = 4
    prune_warmup_epochs: int = 1
    keep_best: int = 5
    threads: int | None = None
    heartbeat_interval: int = 15
    grace_period: int = 60
    max_retries: int = 2
    max_infeasible_in_a_row: int = 200
    promotion_epoch: int = 1
    promotion_dominated_by: int = 3
    warm_start: Any = None
    strategy: str = "train_from_scratch"

    def __post_init__(self) -> None:
        _check(bool(self.study_name), "search.study_name must not be empty.")
        _check(self.max_infeasible_in_a_row >= 1, f"search.max_infeasible_in_a_row must be >= 1, but got {self.max_infeasible_in_a_row}.")
        _check(self.trials >= 0, f"search.trials must be >= 0, but got {self.trials}.")
        _check(0 <= self.seed < 2**32, f"search.seed must be in [0, 2**32), but got {self.seed}.")  # else Optuna refuses it after the gallery
        _check(self.timeout is None or self.timeout > 0, f"search.timeout must be > 0 or null, but got {self.timeout}.")
        PRUNERS.check(self.pruner)
        SAMPLERS.check(self.sampler)
        _check(bool(self.strategy), "search.strategy must name a registered evaluator, e.g. 'train_from_scratch'.")
        objectives = tuple(self.objectives) if isinstance(self.objectives, (list, tuple)) else ()
        _check(
            bool(objectives) and objectives[0] == "mAP" and all(o in COST_OBJECTIVES for o in objectives[1:])
            and len(set(objectives)) == len(objectives),
            f"search.objectives must be [mAP] followed by distinct costs among {', '.join(COST_OBJECTIVES)}, but got {self.objectives!r}.",
        )
        object.__setattr__(self, "objectives", objectives)
        _check(self.promotion_epoch >= 1, f"search.promotion_epoch must be >= 1, but got {self.promotion_epoch}.")
        _check(self.promotion_dominated_by >= 1, f"search.promotion_dominated_by must be >= 1, but got {self.promotion_dominated_by}.")
        _check(
            self.warm_start in (None, "none", "baselines", "largest")
            or (isinstance(self.warm_start, (list, tuple)) and all(isinstance(w, str) and w for w in self.warm_start)),
            f"search.warm_start must be null, 'baselines', 'largest' or a list of 'timm_model@resolution' / architecture strings, but got {self.warm_start!r}.",
        )
        _check(
            0 < self.prune_below_percentile < 100,
            f"search.prune_below_percentile must be in (0, 100), but got {self.prune_below_percentile}.",
        )
        _check(self.prune_startup_trials >= 0, f"search.prune_startup_trials must be >= 0, but got {self.prune_startup_trials}.")
        _check(self.prune_warmup_epochs >= 0, f"search.prune_warmup_epochs must be >= 0, but got {self.prune_warmup_epochs}.")
        _check(self.keep_best >= 1, f"search.keep_best must be >= 1, but got {self.keep_best}.")
        _check(self.max_retries >= 0, f"search.max_retries must be >= 0, but got {self.max_retries}.")
        _check(self.heartbeat_interval >= 1, f"search.heartbeat_interval must be >= 1, but got {self.heartbeat_interval}.")
        _check(self.grace_period > self.heartbeat_interval, f"search.grace_period must exceed heartbeat_interval, but got {self.grace_period}.")
        _check(self.threads is None or self.threads >= 1, f"search.threads must be >= 1 or null, but got {self.threads}.")


#: ``supernet.batch_norm``: how members' batch-norm statistics are set (see :class:`SupernetConfig`).
BATCH_NORM_MODES = ("auto", "frozen", "recalibrate")
#: ``supernet.fine_tune_from``: the weights a chosen member's fine-tuning starts from (see :class:`SupernetConfig`).
FINE_TUNE_STARTS = ("auto", "supernet", "gallery", "both")
#: ``supernet.score``: the weights a candidate is scored with during the search (see :class:`SupernetConfig`).
SUPERNET_SCORES = ("inherited", "tuned", "gallery")


@dataclass(frozen=True)
class SupernetConfig:
    """The supernet of the one-shot strategy (``search.strategy: one_shot``, ``nas supernet train``).

    One elastic network holds every member of the space (:class:`search_spaces.Supernet`;
    :class:`search_spaces.RootedSupernet` for the ``pruned`` space); with the ``gallery``
    space and an EfficientNet-layout gallery model, or the ``pruned`` space and any
    supported timm gallery model, its largest member is the gallery model itself, with its
    weights. It trains ``epochs`` epochs on the
    training images with the configured compatibility loss, optimizer, batch size and
    augmentation (``train.*``; ``lr`` null: ``train.lr``), by the sandwich rule: every
    step the largest member, the smallest and ``random_subnets`` random ones, each at its
    own input resolution (the batch resized); every member but the largest is also pulled
    toward the largest's embedding (in-place distillation, weight ``distill``). A member is
    scored with its inherited weights after its batch-norm statistics are recalibrated on
    ``recalibration_images`` training images (a fixed seeded subset, never val or query).
    ``batch_norm``: ``recalibrate`` (as just said; members train with batch statistics),
    ``frozen`` (every batch-norm layer keeps the largest member's running statistics, in
    supernet training, scoring and fine-tuning alike; no recalibration), or ``auto``:
    ``frozen`` when the supernet over the ``gallery`` space is rooted in the gallery model
    (whose statistics the gallery embeddings were computed with), ``recalibrate``
    otherwise (the ``pruned`` space's width cuts change every layer's input).
    ``max_mflops`` keeps the sandwich within a budget (MFLOPs, fvcore multiply-accumulates,
    batch 1): its largest member is then the largest within it (the space's largest member
    at the highest resolution that fits, else a greedy shrinking of it) and random members
    are drawn within it, so training is spent on members a device can run and each step
    costs less. ``budget`` (the default): the study's ``budgets.max_mflops`` (a family's
    device studies reuse the study's supernet, so give the study the largest device's
    budget); ``null``: the whole space.
    The ``fine_tune_best`` best members (by inherited val mAP) are then fine-tuned from
    their inherited weights for ``fine_tune_epochs`` (null: ``train.epochs``) at
    ``fine_tune_lr`` (null: ``train.lr``) and scored on the query images; the study's
    best trial and its export come from those. ``fine_tune_from``: the weights that fine-tuning
    starts from: ``supernet`` (the member's inherited weights), ``gallery`` (the gallery
    model's own weights pruned to the member, as before any supernet training; a supernet
    rooted in the gallery model only), ``both`` (fine-tuned from each, the one with the higher
    val mAP after fine-tuning kept; twice the time) or ``auto``: ``both`` when the supernet
    is rooted in the gallery model, else ``supernet``.
    ``score``: what a candidate's val mAP during the search is measured with: ``inherited`` (its
    supernet weights, recalibrated), ``tuned`` (those after one pass over ``score_images``
    training images, a seeded subset, null: all of them, at the fine-tuning's learning rate) or
    ``gallery`` (the gallery model's own weights pruned to it, the gallery's batch-norm
    statistics or recalibrated ones, whichever scores higher; rooted supernets only).
    """

    epochs: int = 4
    lr: float | None = None
    random_subnets: int = 2
    distill: float = 1.0
    recalibration_images: int = 500
    fine_tune_best: int = 2
    fine_tune_epochs: int | None = None
    fine_tune_lr: float | None = None
    batch_norm: str = "auto"
    fine_tune_from: str = "auto"
    max_mflops: Any = "budget"  # a number, "budget" or null (see above)
    score: str = "inherited"
    score_images: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.max_mflops is None or self.max_mflops == "budget" or (isinstance(self.max_mflops, (int, float)) and not isinstance(self.max_mflops, bool) and self.max_mflops > 0),
            f"supernet.max_mflops must be a positive number of MFLOPs, 'budget' (the study's budgets.max_mflops) or null (the whole space), but got {self.max_mflops!r}.",
        )
        _check(self.fine_tune_from in FINE_TUNE_STARTS,
               f"supernet.fine_tune_from must be one of {', '.join(FINE_TUNE_STARTS)}, but got {self.fine_tune_from!r}.")
        _check(self.score in SUPERNET_SCORES, f"supernet.score must be one of {', '.join(SUPERNET_SCORES)}, but got {self.score!r}.")
        _check(self.score_images is None or self.score_images >= 1, f"supernet.score_images must be >= 1 or null, but got {self.score_images}.")
        _check(self.batch_norm in BATCH_NORM_MODES, f"supernet.batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, but got {self.batch_norm!r}.")
        _check(self.epochs >= 1, f"supernet.epochs must be >= 1, but got {self.epochs}.")
        _check(self.lr is None or self.lr > 0, f"supernet.lr must be > 0 or null, but got {self.lr}.")
        _check(self.random_subnets >= 0, f"supernet.random_subnets must be >= 0, but got {self.random_subnets}.")
        _check(self.distill >= 0, f"supernet.distill must be >= 0, but got {self.distill}.")
        _check(self.recalibration_images >= 1, f"supernet.recalibration_images must be >= 1, but got {self.recalibration_images}.")
        _check(self.fine_tune_best >= 0, f"supernet.fine_tune_best must be >= 0, but got {self.fine_tune_best}.")
        _check(self.fine_tune_epochs is None or self.fine_tune_epochs >= 1, f"supernet.fine_tune_epochs must be >= 1 or null, but got {self.fine_tune_epochs}.")
        _check(self.fine_tune_lr is None or self.fine_tune_lr > 0, f"supernet.fine_tune_lr must be > 0 or null, but got {self.fine_tune_lr}.")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking; ``uri`` null means ``sqlite:///<out>/mlflow.db``; ``env:NAME`` (also for ``search.storage``) reads it from that variable."""

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. ``out`` (default ``runs/<study name>``) holds the study, caches, runs and weights.

    ``cache`` (default: ``out``) is the folder of what is computed once and reused by every
    study of the same setting: the gallery embeddings (``<cache>/cache``) and trained
    supernets (``<cache>/supernet``); ``nas export --family`` points its device searches at the
    study's.
    """

    out: str | None = None
    cache: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    gallery: GalleryConfig = field(default_factory=GalleryConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    budgets: BudgetConfig = field(default_factory=BudgetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.search.study_name

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else self.out_dir

    @property
    def storage_url(self) -> str:
        if self.search.storage:
            return resolve_url(self.search.storage, "search.storage (--storage)")
        return f"sqlite:///{(self.out_dir / 'optuna.db').resolve()}"

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return resolve_url(self.tracking.uri, "tracking.uri (--tracking-uri)")
        return f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}"


# --------------------------------------------------------------------------- loading


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a plain mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"An experiment file must hold a mapping at the top level, but got {type(data).__name__}.")
    return build_dataclass(ExperimentConfig, data)


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """The plain-mapping form of ``config`` (inverse of :func:`config_from_dict`)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Load an experiment YAML file and apply ``overrides`` (dotted keys, e.g. ``budgets.max_mflops``);
    overrides whose value is ``None`` are ignored, so CLI flags not given pass straight through."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Experiment file {path} {'is a folder' if path.is_dir() else 'does not exist'}. Pass the path of a YAML file such as experiments/quickstart.yaml.")
    try:  # an empty file is refused below: it would silently start a full default run
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Experiment file {path} is not valid YAML text: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Experiment file {path} is empty: write the experiment's settings in it (start from experiments/quickstart.yaml)." if data is None else f"Experiment file {path} must hold a mapping (key: value lines) at the top level, but holds a {type(data).__name__}.")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(data, dotted, value)
    return config_from_dict(data)
