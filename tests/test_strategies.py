"""Search strategies: seeded samplers, multi-objective studies with the promotion rule,
successive-halving / Hyperband pruning, warm start, and Ctrl-C during a trial."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from nas.config import BudgetConfig, SearchConfig, config_from_dict
from nas.errors import ConfigError
from nas.hardware import check_budgets, make_budgets
from nas.results import best_trial, counted_trials, front_cost, pareto_front
from nas.search.driver import run_search
from nas.search.evaluators import EVALUATORS, TrainFromScratch
from nas.search.optuna_setup import SAMPLERS, make_pruner, make_sampler, open_study
from search_spaces import build, create_space
from tests.test_resilience import start_search_until_training


def _proposals(sampler_name: str, seed: int, n: int = 12) -> list[str]:
    """Architecture ids the study's sampler proposes, constraints fed back as in a search."""
    space = create_space("mobilenet", 16, 1, resolutions=[16, 20])
    budgets = make_budgets(BudgetConfig(max_mflops=0.3))[:2]
    study = optuna.create_study(sampler=make_sampler(SearchConfig(sampler=sampler_name, seed=seed, n_startup_trials=4)), direction="maximize")
    ids = []
    for _ in range(n):
        trial = study.ask()
        arch = space.sample(trial)
        report = check_budgets(build(arch), arch.resolution, 1, budgets)
        for budget, value in zip(budgets, report.constraints, strict=True):
            trial.set_constraint(budget.name, value)
        ids.append(arch.arch_id)
        study.tell(trial, report.values["mflops"] if report.feasible else 0.0)
    return ids


@pytest.mark.parametrize("sampler", ["tpe", "random", "nsga2", "gp", "qmc"])
def test_samplers_are_seeded(sampler: str) -> None:
    first = _proposals(sampler, seed=7)
    assert _proposals(sampler, seed=7) == first  # the same config and seed: the same candidates
    assert _proposals(sampler, seed=8) != first
    assert len(set(first)) > 1


def test_qmc_sampler_is_one_registered_entry() -> None:
    """A sampler added by one registry entry: the config accepts it and the study gets Optuna's QMC sampler."""
    assert "qmc" in SAMPLERS.names()
    assert isinstance(make_sampler(SearchConfig(sampler="qmc", seed=3)), optuna.samplers.QMCSampler)
    with pytest.raises(ConfigError, match=r"search.sampler must be one of .*Did you mean 'qmc'"):
        SearchConfig(sampler="qcm")


def test_unknown_strategy_fails_before_any_data_is_loaded(tmp_path) -> None:
    config = config_from_dict({"out": str(tmp_path), "data": {"path": str(tmp_path / "nothing-here")},
                               "search": {"strategy": "train_from_scrach"}})
    with pytest.raises(ConfigError, match=r"search.strategy must be one of 'train_from_scratch'.*Did you mean 'train_from_scratch'"):
        run_search(config, log=lambda _: None)
    assert EVALUATORS.get("train_from_scratch") is TrainFromScratch


