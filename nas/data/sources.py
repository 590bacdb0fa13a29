"""Where a data set's pixels come from: an :class:`ImageSource`, read one image at a time.

A source is indexed ``0 .. len(source) - 1`` and gives one decoded PIL image per index, in
mode ``L`` (1 channel) or ``RGB`` (3 channels). Nothing is decoded ahead of time:
:mod:`nas.data.loading` decodes, augments and resizes batches on the fly in
``DataLoader`` workers, so memory does not grow with the number of images.

* :class:`ArrayImages`: a uint8 array ``(N, H, W, C)`` already in memory (Fashion-MNIST,
  scikit-learn's digits: small, fixed-size sets).
* :class:`FileImages`: image files under a root folder (image folders and the benchmarks),
  optionally cropped to a box (revisited Oxford/Paris queries) and optionally reduced so that
  the shorter side is at most ``max_side`` (JPEGs are then decoded at a reduced scale,
  PIL's ``draft``).

Files are decoded by :func:`read_image`, through :func:`nas.data.decoding.decode`: as an image
viewer shows them (EXIF orientation applied, transparency over white, 16-bit images scaled to
8 bits), or refused naming the file.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.decoding import DECODING_VERSION, UnsupportedImage, check_mode, decode
from nas.errors import DataError
from nas.progress_bars import progress

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "ImageSource",
    "ArrayImages",
    "FileImages",
    "ImageReadError",
    "as_source",
    "IMAGE_SUFFIXES",
    "IMAGE_ERRORS",
    "MAX_IMAGE_PIXELS",
    "ImageTooLarge",
    "open_image",
    "read_image",
    "content_sample",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: The largest image read, in pixels (width x height): 89,478,485, PIL's own default
#: (``PIL.Image.MAX_IMAGE_PIXELS``, about 9459 x 9459). A larger file is refused from its header,
#: before it is decoded: a 14000 x 14000 PNG of one colour is about 200 KB on disk but 588 MB as RGB
#: pixels (a decompression bomb). Set this module attribute to allow larger images; PIL itself
#: refuses anything over twice ``PIL.Image.MAX_IMAGE_PIXELS``, so raise that one too beyond it.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image file over :data:`MAX_IMAGE_PIXELS` pixels (one of :data:`IMAGE_ERRORS`)."""


#: What reading an image file raises for a missing, unreadable, corrupt, too large or unrenderable file (PIL's
#: ``UnidentifiedImageError`` is an ``OSError``; its PNG plugin raises ``SyntaxError``;
#: :class:`ImageTooLarge` and :class:`nas.data.decoding.UnsupportedImage` are ``ValueError``).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError)


@contextlib.contextmanager
def open_image(file: str | Path) -> Iterator[PILImage]:
    """``PIL.Image.open(file)`` refused, before decoding, when over :data:`MAX_IMAGE_PIXELS`
    (:class:`ImageTooLarge`); raises one of :data:`IMAGE_ERRORS` for the caller to name the file."""
    from PIL import Image  # deferred: only the image loaders need PIL

    limit = MAX_IMAGE_PIXELS
    guard = f"the limit of {limit:,} pixels (nas.data.sources.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
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


def read_image(file: str | Path, mode: str, min_side: int | None = None) -> PILImage:
    """Image ``file`` as an 8-bit ``mode`` (``"L"`` or ``"RGB"``) image, decoded as a viewer shows it
    (:func:`nas.data.decoding.decode`). ``min_side``: a JPEG is decoded at a reduced scale no smaller
    than it (PIL's ``draft``). Raises one of :data:`IMAGE_ERRORS` for the caller to name the file."""
    with open_image(file) as img:
        if min_side:
            img.draft(mode, (min_side, min_side))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, never below min_side
        return decode(img, mode)


class ImageReadError(DataError):
    """An image of a source could not be read; the message names the file and the fix."""


