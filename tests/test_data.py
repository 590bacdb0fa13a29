"""nas.data: idx files, the Fashion-MNIST and image-folder loaders, the data set registry, the split, preprocessing."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.config import DataConfig
from nas.data import (
    DATASETS,
    DatasetEntry,
    ImageSet,
    RetrievalData,
    LEGACY_PREPROCESSING,
    Augmentation,
    Preprocessing,
    Split,
    StreamingImages,
    eval_batches,
    load_fashion_mnist,
    load_image_folder,
    load_retrieval_data,
    read_idx,
    stratified_split,
)
from nas.data.sources import ArrayImages
from nas.errors import ConfigError, DataError

try:
    from _fixtures import FASHION_MNIST_NAMES, digits_image_set, digits_uint8, idx_bytes, write_fashion_mnist_folder, write_idx
except ImportError:  # tests/ imported as a package
    from tests._fixtures import FASHION_MNIST_NAMES, digits_image_set, digits_uint8, idx_bytes, write_fashion_mnist_folder, write_idx


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 3, 255], dtype=np.uint8),
        np.array([[-5, 7], [127, -128]], dtype=np.int8),
        np.array([-70000, 0, 123456789], dtype=np.int32),
        np.array([[1, -2], [300, -32768]], dtype=np.int16),
        np.array([0.5, -1.25, 3e10], dtype=np.float32),
        np.array([[np.pi, -np.e]], dtype=np.float64),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i32", "i16", "f32", "f64"],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), array, gz=gz)
    out = read_idx(path)
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.dtype.kind == array.dtype.kind and out.dtype.itemsize == array.dtype.itemsize
    assert out.dtype.isnative


def test_read_idx_digits(tmp_path: Path) -> None:
    images, _ = digits_uint8()
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x.gz", images)), images)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x", images)), images)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("cut", [3, 6, 20, -1])
def test_read_idx_truncated_is_data_error(tmp_path: Path, gz: bool, cut: int) -> None:
    raw = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    raw = raw[:cut]
    path = tmp_path / ("t.idx" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_padded_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "p.idx"
    path.write_bytes(idx_bytes(np.zeros((2, 2), np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="truncated or padded"):
        read_idx(path)


def test_read_idx_truncated_gzip_stream_is_data_error(tmp_path: Path) -> None:
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8).reshape(10, 100)))
    path = tmp_path / "t.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "magic",
    [b"\x01\x00\x08\x01", b"\x00\x01\x08\x01", b"\x00\x00\x07\x01", b"\x00\x00\xff\x01", b"PK\x03\x04"],
)
def test_read_idx_bad_magic_is_data_error(tmp_path: Path, magic: bytes) -> None:
    raw = idx_bytes(np.arange(4, dtype=np.uint8))
    path = tmp_path / "m.idx"
    path.write_bytes(magic + raw[4:])
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_read_idx_gzipped_without_gz_suffix_is_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "noext", np.arange(4, dtype=np.uint8), gz=True)
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_read_idx_plain_file_with_gz_suffix_is_data_error(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "plain.gz", np.arange(4, dtype=np.uint8), gz=False)
    with pytest.raises(DataError):
        read_idx(path)


def test_read_idx_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope"):
        read_idx(tmp_path / "nope")


def test_read_idx_empty_file_is_data_error(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(DataError):
        read_idx(path)


# --------------------------------------------------------------------------- Fashion-MNIST loader


@pytest.mark.parametrize("gz", [True, False])
def test_load_fashion_mnist_pools_train_and_test(tmp_path: Path, gz: bool) -> None:
    images, labels = write_fashion_mnist_folder(tmp_path, n_train=1000, gz=gz)
    data = load_fashion_mnist(tmp_path)
    assert isinstance(data, ImageSet)
    assert data.images.in_memory and data.images.array.shape == (1797, 8, 8, 1)
    assert data.images.array.dtype == np.uint8
    assert data.labels.shape == (1797,)
    assert data.labels.dtype == np.int64
    assert data.channels == 1
    # train files first, then t10k
    np.testing.assert_array_equal(data.images.array[..., 0], images)
    np.testing.assert_array_equal(data.labels, labels)
    assert data.classes[0] == "t-shirt/top" and len(data.classes) == 10


def test_load_fashion_mnist_prefers_gz_but_accepts_a_mix(tmp_path: Path) -> None:
    images, labels = digits_uint8()
    write_idx(tmp_path / (FASHION_MNIST_NAMES[0] + ".gz"), images[:50])
    write_idx(tmp_path / FASHION_MNIST_NAMES[1], labels[:50].astype(np.uint8))
    write_idx(tmp_path / FASHION_MNIST_NAMES[2], images[50:80])
    write_idx(tmp_path / (FASHION_MNIST_NAMES[3] + ".gz"), labels[50:80].astype(np.uint8))
    data = load_fashion_mnist(tmp_path)
    assert len(data.images) == 80
    np.testing.assert_array_equal(data.labels, labels[:80])


def test_load_fashion_mnist_fewer_classes_get_numeric_names(tmp_path: Path) -> None:
    images, labels = digits_uint8()
    keep = labels < 3
    write_idx(tmp_path / (FASHION_MNIST_NAMES[0] + ".gz"), images[keep][:20])
    write_idx(tmp_path / (FASHION_MNIST_NAMES[1] + ".gz"), labels[keep][:20].astype(np.uint8))
    write_idx(tmp_path / (FASHION_MNIST_NAMES[2] + ".gz"), images[keep][20:40])
    write_idx(tmp_path / (FASHION_MNIST_NAMES[3] + ".gz"), labels[keep][20:40].astype(np.uint8))
    data = load_fashion_mnist(tmp_path)
    assert data.classes == ("0", "1", "2")


def test_load_fashion_mnist_missing_folder_mentions_apt_get(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path / "not-there")
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


@pytest.mark.parametrize("missing", FASHION_MNIST_NAMES)
def test_load_fashion_mnist_one_missing_file_is_named(tmp_path: Path, missing: str) -> None:
    write_fashion_mnist_folder(tmp_path, n_train=100)
    (tmp_path / (missing + ".gz")).unlink()
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    assert missing in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_load_fashion_mnist_mismatched_counts_is_data_error(tmp_path: Path) -> None:
    write_fashion_mnist_folder(tmp_path, n_train=100)
    images, labels = digits_uint8()
    write_idx(tmp_path / (FASHION_MNIST_NAMES[1] + ".gz"), labels[:99].astype(np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(tmp_path)


def test_load_retrieval_data_fashion_mnist_with_three_channels(tmp_path: Path) -> None:
    write_fashion_mnist_folder(tmp_path, n_train=500)
    data = load_retrieval_data(DataConfig(dataset="fashion_mnist", path=str(tmp_path), channels=3)).data
    assert data.images.array.shape == (1797, 8, 8, 3)
    np.testing.assert_array_equal(data.images.array[..., 0], data.images.array[..., 2])


def test_unknown_dataset_name_is_config_error() -> None:
    assert sorted(DATASETS.names()) == ["cub200", "fashion_mnist", "image_folder", "inshop", "roxford5k", "rparis6k", "sop"]
    with pytest.raises(ConfigError, match="Did you mean 'image_folder'"):
        load_retrieval_data(DataConfig(dataset="image_foldr", path="/x"))


def test_load_retrieval_data_image_folder_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_retrieval_data(DataConfig(dataset="image_folder"))


# --------------------------------------------------------------------------- the data set registry

TINY = "tiny_digits"


def _read_tiny(config: DataConfig) -> ImageSet:
    """A data set without files: 20 of each of scikit-learn's digits, in memory."""
    return digits_image_set(per_class=20)


