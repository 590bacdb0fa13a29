"""nas.metrics: faiss-based retrieval scores against a slow, obviously-correct reference."""

from __future__ import annotations

import numpy as np
import pytest

from nas.metrics import METRIC_NAMES, compatibility_ratios, retrieval_metrics


def reference_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...] = (1, 5, 10),
    exclude: np.ndarray | None = None,
) -> dict[str, float]:
    """One query at a time over a full argsort ranking; AP as in revisited Oxford's compute_ap,
    mAP@R as in Musgrave et al. (2020), R@K as 'a positive in the top K'."""
    scores = query.astype(np.float64) @ gallery.astype(np.float64).T
    sums = {"mAP": 0.0, "mAP@R": 0.0, **{f"R@{k}": 0.0 for k in ks}}
    scored = skipped = 0
    for i in range(len(query)):
        order = list(np.argsort(-scores[i], kind="stable"))
        if exclude is not None:
            order.remove(int(exclude[i]))  # exactly the query's own index, wherever it ranks
        relevant = [bool(gallery_labels[g] == query_labels[i]) for g in order]
        n_pos = sum(relevant)
        if n_pos == 0:
            skipped += 1
            continue
        scored += 1
        # revisited Oxford compute_ap: trapezoid between precision before and after each positive
        ap, j = 0.0, 0
        for rank, rel in enumerate(relevant):
            if rel:
                precision_0 = 1.0 if rank == 0 else j / rank
                precision_1 = (j + 1) / (rank + 1)
                ap += (precision_0 + precision_1) / 2.0
                j += 1
        sums["mAP"] += ap / n_pos
        # mAP@R: R = number of positives; precision@i at each relevant i <= R, divided by R
        hits, total = 0, 0.0
        for rank in range(n_pos):
            if relevant[rank]:
                hits += 1
                total += hits / (rank + 1)
        sums["mAP@R"] += total / n_pos
        for k in ks:
            sums[f"R@{k}"] += float(any(relevant[:k]))
    out = {name: value / scored for name, value in sums.items()}
    out["queries"] = float(scored)
    out["skipped"] = float(skipped)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_problem(seed: int, n_query: int = 40, n_gallery: int = 70, dim: int = 8, classes: int = 5):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim))
    query_labels = rng.integers(0, classes, n_query)
    gallery_labels = rng.integers(0, classes, n_gallery)
    # some class structure so the scores are neither 0 nor 1, plus plenty of noise
    query = _unit(centers[query_labels] * 0.7 + rng.standard_normal((n_query, dim)))
    gallery = _unit(centers[gallery_labels] * 0.7 + rng.standard_normal((n_gallery, dim)))
    return query, query_labels, gallery, gallery_labels


def _assert_same(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-9), name


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference_on_random_embeddings(seed: int) -> None:
    query, ql, gallery, gl = _random_problem(seed)
    got = retrieval_metrics(query, ql, gallery, gl)
    _assert_same(got, reference_metrics(query, ql, gallery, gl))
    assert set(METRIC_NAMES) <= set(got)
    for name in METRIC_NAMES:
        assert 0.0 <= got[name] <= 1.0


@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_with_many_classes_and_other_ks(seed: int) -> None:
    query, ql, gallery, gl = _random_problem(100 + seed, n_query=25, n_gallery=40, dim=16, classes=12)
    ks = (1, 2, 3, 40, 100)
    _assert_same(retrieval_metrics(query, ql, gallery, gl, ks=ks), reference_metrics(query, ql, gallery, gl, ks=ks))


@pytest.mark.parametrize("seed", range(4))
def test_exclude_by_index_matches_reference(seed: int) -> None:
    _, _, gallery, labels = _random_problem(200 + seed, n_gallery=60)
    exclude = np.arange(len(gallery))
    got = retrieval_metrics(gallery, labels, gallery, labels, exclude=exclude)
    _assert_same(got, reference_metrics(gallery, labels, gallery, labels, exclude=exclude))
    # without the exclusion every query finds itself first
    assert retrieval_metrics(gallery, labels, gallery, labels)["R@1"] == 1.0
    assert got["R@1"] < 1.0


def test_exclude_with_a_subset_of_queries() -> None:
    _, _, gallery, labels = _random_problem(7, n_gallery=50)
    rows = np.array([3, 17, 0, 49, 25])
    got = retrieval_metrics(gallery[rows], labels[rows], gallery, labels, exclude=rows)
    _assert_same(got, reference_metrics(gallery[rows], labels[rows], gallery, labels, exclude=rows))


