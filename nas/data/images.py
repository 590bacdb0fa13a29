"""Images in memory, the index split into them, reading image files and preprocessing.

Images are kept in memory as ``uint8`` arrays of shape ``(N, H, W, C)``; each model
resizes them to its own input resolution with :func:`preprocess`. A :class:`Split` holds
the index arrays of the train / val / query / gallery parts (see :mod:`nas.data.splits`
for the labelled data sets' splits; a benchmark's own files define its split).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from nas.errors import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageSet",
    "Split",
    "VAL_AGAINST",
    "PREPROCESSING",
    "IMAGE_SUFFIXES",
    "IMAGE_ERRORS",
    "MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "open_image",
    "read_image",
    "to_channels",
    "preprocess",
    "iter_batches",
]

#: How images become network input; written into model cards.
PREPROCESSING = "uint8 -> float in [0,1] -> bilinear resize (antialiased) to the model's resolution -> (x - 0.5) / 0.5"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: The largest image read, in pixels (width x height): 89,478,485, PIL's own default
#: (``PIL.Image.MAX_IMAGE_PIXELS``, about 9459 x 9459). A larger file is refused from its header,
#: before it is decoded: a 14000 x 14000 PNG of one colour is about 200 KB on disk but 588 MB as RGB
#: pixels (a decompression bomb). Set this module attribute to allow larger images; PIL itself
#: refuses anything over twice ``PIL.Image.MAX_IMAGE_PIXELS``, so raise that one too beyond it.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image file over :data:`MAX_IMAGE_PIXELS` pixels (one of :data:`IMAGE_ERRORS`)."""


#: What reading an image file raises for a missing, unreadable, corrupt or too large file (PIL's
#: ``UnidentifiedImageError`` is an ``OSError``; its PNG plugin raises ``SyntaxError``;
#: :class:`ImageTooLarge` is a ``ValueError``).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


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


# --------------------------------------------------------------------------- image files


@contextlib.contextmanager
def open_image(file: str | Path) -> Iterator[PILImage]:
    """``PIL.Image.open(file)`` refused, before decoding, when over :data:`MAX_IMAGE_PIXELS`
    (:class:`ImageTooLarge`); raises one of :data:`IMAGE_ERRORS` for the caller to name the file."""
    from PIL import Image  # deferred: only the image loaders need PIL

    limit = MAX_IMAGE_PIXELS
    guard = f"the limit of {limit:,} pixels (nas.data.images.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
    try:
        with warnings.catch_warnings():  # PIL warns between its limit and twice it; ours decides below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file)
    except Image.DecompressionBombError as exc:  # over twice PIL's own limit: refused by PIL from the header
        raise ImageTooLarge(f"it is larger than {guard}; PIL: {exc} Downscale it") from None
    with img:
        width, height = img.size
        if width * height > limit:
            raise ImageTooLarge(f"it has {width} x {height} = {width * height:,} pixels, more than {guard}; downscale it")
        yield img


def read_image(
    file: str | Path, image_size: int, channels: int, box: Sequence[float] | None = None, draft: bool = False
) -> np.ndarray:
    """One image file as uint8 ``(image_size, image_size, channels)``.

    The image is converted to grey (``channels == 1``) or RGB, cropped to ``box``
    ``(x1, y1, x2, y2)`` when one is given (PIL rounds the box, as the revisited Oxford/Paris
    code's crop does), then resized bilinearly. With ``draft`` an uncropped JPEG is decoded
    at a reduced scale no smaller than ``image_size`` first (PIL's ``draft``), which makes
    large benchmarks load fast. Raises one of :data:`IMAGE_ERRORS` for the caller to name
    the file in its own message.
    """
    from PIL import Image  # deferred as before: only the image loaders need PIL

    mode = "L" if channels == 1 else "RGB"
    with open_image(file) as img:
        if draft and box is None:
            img.draft(mode, (image_size, image_size))
        img = img.convert(mode)
        if box is not None:
            img = img.crop(tuple(float(v) for v in box))
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)


def to_channels(data: ImageSet, channels: int) -> ImageSet:
    """``data`` with ``channels`` channels: grey repeated to RGB, or RGB to grey (ITU-R 601 luma)."""
    if data.channels == 1 and channels == 3:
        return ImageSet(data.name, np.repeat(data.images, 3, axis=3), data.labels, data.classes)
    if data.channels == 3 and channels == 1:
        gray = (data.images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round()
        return ImageSet(data.name, gray.clip(0, 255).astype(np.uint8)[..., None], data.labels, data.classes)
    return data


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
