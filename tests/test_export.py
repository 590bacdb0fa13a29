"""Export of a searched query network: files, verification, model card, loading back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nas import load_query_model
from nas.export.loading import load_preprocessing
from nas.config import config_from_dict
from nas.data import load_retrieval_data
from nas.errors import NasError
from nas.export import MAX_MAP_DIFF, MIN_COSINE, export_trial
from nas.records import StudyRecord, TrialRecord
from nas.results import best_trial, pareto_front
from nas.scoring import embed
from nas.search.driver import run_search


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path):
    import copy

    from tests.conftest import TINY

    raw = copy.deepcopy(TINY)
    raw["out"] = str(tmp_path_factory.mktemp("run"))
    raw["data"]["path"] = str(digits_dir)
    raw["search"]["trials"] = 3
    raw["budgets"]["max_mflops"] = None
    config = config_from_dict(raw)
    study = run_search(config, log=lambda _: None)
    out = tmp_path_factory.mktemp("export")
    verification = export_trial(study, "best", out, log=lambda _: None)
    return config, study, out, verification


def test_export_writes_every_file_and_verifies(exported) -> None:
    _, _, out, verification = exported
    for name in ("arch.json", "weights.safetensors", "model.torchscript.pt", "model.onnx", "MODEL_CARD.md", "verification.json"):
        assert (out / name).is_file(), name
    assert (out / "model.int8.onnx").is_file()
    assert verification["passed"]
    assert set(verification["min_cosine"]) == {"reloaded", "torchscript", "onnx"}
    assert all(value >= MIN_COSINE for value in verification["min_cosine"].values())
    # the ONNX model scores the same asymmetric mAP as the trial did
    assert verification["query_mAP"]["onnx"] == pytest.approx(verification["query_mAP"]["trial"], abs=MAX_MAP_DIFF)
    assert json.loads((out / "verification.json").read_text()) == verification


def test_export_draws_the_retrieval_picture(exported) -> None:
    """retrieval.png and retrieval.html: 8 queries of 8 classes, the card and the report link them, the trial's run has them."""
    import mlflow

    from nas.report import pictures_text

    config, study, out, _ = exported
    png, page = out / "retrieval.png", out / "retrieval.html"
    assert png.is_file() and page.is_file()
    text = page.read_text()
    assert text.count('<tr class="query-row"') == 8 and text.count('class="hit ') == 8 * 10
    retrieval = load_retrieval_data(config.data)
    queries = [int(chunk.split('"', 1)[0]) for chunk in text.split('<tr class="query-row" data-query="')[1:]]
    assert set(queries) <= set(retrieval.split.query.tolist()) and len(set(retrieval.data.labels[queries])) == 8
    card = (out / "MODEL_CARD.md").read_text()
    assert "[`retrieval.png`](retrieval.png) and [`retrieval.html`](retrieval.html)" in card
    best = best_trial(study)
    assert StudyRecord.load(study).pictures[str(best.number)] == str(png.resolve())
    assert f"trial {best.number}: {png.resolve()}" in pictures_text(study)
    artifacts = {f.path for f in mlflow.tracking.MlflowClient(config.tracking_uri).list_artifacts(best.mlflow_run_id)}
    assert {"retrieval.png", "retrieval.html"} <= artifacts


def test_loaded_model_gives_the_trial_embeddings(exported) -> None:
    config, study, out, _ = exported
    model = load_query_model(out)
    best = best_trial(study)
    assert model.arch.to_string() == best.arch
    retrieval = load_retrieval_data(config.data)
    data, split = retrieval.data, retrieval.split
    from safetensors.torch import load_file
    from search_spaces import build

    reference = build(model.arch)
    reference.load_state_dict(load_file(best.weights))
    prep, rows = load_preprocessing(out), split.query[:64]
    np.testing.assert_allclose(
        embed(model, data.images, model.arch.resolution, prep, indices=rows), embed(reference, data.images, model.arch.resolution, prep, indices=rows), atol=1e-6
    )


def test_onnx_has_a_dynamic_batch(exported) -> None:
    import onnxruntime as ort

    _, _, out, _ = exported
    arch = json.loads((out / "arch.json").read_text())["architecture"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = np.random.default_rng(0).standard_normal((batch, arch["in_chans"], arch["resolution"], arch["resolution"])).astype(np.float32)
        (y,) = session.run(["embeddings"], {"images": x})
        assert y.shape == (batch, arch["embed_dim"])
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)


def test_model_card_states_the_measured_numbers(exported) -> None:
    _, study, out, verification = exported
    best = best_trial(study)
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{best.budgets['mflops']:.4f}" in card and "multiply-accumulates" in card
    assert f"{best.metrics['query_mAP']:.4f}" in card
    assert "torch runtime, 1 thread(s), batch 1" in card
    assert StudyRecord.load(study).gallery_sha256 in card
    assert f"onnx {verification['min_cosine']['onnx']:.6f}" in card
    q = verification["int8"]
    assert f"asymmetric query mAP {q['query_mAP']:.4f}, a drop of {q['mAP_drop_from_float']:.4f}" in card
    assert f"int8 {q['latency_ms_onnxruntime']['median']:.3f}" in card
    assert 0 <= q["query_mAP"] <= 1 and q["latency_ms_onnxruntime"]["median"] > 0


