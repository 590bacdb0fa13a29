"""Whether a loaded data set can be scored by retrieval at all, checked before any training.

Retrieval on one class is trivially perfect: every image retrieved is a positive, so mAP
is 1.0 whatever the model (a one-class ``image_folder`` trained with loss 0 and scored a
perfect paragon and trial). Likewise a part whose queries have no positive anywhere gives
no score at all. :func:`check_scorable` refuses such data with a :class:`~nas.errors.DataError`
naming the part and its counts; :func:`nas.data.load_retrieval_data` calls it for every
data set, so a search, ``nas gallery train`` and ``nas baseline`` stop before the gallery
model is trained.

The scored parts are those :func:`nas.scoring.score_part` scores: val (against the
gallery part, against itself, or, for data without labels, against its own gallery-model
embeddings), query (against the gallery part, by labels or by a benchmark's ground truth)
and the gallery part it is scored against. A query without a positive is skipped by the
metrics, as the benchmarks' own protocols do; only a part where *no* query has one is
refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nas.errors import DataError

if TYPE_CHECKING:
    from nas.data.registry import RetrievalData

__all__ = ["check_scorable"]

_HOW = (
    "Use data with at least two classes in every part (an image_folder needs one sub-folder of images per class, "
    "at least two; a benchmark its complete list files)."
)


def _count(rows: np.ndarray, labels: np.ndarray) -> str:
    classes = len(np.unique(labels[rows]))
    return f"{classes} class{'es' if classes != 1 else ''}, {len(rows)} image{'s' if len(rows) != 1 else ''}"


def _with_own_class(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each row, whether another row of ``rows`` has its label (a positive when each query's own entry is excluded)."""
    _, inverse, counts = np.unique(labels[rows], return_inverse=True, return_counts=True)
    return counts[inverse] >= 2


def check_scorable(retrieval: RetrievalData) -> None:
    """Raise a :class:`DataError` unless every scored part of ``retrieval`` can be scored by retrieval.

    * every part (val, query, gallery) holds at least one image;
    * every part with class labels holds at least two classes;
    * in val and in query, at least one image has a positive: an image of its class in what
      it is searched against (its own entry excluded), or for revisited Oxford/Paris an easy
      or hard image in its ground truth.
    """
    name, labels, split = retrieval.data.name, retrieval.data.labels, retrieval.split
    parts = {"val": split.val, "query": split.query, "gallery": split.gallery}
    for part, rows in parts.items():
        if len(rows) == 0:
            raise DataError(f"{name}: the {part} part of the split is empty, so retrieval cannot be scored. Use more images or a larger data.{part} fraction.")
    labelled = {"val": split.val_against != "self", "query": retrieval.ground_truth is None, "gallery": retrieval.ground_truth is None}
    for part, rows in parts.items():
        if labelled[part] and len(np.unique(labels[rows])) < 2:
            raise DataError(
                f"{name} cannot be scored by retrieval: its {part} part holds {_count(rows, labels)}. With a single class every "
                f"retrieved image is a positive and mAP is 1.0 whatever the model, so nothing was trained. {_HOW}"
            )
    if split.val_against == "gallery":
        val_ok, val_against = np.isin(labels[split.val], labels[split.gallery]), f"the gallery part ({_count(split.gallery, labels)})"
    elif split.val_against == "val":
        val_ok, val_against = _with_own_class(split.val, labels), "the other val images"
    else:
        val_ok, val_against = np.ones(len(split.val), dtype=bool), ""  # each val image's positive is its own gallery embedding
    if retrieval.ground_truth is not None:
        truth = retrieval.ground_truth
        query_ok = np.array([len(e) + len(h) > 0 for e, h in zip(truth.easy, truth.hard)], dtype=bool)
        query_against = "its ground truth (no easy or hard image for any query)"
    elif split.query_is_gallery:
        query_ok, query_against = _with_own_class(split.query, labels), "the other query = gallery images"
    else:
        query_ok = np.isin(labels[split.query], labels[split.gallery])
        query_against = f"the gallery part ({_count(split.gallery, labels)})"
    for part, ok, against in (("val", val_ok, val_against), ("query", query_ok, query_against)):
        if not ok.any():
            raise DataError(
                f"{name} cannot be scored by retrieval: none of the {len(ok)} images of its {part} part ({_count(parts[part], labels) if labelled[part] else 'no labels'}) "
                f"has a positive (an image of its class) in {against}, so nothing was trained. Check that the {part} and gallery "
                f"images share classes (the data set's list files or data.protocol), or use more images per class."
            )
