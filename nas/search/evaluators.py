"""How one candidate is evaluated: the :class:`Evaluator` interface and its registry (``search.strategy``).

An evaluator turns an architecture into a scored query network. It has two steps, so that
the budgets are measured on exactly the module that will be evaluated:

1. :meth:`Evaluator.build`: the candidate's module (fresh weights from a seed, or weights
   inherited from a trained supernet);
2. :meth:`Evaluator.evaluate`: train it as the strategy says, embed the val and query
   images at the candidate's resolution and search them against the cached gallery
   index (:func:`nas.scoring.score_part`).

Evaluators know nothing of Optuna or MLflow: the objective (:mod:`nas.search.objective`)
checks budgets between the two steps, reports per-epoch scores to the pruner through
``on_epoch`` and writes the trial record; ``nas export`` (retraining a trial whose weights
were not kept) and ``nas baseline`` use the same evaluator.

``train_from_scratch`` is the first strategy: random weights from the trial's seed,
trained toward the gallery embeddings with the configured compatibility loss.
``one_shot`` is the second: every candidate is a member of one trained supernet
(:mod:`nas.supernet`), scored on val with its inherited weights in seconds; the best few
are then fine-tuned (:class:`FineTuneInherited`, the trials :meth:`Evaluator.follow_up`
asks for) from those weights, from the gallery model's own pruned weights, or from both,
and scored on query.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import optuna
import torch

from nas.config import ExperimentConfig
from nas.data import StreamingImages
from nas.errors import ConfigError
from nas.metrics import compatibility_ratios
from nas.registry import Registry
from nas.scoring import embed, score_part
from nas.records import State, trial_records
from nas.search.context import Context, Log
from nas.supernet import fine_tune_starts, frozen_batch_norm, gallery_supernet, open_supernet, recalibrated, rooted, supernet_key
from search_spaces import Architecture, EmbeddingHead, PrunedQueryNet, Pruning, QueryNet, Root, RootedSupernet, Supernet, build
from trainers import EpochResult, train_compatible

if TYPE_CHECKING:
    from nas.tracking import Tracker

__all__ = [
    "Evaluation", "Evaluator", "TrainFromScratch", "FineTunePruned", "OneShot", "FineTuneInherited", "EVALUATORS", "create_evaluator",
    "build_seeded",
    "Paragon", "EpochCallback",
]

#: The gallery model's own scores per part (``{"query": {...}, "val": {...}}``).
Paragon = dict[str, dict[str, float]]
#: Called after every training epoch with the epoch's result and the val metrics; may raise ``optuna.TrialPruned``.
EpochCallback = Callable[[EpochResult, dict[str, float]], None]


@dataclass
class Evaluation:
    """A scored candidate.

    ``metrics``: the val and query metrics (``val_*``, ``query_*``), their paragon ratios
    (``*_ratio``) and ``train_seconds``. ``inherited``: the scores are those of weights
    taken from elsewhere (a supernet), not of a training of this candidate.
    """

    model: QueryNet
    metrics: dict[str, float]
    inherited: bool = False


class Evaluator(abc.ABC):
    """Turns an architecture into a scored query network for one study (see the module docstring)."""

    name: str = ""

    def __init__(self, ctx: Context, paragon: Paragon) -> None:
        self.ctx = ctx
        self.paragon = paragon

    @abc.abstractmethod
    def build(self, arch: Architecture, seed: int) -> QueryNet:
        """The candidate's module, before evaluation (its budgets are measured on it)."""

    @abc.abstractmethod
    def evaluate(
        self, model: QueryNet, seed: int, on_epoch: EpochCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Evaluation:
        """Train (as the strategy says) and score ``model``; deterministic for a given ``seed`` on one device.

        ``should_stop`` is polled between training steps; when it returns true the
        evaluator raises ``KeyboardInterrupt`` (a deferred Ctrl-C).
        """

    # ------------------------------------------------------------------ strategy hooks (defaults: none needed)
    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        """Refuse, before any data is loaded, a config this strategy cannot run (a :class:`ConfigError`)."""

    def prepare(self, log: Log = print, tracker: Tracker | None = None, parent: str | None = None, study_name: str = "",
                should_stop: Callable[[], bool] | None = None, train: bool = True) -> None:
        """What the strategy needs before the first candidate (the one-shot strategy: its trained supernet)."""

    def for_trial(self, fine_tune_of: int | None) -> Evaluator:
        """The evaluator of a trial; ``fine_tune_of``: the trial is a follow-up fine-tuning of that trial's network."""
        return self

    def follow_up(self, study: optuna.Study) -> list[tuple[str, int]]:
        """Trials to add once the search reached its goal: ``(architecture string, fine_tune_of)`` pairs."""
        return []

    # ------------------------------------------------------------------ shared by evaluators
    def score(self, model: QueryNet, part: str) -> dict[str, float]:
        """Asymmetric scores of ``model`` on ``part`` (``val`` or ``query``) against the gallery index."""
        ctx = self.ctx
        model.to(ctx.device)
        emb = embed(
            model, ctx.data.images, model.arch.resolution, ctx.preprocessing, indices=getattr(ctx.split, part), device=ctx.device, workers=ctx.workers
        )
        return score_part(ctx.retrieval, part, emb, ctx.embeddings)

    def train_and_score(
        self, model: QueryNet, seed: int, epochs: int, lr: float, on_epoch: EpochCallback | None, should_stop: Callable[[], bool] | None,
        desc: str, freeze_bn: bool = False,
    ) -> dict[str, float]:
        """Train ``model`` (as it is) ``epochs`` epochs at ``lr`` with the study's training settings, val scores after every
        epoch passed to ``on_epoch``; then score query. The :meth:`final_metrics` of the result. ``freeze_bn``: see
        :func:`trainers.train_compatible`."""
        ctx, tc = self.ctx, self.ctx.config.train
        transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(model.arch.resolution, ctx.augmentation)
        images = StreamingImages(ctx.training.source, ctx.training.indices, transform, tc.batch_size, seed, ctx.workers, desc=desc,
                                 for_gpu=ctx.device.type == "cuda")
        start = time.perf_counter()
        last_val: dict[str, float] = {}

        def after_epoch(result: EpochResult) -> None:
            nonlocal last_val
            last_val = self.score(model, "val")
            if on_epoch is not None:
                on_epoch(result, last_val)
            ctx.threads.resize()  # for the next epoch: the cores other jobs leave free now

        ctx.threads.resize()
        train_compatible(
            model, images, ctx.targets, ctx.loss, epochs=epochs, batch_size=tc.batch_size, optimizer=tc.optimizer, lr=lr,
            weight_decay=tc.weight_decay, momentum=tc.momentum, schedule=tc.schedule, device=ctx.device, seed=seed,
            on_epoch=after_epoch, should_stop=should_stop, freeze_bn=freeze_bn, speed=ctx.speed, average_decay=tc.average_decay,
        )
        train_seconds = time.perf_counter() - start
        return self.final_metrics(last_val, self.score(model, "query"), train_seconds)

    def final_metrics(self, val: dict[str, float], query: dict[str, float], train_seconds: float) -> dict[str, float]:
        """The stored metrics of a candidate: ``val_*``, ``query_*`` and their ratios to the paragon."""
        return {
            **{f"val_{k}": v for k, v in val.items() if k not in ("queries", "skipped")},
            **{f"query_{k}": v for k, v in query.items() if k not in ("queries", "skipped")},
            **{f"query_{k}": v for k, v in compatibility_ratios(query, self.paragon["query"]).items()},
            "val_mAP_ratio": val["mAP"] / self.paragon["val"]["mAP"],
            "train_seconds": train_seconds,
        }


#: ``search.strategy``: evaluator classes by name.
EVALUATORS: Registry[type[Evaluator]] = Registry("search.strategy")


def create_evaluator(ctx: Context, paragon: Paragon) -> Evaluator:
    """The evaluator ``ctx.config.search.strategy`` names."""
    return EVALUATORS.get(ctx.config.search.strategy)(ctx, paragon)


def build_seeded(arch: Architecture, seed: int) -> QueryNet:
    """Build ``arch`` with weights initialised from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(arch)


@EVALUATORS.register("train_from_scratch")
class TrainFromScratch(Evaluator):
    """Random weights from the seed, trained ``train.epochs`` epochs toward the gallery embeddings.

    After every epoch the val images are scored against the gallery index and passed to
    ``on_epoch``; after training the query images are scored.
    """

    name = "train_from_scratch"

    def build(self, arch: Architecture, seed: int) -> QueryNet:
        return build_seeded(arch, seed)

    def evaluate(
        self, model: QueryNet, seed: int, on_epoch: EpochCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Evaluation:
        tc = self.ctx.config.train
        return Evaluation(model, self.train_and_score(model, seed, tc.epochs, tc.lr, on_epoch, should_stop, "training"))


@EVALUATORS.register("fine_tune_pruned")
class FineTunePruned(Evaluator):
    """A structured pruning of the gallery model (the ``pruned`` space) with the gallery's own weights, fine-tuned
    ``train.epochs`` epochs toward the gallery embeddings, batch-norm statistics kept (the gallery's), scored like a
    trial of ``train_from_scratch``.

    The embedding layer starts as the gallery's projection restricted to the kept feature channels (or, for a
    gallery that embeds its pooled features, the selection of them), so the unpruned member starts as the gallery
    model itself.
    """

    name = "fine_tune_pruned"

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.space.name != "pruned":
            raise ConfigError(
                f"search.strategy fine_tune_pruned fine-tunes prunings of the gallery model: it needs space.name 'pruned', but "
                f"space {config.space.name!r} is configured."
            )

    def __init__(self, ctx: Context, paragon: Paragon) -> None:
        super().__init__(ctx, paragon)
        self.root: Root | None = None

    def build(self, arch: Architecture, seed: int) -> QueryNet:
        gallery = self.ctx.gallery
        if arch.timm_model != gallery.model_name or not arch.pruning:
            raise ConfigError(f"{arch.to_string()} is not a pruning of the gallery model {gallery.model_name}.")
        if self.root is None:
            self.root = Root(gallery.backbone, gallery.in_chans)
        backbone, kept = self.root.pruned(Pruning.from_text(arch.pruning, arch.resolution))
        net = PrunedQueryNet(arch, backbone)
        with torch.no_grad():
            if not isinstance(net.embed, EmbeddingHead):  # no embedding layer: its pooled features are all of the gallery's
                return net.eval()
            if isinstance(gallery.proj, EmbeddingHead):
                net.embed.weight.copy_(gallery.proj.weight[:, kept])
                net.embed.bias.copy_(gallery.proj.bias)
            else:  # the gallery embeds its pooled features: select the kept ones into their places
                net.embed.weight.zero_()
                net.embed.weight[kept, torch.arange(len(kept))] = 1.0
                net.embed.bias.zero_()
        return net.eval()

    def evaluate(
        self, model: QueryNet, seed: int, on_epoch: EpochCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Evaluation:
        tc = self.ctx.config.train
        return Evaluation(model, self.train_and_score(model, seed, tc.epochs, tc.lr, on_epoch, should_stop, "fine-tuning", freeze_bn=True))


@EVALUATORS.register("one_shot")
class OneShot(Evaluator):
    """A member of the trained supernet with inherited weights, recalibrated and scored on val (``supernet.score``: or
    those weights after a short fine-tune, or the gallery model's own weights pruned to it).

    :meth:`prepare` loads the supernet of the study's setting or trains it (an MLflow child
    run of the study, role ``supernet``). :meth:`follow_up` asks for the fine-tuning of the
    ``supernet.fine_tune_best`` best inherited trials.
    """

    name = "one_shot"
    #: The spaces a supernet can hold: MBConv blocks, and the prunings of any supported timm model (`pruned`).
    SPACES = ("mobilenet", "efficientnet", "gallery", "pruned")

    @classmethod
    def check_config(cls, config: ExperimentConfig) -> None:
        if config.space.name not in cls.SPACES:
            raise ConfigError(
                f"search.strategy one_shot needs a space a supernet can hold ({', '.join(cls.SPACES)}), but space "
                f"{config.space.name!r} is configured; use one of those or search.strategy: train_from_scratch."
            )

    def __init__(self, ctx: Context, paragon: Paragon) -> None:
        super().__init__(ctx, paragon)
        self.supernet: Supernet | None = None
        self._gallery_supernet: Supernet | RootedSupernet | None = None

    def prepare(self, log: Log = print, tracker: Tracker | None = None, parent: str | None = None, study_name: str = "",
                should_stop: Callable[[], bool] | None = None, train: bool = True) -> None:
        if self.supernet is not None:
            return
        fine_tune_starts(self.ctx)  # a start this space cannot give is refused before the supernet's training
        if self.ctx.config.supernet.score == "gallery" and not rooted(self.ctx):
            raise ConfigError(f"supernet.score 'gallery' scores candidates with the gallery model's own pruned weights, but the supernet over "
                              f"the {self.ctx.config.space.name!r} space is not rooted in the gallery model; use 'inherited' or 'tuned'.")
        run_id = None
        if tracker is not None and parent is not None and train:
            # called under the supernet lock: a supernet run still RUNNING belongs to a process that was killed
            tracker.close_stale_steps(parent, "supernet", "the process training the supernet stopped without closing its run (killed); "
                                                          "a later run resumed from its last epoch's checkpoint")
            run_id = tracker.start_baseline(parent, study_name, supernet_key(self.ctx), role="supernet")

        def on_epoch(row: dict[str, float]) -> None:
            if run_id is not None:
                tracker.log(run_id, metrics={k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

        try:
            self.supernet, info = open_supernet(self.ctx, log, train=train, on_epoch=on_epoch, should_stop=should_stop)
        except KeyboardInterrupt:
            if run_id is not None:
                tracker.end_trial(run_id, State.INTERRUPTED.value, "interrupted (Ctrl-C); the next run resumes from the last epoch's checkpoint")
            raise
        except Exception as exc:
            if run_id is not None:
                tracker.end_trial(run_id, State.FAILED.value, f"{type(exc).__name__}: {exc}")
            raise
        if run_id is not None:
            tracker.log(run_id, params={"key": info.key, "rooted": info.rooted, "largest": info.largest, "epochs": info.epochs},
                        tags={"asymnas.supernet.rooted": str(info.rooted).lower()})
            tracker.end_trial(run_id, State.COMPLETE.value, None, {"supernet_seconds": info.seconds})

    def _supernet(self) -> Supernet:
        if self.supernet is None:
            raise RuntimeError("OneShot.prepare() must run before candidates are built.")
        return self.supernet

    def build(self, arch: Architecture, seed: int) -> QueryNet:
        return self._supernet().extract(arch)

    def gallery_start(self, arch: Architecture) -> tuple[QueryNet, float, bool]:
        """The gallery model's own weights pruned to ``arch``, with the gallery's batch-norm statistics (sliced; then kept
        through fine-tuning) or statistics recalibrated on training images (then trained as configured). The network,
        its val mAP, and whether it keeps the gallery's statistics.

        The unpruned gallery model (at any resolution) keeps them: fine-tuned with them it ends far above the recalibrated
        start even where that start scores higher before fine-tuning (README, CUB-100 "Three budgets, two gallery
        models": 0.166 against 0.110 query mAP at 32 px). A pruning takes the statistics whose val mAP is higher."""
        if self._gallery_supernet is None:
            self._gallery_supernet = gallery_supernet(self.ctx)
        if self._gallery_supernet is None:  # prepare and fine_tune_starts refuse this before
            raise ConfigError("The gallery model's pruned weights need a supernet rooted in the gallery model.")
        kept = self._gallery_supernet.extract(arch)
        kept_map = self.score(kept, "val")["mAP"]
        if arch == self.ctx.space.extreme(smallest=False, resolution=arch.resolution):
            return kept, kept_map, True
        recal = recalibrated(self.ctx, self._gallery_supernet.extract(arch), force=True)
        recal_map = self.score(recal, "val")["mAP"]
        return (kept, kept_map, True) if kept_map >= recal_map else (recal, recal_map, False)

    def short_tune(self, model: QueryNet, seed: int, should_stop: Callable[[], bool] | None) -> None:
        """``model`` trained in place for one pass over ``supernet.score_images`` training images (a subset seeded by ``seed``;
        null: all of them) at the fine-tuning's learning rate, with the study's loss and settings."""
        ctx, tc, sc = self.ctx, self.ctx.config.train, self.ctx.config.supernet
        indices, targets = np.asarray(ctx.training.indices), ctx.targets
        if sc.score_images is not None and sc.score_images < len(indices):
            keep = np.sort(np.random.default_rng(seed).permutation(len(indices))[: sc.score_images])
            indices, targets = indices[keep], replace(targets, targets=targets.targets[keep], labels=targets.labels[keep])
        transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(model.arch.resolution, ctx.augmentation)
        images = StreamingImages(ctx.training.source, indices, transform, tc.batch_size, seed, ctx.workers, for_gpu=ctx.device.type == "cuda")
        train_compatible(
            model, images, targets, ctx.loss, epochs=1, batch_size=tc.batch_size, optimizer=tc.optimizer, lr=sc.fine_tune_lr or tc.lr,
            weight_decay=tc.weight_decay, momentum=tc.momentum, schedule=tc.schedule, device=ctx.device, seed=seed,
            should_stop=should_stop, freeze_bn=frozen_batch_norm(ctx), speed=ctx.speed,
        )

    def evaluate(
        self, model: QueryNet, seed: int, on_epoch: EpochCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Evaluation:
        """The candidate's val scores with the weights ``supernet.score`` names; ``inherited_val_mAP`` beside them for ``tuned``."""
        start = time.perf_counter()
        extra: dict[str, float] = {}
        score = self.ctx.config.supernet.score
        if score == "gallery":
            model, _, kept_bn = self.gallery_start(model.arch)
            extra["gallery_start_kept_bn"] = float(kept_bn)
        else:
            recalibrated(self.ctx, model)
        if score == "tuned":
            extra["inherited_val_mAP"] = self.score(model, "val")["mAP"]
            tuning = time.perf_counter()
            self.short_tune(model, seed, should_stop)
            extra["train_seconds"] = time.perf_counter() - tuning
        val = self.score(model, "val")
        metrics = {
            **{f"val_{k}": v for k, v in val.items() if k not in ("queries", "skipped")},
            "val_mAP_ratio": val["mAP"] / self.paragon["val"]["mAP"],
            "train_seconds": 0.0,
            **extra,
            "inherited_seconds": time.perf_counter() - start,
        }
        return Evaluation(model, metrics, inherited=True)

    def for_trial(self, fine_tune_of: int | None) -> Evaluator:
        return self if fine_tune_of is None else FineTuneInherited(self)

    def follow_up(self, study: optuna.Study) -> list[tuple[str, int]]:
        records = trial_records(study)
        taken = {r.fine_tune_of for r in records if r.fine_tune_of is not None}
        inherited = sorted(
            (r for r in records if r.state == State.INHERITED and r.feasible and r.values), key=lambda r: (-r.values[0], r.number)
        )
        best = inherited[: self.ctx.config.supernet.fine_tune_best]
        return [(r.arch, r.number) for r in best if r.number not in taken and r.arch]


class FineTuneInherited(Evaluator):
    """A chosen supernet member fine-tuned ``supernet.fine_tune_epochs`` epochs toward the gallery embeddings (like a trial
    of ``train_from_scratch``) and scored on val and query, from the weights ``supernet.fine_tune_from`` names
    (:func:`nas.supernet.fine_tune_starts`): its inherited weights, the gallery model's own weights pruned to it, or each
    of them in turn, the one with the higher val mAP after fine-tuning kept (the choice sees val only, never query).
    The inherited weights' batch-norm statistics are recalibrated before fine-tuning, or the root's kept
    (``supernet.batch_norm``); the gallery's pruned weights keep the gallery's statistics through fine-tuning or are
    recalibrated, whichever scores the higher val mAP before it (a member at a low resolution or with cut widths sees
    other statistics than the gallery model at its own resolution; which serves better is measured per member).

    Metrics beside the kept network's own: ``inherited_val_mAP`` (the inherited weights' val mAP before fine-tuning),
    ``fine_tuned_from_gallery`` (1 when the kept network started from the gallery's weights, else 0),
    ``gallery_start_kept_bn`` (1 when the gallery start kept the gallery's statistics) and, per start
    ``S`` fine-tuned, ``start_S_val_mAP`` (before), ``from_S_val_mAP`` and ``from_S_query_mAP`` (after);
    ``train_seconds`` counts every start. With two starts the run's per-epoch ``val_mAP`` holds the first start's
    epochs, then the second's, numbered on.
    """

    name = "one_shot_fine_tune"

    def __init__(self, parent: OneShot) -> None:
        super().__init__(parent.ctx, parent.paragon)
        self.parent = parent

    def build(self, arch: Architecture, seed: int) -> QueryNet:
        return self.parent.build(arch, seed)

    def evaluate(
        self, model: QueryNet, seed: int, on_epoch: EpochCallback | None = None, should_stop: Callable[[], bool] | None = None
    ) -> Evaluation:
        ctx, tc, sc = self.ctx, self.ctx.config.train, self.ctx.config.supernet
        epochs = sc.fine_tune_epochs or tc.epochs
        recalibrated(ctx, model)
        inherited = self.score(model, "val")["mAP"]
        results: dict[str, tuple[QueryNet, float, dict[str, float]]] = {}
        gallery_bn = None
        for k, start in enumerate(fine_tune_starts(ctx)):
            net, before, freeze = model, inherited, frozen_batch_norm(ctx)
            if start == "gallery":
                net, before, gallery_bn = self.parent.gallery_start(model.arch)
                freeze = freeze or gallery_bn
            numbered_on = None if on_epoch is None else (
                lambda result, val, k=k: on_epoch(replace(result, epoch=result.epoch + k * epochs), val))
            metrics = self.train_and_score(net, seed, epochs, sc.fine_tune_lr or tc.lr, numbered_on, should_stop,
                                           f"fine-tuning from the {start}'s weights", freeze)
            results[start] = (net, before, metrics)
        chosen = max(results, key=lambda start: results[start][2]["val_mAP"])
        net, _, kept = results[chosen]
        metrics = {**kept, "inherited_val_mAP": inherited, "fine_tuned_from_gallery": float(chosen == "gallery"),
                   "train_seconds": sum(m["train_seconds"] for _, _, m in results.values())}
        if gallery_bn is not None:
            metrics["gallery_start_kept_bn"] = float(gallery_bn)
        for start, (_, before, m) in results.items():
            metrics.update({f"start_{start}_val_mAP": before, f"from_{start}_val_mAP": m["val_mAP"], f"from_{start}_query_mAP": m["query_mAP"]})
        return Evaluation(net, metrics)