@pytest.fixture
def tiny_digits():
    """A labelled data set registered for one test, as a new loader module would register it."""
    DATASETS.add(TINY, DatasetEntry.labelled(_read_tiny, channels=1, default_path="(in memory)"))
    yield TINY
    del DATASETS._entries[TINY]  # the Registry has no public removal: only a test takes an entry out


def test_a_registered_data_set_is_accepted_and_loads(tiny_digits: str) -> None:
    config = DataConfig(dataset=tiny_digits)
    assert tiny_digits in DATASETS.names()
    assert config.resolved_channels == 1 and config.resolved_path == "(in memory)"
    assert config.resolved_protocol == "same_classes" and not config.resolved_query_is_gallery
    got = load_retrieval_data(config)
    expected = digits_image_set(per_class=20)
    assert isinstance(got, RetrievalData) and got.ground_truth is None and got.files == ()
    assert got.data.fingerprint() == expected.fingerprint()
    split = stratified_split(expected.labels, config.train, config.val, config.query, config.gallery, config.seed)
    assert got.split.fingerprint() == split.fingerprint()
    # the data.* fields apply to it like to any labelled data set
    rgb = load_retrieval_data(DataConfig(dataset=tiny_digits, channels=3, protocol="class_disjoint"))
    assert rgb.data.images.array.shape == (200, 8, 8, 3)
    assert rgb.split.query_is_gallery and rgb.split.val_against == "val"
    assert not set(rgb.data.labels[rgb.split.train]) & set(rgb.data.labels[rgb.split.query])


