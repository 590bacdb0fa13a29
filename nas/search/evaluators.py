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
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nas.data import StreamingImages
from nas.metrics import compatibility_ratios
from nas.registry import Registry
from nas.scoring import embed, score_part
from nas.search.context import Context
from search_spaces import Architecture, QueryNet, build
from trainers import EpochResult, train_compatible

__all__ = ["Evaluation", "Evaluator", "TrainFromScratch", "EVALUATORS", "create_evaluator", "build_seeded", "Paragon", "EpochCallback"]

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

    # ------------------------------------------------------------------ shared by evaluators
    def score(self, model: QueryNet, part: str) -> dict[str, float]:
        """Asymmetric scores of ``model`` on ``part`` (``val`` or ``query``) against the gallery index."""
        ctx = self.ctx
        model.to(ctx.device)
        emb = embed(
            model, ctx.data.images, model.arch.resolution, ctx.preprocessing, indices=getattr(ctx.split, part), device=ctx.device, workers=ctx.workers
        )
        return score_part(ctx.retrieval, part, emb, ctx.embeddings)

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
        ctx, tc = self.ctx, self.ctx.config.train
        transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(model.arch.resolution, ctx.augmentation)
        images = StreamingImages(ctx.data.images, ctx.split.train, transform, tc.batch_size, seed, ctx.workers, desc="training")
        start = time.perf_counter()
        last_val: dict[str, float] = {}

        def after_epoch(result: EpochResult) -> None:
            nonlocal last_val
            last_val = self.score(model, "val")
            if on_epoch is not None:
                on_epoch(result, last_val)

        train_compatible(
            model,
            images,
            ctx.targets,
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
            should_stop=should_stop,
        )
        train_seconds = time.perf_counter() - start
        return Evaluation(model, self.final_metrics(last_val, self.score(model, "query"), train_seconds))
