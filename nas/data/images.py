"""A data set's images and labels (:class:`ImageSet`) and its split into parts (:class:`Split`).

An :class:`ImageSet` holds an :class:`~nas.data.sources.ImageSource`: images are decoded
one at a time when a loader needs them (:mod:`nas.data.loading`), never all at once. A
:class:`Split` holds the index arrays of the train / val / query / gallery parts (see
:mod:`nas.data.splits` for the labelled data sets' splits; a benchmark's own files define
its split).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from nas.data.sources import ImageSource, as_source
from nas.errors import DataError

__all__ = ["ImageSet", "Split", "VAL_AGAINST"]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Labelled images: ``images`` an :class:`~nas.data.sources.ImageSource` (a uint8 array
    ``(N, H, W, C)`` is accepted and wrapped), ``labels`` int64 ``(N,)`` (-1: no label)."""

    name: str
    images: ImageSource
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", as_source(self.images))
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels.")

    @property
    def channels(self) -> int:
        return self.images.channels

    def fingerprint(self) -> str:
        """SHA-256 of the images (see :meth:`ImageSource.fingerprint`) and labels: the data part of the gallery cache key."""
        digest = hashlib.sha256()
        digest.update(self.images.fingerprint().encode())
        digest.update(self.labels.astype(np.int64).tobytes())
        return digest.hexdigest()

    def with_channels(self, channels: int) -> ImageSet:
        """The same set with ``channels`` channels (grey repeated to RGB, or RGB to ITU-R 601 luma)."""
        if channels == self.channels:
            return self
        return ImageSet(self.name, self.images.with_channels(channels), self.labels, self.classes)


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

    :func:`nas.scoring.score_part` scores a part accordingly.
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
