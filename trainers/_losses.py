"""Registered compatibility losses."""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainers._base import CompatibilityLoss, GalleryTargets

__all__ = [
    "RegressionLoss",
    "ContrastiveLoss",
    "BackwardCompatibleLoss",
    "ContextualSimilarityLoss",
    "RelationalLoss",
    "WeightedSum",
    "register_loss",
    "create_loss",
    "create_loss_from_config",
    "list_losses",
]

_LOSSES: dict[str, type[CompatibilityLoss]] = {}


def register_loss(name: str) -> Callable[[type[CompatibilityLoss]], type[CompatibilityLoss]]:
    """Class decorator: make a :class:`CompatibilityLoss` available as ``name``."""

    def decorator(cls: type[CompatibilityLoss]) -> type[CompatibilityLoss]:
        cls.name = name
        _LOSSES[name] = cls
        return cls

    return decorator


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **options: Any) -> CompatibilityLoss:
    """Instantiate loss ``name``; unknown names and options are a ``ValueError`` listing the valid ones."""
    if name not in _LOSSES:
        close = difflib.get_close_matches(name, list(_LOSSES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown compatibility loss {name!r}.{hint} Valid losses: {', '.join(list_losses())}.")
    cls = _LOSSES[name]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    valid = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self" and p.kind not in variadic]
    for key in options:
        if key not in valid:
            raise ValueError(f"Unknown option {key!r} for loss {name!r}. Valid options: {', '.join(valid) or 'none'}.")
    return cls(**options)


@register_loss("regression")
class RegressionLoss(CompatibilityLoss):
    """Pull the query embedding of an image onto the gallery embedding of the same image.

    ``distance='l2'``: mean squared Euclidean distance; ``'cosine'``: mean ``1 - cos``.
    For L2-normalised embeddings the two differ by a factor of 2. This is the
    "regression" of asymmetric metric learning (Budnik & Avrithis, CVPR 2021).
    """

    def __init__(self, distance: str = "l2") -> None:
        super().__init__()
        if distance not in ("l2", "cosine"):
            raise ValueError(f"regression distance must be 'l2' or 'cosine', but got {distance!r}.")
        self.distance = distance

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        if self.distance == "l2":
            return (query - target).pow(2).sum(1).mean()
        return (1.0 - (query * target).sum(1)).mean()


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(len(a), len(b))`` squared Euclidean distances, clamped at 0 against rounding."""
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.t()).clamp(min=0.0)


@register_loss("contrastive")
class ContrastiveLoss(CompatibilityLoss):
    """The asymmetric contrastive loss of asymmetric metric learning: query anchors against gallery examples.

    Budnik & Avrithis, "Asymmetric metric learning for knowledge transfer", CVPR 2021
    (arXiv:2006.16331; code github.com/budnikm/aml, ``contrastive_loss``). Each query
    embedding ``q_i`` of the batch is an anchor; the gallery embeddings ``t_j`` of the batch,
    its own image's included, are its positives (same label) and negatives (other label).
    With ``d_ij = ||q_i - t_j||`` a pair costs ``0.5 * d_ij^2`` when positive and
    ``0.5 * max(0, margin - d_ij)^2`` when negative; the loss is the mean over all ``B*B``
    pairs. The anchor's own gallery embedding is always a positive, so the regression term
    is part of the loss. ``margin`` defaults to 0.7, the paper code's default for
    L2-normalised embeddings (distances lie in [0, 2]).
    """

    needs_labels = True

    def __init__(self, margin: float = 0.7) -> None:
        super().__init__()
        if not 0.0 < margin <= 2.0:
            raise ValueError(f"contrastive margin must be in (0, 2] for unit-length embeddings, but got {margin}.")
        self.margin = float(margin)

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        squared = _squared_distances(query, target)
        positive = labels[:, None] == labels[None, :]
        # the gradient of sqrt is infinite at 0: clamp before taking it (positives use the square)
        distance = squared.clamp(min=1e-12).sqrt()
        cost = torch.where(positive, 0.5 * squared, 0.5 * (self.margin - distance).clamp(min=0.0).pow(2))
        return cost.mean()


@register_loss("bct")
class BackwardCompatibleLoss(CompatibilityLoss):
    """The influence loss of backward-compatible training: classify query embeddings with the gallery's frozen classifier.

    Shen, Xiong, Xia & Soatto, "Towards Backward-Compatible Representation Learning",
    CVPR 2020: the new (here: query) model is trained with the old (gallery) model's
    classifier, kept fixed, so that its embeddings fall in the old model's class regions.
    The gallery model of this project is trained with a cosine classifier (normalised
    softmax, :func:`nas.gallery.train_gallery`), so the logits are
    ``scale * q @ normalize(W).T`` with the gallery's own training scale, and the loss is
    their cross-entropy with the labels. ``scale`` overrides the bound
    ``GalleryTargets.classifier_scale``. Needs ``GalleryTargets.classifier``: :meth:`bind`
    raises ``ValueError`` without one.
    """

    needs_labels = True

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and not scale > 0:
            raise ValueError(f"bct scale must be > 0, but got {scale}.")
        self.scale = scale
        self._logit_scale: float | None = None
        self.register_buffer("classifier", None, persistent=False)

    def bind(self, targets: GalleryTargets) -> None:
        classifier, embeddings, labels = targets.classifier, targets.targets, targets.labels
        if classifier is None:
            raise ValueError(
                "The 'bct' loss needs the gallery model's classifier, but this gallery checkpoint has none "
                "(only a gallery trained by 'nas gallery train' has one). Choose another train.loss "
                "(regression, contrastive or csd need no classifier), or point gallery.checkpoint at a gallery "
                "model trained with its classifier."
            )
        if classifier.ndim != 2 or classifier.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"The gallery classifier must be (num_classes, {embeddings.shape[1]}) to classify {embeddings.shape[1]}-d "
                f"embeddings, but got {tuple(classifier.shape)}."
            )
        if len(labels) and int(labels.max()) >= classifier.shape[0]:
            raise ValueError(
                f"The gallery classifier has {classifier.shape[0]} classes, but the training labels go up to "
                f"{int(labels.max())}: the gallery was trained on other classes."
            )
        logit_scale = self.scale if self.scale is not None else targets.classifier_scale
        if logit_scale is None or not logit_scale > 0:
            raise ValueError(f"The 'bct' loss needs the gallery classifier's logit scale (> 0), but got {logit_scale}.")
        self._logit_scale = float(logit_scale)
        self.classifier = F.normalize(classifier.detach().float(), dim=1).to(embeddings.device)

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        if self.classifier is None or self._logit_scale is None:
            raise RuntimeError("The 'bct' loss has no gallery classifier yet: call bind(GalleryTargets(targets, labels, classifier, scale)) first.")
        if query.shape[1] != self.classifier.shape[1]:
            raise ValueError(f"Loss 'bct': embeddings are {query.shape[1]}-d but the gallery classifier is {self.classifier.shape[1]}-d.")
        return F.cross_entropy(self._logit_scale * query @ self.classifier.t(), labels)


@register_loss("csd")
class ContextualSimilarityLoss(CompatibilityLoss):
    """Contextual similarity distillation: match each image's similarity distribution over its gallery-space neighbours.

    Wu, Wang, Zhou, Li & Tian, "Contextual Similarity Distillation for Asymmetric Image
    Retrieval", CVPR 2022. The anchor bank is the gallery model's embeddings of all
    training images (``GalleryTargets.targets``, given to :meth:`bind`). For each image
    of the batch, its ``k`` nearest neighbours in the bank by the *gallery* embedding ``t``
    are found (the image itself, at similarity 1, is the first of them: this is what makes
    the constraint preserve the feature vector as well as the ranking). The gallery distribution is
    ``softmax(t . a_j / temperature)`` over those neighbours ``a_j``, the query distribution
    ``softmax(q . a_j / temperature)`` over the same ones, and the loss is
    ``KL(gallery || query)`` averaged over the batch. No labels are used.

    ``k`` (capped at the bank size) must be well above the number of training images of
    one class: when all neighbours share the image's class, their distribution no longer
    says where the query lies relative to the other classes. On the digits test
    (~1,080 training images, 10 classes) k = 16 or 64 left the asymmetric mAP at or below
    the untrained net's, k = 512 gave 0.65 and the whole bank 0.79. ``temperature`` 0.1
    did better there than 0.05 or 0.02. Both are worth tuning per data set.
    """

    def __init__(self, k: int = 4096, temperature: float = 0.1) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise ValueError(f"csd k must be an integer >= 2, but got {k!r}.")
        if not temperature > 0:
            raise ValueError(f"csd temperature must be > 0, but got {temperature}.")
        self.k = k
        self.temperature = float(temperature)
        self.register_buffer("bank", None, persistent=False)

    def bind(self, targets: GalleryTargets) -> None:
        bank = targets.targets
        if bank.ndim != 2 or len(bank) < 2:
            raise ValueError(f"The 'csd' anchor bank must be (N >= 2, dim) training embeddings, but got {tuple(bank.shape)}.")
        self.bank = F.normalize(bank.detach().float(), dim=1)

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        if self.bank is None:
            raise RuntimeError("The 'csd' loss has no anchor bank yet: call bind(GalleryTargets(targets, labels)) with the training targets first.")
        if query.shape[1] != self.bank.shape[1]:
            raise ValueError(f"Loss 'csd': embeddings are {query.shape[1]}-d but the anchor bank is {self.bank.shape[1]}-d.")
        with torch.no_grad():
            gallery_sim, neighbours = (target @ self.bank.t()).topk(min(self.k, len(self.bank)), dim=1)
        query_sim = (query @ self.bank.t()).gather(1, neighbours)
        gallery_p = F.softmax(gallery_sim / self.temperature, dim=1)
        return F.kl_div(F.log_softmax(query_sim / self.temperature, dim=1), gallery_p, reduction="batchmean")


@register_loss("relational")
class RelationalLoss(CompatibilityLoss):
    """Relation-only distillation: match the batch's pairwise cosine similarities, nothing absolute.

    In the spirit of relational knowledge distillation (Park, Kim, Lu & Cho, "Relational
    Knowledge Distillation", CVPR 2019), without its distance normalisation or angles: the
    mean over pairs ``i != j`` of ``(q_i . q_j - t_i . t_j)^2``. Any rotation of the query
    space leaves it unchanged, so it aligns the *structure* of the two spaces but not the
    spaces themselves: a control for asymmetric retrieval, where the query embedding is
    compared with the gallery embeddings directly (relation-only losses give near-zero
    asymmetric mAP; Xie et al., "D3still", CVPR 2024). Needs a batch of at least 2.
    """

    def __init__(self) -> None:
        super().__init__()

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        n = len(query)
        if n < 2:
            return (query * 0.0).sum()
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=query.device)
        return (query @ query.t() - target @ target.t())[off_diagonal].pow(2).mean()


class WeightedSum(CompatibilityLoss):
    """``sum_i weight_i * loss_i(query, target, labels)``; :meth:`bind` binds every term.

    ``name`` reads like ``1*regression + 0.5*contrastive``. Built from a config by
    :func:`create_loss_from_config`; not in the registry.
    """

    def __init__(self, terms: Sequence[tuple[float, CompatibilityLoss]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("A weighted sum of losses needs at least one loss, but got none.")
        for weight, loss in terms:
            if not isinstance(loss, CompatibilityLoss):
                raise ValueError(f"Every term of a weighted sum must be a CompatibilityLoss, but got {type(loss).__name__}.")
            if not (isinstance(weight, numbers.Real) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"The weight of loss {loss.name!r} must be a finite number > 0, but got {weight!r}.")
        self.weights = [float(w) for w, _ in terms]
        self.losses = nn.ModuleList(loss for _, loss in terms)
        self.name = " + ".join(f"{w:g}*{loss.name}" for w, loss in zip(self.weights, self.losses))
        self.needs_labels = any(loss.needs_labels for loss in self.losses)

    def bind(self, targets: GalleryTargets) -> None:
        for loss in self.losses:
            loss.bind(targets)

    def forward(self, query: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_batch(query, target, labels)
        total = query.new_zeros(())
        for weight, loss in zip(self.weights, self.losses):
            total = total + weight * loss(query, target, labels)
        return total


def create_loss_from_config(loss: str | Mapping[str, float], options: Mapping[str, Any] | None = None) -> CompatibilityLoss:
    """The loss a ``train`` section describes.

    ``loss`` is a registered name, with ``options`` its keyword arguments
    (``loss: regression``, ``loss_options: {distance: cosine}``); or a mapping
    ``{name: weight}`` of weights > 0, with ``options`` mapping some of those names to their
    keyword arguments (``loss: {regression: 1.0, contrastive: 0.5}``,
    ``loss_options: {contrastive: {margin: 0.5}}``), which gives a :class:`WeightedSum`.
    Anything else is a ``ValueError`` that names the bad key.
    """
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ValueError(f"loss_options must be a mapping, but got {options!r}.")
    if isinstance(loss, str):
        return create_loss(loss, **options)
    if not isinstance(loss, Mapping) or not loss:
        raise ValueError(f"loss must be a loss name or a non-empty mapping {{loss name: weight}}, but got {loss!r}.")
    names = [str(name) for name in loss]
    for key, value in options.items():
        if key not in loss:
            raise ValueError(
                f"loss_options has an entry {key!r}, which is not one of the weighted losses ({', '.join(names)}); "
                f"with a mapping of losses, loss_options maps a loss name to that loss's options."
            )
        if not isinstance(value, Mapping):
            raise ValueError(f"loss_options[{key!r}] must be a mapping of that loss's options, but got {value!r}.")
    terms = []
    for name, weight in loss.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"The weight of loss {name!r} must be a finite number > 0, but got {weight!r}.")
        terms.append((float(weight), create_loss(name, **options.get(name, {}))))
    return WeightedSum(terms)

