"""One gallery model, one MFLOPs figure: every place that counts it counts the same network the same way.

The places: ``nas profile --timm MODEL --config`` (the command line), the study's record of its
gallery model (:func:`nas.study_nets.gallery_costs` on the real :class:`nas.gallery.GalleryNet`),
``nas space show`` and the study's space (its unpruned member at the gallery's resolution), and the
supernet's count of that member (which reads shapes, without running it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nas.cli import main
from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.gallery import create_gallery_net
from nas.hardware import count_mflops, make_budgets
from nas.study_nets import gallery_architecture, gallery_costs, gallery_width, profile_candidates, study_space
from search_spaces import build
from search_spaces._rooted_supernet import supernet_over

RES = 64


def _config(tmp_path: Path, model: str, space: str, embed_dim: int | None) -> dict:
    return {
        "out": str(tmp_path / "run"),
        "data": {"dataset": "image_folder", "path": str(tmp_path / "images")},  # 3 channels; never read here
        "gallery": {"model": model, "embed_dim": embed_dim, "resolution": RES},
        "space": {"name": space, "options": {"resolutions": [32, RES]}},
        "budgets": {"latency": {"warmup": 1, "repeats": 3}},
        "tracking": {"enabled": False},
    }


def _row_mflops(out: str, column: int) -> float:
    """The MFLOPs column of the first table row (``#  res  MFLOPs ...``, or ``nas space show``'s ``res ... largest``)."""
    row = next(line for line in out.splitlines() if re.match(rf"^\s*(0\s+)?{RES}\s", line))
    return float(row.split()[column])


@pytest.mark.parametrize(("model", "space"), [("resnet18", "pruned"), ("tf_efficientnet_lite0", "gallery")])
@pytest.mark.parametrize("embed_dim", [None, 16])
def test_every_place_counts_the_gallery_model_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, space: str, embed_dim: int | None) -> None:
    raw = _config(tmp_path, model, space, embed_dim)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)

    # the study: its gallery model, measured as the search records it
    gallery = create_gallery_net(config.gallery, config.data.resolved_channels)
    study = gallery_costs(gallery, config.gallery.resolution, config.data.resolved_channels, make_budgets(config.budgets))["mflops"]
    # the gallery model as the study embeds it, built from the config alone
    arch = gallery_architecture(config)
    assert (arch.in_chans, arch.resolution, arch.projection) == (3, RES, embed_dim is not None)
    assert arch.embed_dim == gallery.embed_dim == gallery_width(config.gallery, 3)
    shaped = count_mflops(build(arch), RES, 3)
    # the study's space: its largest member at the gallery's resolution is the unpruned gallery model
    members = study_space(config)
    largest = members.extreme(smallest=False, resolution=RES)
    member = count_mflops(build(largest), RES, 3)
    supernet = supernet_over(members).mflops(largest)
    # the command line: nas profile and nas space show, from the experiment file
    assert main(["profile", "--timm", model, "--config", str(path), "--table-dir", str(tmp_path / "tables")]) == 0
    out = capsys.readouterr().out
    assert "as the study embeds its gallery model" in out and f"{RES} px (gallery.resolution)" in out
    profiled = _row_mflops(out, 2)
    assert main(["space", "show", space, "--config", str(path), "--resolution", str(RES)]) == 0
    shown = _row_mflops(capsys.readouterr().out, 3)

    assert study == pytest.approx(shaped, rel=1e-9) and member == pytest.approx(study, rel=1e-9)
    assert supernet == pytest.approx(study, rel=1e-9)
    assert profiled == pytest.approx(study, abs=5e-4) and shown == pytest.approx(study, abs=5e-4)
    # the embedding layer is part of the figure: a projection adds its in x out multiply-accumulates
    without = gallery_costs(create_gallery_net(config_from_dict({**raw, "gallery": {**raw["gallery"], "embed_dim": None}}).gallery, 3), RES, 3,
                            make_budgets(config.budgets))["mflops"]
    features = gallery_width(config_from_dict({**raw, "gallery": {**raw["gallery"], "embed_dim": None}}).gallery, 3)
    assert study - without == pytest.approx(0 if embed_dim is None else features * embed_dim / 1e6, abs=1e-9)


def test_profile_without_a_config_says_what_it_assumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--timm", "resnet18", "--table-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 input channel (assumed: no --config)" in out and "a 128-d embedding projection (assumed: no --config)" in out
    assert "32 px (assumed)" in out and "--config CONFIG" in out
    # given by flags: nothing assumed; --embed-dim 0 is the pooled features, as a gallery with embed_dim null
    archs, line = profile_candidates(timm_name="resnet18", resolution=RES, in_chans=3, embed_dim=0)
    assert "assumed" not in line and "no embedding layer (the 512-d pooled features" in line
    config = config_from_dict(_config(tmp_path, "resnet18", "pruned", None))
    assert archs == [gallery_architecture(config)]


def test_profile_embed_dim_zero_is_for_a_timm_model_only() -> None:
    with pytest.raises(ConfigError, match="--timm only"):
        profile_candidates(space="mobilenet", embed_dim=0)


def test_profile_of_a_model_that_cannot_take_the_resolution_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--timm", "vit_tiny_patch16_224", "--resolution", "32", "--table-dir", str(tmp_path)]) == 2
    assert "does not run at this input resolution" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"), [("--sample", "0"), ("--sample", "-2"), ("--resolution", "0"), ("--threads", "0"), ("--batch-size", "0"), ("--embed-dim", "-1"), ("--seed", "-1")]
)
def test_profile_numeric_flags_out_of_range_are_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--space", "mobilenet", flag, value] if flag in ("--sample", "--seed") else ["profile", "--timm", "resnet18", flag, value]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: must be" in err and f"but got {value}" in err
