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

Revisited Oxford and Paris (Radenović et al., "Revisiting Oxford and Paris: Large-Scale
Image Retrieval Benchmarking", CVPR 2018) give each query explicit *positive* and *junk*
gallery images instead of classes. :func:`revisited_metrics` follows ``compute_map`` of
their evaluation code (``revisitop/python/evaluate.py``): junk images are taken out of the
ranking (each positive's rank drops by the number of junk images ranked above it), AP is
the trapezoidal AP above with the number of positives as given, and mP@k is the precision
in the top ``min(k, rank of the last positive)`` (1-based); queries without a positive are
skipped. :func:`revisited_ground_truth` builds the three protocols of their
``example_evaluate.py``: easy (positives: easy; junk: junk + hard), medium (easy + hard;
junk) and hard (hard; junk + easy).
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = [
    "retrieval_metrics",
    "compatibility_ratios",
    "revisited_ground_truth",
    "revisited_metrics",
    "revisited_protocol_metrics",
    "METRIC_NAMES",
    "REVISITED_PROTOCOLS",
]

METRIC_NAMES = ("mAP", "mAP@R", "R@1", "R@5", "R@10")
REVISITED_PROTOCOLS = ("easy", "medium", "hard")


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


#: Elements of one ``queries x gallery`` ranking array scored at once (2**21: 16 MiB as float64;
#: the scoring holds a handful of them).
RANKING_ELEMENTS = 1 << 21


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    exclude: np.ndarray | None = None,
    chunk: int | None = None,
) -> dict[str, float]:
    """Search every query against the whole gallery (exact inner product) and score the rankings.

    Embeddings are expected L2-normalised (inner product = cosine). Returns ``mAP``,
    ``mAP@R``, ``R@K`` for each K, ``queries`` (scored) and ``skipped`` (no positive).
    Queries are ranked ``chunk`` at a time (default: as many as keep one
    ``chunk x gallery`` array at :data:`RANKING_ELEMENTS` elements, at most 1024), so the
    memory this takes does not grow with the number of queries.
    """
    if chunk is None:
        chunk = max(1, min(1024, RANKING_ELEMENTS // max(len(gallery), 1)))
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
    return _averaged(sums, scored, skipped)


def _averaged(sums: dict[str, float], scored: int, skipped: int) -> dict[str, float]:
    """Per-query sums -> means over the ``scored`` queries, with the query counts beside them."""
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


# --------------------------------------------------------------------------- revisited Oxford / Paris


def _index_lists(lists: list[np.ndarray] | tuple[np.ndarray, ...], n_gallery: int, what: str) -> list[np.ndarray]:
    out = []
    for i, items in enumerate(lists):
        items = np.unique(np.asarray(items, dtype=np.int64).reshape(-1))
        if len(items) and (items[0] < 0 or items[-1] >= n_gallery):
            raise ValueError(f"{what} of query {i} must be gallery indices in [0, {n_gallery}), but got {items[0]}..{items[-1]}.")
        out.append(items)
    return out


def revisited_ground_truth(
    protocol: str,
    easy: list[np.ndarray] | tuple[np.ndarray, ...],
    hard: list[np.ndarray] | tuple[np.ndarray, ...],
    junk: list[np.ndarray] | tuple[np.ndarray, ...],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-query ``(positives, junk)`` gallery indices of one revisited protocol.

    ``easy``, ``hard`` and ``junk`` are the per-query lists of a ``gnd_*.pkl`` file; the
    protocols are those of the revisited evaluation code: ``easy`` (positives easy, junk
    junk + hard), ``medium`` (easy + hard; junk), ``hard`` (hard; junk + easy).
    """
    if not len(easy) == len(hard) == len(junk):
        raise ValueError(f"easy, hard and junk need one list per query, but got {len(easy)}, {len(hard)} and {len(junk)}.")

    def cat(*lists: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in lists])

    if protocol == "easy":
        return [cat(e) for e in easy], [cat(j, h) for j, h in zip(junk, hard)]
    if protocol == "medium":
        return [cat(e, h) for e, h in zip(easy, hard)], [cat(j) for j in junk]
    if protocol == "hard":
        return [cat(h) for h in hard], [cat(j, e) for j, e in zip(junk, easy)]
    raise ValueError(f"protocol must be one of {REVISITED_PROTOCOLS}, but got {protocol!r}.")


def revisited_metrics(
    query: np.ndarray,
    gallery: np.ndarray,
    positives: list[np.ndarray] | tuple[np.ndarray, ...],
    junk: list[np.ndarray] | tuple[np.ndarray, ...],
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """mAP and mP@k with junk ignored, as ``compute_map`` of the revisited Oxford/Paris code.

    ``positives[i]`` and ``junk[i]`` are query ``i``'s gallery indices (taken as sets; an
    index in both counts as a positive that is also junk for the positives after it, as in
    ``compute_map``). The whole gallery is
    ranked by exact inner product; junk images are removed from the ranking; AP is the
    trapezoidal AP over the positives; mP@k = (positives among the first ``kq``) / ``kq``
    with ``kq = min(k, 1-based rank of the last positive)``. Queries without a positive are
    skipped. Returns ``mAP``, ``mP@k`` for each k, ``queries`` (scored) and ``skipped``.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery must be 2-D with the same dimension, but got {query.shape} and {gallery.shape}.")
    if len(positives) != len(query) or len(junk) != len(query):
        raise ValueError(f"positives and junk need one list per query ({len(query)}), but got {len(positives)} and {len(junk)}.")
    positives = _index_lists(positives, len(gallery), "positives")
    junk = _index_lists(junk, len(gallery), "junk")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    sums = {"mAP": 0.0, **{f"mP@{k}": 0.0 for k in ks}}
    scored = skipped = 0
    for start in range(0, len(query), chunk):
        _, order = index.search(np.ascontiguousarray(query[start : start + chunk], dtype=np.float32), len(gallery))
        rank_of = np.empty_like(order)  # rank_of[row, g]: 0-based rank of gallery item g
        rank_of[np.arange(len(order))[:, None], order] = np.arange(order.shape[1])[None, :]
        for row in range(len(order)):
            ok, bad = positives[start + row], junk[start + row]
            if len(ok) == 0:
                skipped += 1
                continue
            scored += 1
            pos = np.sort(rank_of[row, ok])
            pos = pos - np.searchsorted(np.sort(rank_of[row, bad]), pos, side="left")  # junk ranked above each positive
            j = np.arange(len(pos))
            before = np.where(pos == 0, 1.0, j / np.maximum(pos, 1))
            after = (j + 1) / (pos + 1)
            sums["mAP"] += float(((before + after) / 2.0).sum() / len(ok))
            one_based = pos + 1
            for k in ks:
                kq = min(int(one_based.max()), k)
                sums[f"mP@{k}"] += float((one_based <= kq).sum() / kq)
    return _averaged(sums, scored, skipped)


def revisited_protocol_metrics(
    query: np.ndarray,
    gallery: np.ndarray,
    easy: list[np.ndarray] | tuple[np.ndarray, ...],
    hard: list[np.ndarray] | tuple[np.ndarray, ...],
    junk: list[np.ndarray] | tuple[np.ndarray, ...],
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """:func:`revisited_metrics` under the easy, medium and hard protocols.

    Keys are ``mAP_easy``, ``mP@k_easy`` and so on for each protocol; ``mAP`` repeats
    ``mAP_medium`` (the headline number), ``queries`` and ``skipped`` are those of medium.
    """
    out: dict[str, float] = {}
    for protocol in REVISITED_PROTOCOLS:
        scores = revisited_metrics(query, gallery, *revisited_ground_truth(protocol, easy, hard, junk), ks=ks)
        if protocol == "medium":
            out["mAP"] = scores["mAP"]
            out["queries"], out["skipped"] = scores["queries"], scores["skipped"]
        out.update({f"{name}_{protocol}": value for name, value in scores.items() if name not in ("queries", "skipped")})
    return out
