"""search_spaces.RootedSupernet: one set of weights (a timm root's) shared by every structured pruning of it, per family."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.data.transforms import LEGACY_PREPROCESSING
from nas.export import load_query_model
from nas.export.formats import OnnxExporter, StateDictExporter, TorchScriptExporter
from nas.hardware import count_mflops
from nas.records import State, trial_records
from nas.scoring import embed
from nas.search.context import prepare
from nas.search.driver import run_search
from nas.search.evaluators import OneShot
from nas.supernet import frozen_batch_norm, largest_per_resolution, random_member, root_network
from search_spaces import Architecture, PrunedQueryNet, Pruning, RootedSupernet, SupernetError, create_space, supernet_over

#: one model per family the issue names; a ViT at its own 224 px and smaller resolutions
FAMILIES = {
    "resnet18": dict(resolutions=[48, 64]),
    "resnet50": dict(resolutions=[48, 64]),
    "mobilenetv3_large_100": dict(resolutions=[48, 64]),
    "convnext_atto": dict(resolutions=[48, 64]),
    "tf_efficientnet_lite0": dict(resolutions=[48, 64]),
    "deit_tiny_patch16_224": dict(resolutions=[96, 224], heads=[1, 2]),
}


@functools.cache
def _supernet(model: str) -> RootedSupernet:
    torch.manual_seed(0)
    space = create_space("pruned", embed_dim=24, in_chans=3, model=model, widths=[0.5, 0.75, 1.0], **FAMILIES[model])
    return RootedSupernet(space).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def supernet(request) -> RootedSupernet:
    return _supernet(request.param)


def _reference(supernet: RootedSupernet, arch) -> PrunedQueryNet:
    """The member as Torch-Pruning cuts it from the supernet's weights, its embedding restricted to the kept features."""
    backbone, kept = supernet.root.pruned(Pruning.from_text(arch.pruning, arch.resolution))
    net = PrunedQueryNet(arch, backbone)
    if arch.projection:
        with torch.no_grad():
            net.embed.weight.copy_(supernet.net.embed.weight[:, kept])
            net.embed.bias.copy_(supernet.net.embed.bias)
    return net.eval()


def _cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=1).min())


