"""What every trial needs, assembled once per process: :func:`prepare` and its :class:`Context`.

``prepare`` checks what can be checked without data first (names against their
registries, budgets against the space's smallest member), then loads the data and its
split, loads or trains the gallery model, and computes (or loads from the cache) the
gallery embeddings of the training images (the targets; with ``data.unlabeled`` also of
that folder's images, :mod:`nas.training_images`) and of the gallery set (the index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nas.config import BudgetConfig, ExperimentConfig
from nas.data import Augmentation, ImageSet, Preprocessing, RetrievalData, Split, load_retrieval_data
from nas.errors import BudgetError, ConfigError
from nas.data.unlabeled import check_apart, load_unlabeled
from nas.gallery import GalleryEmbeddings, GalleryNet, gallery_embeddings, open_gallery
from nas.hardware import Budget, check_budgets, make_budgets
from nas.search.fingerprint import Fingerprint, early_parts, full_parts
from nas.study_nets import study_space
from nas.threads import ThreadSizer, chosen_threads
from nas.training_images import TrainingImages, training_images, unlabeled_embeddings
from search_spaces import SearchSpace, build
from trainers import CompatibilityLoss, GalleryTargets, Speed, create_loss_from_config, resolve_precision

__all__ = ["Context", "prepare", "ensure_gallery", "check_reachable", "resolve_device", "gallery_targets", "Log"]

Log = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)


def training_speed(config: ExperimentConfig, device: torch.device) -> Speed:
    """``train.precision`` (``auto`` resolved for ``device``), ``train.channels_last`` and ``train.compile``."""
    tc = config.train
    try:
        precision = resolve_precision(tc.precision, device)
    except ValueError as exc:
        raise ConfigError(f"train.precision: {exc}") from None
    return Speed(precision, tc.channels_last, tc.compile)


@dataclass
class Context:
    """Everything a trial needs, built once per process by :func:`prepare`."""

    config: ExperimentConfig
    retrieval: RetrievalData  # data, split and (revisited Oxford/Paris) ground truth: how parts are scored
    gallery: GalleryNet
    gallery_sha: str
    embeddings: GalleryEmbeddings
    training: TrainingImages  # what candidates train on (the split's training images, then data.unlabeled's) and their targets
    space: SearchSpace
    budgets: list[Budget]
    loss: CompatibilityLoss
    device: torch.device
    smallest: dict[str, float]  # budgets measured on the space's smallest member
    threads: ThreadSizer = field(default_factory=ThreadSizer)  # torch's threads: search.threads, or sized to the free cores
    fingerprint: Fingerprint = field(default_factory=lambda: Fingerprint({}))  # what the numbers depend on (nas.search.fingerprint)

    @property
    def data(self) -> ImageSet:
        return self.retrieval.data

    @property
    def targets(self) -> GalleryTargets:
        """What the compatibility loss is bound to: the training images' gallery embeddings, labels and more."""
        return self.training.targets

    @property
    def preprocessing(self) -> Preprocessing:
        """The gallery model's preprocessing: every candidate normalises its input the same way."""
        return self.gallery.preprocessing

    @property
    def augmentation(self) -> Augmentation:
        a = self.config.train.augment
        return Augmentation(tuple(a.crop_scale), tuple(a.crop_ratio), a.hflip)

    @property
    def workers(self) -> int | None:
        return self.config.data.workers

    @property
    def speed(self) -> Speed:
        """Precision, memory format and compilation of every training step (``train.precision`` etc., ``auto`` resolved for the device)."""
        return training_speed(self.config, self.device)

    @property
    def split(self) -> Split:
        return self.retrieval.split


def ensure_gallery(
    config: ExperimentConfig, data: ImageSet, split: Split, log: Log = print, retrain: bool = False, threads: ThreadSizer | None = None
) -> tuple[GalleryNet, str, Path | None]:
    """The configured gallery model (see :func:`nas.gallery.open_gallery`), trained under ``<out>/gallery`` if
    none is configured and none is there: the model, the SHA-256 of its weights and its checkpoint file (if any)."""
    device = resolve_device(config.train.device)
    opened = open_gallery(
        config.gallery, data, split, config.out_dir, device, seed=config.data.seed, log=log, retrain=retrain, workers=config.data.workers,
        threads=threads or ThreadSizer(chosen_threads(config.search.threads)), speed=training_speed(config, device),
    )
    assert opened is not None  # may_train: a model is always returned
    return opened


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


def gallery_targets(config: ExperimentConfig, gallery: GalleryNet, data: ImageSet, split: Split, emb: GalleryEmbeddings) -> GalleryTargets:
    """What a compatibility loss may use beyond a batch: the gallery embeddings and labels of all training
    images, and the gallery model's frozen cosine classifier with its logit scale when it has one (``bct``)."""
    classifier = None if gallery.classifier is None else gallery.classifier.detach().cpu()
    return GalleryTargets(
        targets=torch.from_numpy(emb.train),
        labels=torch.from_numpy(data.labels[split.train]),
        classifier=classifier,
        classifier_scale=config.gallery.train.scale,
    )