class ImageSource(abc.ABC):
    """Images indexed ``0 .. len - 1``, decoded one at a time (see the module docstring)."""

    #: 1 (grey) or 3 (RGB): the mode every image is converted to.
    channels: int
    #: Whether the pixels are already in memory as one array (no decoding: loaders need no worker processes,
    #: and batches are gathered with :meth:`pixels` and transformed at once).
    in_memory: bool = False

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def open(self, index: int, min_side: int | None = None) -> PILImage:
        """Image ``index`` in mode ``L`` or ``RGB``. ``min_side`` is a hint: the caller will not
        need more than that many pixels on the shorter side, so a JPEG may be decoded at a
        reduced scale no smaller than it. Raises :class:`ImageReadError` naming the file."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """A SHA-256 that changes whenever the pixels may have changed: the data part of the gallery cache key."""

    @abc.abstractmethod
    def with_channels(self, channels: int) -> ImageSource:
        """The same images converted to ``channels`` channels (grey repeated to RGB, RGB to ITU-R 601 luma)."""

    def describe(self, index: int) -> str:
        """How an error names image ``index``."""
        return f"image {index}"

    def pixels(self, indices: np.ndarray) -> np.ndarray | None:
        """Images ``indices`` as one uint8 array ``(B, H, W, C)``, for a source :attr:`in_memory` (all of one size):
        the loaders then transform whole batches on tensors. Other sources: ``None`` (decoded one at a time)."""
        return None

    def check_headers(self) -> None:
        """Read every image's header (not its pixels): a missing, unrecognised or too large file is an
        :class:`ImageReadError` now, before any training; a file corrupt past its header is one when decoded."""

    def stack(self, size: int, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Images ``indices`` (all by default) resized bilinearly to ``size`` x ``size``, as uint8
        ``(N, size, size, C)``: for small sets, tests and tools; the search streams instead."""
        from PIL import Image  # deferred: PIL is needed only when images are decoded

        rows = range(len(self)) if indices is None else [int(i) for i in indices]
        out = np.empty((len(rows), size, size, self.channels), dtype=np.uint8)
        for k, i in enumerate(rows):
            img = self.open(i, size).resize((size, size), Image.Resampling.BILINEAR)
            out[k] = np.asarray(img, dtype=np.uint8).reshape(size, size, self.channels)
        return out


