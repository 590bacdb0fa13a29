"""Every file the tool reads back, damaged: the gallery checkpoint and weights, the training checkpoint,
the trained supernet, trial weights, exports, the gallery embedding cache and the latency table.

Each kind is cut short, overwritten with garbage and given a wrong-shaped (or wrong-typed) tensor or
array; each must be the project's own error naming the file and what to delete or rerun (a cache:
reported, naming the file, and rebuilt), and through the command line exit status 2 without a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

try:
    from _fixtures import digits_image_set, digits_uint8
except ImportError:  # tests/ imported as a package
    from tests._fixtures import digits_image_set, digits_uint8
from nas.cli import main
from nas.config import GalleryConfig, LatencyConfig
from nas.data import LEGACY_PREPROCESSING, stratified_split
from nas.errors import GalleryError, NasError
from nas.export import _trial_model
from nas.export.loading import ARCH_FILE, WEIGHTS_FILE, load_query_model, write_arch
from nas.gallery import GalleryEmbeddings, create_gallery_net, gallery_embeddings, load_gallery, load_gallery_weights, save_gallery
from nas.hardware.latency_table import LatencyTable, default_table_path
from nas.records import TrialRecord
from nas.supernet import _load_trained
from search_spaces import build, create_space, supernet_over
from trainers import CheckpointError, load_checkpoint, save_checkpoint

MODEL, RES, EMBED = "resnet10t", 16, 16
CONFIG = GalleryConfig(model=MODEL, embed_dim=EMBED, resolution=RES, batch_size=64)
GARBAGE = bytes(range(256)) * 8


def _cut(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(GARBAGE)
    return path


def _space():
    return create_space("mobilenet", embed_dim=EMBED, in_chans=1, resolutions=[RES], widths=[0.35])


def _widened(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """``state`` with one tensor one row wider: the file a changed architecture leaves behind."""
    state = {k: v.clone() for k, v in state.items()}
    state[key] = torch.cat([state[key], state[key][:1]])
    return state


@pytest.fixture(scope="module")
def gallery_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_gallery_net(CONFIG, in_chans=1).eval()
    return save_gallery(model, tmp_path_factory.mktemp("gallery") / "gallery.safetensors", RES, ("a", "b"))


def _rewrite_gallery(source: Path, target: Path, change) -> Path:
    """A copy of the gallery checkpoint ``source`` with its tensors changed by ``change`` and its header kept."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(state), str(target), metadata=metadata)
    return target


# --------------------------------------------------------------------------- the gallery checkpoint


@pytest.mark.parametrize("damage", ["cut", "garbage", "wrong shape", "wrong type", "missing tensor"])
def test_a_damaged_gallery_checkpoint_names_the_file_and_what_to_do(gallery_file: Path, tmp_path: Path, damage: str) -> None:
    path = tmp_path / "gallery.safetensors"
    path.write_bytes(gallery_file.read_bytes())
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    elif damage == "wrong shape":
        _rewrite_gallery(gallery_file, path, lambda s: _widened(s, "proj.weight"))
    elif damage == "wrong type":
        _rewrite_gallery(gallery_file, path, lambda s: {**s, "proj.bias": s["proj.bias"].to(torch.int64)})
    else:
        _rewrite_gallery(gallery_file, path, lambda s: {k: v for k, v in s.items() if k != "proj.weight"})
    with pytest.raises(GalleryError) as info:
        load_gallery(CONFIG, path, in_chans=1)
    message = str(info.value)
    assert str(path) in message and "nas gallery train" in message, message
    expected = {"cut": "cannot be read", "garbage": "cannot be read", "wrong shape": "wrong shape proj.weight (17, 512) (expected (16, 512))",
                "wrong type": "wrong type proj.bias torch.int64", "missing tensor": "missing proj.weight"}[damage]
    assert expected in message, message