def test_the_largest_member_is_the_root(supernet: RootedSupernet) -> None:
    largest = supernet.space.extreme(smallest=False)
    x = torch.randn(2, 3, largest.resolution, largest.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _cosine(supernet(x, largest), supernet.net(x)) >= 0.9999
        assert _cosine(supernet.extract(largest)(x), supernet.net(x)) >= 0.9999
    assert not supernet._member(largest).gathers  # nothing gathered: the root's own tensors


def test_members_are_the_torch_pruning_members_of_the_shared_weights(supernet: RootedSupernet) -> None:
    """The supernet's view of a member, the extracted member and Torch-Pruning's cut of the same weights agree."""
    rng = np.random.default_rng(1)
    for _ in range(3):
        arch = random_member(supernet.space, rng)
        x = torch.randn(2, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = _reference(supernet, arch)(x)
            assert (supernet(x, arch) - reference).abs().max() <= 1e-4
            extracted = supernet.extract(arch)
            assert isinstance(extracted, PrunedQueryNet) and extracted.arch == arch
            assert (extracted(x) - reference).abs().max() <= 1e-4


def _mflops_agree(supernet: RootedSupernet, members: int) -> None:
    rng = np.random.default_rng(3)
    for _ in range(members):
        arch = random_member(supernet.space, rng)
        assert supernet.mflops(arch) == pytest.approx(count_mflops(supernet.extract(arch), arch.resolution, 3), rel=1e-9, abs=1e-9)


def test_mflops_of_members_are_fvcores(supernet: RootedSupernet) -> None:
    _mflops_agree(supernet, 5)


@pytest.mark.slow
def test_mflops_of_20_members_are_fvcores(supernet: RootedSupernet) -> None:
    _mflops_agree(supernet, 20)


@pytest.mark.parametrize("model", [m if m == "resnet18" else pytest.param(m, marks=pytest.mark.slow) for m in FAMILIES])
def test_an_extracted_member_exports_to_files_that_embed_alike(model: str, tmp_path: Path) -> None:
    """safetensors (rebuilt by load_query_model), TorchScript and ONNX of a pruned member embed as the module does
    (by default for a ResNet; every family in the slow run)."""
    supernet = _supernet(model)
    arch = random_member(supernet.space, np.random.default_rng(4))
    model = supernet.extract(arch)
    x = torch.randn(3, 3, arch.resolution, arch.resolution, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    context = SimpleNamespace(preprocessing=LEGACY_PREPROCESSING)
    StateDictExporter().write(model, tmp_path, context)
    with torch.no_grad():
        assert _cosine(load_query_model(tmp_path)(x), expected) >= 0.9999
    for exporter in (TorchScriptExporter(), OnnxExporter()):
        path = exporter.write(model, tmp_path, context)
        assert _cosine(exporter.embed(path, [x]), expected) >= 0.9999, exporter.name


def test_gradients_of_every_member_land_on_the_shared_weights() -> None:
    torch.manual_seed(0)
    space = create_space("pruned", embed_dim=16, in_chans=1, model="resnet18", resolutions=[32], widths=[0.5, 1.0])
    supernet = RootedSupernet(space).train()
    small = space.extreme(smallest=True)
    direction = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    (supernet(torch.randn(4, 1, 32, 32), small) * direction).sum().backward()
    conv = supernet.net.model.conv1.weight  # the stem (timm's ResNet blocks start with a zero last batch-norm scale)
    kept = supernet.root.kept_indices(Pruning.from_text(small.pruning))["conv1.weight"][0]
    touched = conv.grad.abs().sum(dim=(1, 2, 3)) > 0
    assert touched[kept].all() and not touched[np.setdiff1d(np.arange(conv.shape[0]), kept)].any()
    assert supernet.net.model.layer1[1].conv1.weight.grad is None  # a dropped block takes no gradient


def test_other_spaces_and_foreign_architectures_are_refused() -> None:
    space = create_space("pruned", embed_dim=16, in_chans=1, model="resnet18", resolutions=[32])
    supernet = supernet_over(space)
    assert isinstance(supernet, RootedSupernet)
    other = create_space("pruned", embed_dim=16, in_chans=1, model="resnet50", resolutions=[32]).extreme(True)
    with pytest.raises(SupernetError, match="is not a member of this supernet"):
        supernet.mflops(other)
    with pytest.raises(SupernetError, match="not of space 'mobilenet'"):
        RootedSupernet(create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16]))


def test_members_keeping_the_gallery_features_need_no_embedding_layer() -> None:
    """With ``identity_head`` (a gallery that embeds its pooled features), a member that keeps all of them has no
    parameters after pooling; one that cuts them projects back, and that layer is counted."""
    torch.manual_seed(0)
    space = create_space("pruned", embed_dim=512, in_chans=1, model="resnet18", resolutions=[32], widths=[0.5, 1.0], identity_head=True)
    largest, cut = space.extreme(smallest=False), space.make(32, Pruning(widths={"layer4": 0.5}))
    kept = space.make(32, Pruning(widths={"layer2": 0.5}))
    assert not largest.projection and not kept.projection and cut.projection and "proj=none" in kept.to_string()
    supernet = RootedSupernet(space).eval()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = supernet.net.model(x)
        assert torch.allclose(supernet(x, largest), F.normalize(pooled, dim=1), atol=1e-6)  # the gallery's own embedding
    for arch in (kept, cut):
        model = supernet.extract(arch)
        head = sum(p.numel() for p in model.embed.parameters())
        assert head == (256 * 512 + 512 if arch.projection else 0)
        with torch.no_grad():
            assert (supernet(x, arch) - _reference(supernet, arch)(x)).abs().max() <= 1e-4
        assert supernet.mflops(arch) == pytest.approx(count_mflops(model, 32, 1), rel=1e-9)


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_a_one_shot_search_over_prunings_of_a_resnet_gallery(tiny_config, tmp_path: Path) -> None:
    """The quickstart's setting in small: a ResNet-18 gallery model roots the supernet of the pruned space; candidates
    inherit its weights, the best is fine-tuned; every member names the gallery weights that ranked its channels."""
    raw = tiny_config(
        tmp_path / "run", budgets__max_mflops=None, space={"name": "pruned", "options": {"resolutions": [16], "widths": [0.5, 1.0]}},
        search__strategy="one_shot", search__trials=3, search__warm_start="largest", search__study_name="rooted",
        supernet={"epochs": 1, "random_subnets": 0, "recalibration_images": 64, "fine_tune_best": 1}, train__epochs=1,
        gallery__train__epochs=1,
    )
    config = config_from_dict(raw)
    logs: list[str] = []
    study = run_search(config, log=logs.append)
    assert any("Supernet: rooted in the gallery model resnet18" in line for line in logs)
    records = trial_records(study)
    assert sum(r.state == State.INHERITED for r in records) >= 2 and sum(r.state == State.COMPLETE for r in records) == 1
    # fine_tune_from auto on a rooted supernet: fine-tuned from the gallery's pruned weights and from the inherited ones,
    # the one with the higher val mAP kept (its metrics are the trial's)
    tuned = next(r for r in records if r.state == State.COMPLETE).metrics
    chosen = "gallery" if tuned["fine_tuned_from_gallery"] else "supernet"
    assert tuned["val_mAP"] == tuned[f"from_{chosen}_val_mAP"] == max(tuned["from_gallery_val_mAP"], tuned["from_supernet_val_mAP"])
    assert tuned["query_mAP"] == tuned[f"from_{chosen}_query_mAP"] and tuned["start_supernet_val_mAP"] == tuned["inherited_val_mAP"]
    ctx = prepare(config, log=lambda _: None)
    assert not frozen_batch_norm(ctx)  # auto: the pruned space's members recalibrate
    for r in records:
        arch = Architecture.from_string(r.arch)
        assert arch.pruning and arch.root == ctx.gallery_sha[:16]
    untrained = supernet_over(ctx.space, root_network(ctx, ctx.space))
    unpruned = untrained.extract(ctx.space.extreme(smallest=False))  # the gallery model itself, before any training
    emb = embed(unpruned, ctx.data.images, 16, ctx.preprocessing, indices=ctx.split.val)
    assert np.allclose(emb, ctx.embeddings.val, atol=1e-4)


def test_an_extracted_member_is_at_its_own_resolution() -> None:
    """One skeleton serves a structure at every resolution; the extracted network carries the asked one."""
    space = create_space("pruned", embed_dim=16, in_chans=1, model="resnet18", resolutions=[16, 32])
    supernet = RootedSupernet(space)
    for res in (32, 16):
        arch = space.extreme(smallest=True, resolution=res)
        assert supernet.extract(arch).arch == arch


def test_candidates_are_scored_with_the_weights_supernet_score_names(tiny_config, small_gallery: str, tmp_path: Path) -> None:
    """``supernet.score``: ``tuned`` scores a member after one seeded pass over ``score_images`` training images (its
    inherited score kept beside), ``gallery`` with the gallery model's own weights pruned to it; a supernet that is not
    rooted in the gallery model cannot score the second way, and says so before any training."""
    raw = tiny_config(
        tmp_path / "run", data__max_per_class=30, gallery__checkpoint=small_gallery, budgets__max_mflops=None, search__strategy="one_shot",
        space={"name": "pruned", "options": {"resolutions": [16], "widths": [0.5, 1.0]}},
        supernet={"epochs": 1, "random_subnets": 0, "recalibration_images": 64, "score": "tuned", "score_images": 64},
    )
    config = config_from_dict(raw)
    ctx = prepare(config, log=lambda _: None)
    paragon = {"val": {"mAP": 1.0}}  # the ratio's denominator; the scores under test are the val mAPs
    tuned = OneShot(ctx, paragon)
    tuned.prepare(log=lambda _: None)
    arch = ctx.space.extreme(smallest=True)
    first, again = (tuned.evaluate(tuned.build(arch, 0), seed=3) for _ in range(2))
    m = first.metrics
    assert m["train_seconds"] > 0 and m["val_mAP"] != m["inherited_val_mAP"]
    assert again.metrics["val_mAP"] == m["val_mAP"]  # the pass is seeded
    inherited = tuned.build(arch, 0).state_dict()
    assert any(not torch.equal(v, inherited[k]) for k, v in first.model.state_dict().items() if v.is_floating_point())

    ctx.config = replace(config, supernet=replace(config.supernet, score="gallery"))
    by_gallery = OneShot(ctx, paragon)
    by_gallery.supernet = tuned.supernet
    m = by_gallery.evaluate(by_gallery.build(arch, 0), seed=3).metrics
    _, start_map, kept_bn = by_gallery.gallery_start(arch)
    assert m["val_mAP"] == start_map and m["gallery_start_kept_bn"] == float(kept_bn) and "inherited_val_mAP" not in m
    unpruned, unpruned_map, unpruned_kept = by_gallery.gallery_start(ctx.space.extreme(smallest=False))
    assert unpruned_kept and unpruned_map == by_gallery.score(unpruned, "val")["mAP"]  # the gallery model itself keeps its statistics

    raw = tiny_config(tmp_path / "mobilenet", data__max_per_class=30, gallery__checkpoint=small_gallery, search__strategy="one_shot",
                      supernet={"score": "gallery"})
    with pytest.raises(ConfigError, match="supernet.score 'gallery'.*not rooted in the gallery model"):
        OneShot(prepare(config_from_dict(raw), log=lambda _: None), paragon).prepare(log=lambda _: None)


def test_warm_start_largest_is_the_largest_member_within_the_budget_at_each_resolution(tiny_config, small_gallery: str, tmp_path: Path) -> None:
    """``search.warm_start: largest`` on a space rooted in the gallery model: at each resolution the gallery model itself
    where it fits, else the largest pruning of it that fits (none where not even the smallest does), at least as large as
    any of 100 random members within the budget there; without a budget, the unpruned model at every resolution."""
    raw = tiny_config(tmp_path / "run", data__max_per_class=30, gallery__checkpoint=small_gallery, search__strategy="one_shot", budgets__max_mflops=None,
                      space={"name": "pruned", "options": {"resolutions": [16, 24, 64], "widths": [0.5, 0.75, 1.0]}})
    ctx = prepare(config_from_dict(raw), log=lambda _: None)
    counter = supernet_over(ctx.space, root_network(ctx, ctx.space))
    unpruned = {r: ctx.space.extreme(smallest=False, resolution=r) for r in (16, 24, 64)}
    assert largest_per_resolution(ctx, None) == list(unpruned.values())
    cap = (counter.mflops(unpruned[16]) + counter.mflops(ctx.space.extreme(smallest=True, resolution=64))) / 2
    assert counter.mflops(unpruned[16]) <= cap < counter.mflops(unpruned[24])  # the gallery model fits at 16 px only
    assert counter.mflops(ctx.space.extreme(smallest=True, resolution=64)) > cap  # and not even its smallest pruning at 64
    found = largest_per_resolution(ctx, cap)
    assert [a.resolution for a in found] == [16, 24] and found[0] == unpruned[16]
    shrunk = found[1]
    assert shrunk.pruning and counter.mflops(shrunk) <= cap
    rng = np.random.default_rng(0)
    others = (replace(random_member(ctx.space, rng), resolution=24) for _ in range(100))
    assert counter.mflops(shrunk) >= max(m for m in map(counter.mflops, others) if m <= cap)
