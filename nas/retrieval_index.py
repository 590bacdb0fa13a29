"""faiss indexes over a gallery's embeddings: exact, or approximate and cached beside the embeddings file.

The kinds (``nas query --index``), for ``n`` gallery vectors of dimension ``d`` whose rows are
L2-normalised (so that the inner product is the cosine):

* ``flat``: exact search, ``IndexFlatIP``. Never cached: building it is a copy of the embeddings.
* ``hnsw``: ``IndexHNSWFlat`` (inner product), ``M=32`` links per node, ``efConstruction=80``;
  searched with ``efSearch`` (default :data:`DEFAULT_EF_SEARCH`).
* ``ivf``: ``IndexIVFFlat`` over ``nlist`` k-means lists, about ``4 * sqrt(n)`` but at most
  ``n / 39`` (the training points faiss asks for per list; so at least 39 vectors), its k-means
  trained on a seeded sample of at most 40 vectors per list; searched with ``nprobe`` lists
  (default ``max(8, nlist / 64)``, at most ``nlist``).
* ``ivfpq``: ``IndexIVFPQ``: the lists of ``ivf`` with product-quantised vectors, ``m`` sub-vectors
  (the largest divisor of ``d`` that is at most ``d / 4``) of ``nbits`` bits (8, fewer for
  galleries under ``39 * 256`` vectors; at least 78 vectors).
* ``auto``: ``flat`` below :data:`AUTO_FLAT_BELOW` vectors, ``ivf`` (its default ``nprobe``) from there on:
  measured on 1,000,000 vectors of 1,280 dimensions (``experiments/benchmarks/approximate_index.py``), it keeps
  recall@10 at 0.999 at 173 queries per second on one thread (6x exact search), where ``hnsw`` at its default
  ``efSearch`` reaches 0.81 and ``ivfpq`` stops at 0.68.

:func:`build_index` builds one in memory (a benchmark calls it directly); :func:`cached_index`
builds an approximate index once and keeps it next to the embeddings as
``<embeddings stem>.<kind>-<params>.faiss`` with a JSON side file (``.faiss.json``) recording the
SHA-256 of the embeddings file it was built from: a changed embeddings file rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from nas.errors import ConfigError

__all__ = [
    "INDEX_KINDS", "AUTO_FLAT_BELOW", "DEFAULT_EF_SEARCH", "IndexSpec", "index_spec", "build_index", "set_search_params",
    "file_sha256", "cached_index",
]

#: The values of ``nas query --index``.
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
#: ``auto`` searches exactly below this many gallery vectors (a flat search of 100 000 x 128 floats
#: takes a few milliseconds per query on one CPU core), with ``ivf`` from there on.
AUTO_FLAT_BELOW = 100_000
#: ``efSearch`` of an HNSW index unless ``--ef-search`` says otherwise.
DEFAULT_EF_SEARCH = 128

_HNSW_M = 32
_EF_CONSTRUCTION = 80
_MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per k-means centroid
_TRAINING_POINTS_PER_LIST = 40  # an IVF index's k-means sees at most this many vectors per list (_training_sample)


@dataclass(frozen=True)
class IndexSpec:
    """A resolved index kind and the build parameters that go into its cache file name."""

    kind: str
    params: tuple[tuple[str, int], ...] = ()

    @property
    def tag(self) -> str:
        """``hnsw-M32-efc80``: the kind and its parameters, for the cache file name."""
        return "-".join([self.kind, *(f"{name}{value}" for name, value in self.params)])


def index_spec(kind: str, n: int, d: int) -> IndexSpec:
    """The index of ``kind`` (``auto`` resolved) for ``n`` vectors of dimension ``d``, with its build parameters."""
    if kind not in INDEX_KINDS:
        raise ConfigError(f"Unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}.")
    if n < 1 or d < 1:
        raise ConfigError(f"An index needs at least one vector of at least one dimension, but got {n} x {d}.")
    if kind == "auto":
        kind = "flat" if n < AUTO_FLAT_BELOW else "ivf"
    if kind == "flat":
        return IndexSpec("flat")
    if kind == "hnsw":
        return IndexSpec("hnsw", (("M", _HNSW_M), ("efc", _EF_CONSTRUCTION)))
    least = _MIN_POINTS_PER_CENTROID * (1 if kind == "ivf" else 2)  # ivfpq: its sub-quantizers need two centroids at least
    if n < least:
        raise ConfigError(f"--index {kind} needs at least {least} gallery vectors to train its k-means, but there are {n}; use --index flat (exact search).")
    nlist = max(1, min(round(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CENTROID))
    if kind == "ivf":
        return IndexSpec("ivf", (("nlist", nlist),))
    m = max(k for k in range(1, max(1, d // 4) + 1) if d % k == 0)
    nbits = min(8, int(math.log2(n // _MIN_POINTS_PER_CENTROID)))
    return IndexSpec("ivfpq", (("nlist", nlist), ("m", m), ("nbits", nbits)))


def build_index(embeddings: np.ndarray, kind: str = "flat", *, seed: int = 0) -> faiss.Index:
    """A faiss inner-product index of ``kind`` (one of :data:`INDEX_KINDS`) holding ``embeddings``
    (``n x d``, rows L2-normalised for cosine scores), trained where the kind needs it (k-means seeded by ``seed``)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"Embeddings must be a 2-D array (vectors x dimensions), but got shape {x.shape}.")
    spec = index_spec(kind, *x.shape)
    params, d = dict(spec.params), x.shape[1]
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efc"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        if spec.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, params["nlist"], params["m"], params["nbits"], faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.seed = seed
        index.cp.seed = seed
        index.own_fields = True  # the index keeps its quantizer alive
        quantizer.this.disown()
        index.train(_training_sample(x, params["nlist"], seed))
    index.add(x)
    return index