def test_a_gallery_checkpoint_whose_header_lies_is_an_error_before_anything_is_built(gallery_file: Path, tmp_path: Path) -> None:
    with safe_open(str(gallery_file), framework="pt") as handle:
        metadata, state = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    path = tmp_path / "gallery.safetensors"
    save_file(state, str(path), metadata={**metadata, "num_classes": str(10**9)})  # would allocate a 10^9-row classifier
    with pytest.raises(GalleryError, match="damaged header .*num_classes 1000000000"):
        load_gallery(CONFIG, path, in_chans=1)
    save_file(state, str(path), metadata={k: v for k, v in metadata.items() if k != "in_chans"})
    with pytest.raises(GalleryError, match="damaged header .*in_chans"):
        load_gallery(CONFIG, path, in_chans=1)


def _digit_folder(root: Path) -> Path:
    images, labels = digits_uint8()
    for digit in (1, 7):
        folder = root / f"digit{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in np.flatnonzero(labels == digit)[:40]:
            Image.fromarray(np.kron(images[n], np.ones((2, 2), dtype=np.uint8))).save(folder / f"{n}.png")
    return root


def test_a_wrong_shaped_gallery_checkpoint_through_the_cli_is_one_error_line(gallery_file: Path, tmp_path: Path, capsys) -> None:
    checkpoint = _rewrite_gallery(gallery_file, tmp_path / "gallery.safetensors", lambda s: _widened(s, "backbone.conv1.0.weight"))
    config = {
        "out": str(tmp_path / "run"),
        "data": {"dataset": "image_folder", "path": str(_digit_folder(tmp_path / "digits")), "image_size": 16, "channels": 1},
        "gallery": {"model": MODEL, "embed_dim": EMBED, "resolution": RES, "checkpoint": str(checkpoint)},
        "space": {"name": "mobilenet", "options": {"resolutions": [RES], "widths": [0.35]}},
        "train": {"epochs": 1, "batch_size": 32},
        "search": {"study_name": "loaded", "trials": 1, "pruner": "none"},
        "tracking": {"enabled": False},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["search", str(tmp_path / "exp.yaml")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    (line,) = [line for line in captured.err.splitlines() if line.strip()]
    assert line.startswith("error: ") and str(checkpoint) in line and "wrong shape backbone.conv1.0.weight" in line, line
    assert not (tmp_path / "run" / "gallery").exists()  # nothing trained in its place


# --------------------------------------------------------------------------- gallery.weights (a timm state dict)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("damage", ["cut", "garbage", "wrong shape"])
def test_damaged_gallery_weights_name_the_file(tmp_path: Path, suffix: str, damage: str) -> None:
    state = timm.create_model(MODEL, pretrained=False, num_classes=0, in_chans=1).state_dict()
    if damage == "wrong shape":
        state = _widened(state, "conv1.0.weight")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    config = GalleryConfig(model=MODEL, embed_dim=EMBED, resolution=RES, weights=str(path), pretrained=False)
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(config, in_chans=1)
    message = str(info.value)
    assert str(path) in message
    assert ("wrong shape conv1.0.weight (25, 1, 3, 3) (expected (24, 1, 3, 3))" if damage == "wrong shape" else "is unreadable") in message, message


# --------------------------------------------------------------------------- training checkpoint, trained supernet, trial weights


def _training(width: int = 8):
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, None


@pytest.mark.parametrize("damage", ["cut", "garbage", "wrong type"])
def test_a_damaged_training_checkpoint_says_what_to_delete(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, *_training(), {"epoch": 1})
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    else:  # integer weights under the right names and shapes, the header kept
        with safe_open(str(path), framework="pt") as handle:
            metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
        save_file({k: v.to(torch.int32) if k.startswith("model/") else v for k, v in tensors.items()}, str(path), metadata=metadata)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, *_training())
    message = str(info.value)
    assert f"delete {path}" in message and ("wrong type 0.weight torch.int32" if damage == "wrong type" else "cannot be read") in message, message


@pytest.mark.parametrize("damage", ["cut", "garbage", "wrong shape"])
def test_a_damaged_trained_supernet_says_which_folder_to_delete(tmp_path: Path, damage: str) -> None:
    space = _space()
    supernet = supernet_over(space, build(space.extreme(smallest=False)))
    path = tmp_path / "key" / "supernet.safetensors"
    path.parent.mkdir()
    state = supernet.net.state_dict()
    save_file(_widened(state, "embed.weight") if damage == "wrong shape" else {k: v.contiguous() for k, v in state.items()}, str(path))
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    with pytest.raises(NasError) as info:
        _load_trained(supernet, path)
    message = str(info.value)
    assert str(path) in message and f"delete its folder {path.parent}" in message
    assert ("wrong shape embed.weight" if damage == "wrong shape" else "cannot be read") in message, message


@pytest.mark.parametrize("damage", ["cut", "garbage", "wrong shape"])
def test_damaged_trial_weights_say_to_delete_them_and_export_again(tmp_path: Path, damage: str) -> None:
    arch = _space().extreme(smallest=True)
    path = tmp_path / "trial-3.safetensors"
    state = build(arch).state_dict()
    save_file(_widened(state, "embed.weight") if damage == "wrong shape" else state, str(path))
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    trial = TrialRecord(number=3, optuna_state=None, state="complete", values=None, params={}, constraints={}, arch=arch.to_string(), weights=str(path))
    with pytest.raises(NasError) as info:
        _trial_model(None, trial, None, print)  # weights present: neither the study nor the config is read
    message = str(info.value)
    assert "trial 3" in message and str(path) in message and "delete it and export again" in message, message
    assert ("wrong shape embed.weight" if damage == "wrong shape" else "cannot be read") in message, message


# --------------------------------------------------------------------------- exports


@pytest.fixture
def export(tmp_path: Path) -> Path:
    arch = _space().extreme(smallest=True)
    folder = tmp_path / "export"
    folder.mkdir()
    write_arch(arch, folder, LEGACY_PREPROCESSING)
    save_file(build(arch).state_dict(), str(folder / WEIGHTS_FILE))
    return folder


@pytest.mark.parametrize("damage", ["cut weights", "garbage weights", "wrong-shape weights", "garbage arch", "wrong JSON arch"])
def test_a_damaged_export_is_one_error_line_through_nas_embed(export: Path, tmp_path: Path, capsys, damage: str) -> None:
    weights, arch_file = export / WEIGHTS_FILE, export / ARCH_FILE
    if damage == "cut weights":
        _cut(weights)
    elif damage == "garbage weights":
        _garbage(weights)
    elif damage == "wrong-shape weights":
        save_file(_widened(load_file(str(weights)), "embed.weight"), str(weights))
    elif damage == "garbage arch":
        _garbage(arch_file)
    else:
        arch_file.write_text(json.dumps({"architecture": ["not", "a", "mapping"]}))
    with pytest.raises(NasError) as info:
        load_query_model(export)
    named = arch_file if "arch" in damage.split()[-1] else weights
    assert str(named) in str(info.value) and "export the model again" in str(info.value), str(info.value)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(images / "a.png")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(export), str(images), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and str(named) in captured.err
    assert not out.exists()


# --------------------------------------------------------------------------- the gallery embedding cache


@pytest.fixture(scope="module")
def cached(gallery_file: Path, tmp_path_factory: pytest.TempPathFactory):
    data = digits_image_set(per_class=12)
    split = stratified_split(data.labels, 0.5, 0.1, 0.2, 0.2, seed=0)
    model = load_gallery(CONFIG, gallery_file, in_chans=1)
    folder = tmp_path_factory.mktemp("cache")
    reference, _ = gallery_embeddings(model, "sha", data, split, RES, folder, log=lambda m: None)
    (path,) = folder.glob("gallery-*.npz")
    return model, data, split, folder, path, path.read_bytes(), reference


def _rewritten_cache(path: Path, change) -> None:
    """Rewrite the cache with ``change`` applied to its arrays, its key kept and its checksum recomputed to match."""
    with np.load(path) as archive:
        meta = json.loads(str(archive["meta"]))
        parts = change({n: archive[n] for n in ("train", "val", "query", "gallery")})
    meta["checksum"] = GalleryEmbeddings(key=meta["key"], **parts).checksum()
    with open(path, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta)), **parts)


