"""Retrieval scoring: exact inner-product search with faiss, then mAP, R@K and mAP@R.

Definitions (also in the README):

* **mAP**: average precision over the full gallery ranking, averaged over queries, as
  the revisited Oxford/Paris evaluation code (``compute_map``, Radenović et al., CVPR
  2018) defines it: for the j-th positive (0-based) at 0-based rank r, the precision
  before it is j / r (1 when r = 0) and after it (j + 1) / (r + 1); AP is the mean of
  their average over positives (trapezoidal interpolation). Queries without a positive
  in the gallery are skipped.
* **R@K**: fraction of queries with at least one positive among the top K.
* **mAP@R**: "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020): with R the
  number of positives, the mean over the top R results of precision@i at each relevant i,
  divided by R.
* When query and gallery are the same images, ``exclude`` gives each query's own gallery
  index; that entry is removed from its ranking (by index, not by dropping the top hit).
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["retrieval_metrics", "compatibility_ratios", "METRIC_NAMES"]

METRIC_NAMES = ("mAP", "mAP@R", "R@1", "R@5", "R@10")


def _ranked_relevance(
    query: np.ndarray, gallery: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, exclude: np.ndarray | None
) -> np.ndarray:
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    _, order = index.search(np.ascontiguousarray(query, dtype=np.float32), gallery.shape[0])
    relevant = gallery_labels[order] == query_labels[:, None]
    if exclude is not None:
        keep = order != exclude[:, None]
        if not np.all(keep.sum(1) == gallery.shape[0] - 1):
            raise ValueError("exclude must give, for every query, an index that is in the gallery.")
        relevant = relevant[keep].reshape(len(query), gallery.shape[0] - 1)
    return relevant


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    exclude: np.ndarray | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Search every query against the whole gallery (exact inner product) and score the rankings.

    Embeddings are expected L2-normalised (inner product = cosine). Returns ``mAP``,
    ``mAP@R``, ``R@K`` for each K, ``queries`` (scored) and ``skipped`` (no positive).
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery must be 2-D with the same dimension, but got {query.shape} and {gallery.shape}.")
    if len(query) != len(query_labels) or len(gallery) != len(gallery_labels):
        raise ValueError("Each embedding needs exactly one label.")
    sums = {"mAP": 0.0, "mAP@R": 0.0, **{f"R@{k}": 0.0 for k in ks}}
    scored = skipped = 0
    for start in range(0, len(query), chunk):
        stop = start + chunk
        rel = _ranked_relevance(
            query[start:stop], gallery, query_labels[start:stop], gallery_labels, None if exclude is None else exclude[start:stop]
        )
        n_pos = rel.sum(1)
        has_pos = n_pos > 0
        skipped += int((~has_pos).sum())
        rel, n_pos = rel[has_pos], n_pos[has_pos]
        if len(rel) == 0:
            continue
        scored += len(rel)
        hits = np.cumsum(rel, axis=1)  # j + 1 at the j-th positive
        rank = np.arange(rel.shape[1])[None, :]
        j = hits - 1
        before = np.where(rank == 0, 1.0, j / np.maximum(rank, 1))
        after = hits / (rank + 1)
        ap = np.where(rel, (before + after) / 2.0, 0.0).sum(1) / n_pos
        sums["mAP"] += float(ap.sum())
        within_r = rank < n_pos[:, None]
        map_r = np.where(rel & within_r, hits / (rank + 1), 0.0).sum(1) / n_pos
        sums["mAP@R"] += float(map_r.sum())
        for k in ks:
            sums[f"R@{k}"] += float(rel[:, :k].any(1).sum())
    if scored == 0:
        raise ValueError("No query has a positive in the gallery; retrieval cannot be scored.")
    result = {name: value / scored for name, value in sums.items()}
    result["queries"] = float(scored)
    result["skipped"] = float(skipped)
    return result


def compatibility_ratios(asymmetric: dict[str, float], paragon: dict[str, float]) -> dict[str, float]:
    """``asymmetric / paragon`` for every metric both hold (the compatibility ratio)."""
    return {
        f"{name}_ratio": asymmetric[name] / paragon[name]
        for name in asymmetric
        if name in paragon and name not in ("queries", "skipped") and paragon[name] > 0
    }
