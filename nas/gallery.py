"""The fixed gallery model, its checkpoint, its training and its embedding cache.

The gallery model is any timm architecture (``num_classes=0``: its pooled features),
optionally projected to ``embed_dim`` and L2-normalised. Its embeddings of the training
images (the query network's training targets), of the val / query images (the paragon)
and of the gallery images (the index) are computed once and cached on disk under a
content hash of (model name, weights, data, split, resolution, preprocessing).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nas.config import GalleryConfig
from nas.data import PREPROCESSING, ImageSet, Split, preprocess
from nas.errors import ConfigError, GalleryError
from nas.scoring import embed
from search_spaces import EmbeddingHead, L2Normalise

__all__ = [
    "GalleryNet",
    "GalleryEmbeddings",
    "create_gallery_net",
    "save_gallery",
    "load_gallery",
    "train_gallery",
    "gallery_embeddings",
    "file_sha256",
]

CHECKPOINT_FORMAT = "asymnas-gallery-v1"
CACHE_FORMAT = "asymnas-gallery-cache-v1"


class GalleryNet(nn.Module):
    """A timm backbone, an optional linear projection and L2 normalisation.

    ``proj`` is the embedding head shared with the query nets: an
    :class:`search_spaces.EmbeddingHead` (projection, then L2 norm) when ``embed_dim`` is
    set, else :class:`search_spaces.L2Normalise`; ``state_dict`` keys ``proj.weight`` /
    ``proj.bias`` as before.

    ``classifier`` (a cosine classifier over the embedding) exists when the model was
    trained by :func:`train_gallery`; retrieval never uses it.
    """

    def __init__(self, model_name: str, in_chans: int, embed_dim: int | None, num_classes: int = 0) -> None:
        super().__init__()
        self.model_name = model_name
        self.backbone = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
        features = int(self.backbone.num_features)
        self.proj: nn.Module = EmbeddingHead(features, embed_dim) if embed_dim else L2Normalise()
        self.embed_dim = embed_dim or features
        self.in_chans = in_chans
        self.classifier = nn.Parameter(torch.randn(num_classes, self.embed_dim) * 0.01) if num_classes else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.backbone.forward_head(x, pre_logits=True)
        if pre_logits:
            return x
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def logits(self, embedding: torch.Tensor, scale: float) -> torch.Tensor:
        """Cosine-classifier logits (normalised softmax), used for training only."""
        if self.classifier is None:
            raise GalleryError("This gallery model has no classifier; it was not trained by 'nas gallery train'.")
        return scale * embedding @ F.normalize(self.classifier, dim=1).t()


def create_gallery_net(config: GalleryConfig, in_chans: int, num_classes: int = 0) -> GalleryNet:
    if not timm.is_model(config.model):
        close = difflib.get_close_matches(config.model, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"gallery.model {config.model!r} is not a timm architecture.{hint} See timm.list_models().")
    return GalleryNet(config.model, in_chans, config.embed_dim, num_classes)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_gallery(model: GalleryNet, path: str | Path, resolution: int, classes: tuple[str, ...]) -> Path:
    """Write ``model`` as safetensors with a JSON header describing how to rebuild it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model": model.model_name,
        "in_chans": str(model.in_chans),
        "embed_dim": str(model.embed_dim if isinstance(model.proj, nn.Linear) else 0),
        "num_classes": str(0 if model.classifier is None else model.classifier.shape[0]),
        "resolution": str(resolution),
        "classes": json.dumps(list(classes)),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_gallery(config: GalleryConfig, path: str | Path, in_chans: int) -> GalleryNet:
    """Rebuild the gallery model from a checkpoint written by :func:`save_gallery`.

    An unreadable file, or one whose architecture, embedding size or channels do not
    match ``config``, is a :class:`GalleryError` that says which.
    """
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"Gallery checkpoint {path} does not exist. Train one with 'nas gallery train CONFIG' or fix gallery.checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise GalleryError(
            f"Gallery checkpoint {path} is unreadable ({exc}). It must be a safetensors file written by "
            f"'nas gallery train'; delete it and train again, or point gallery.checkpoint at a valid file."
        ) from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise GalleryError(f"Gallery checkpoint {path} was not written by 'nas gallery train' (no '{CHECKPOINT_FORMAT}' header).")
    if metadata["model"] != config.model:
        raise GalleryError(f"Gallery checkpoint {path} holds a {metadata['model']!r} model, but gallery.model is {config.model!r}.")
    embed_dim = int(metadata["embed_dim"]) or None
    if embed_dim != config.embed_dim:
        raise GalleryError(f"Gallery checkpoint {path} has embed_dim {embed_dim}, but gallery.embed_dim is {config.embed_dim}.")
    if int(metadata["in_chans"]) != in_chans:
        raise GalleryError(f"Gallery checkpoint {path} takes {metadata['in_chans']}-channel images, but the data has {in_chans} channels.")
    model = GalleryNet(config.model, in_chans, embed_dim, int(metadata["num_classes"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_shapes = [k for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or bad_shapes:
        raise GalleryError(
            f"Gallery checkpoint {path} does not match a {config.model!r} model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {bad_shapes[:5]}."
        )
    return model.eval()


def train_gallery(
    config: GalleryConfig,
    data: ImageSet,
    split: Split,
    path: str | Path,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> GalleryNet:
    """Train a gallery model on the train split (normalised-softmax cross-entropy) and save it.

    The cosine classifier with a fixed scale is the normalised-softmax loss of
    Zhai & Wu, "Classification is a Strong Baseline for Deep Metric Learning" (BMVC 2019).
    """
    if not data.classes or (data.labels[split.train] < 0).any():
        raise GalleryError(
            f"{data.name} has no class labels to train a gallery model on (revisited Oxford/Paris are evaluation sets); "
            f"set gallery.checkpoint to a gallery model trained elsewhere (safetensors, see 'nas gallery train')."
        )
    torch.manual_seed(seed)
    num_classes = len(data.classes)
    model = create_gallery_net(config, data.channels, num_classes).to(device)
    tc = config.train
    x = preprocess(data.images[split.train], config.resolution)
    y = torch.from_numpy(data.labels[split.train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps = tc.epochs * ((len(x) + tc.batch_size - 1) // tc.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, tc.epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for i in range(0, len(x), tc.batch_size):
            idx = order[i : i + tc.batch_size]
            if len(idx) < 2:
                continue
            xb, yb = x[idx].to(device), y[idx].to(device)
            # random horizontal flip: garments and digits keep their class
            flip = torch.rand(len(xb), device=device) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            logits = model.logits(model(xb), tc.scale)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        log(f"  gallery epoch {epoch}/{tc.epochs}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.3f}, {time.perf_counter() - start:.1f}s")
    model = model.cpu().eval()
    save_gallery(model, path, config.resolution, data.classes)
    return model


@dataclass(frozen=True, eq=False)
class GalleryEmbeddings:
    """The gallery model's embeddings of every split part, and the cache key they belong to."""

    key: str
    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    gallery: np.ndarray

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for name in ("train", "val", "query", "gallery"):
            digest.update(np.ascontiguousarray(getattr(self, name), dtype=np.float32).tobytes())
        return digest.hexdigest()


def _cache_key(model_name: str, weights_sha: str, data: ImageSet, split: Split, resolution: int) -> str:
    parts = [CACHE_FORMAT, model_name, weights_sha, data.fingerprint(), split.fingerprint(), str(resolution), PREPROCESSING]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_cache(path: Path, key: str) -> GalleryEmbeddings | None:
    """The cached embeddings, or ``None`` with the reason when the file is stale or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            cached = GalleryEmbeddings(key=meta["key"], **{n: archive[n] for n in ("train", "val", "query", "gallery")})
    # a damaged .npz surfaces as any of these (zipfile raises NotImplementedError for a garbled version field)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        raise _StaleCache(f"unreadable ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != CACHE_FORMAT or cached.key != key:
        raise _StaleCache("stale (it belongs to other gallery weights, data, split or resolution)")
    if cached.checksum() != meta.get("checksum"):
        raise _StaleCache("corrupt (its checksum does not match its contents)")
    return cached


class _StaleCache(Exception):
    pass


def _write_cache(path: Path, emb: GalleryEmbeddings) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"format": CACHE_FORMAT, "key": emb.key, "checksum": emb.checksum()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(meta), train=emb.train, val=emb.val, query=emb.query, gallery=emb.gallery)
    os.replace(tmp, path)


def gallery_embeddings(
    model: GalleryNet,
    weights_sha: str,
    data: ImageSet,
    split: Split,
    resolution: int,
    cache_dir: str | Path,
    batch_size: int = 256,
    device: torch.device | None = None,
    log: Callable[[str], None] = print,
) -> tuple[GalleryEmbeddings, bool]:
    """Load the embeddings from the cache, or compute and cache them.

    Returns the embeddings and whether they came from the cache. A cache file that is
    unreadable, stale or fails its checksum is reported through ``log`` and rebuilt.
    """
    key = _cache_key(model.model_name, weights_sha, data, split, resolution)
    path = Path(cache_dir) / f"gallery-{key[:20]}.npz"
    if path.exists():
        try:
            return _read_cache(path, key), True
        except _StaleCache as reason:
            log(f"Gallery cache {path} is {reason}; rebuilding it.")
    start = time.perf_counter()
    parts = {
        name: embed(model, data.images[getattr(split, name)], resolution, batch_size, device)
        for name in ("train", "val", "query", "gallery")
    }
    emb = GalleryEmbeddings(key=key, **parts)
    _write_cache(path, emb)
    log(f"Gallery embeddings computed in {time.perf_counter() - start:.1f}s and cached at {path}.")
    return emb, False