def test_a_registered_benchmark_declares_its_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(config: DataConfig) -> RetrievalData:
        data = digits_image_set(per_class=4)
        order = np.argsort(data.labels, kind="stable")  # by class: every val and query image has a positive
        return RetrievalData(data, Split(order[:10], order[10:20], order[20:], order[20:], query_is_gallery=True, val_against="val"))

    monkeypatch.setitem(DATASETS._entries, "tiny_bench", DatasetEntry.benchmark(load, protocol="class_disjoint", query_is_gallery=True))
    config = DataConfig(dataset="tiny_bench", path="/nowhere")
    assert config.resolved_protocol == "class_disjoint" and config.resolved_query_is_gallery and config.resolved_channels == 3
    got = load_retrieval_data(config)
    assert got.data.channels == 3 and got.split.sizes() == {"train": 10, "val": 10, "query": 20, "gallery": 20}
    with pytest.raises(ConfigError, match="its files fix the split"):
        DataConfig(dataset="tiny_bench", protocol="same_classes")
    with pytest.raises(ConfigError, match="query and gallery are the same"):
        DataConfig(dataset="tiny_bench", query_is_gallery=False)
    with pytest.raises(ConfigError, match="data.path must be set"):
        load_retrieval_data(DataConfig(dataset="tiny_bench"))


def test_an_unknown_data_set_name_suggests_the_registered_one(tiny_digits: str) -> None:
    with pytest.raises(ConfigError, match=r"data\.dataset must be one of .*'tiny_digits'.*Did you mean 'tiny_digits'\?"):
        DataConfig(dataset="tiny_digit")
    with pytest.raises(ConfigError, match="Did you mean 'tiny_digits'"):
        DATASETS.get("tiny_digitz")
    with pytest.raises(ConfigError, match="data.protocol.*Did you mean 'class_disjoint'"):
        DataConfig(dataset=tiny_digits, protocol="disjoint")


def test_a_data_set_entry_states_both_split_facts_or_neither() -> None:
    with pytest.raises(ValueError, match="protocol and query_is_gallery"):
        DatasetEntry(_read_tiny, protocol="class_disjoint")
    with pytest.raises(ValueError, match="channels"):
        DatasetEntry.labelled(_read_tiny, channels=2)
    with pytest.raises(ValueError, match="registered twice"):
        DATASETS.add("fashion_mnist", DatasetEntry.labelled(_read_tiny))


# --------------------------------------------------------------------------- image folders


