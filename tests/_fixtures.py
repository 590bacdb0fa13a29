"""Shared helpers for the unit tests: small real data and idx-file writing.

Not a conftest: import the helpers explicitly (``from _fixtures import ...``).
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np

from nas.data import ImageSet

#: idx type codes of the numpy dtypes the MNIST idx format allows.
IDX_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}

FASHION_MNIST_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx-file encoding of ``array`` (magic, big-endian dims, big-endian data)."""
    array = np.asarray(array)
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    code = IDX_TYPE_CODES[np.dtype(dtype)]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def write_idx(path: str | Path, array: np.ndarray, gz: bool | None = None) -> Path:
    """Write ``array`` as an idx file; gzipped when ``gz`` (default: when the name ends in ``.gz``)."""
    path = Path(path)
    gz = path.suffix == ".gz" if gz is None else gz
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as ``uint8 (N, 8, 8)`` in [0, 255] and int64 labels (copies)."""
    images, labels = _digits()
    return images.copy(), labels.copy()


def digits_image_set(per_class: int | None = None, size: int | None = None) -> ImageSet:
    """The digits as an :class:`nas.data.ImageSet` ``(N, H, W, 1)``; optionally ``per_class`` images of
    each class (the first ones) and upsampled to ``size`` (nearest neighbour, stays uint8)."""
    images, labels = digits_uint8()
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
        keep.sort()
        images, labels = images[keep], labels[keep]
    if size is not None and size != images.shape[1]:
        if size % images.shape[1]:
            raise ValueError(f"size must be a multiple of {images.shape[1]}, but got {size}.")
        factor = size // images.shape[1]
        images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    return ImageSet(name="digits", images=np.ascontiguousarray(images[..., None]), labels=labels, classes=tuple(str(i) for i in range(10)))


def write_fashion_mnist_folder(folder: str | Path, n_train: int = 120, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Write the digits as the four Fashion-MNIST idx files in ``folder``.

    The first ``n_train`` images go to the ``train-*`` files, the rest to ``t10k-*``.
    Returns the pooled images and labels in file order (train first).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = digits_uint8()
    labels = labels.astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / (FASHION_MNIST_NAMES[0] + suffix), images[:n_train], gz)
    write_idx(folder / (FASHION_MNIST_NAMES[1] + suffix), labels[:n_train], gz)
    write_idx(folder / (FASHION_MNIST_NAMES[2] + suffix), images[n_train:], gz)
    write_idx(folder / (FASHION_MNIST_NAMES[3] + suffix), labels[n_train:], gz)
    return images, labels.astype(np.int64)