def test_pruners_by_name() -> None:
    assert isinstance(make_pruner(SearchConfig(pruner="hyperband"), 4), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(SearchConfig(pruner="successive_halving"), 4), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(make_pruner(SearchConfig(pruner="median"), 4), optuna.pruners.PercentilePruner)
    # Optuna's pruners do not support multi-objective studies: they get none (the promotion rule instead)
    assert isinstance(make_pruner(SearchConfig(pruner="median", objectives=("mAP", "mflops")), 4), optuna.pruners.NopPruner)


@pytest.mark.parametrize(
    "search, fragment",
    [
        ({"sampler": "cmaes"}, "search.sampler"),
        ({"objectives": ["mflops"]}, "search.objectives"),
        ({"objectives": ["mAP", "flops"]}, "search.objectives"),
        ({"warm_start": "everything"}, "search.warm_start"),
        ({"promotion_epoch": 0}, "search.promotion_epoch"),
    ],
)
def test_strategy_options_are_validated(search: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        config_from_dict({"search": search})


@pytest.fixture(scope="module")
def gallery_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> str:
    """A gallery model trained once for this module's searches."""
    from tests.conftest import TINY
    import copy

    raw = copy.deepcopy(TINY)
    raw["out"] = str(tmp_path_factory.mktemp("gallery"))
    raw["data"]["path"] = str(digits_dir)
    raw["search"]["trials"] = 0
    config = config_from_dict(raw)
    run_search(config, log=lambda _: None)
    return str(config.out_dir / "gallery" / "gallery.safetensors")


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_multi_objective_nsga2_search_and_the_promotion_rule(tmp_path: Path, tiny_config, gallery_checkpoint: str) -> None:
    raw = tiny_config(
        tmp_path, gallery__checkpoint=gallery_checkpoint, budgets__max_mflops=None, train__epochs=2,
        search__sampler="nsga2", search__objectives=["mAP", "mflops"], search__trials=8, search__promotion_dominated_by=1,
    )
    raw["space"]["options"]["resolutions"] = [16, 20]
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert counted_trials(study) == 8
    trained = sorted((t for t in study.trials if "val_curve" in t.user_attrs), key=lambda t: t.number)
    for t in trained:  # stopped at epoch 1 exactly when an earlier trial beat it there at no more MFLOPs
        mine, mflops = t.user_attrs["val_curve"]["1"], t.user_attrs["budgets"]["mflops"]
        beaten = any(
            o.user_attrs["val_curve"]["1"] > mine and o.user_attrs["budgets"]["mflops"] <= mflops for o in trained if o.number < t.number
        )
        assert (t.state == optuna.trial.TrialState.PRUNED) == beaten, t.number
        if beaten:
            assert "not promoted" in t.user_attrs["reason"] and list(t.user_attrs["val_curve"]) == ["1"]
        else:
            assert t.values[1] == pytest.approx(mflops) and t.values[0] == pytest.approx(t.user_attrs["metrics"]["val_mAP"])
    assert any(t.state == optuna.trial.TrialState.PRUNED for t in trained)
    front = pareto_front(study)
    assert front and best_trial(study) in front
    # the same study name with other objectives is refused
    with pytest.raises(ConfigError, match="objective"):
        open_study(config_from_dict({**raw, "search": {**raw["search"], "objectives": ["mAP"]}}))


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_hyperband_single_objective_search(tmp_path: Path, tiny_config, gallery_checkpoint: str) -> None:
    raw = tiny_config(
        tmp_path, gallery__checkpoint=gallery_checkpoint, budgets__max_mflops=None, train__epochs=3, search__pruner="hyperband",
        search__trials=6, search__sampler="random",
    )
    study = run_search(config_from_dict(raw), log=lambda _: None)
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert counted_trials(study) == 6
    for t in study.trials:
        if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("state") == "complete":
            assert set(t.intermediate_values) == {1, 2, 3}
        if t.state == optuna.trial.TrialState.PRUNED:
            assert "hyperband" in t.user_attrs["reason"] and len(t.intermediate_values) < 3


def test_warm_start_enqueues_timm_models_once(tmp_path: Path, tiny_config, gallery_checkpoint: str) -> None:
    raw = tiny_config(
        tmp_path, gallery__checkpoint=gallery_checkpoint, budgets__max_mflops=None, search__trials=2,
        search__warm_start=["lcnet_035@32"], train__epochs=1,
    )
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    first = min(study.trials, key=lambda t: t.number)
    assert first.user_attrs["warm_start_arch"].startswith("space=timm res=32 width=0.35 model=lcnet_035")
    assert first.user_attrs["arch"] == first.user_attrs["warm_start_arch"] and first.user_attrs["state"] == "complete"
    assert any("Warm start: enqueued 1 architecture(s)" in line for line in logs)
    resumed = run_search(config_from_dict(raw), log=lambda _: None)  # resuming does not enqueue it again
    assert sum("warm_start_arch" in t.user_attrs for t in resumed.trials) == 1
    bad = tiny_config(tmp_path / "bad", gallery__checkpoint=gallery_checkpoint, search__warm_start=["lcnet_035"])
    with pytest.raises(ConfigError, match="timm_model@resolution"):
        run_search(config_from_dict(bad), log=lambda _: None)


def test_ctrl_c_during_a_trial_marks_it_interrupted_and_the_study_resumes(tmp_path: Path, tiny_config, gallery_checkpoint: str) -> None:
    raw = tiny_config(
        tmp_path / "run", gallery__checkpoint=gallery_checkpoint, budgets__max_mflops=None, train__epochs=300, search__trials=2,
        search__study_name="ctrlc",
    )
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)
    proc = start_search_until_training(file, config.out_dir / "optuna.db", "ctrlc")
    try:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("the search did not stop within 120 s of Ctrl-C:\n" + proc.stderr.read().decode()[-3000:]) from None
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130 and "run the same command again to resume" in err
    study = open_study(config)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["state"] == "interrupted"
    run = MlflowClient(config.tracking_uri).get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["asymnas.state"] == "interrupted"
    resumed = run_search(config_from_dict({**raw, "train": {**raw["train"], "epochs": 1}}), log=lambda _: None)
    states = [t.user_attrs.get("state") for t in sorted(resumed.trials, key=lambda t: t.number)]
    assert states[0] == "interrupted" and "complete" in states[1:]


def test_front_cost_follows_the_study_objectives() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("config", {"search": {"objectives": ["mAP", "latency_ms"]}})
    assert front_cost(study) == "latency_ms"
    single = optuna.create_study(direction="maximize")
    assert front_cost(single) == "mflops"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # PartialFixedSampler
def test_after_a_duplicate_the_next_candidate_is_drawn_at_random() -> None:
    from nas.search.coordination import ask_next
    from nas.search.driver import exploring
    from search_spaces import create_space

    space = create_space("gallery", embed_dim=1280, in_chans=3, model="tf_efficientnet_lite0", resolutions=[64, 96])
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask()
    arch = space.sample(probe)
    stuck = optuna.samplers.PartialFixedSampler(probe.params, optuna.samplers.RandomSampler(0))  # proposes ``arch`` forever, as a collapsed TPE
    study = optuna.create_study(direction="maximize", sampler=stuck)
    assert [space.sample(ask_next(study, 0)) for _ in range(2)] == [arch, arch]
    with exploring(study, True):
        explored = space.sample(ask_next(study, 0))
    assert explored != arch and study.sampler is stuck  # a random candidate, then the study's own sampler again
    with exploring(study, False):
        assert space.sample(ask_next(study, 0)) == arch