def _write_image_folder(root: Path, per_class: int = 3, size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for c, (name, fmt) in enumerate([("cats", "PNG"), ("dogs", "JPEG"), ("eels", "PNG")]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            if i % 2 == 0:
                array = (rng.random((size, size + 4, 3)) * 255).astype(np.uint8)
                img = Image.fromarray(array, "RGB")
            else:
                array = np.full((size + 2, size), 40 * c + i, dtype=np.uint8)
                img = Image.fromarray(array, "L")
            suffix = ".png" if fmt == "PNG" else ".jpg"
            img.save(folder / f"img{i}{suffix}", format=fmt)


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_folder_png_and_jpeg(tmp_path: Path, channels: int) -> None:
    _write_image_folder(tmp_path / "set", per_class=3)
    data = load_image_folder(tmp_path / "set", image_size=10, channels=channels)
    assert not data.images.in_memory and len(data.images) == 9  # listed, not decoded
    assert data.images.stack(10).shape == (9, 10, 10, channels)
    assert data.images.open(0).mode == ("L" if channels == 1 else "RGB")
    assert min(data.images.open(0).size) == 10  # the shorter side is capped at image_size
    assert data.classes == ("cats", "dogs", "eels")
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert data.labels.dtype == np.int64


def test_load_image_folder_grayscale_pixels_survive(tmp_path: Path) -> None:
    folder = tmp_path / "set" / "only"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 77, np.uint8), "L").save(folder / "a.png")
    data = load_image_folder(tmp_path / "set", image_size=8, channels=3)
    assert data.images.stack(8).shape == (1, 8, 8, 3)
    assert (data.images.stack(8) == 77).all()
    gray = load_image_folder(tmp_path / "set", image_size=8, channels=1)
    assert (gray.images.stack(8) == 77).all()


def test_load_image_folder_ignores_other_files_and_hidden_dirs(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "set", per_class=2)
    (tmp_path / "set" / "cats" / "notes.txt").write_text("not an image")
    (tmp_path / "set" / ".hidden").mkdir()
    (tmp_path / "set" / "README").write_text("x")
    data = load_image_folder(tmp_path / "set", image_size=8)
    assert data.classes == ("cats", "dogs", "eels")
    assert len(data.images) == 6


@pytest.mark.parametrize(
    "payload",
    [b"", b"this is not an image", "truncated-png", "truncated-jpeg"],
    ids=["empty", "text", "truncated-png", "truncated-jpeg"],
)
def test_load_image_folder_corrupt_file_is_named(tmp_path: Path, payload: bytes | str) -> None:
    _write_image_folder(tmp_path / "set", per_class=2)
    array = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    suffix = ".png"
    if payload == "truncated-png":
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        payload = buf.getvalue()[: len(buf.getvalue()) // 2]
    elif payload == "truncated-jpeg":
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG")
        payload = buf.getvalue()[: len(buf.getvalue()) // 3]
        suffix = ".jpg"
    bad = tmp_path / "set" / "dogs" / f"broken{suffix}"
    bad.write_bytes(payload)  # type: ignore[arg-type]
    data = load_image_folder(tmp_path / "set", image_size=8)  # listing decodes nothing
    transform = LEGACY_PREPROCESSING.for_channels(3).eval_transform(8)
    for workers in (0, 2):  # raised in the main process, naming the file, also from a loader worker
        with pytest.raises(DataError) as info:
            list(eval_batches(data.images, np.arange(len(data.images)), transform, 4, workers=workers))
        assert str(bad) in str(info.value) and "Traceback" not in str(info.value)


def test_load_image_folder_png_with_corrupt_chunk_length_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "set" / "x"
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    at = raw.index(b"IDAT") - 1  # low byte of the IDAT chunk length
    raw[at] ^= 0xFF
    bad = folder / "bad.png"
    bad.write_bytes(bytes(raw))
    data = load_image_folder(tmp_path / "set", image_size=8)
    with pytest.raises(DataError) as info:
        data.images.stack(8)
    assert str(bad) in str(info.value)


def test_load_image_folder_missing_root_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "none", image_size=8)


def test_load_image_folder_without_class_dirs_is_data_error(tmp_path: Path) -> None:
    (tmp_path / "set").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "set", image_size=8)


def test_load_image_folder_empty_class_dir_is_data_error(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "set", per_class=1)
    (tmp_path / "set" / "zebras").mkdir()
    (tmp_path / "set" / "zebras" / "readme.txt").write_text("no images")
    with pytest.raises(DataError) as info:
        load_image_folder(tmp_path / "set", image_size=8)
    assert "zebras" in str(info.value)