def test_exclude_removes_the_index_not_the_top_hit() -> None:
    # gallery item 1 is an exact duplicate of item 0 but of another class; query 0 is item 0.
    # Excluding by index drops item 0 and leaves the duplicate (a negative) on top. Dropping
    # "the top hit" instead could drop the duplicate and score a false R@1 of 1.
    gallery = _unit(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    labels = np.array([0, 1, 0, 1, 2])
    got = retrieval_metrics(gallery[:1], labels[:1], gallery, labels, exclude=np.array([0]))
    assert got["R@1"] == 0.0
    # remaining ranking: dup (neg), item 2 (pos), ... -> AP: ((0/1) + (1/2)) / 2 = 0.25
    assert got["mAP"] == pytest.approx(0.25)
    assert got["mAP@R"] == 0.0
    assert got["R@5"] == 1.0


def test_exclude_must_point_into_the_gallery() -> None:
    query, ql, gallery, gl = _random_problem(1, n_query=5, n_gallery=10)
    with pytest.raises(ValueError, match="exclude"):
        retrieval_metrics(query, ql, gallery, gl, exclude=np.array([0, 1, 2, 3, 10]))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunking_does_not_change_the_result(chunk: int) -> None:
    query, ql, gallery, gl = _random_problem(11, n_query=23)
    _assert_same(retrieval_metrics(query, ql, gallery, gl, chunk=chunk), retrieval_metrics(query, ql, gallery, gl))
    exclude = np.arange(len(gallery))
    _assert_same(
        retrieval_metrics(gallery, gl, gallery, gl, exclude=exclude, chunk=chunk),
        reference_metrics(gallery, gl, gallery, gl, exclude=exclude),
    )


def test_perfect_ranking_scores_one() -> None:
    labels = np.repeat(np.arange(4), 5)
    emb = np.eye(4, dtype=np.float32)[labels]
    got = retrieval_metrics(emb[::2], labels[::2], emb, labels)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(1.0)
    assert got["queries"] == 10 and got["skipped"] == 0


def test_worst_ranking_by_hand() -> None:
    # one positive, ranked last of four: AP = ((0/3) + (1/4)) / 2
    gallery = _unit(np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [-1.0, 0.0]]))
    labels = np.array([1, 1, 1, 0])
    got = retrieval_metrics(gallery[:1], np.array([0]), gallery, labels)
    assert got["mAP"] == pytest.approx(0.125)
    assert got["mAP@R"] == 0.0
    assert got["R@1"] == 0.0 and got["R@5"] == 1.0


def test_queries_without_positives_are_skipped_and_counted() -> None:
    query, ql, gallery, gl = _random_problem(5, n_query=30, classes=4)
    ql = ql.copy()
    ql[[2, 9, 10]] = 99  # no gallery image of class 99
    got = retrieval_metrics(query, ql, gallery, gl)
    assert got["skipped"] == 3
    assert got["queries"] == 27
    keep = ql != 99
    _assert_same(
        {k: v for k, v in got.items() if k != "skipped"},
        {k: v for k, v in retrieval_metrics(query[keep], ql[keep], gallery, gl).items() if k != "skipped"},
    )
    _assert_same(got, reference_metrics(query, ql, gallery, gl))


def test_no_query_with_a_positive_is_an_error() -> None:
    query, _, gallery, gl = _random_problem(5, n_query=4, classes=3)
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics(query, np.full(4, 7), gallery, gl)


def test_shape_and_label_checks() -> None:
    query, ql, gallery, gl = _random_problem(5, n_query=4, n_gallery=9)
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(query[:, :4], ql, gallery, gl)
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(query[0], ql, gallery, gl)
    with pytest.raises(ValueError, match="label"):
        retrieval_metrics(query, ql[:3], gallery, gl)
    with pytest.raises(ValueError, match="label"):
        retrieval_metrics(query, ql, gallery, gl[:-1])


def test_float64_and_list_labels_are_accepted() -> None:
    query, ql, gallery, gl = _random_problem(9)
    _assert_same(
        retrieval_metrics(query.astype(np.float64), list(ql), gallery.astype(np.float64), list(gl)),
        reference_metrics(query, ql, gallery, gl),
    )


# --------------------------------------------------------------------------- compatibility ratios


def test_compatibility_ratios() -> None:
    asym = {"mAP": 0.4, "mAP@R": 0.3, "R@1": 0.8, "R@5": 0.9, "queries": 100.0, "skipped": 2.0, "extra": 1.0}
    paragon = {"mAP": 0.5, "mAP@R": 0.6, "R@1": 0.0, "R@5": 0.9, "queries": 100.0, "skipped": 2.0}
    ratios = compatibility_ratios(asym, paragon)
    assert ratios == pytest.approx({"mAP_ratio": 0.8, "mAP@R_ratio": 0.5, "R@5_ratio": 1.0})
    assert "R@1_ratio" not in ratios  # paragon 0: no ratio
    assert "queries_ratio" not in ratios and "skipped_ratio" not in ratios and "extra_ratio" not in ratios


def test_compatibility_ratio_of_real_metrics() -> None:
    query, ql, gallery, gl = _random_problem(3)
    paragon = retrieval_metrics(query, ql, gallery, gl)
    rng = np.random.default_rng(0)
    noisy = _unit(query + 0.8 * rng.standard_normal(query.shape))
    asym = retrieval_metrics(noisy, ql, gallery, gl)
    ratios = compatibility_ratios(asym, paragon)
    assert set(ratios) == {f"{name}_ratio" for name in METRIC_NAMES}
    for name in METRIC_NAMES:
        assert ratios[f"{name}_ratio"] == pytest.approx(asym[name] / paragon[name])
    assert compatibility_ratios(paragon, paragon) == pytest.approx({f"{n}_ratio": 1.0 for n in METRIC_NAMES})