def resolve_budgets(config: ExperimentConfig, gallery: nn.Module, channels: int, log: Log = print) -> ExperimentConfig:
    """``config`` with every budget written relative to the gallery model (``"1/10"``) made absolute: the gallery
    model measured as candidates are (:func:`nas.hardware.check_budgets`, at ``gallery.resolution``), then scaled."""
    fractions = config.budgets.unresolved
    wanted = {name.removeprefix("max_") for name in fractions}
    meters = [b for b in make_budgets(BudgetConfig(latency=config.budgets.latency)) if b.name in wanted]
    values = check_budgets(gallery, config.gallery.resolution, channels, meters, measure_all=True).values
    budgets = config.budgets.resolved(values)
    units = {b.name: b.unit for b in meters}
    log("Budgets relative to the gallery model: " + "; ".join(
        f"{name} {getattr(config.budgets, name)} of {values[name.removeprefix('max_')]:.4g} = "
        f"{getattr(budgets, name):.4g} {units[name.removeprefix('max_')]}" for name in fractions))
    return dataclasses.replace(config, budgets=budgets)


def prepare(config: ExperimentConfig, log: Log = print, check_study: Callable[[Fingerprint], None] | None = None) -> Context:
    """Load data, split, gallery model and its cached embeddings; build space, budgets and loss.

    ``check_study`` is called with the fingerprint's parts known before the gallery model
    (data, split, loss, protocol), so a resume with changed data is refused before any gallery work."""
    threads = ThreadSizer(chosen_threads(config.search.threads))
    threads.resize()
    retrieval = load_retrieval_data(config.data)
    data, split = retrieval.data, retrieval.split
    mode = "query = gallery, own entry excluded" if split.query_is_gallery else "query and gallery disjoint"
    log(f"Data: {data.name}, {len(data.classes)} classes, {config.data.resolved_protocol} protocol ({mode}), split {split.sizes()}")
    space = study_space(config)
    try:
        loss = create_loss_from_config(config.train.loss, config.train.loss_options)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if loss.needs_labels and (data.labels[split.train] < 0).any():
        raise ConfigError(
            f"train.loss {loss.name!r} uses class labels, but the training images of {data.name} have none; "
            f"use a loss that needs no labels (regression or csd)."
        )
    unlabeled = None
    if config.data.unlabeled is not None:
        if loss.needs_labels:
            raise ConfigError(
                f"train.loss {loss.name!r} uses class labels, but data.unlabeled adds images without; use a loss that needs none "
                f"(regression, relational or csd, or a weighted sum of them), or set data.unlabeled to null."
            )
        unlabeled = load_unlabeled(config.data.unlabeled, data.channels, config.data.image_size)
        check_apart(unlabeled, data, split)  # before any gallery work
    early = early_parts(data, split, config.data.resolved_protocol, config.train.loss, config.train.loss_options, unlabeled)
    if check_study is not None:
        check_study(early)
    # a configured gallery file (checkpoint, weights) is opened first: a missing or unreadable one is the error, not a budget
    device = resolve_device(config.train.device)
    opened = open_gallery(
        config.gallery, data, split, config.out_dir, device, seed=config.data.seed, log=log, may_train=False, workers=config.data.workers,
        threads=threads, speed=training_speed(config, device),
    )
    if not config.budgets.unresolved:
        smallest = check_reachable(space, make_budgets(config.budgets))  # before any gallery training: fail fast
    gallery, sha, _ = opened or ensure_gallery(config, data, split, log, threads=threads)
    if config.budgets.unresolved:  # limits written as a fraction of the gallery model's own figures
        config = resolve_budgets(config, gallery, data.channels, log)
        smallest = check_reachable(space, make_budgets(config.budgets))
    budgets = make_budgets(config.budgets)
    log(f"Preprocessing (gallery and query side): {gallery.preprocessing.describe()}")
    if gallery.embed_dim != space.embed_dim or config.space.name == "pruned":  # the pruned space: members name its weights
        space = study_space(config, gallery.embed_dim, sha)
    emb, cached = gallery_embeddings(
        gallery, sha, data, split, config.gallery.resolution, config.cache_dir / "cache", config.gallery.batch_size, device, log,
        config.data.workers,
    )
    if cached:
        log("Gallery embeddings: loaded from cache (content hash verified)")
    training = training_images(
        data, split, gallery_targets(config, gallery, data, split, emb), unlabeled,
        lambda images: unlabeled_embeddings(gallery, sha, images, config.gallery.resolution, config.cache_dir / "cache",
                                            config.gallery.batch_size, device, log, config.data.workers), log)
    try:  # fail before any trial, e.g. the bct loss on a gallery model without a classifier
        loss.bind(training.targets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    fingerprint = full_parts(early, gallery.preprocessing, config.gallery.model, sha, config.gallery.resolution, gallery.embed_dim)
    return Context(config, retrieval, gallery, sha, emb, training, space, budgets, loss, device, smallest, threads, fingerprint)
