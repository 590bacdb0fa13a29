"""Embedding images with a model, and scoring a split part by retrieval.

:func:`embed` runs any embedding network (a candidate query network, the gallery model,
an exported model) over images streamed from an image source with the evaluation
transform (:mod:`nas.data.loading`); :func:`score_part` scores the val or query part of
a :class:`~nas.data.RetrievalData` as its split says; :func:`paragon_scores` is the
gallery model's own (symmetric) score, the reference every candidate is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nas.data import ImageSource, Preprocessing, RetrievalData, eval_batches
from nas.data.sources import as_source
from nas.metrics import retrieval_metrics, revisited_protocol_metrics
from nas.progress_bars import progress

if TYPE_CHECKING:
    from nas.gallery import GalleryEmbeddings

__all__ = ["embed", "score_part", "paragon_scores"]


def embed(
    model: nn.Module,
    images: ImageSource | np.ndarray,
    resolution: int,
    preprocessing: Preprocessing,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 128,
    device: torch.device | None = None,
    workers: int | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Embeddings ``(N, D)`` float32 of images ``indices`` (all by default) of ``images`` (a source, or
    a uint8 array ``(N, H, W, C)``), at ``resolution`` with ``preprocessing``'s evaluation transform.

    ``workers``: loader processes (``None``: automatic, see :func:`nas.data.resolve_workers`).
    ``desc``: show a progress bar with this label (see :mod:`nas.progress_bars`).
    """
    source = as_source(images)
    rows = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    device = device or torch.device("cpu")
    was_training = model.training
    home = next(model.parameters(), torch.empty(0)).device  # where the model is left again
    model.eval().to(device)
    gpu = device.type == "cuda"
    batches = eval_batches(source, rows, preprocessing.for_channels(source.channels).eval_transform(resolution), batch_size, workers, for_gpu=gpu)
    if desc is not None:
        batches = progress(batches, len(rows), desc, scale=batch_size)
    with torch.inference_mode():  # the moves stay outside: a model moved inside would hold inference tensors
        out = [model(batch.to(device, non_blocking=gpu)).float().cpu() for batch in batches]
    model.train(was_training).to(home)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)


def score_part(data: RetrievalData, part: str, embeddings: np.ndarray, gallery_side: Any) -> dict[str, float]:
    """Score the embeddings of split part ``part`` (``val`` or ``query``, in split order).

    ``gallery_side`` holds the gallery model's embeddings of the split parts as attributes
    ``val`` and ``gallery`` (a :class:`nas.gallery.GalleryEmbeddings`); ``embeddings`` come
    from the candidate (asymmetric) or from the gallery model itself (paragon).

    * ``query``: against the gallery part; with revisited ground truth, mAP and mP@k under
      the easy, medium and hard protocols (:func:`nas.metrics.revisited_protocol_metrics`),
      else by labels (:func:`nas.metrics.retrieval_metrics`), each query's own entry excluded
      by index when query and gallery are the same images.
    * ``val``: as ``split.val_against`` says: against the gallery part; against val itself
      with each image's own entry excluded; or against val itself with each image's own
      gallery-model embedding its only positive (``self``).
    """
    split, labels = data.split, data.data.labels
    if part not in ("val", "query"):
        raise ValueError(f"part must be 'val' or 'query', but got {part!r}.")
    rows = getattr(split, part)
    if len(embeddings) != len(rows):
        raise ValueError(f"{len(embeddings)} {part} embeddings for {len(rows)} {part} images.")
    if part == "query":
        if data.ground_truth is not None:
            truth = data.ground_truth
            return revisited_protocol_metrics(embeddings, gallery_side.gallery, truth.easy, truth.hard, truth.junk)
        exclude = np.arange(len(rows)) if split.query_is_gallery else None
        return retrieval_metrics(embeddings, labels[rows], gallery_side.gallery, labels[split.gallery], exclude=exclude)
    if split.val_against == "gallery":
        return retrieval_metrics(embeddings, labels[rows], gallery_side.gallery, labels[split.gallery])
    if split.val_against == "val":
        return retrieval_metrics(embeddings, labels[rows], gallery_side.val, labels[rows], exclude=np.arange(len(rows)))
    own = np.arange(len(rows))
    return retrieval_metrics(embeddings, own, gallery_side.val, own)


def paragon_scores(retrieval: RetrievalData, gallery_embeddings: GalleryEmbeddings) -> dict[str, dict[str, float]]:
    """The gallery model's own (symmetric) scores on the query and val parts of ``retrieval``,
    from its cached embeddings ``gallery_embeddings`` of that split."""
    emb = gallery_embeddings
    return {"query": score_part(retrieval, "query", emb.query, emb), "val": score_part(retrieval, "val", emb.val, emb)}
