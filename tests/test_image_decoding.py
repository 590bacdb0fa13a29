"""nas.data.decoding: every kind of image file decodes to its ordinary 8-bit rendering, or is refused by name.

Each test writes a real file of one kind (16-bit, palette, transparent, rotated by EXIF, CMYK, ...) from an
8-bit picture, reads it back through the loaders' own path (:class:`~nas.data.sources.FileImages`), and compares
the pixels with the 8-bit picture as a viewer shows it.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms
from safetensors.torch import save_file

from nas.config import DataConfig
from nas.data import LEGACY_PREPROCESSING, load_image_folder, load_retrieval_data
from nas.data import sources
from nas.data.decoding import decode
from nas.data.sources import FileImages, ImageReadError, read_image
from nas.errors import DataError
from nas.export.loading import WEIGHTS_FILE, embed_folder, write_arch
from search_spaces import build, create_space

H, W = 24, 40  # not square, so a wrong rotation changes the shape


def _grey() -> np.ndarray:
    """An 8-bit gradient over every value 0..255 (H x W), not symmetric under any flip or rotation."""
    return ((np.arange(H * W).reshape(H, W) * 255) // (H * W - 1)).astype(np.uint8)


def _rgb() -> np.ndarray:
    g = _grey()
    ramp = np.broadcast_to((np.arange(W) * 255 // (W - 1)).astype(np.uint8), (H, W))
    return np.stack([g, ramp, 255 - g], axis=-1)


def _decoded(path: Path, channels: int = 3, **kwargs) -> np.ndarray:
    """The file as the data sets decode it."""
    img = FileImages(path.parent, [path.name], channels, **kwargs).open(0)
    return np.asarray(img).astype(np.int64)


def _assert_close(got: np.ndarray, expected: np.ndarray, tolerance: int = 1) -> None:
    assert got.shape == expected.shape
    assert np.abs(got.astype(np.int64) - expected.astype(np.int64)).max() <= tolerance


def _write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16), written chunk by chunk (PIL cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# --- 8-bit files: the reference -------------------------------------------------------------------------------


def test_8_bit_grey_and_rgb_files_decode_to_their_own_pixels(tmp_path):
    Image.fromarray(_grey()).save(tmp_path / "grey.png")
    Image.fromarray(_rgb()).save(tmp_path / "rgb.png")
    _assert_close(_decoded(tmp_path / "grey.png", 1), _grey(), 0)
    _assert_close(_decoded(tmp_path / "grey.png", 3), np.repeat(_grey()[..., None], 3, axis=2), 0)
    _assert_close(_decoded(tmp_path / "rgb.png", 3), _rgb(), 0)


# --- integer images of more than 8 bits: scaled by their bit depth --------------------------------------------


@pytest.mark.parametrize(
    "suffix, mode",
    [(".png", "I;16"), (".tif", "I;16"), (".tif", "I;16B"), (".pgm", "I;16")],
    ids=["png-I;16", "tiff-I;16", "tiff-I;16B", "pgm-16-bit"],
)
def test_a_16_bit_grey_file_decodes_to_the_8_bit_picture_it_was_made_from(tmp_path, suffix, mode):
    path = tmp_path / f"deep{suffix}"
    deep = _grey().astype(np.uint16) * 257
    dtype = ">u2" if mode == "I;16B" else "<u2"  # (PIL's own convert to I;16B clips at 255, so build it from bytes)
    Image.frombytes(mode, (W, H), deep.astype(dtype).tobytes()).save(path)
    with Image.open(path) as img:
        assert img.mode == ("I" if suffix == ".pgm" else mode)  # the kind of file this test is about
    _assert_close(_decoded(path, 1), _grey())
    _assert_close(_decoded(path, 3), np.repeat(_grey()[..., None], 3, axis=2))


def test_a_12_bit_pgm_is_scaled_by_its_maximum_value(tmp_path):
    deep = (_grey().astype(np.int64) * 4095 + 127) // 255
    (tmp_path / "deep.pgm").write_bytes(f"P5\n{W} {H}\n4095\n".encode() + deep.astype(">u2").tobytes())
    _assert_close(_decoded(tmp_path / "deep.pgm", 1), _grey())


def test_a_16_bit_file_of_mid_grey_is_mid_grey_not_white(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "mid.png")
    assert set(_decoded(tmp_path / "mid.png", 1).ravel().tolist()) == {128}


def test_a_16_bit_png_with_a_transparent_grey_shows_it_white(tmp_path):
    deep = _grey().astype(np.uint16) * 257
    Image.fromarray(deep).save(tmp_path / "key.png", transparency=int(deep[0, 5]))
    expected = _grey().copy()
    expected[_grey() == _grey()[0, 5]] = 255
    _assert_close(_decoded(tmp_path / "key.png", 1), expected)


def test_a_32_bit_integer_tiff_is_scaled_by_its_bit_depth(tmp_path):
    deep = (_grey().astype(np.int64) * (2**31 - 1) + 127) // 255  # PIL writes mode I as signed 32-bit
    Image.fromarray(deep.astype(np.int32)).save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as img:
        assert img.mode == "I"
    _assert_close(_decoded(tmp_path / "deep.tif", 1), _grey())


def test_a_32_bit_tiff_with_negative_pixels_is_refused_naming_the_file_and_its_mode(tmp_path):
    Image.fromarray(_grey().astype(np.int32) - 100).save(tmp_path / "signed.tif")
    with pytest.raises(ImageReadError, match=r"signed\.tif.*signed 32-bit integer image \(PIL mode I\) with negative.*Convert it"):
        _decoded(tmp_path / "signed.tif", 1)


def test_a_16_bit_per_channel_rgb_png_decodes_to_the_8_bit_picture(tmp_path):
    _write_png16_rgb(tmp_path / "deep.png", _rgb().astype(np.uint16) * 257)
    _assert_close(_decoded(tmp_path / "deep.png", 3), _rgb())


def test_a_float_image_is_refused_by_name_before_training_and_when_read(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(20):  # enough for every part of the default split
            Image.fromarray(_rgb()).save(tmp_path / name / f"{i}.png")
    Image.fromarray(_grey().astype(np.float32) / 255).save(tmp_path / "b" / "float.tif")
    with pytest.raises(ImageReadError, match=r"float\.tif.*floating-point image \(PIL mode F\).*Convert it"):
        _decoded(tmp_path / "b" / "float.tif", 3)
    config = DataConfig(dataset="image_folder", path=str(tmp_path))
    with pytest.raises(DataError, match=r"float\.tif.*PIL mode F"):
        load_retrieval_data(config)  # the header check, before any image is decoded


# --- transparency: composited over white ----------------------------------------------------------------------


def _alpha() -> np.ndarray:
    return np.broadcast_to((np.arange(W) * 255 // (W - 1)).astype(np.uint8), (H, W)).copy()


def _over_white(pixels: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] if pixels.ndim == 3 else alpha.astype(np.float64)
    return np.round(pixels * a / 255 + 255 * (1 - a / 255))


def test_an_rgba_png_is_composited_over_white(tmp_path):
    Image.fromarray(np.dstack([_rgb(), _alpha()])).save(tmp_path / "rgba.png")
    _assert_close(_decoded(tmp_path / "rgba.png", 3), _over_white(_rgb(), _alpha()))


def test_an_la_png_is_composited_over_white(tmp_path):
    Image.fromarray(np.dstack([_grey(), _alpha()]), "LA").save(tmp_path / "la.png")
    _assert_close(_decoded(tmp_path / "la.png", 1), _over_white(_grey(), _alpha()))


def test_a_palette_image_decodes_to_its_rgb_and_its_transparent_index_to_white(tmp_path):
    palette_img = Image.fromarray(_rgb()).quantize(16)
    index = np.asarray(palette_img)
    rgb = np.asarray(palette_img.convert("RGB"))
    palette_img.save(tmp_path / "opaque.png")
    _assert_close(_decoded(tmp_path / "opaque.png", 3), rgb, 0)
    palette_img.save(tmp_path / "clear.gif", transparency=int(index[0, 0]))
    expected = rgb.copy()
    expected[index == index[0, 0]] = 255
    _assert_close(_decoded(tmp_path / "clear.gif", 3), expected, 0)


def test_a_pa_image_is_composited_over_white():
    palette_img = Image.fromarray(_rgb()).quantize(16)
    pa = palette_img.convert("PA")
    pa.putalpha(Image.fromarray(_alpha()))
    _assert_close(np.asarray(decode(pa, "RGB")), _over_white(np.asarray(palette_img.convert("RGB")).astype(np.float64), _alpha()))


def test_a_1_bit_image_decodes_to_black_and_white(tmp_path):
    bits = _grey() >= 128
    Image.fromarray(bits).save(tmp_path / "bits.png")
    with Image.open(tmp_path / "bits.png") as img:
        assert img.mode == "1"
    _assert_close(_decoded(tmp_path / "bits.png", 1), bits.astype(np.uint8) * 255, 0)


# --- other colour spaces: PIL's conversion to RGB -------------------------------------------------------------


def test_a_cmyk_tiff_decodes_to_the_rgb_it_was_made_from(tmp_path):
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "cmyk.tif")
    _assert_close(_decoded(tmp_path / "cmyk.tif", 3), _rgb(), 0)


def test_a_cmyk_jpeg_decodes_as_pil_converts_it(tmp_path):
    Image.fromarray(_rgb()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK"
        expected = np.asarray(img.convert("RGB"))
    _assert_close(_decoded(tmp_path / "cmyk.jpg", 3), expected, 0)
    _assert_close(_decoded(tmp_path / "cmyk.jpg", 3), _rgb(), 12)  # and that is near the picture (JPEG is lossy)


def test_a_ycbcr_tiff_decodes_to_the_rgb_it_was_made_from(tmp_path):
    Image.fromarray(_rgb()).convert("YCbCr").save(tmp_path / "ycc.tif")
    with Image.open(tmp_path / "ycc.tif") as img:
        assert img.mode == "YCbCr"
    _assert_close(_decoded(tmp_path / "ycc.tif", 3), _rgb(), 3)


def test_a_lab_tiff_decodes_to_its_srgb_rendering(tmp_path):
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    ImageCms.applyTransform(Image.fromarray(_rgb()), to_lab).save(tmp_path / "lab.tif")
    with Image.open(tmp_path / "lab.tif") as img:
        assert img.mode == "LAB"
        to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        expected = np.asarray(ImageCms.applyTransform(img, to_srgb))
    got = _decoded(tmp_path / "lab.tif", 3)
    _assert_close(got, expected, 1)
    assert np.abs(got - _rgb()).mean() < 3  # 8-bit LAB loses a little of the picture, no more


def test_an_hsv_image_decodes_to_the_rgb_it_was_made_from():
    hsv = Image.fromarray(_rgb()).convert("HSV")
    _assert_close(np.asarray(decode(hsv, "RGB")), np.asarray(hsv.convert("RGB")), 0)
    _assert_close(np.asarray(decode(hsv, "RGB")), _rgb(), 6)  # 8-bit hue: 256 steps round the circle


# --- EXIF orientation: the upright picture --------------------------------------------------------------------

#: How a camera stores the upright picture for each EXIF orientation (EXIF 2.32, tag 0x0112): 2 mirrored,
#: 3 upside down, 4 flipped, 5 transposed, 6 turned a quarter anticlockwise (shown turned clockwise), 7 transversed,
#: 8 turned a quarter clockwise.
STORED = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, 1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_a_file_with_an_exif_orientation_decodes_upright(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](_rgb()))).save(tmp_path / "turned.png", exif=exif)
    _assert_close(_decoded(tmp_path / "turned.png", 3), _rgb(), 0)
    _assert_close(_decoded(tmp_path / "turned.png", 1), np.asarray(Image.fromarray(_rgb()).convert("L")), 0)


def test_a_rotated_jpeg_decoded_at_reduced_scale_is_upright(tmp_path):
    upright = np.asarray(Image.fromarray(_rgb()).resize((W * 4, H * 4), Image.Resampling.BILINEAR))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(STORED[6](upright))).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    got = _decoded(tmp_path / "turned.jpg", 3, max_side=H)  # draft: decoded at 1/4 scale, then turned
    expected = np.asarray(Image.fromarray(upright).resize((W, H), Image.Resampling.BILINEAR))
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 4


# --- several frames: the first --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_a_file_of_several_frames_decodes_to_its_first(tmp_path, suffix):
    first = Image.fromarray(_rgb())
    second = Image.fromarray(255 - _rgb())
    if suffix == ".gif":  # GIF holds palette frames: compare with the first frame's own palette rendering
        first, second = first.quantize(64), second.quantize(64)
    first.save(tmp_path / f"frames{suffix}", save_all=True, append_images=[second])
    with Image.open(tmp_path / f"frames{suffix}") as img:
        assert img.n_frames == 2
    _assert_close(_decoded(tmp_path / f"frames{suffix}", 3), np.asarray(first.convert("RGB")), 0)


# --- the same pixels on every path ----------------------------------------------------------------------------


def test_a_folder_of_16_bit_pngs_gives_the_same_pixels_as_its_8_bit_copy(tmp_path):
    for folder, scale, dtype in (("eight", 1, np.uint8), ("sixteen", 257, np.uint16)):
        for name in ("a", "b"):
            (tmp_path / folder / name).mkdir(parents=True)
            Image.fromarray(_grey().astype(dtype) * scale).save(tmp_path / folder / name / "0.png")
    eight = load_image_folder(tmp_path / "eight", channels=3).images.stack(16)
    sixteen = load_image_folder(tmp_path / "sixteen", channels=3).images.stack(16)
    assert np.array_equal(eight, sixteen)


def test_read_image_and_the_data_sets_agree(tmp_path):
    Image.fromarray(_grey().astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "deep.png", "RGB")), _decoded(tmp_path / "deep.png", 3))


def test_the_decoding_version_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    """Embeddings cached under an older decoding are recomputed: the version is in the data's cache key."""
    Image.fromarray(_grey()).save(tmp_path / "a.png")
    before = FileImages(tmp_path, ["a.png"]).fingerprint()
    monkeypatch.setattr(sources, "DECODING_VERSION", sources.DECODING_VERSION + 1)
    assert FileImages(tmp_path, ["a.png"]).fingerprint() != before