def test_truncated_or_tampered_weights_are_a_clear_error(exported, tmp_path: Path) -> None:
    _, _, out, _ = exported
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "arch.json").write_text((out / "arch.json").read_text())
    data = (out / "weights.safetensors").read_bytes()
    (broken / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(NasError, match="cannot be read .*export the model again"):
        load_query_model(broken)
    # weights of another architecture
    arch = json.loads((out / "arch.json").read_text())
    arch["architecture"]["head_chs"] = 128
    arch["architecture"].pop("arch_id")
    (broken / "arch.json").write_text(json.dumps(arch))
    (broken / "weights.safetensors").write_bytes(data)
    with pytest.raises(NasError, match="does not fit the architecture"):
        load_query_model(broken)


def test_only_complete_trials_can_be_exported(exported, tmp_path: Path) -> None:
    _, study, _, _ = exported
    with pytest.raises(NasError, match="no trial 999"):
        export_trial(study, "999", tmp_path, log=lambda _: None)
    with pytest.raises(NasError, match="'best', 'pareto:K' or a trial number"):
        export_trial(study, "worst", tmp_path, log=lambda _: None)
    with pytest.raises(NasError, match="Pareto front"):
        export_trial(study, "pareto:99", tmp_path, log=lambda _: None)
    with pytest.raises(NasError, match="Unknown export format"):
        export_trial(study, "best", tmp_path, formats="onnx,tflite", log=lambda _: None)


def test_pareto_point_and_format_subset(exported, tmp_path: Path) -> None:
    _, study, _, _ = exported
    front = pareto_front(study)
    assert front, "a study with complete trials has a Pareto front"
    mflops = [t.budgets["mflops"] for t in front]
    assert mflops == sorted(mflops)
    values = [t.value for t in front]
    assert values == sorted(values)  # more MFLOPs only on the front when it buys val mAP
    verification = export_trial(study, "pareto:0", tmp_path, formats="state_dict", log=lambda _: None)
    assert verification["trial"] == front[0].number
    expected = ["MODEL_CARD.md", "arch.json", "retrieval.html", "retrieval.png", "verification.json", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    assert set(verification["min_cosine"]) == {"reloaded"} and "int8" not in verification


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_export_retrains_a_trial_whose_weights_were_not_kept(tmp_path: Path, tiny_config) -> None:
    raw = tiny_config(tmp_path / "run", search__trials=2, budgets__max_mflops=None)
    study = run_search(config_from_dict(raw), log=lambda _: None)
    best = best_trial(study)
    Path(best.weights).unlink()
    logs: list[str] = []
    verification = export_trial(study, "best", tmp_path / "export", formats="state_dict,onnx", log=logs.append)
    assert verification["retrained"] and verification["passed"]
    assert any("were not kept" in line and "retraining" in line for line in logs)
    assert "retrained" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
    # same architecture, same seed, same data: the retrained net scores what the trial scored
    assert verification["query_mAP"]["onnx"] == pytest.approx(best.metrics["query_mAP"], abs=0.01)


def test_torchscript_runs_without_our_code(exported) -> None:
    _, _, out, _ = exported
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    arch = json.loads((out / "arch.json").read_text())["architecture"]
    y = scripted(torch.zeros(3, arch["in_chans"], arch["resolution"], arch["resolution"]))
    assert y.shape == (3, arch["embed_dim"])


def test_export_registers_a_loadable_model(exported) -> None:
    import mlflow
    import onnxruntime as ort

    config, study, out, verification = exported
    uri = verification["registered_model"]
    assert uri.startswith("models:/asymnas-tiny/")
    name, version = uri[len("models:/"):].split("/")
    client = mlflow.tracking.MlflowClient(config.tracking_uri)
    tags = client.get_model_version(name, version).tags
    best = best_trial(study)
    assert tags["mflops"] == f"{best.budgets['mflops']:.4f}"
    assert tags["query_mAP"] == f"{best.metrics['query_mAP']:.4f}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(config.tracking_uri)
    try:
        onnx_model = mlflow.onnx.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
    arch = json.loads((out / "arch.json").read_text())["architecture"]
    x = np.random.default_rng(1).standard_normal((3, arch["in_chans"], arch["resolution"], arch["resolution"])).astype(np.float32)
    registered = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["embeddings"], {"images": x})[0]
    exported_file = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["embeddings"], {"images": x})[0]
    np.testing.assert_allclose(registered, exported_file, atol=1e-6)
    # registering did not change the trial's run status
    assert client.get_run(best.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow  # about 30 s; the export path itself is covered by test_export_writes_every_file_and_verifies
def test_export_of_a_warm_started_timm_trial(tmp_path: Path, tiny_config) -> None:
    """A trial that is a timm model (warm start) exports and verifies like a searched one."""
    raw = tiny_config(tmp_path / "run", search__trials=1, budgets__max_mflops=None, search__warm_start=["lcnet_035@32"], train__epochs=1)
    study = run_search(config_from_dict(raw), log=lambda _: None)
    (trial,) = study.trials  # the warm-start trial is the one trial of this run
    assert "model=lcnet_035" in TrialRecord.from_trial(trial).arch
    verification = export_trial(study, str(trial.number), tmp_path / "export", log=lambda _: None)
    assert verification["passed"] and set(verification["min_cosine"]) == {"reloaded", "torchscript", "onnx"}
    model = load_query_model(tmp_path / "export")
    assert model.arch.timm_model == "lcnet_035"
    assert "lcnet_035" in (tmp_path / "export" / "MODEL_CARD.md").read_text()
