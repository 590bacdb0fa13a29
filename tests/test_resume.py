"""Resumes and processes sharing one study: no architecture proposed twice as a counted trial,
exact trial counts with several ``nas search`` processes, and a killed process's trial failed
and retried at once by the next start on the same machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from nas.config import SearchConfig, config_from_dict
from nas.records import State, TrialRecord, trial_records
from nas.results import counted_trials, results_table
from nas.search.coordination import ProcessIdentity, ask_next, process_gone, this_process
from nas.search.driver import run_search
from nas.search.optuna_setup import SAMPLERS, make_sampler
from search_spaces import create_space
from tests.test_resilience import kill_search_in_training

FAIL, COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE,
                                    optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
SMALL = {"data__max_per_class": 30, "budgets__max_mflops": None, "train__epochs": 1}


@pytest.fixture(scope="module")
def gallery(small_gallery: str) -> str:
    """A gallery model trained once (on the small data of this module's searches: tests/conftest.py)."""
    return small_gallery


def _raw(tiny_config, out: Path, gallery: str, **overrides) -> dict:
    return tiny_config(out, gallery__checkpoint=gallery, **{**SMALL, **overrides})


def _counted_archs(study: optuna.Study) -> list[str]:
    """Architecture ids of the trials that count toward the study's trials (trained, not reused)."""
    return [r.arch_id for r in trial_records(study) if r.state == State.COMPLETE]


# ----------------------------------------------------------------------------- resumes continue the sequence


@pytest.mark.parametrize("sampler", SAMPLERS.names())
def test_a_resumed_sampler_continues_the_sequence_of_one_long_run(sampler: str) -> None:
    """Asking with the sampler reseeded for the study's size: a new process (a resume) proposes
    what one process would have proposed next, never the first candidates again."""
    space = create_space("mobilenet", 16, 1, resolutions=[16, 20])
    config = SearchConfig(sampler=sampler, seed=3, n_startup_trials=4, objectives=("mAP",))

    def run(study: optuna.Study, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            trial = ask_next(study, config.seed)
            arch = space.sample(trial)
            ids.append(arch.arch_id)
            study.tell(trial, float(arch.width))  # a deterministic score: the same history in both studies
        return ids

    storage = optuna.storages.InMemoryStorage()
    long_run = run(optuna.create_study(sampler=make_sampler(config), direction="maximize", storage=storage, study_name="long"), 8)
    resumed = []
    for _ in range(4):  # four processes of two trials each on one study
        study = optuna.create_study(sampler=make_sampler(config), direction="maximize", storage=storage, study_name="resumed", load_if_exists=True)
        resumed += run(study, 2)
    assert resumed == long_run
    assert len(set(resumed)) == len(resumed) == 8


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_three_resumes_of_four_trials_train_twelve_distinct_architectures(tmp_path: Path, tiny_config, gallery: str, sampler: str) -> None:
    raw = _raw(tiny_config, tmp_path, gallery, search__sampler=sampler, search__trials=4, search__n_startup_trials=12)
    for _ in range(3):
        study = run_search(config_from_dict(raw), log=lambda _: None)
    archs = _counted_archs(study)
    assert counted_trials(study) == 12
    assert len(archs) == 12 and len(set(archs)) == 12, archs


def test_a_reused_architecture_is_recorded_but_not_counted(tmp_path: Path, tiny_config, gallery: str) -> None:
    raw = _raw(tiny_config, tmp_path, gallery, search__trials=1)
    first = run_search(config_from_dict(raw), log=lambda _: None)
    arch = first.trials[0].user_attrs["arch"]
    logs: list[str] = []
    # the warm start enqueues trial 0's architecture again: reused, not trained, not counted
    study = run_search(config_from_dict({**raw, "search": {**raw["search"], "warm_start": [arch]}}), log=logs.append)
    records = trial_records(study)
    assert counted_trials(study) == 2 and len(records) == 3
    dup = records[1]
    assert dup.state == State.DUPLICATE and dup.duplicate_of == 0 and dup.optuna_state == FAIL
    assert records[2].state == State.COMPLETE and records[2].arch_id != records[0].arch_id
    line = next(line for line in logs if line.startswith("[trial   1"))
    assert "duplicate" in line and "same architecture as trial 0" in line and "/1]" not in line  # k did not advance
    assert any(line.startswith("[trial   2 | 1/1]") for line in logs)
    assert "dup of 0" in results_table(study)
    run = MlflowClient(config_from_dict(raw).tracking_uri).get_run(dup.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["asymnas.state"] == "duplicate"


def test_an_architecture_another_process_is_training_is_not_trained_again(tmp_path: Path, tiny_config, gallery: str) -> None:
    from nas.records import TrialWriter
    from nas.search.optuna_setup import open_study

    raw = _raw(tiny_config, tmp_path, gallery, search__trials=1)
    config = config_from_dict(raw)
    arch = create_space("mobilenet", 32, 1, **raw["space"]["options"]).extreme(smallest=True)
    running = ask_next(open_study(config), 0)  # another (live) process is training this architecture
    me = this_process()
    TrialWriter(running).started(me.host, me.pid, me.started, me.scope, "another-search")
    TrialWriter(running).architecture(arch.to_string(), arch.arch_id)
    study = run_search(config_from_dict({**raw, "search": {**raw["search"], "warm_start": [arch.to_string()]}}), log=lambda _: None)
    records = trial_records(study)
    assert [r.state for r in records] == ["running", "duplicate", "complete"]
    assert records[1].duplicate_of == 0 and "running in another process" in records[1].reason
    assert records[2].arch_id != arch.arch_id and counted_trials(study, records[2].request) == 1


def test_a_search_that_only_finds_evaluated_architectures_stops(tmp_path: Path, tiny_config, gallery: str) -> None:
    """A space of two architectures: both are trained, the re-proposals are reused and the search stops."""
    raw = _raw(tiny_config, tmp_path, gallery, search__sampler="random", search__trials=4, search__max_infeasible_in_a_row=6)
    raw["space"]["options"] = {"resolutions": [16], "widths": [0.35], "kernels": [3], "expansions": [3.0],
                               "depths": [[1], [1], [1], [1, 2]], "se": [False]}
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    assert counted_trials(study) == 2 and len(set(_counted_archs(study))) == 2
    assert any("Stopping: the last 6 candidates were all architectures already evaluated" in line for line in logs), logs


# ----------------------------------------------------------------------------- several processes on one study


def _start(file: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "search", str(file), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.parametrize("processes", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_concurrent_searches_add_exactly_what_each_asked_and_train_no_architecture_twice(
    tmp_path: Path, tiny_config, gallery: str, processes: int
) -> None:
    raw = _raw(tiny_config, tmp_path / "run", gallery, train__epochs=2, search__study_name="shared")
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    procs = [_start(file, "--trials", "2") for _ in range(processes)]
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, errors
    study = optuna.load_study(study_name="shared", storage=config_from_dict(raw).storage_url)
    archs = _counted_archs(study)
    assert counted_trials(study) == 2 * processes
    assert len(archs) == 2 * processes and len(set(archs)) == len(archs), archs
    assert not study.get_trials(states=(RUNNING, WAITING))
    assert len({(r.host, r.pid) for r in trial_records(study)}) == processes


# ----------------------------------------------------------------------------- a killed process on this machine


def test_process_liveness_is_judged_only_on_this_machine() -> None:
    me = this_process()
    assert me.pid == os.getpid() and me.host and not process_gone(me)
    if me.started is not None:  # Linux: a reused pid is told apart by its start time
        assert process_gone(ProcessIdentity(me.host, me.pid, me.started + 1, me.scope))
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    assert process_gone(ProcessIdentity(me.host, int(done.stdout), None, me.scope))
    # another machine (or one that recorded no host): never judged here, the heartbeat rule applies
    assert not process_gone(ProcessIdentity("another-host", int(done.stdout), None, me.scope))
    assert not process_gone(ProcessIdentity(me.host, int(done.stdout), None, "other-boot"))


def test_sigkill_then_immediate_resume_fails_the_trial_and_runs_its_retry(tmp_path: Path, tiny_config, gallery: str) -> None:
    raw = _raw(tiny_config, tmp_path / "run", gallery, train__epochs=200, search__trials=2, search__study_name="killed")
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)
    pid = kill_search_in_training(file, config.out_dir / "optuna.db", "killed")
    # at once (the grace period of the heartbeat rule is 60 s), asking for no new trials
    resumed = {**raw, "train": {**raw["train"], "epochs": 1}, "search": {**raw["search"], "trials": 0}}
    logs: list[str] = []
    study = run_search(config_from_dict(resumed), log=logs.append)
    records = {r.number: r for r in trial_records(study)}
    dead = records[0]
    assert dead.optuna_state == FAIL and dead.state == State.FAILED
    assert dead.pid == pid and dead.host == this_process().host
    assert f"pid {pid}" in (dead.reason or "") and "no longer running" in (dead.reason or "")
    assert any(f"Trial 0 belonged to process {pid}" in line for line in logs), logs
    retries = [r for r in records.values() if r.number != 0]
    assert len(retries) == 1 and retries[0].state == State.COMPLETE and retries[0].params == dead.params
    assert study.trials[retries[0].number].system_attrs.get("failed_trial") == 0
    assert not study.get_trials(states=(RUNNING, WAITING))
    assert any(line.split()[:2] == ["0", "failed"] for line in results_table(study).splitlines())  # nas results shows it

    client = MlflowClient(config.tracking_uri)
    assert client.get_run(dead.mlflow_run_id).info.status == "FAILED"
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(study.trials) and all(run.info.status != "RUNNING" for run in children)
    assert isinstance(TrialRecord.from_trial(study.trials[0]).pid, int)