def test_load_retrieval_data_image_folder_to_gray(tmp_path: Path) -> None:
    _write_image_folder(tmp_path / "set", per_class=10)
    fractions = dict(train=0.3, val=0.2, query=0.2, gallery=0.3)
    got = load_retrieval_data(DataConfig(dataset="image_folder", path=str(tmp_path / "set"), image_size=8, channels=1, **fractions))
    assert got.data.channels == 1 and got.data.images.stack(8).shape == (30, 8, 8, 1)
    assert got.split.sizes() == {"train": 9, "val": 6, "query": 6, "gallery": 9}


# --------------------------------------------------------------------------- ImageSet


def test_image_set_validates_shape_and_lengths() -> None:
    with pytest.raises(DataError):
        ImageSet("x", np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), ("a",))
    with pytest.raises(DataError):
        ImageSet("x", np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int64), ("a",))
    with pytest.raises(DataError):
        ImageSet("x", np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int64), ("a",))


def test_image_set_fingerprint_depends_on_pixels_and_labels() -> None:
    images, labels = digits_uint8()
    a = ImageSet("d", images[:50, ..., None], labels[:50], ("x",))
    b = ImageSet("d", images[:50, ..., None].copy(), labels[:50].copy(), ("x",))
    assert a.fingerprint() == b.fingerprint()
    pixels = images[:50, ..., None].copy()
    pixels[3, 2, 2, 0] ^= 1
    assert ImageSet("d", pixels, labels[:50], ("x",)).fingerprint() != a.fingerprint()
    other = labels[:50].copy()
    other[0] = (other[0] + 1) % 10
    assert ImageSet("d", images[:50, ..., None], other, ("x",)).fingerprint() != a.fingerprint()


# --------------------------------------------------------------------------- stratified split


FRACTIONS = {"train": 0.6, "val": 0.05, "query": 0.1, "gallery": 0.25}


def _split(labels: np.ndarray, seed: int = 0, max_per_class: int | None = None, **fractions: float):
    return stratified_split(labels, **{**FRACTIONS, **fractions}, seed=seed, max_per_class=max_per_class)


def test_split_parts_are_disjoint_sorted_and_in_range() -> None:
    _, labels = digits_uint8()
    split = _split(labels)
    parts = [split.train, split.val, split.query, split.gallery]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < len(labels)
    for part in parts:
        assert np.all(np.diff(part) > 0)
        assert part.dtype.kind == "i"


def test_split_is_deterministic_per_seed() -> None:
    _, labels = digits_uint8()
    a, b, c = _split(labels, seed=3), _split(labels, seed=3), _split(labels, seed=4)
    for name in ("train", "val", "query", "gallery"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert not np.array_equal(a.query, c.query)
    assert a.sizes() == c.sizes()


def test_split_represents_every_class_proportionally() -> None:
    _, labels = digits_uint8()
    split = _split(labels)
    for cls in range(10):
        n = int((labels == cls).sum())
        for name, frac in FRACTIONS.items():
            count = int((labels[getattr(split, name)] == cls).sum())
            assert count == int(np.floor(frac * n)), (cls, name)


def test_split_max_per_class() -> None:
    _, labels = digits_uint8()
    split = _split(labels, max_per_class=40)
    used = np.concatenate([split.train, split.val, split.query, split.gallery])
    counts = np.bincount(labels[used], minlength=10)
    assert counts.max() <= 40
    assert split.sizes() == {"train": 240, "val": 20, "query": 40, "gallery": 100}
    for cls in range(10):
        assert int((labels[split.val] == cls).sum()) == 2


def test_split_sizes_sum_at_most_n() -> None:
    _, labels = digits_uint8()
    split = _split(labels, train=0.5, val=0.1, query=0.2, gallery=0.2)
    assert sum(split.sizes().values()) <= len(labels)


def test_split_too_small_class_is_data_error() -> None:
    labels = np.array([0] * 40 + [1] * 10)
    with pytest.raises(DataError) as info:
        _split(labels)
    assert "Class 1" in str(info.value) and "10 images" in str(info.value)


def test_split_too_small_after_max_per_class_is_data_error() -> None:
    _, labels = digits_uint8()
    with pytest.raises(DataError):
        _split(labels, max_per_class=10)  # val: floor(0.05 * 10) == 0


# --------------------------------------------------------------------------- preprocessing and the streaming path


@pytest.mark.parametrize(("size", "resolution"), [(8, 16), (8, 8), (28, 20), (12, 31)])
@pytest.mark.parametrize("channels", [1, 3])
def test_eval_transform_shape_dtype_and_range(size: int, resolution: int, channels: int) -> None:
    rng = np.random.default_rng(size + resolution)
    images = rng.integers(0, 256, size=(5, size, size, channels), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    (x,) = eval_batches(ImageSet("t", images, np.zeros(5, np.int64), ()).images, range(5), LEGACY_PREPROCESSING.for_channels(channels).eval_transform(resolution), 8)
    assert x.shape == (5, channels, resolution, resolution)
    assert x.dtype == torch.float32
    assert float(x.min()) >= -1.0 - 1e-5 and float(x.max()) <= 1.0 + 1e-5
    assert torch.allclose(x[0], torch.full_like(x[0], -1.0))
    assert torch.allclose(x[1], torch.full_like(x[1], 1.0))


def test_eval_transform_at_the_image_size_is_the_exact_affine_map() -> None:
    images, _ = digits_uint8()
    source = ImageSet("t", images[:10, ..., None], np.zeros(10, np.int64), ()).images
    (x,) = eval_batches(source, range(10), LEGACY_PREPROCESSING.eval_transform(8), 16)
    expected = torch.from_numpy(images[:10].astype(np.float32))[:, None] / 255.0 * 2.0 - 1.0
    assert torch.allclose(x, expected, atol=1e-6)


def test_eval_transform_centre_crops_and_normalises_per_channel() -> None:
    # a 20 x 10 image whose left and right quarters are black: crop_pct 0.5 keeps the centre 5 x 5 of
    # the shorter side, all white; ImageNet mean/std map white to (1 - mean) / std per channel
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, 5:15] = 255
    prep = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.5)
    x = prep.eval_transform(4)(Image.fromarray(array))
    assert x.shape == (3, 4, 4)
    expected = (1 - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=1e-4)
    assert prep.for_channels(1).mean == pytest.approx((np.mean(prep.mean),))