def _training_sample(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """The vectors an IVF index's k-means is trained on: all of them, or a seeded sample of
    :data:`_TRAINING_POINTS_PER_LIST` per list: k-means over a million vectors into 4,000 lists would otherwise
    run on all of them (faiss samples only above 256 per list), about 6x the 160,000 of the sample, for centroids
    that place the lists about as well (the approximate-index benchmark measures the recall)."""
    cap = _TRAINING_POINTS_PER_LIST * nlist
    if len(x) <= cap:
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=cap, replace=False))
    return np.ascontiguousarray(x[rows])


def set_search_params(index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None) -> str:
    """Set the search-time parameters of an approximate index; returns them as text (empty for a flat index)."""
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(index.nlist, nprobe or max(8, index.nlist // 64))
        return f"nprobe {index.nprobe} of {index.nlist} lists"
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = ef_search or DEFAULT_EF_SEARCH
        return f"efSearch {index.hnsw.efSearch}"
    return ""


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _read_cached(index_file: Path, meta_file: Path, sha: str, n: int, d: int) -> faiss.Index | None:
    """The cached index when its side file records ``sha`` and it holds ``n x d`` vectors; None otherwise."""
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("embeddings_sha256") != sha:
            return None
        index = faiss.read_index(str(index_file))
    except (OSError, ValueError, RuntimeError):  # missing, unreadable or damaged: built again
        return None
    return index if (index.ntotal, index.d) == (n, d) else None


def cached_index(
    embeddings_file: Path, embeddings: np.ndarray, kind: str, log: Callable[[str], None] = print
) -> tuple[faiss.Index, IndexSpec, Path | None]:
    """The index of ``kind`` over ``embeddings`` (the rows of ``embeddings_file``), and the cache file it was read
    from or written to (None for ``flat``, or when the folder is not writable: then it is built each time).

    An approximate index is read back (``faiss.read_index``) when its JSON side file records the SHA-256 of
    ``embeddings_file``; otherwise it is built, written atomically, and the side file written after it.
    """
    n, d = embeddings.shape
    spec = index_spec(kind, n, d)
    if spec.kind == "flat":
        return build_index(embeddings, "flat"), spec, None
    index_file = embeddings_file.with_name(f"{embeddings_file.stem}.{spec.tag}.faiss")
    meta_file = index_file.with_name(index_file.name + ".json")
    sha = file_sha256(embeddings_file)
    index = _read_cached(index_file, meta_file, sha, n, d)
    if index is not None:
        return index, spec, index_file
    log(f"Building the {spec.tag} index of {n} vectors (once; kept as {index_file.name}) ...")
    index = build_index(embeddings, spec.kind)
    meta = {"embeddings": embeddings_file.name, "embeddings_sha256": sha, "kind": spec.kind, "params": dict(spec.params), "vectors": n, "dim": d}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{index_file.name}.", dir=index_file.parent)
        os.close(fd)
        try:
            faiss.write_index(index, tmp)
            os.replace(tmp, index_file)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    except (OSError, RuntimeError) as exc:
        log(f"Could not keep the index next to the embeddings ({exc}); it is built again on each run.")
        return index, spec, None
    return index, spec, index_file
