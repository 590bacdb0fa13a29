"""``data.unlabeled``: a folder of images without labels, trained on beside a split's training images.

The images are distillation images only: the gallery model embeds them and the query network
learns to land on those embeddings, so they need no labels. They must stay apart from what
the search is scored on: :func:`check_apart` refuses a folder holding a val or query image.

* :func:`load_unlabeled`: the folder's image files (recursively, sorted) as
  :class:`~nas.data.sources.FileImages`;
* :class:`JoinedImages`: two sources indexed as one (a split's images, then the folder's);
* :func:`check_apart`: no image of the folder is a val or query image, compared by content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.images import ImageSet, Split
from nas.data.sources import IMAGE_SUFFIXES, FileImages, ImageSource, content_sample
from nas.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["load_unlabeled", "JoinedImages", "check_apart"]


def load_unlabeled(path: str | Path, channels: int, image_size: int | None = None) -> FileImages:
    """The image files under ``path`` (any depth, sorted), decoded with ``channels`` channels like the data set's."""
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data.unlabeled: {root} {what}. Set it to a folder of images (any layout), or to null.")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"data.unlabeled: {root} holds no images ({', '.join(IMAGE_SUFFIXES)}). Point it at a folder of images, or set it to null.")
    return FileImages(root, files, channels, max_side=image_size, title="data.unlabeled")


class JoinedImages(ImageSource):
    """``first`` then ``second`` as one source: index ``i < len(first)`` is ``first[i]``, the rest ``second[i - len(first)]``."""

    def __init__(self, first: ImageSource, second: ImageSource) -> None:
        if first.channels != second.channels:
            raise ValueError(f"joined sources must have the same channels, but got {first.channels} and {second.channels}.")
        self.first, self.second = first, second
        self.channels = first.channels

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def _where(self, index: int) -> tuple[ImageSource, int]:
        n = len(self.first)
        return (self.first, index) if index < n else (self.second, index - n)

    def open(self, index: int, min_side: int | None = None) -> PILImage:
        source, i = self._where(int(index))
        return source.open(i, min_side)

    def describe(self, index: int) -> str:
        source, i = self._where(int(index))
        return source.describe(i)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"joined|{self.first.fingerprint()}|{self.second.fingerprint()}".encode()).hexdigest()

    def with_channels(self, channels: int) -> JoinedImages:
        return self if channels == self.channels else JoinedImages(self.first.with_channels(channels), self.second.with_channels(channels))

    def check_headers(self) -> None:
        self.first.check_headers()
        self.second.check_headers()


def _pixel_key(picture: np.ndarray) -> str:
    return hashlib.sha256(f"{picture.shape}".encode() + np.ascontiguousarray(picture).tobytes()).hexdigest()


def _keys(source: ImageSource, indices: Sequence[int] | np.ndarray, by_file: bool) -> dict[str, int]:
    """A content key per image ``indices`` of ``source`` (its file's size and sampled bytes, or its decoded pixels)."""
    keys: dict[str, int] = {}
    for i in (int(i) for i in indices):
        if by_file:
            assert isinstance(source, FileImages)
            size, sample = content_sample(source.root / source.files[i])
            keys[f"{size}|{sample}"] = i
        else:
            keys[_pixel_key(np.asarray(source.open(i)))] = i
    return keys


def check_apart(unlabeled: FileImages, data: ImageSet, split: Split) -> None:
    """Refuse ``unlabeled`` when one of its images is a val or query image of ``split``: training on it would leak what is scored.

    Image files are compared by size and content sample (the data fingerprint's); an in-memory data set
    by decoded pixels. A re-encoded copy of a photo is not caught: keep the folder apart by where it comes from.
    """
    scored = np.concatenate([np.asarray(split.val), np.asarray(split.query)]).astype(np.int64)
    by_file = isinstance(data.images, FileImages)
    mine = _keys(unlabeled, range(len(unlabeled)), by_file)
    theirs = _keys(data.images, scored, by_file)
    shared = [key for key in mine if key in theirs]
    if shared:
        examples = "; ".join(f"{unlabeled.describe(mine[k])} is {data.images.describe(theirs[k])}" for k in shared[:3])
        raise DataError(
            f"data.unlabeled holds {len(shared)} of the val or query images, which the search is scored on ({examples}). "
            f"Remove them from {unlabeled.root}: images trained on must stay apart from val and query."
        )
