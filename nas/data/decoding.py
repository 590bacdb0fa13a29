"""Turning an opened image file into the 8-bit picture an image viewer shows: :func:`decode`.

Every path that reads image files (folder data sets and benchmarks for training and scoring,
``nas embed``) decodes through :func:`decode`, so a file gives the same pixels wherever it is read:

* **Orientation**: the EXIF orientation tag (values 2-8) is applied (``PIL.ImageOps.exif_transpose``),
  so a phone photo stored sideways is upright.
* **Transparency** (RGBA, LA, PA, premultiplied RGBa/La, and palette, grey or RGB images with a
  transparent colour): composited over a white background, as a web page shows it, rather than
  dropping the alpha channel (which reveals whatever colour the transparent pixels happen to hold).
* **Integer images of more than 8 bits** (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` and
  ``I``: 16-bit PNG, TIFF and PGM/PPM files, 32-bit TIFFs; PIL scales a PGM/PPM whose maximum value is
  neither 255 nor 65535, a 12-bit one say, to 16 bits): scaled by their bit depth,
  ``round(value * 255 / (2**bits - 1))``, so 16-bit 65535 is white and 32768 mid-grey (PIL's own
  ``convert`` clips at 255, turning a 16-bit picture all white). A signed image is scaled over its
  non-negative range (``2**(bits-1) - 1``); one with a negative pixel is refused.
* **Palette** (P), **1-bit**, **CMYK** (PIL's conversion, which also reads the inverted CMYK of
  Adobe JPEGs), **YCbCr**, **HSV** and **CIE LAB** (to sRGB through LittleCMS, as PIL converts it):
  PIL's conversion to RGB.
* **Files of several frames** (animated GIF, multi-page TIFF): the first frame, as a file
  browser's thumbnail shows it.
* **Floating-point images** (mode ``F``) have no fixed range (0..1, 0..255 or HDR values are all in
  use), so no faithful 8-bit rendering: they are refused, as is any mode PIL adds later, with an
  :class:`UnsupportedImage` naming the mode and how to convert the file.

16-bit-per-channel RGB(A) PNGs are opened by PIL as 8-bit RGB(A) (the high byte of each
sample), which is their 8-bit rendering. Embedded ICC colour profiles are not applied (PIL does
not either): pixels are taken as sRGB.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["decode", "check_mode", "UnsupportedImage", "DECODING_VERSION"]

#: Part of the data fingerprint of image files (:meth:`nas.data.sources.FileImages.fingerprint`):
#: raised whenever :func:`decode` changes what pixels a file gives, so cached embeddings are recomputed.
DECODING_VERSION = 2

_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_COLOUR_MODES = ("RGB", "RGBX", "P", "CMYK", "YCbCr", "HSV", "LAB")
_CONVERT = "Convert it to an 8-bit PNG or JPEG (for example with ImageMagick: magick FILE -depth 8 OUT.png) or remove it."


class UnsupportedImage(ValueError):
    """An image whose pixels have no faithful 8-bit rendering (a float image, a negative integer pixel, an unknown mode).

    A ``ValueError``, so one of :data:`nas.data.sources.IMAGE_ERRORS`: the reader names the file."""


def check_mode(img: PILImage) -> None:
    """Raise :class:`UnsupportedImage` unless :func:`decode` can render ``img``'s mode (known from its header)."""
    if img.mode == "F":
        raise UnsupportedImage(
            "it is a 32-bit floating-point image (PIL mode F), which has no standard 8-bit rendering "
            f"(its values may span 0..1, 0..255 or any range). {_CONVERT.replace('-depth 8', '-auto-level -depth 8')}"
        )
    if img.mode not in ("1", "L", *_INTEGER_MODES, *_ALPHA_MODES, *_COLOUR_MODES):
        raise UnsupportedImage(f"its pixels are in PIL mode {img.mode!r}, which cannot be rendered as 8-bit grey or RGB. {_CONVERT}")


def _integer_depth(img: PILImage) -> tuple[int, bool]:
    """``(bits, signed)`` of an integer image, from the raw mode its file is decoded from (read before ``load``)."""
    if img.mode.startswith("I;16"):
        return 16, img.mode.endswith("S")
    raw = img.tile[0].args if img.tile else None
    raw = raw[0] if isinstance(raw, tuple) else raw
    if img.format == "PPM":  # PIL scales a PGM/PPM of any maximum value over 255 to 0..65535 in mode I
        return 16, False
    if isinstance(raw, str) and raw.startswith("I;16"):  # a 16-bit file that PIL holds in mode I
        return 16, raw.endswith("S")
    if isinstance(raw, str) and raw.startswith("I;32") and not raw.endswith("S"):
        return 32, False  # unsigned 32-bit: PIL stores the same bits in its signed mode I
    return 32, True


def _scale_integer(img: PILImage, bits: int, signed: bool) -> PILImage:
    """An integer image as 8-bit ``L``, ``round(value * 255 / max)`` with ``max`` its bit depth's largest value."""
    from PIL import Image

    values = np.asarray(img)
    if bits == 32 and not signed:
        values = values.astype(np.int32, copy=False).view(np.uint32)
    values = values.astype(np.int64)
    if signed and values.size and values.min() < 0:
        raise UnsupportedImage(
            f"it is a signed {bits}-bit integer image (PIL mode {img.mode}) with negative pixel values, "
            f"which have no standard 8-bit rendering. {_CONVERT.replace('-depth 8', '-auto-level -depth 8')}"
        )
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    scaled = (values * 255 * 2 + top) // (2 * top)  # round half up, in integers (exact for 32-bit values)
    out = Image.fromarray(scaled.astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int):  # a transparent grey value (PNG tRNS): white, as over a white background
        out.paste(255, mask=Image.fromarray((values == key).astype(np.uint8) * 255, "L"))
    return out


def _over_white(img: PILImage) -> PILImage:
    """``img`` (any mode with alpha or a transparent colour) composited over white, as RGB."""
    from PIL import Image

    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def decode(img: PILImage, mode: str) -> PILImage:
    """``img``, a file just opened by PIL (not yet loaded; a JPEG may have been given a ``draft``),
    as an 8-bit image in ``mode`` (``"L"`` or ``"RGB"``) as a viewer shows it (see the module docstring).

    Raises :class:`UnsupportedImage` for an image with no faithful 8-bit rendering; PIL's own errors
    (``OSError`` for a truncated file) pass through, for the caller to name the file.
    """
    from PIL import ImageOps

    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', but got {mode!r}.")
    check_mode(img)
    depth = _integer_depth(img) if img.mode in _INTEGER_MODES else None
    oriented = ImageOps.exif_transpose(img)  # always a new, loaded image (the first frame): it outlives the file
    if depth is not None:
        out = _scale_integer(oriented, *depth)
    elif oriented.mode in _ALPHA_MODES or oriented.info.get("transparency") is not None:
        out = _over_white(oriented)
    elif oriented.mode == "1":
        out = oriented.convert("L")
    else:
        out = oriented
    if out.mode == mode:
        return out
    if mode == "L" and out.mode not in ("L", "RGB"):
        out = out.convert("RGB")  # CMYK, YCbCr, HSV, LAB, P: through their RGB rendering, then ITU-R 601 luma
    return out.convert(mode)
