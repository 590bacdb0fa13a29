"""The ``nas`` command line: a whole search/export round, and one-paragraph errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nas.cli import main


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_search_then_export_from_the_command_line(tmp_path: Path, tiny_config, small_gallery, capsys) -> None:
    # the session's gallery checkpoint, and one export format: every format is exported and verified in test_export.py
    config = tiny_config(tmp_path / "run", search__trials=2, budgets__max_mflops=None, gallery__checkpoint=small_gallery)
    file = _write(tmp_path / "exp.yaml", config)
    assert main(["search", str(file), "--trials", "3", "--max-params-m", "5", "--study-name", "cli"]) == 0
    out = capsys.readouterr().out
    assert "Best trial #" in out and "Trials: 3" in out and "nas export --study-name cli" in out
    assert main(["results", "--study-name", "cli", "--run-dir", str(tmp_path / "run")]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["export", "--study-name", "cli", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "export"),
                 "--format", "onnx"]) == 0
    assert (tmp_path / "export" / "model.onnx").is_file() and not (tmp_path / "export" / "model.torchscript.pt").exists()


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_misspelled_key_names_the_nearest_valid_one(tmp_path: Path, tiny_config, capsys) -> None:
    config = tiny_config(tmp_path)
    config["budgets"]["max_mflop"] = 3
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", config))])
    assert "budgets.max_mflop" in err and "max_mflops" in err


def test_missing_data_says_where_and_how_to_get_it(tmp_path: Path, tiny_config, capsys) -> None:
    config = tiny_config(tmp_path, data__path=str(tmp_path / "nowhere"))
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", config))])
    assert str(tmp_path / "nowhere") in err and "apt-get install dataset-fashion-mnist" in err


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("space__name", "mobilenett", "Valid spaces: efficientnet, gallery, mobilenet"),
        ("train__loss", "regresion", "Did you mean 'regression'? Valid losses: bct, contrastive, csd"),
        ("data__dataset", "fashion", "Did you mean 'fashion_mnist'?"),
        ("gallery__model", "resnet_18", "not a timm architecture"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path: Path, tiny_config, capsys, key: str, value: str, expected: str) -> None:
    config = tiny_config(tmp_path, **{key: value})
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", config))])
    assert expected in err


def test_unreachable_budget_from_the_command_line(tmp_path: Path, tiny_config, capsys) -> None:
    config = tiny_config(tmp_path, gallery__train={"epochs": 1})
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", config)), "--max-latency-ms", "0.0001"])
    assert "smallest member" in err and "latency_ms" in err


def test_unreadable_gallery_checkpoint(tmp_path: Path, tiny_config, capsys) -> None:
    bad = tmp_path / "gallery.safetensors"
    bad.write_bytes(b"not a checkpoint")
    config = tiny_config(tmp_path, gallery__checkpoint=str(bad))
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", config))])
    assert str(bad) in err and "unreadable" in err


def test_export_of_an_unknown_study(tmp_path: Path, capsys) -> None:
    err = _error(capsys, ["export", "--study-name", "nope", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert "No study database" in err


def test_embed_a_folder_skips_and_lists_bad_images(tmp_path: Path, tiny_config, small_gallery, capsys) -> None:
    import numpy as np
    from PIL import Image

    from nas import load_query_model
    from nas.export.loading import load_preprocessing

    config = tiny_config(tmp_path / "run", search__trials=1, budgets__max_mflops=None, gallery__checkpoint=small_gallery)
    file = _write(tmp_path / "exp.yaml", config)
    assert main(["search", str(file)]) == 0
    assert main(["export", "--study-name", "tiny", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--format", "state_dict"]) == 0
    from sklearn.datasets import load_digits

    images = (load_digits().images[:5] * 16).astype(np.uint8)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    assert main(["embed", str(tmp_path / "export"), str(folder), "--out", str(tmp_path / "emb.npy")]) == 0
    out = capsys.readouterr().out
    assert "Embedded 5 image(s)" in out and "Skipped 1 unreadable image(s)" in out and "broken.png" in out
    embeddings = np.load(tmp_path / "emb.npy")
    ids = (tmp_path / "emb.ids.txt").read_text().split()
    assert embeddings.shape == (5, 32) and len(ids) == 5 and "broken.png" not in ids
    model = load_query_model(tmp_path / "export")
    first = ids.index("img0.png")
    transform = load_preprocessing(tmp_path / "export").eval_transform(model.arch.resolution)  # what the export recorded
    expected = model(transform(Image.fromarray(images[0]))[None]).detach().numpy()[0]
    np.testing.assert_allclose(embeddings[first], expected, atol=1e-5)


@pytest.mark.slow  # about 95 s; workers on one study stay covered by tests/test_resume.py and tests/test_distributed.py
def test_search_with_two_local_workers_on_sqlite(tmp_path: Path, tiny_config, capsys) -> None:
    import optuna

    config = tiny_config(tmp_path / "run", budgets__max_mflops=None, search__study_name="two")
    file = _write(tmp_path / "exp.yaml", config)
    assert main(["search", str(file), "--workers", "2", "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "Starting 2 workers (1 thread(s) each)" in out and "Trials: 4" in out
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.user_attrs["worker"] for t in study.trials} and all(t.user_attrs["state"] == "complete" for t in study.trials)
    # running it again adds 4 more, as a single-process search would
    assert main(["search", str(file), "--workers", "2", "--trials", "4"]) == 0
    assert len(optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}").trials) == 8


def test_space_show_prints_choices_size_and_extremes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["space", "show", "resnet", "--option", "resolutions=[16,24]", "--option", "blocks=[basic]"]) == 0
    out = capsys.readouterr().out
    assert "Search space 'resnet': 3,888 architectures" in out  # 2 resolutions x 1 block x (2*3)(2*3)(3*3)(2*3)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("16 ", "24 "))]
    assert [r[0] for r in rows] == ["16", "24"]
    for row in rows:  # smallest MFLOPs < largest MFLOPs, and the same params at every resolution
        assert float(row[1]) < float(row[3])
    assert rows[0][2] == rows[1][2] and float(rows[0][1]) < float(rows[1][1])
    assert "multiply-accumulates" in out and "Smallest: space=resnet res=16" in out


def test_space_show_takes_options_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("space:\n  name: mobilenet\n  options:\n    resolutions: [16]\n    widths: [0.5]\ngallery:\n  embed_dim: 32\n")
    assert main(["space", "show", "mobilenet", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "embed=32" in out and "res=16 width=0.5" in out


def test_space_show_gallery_roots_any_supported_timm_model(capsys: pytest.CaptureFixture[str]) -> None:
    """A ResNet cannot root the MBConv gallery space: its rooted space with width is shown instead, and why."""
    assert main(["space", "show", "gallery", "--gallery-model", "resnet18", "--resolution", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("timm model 'resnet18' cannot root the gallery space") and "'pruned' space" in out
    assert "Search space 'pruned'" in out and "family             resnet" in out and "in=3" in out
    assert "not_pruned         ['head: no coupled channel group starts there']" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("64 "))
    assert 0 < float(row[1]) < float(row[3])  # smallest and largest member's MFLOPs
    assert main(["space", "show", "gallery", "--gallery-model", "tf_efficientnet_lite0", "--resolution", "64"]) == 0
    assert "Search space 'gallery'" in capsys.readouterr().out  # an EfficientNet roots both


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["space", "show", "gallery", "--gallery-model", "vgg11"], "No pruning rule covers gallery models of class 'VGG'"),
        (["space", "show", "mobilenett"], "Did you mean 'mobilenet'"),
        (["space", "show", "resnet", "--option", "widthz=[1]"], "Unknown option 'widthz'"),
        (["space", "show", "resnet", "--option", "blocks"], "KEY=VALUE"),
        (["space", "show", "timm_zoo", "--option", "families=[mobilenetv4]"], "mobilenetv4"),
    ],
)
def test_space_show_bad_input_is_a_clear_error(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_profile_prints_measured_and_predicted_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["profile", "--space", "mobilenet", "--sample", "2", "--table-dir", str(tmp_path), "--runtime", "onnxruntime"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "onnxruntime runtime, 1 thread(s), batch 1" in out and "multiply-accumulates" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 2
    for row in rows:
        mflops, params, memory, measured, p90, predicted, ratio = map(float, row[2:9])
        assert mflops > 0 and params > 0 and memory > params * 4  # float32 weights alone are 4 bytes per parameter
        assert 0 < measured <= p90 and predicted > 0 and 0.2 < ratio < 5  # magnitude only: timings move with machine load
    assert list(tmp_path.glob("onnxruntime-1t-b1-*.json"))  # the lookup table was cached


def test_profile_of_an_architecture_string_and_a_timm_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch = "space=resnet res=16 width=1 stem=16 stages=bb_r1_k3_s1_c8/bb_r1_k3_s2_c16 head=0 embed=8 in=1 act=relu"
    assert main(["profile", "--arch", arch, "--table-dir", str(tmp_path)]) == 0
    assert "bb_r1_k3_s2_c16" in capsys.readouterr().out
    assert main(["profile", "--timm", "lcnet_035", "--resolution", "32", "--table-dir", str(tmp_path), "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "model=lcnet_035" in out and "batch 2" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["profile", "--timm", "mobilenetv9"], "no model named 'mobilenetv9'"),
        (["profile", "--arch", "space=x res=16"], "missing field"),
        (["profile", "--arch", "space=r res=16 width=1 stem=16 stages=bb_r1_k5_s1_c8 head=0 embed=8 in=1"], "k5"),
    ],
)
def test_profile_bad_input_is_a_clear_error(argv: list[str], fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--table-dir", str(tmp_path)]) == 2
    assert fragment in capsys.readouterr().err


def test_baseline_trains_timm_models_beside_the_trials(tmp_path: Path, tiny_config, small_gallery, capsys: pytest.CaptureFixture[str]) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    # at 32 px, 1 channel, 32-d embedding: lcnet_035 0.78 MFLOPs, mobilenetv3_small_050 0.84: 0.81 splits them
    config = tiny_config(tmp_path / "run", search__study_name="base", search__trials=1, budgets__max_mflops=0.81, gallery__checkpoint=small_gallery)
    file = _write(tmp_path / "exp.yaml", config)
    assert main(["search", str(file)]) == 0
    capsys.readouterr()
    assert main(["baseline", str(file), "--models", "lcnet_035,mobilenetv3_small_050", "--resolutions", "32"]) == 0
    out = capsys.readouterr().out
    assert "lcnet_035@32" in out and "mobilenetv3_small_050@32" in out
    study = optuna.load_study(study_name="base", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    baselines = study.user_attrs["baselines"]
    assert set(baselines) == {"lcnet_035@32", "mobilenetv3_small_050@32"}
    for result in baselines.values():
        assert result["budgets"]["mflops"] > 0 and result["budgets"]["latency_ms"] > 0 and result["budgets"]["memory_mb"] > 0
        assert result["fits"] == (result["budgets"]["mflops"] <= 0.81)
        assert 0 < result["metrics"]["query_mAP"] <= 1 and result["metrics"]["query_mAP_ratio"] > 0
    assert baselines["lcnet_035@32"]["fits"] and not baselines["mobilenetv3_small_050@32"]["fits"]
    assert "mflops" in baselines["mobilenetv3_small_050@32"]["reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`asymnas.role` = 'baseline'")
    assert {r.info.run_name for r in runs} == {"baseline:lcnet_035@32", "baseline:mobilenetv3_small_050@32"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent and r.info.status == "FINISHED" for r in runs)
    assert all("query_mAP" in r.data.metrics and "mflops" in r.data.metrics for r in runs)
    # nas results shows them beside the trials
    assert main(["results", "--study-name", "base", "--run-dir", str(tmp_path / "run")]) == 0
    assert "Hand-designed baselines" in capsys.readouterr().out
    # nas report: tables, plots with the baselines marked, importances; logged to the parent run
    assert main(["report", "--study-name", "base", "--run-dir", str(tmp_path / "run"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "== top.txt" in out and "== baselines.txt" in out and "== importances.txt" in out and "logged" in out
    assert "== pictures.txt\nNo retrieval picture yet" in out and f"nas export --study-name base --run-dir {tmp_path / 'run'} --out" in out
    report = tmp_path / "run" / "report"
    for name in ("pareto_mflops.png", "pareto_latency.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"top.txt", "baselines.txt", "importances.txt", "pareto_mflops.png", "pareto_latency.png"} <= artifacts


def test_baseline_bad_input(tmp_path: Path, tiny_config, capsys: pytest.CaptureFixture[str]) -> None:
    file = _write(tmp_path / "exp.yaml", tiny_config(tmp_path / "run"))
    assert main(["baseline", str(file), "--models", "mobilenetv9"]) == 2
    assert "Unknown timm model(s) mobilenetv9" in capsys.readouterr().err
    assert main(["baseline", str(file), "--models", "lcnet_035", "--resolutions", "16"]) == 2
    assert ">= 32" in capsys.readouterr().err
    assert main(["baseline", str(file), "--resolutions", "3x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_search_flags_choose_the_sampler_and_objectives(tmp_path: Path, tiny_config, small_gallery, capsys: pytest.CaptureFixture[str]) -> None:
    import optuna

    config = tiny_config(tmp_path / "run", budgets__max_mflops=None, search__study_name="mo", train__epochs=1, gallery__checkpoint=small_gallery)
    file = _write(tmp_path / "exp.yaml", config)
    assert main(["search", str(file), "--trials", "2", "--sampler", "random", "--objectives", "mAP,mflops"]) == 0
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path / 'run' / 'optuna.db'}")
    assert study.user_attrs["config"]["search"]["sampler"] == "random"
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert all(len(t.values) == 2 and t.values[1] == pytest.approx(t.user_attrs["budgets"]["mflops"]) for t in study.trials)
    assert main(["search", str(file), "--objectives", "mflops"]) == 2
    assert "search.objectives" in capsys.readouterr().err