class _OneByOne(ArrayImages):
    """The same array, decoded image by image through PIL (the path of every source not in memory)."""

    in_memory = False

    def pixels(self, indices: np.ndarray) -> None:
        return None


def test_eval_batches_cover_all_in_order_with_and_without_workers() -> None:
    images, _ = digits_uint8()
    source = ImageSet("t", images[:23, ..., None], np.zeros(23, np.int64), ()).images
    transform = LEGACY_PREPROCESSING.eval_transform(8)
    batches = list(eval_batches(source, np.arange(23), transform, 10))
    assert [len(b) for b in batches] == [10, 10, 3]
    with_workers = torch.cat(list(eval_batches(_OneByOne(source.array), np.arange(23), transform, 10, workers=2)))
    assert torch.equal(torch.cat(batches), with_workers)
    assert torch.equal(torch.cat(batches)[5], transform(source.open(5)))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "box", "hamming", "lanczos"])
@pytest.mark.parametrize(("shape", "crop_pct", "resolution"), [((28, 28, 1), 1.0, 32), ((28, 28, 1), 0.875, 20), ((13, 9, 3), 0.9, 16)])
def test_in_memory_batches_equal_pil_image_by_image(interpolation: str, shape: tuple[int, int, int], crop_pct: float, resolution: int) -> None:
    """An array in memory is transformed a batch at a time on tensors: the same numbers as PIL image by image,
    for evaluation and for training (random crops of other aspect ratios, flips), square images or not."""
    rng = np.random.default_rng(resolution)
    array = rng.integers(0, 256, size=(24, *shape), dtype=np.uint8)
    array[12:] = np.cumsum(array[12:], axis=1, dtype=np.int64).astype(np.uint8)  # smoother images too
    prep = Preprocessing((0.5,) * shape[2], (0.25,) * shape[2], interpolation, crop_pct)
    batched, one_by_one = ArrayImages(array), _OneByOne(array)
    evaluate = prep.eval_transform(resolution)
    assert evaluate.batched
    assert torch.equal(torch.cat(list(eval_batches(batched, np.arange(24), evaluate, 10))), torch.cat(list(eval_batches(one_by_one, np.arange(24), evaluate, 10))))
    train = prep.train_transform(resolution, Augmentation(crop_scale=(0.3, 1.0), hflip=0.5))
    for (x, p), (y, q) in zip(StreamingImages(batched, np.arange(24), train, 8, 3).batches(2), StreamingImages(one_by_one, np.arange(24), train, 8, 3).batches(2), strict=True):
        assert torch.equal(p, q) and torch.equal(x, y)


