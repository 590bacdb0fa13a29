"""Image sets, their loaders, the stratified split and preprocessing.

Two loaders:

* ``fashion_mnist``: the idx files of Fashion-MNIST (Xiao et al., 2017), as Debian's
  package ``dataset-fashion-mnist`` installs them (``/usr/share/datasets/fashion-mnist``).
  The official train and test files are pooled (70,000 images) and split by our own
  stratified, seeded split.
* ``image_folder``: one sub-folder per class, any image format PIL reads, resized to
  ``data.image_size``.
* the retrieval benchmarks ``cub200``, ``sop``, ``inshop``, ``roxford5k`` and ``rparis6k``
  (their official layouts, with the split their files define): :mod:`nas.retrieval_data`.

The labelled sets are split by ``data.protocol``: stratified (:func:`stratified_split`, the
same classes everywhere) or class-disjoint (:func:`class_disjoint_split`, query and gallery
hold classes never trained on).

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

from nas.config import BENCHMARKS, DataConfig
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
    "class_disjoint_split",
    "split_dataset",
    "VAL_AGAINST",
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


#: What the val part is searched against (see :class:`Split`).
VAL_AGAINST = ("gallery", "val", "self")


@dataclass(frozen=True, eq=False)
class Split:
    """Index arrays into an :class:`ImageSet`, and how its val and query parts are scored.

    ``train``, ``val``, ``query`` and ``gallery`` are disjoint, except that with
    ``query_is_gallery`` query and gallery are the same images (equal arrays): each query's
    own gallery entry is then excluded *by index* when scoring. ``val_against`` says what the
    val images are searched against:

    * ``gallery``: the gallery part (same-classes protocol: val shares its classes);
    * ``val``: the val images themselves, each one's own entry excluded by index
      (class-disjoint protocols, whose gallery holds none of val's classes);
    * ``self``: the val images themselves, each image's only positive being its own
      gallery-model embedding (data without class labels: revisited Oxford/Paris).

    :func:`nas.retrieval_data.score_part` scores a part accordingly.
    """

    train: np.ndarray
    val: np.ndarray
    query: np.ndarray
    gallery: np.ndarray
    query_is_gallery: bool = False
    val_against: str = "gallery"

    def __post_init__(self) -> None:
        if self.val_against not in VAL_AGAINST:
            raise ValueError(f"val_against must be one of {VAL_AGAINST}, but got {self.val_against!r}.")
        if self.query_is_gallery and not np.array_equal(self.query, self.gallery):
            raise ValueError("query_is_gallery needs query and gallery to be the same index array.")

    def fingerprint(self) -> str:
        """SHA-256 of the index arrays: the split part of the gallery cache key (the two flags
        change how parts are scored, not their embeddings, so they are not part of it)."""
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


def _load_benchmark_images(config: DataConfig) -> ImageSet:
    from nas.retrieval_data import load_benchmark  # it imports this module

    return load_benchmark(config).data


_LOADERS: dict[str, Callable[[DataConfig], ImageSet]] = {
    "fashion_mnist": lambda cfg: load_fashion_mnist(cfg.resolved_path),
    "image_folder": lambda cfg: load_image_folder(cfg.resolved_path, cfg.image_size, cfg.resolved_channels),
    **{name: _load_benchmark_images for name in BENCHMARKS},
}


def list_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(config: DataConfig) -> ImageSet:
    """Load the data set ``config.dataset`` with ``config.resolved_channels`` channels.

    For a benchmark this is only its images; its split and ground truth come with
    :func:`nas.retrieval_data.load_retrieval_data`, which serves every data set.
    """
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


def class_disjoint_split(
    labels: np.ndarray,
    test_classes: float,
    val_classes: float,
    query: float,
    gallery: float,
    seed: int,
    max_per_class: int | None = None,
    query_is_gallery: bool = True,
) -> Split:
    """Split by class: train, val and the evaluation (query / gallery) classes are disjoint.

    A seeded ``test_classes`` fraction of the classes (at least two) holds the query and
    gallery images; a seeded ``val_classes`` fraction of the remaining classes (at least
    two: with one class every neighbour is a positive) is val, searched against itself with
    each image's own entry excluded; the other classes (at least one) are train. With
    ``query_is_gallery`` every evaluation image is both a query and a gallery image (the
    metric-learning convention); otherwise each evaluation class is split query : gallery
    in the ratio ``query`` : ``gallery`` (at least one of each).
    ``max_per_class`` keeps a seeded subset of each class. Deterministic for a ``seed``.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    if len(classes) < 5:
        raise DataError(
            f"The class-disjoint protocol needs at least 5 classes (2 test, 2 val, 1 train), but the data set has {len(classes)}."
        )
    n_test = min(max(2, int(round(test_classes * len(classes)))), len(classes) - 3)
    n_val = min(max(2, int(round(val_classes * (len(classes) - n_test)))), len(classes) - n_test - 1)
    order = rng.permutation(classes)
    test_set, val_set = order[:n_test], order[n_test : n_test + n_val]
    members: dict[int, np.ndarray] = {}
    for cls in classes:
        idx = np.flatnonzero(labels == cls)
        if max_per_class is not None and len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        members[int(cls)] = idx

    def gather(chosen: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([members[int(c)] for c in chosen]))

    train = gather(np.setdiff1d(classes, np.concatenate([test_set, val_set])))
    val = gather(val_set)
    if max(len(members[int(c)]) for c in val_set) < 2:
        raise DataError(
            f"The val classes {sorted(int(c) for c in val_set)} have one image each: a val image would have no positive. "
            f"Use more images per class or a larger data.val_classes."
        )
    if query_is_gallery:
        evaluation = gather(test_set)
        if max(len(members[int(c)]) for c in test_set) < 2:
            raise DataError("Every held-out class has a single image, so no query has a positive. Use more images per class.")
        return Split(train, val, evaluation, evaluation.copy(), query_is_gallery=True, val_against="val")
    share = query / (query + gallery)
    queries, galleries = [], []
    for cls in np.sort(test_set):
        idx = members[int(cls)][rng.permutation(len(members[int(cls)]))]
        if len(idx) < 2:
            raise DataError(f"Class {cls} has {len(idx)} image, too few to give both query and gallery one. Use query_is_gallery.")
        n_query = min(max(1, int(np.floor(share * len(idx)))), len(idx) - 1)
        queries.append(idx[:n_query])
        galleries.append(idx[n_query:])
    return Split(train, val, np.sort(np.concatenate(queries)), np.sort(np.concatenate(galleries)), val_against="val")


def split_dataset(data: ImageSet, config: DataConfig) -> Split:
    """The split ``config`` describes (protocol, fractions, seed, per-class cap) of ``data``.

    Only for the labelled data sets; a benchmark's split comes from its files
    (:func:`nas.retrieval_data.load_retrieval_data`).
    """
    if config.dataset in BENCHMARKS:
        raise ValueError(f"{config.dataset}'s split is defined by its files: use nas.retrieval_data.load_retrieval_data.")
    if config.resolved_protocol == "class_disjoint":
        return class_disjoint_split(
            data.labels, config.test_classes, config.val_classes, config.query, config.gallery, config.seed,
            config.max_per_class, config.resolved_query_is_gallery,
        )
    split = stratified_split(data.labels, config.train, config.val, config.query, config.gallery, config.seed, config.max_per_class)
    if config.resolved_query_is_gallery:
        pooled = np.sort(np.concatenate([split.query, split.gallery]))
        return Split(split.train, split.val, pooled, pooled.copy(), query_is_gallery=True)
    return split


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
