"""Approximate gallery search at 1,000,000 vectors: recall@10 against exact search, queries per second, size, build time.

What ``nas query`` searches a large gallery with (:mod:`nas.retrieval_index`): ``flat``
(exact), ``ivf``, ``ivfpq`` and ``hnsw``, each built by :func:`nas.retrieval_index.build_index`
with the parameters it picks for the gallery's size, searched at a sweep of its search-time
parameter (``nprobe`` lists, ``efSearch``); the row marked ``*`` is what ``nas query`` uses by
default (:func:`nas.retrieval_index.set_search_params`).

**Vectors.** The gallery model's real embeddings (``--config``: by default the CUB-100
``tf_efficientnet_lite2`` gallery at 224 px, 1,280-d pooled features, L2-normalised; read from the
gallery cache, embedded once if absent), all four split parts (5,902 photos). ``--queries`` of them,
drawn at random, are the queries and are kept out of the gallery. The gallery is the rest, grown to
``--vectors`` by synthetic vectors: each is a real gallery vector mixed with another of the same
class (weight uniform in 0-0.5) plus isotropic Gaussian noise of norm about ``--noise``,
L2-normalised. The table's header prints how close the synthetic gallery's neighbours are
compared with the real one's (mean cosine of a query's 1st and 10th neighbour), the property
that decides how hard the search is.

**Measures.** recall@10: the share of the exact top 10 (a flat search, the ground truth)
found in the approximate top 10, over the queries. QPS: all queries searched as one batch,
on 1 and on 2 faiss threads, best of ``--repeats``. Size: the serialised index in MiB. Build:
training (k-means) plus adding, on all threads. Peak memory is about twice the gallery's
float32 size (the vectors plus one index holding them); only one index is held at a time.

    .venv/bin/python experiments/benchmarks/approximate_index.py [--vectors 1000000] [--queries 1000] [--config F]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

REPO = Path(__file__).resolve().parents[2]

from nas.config import load_config  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.retrieval_index import build_index, index_spec, set_search_params  # noqa: E402

K = 10
SWEEPS = {"flat": [None], "ivf": [8, 16, 32, 62, 128, 256], "ivfpq": [8, 16, 32, 62, 128, 256], "hnsw": [16, 32, 64, 128, 256, 512]}


def real_embeddings(config_file: str, cache: str) -> tuple[np.ndarray, np.ndarray]:
    """Every photo's gallery-model embedding (each split part once) and its class."""
    config = load_config(config_file, {"cache": cache, "search.threads": os.cpu_count()})
    ctx = prepare(config, log=lambda text: print(text, flush=True))
    parts = ["train", "val", "query"] + ([] if ctx.split.query_is_gallery else ["gallery"])
    vectors = np.concatenate([getattr(ctx.embeddings, p) for p in parts]).astype(np.float32)
    labels = np.concatenate([ctx.data.labels[getattr(ctx.split, p)] for p in parts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def synthetic_gallery(real: np.ndarray, labels: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``real`` grown to ``n`` rows: each new row mixes a real row with another of its class, plus noise, L2-normalised."""
    d = real.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    out[: len(real)] = real
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    chunk = 50_000
    for start in range(len(real), n, chunk):
        m = min(chunk, n - start)
        i = rng.integers(0, len(real), m)
        j = np.array([rng.choice(by_class[labels[a]]) for a in i])
        w = rng.uniform(0.0, 0.5, (m, 1)).astype(np.float32)
        x = (1 - w) * real[i] + w * real[j] + rng.standard_normal((m, d), dtype=np.float32) * (noise / np.sqrt(d))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def neighbour_cosines(gallery: np.ndarray, queries: np.ndarray) -> tuple[float, float]:
    """The mean cosine of each query's 1st and 10th nearest gallery vector (exact)."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    scores, _ = index.search(queries, K)
    return float(scores[:, 0].mean()), float(scores[:, K - 1].mean())


def timed_search(index: faiss.Index, queries: np.ndarray, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    """Queries per second (best of ``repeats``) on ``threads`` faiss threads, and the result ids."""
    faiss.omp_set_num_threads(threads)
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, K)
        best = min(best, time.perf_counter() - start)
    return len(queries) / best, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def index_mib(index: faiss.Index) -> float:
    fd, tmp = tempfile.mkstemp(suffix=".faiss")
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        return os.path.getsize(tmp) / 2**20
    finally:
        os.unlink(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "cub100_pruned_one_shot.yaml"),
                        help="the experiment whose gallery model embeds the real vectors (its gallery cache is used)")
    parser.add_argument("--cache", default=str(REPO / "runs" / "cub100-cache"), help="the gallery-embedding cache folder")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.3, help="norm of the Gaussian noise added to each synthetic vector")
    parser.add_argument("--kinds", default="flat,ivf,ivfpq,hnsw")
    parser.add_argument("--threads", default="1,2", help="faiss threads to measure QPS on")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "approximate_index.json"))
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    all_threads = max(threads)
    rng = np.random.default_rng(args.seed)
    real, labels = real_embeddings(args.config, args.cache)
    held = rng.permutation(len(real))
    queries, base, base_labels = real[held[: args.queries]], real[held[args.queries:]], labels[held[args.queries:]]
    faiss.omp_set_num_threads(all_threads)
    real_nn = neighbour_cosines(base, queries)
    began = time.perf_counter()
    gallery = synthetic_gallery(base, base_labels, args.vectors, args.noise, rng)
    print(f"{len(real)} real {real.shape[1]}-d vectors: {len(queries)} queries, {len(base)} real + {len(gallery) - len(base)} synthetic "
          f"gallery vectors (noise {args.noise}; {time.perf_counter() - began:.0f} s)", flush=True)

    kinds = args.kinds.split(",")
    if kinds[0] != "flat":
        raise SystemExit("--kinds must start with flat: its exact search is the ground truth of recall@10")
    rows, truth, synthetic_nn = [], None, (0.0, 0.0)
    for kind in kinds:
        faiss.omp_set_num_threads(all_threads)
        start = time.perf_counter()
        index = build_index(gallery, kind, seed=args.seed)
        build = time.perf_counter() - start
        spec = index_spec(kind, *gallery.shape)
        size = index_mib(index)
        default = set_search_params(index)
        for value in SWEEPS[kind]:
            setting = set_search_params(index, nprobe=value, ef_search=value) if value else "exact"
            qps = {}
            for t in threads:
                qps[t], ids = timed_search(index, queries, t, args.repeats)
            if kind == "flat":
                truth = ids
            row = {"kind": spec.tag, "search": setting, "default": setting == default or kind == "flat",
                   "recall@10": recall(ids, truth), **{f"qps_{t}t": q for t, q in qps.items()}, "mib": size, "build_s": build}
            rows.append(row)
            print(row, flush=True)
        if kind == "flat":
            scores, _ = index.search(queries, K)
            synthetic_nn = float(scores[:, 0].mean()), float(scores[:, K - 1].mean())
        del index
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"setting": vars(args), "real_nn": real_nn, "synthetic_nn": synthetic_nn, "rows": rows}, indent=2))

    print()
    print(f"{len(gallery):,} gallery vectors of {gallery.shape[1]} dimensions ({gallery.nbytes / 2**30:.2f} GiB float32), "
          f"{len(queries)} real queries, top {K}, on {os.cpu_count()} cores")
    print(f"mean cosine of a query's 1st / 10th neighbour: real gallery ({len(base)}) {real_nn[0]:.3f} / {real_nn[1]:.3f}; "
          f"synthetic ({len(gallery):,}) {synthetic_nn[0]:.3f} / {synthetic_nn[1]:.3f}")
    print()
    heads = ["index", "search", "recall@10", *[f"QPS {t} thr" for t in threads], "size MiB", "build s"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "---|" * len(heads))
    for r in rows:
        mark = " *" if r["default"] else ""
        print(f"| {r['kind']} | {r['search']}{mark} | {r['recall@10']:.3f} | " + " | ".join(f"{r[f'qps_{t}t']:.0f}" for t in threads)
              + f" | {r['mib']:.0f} | {r['build_s']:.0f} |")
    print("* the search setting nas query uses by default for this index")


if __name__ == "__main__":
    sys.exit(main())