class ArrayImages(ImageSource):
    """A uint8 array ``(N, H, W, C)`` in memory, ``C`` 1 or 3."""

    in_memory = True

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 4 or array.dtype != np.uint8 or array.shape[3] not in (1, 3):
            raise DataError(f"Images must be a uint8 array (N, H, W, C) with C 1 or 3, but got {array.dtype} {array.shape}.")
        self.array = array
        self.channels = int(array.shape[3])

    def __len__(self) -> int:
        return len(self.array)

    def pixels(self, indices: np.ndarray) -> np.ndarray:
        return self.array[indices]

    def open(self, index: int, min_side: int | None = None) -> PILImage:
        from PIL import Image

        pixels = self.array[index]
        return Image.fromarray(np.ascontiguousarray(pixels[..., 0] if self.channels == 1 else pixels), "L" if self.channels == 1 else "RGB")

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(str(self.array.shape).encode())
        digest.update(np.ascontiguousarray(self.array).tobytes())
        return digest.hexdigest()

    def with_channels(self, channels: int) -> ArrayImages:
        if channels == self.channels:
            return self
        if channels == 3:
            return ArrayImages(np.repeat(self.array, 3, axis=3))
        gray = (self.array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round()
        return ArrayImages(gray.clip(0, 255).astype(np.uint8)[..., None])


class FileImages(ImageSource):
    """Image files ``root / files[i]``, decoded on demand.

    ``boxes`` maps an index to an ``(x1, y1, x2, y2)`` crop applied first, in the coordinates of
    the decoded (upright) picture (PIL rounds the box, as the revisited Oxford/Paris code does). ``max_side``: when set, an image whose
    shorter side is longer is reduced to it (bilinear) right after decoding; JPEGs are then
    decoded at a reduced scale no smaller than it. ``listed_in`` names where the file list
    came from, for error messages.
    """

    def __init__(
        self,
        root: str | Path,
        files: Sequence[str],
        channels: int = 3,
        *,
        boxes: Mapping[int, Sequence[float]] | None = None,
        max_side: int | None = None,
        listed_in: str | None = None,
        title: str | None = None,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, but got {channels}.")
        self.root = Path(root)
        self.files = tuple(str(f) for f in files)
        self.channels = channels
        self.boxes = {int(k): tuple(float(v) for v in box) for k, box in (boxes or {}).items()}
        self.max_side = max_side
        self.listed_in = listed_in
        self.title = title

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        listed = f" (listed in {self.listed_in})" if self.listed_in else ""
        return f"image {self.root / self.files[index]}{listed}"

    def _error(self, index: int, what: str) -> ImageReadError:
        message = f"cannot read {self.describe(index)}: {what}"
        return ImageReadError(f"{self.title}: {message}" if self.title else message[0].upper() + message[1:])

    def open(self, index: int, min_side: int | None = None) -> PILImage:
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        path = self.root / self.files[index]
        box = self.boxes.get(index)
        target = min(s for s in (min_side, self.max_side) if s) if (min_side or self.max_side) else None
        try:
            img = read_image(path, mode, None if box is not None else target)
            if box is not None:
                img = img.crop(box)  # in the coordinates of the upright picture (EXIF orientation applied)
        except FileNotFoundError:
            raise self._error(index, "the file is missing. Put every listed image in place, or fix data.path.") from None
        except UnsupportedImage as exc:  # its message says how to convert the file
            raise self._error(index, str(exc)) from None
        except IMAGE_ERRORS as exc:
            raise self._error(index, f"{exc}. Remove or replace the file.") from None
        shorter = min(img.size)
        if self.max_side and shorter > self.max_side:
            scale = self.max_side / shorter
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
        return img

    def check_headers(self) -> None:
        for index in progress(range(len(self.files)), len(self.files), "checking image files"):
            try:
                with open_image(self.root / self.files[index]) as img:
                    check_mode(img)  # a float image is refused now, naming the file, not after training started
            except FileNotFoundError:
                raise self._error(index, "the file is missing. Put every listed image in place, or fix data.path.") from None
            except UnsupportedImage as exc:
                raise self._error(index, str(exc)) from None
            except IMAGE_ERRORS as exc:
                raise self._error(index, f"{exc}. Remove or replace the file.") from None

    def fingerprint(self) -> str:
        """Path (relative to the root), size and content sample of every file, its box, ``max_side``
        and the decoding version. The content sample is the SHA-256 of a file's first and last
        :data:`SAMPLED_BYTES` (the whole file when it is smaller than twice that, as CUB's photos
        are): a replaced or re-encoded image changes the key, while copying or touching the folder
        (new modification times) does not, so a study and its gallery cache survive a copy."""
        digest = hashlib.sha256()
        digest.update(f"files|{self.channels}|{self.max_side}|decoding {DECODING_VERSION}".encode())
        for i, name in enumerate(self.files):
            try:
                size, sample = content_sample(self.root / name)
            except FileNotFoundError:
                raise self._error(i, "the file is missing. Put every listed image in place, or fix data.path.") from None
            except OSError as exc:
                raise self._error(i, f"it cannot be read ({exc.strerror or exc}). Fix its permissions or remove it.") from None
            digest.update(f"\n{name}|{size}|{sample}|{self.boxes.get(i, '')}".encode())
        return digest.hexdigest()

    def with_channels(self, channels: int) -> FileImages:
        if channels == self.channels:
            return self
        return FileImages(
            self.root, self.files, channels, boxes=self.boxes, max_side=self.max_side, listed_in=self.listed_in, title=self.title
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileImages:
        """The files ``indices`` in that order (their boxes follow them)."""
        rows = [int(i) for i in indices]
        boxes = {k: self.boxes[i] for k, i in enumerate(rows) if i in self.boxes}
        return FileImages(
            self.root, [self.files[i] for i in rows], self.channels, boxes=boxes, max_side=self.max_side, listed_in=self.listed_in, title=self.title
        )


#: bytes read from each end of an image file for the data fingerprint (FileImages.fingerprint)
SAMPLED_BYTES = 64 * 1024


def content_sample(path: Path) -> tuple[int, str]:
    """A file's size and the SHA-256 (first 16 hex digits) of its first and last SAMPLED_BYTES."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(SAMPLED_BYTES if size > 2 * SAMPLED_BYTES else size)
        tail = b""
        if size > 2 * SAMPLED_BYTES:
            handle.seek(size - SAMPLED_BYTES)
            tail = handle.read(SAMPLED_BYTES)
    return size, hashlib.sha256(head + tail).hexdigest()[:16]


def as_source(images: ImageSource | np.ndarray) -> ImageSource:
    """``images`` as a source: a uint8 array ``(N, H, W, C)`` becomes :class:`ArrayImages`."""
    return images if isinstance(images, ImageSource) else ArrayImages(np.asarray(images))
