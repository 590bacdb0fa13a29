"""The images every candidate and the supernet train on, and their gallery targets.

:func:`training_images` gives the split's training images and, with ``data.unlabeled``, a folder
of images without labels after them (:mod:`nas.data.unlabeled`): one source, the indices to
stream from it, and the :class:`~trainers.GalleryTargets` of the same images in the same order
(the unlabeled ones labelled -1). The gallery model's embeddings of the folder are cached beside
its other embeddings, keyed by its weights, the folder's content, the resolution and the
preprocessing, so they are computed once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.data import FileImages, ImageSet, ImageSource, Split
from nas.data.unlabeled import JoinedImages
from nas.gallery import GalleryNet
from nas.scoring import embed
from trainers import GalleryTargets

__all__ = ["TrainingImages", "training_images", "unlabeled_embeddings"]

CACHE_FORMAT = "asymnas-unlabeled-cache-v1"


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """``indices`` of ``source`` to train on, and what the gallery model says about them (same order).

    ``unlabeled``: how many of them, at the end, came from ``data.unlabeled``."""

    source: ImageSource
    indices: np.ndarray
    targets: GalleryTargets
    unlabeled: int = 0


def unlabeled_embeddings(model: GalleryNet, weights_sha: str, images: ImageSource, resolution: int, cache_dir: str | Path,
                         batch_size: int, device: torch.device, log: Callable[[str], None], workers: int | None) -> np.ndarray:
    """The gallery model's embeddings of every image of ``images`` (float32 ``(N, D)``), from the cache or computed and cached."""
    key = hashlib.sha256("\n".join([CACHE_FORMAT, model.model_name, weights_sha, images.fingerprint(), str(resolution),
                                    model.preprocessing.describe()]).encode()).hexdigest()
    path = Path(cache_dir) / f"unlabeled-{key[:20]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta, emb = json.loads(str(archive["meta"])), archive["embeddings"]
            if (meta.get("key") == key and emb.dtype == np.float32 and emb.shape == (len(images), model.embed_dim)
                    and hashlib.sha256(emb.tobytes()).hexdigest() == meta.get("checksum")):
                log(f"Unlabeled images: {len(images)} gallery embeddings loaded from the cache")
                return emb
            log(f"Unlabeled-image cache {path} does not match its images or its checksum; rebuilding it.")
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log(f"Unlabeled-image cache {path} is unreadable ({type(exc).__name__}); rebuilding it.")
    start = time.perf_counter()
    emb = np.ascontiguousarray(embed(model, images, resolution, model.preprocessing, batch_size=batch_size, device=device, workers=workers,
                                     desc="gallery model: unlabeled images"), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps({"format": CACHE_FORMAT, "key": key, "checksum": hashlib.sha256(emb.tobytes()).hexdigest()})),
             embeddings=emb)
    os.replace(tmp, path)
    log(f"Unlabeled images: {len(images)} embedded by the gallery model in {time.perf_counter() - start:.1f}s, cached at {path}")
    return emb


def training_images(data: ImageSet, split: Split, labelled: GalleryTargets, folder: FileImages | None,
                    embed_unlabeled: Callable[[ImageSource], np.ndarray], log: Callable[[str], None]) -> TrainingImages:
    """The split's training images (``labelled``: their targets), then the images of ``folder`` (``data.unlabeled``, loaded by
    :func:`nas.data.unlabeled.load_unlabeled` and kept apart from val and query by :func:`~nas.data.unlabeled.check_apart`)
    embedded by ``embed_unlabeled``."""
    train = np.asarray(split.train, dtype=np.int64)
    if folder is None:
        return TrainingImages(data.images, train, labelled)
    emb = torch.from_numpy(embed_unlabeled(folder))
    log(f"Training images: {len(train)} of the split and {len(folder)} unlabeled from {folder.root}")
    targets = GalleryTargets(
        targets=torch.cat([labelled.targets, emb]),
        labels=torch.cat([labelled.labels, torch.full((len(folder),), -1, dtype=labelled.labels.dtype)]),
        classifier=labelled.classifier,
        classifier_scale=labelled.classifier_scale,
    )
    indices = np.concatenate([train, len(data.images) + np.arange(len(folder), dtype=np.int64)])
    return TrainingImages(JoinedImages(data.images, folder), indices, targets, len(folder))