def test_nearest_interpolation_stays_on_pil() -> None:
    prep = Preprocessing((0.5,), (0.5,), "nearest", 1.0)
    assert not prep.eval_transform(16).batched
    images, _ = digits_uint8()
    source = ArrayImages(images[:5, ..., None])
    (x,) = eval_batches(source, np.arange(5), prep.eval_transform(16), 8)
    assert torch.equal(x[2], prep.eval_transform(16)(source.open(2)))


def test_streaming_training_batches_are_seeded_shuffled_augmented_and_worker_independent() -> None:
    images, _ = digits_uint8()
    source = _OneByOne(images[:40, ..., None])
    transform = LEGACY_PREPROCESSING.train_transform(8, Augmentation(crop_scale=(0.3, 1.0), hflip=0.5))

    def epoch(seed: int, e: int, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(StreamingImages(source, np.arange(40), transform, 16, seed, workers).batches(e))

    first = epoch(0, 1, 0)
    assert [len(x) for x, _ in first] == [16, 16]  # the incomplete last batch is dropped
    positions = torch.cat([p for _, p in first])
    assert len(set(positions.tolist())) == 32 and positions.tolist() != sorted(positions.tolist())
    for (x0, p0), (x2, p2) in zip(first, epoch(0, 1, 2)):
        assert torch.equal(p0, p2) and torch.equal(x0, x2)  # same crops and flips with 2 workers
    for (x0, p0), (xm, pm) in zip(first, StreamingImages(ArrayImages(source.array), np.arange(40), transform, 16, 0).batches(1)):
        assert torch.equal(p0, pm) and torch.equal(x0, xm)  # and in memory, a batch at a time
    other = epoch(0, 2, 0)
    assert not torch.equal(torch.cat([p for _, p in other]), positions)  # each epoch reshuffles
    plain = LEGACY_PREPROCESSING.eval_transform(8)
    x, p = first[0]
    assert not all(torch.equal(x[k], plain(source.open(int(p[k])))) for k in range(len(p)))  # augmented


def test_class_disjoint_can_hold_out_the_last_classes() -> None:
    """``held_out="last"``: the query = gallery classes are the last ones by label (CUB's second half)."""
    from nas.data import class_disjoint_split

    labels = np.repeat(np.arange(10), 6)
    split = class_disjoint_split(labels, 0.5, 0.2, 0.1, 0.25, seed=3, held_out="last")
    assert sorted(set(labels[split.query])) == [5, 6, 7, 8, 9] and split.query_is_gallery
    assert set(labels[split.val]) < {0, 1, 2, 3, 4} and len(set(labels[split.val])) == 2
    assert set(labels[split.train]) == {0, 1, 2, 3, 4} - set(labels[split.val])
    seeded = class_disjoint_split(labels, 0.5, 0.2, 0.1, 0.25, seed=3)
    assert sorted(set(labels[seeded.query])) != [5, 6, 7, 8, 9]  # the default draws them
    with pytest.raises(ValueError, match="held_out"):
        class_disjoint_split(labels, 0.5, 0.2, 0.1, 0.25, seed=3, held_out="first")


def test_loader_workers_for_a_gpu(tmp_path: Path) -> None:
    """Training on a GPU, the CPU only feeds it: image files get all cores but one (at most 8); memory needs none."""
    import os

    from nas.data import resolve_workers
    from nas.data.sources import FileImages

    files = FileImages(tmp_path, ["a.png"])
    assert resolve_workers(files, None, for_gpu=True) == max(1, min(8, (os.cpu_count() or 1) - 1))
    assert resolve_workers(files, 3, for_gpu=True) == 3
    assert resolve_workers(ArrayImages(np.zeros((2, 4, 4, 1), np.uint8)), None, for_gpu=True) == 0
