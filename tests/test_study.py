"""End-to-end: a tiny search on real (small) data, its MLflow runs, resume, and bad input."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from nas.config import config_from_dict
from nas.errors import BudgetError, GalleryError
from nas.results import best_trial, counted_trials, summary
from nas.search.driver import run_search
from nas.search.optuna_setup import open_study

COMPLETE = optuna.trial.TrialState.COMPLETE


def _child_runs(client: MlflowClient, study: optuna.Study) -> list:
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path):
    """One tiny search (gallery trained by the search itself), shared by the tests below."""
    from tests.conftest import TINY
    import copy

    out = tmp_path_factory.mktemp("search")
    raw = copy.deepcopy(TINY)
    raw["out"] = str(out)
    raw["data"]["path"] = str(digits_dir)
    config = config_from_dict(raw)
    logs: list[str] = []
    study = run_search(config, log=logs.append)
    return config, study, logs


def test_search_records_complete_and_infeasible_trials(searched) -> None:
    config, study, logs = searched
    # candidates over budget are recorded but do not count toward search.trials
    assert counted_trials(study) == config.search.trials
    assert len(study.trials) == config.search.trials + sum(t.user_attrs["state"] == "infeasible" for t in study.trials)
    states = [t.user_attrs.get("state") for t in study.trials]
    assert "infeasible" in states and states.count("complete") >= 3
    for t in study.trials:
        budgets = t.user_attrs["budgets"]
        if t.user_attrs["state"] == "infeasible":
            # rejected on MFLOPs before any training: no weights, no metrics, constraint > 0
            assert budgets["mflops"] > config.budgets.max_mflops
            assert t.constraints["mflops"] > 0
            assert "weights" not in t.user_attrs and "metrics" not in t.user_attrs
            assert "mflops" in t.user_attrs["reason"]
        else:
            assert budgets["mflops"] <= config.budgets.max_mflops
            assert all(v <= 0 for v in t.constraints.values())
            m = t.user_attrs["metrics"]
            assert 0 < m["query_mAP"] <= 1 and 0 < m["query_mAP_ratio"]
            assert t.value == pytest.approx(m["val_mAP"])
            assert "weights" in t.user_attrs
            assert t.intermediate_values.keys() == {1, 2}  # one report per epoch
    ranked = sorted((t for t in study.trials if t.user_attrs["state"] == "complete"), key=lambda t: -t.value)
    assert all(Path(t.user_attrs["weights"]).is_file() for t in ranked[: config.search.keep_best])  # the rest may be pruned
    assert any("Gallery model: no checkpoint configured; training" in line for line in logs)
    assert any(line.startswith("[trial") and f"/{config.search.trials}]" in line for line in logs)  # progress display
    assert any("| rejected] over budget" in line for line in logs)


def test_paragon_and_best_trial_are_stored(searched) -> None:
    config, study, _ = searched
    paragon = study.user_attrs["paragon"]
    assert 0 < paragon["query"]["mAP"] <= 1
    best = best_trial(study)
    assert best is not None and best.state == "complete"
    assert best.value == max(t.value for t in study.trials if t.user_attrs["state"] == "complete")
    text = summary(study, config)
    assert f"Best trial #{best.number}" in text and "of the paragon" in text and f"nas ui --run-dir {config.out_dir}" in text


def test_mlflow_has_one_parent_and_one_child_per_trial(searched) -> None:
    config, study, _ = searched
    client = MlflowClient(config.tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.study_name"] == "tiny"
    assert "paragon_query_mAP" in parent.data.metrics and parent.data.tags["gallery.sha256"]
    assert "mflops <= 0.6 (M multiply-accumulates (fvcore, batch 1))" in parent.data.tags["budgets"]
    assert parent.data.params["split.train"] and parent.data.tags["best_trial"] == str(best_trial(study).number)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "space.json", "results.txt", "pareto.txt", "pareto_mflops.png", "pareto_latency.png", "importances.txt", "top.txt"} <= artifacts
    assert (config.out_dir / "report" / "pareto_mflops.png").read_bytes()[:4] == b"\x89PNG"
    children = _child_runs(client, study)
    assert len(children) == len(study.trials)
    by_id = {run.info.run_id: run for run in children}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]  # the child run id is stored on the trial
        assert run.data.tags["asymnas.state"] == t.user_attrs["state"]
        assert run.data.params["arch"] == t.user_attrs["arch"]
        assert run.data.params["trial_number"] == str(t.number)
        assert "arch.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        if t.user_attrs["state"] == "complete":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["query_mAP"] == pytest.approx(t.user_attrs["metrics"]["query_mAP"])
            history = client.get_metric_history(run.info.run_id, "val_mAP")
            assert sorted(m.step for m in history) == [1, 2]
        else:
            assert run.data.tags["asymnas.reason"].startswith("mflops")


def test_running_again_resumes_without_recomputing_the_gallery(searched) -> None:
    config, study, _ = searched
    before = {t.number: t.value for t in study.trials}
    counted_before = counted_trials(study)
    gallery_file = config.out_dir / "gallery" / "gallery.safetensors"
    mtime = gallery_file.stat().st_mtime_ns
    resumed_config = config_from_dict({**_as_dict(config), "search": {**_as_dict(config)["search"], "trials": 2}})
    logs: list[str] = []
    resumed = run_search(resumed_config, log=logs.append)
    assert counted_trials(resumed) == counted_before + 2
    assert {t.number: t.value for t in resumed.trials if t.number in before} == before
    assert gallery_file.stat().st_mtime_ns == mtime
    assert any("loaded from cache" in line for line in logs)
    assert not any("training" in line and "Gallery model" in line for line in logs)
    client = MlflowClient(config.tracking_uri)
    assert resumed.user_attrs["mlflow_parent_run_id"] == study.user_attrs["mlflow_parent_run_id"]
    assert len(_child_runs(client, resumed)) == len(resumed.trials)


def _as_dict(config) -> dict:
    from nas.config import config_to_dict

    return config_to_dict(config)


def test_nan_loss_fails_that_trial_and_the_study_goes_on(searched, tmp_path: Path, tiny_config) -> None:
    config, _, _ = searched
    gallery = str(config.out_dir / "gallery" / "gallery.safetensors")
    raw = tiny_config(
        tmp_path, gallery__checkpoint=gallery, train__lr=1e30, train__optimizer="sgd", search__trials=3, budgets__max_mflops=None
    )
    study = run_search(config_from_dict(raw), log=lambda _: None)
    assert len(study.trials) == 3
    assert all(t.state == optuna.trial.TrialState.FAIL for t in study.trials)
    for t in study.trials:
        assert "loss became" in t.user_attrs["reason"] and "lower train.lr" in t.user_attrs["reason"]
    client = MlflowClient(config_from_dict(raw).tracking_uri)
    runs = _child_runs(client, study)
    assert len(runs) == 3 and all(r.info.status == "FAILED" for r in runs)


def test_budget_no_architecture_can_meet_is_a_clear_error(tmp_path: Path, tiny_config) -> None:
    raw = tiny_config(tmp_path, budgets__max_mflops=0.001)
    with pytest.raises(BudgetError) as info:
        run_search(config_from_dict(raw), log=lambda _: None)
    message = str(info.value)
    assert "smallest member" in message and "mflops" in message and "--max-mflops" in message
    assert not (tmp_path / "gallery").exists()  # refused before any gallery training


def test_a_study_refuses_a_different_gallery_model(searched, tmp_path: Path) -> None:
    config, _, _ = searched
    from nas.config import config_to_dict
    from nas.gallery import load_gallery, save_gallery

    # same architecture, other weights: a re-saved copy with one weight changed
    model = load_gallery(config.gallery, config.out_dir / "gallery" / "gallery.safetensors", 1)
    with __import__("torch").no_grad():
        next(model.parameters()).add_(1.0)
    other = save_gallery(model, tmp_path / "other.safetensors", 16, tuple(str(i) for i in range(10)))
    raw = config_to_dict(config)
    raw["gallery"]["checkpoint"] = str(other)
    raw["search"]["trials"] = 1
    with pytest.raises(GalleryError, match="not comparable"):
        run_search(config_from_dict(raw), log=lambda _: None)
    assert len(open_study(config).trials) >= config.search.trials  # nothing was lost


@pytest.mark.parametrize(("pruner", "value", "pruned"), [("percentile", 0.25, True), ("percentile", 0.35, False), ("median", 0.40, True), ("none", 0.0, False)])
def test_pruner_stops_only_trials_below_the_configured_percentile(tmp_path: Path, tiny_config, pruner: str, value: float, pruned: bool) -> None:
    raw = tiny_config(tmp_path, search__pruner=pruner, search__prune_below_percentile=25.0, search__prune_startup_trials=4, search__prune_warmup_epochs=0)
    study = open_study(config_from_dict(raw))
    for v in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):  # earlier trials' val mAP after epoch 1
        trial = study.ask()
        trial.report(v, 1)
        study.tell(trial, v)
    trial = study.ask()
    trial.report(value, 1)
    assert bool(trial.should_prune()) is pruned


def test_a_search_whose_sampler_only_finds_infeasible_candidates_stops(searched, tmp_path: Path, tiny_config) -> None:
    config, _, _ = searched
    gallery = str(config.out_dir / "gallery" / "gallery.safetensors")
    from nas.hardware import count_mflops
    from search_spaces import build, create_space

    # a budget only the space's smallest member meets: (almost) every proposal is over it
    smallest = create_space("mobilenet", 32, 1, **config.space.options).extreme(smallest=True)
    limit = count_mflops(build(smallest), smallest.resolution, 1) * 1.001
    raw = tiny_config(tmp_path, gallery__checkpoint=gallery, search__trials=2, search__max_infeasible_in_a_row=3, budgets__max_mflops=limit)
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    assert counted_trials(study) <= 2
    assert any("Stopping: the last 3 candidates were all over budget" in line for line in logs)


def test_class_disjoint_search_scores_held_out_classes_with_self_exclusion(searched, tmp_path: Path, tiny_config) -> None:
    """Train on some digit classes, search and report retrieval on the others, query = gallery."""
    config, _, _ = searched
    raw = tiny_config(tmp_path, data__protocol="class_disjoint", search__trials=2, budgets__max_mflops=None, train__loss="contrastive")
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    assert any("class_disjoint protocol (query = gallery, own entry excluded)" in line for line in logs)
    paragon = study.user_attrs["paragon"]["query"]
    # without the exclusion every query would find its own gallery copy first: R@1 = 1
    assert 0 < paragon["mAP"] < 1 and paragon["R@1"] < 1
    done = [t for t in study.trials if t.user_attrs.get("state") == "complete"]
    assert len(done) == 2 and all(0 < t.user_attrs["metrics"]["query_mAP"] < 1 for t in done)


def test_search_on_a_revisited_benchmark_layout(searched, tmp_path: Path, tiny_config) -> None:
    """Revisited Oxford layout: no labels, so a gallery checkpoint is required and label losses are refused;
    with one, trials are scored by the easy / medium / hard protocols."""
    from nas.errors import ConfigError
    from tests.test_retrieval_data import write_revisited

    root = write_revisited(tmp_path / "data")
    raw = tiny_config(tmp_path / "run", data__dataset="roxford5k", data__path=str(root), data__max_per_class=None)
    with pytest.raises(GalleryError, match="gallery.checkpoint"):
        run_search(config_from_dict(raw), log=lambda _: None)
    raw = tiny_config(tmp_path / "run2", data__dataset="roxford5k", data__path=str(root), data__max_per_class=None, train__loss="bct")
    with pytest.raises(ConfigError, match="uses class labels"):
        run_search(config_from_dict(raw), log=lambda _: None)
    gallery = str(searched[0].out_dir / "gallery" / "gallery.safetensors")  # a 1-channel gallery model
    raw = tiny_config(
        tmp_path / "run3", data__dataset="roxford5k", data__path=str(root), data__max_per_class=None, data__channels=1,
        gallery__checkpoint=gallery, search__trials=1, budgets__max_mflops=None, train__batch_size=4,
    )
    study = run_search(config_from_dict(raw), log=lambda _: None)
    paragon = study.user_attrs["paragon"]["query"]
    assert {"mAP_easy", "mAP_medium", "mAP_hard", "mP@10_hard"} <= paragon.keys()
    metrics = study.trials[0].user_attrs["metrics"]
    assert 0 <= metrics["query_mAP_hard"] <= 1 and "query_mAP_medium_ratio" in metrics


def test_report_importances_and_top_trials(searched) -> None:
    from nas.report import importances_table

    config, study, _ = searched
    text = importances_table(study)
    assert "fANOVA" in text
    rows = [line.split() for line in text.splitlines()[1:]]
    assert {r[0] for r in rows} <= set(study.trials[0].distributions) and rows
    assert sum(float(r[1]) for r in rows) == pytest.approx(1.0, abs=0.01)
    top = (config.out_dir / "report" / "top.txt").read_text().splitlines()
    assert len(top) - 2 == min(10, sum(t.user_attrs["state"] == "complete" for t in study.trials))
