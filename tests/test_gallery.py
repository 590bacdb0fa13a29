"""nas.gallery: the gallery network, its checkpoint and its embedding cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nas.config import GalleryConfig, GalleryTrainConfig
from nas.data import stratified_split
from nas.errors import ConfigError, GalleryError
from nas.gallery import (
    GalleryNet,
    create_gallery_net,
    file_sha256,
    gallery_embeddings,
    load_gallery,
    save_gallery,
    train_gallery,
)
from nas.scoring import embed

try:
    from _fixtures import digits_image_set
except ImportError:  # tests/ imported as a package
    from tests._fixtures import digits_image_set



MODEL = "resnet10t"
OTHER_MODEL = "test_resnet"
RES = 16
EMBED = 16
CONFIG = GalleryConfig(model=MODEL, embed_dim=EMBED, resolution=RES, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return digits_image_set(per_class=12)


@pytest.fixture(scope="module")
def split(data):
    return stratified_split(data.labels, 0.5, 0.1, 0.2, 0.2, seed=0)


@pytest.fixture(scope="module")
def model() -> GalleryNet:
    torch.manual_seed(0)
    return create_gallery_net(CONFIG, in_chans=1).eval()


@pytest.fixture(scope="module")
def checkpoint(model: GalleryNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gallery(model, tmp_path_factory.mktemp("ckpt") / "gallery.safetensors", RES, ("a", "b"))


# --------------------------------------------------------------------------- the network


def test_gallery_net_contract(model: GalleryNet) -> None:
    x = torch.randn(3, 1, RES, RES)
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
    assert out.shape == (3, EMBED)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert pooled.shape == (3, model.backbone.num_features)
    assert model.embed_dim == EMBED and model.in_chans == 1 and model.model_name == MODEL
    with pytest.raises(GalleryError, match="no classifier"):
        model.logits(out, 16.0)


def test_gallery_net_without_projection() -> None:
    net = create_gallery_net(GalleryConfig(model=OTHER_MODEL, embed_dim=None), in_chans=3).eval()
    assert net.embed_dim == net.backbone.num_features
    with torch.no_grad():
        out = net(torch.randn(2, 3, RES, RES))
    assert out.shape == (2, net.embed_dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_create_gallery_net_unknown_timm_name_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        create_gallery_net(GalleryConfig(model="resnet10tt"), in_chans=1)
    assert "'resnet10tt'" in str(info.value)
    assert "Close names: resnet10t" in str(info.value)
    with pytest.raises(ConfigError, match="not a timm architecture"):
        create_gallery_net(GalleryConfig(model="zzzz_no_such_model_qqq"), in_chans=1)


def test_embed_is_normalised_batched_and_restores_mode(model: GalleryNet, data) -> None:
    model.train()
    try:
        a = embed(model, data.images, RES, model.preprocessing, indices=np.arange(len(data.labels))[:30], batch_size=7)
        assert model.training
    finally:
        model.eval()
    b = embed(model, data.images, RES, model.preprocessing, indices=np.arange(len(data.labels))[:30], batch_size=64)
    assert a.dtype == np.float32 and a.shape == (30, EMBED)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_gives_identical_embeddings(model: GalleryNet, checkpoint: Path, data) -> None:
    loaded = load_gallery(CONFIG, checkpoint, in_chans=1)
    assert isinstance(loaded, GalleryNet)
    assert not loaded.training
    assert loaded.model_name == MODEL and loaded.embed_dim == EMBED
    np.testing.assert_array_equal(embed(loaded, data.images, RES, loaded.preprocessing), embed(model, data.images, RES, model.preprocessing))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_is_atomic_and_leaves_no_temp_file(checkpoint: Path) -> None:
    assert checkpoint.is_file()
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]


def test_round_trip_with_classifier_and_without_projection(tmp_path: Path) -> None:
    config = GalleryConfig(model=OTHER_MODEL, embed_dim=None, resolution=RES)
    net = create_gallery_net(config, in_chans=3, num_classes=4).eval()
    path = save_gallery(net, tmp_path / "sub" / "g.safetensors", RES, ("w", "x", "y", "z"))
    loaded = load_gallery(config, path, in_chans=3)
    assert loaded.classifier is not None and torch.equal(loaded.classifier, net.classifier)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize(
    "payload",
    [b"", b"this is not a safetensors file at all", b"\xff" * 64, "truncated", "garbled-header"],
    ids=["empty", "text", "bytes", "truncated", "garbled-header"],
)
def test_unreadable_checkpoint_is_gallery_error(checkpoint: Path, tmp_path: Path, payload: bytes | str) -> None:
    good = checkpoint.read_bytes()
    if payload == "truncated":
        payload = good[: len(good) // 2]
    elif payload == "garbled-header":
        payload = good[:8] + b"{" * 40 + good[48:]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)  # type: ignore[arg-type]
    with pytest.raises(GalleryError) as info:
        load_gallery(CONFIG, bad, in_chans=1)
    assert str(bad) in str(info.value)


def test_missing_checkpoint_is_gallery_error(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="does not exist"):
        load_gallery(CONFIG, tmp_path / "none.safetensors", in_chans=1)


def test_foreign_safetensors_file_is_gallery_error(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(GalleryError, match="not written by"):
        load_gallery(CONFIG, path, in_chans=1)


def test_checkpoint_of_another_model_names_both(tmp_path: Path) -> None:
    other = create_gallery_net(GalleryConfig(model=OTHER_MODEL, embed_dim=EMBED), in_chans=1)
    path = save_gallery(other, tmp_path / "other.safetensors", RES, ())
    with pytest.raises(GalleryError) as info:
        load_gallery(CONFIG, path, in_chans=1)
    assert OTHER_MODEL in str(info.value) and f"'{MODEL}'" in str(info.value)


def test_checkpoint_with_another_embed_dim_names_both(checkpoint: Path) -> None:
    config = GalleryConfig(model=MODEL, embed_dim=32, resolution=RES)
    with pytest.raises(GalleryError) as info:
        load_gallery(config, checkpoint, in_chans=1)
    assert "embed_dim 16" in str(info.value) and "32" in str(info.value)
    with pytest.raises(GalleryError, match="embed_dim"):
        load_gallery(GalleryConfig(model=MODEL, embed_dim=None), checkpoint, in_chans=1)


def test_checkpoint_with_other_channels_is_gallery_error(checkpoint: Path) -> None:
    with pytest.raises(GalleryError, match="1-channel"):
        load_gallery(CONFIG, checkpoint, in_chans=3)


def test_file_sha256(checkpoint: Path, tmp_path: Path) -> None:
    import hashlib

    assert file_sha256(checkpoint) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    copy = tmp_path / "copy"
    shutil.copy(checkpoint, copy)
    assert file_sha256(copy) == file_sha256(checkpoint)


def test_train_gallery_writes_a_loadable_checkpoint(data, split, tmp_path: Path) -> None:
    config = GalleryConfig(model=OTHER_MODEL, embed_dim=8, resolution=RES, train=GalleryTrainConfig(epochs=2, batch_size=32))
    logs: list[str] = []
    path = tmp_path / "trained.safetensors"
    net = train_gallery(config, data, split, path, torch.device("cpu"), seed=0, log=logs.append)
    assert path.is_file()
    assert len(logs) == 2 and "epoch 1/2" in logs[0]
    loaded = load_gallery(config, path, in_chans=1)
    assert loaded.classifier is not None and loaded.classifier.shape == (10, 8)
    np.testing.assert_array_equal(embed(loaded, data.images, RES, loaded.preprocessing, indices=np.arange(len(data.labels))[:20]), embed(net, data.images, RES, net.preprocessing, indices=np.arange(len(data.labels))[:20]))


# --------------------------------------------------------------------------- embedding cache


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("gallery-*.npz"))


def _call(model, data, split, cache_dir: Path, logs: list[str], resolution: int = RES, sha: str = "weights-a"):
    return gallery_embeddings(model, sha, data, split, resolution, cache_dir, batch_size=50, log=logs.append)


def test_cache_second_call_comes_from_cache(model, data, split, tmp_path: Path) -> None:
    logs: list[str] = []
    first, cached = _call(model, data, split, tmp_path, logs)
    assert cached is False
    assert len(_cache_files(tmp_path)) == 1
    assert any("cached at" in line for line in logs)
    for name in ("train", "val", "query", "gallery"):
        part = getattr(first, name)
        assert part.dtype == np.float32
        assert part.shape == (len(getattr(split, name)), EMBED)
        np.testing.assert_allclose(part, embed(model, data.images, RES, model.preprocessing, indices=np.arange(len(data.labels))[getattr(split, name)]), atol=1e-6)
    second, cached = _call(model, data, split, tmp_path, logs)
    assert cached is True
    assert second.key == first.key
    for name in ("train", "val", "query", "gallery"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    assert not any("rebuilding" in line for line in logs)


def test_cache_key_depends_on_weights_resolution_and_split(model, data, split, tmp_path: Path) -> None:
    logs: list[str] = []
    base, _ = _call(model, data, split, tmp_path, logs)
    other_sha, cached = _call(model, data, split, tmp_path, logs, sha="weights-b")
    assert cached is False and other_sha.key != base.key
    other_res, cached = _call(model, data, split, tmp_path, logs, resolution=12)
    assert cached is False and other_res.key != base.key
    other_split = stratified_split(data.labels, 0.5, 0.1, 0.2, 0.2, seed=1)
    resplit, cached = _call(model, data, other_split, tmp_path, logs)
    assert cached is False and resplit.key != base.key
    assert len(_cache_files(tmp_path)) == 4
    again, cached = _call(model, data, split, tmp_path, logs)
    assert cached is True and again.key == base.key


def _assert_rebuilt(model, data, split, folder: Path, reference, word: str) -> None:
    logs: list[str] = []
    rebuilt, cached = _call(model, data, split, folder, logs)
    assert cached is False
    assert any("rebuilding" in line and word in line for line in logs), logs
    assert rebuilt.key == reference.key
    for name in ("train", "val", "query", "gallery"):
        np.testing.assert_array_equal(getattr(rebuilt, name), getattr(reference, name))
    # and the rebuilt file is good again
    again, cached = _call(model, data, split, folder, [])
    assert cached is True


@pytest.mark.parametrize("payload", [b"", b"garbage, not a zip archive"], ids=["empty", "garbage"])
def test_unreadable_cache_is_rebuilt_and_logged(model, data, split, tmp_path: Path, payload: bytes) -> None:
    reference, _ = _call(model, data, split, tmp_path, [])
    (path,) = _cache_files(tmp_path)
    path.write_bytes(payload)
    _assert_rebuilt(model, data, split, tmp_path, reference, "unreadable")


def test_cache_with_wrong_checksum_is_rebuilt_and_logged(model, data, split, tmp_path: Path) -> None:
    reference, _ = _call(model, data, split, tmp_path, [])
    (path,) = _cache_files(tmp_path)
    with np.load(path) as archive:
        parts = {name: archive[name] for name in archive.files}
    parts["gallery"] = parts["gallery"].copy()
    parts["gallery"][0, 0] += 0.5  # contents changed, metadata (and its checksum) kept
    with open(path, "wb") as handle:
        np.savez(handle, **parts)
    _assert_rebuilt(model, data, split, tmp_path, reference, "corrupt")


@pytest.mark.parametrize("damage", ["overwrite-middle", "truncate"])
def test_damaged_cache_archive_is_rebuilt_and_logged(model, data, split, tmp_path: Path, damage: str) -> None:
    reference, _ = _call(model, data, split, tmp_path, [])
    (path,) = _cache_files(tmp_path)
    raw = bytearray(path.read_bytes())
    if damage == "overwrite-middle":
        middle = len(raw) // 2
        raw[middle : middle + 64] = b"\xff" * 64
    else:
        raw = raw[: len(raw) // 2]
    path.write_bytes(bytes(raw))
    _assert_rebuilt(model, data, split, tmp_path, reference, "")


def test_stale_cache_is_rebuilt_and_logged(model, data, split, tmp_path: Path) -> None:
    # a cache written for another resolution, put where this configuration's cache belongs
    reference, _ = _call(model, data, split, tmp_path / "right", [])
    (right,) = _cache_files(tmp_path / "right")
    stale, _ = _call(model, data, split, tmp_path / "other", [], resolution=12)
    (other,) = _cache_files(tmp_path / "other")
    assert not np.array_equal(stale.gallery, reference.gallery)
    shutil.copy(other, right)
    _assert_rebuilt(model, data, split, tmp_path / "right", reference, "stale")
