"""Fashion-MNIST (Xiao et al., 2017): the ``fashion_mnist`` data set.

The idx files as Debian's package ``dataset-fashion-mnist`` installs them
(``/usr/share/datasets/fashion-mnist``). The official train and test files are pooled
(70,000 images) and split by ``data.protocol`` (:mod:`nas.data.splits`), a seeded split
of our own.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.images import ImageSet
from nas.data.registry import DATASETS, DatasetEntry
from nas.errors import DataError

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["read_idx", "load_fashion_mnist", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DEFAULT_PATH"]

#: Where ``apt-get install dataset-fashion-mnist`` puts the files: ``data.path`` when it is null.
FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
FASHION_MNIST_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)

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
    """Load and pool Fashion-MNIST's train and test idx files from ``path`` (one channel)."""
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


def _read(config: DataConfig) -> ImageSet:
    return load_fashion_mnist(config.resolved_path)


DATASETS.add("fashion_mnist", DatasetEntry.labelled(_read, channels=1, default_path=FASHION_MNIST_DEFAULT_PATH))