def test_nas_embed_gives_a_16_bit_or_rotated_file_the_embedding_of_its_8_bit_upright_picture(tmp_path):
    arch = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[0.35]).extreme(smallest=True)
    export = tmp_path / "export"
    export.mkdir()
    write_arch(arch, export, LEGACY_PREPROCESSING)
    save_file(build(arch).state_dict(), str(export / WEIGHTS_FILE))
    exif = Image.Exif()
    exif[0x0112] = 8
    (tmp_path / "eight").mkdir()
    (tmp_path / "other").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "eight" / "a.png")
    Image.fromarray(np.ascontiguousarray(STORED[8](_rgb()))).save(tmp_path / "other" / "a.png", exif=exif)
    Image.fromarray(_grey()).save(tmp_path / "eight" / "b.png")
    Image.fromarray(_grey().astype(np.uint16) * 257).save(tmp_path / "other" / "b.png")
    eight, ids, skipped = embed_folder(export, tmp_path / "eight")
    other, other_ids, other_skipped = embed_folder(export, tmp_path / "other")
    assert ids == other_ids == ["a.png", "b.png"] and skipped == other_skipped == []
    assert np.array_equal(eight, other)


def test_the_fingerprint_follows_content_not_modification_times(tmp_path):
    """A copied or touched folder keeps its fingerprint (a study resumes, its gallery cache is reused);
    a file replaced by another of the same size, or one changed only past the sampled head, does not."""
    rng = np.random.default_rng(0)
    Image.fromarray(_grey()).save(tmp_path / "a.bmp")
    big = rng.integers(0, 256, size=3 * sources.SAMPLED_BYTES, dtype=np.uint8)
    (tmp_path / "b.bin").write_bytes(big.tobytes())
    names = ["a.bmp", "b.bin"]
    before = FileImages(tmp_path, names).fingerprint()
    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)  # new modification times
    os.utime(copy / "a.bmp", (1, 1))
    assert FileImages(copy, names).fingerprint() == before
    Image.fromarray(255 - _grey()).save(copy / "a.bmp")  # same size, other pixels
    assert (copy / "a.bmp").stat().st_size == (tmp_path / "a.bmp").stat().st_size
    assert FileImages(copy, names).fingerprint() != before
    shutil.copy(tmp_path / "a.bmp", copy / "a.bmp")
    tail = big.copy()
    tail[-1] ^= 1  # a change in the last bytes of a large file
    (copy / "b.bin").write_bytes(tail.tobytes())
    assert FileImages(copy, names).fingerprint() != before
