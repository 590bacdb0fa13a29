"""The splits of the labelled data sets, one registered entry per ``data.protocol``.

* ``same_classes``: :func:`stratified_split`, the same classes in every part;
* ``class_disjoint``: :func:`class_disjoint_split`, query and gallery hold classes never
  trained on.

A benchmark's split is defined by its files instead (:mod:`nas.data.benchmarks`,
:mod:`nas.data.revisited`). Every split here is deterministic for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from nas.data.images import Split
from nas.errors import DataError
from nas.registry import Registry

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["PROTOCOLS", "SplitFn", "stratified_split", "class_disjoint_split"]

#: A protocol's split: ``(labels, config) -> Split`` from the fractions, seed and cap of ``config``.
SplitFn = Callable[[np.ndarray, "DataConfig"], Split]

#: The protocols ``data.protocol`` may name for a labelled data set.
PROTOCOLS: Registry[SplitFn] = Registry("data.protocol")


def stratified_split(
    labels: np.ndarray, train: float, val: float, query: float, gallery: float, seed: int, max_per_class: int | None = None
) -> Split:
    """Split per class into disjoint train / val / query / gallery index sets.

    Deterministic for a given ``seed``; every class contributes the same fractions; query
    and gallery never contain training images. A class too small to give each part at
    least one image is an error.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "query": [], "gallery": []}
    fractions = {"train": train, "val": val, "query": query, "gallery": gallery}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        counts = {name: int(np.floor(frac * len(idx))) for name, frac in fractions.items()}
        if min(counts.values()) < 1:
            raise DataError(
                f"Class {cls} has {len(idx)} images, too few to give every split part (train/val/query/gallery) "
                f"at least one image with fractions {fractions}. Use a larger data set or larger fractions."
            )
        start = 0
        for name in ("train", "val", "query", "gallery"):
            parts[name].append(idx[start : start + counts[name]])
            start += counts[name]
    return Split(**{name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()})


def class_disjoint_split(
    labels: np.ndarray,
    test_classes: float,
    val_classes: float,
    query: float,
    gallery: float,
    seed: int,
    max_per_class: int | None = None,
    query_is_gallery: bool = True,
    held_out: str = "seeded",
) -> Split:
    """Split by class: train, val and the evaluation (query / gallery) classes are disjoint.

    A seeded ``test_classes`` fraction of the classes (at least two) holds the query and
    gallery images (with ``held_out="last"``: the last classes by label, i.e. by name for an
    image folder, as the CUB and Cars benchmarks hold out their second half); a seeded ``val_classes`` fraction of the remaining classes (at least
    two: with one class every neighbour is a positive) is val, searched against itself with
    each image's own entry excluded; the other classes (at least one) are train. With
    ``query_is_gallery`` every evaluation image is both a query and a gallery image (the
    metric-learning convention); otherwise each evaluation class is split query : gallery
    in the ratio ``query`` : ``gallery`` (at least one of each).
    ``max_per_class`` keeps a seeded subset of each class. Deterministic for a ``seed``.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) < 5:
        raise DataError(
            f"The class-disjoint protocol needs at least 5 classes (2 test, 2 val, 1 train), but the data set has {len(classes)}."
        )
    n_test = min(max(2, int(round(test_classes * len(classes)))), len(classes) - 3)
    n_val = min(max(2, int(round(val_classes * (len(classes) - n_test)))), len(classes) - n_test - 1)
    if held_out == "last":
        test_set = classes[len(classes) - n_test :]
        val_set = rng.permutation(classes[: len(classes) - n_test])[:n_val]
    elif held_out == "seeded":
        order = rng.permutation(classes)
        test_set, val_set = order[:n_test], order[n_test : n_test + n_val]
    else:
        raise ValueError(f"held_out must be 'seeded' or 'last', but got {held_out!r}.")
    members: dict[int, np.ndarray] = {}
    for cls in classes:
        idx = np.flatnonzero(labels == cls)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        members[int(cls)] = idx

    def gather(chosen: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([members[int(c)] for c in chosen]))

    train = gather(np.setdiff1d(classes, np.concatenate([test_set, val_set])))
    val = gather(val_set)
    if max(len(members[int(c)]) for c in val_set) < 2:
        raise DataError(
            f"The val classes {sorted(int(c) for c in val_set)} have one image each: a val image would have no positive. "
            f"Use more images per class or a larger data.val_classes."
        )
    if query_is_gallery:
        evaluation = gather(test_set)
        if max(len(members[int(c)]) for c in test_set) < 2:
            raise DataError("Every held-out class has a single image, so no query has a positive. Use more images per class.")
        return Split(train, val, evaluation, evaluation.copy(), query_is_gallery=True, val_against="val")
    share = query / (query + gallery)
    queries, galleries = [], []
    for cls in np.sort(test_set):
        idx = members[int(cls)][rng.permutation(len(members[int(cls)]))]
        if len(idx) < 2:
            raise DataError(f"Class {cls} has {len(idx)} image, too few to give both query and gallery one. Use query_is_gallery.")
        n_query = min(max(1, int(np.floor(share * len(idx)))), len(idx) - 1)
        queries.append(idx[:n_query])
        galleries.append(idx[n_query:])
    return Split(train, val, np.sort(np.concatenate(queries)), np.sort(np.concatenate(galleries)), val_against="val")


@PROTOCOLS.register("same_classes")
def _same_classes(labels: np.ndarray, config: DataConfig) -> Split:
    """:func:`stratified_split` by ``config``'s fractions; with ``query_is_gallery`` its query and
    gallery parts pooled into one evaluation set (each query's own entry excluded when scoring)."""
    split = stratified_split(labels, config.train, config.val, config.query, config.gallery, config.seed, config.max_per_class)
    if config.resolved_query_is_gallery:
        pooled = np.sort(np.concatenate([split.query, split.gallery]))
        return Split(split.train, split.val, pooled, pooled.copy(), query_is_gallery=True)
    return split


@PROTOCOLS.register("class_disjoint")
def _class_disjoint(labels: np.ndarray, config: DataConfig) -> Split:
    """:func:`class_disjoint_split` by ``config``'s class fractions, ratio, seed and cap."""
    return class_disjoint_split(
        labels, config.test_classes, config.val_classes, config.query, config.gallery, config.seed,
        config.max_per_class, config.resolved_query_is_gallery, config.held_out_classes,
    )
