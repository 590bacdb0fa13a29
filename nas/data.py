"""Image sets, their loaders, the stratified split and preprocessing.

Two loaders:

* ``fashion_mnist``: the idx files of Fashion-MNIST (Xiao et al., 2017), as Debian's
  package ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``).
  The official train and test files are pooled (70,000 images) and split by our own
  stratified, seeded split.
* ``image_folder``: one sub-folder per class, any image format PIL reads, resized to
  ``data.image_size``.

Images are kept in memory as ``uint8`` arrays of shape ``(N, H, W, C)``; each model
resizes them to its own input resolution with :func:`preprocess`.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas.config import DataConfig
from nas.errors import ConfigError, DataError

__all__ = [
    "ImageSet",
    "Split",
    "read_idx",
    "load_fashion_mnist",
    "load_image_folder",
    "load_dataset",
    "list_datasets",
    "stratified_split",
    "split_dataset",
    "preprocess",
    "iter_batches",
    "PREPROCESSING",
]

#: How images become network input; written into model cards.
PREPROCESSING = "uint8 -> float in [0,1] -> bilinear resize (antialiased) to the model's resolution -> (x - 0.5) / 0.5"

FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: images must be a uint8 array (N, H, W, C), but got {self.images.dtype} {self.images.shape}.")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels.")

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def fingerprint(self) -> str:
        """SHA-256 of the pixels and labels: the data part of the gallery cache key."""
        digest = hashlib.sha256()
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        digest.update(self.labels.astype(np.int64).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True, eq=False)
class Split:
    """Disjoint index arrays into an :class:`ImageSet`."""

    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    gallery: np.ndarray

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.train, self.val, self.query, self.gallery):
            digest.update(part.astype(np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "query": len(self.query), "gallery": len(self.gallery)}


# --------------------------------------------------------------------------- idx files


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an idx file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header).")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or padded: expected {expected} data bytes for shape {shape}, found {len(raw) - header}.")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(path: str | Path) -> ImageSet:
    """Load and pool Fashion-MNIST's train and test idx files from ``path``."""
    folder = Path(path)
    images, labels = [], []
    for image_stem, label_stem in FASHION_MNIST_FILES:
        image_file, label_file = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
        if image_file is None or label_file is None:
            missing = image_stem if image_file is None else label_stem
            raise DataError(
                f"Fashion-MNIST not found: {folder / (missing + '.gz')} is missing. The loader expects the four idx files "
                f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                f"t10k-labels-idx1-ubyte.gz) in data.path. Install them with 'apt-get install dataset-fashion-mnist' "
                f"(they go to /usr/share/datasets/fashion-mnist) or set data.path to the folder that holds them."
            )
        x, y = read_idx(image_file), read_idx(label_file)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{image_file} and {label_file} do not match: images {x.shape}, labels {y.shape}.")
        images.append(x)
        labels.append(y)
    x = np.concatenate(images)[..., None].astype(np.uint8)
    y = np.concatenate(labels).astype(np.int64)
    n_classes = int(y.max()) + 1
    classes = FASHION_MNIST_CLASSES if n_classes == len(FASHION_MNIST_CLASSES) else tuple(str(i) for i in range(n_classes))
    return ImageSet(name="fashion_mnist", images=x, labels=y, classes=classes)


def load_image_folder(path: str | Path, image_size: int, channels: int = 3) -> ImageSet:
    """Load ``path/<class>/<image>`` files, resized to ``image_size`` squared.

    An unreadable image is an error naming the file: a retrieval benchmark with silently
    missing images gives wrong scores.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist. Set data.path to a folder with one sub-folder of images per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"Image folder {root} has no class sub-folders. Expected {root}/<class name>/<image files>.")
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        for file in files:
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # PIL's PNG plugin raises SyntaxError
                raise DataError(f"Cannot read image {file}: {exc}. Remove or replace the file.") from None
            images.append(array.reshape(image_size, image_size, channels))
            labels.append(label)
    return ImageSet(
        name=f"image_folder:{root.name}",
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(p.name for p in class_dirs),
    )


_LOADERS: dict[str, Callable[[DataConfig], ImageSet]] = {
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg.resolved_path),
    "image_folder": lambda cfg: load_image_folder(cfg.resolved_path, cfg.image_size, cfg.resolved_channels),
}


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(config: DataConfig) -> ImageSet:
    """Load the data set ``config.dataset`` with ``config.resolved_channels`` channels."""
    if config.dataset not in _LOADERS:
        close = difflib.get_close_matches(config.dataset, list(_LOADERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"Unknown dataset {config.dataset!r}.{hint} Valid datasets: {', '.join(list_datasets())}.")
    if config.resolved_path is None:
        raise ConfigError(f"data.path must be set for dataset {config.dataset!r}.")
    data = _LOADERS[config.dataset](config)
    if data.channels == 1 and config.resolved_channels == 3:
        data = ImageSet(data.name, np.repeat(data.images, 3, axis=3), data.labels, data.classes)
    elif data.channels == 3 and config.resolved_channels == 1:
        gray = (data.images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round()
        data = ImageSet(data.name, gray.clip(0, 255).astype(np.uint8)[..., None], data.labels, data.classes)
    return data


# --------------------------------------------------------------------------- split


def stratified_split(
    labels: np.ndarray, train: float, val: float, query: float, gallery: float, seed: int, max_per_class: int | None = None
) -> Split:
    """Split per class into disjoint train / val / query / gallery index sets.

    Deterministic for a given ``seed``; every class contributes the same fractions; query
    and gallery never contain training images. A class too small to give each part at
    least one image is an error.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "query": [], "gallery": []}
    fractions = {"train": train, "val": val, "query": query, "gallery": gallery}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        if max_per_class is not None:
            idx = idx[:max_per_class]
        counts = {name: int(np.floor(frac * len(idx))) for name, frac in fractions.items()}
        if min(counts.values()) < 1:
            raise DataError(
                f"Class {cls} has {len(idx)} images, too few to give every split part (train/val/query/gallery) "
                f"at least one image with fractions {fractions}. Use a larger data set or larger fractions."
            )
        start = 0
        for name in ("train", "val", "query", "gallery"):
            parts[name].append(idx[start : start + counts[name]])
            start += counts[name]
    return Split(**{name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()})


def split_dataset(data: ImageSet, config: DataConfig) -> Split:
    """The split ``config`` describes (fractions, seed, per-class cap) of ``data``."""
    return stratified_split(data.labels, config.train, config.val, config.query, config.gallery, config.seed, config.max_per_class)


# --------------------------------------------------------------------------- preprocessing


def preprocess(images: np.ndarray, resolution: int) -> torch.Tensor:
    """``uint8 (N, H, W, C)`` -> normalised float ``(N, C, resolution, resolution)``; see :data:`PREPROCESSING`."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # torch.from_numpy wants a writable buffer
        images = images.copy()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x.sub_(0.5).div_(0.5)


def iter_batches(images: np.ndarray, resolution: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Preprocessed batches of ``images`` in order."""
    for start in range(0, len(images), batch_size):
        yield preprocess(images[start : start + batch_size], resolution)