@pytest.mark.parametrize("damage", ["cut", "garbage", "float64", "wrong shape", "wrong count"])
def test_a_damaged_embedding_cache_is_named_and_rebuilt(cached, damage: str) -> None:
    model, data, split, folder, path, original, reference = cached
    path.write_bytes(original)
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    elif damage == "float64":  # the same numbers (so the same checksum), another dtype
        _rewritten_cache(path, lambda parts: {n: a.astype(np.float64) for n, a in parts.items()})
    elif damage == "wrong shape":  # the same bytes, another shape
        _rewritten_cache(path, lambda parts: {**parts, "train": parts["train"].reshape(-1, EMBED // 2)})
    else:  # one training image fewer than the split has
        _rewritten_cache(path, lambda parts: {**parts, "train": parts["train"][:-1]})
    logs: list[str] = []
    emb, from_cache = gallery_embeddings(model, "sha", data, split, RES, folder, log=logs.append)
    assert not from_cache
    assert any(str(path) in line and "rebuilding" in line for line in logs), logs
    if damage in ("float64", "wrong shape", "wrong count"):
        assert any("corrupt (it holds train" in line for line in logs), logs
    for name in ("train", "val", "query", "gallery"):
        np.testing.assert_array_equal(getattr(emb, name), getattr(reference, name))
    assert gallery_embeddings(model, "sha", data, split, RES, folder, log=logs.append)[1]  # the rebuilt file is used again


# --------------------------------------------------------------------------- the latency table


@pytest.mark.parametrize("damage", ["cut", "garbage", "not a table", "infinite entry"])
def test_a_damaged_latency_table_is_named_and_not_used(tmp_path: Path, damage: str) -> None:
    config = LatencyConfig(runtime="torch", threads=1, batch_size=1, warmup=1, repeats=3, table_dir=str(tmp_path))
    arch = _space().extreme(smallest=True)
    LatencyTable(config, log=None).predict(build(arch), arch.resolution, 1)
    path = default_table_path(config)
    good = json.loads(path.read_text())
    if damage == "cut":
        _cut(path)
    elif damage == "garbage":
        _garbage(path)
    elif damage == "not a table":
        path.write_text(json.dumps({"header": good["header"], "entries": ["a", "list"]}))
    else:
        for entry in good["entries"].values():
            entry["ms"] = float("inf")  # JSON's Infinity
        path.write_text(json.dumps(good))
    logs: list[str] = []
    table = LatencyTable(config, log=logs.append)
    if damage == "infinite entry":
        assert len(table) == 0 and not logs  # every entry refused, to be measured again
    else:
        assert len(table) == 0 and any(str(path) in line and "starting a fresh one" in line for line in logs), logs
    ms = table.predict(build(arch), arch.resolution, 1)
    assert 0 < ms < float("inf")
    assert json.loads(path.read_text())["header"] == good["header"]  # replaced by a whole table


def test_a_garbage_latency_table_through_nas_profile_is_reported_and_replaced(tmp_path: Path, capsys) -> None:
    arch = _space().extreme(smallest=True).to_string()
    argv = ["profile", "--arch", arch, "--table-dir", str(tmp_path), "--threads", "1"]
    path = default_table_path(LatencyConfig(runtime="torch", threads=1, batch_size=1, table_dir=str(tmp_path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    _garbage(path)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert f"Latency table {path} is unreadable" in captured.out + captured.err
    assert json.loads(path.read_text())["entries"]
