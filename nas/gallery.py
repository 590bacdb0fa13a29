"""The fixed gallery model, where its weights come from, its training and its embedding cache.

The gallery model is any timm architecture (``num_classes=0``: its pooled features),
optionally projected to ``embed_dim`` and L2-normalised, with the :class:`Preprocessing`
its inputs need. Its weights come from (:func:`open_gallery`, ``gallery.*``): a checkpoint
of ``nas gallery train``, a timm-compatible weights file, timm's own pretrained weights,
or a training on the train split. Its embeddings of the training images (the query
network's training targets), of the val / query images (the paragon) and of the gallery
images (the index) are computed once, streamed through the data loader, and cached on
disk under a content hash of (model name, weights, data, split, resolution, preprocessing).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nas.config import GalleryConfig
from nas.data import LEGACY_PREPROCESSING, Augmentation, ImageSet, Preprocessing, Split, StreamingImages
from nas.errors import ConfigError, GalleryError
from nas.pretrained import pretrained_download
from nas.progress_bars import progress
from nas.scoring import embed
from nas.threads import ThreadSizer, apply_threads
from search_spaces import EmbeddingHead, L2Normalise
from trainers import Speed, check_state_dict, read_safetensors

__all__ = [
    "GalleryNet",
    "GalleryEmbeddings",
    "create_gallery_net",
    "save_gallery",
    "load_gallery",
    "train_gallery",
    "gallery_embeddings",
    "file_sha256",
    "state_sha256",
    "load_gallery_weights",
    "open_gallery",
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
    trained by :func:`train_gallery`; retrieval never uses it. ``preprocessing``: how its
    input images are normalised and resized (the query candidates share it).
    """

    def __init__(
        self,
        model_name: str,
        in_chans: int,
        embed_dim: int | None,
        num_classes: int = 0,
        preprocessing: Preprocessing = LEGACY_PREPROCESSING,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.preprocessing = preprocessing.for_channels(in_chans)
        self.backbone = backbone if backbone is not None else timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
        features = pooled_width(self.backbone)
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


def pooled_width(backbone: nn.Module) -> int:
    """The width of ``backbone.forward_head(x, pre_logits=True)``: timm's ``head_hidden_size`` for models
    with a head conv after pooling (MobileNetV3: 1024 or 1280), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(f"gallery.model {name!r} is not a timm architecture.{hint} See timm.list_models().")


def configured_preprocessing(config: GalleryConfig) -> Preprocessing | None:
    """``gallery.preprocessing`` as a :class:`Preprocessing`, or None when it is not set."""
    p = config.preprocessing
    return None if p is None else Preprocessing(tuple(p.mean), tuple(p.std), p.interpolation, p.crop_pct)


def create_gallery_net(config: GalleryConfig, in_chans: int, num_classes: int = 0) -> GalleryNet:
    """A randomly initialised gallery model to train (:func:`train_gallery`)."""
    _check_model_name(config.model)
    return GalleryNet(config.model, in_chans, config.embed_dim, num_classes, configured_preprocessing(config) or LEGACY_PREPROCESSING)


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
        "preprocessing": json.dumps(model.preprocessing.to_dict()),
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
    advice = "delete it and train again ('nas gallery train CONFIG --force'), or point gallery.checkpoint at a file that command wrote"
    state, metadata = read_safetensors(path, "Gallery checkpoint", advice, GalleryError)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise GalleryError(f"Gallery checkpoint {path} was not written by 'nas gallery train' (no '{CHECKPOINT_FORMAT}' header).")
    try:
        name, embed_dim, chans, num_classes = metadata["model"], int(metadata["embed_dim"]) or None, int(metadata["in_chans"]), int(metadata["num_classes"])
        recorded = Preprocessing.from_dict(json.loads(metadata["preprocessing"])) if "preprocessing" in metadata else LEGACY_PREPROCESSING
        if num_classes != (len(state["classifier"]) if "classifier" in state and state["classifier"].ndim == 2 else 0):
            raise ValueError(f"num_classes {num_classes} does not match its classifier")
    except (KeyError, ValueError, TypeError) as exc:
        raise GalleryError(f"Gallery checkpoint {path} has a damaged header ({type(exc).__name__}: {exc}): {advice}.") from None
    if name != config.model:
        raise GalleryError(f"Gallery checkpoint {path} holds a {name!r} model, but gallery.model is {config.model!r}.")
    if embed_dim != config.embed_dim:
        raise GalleryError(f"Gallery checkpoint {path} has embed_dim {embed_dim}, but gallery.embed_dim is {config.embed_dim}.")
    if chans != in_chans:
        raise GalleryError(f"Gallery checkpoint {path} takes {chans}-channel images, but the data has {in_chans} channels.")
    model = GalleryNet(config.model, in_chans, embed_dim, num_classes, configured_preprocessing(config) or recorded)
    check_state_dict(state, model, f"Gallery checkpoint {path}", advice, GalleryError, f"a {config.model!r} model")
    model.load_state_dict(state)
    return model.eval()


def train_gallery(
    config: GalleryConfig,
    data: ImageSet,
    split: Split,
    path: str | Path,
    device: torch.device,
    seed: int = 0,
    log: Callable[[str], None] = print,
    workers: int | None = None,
    threads: ThreadSizer | None = None,
    speed: Speed | None = None,
) -> GalleryNet:
    """Train a gallery model on the train split (normalised-softmax cross-entropy) and save it.

    ``threads`` sizes torch's threads to the free cores before every epoch (:mod:`nas.threads`);
    ``speed``: precision and memory format of the steps, as a trial's (``train.*``; not compiled).

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
    speed = replace(speed or Speed(), compile=False)
    speed.model(model)
    tc = config.train
    # random horizontal flip only: garments, digits and photos keep their class
    transform = model.preprocessing.train_transform(config.resolution, Augmentation(crop_scale=(1.0, 1.0), hflip=0.5))
    images = StreamingImages(data.images, split.train, transform, tc.batch_size, seed, workers, for_gpu=device.type == "cuda")
    y = torch.from_numpy(data.labels[split.train])
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    steps_per_epoch = max(len(images) // tc.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=tc.epochs * steps_per_epoch, pct_start=0.15)
    for epoch in range(1, tc.epochs + 1):
        apply_threads(threads)
        start = time.perf_counter()
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for xb, idx in progress(images.batches(epoch), len(images), f"gallery epoch {epoch}/{tc.epochs}", scale=tc.batch_size):
            if len(idx) < 2:
                continue
            xb, yb = speed.batch(xb.to(device, non_blocking=True)), y[idx].to(device)
            with speed.autocast(device):
                features = model(xb)
            logits = model.logits(features.float(), tc.scale)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        log(f"  gallery epoch {epoch}/{tc.epochs}: loss {loss_sum / total:.4f}, train accuracy {correct / total:.3f}, {time.perf_counter() - start:.1f}s")
    model = model.cpu().eval().to(memory_format=torch.contiguous_format)
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


def _cache_key(model: GalleryNet, weights_sha: str, data: ImageSet, split: Split, resolution: int) -> str:
    parts = [CACHE_FORMAT, model.model_name, weights_sha, data.fingerprint(), split.fingerprint(), str(resolution), model.preprocessing.describe()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read_cache(path: Path, key: str, shapes: dict[str, tuple[int, int]]) -> GalleryEmbeddings:
    """The cached embeddings (float32 arrays of ``shapes``), else :class:`_StaleCache` saying why the file is stale or corrupt."""
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
    wrong = [f"{n} {a.dtype} {a.shape}" for n, a in vars(cached).items() if n in shapes and (a.dtype != np.float32 or a.shape != shapes[n])]
    if wrong:
        raise _StaleCache(f"corrupt (it holds {', '.join(wrong)}; expected float32 {shapes})")
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
    workers: int | None = None,
) -> tuple[GalleryEmbeddings, bool]:
    """Load the embeddings from the cache, or compute (streaming the images, with the model's
    preprocessing at ``resolution``) and cache them.

    Returns the embeddings and whether they came from the cache. A cache file that is
    unreadable, stale or fails its checksum is reported through ``log`` and rebuilt.
    """
    key = _cache_key(model, weights_sha, data, split, resolution)
    path = Path(cache_dir) / f"gallery-{key[:20]}.npz"
    if path.exists():
        try:
            shapes = {n: (len(getattr(split, n)), model.embed_dim if len(getattr(split, n)) else 0) for n in ("train", "val", "query", "gallery")}
            return _read_cache(path, key, shapes), True
        except _StaleCache as reason:
            log(f"Gallery cache {path} is {reason}; rebuilding it.")
    start = time.perf_counter()
    parts: dict[str, np.ndarray] = {}
    for name in ("train", "val", "query", "gallery"):
        rows = getattr(split, name)
        if name == "gallery" and split.query_is_gallery:  # the same images: embedded once
            parts[name] = parts["query"]
            continue
        parts[name] = embed(
            model, data.images, resolution, model.preprocessing, indices=rows, batch_size=batch_size, device=device,
            workers=workers, desc=f"gallery model: {name} images",
        )
    emb = GalleryEmbeddings(key=key, **parts)
    _write_cache(path, emb)
    log(f"Gallery embeddings computed in {time.perf_counter() - start:.1f}s and cached at {path}.")
    return emb, False


# --------------------------------------------------------------------------- weights from elsewhere


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict (names, shapes and bytes in order): the identity of
    weights that did not come from one of our checkpoint files."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth``/``.pt``/``.bin`` file, unwrapped from a ``state_dict`` /
    ``model`` / ``state_dict_ema`` entry and a ``module.`` prefix. A ``.pth`` is read with ``weights_only``:
    torch's restricted unpickler, which rebuilds tensors and plain containers only and runs no code of the file's."""
    if not path.is_file():
        raise GalleryError(f"Gallery weights file {path} does not exist. Fix gallery.weights, or convert the weights first (README: a pretrained gallery model).")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, IndexError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise GalleryError(
            f"Gallery weights file {path} is unreadable ({type(exc).__name__}: {first}). It must be a state dict saved as "
            f".safetensors, or as .pth holding only tensors: torch.save(model.state_dict(), ...), not the model object."
        ) from None
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GalleryError(f"Gallery weights file {path} does not hold a state dict (a mapping of names to tensors).")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _orthogonal_projection(features: int, embed_dim: int, seed: int) -> EmbeddingHead:
    """A fixed projection ``features -> embed_dim`` with orthonormal rows (or columns), seeded."""
    head = EmbeddingHead(features, embed_dim)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(features, embed_dim), min(features, embed_dim), generator=generator))
    with torch.no_grad():
        head.weight.copy_(q.t() if embed_dim <= features else q)
        head.bias.zero_()
    return head.requires_grad_(False)


def load_gallery_weights(config: GalleryConfig, in_chans: int, seed: int = 0) -> GalleryNet:
    """The gallery model from ``gallery.weights`` (a timm-compatible state dict) or timm's pretrained
    weights (``gallery.pretrained``), no training: pooled features, or with ``embed_dim`` a fixed
    seeded orthogonal projection of them; preprocessing from timm's data config for the model
    unless ``gallery.preprocessing`` is set."""
    _check_model_name(config.model)
    if config.weights is not None:
        path = Path(config.weights)
        state = _read_state_dict(path)
        backbone = timm.create_model(config.model, pretrained=False, num_classes=0, in_chans=in_chans)
        classifier = str(backbone.pretrained_cfg.get("classifier") or "classifier")
        state = {k: v for k, v in state.items() if not (k == classifier or k.startswith(classifier + "."))}
        first = str(backbone.pretrained_cfg.get("first_conv") or "") + ".weight"
        if first in state and state[first].ndim == 4 and state[first].shape[1] == 3 and in_chans == 1:
            state[first] = state[first].sum(dim=1, keepdim=True)  # RGB filters summed for grey input (timm does the same)
        check_state_dict(state, backbone, f"Gallery weights file {path}", "check gallery.model names the architecture the weights were "
                         "trained for", GalleryError, f"timm's {config.model!r}", optional=("num_batches_tracked",))  # a counter, not a weight
        backbone.load_state_dict(state, strict=False)  # every key checked above
    else:
        try:
            with pretrained_download(config.model):  # no network and nothing cached: a GalleryError at once, not after retries
                backbone = timm.create_model(config.model, pretrained=True, num_classes=0, in_chans=in_chans)
        except GalleryError:
            raise
        except Exception as exc:  # noqa: BLE001 - timm's download raises whatever the hub client raises
            raise GalleryError(
                f"Could not get timm's pretrained weights for {config.model!r} ({type(exc).__name__}: {exc}). Without a network, "
                f"download them elsewhere and set gallery.weights to the file (and gallery.pretrained to false)."
            ) from None
    preprocessing = configured_preprocessing(config) or Preprocessing.from_timm(backbone, in_chans)
    model = GalleryNet(config.model, in_chans, None, 0, preprocessing, backbone=backbone)
    if config.embed_dim:
        model.proj = _orthogonal_projection(pooled_width(backbone), config.embed_dim, seed)
        model.embed_dim = config.embed_dim
    return model.eval()


def open_gallery(
    config: GalleryConfig,
    data: ImageSet,
    split: Split,
    out_dir: Path,
    device: torch.device,
    *,
    seed: int = 0,
    log: Callable[[str], None] = print,
    retrain: bool = False,
    may_train: bool = True,
    workers: int | None = None,
    threads: ThreadSizer | None = None,
    speed: Speed | None = None,
) -> tuple[GalleryNet, str, Path | None] | None:
    """The configured gallery model, the SHA-256 identifying its weights, and its checkpoint file
    (None for weights not written by us). Without checkpoint, weights or pretrained, the model
    under ``out_dir/gallery`` is loaded, or trained there when ``may_train`` (else None)."""
    source = config.source
    if source == "checkpoint":
        path = Path(config.checkpoint or "")
        return load_gallery(config, path, data.channels), file_sha256(path), path
    if source in ("weights", "pretrained"):
        what = config.weights if source == "weights" else "timm's pretrained weights"
        log(f"Gallery model: {config.model} from {what}")
        model = load_gallery_weights(config, data.channels, seed)
        return model, state_sha256(model), None
    path = out_dir / "gallery" / "gallery.safetensors"
    if path.is_file() and not retrain:
        log(f"Gallery model: loading {path}")
        return load_gallery(config, path, data.channels), file_sha256(path), path
    if not may_train:
        return None
    log(f"Gallery model: no checkpoint configured; training {config.model} on {len(split.train)} images -> {path}")
    model = train_gallery(config, data, split, path, device, seed=seed, log=log, workers=workers, threads=threads, speed=speed)
    return model, file_sha256(path), path
