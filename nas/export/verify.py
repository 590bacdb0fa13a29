"""Verifying an export on the evaluation query set.

Every format with a ``verified_as`` name embeds the query images; each image's embedding
must have a cosine of at least :data:`MIN_COSINE` to the trained module's. When the
gallery model is at hand, the asymmetric query mAP is recomputed from the ONNX model (or
the reloaded weights when there is no ONNX export) and must equal the trial's within
:data:`MAX_MAP_DIFF`. A quantised format (``measured_as``) is measured, not held to those
thresholds: its asymmetric mAP against the same float gallery index, the drop from
float, its cosine to the module and its ONNX Runtime latency beside the float model's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nas.data import Preprocessing, eval_batches
from nas.export.formats import EXPORTERS, Exporter
from nas.gallery import GalleryEmbeddings, gallery_embeddings, open_gallery
from nas.hardware.runtimes import median_p90, onnxruntime_session, time_runs
from nas.scoring import embed, score_part
from search_spaces import Architecture, QueryNet

if TYPE_CHECKING:
    from nas.config import ExperimentConfig
    from nas.data import RetrievalData

__all__ = ["MIN_COSINE", "MAX_MAP_DIFF", "cosines", "gallery_index", "onnxruntime_latency_ms", "verify_export"]

#: The smallest cosine between an exported float runtime's embedding and the module's that passes.
MIN_COSINE = 0.9999
#: Largest allowed difference between the ONNX model's asymmetric query mAP and the trial's (0.1 point).
MAX_MAP_DIFF = 0.001
#: The formats whose embeddings are scored for the mAP check, by ``verified_as`` name: the first present.
MAP_REFERENCES = ("onnx", "reloaded")
#: Batch-1 ONNX Runtime latency of a quantised model and its float model: untimed and timed runs.
LATENCY_WARMUP, LATENCY_REPEATS = 10, 50

Log = Callable[[str], None]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def gallery_index(config: ExperimentConfig, run_dir: Path, retrieval: RetrievalData, log: Log) -> GalleryEmbeddings | None:
    """The gallery model's embeddings of the run (cached under ``<config.cache_dir>/cache``); None when the model it
    trained is gone (a configured checkpoint, weights file or pretrained model is required)."""
    data, split = retrieval.data, retrieval.split
    if config.gallery.source == "checkpoint" and not Path(config.gallery.checkpoint or "").is_file():
        return None
    opened = open_gallery(config.gallery, data, split, run_dir, torch.device("cpu"), seed=config.data.seed, log=log, may_train=False)
    if opened is None:
        return None
    gallery, sha, _ = opened
    emb, _ = gallery_embeddings(
        gallery, sha, data, split, config.gallery.resolution, config.cache_dir / "cache", config.gallery.batch_size, log=log, workers=config.data.workers
    )
    return emb


def onnxruntime_latency_ms(path: Path, arch: Architecture, threads: int) -> dict[str, float]:
    """Median and p90 ms of batch-1 ONNX Runtime CPU runs of the ONNX file ``path`` with ``threads`` threads."""
    session = onnxruntime_session(path, threads)
    x = np.zeros((1, arch.in_chans, arch.resolution, arch.resolution), dtype=np.float32)
    times = time_runs(lambda: session.run(["embeddings"], {"images": x}), warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS)
    median, p90 = median_p90(times)
    return {"median": median, "p90": p90}


def _measure_quantised(
    exporter: Exporter,
    out: Path,
    batches: Iterable[torch.Tensor],
    trained: np.ndarray,
    float_map: float,
    retrieval: RetrievalData,
    gallery: GalleryEmbeddings,
    arch: Architecture,
    threads: int,
) -> dict[str, Any]:
    """A quantised ONNX format against the float ONNX model it requires: mAP, drop, cosine, latencies."""
    (float_name,) = exporter.requires
    quantised = exporter.embed(out / exporter.filename, batches)
    quantised_map = score_part(retrieval, "query", quantised, gallery)["mAP"]
    return {
        "query_mAP": quantised_map,
        "mAP_drop_from_float": float_map - quantised_map,
        "min_cosine_to_float": float(cosines(quantised, trained).min()),
        "latency_ms_onnxruntime": onnxruntime_latency_ms(out / exporter.filename, arch, threads),
        "float_latency_ms_onnxruntime": onnxruntime_latency_ms(out / EXPORTERS.get(float_name).filename, arch, threads),
        "threads": threads,
    }


def verify_export(
    model: QueryNet,
    exporters: Sequence[Exporter],
    out: Path,
    retrieval: RetrievalData,
    gallery: GalleryEmbeddings | None,
    *,
    trial: int,
    trial_map: float,
    retrained: bool,
    threads: int,
    preprocessing: Preprocessing,
    workers: int | None = None,
) -> dict[str, Any]:
    """The verification record of the export in ``out`` (what ``verification.json`` holds).

    ``model`` is the trained module, ``exporters`` the formats written, ``trial`` and
    ``trial_map`` the trial's number and query mAP, ``threads`` the ONNX Runtime threads
    of the latency measurement, ``preprocessing`` the study's. ``passed`` is whether every check
    held; the caller acts on it. The query images are streamed again for every format.
    """
    arch = model.arch
    data, rows = retrieval.data, retrieval.split.query
    transform = preprocessing.for_channels(data.channels).eval_transform(arch.resolution)

    def batches() -> Iterator[torch.Tensor]:
        return eval_batches(data.images, rows, transform, 64, workers)

    trained = embed(model, data.images, arch.resolution, preprocessing, indices=rows, workers=workers)
    outputs = {e.verified_as: e.embed(out / e.filename, batches()) for e in exporters if e.verified_as is not None}
    verification: dict[str, Any] = {
        "trial": trial,
        "query_images": int(len(rows)),
        "threshold_min_cosine": MIN_COSINE,
        "retrained": retrained,
        "min_cosine": {name: float(cosines(emb, trained).min()) for name, emb in outputs.items()},
    }
    checks = [value >= MIN_COSINE for value in verification["min_cosine"].values()]
    if gallery is not None:
        reference = next(name for name in MAP_REFERENCES if name in outputs)
        scored = score_part(retrieval, "query", outputs[reference], gallery)
        verification["query_mAP"] = {"trial": trial_map, reference: scored["mAP"]}
        checks.append(abs(scored["mAP"] - trial_map) <= MAX_MAP_DIFF)
        for exporter in exporters:
            if exporter.measured_as is not None:
                verification[exporter.measured_as] = _measure_quantised(
                    exporter, out, batches(), trained, scored["mAP"], retrieval, gallery, arch, threads
                )
    verification["passed"] = all(checks)
    return verification
