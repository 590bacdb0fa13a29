"""MLflow tracking against real stores: an unreachable server, an outage in the middle, the UI command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import json

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from nas.cli import main
from nas.errors import ConfigError, NasError
from nas.secrets import mask_url
from nas.tracking import JOURNAL_DIR, Journal, MlflowTracker, register_onnx_model

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None, f"server exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer"
            time.sleep(0.5)


def _start_server(store: Path, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)],
        stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    _wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_unreachable_server_at_start_is_a_clear_error() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(NasError) as info:
        MlflowTracker(uri, "nothing-there")
    assert uri in str(info.value) and "tracking.enabled: false" in str(info.value)


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_an_outage_in_the_middle_loses_nothing(tmp_path: Path) -> None:
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    store, artifacts, log = tmp_path / "mlflow.db", tmp_path / "artifacts", tmp_path / "server.log"
    server = _start_server(store, artifacts, port, log)
    told: list[str] = []
    tracker = MlflowTracker(uri, "outage", log=told.append, retry_seconds=0.0)
    study = optuna.create_study(direction="maximize")
    parent = tracker.start_study(study, params={"p": 1}, tags={}, texts={})
    first = study.ask()
    run_a = tracker.start_trial(parent, first)
    tracker.log(run_a, metrics={"val_mAP": 0.5}, step=1)
    _stop(server)
    try:
        # the store is gone: nothing raises, everything is kept in order
        tracker.log(run_a, metrics={"val_mAP": 0.6}, step=2)
        tracker.end_trial(run_a, "complete", None, {"query_mAP": 0.61})
        second = study.ask()
        run_b = tracker.start_trial(parent, second)  # created later; a placeholder for now
        assert run_b.startswith("pending-")
        tracker.end_trial(run_b, "infeasible", "mflops 9 > limit 2", {"mflops": 9.0})
        assert tracker.backlog and any("cannot log" in line for line in told)
    finally:
        server = _start_server(store, artifacts, port, log)
    try:
        tracker.end_study(parent, metrics={"best_query_mAP": 0.61})
        assert not tracker.backlog and any("reachable again" in line for line in told)
        client = MlflowClient(uri)
        a = client.get_run(run_a)
        assert a.info.status == "FINISHED" and a.data.metrics["query_mAP"] == 0.61
        assert [m.value for m in sorted(client.get_metric_history(run_a, "val_mAP"), key=lambda m: m.step)] == [0.5, 0.6]
        children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        by_number = {r.data.tags["optuna.trial_number"]: r for r in children}
        assert set(by_number) == {"0", "1"}
        b = by_number["1"]
        assert b.data.tags["asymnas.state"] == "infeasible" and b.data.metrics["mflops"] == 9.0
        assert client.get_run(parent).info.status == "FINISHED"
        # a model exported from the trial still holding its placeholder id is registered to the replayed run
        onnx_path = tmp_path / "m.onnx"
        torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(onnx_path), dynamo=True, external_data=False, verbose=False)
        version = register_onnx_model(uri, run_b, onnx_path, "outage-model", {"trial": 1})
        assert client.get_model_version("outage-model", version).run_id == b.info.run_id
        assert client.get_run(b.info.run_id).info.status == "FINISHED"
        with pytest.raises(NasError, match="has not been written to .* yet: run `nas search`"):
            register_onnx_model(uri, "pending-never-replayed-0", onnx_path, "outage-model", {})
    finally:
        _stop(server)


@pytest.mark.slow  # about 70 s; the servers nas ui builds are checked by tests/test_dashboard.py and tests/test_secrets.py
def test_nas_ui_serves_the_study(tmp_path: Path, tiny_config) -> None:
    from nas.config import config_from_dict
    from nas.search.driver import run_search

    run_search(config_from_dict(tiny_config(tmp_path / "run", search__trials=2, budgets__max_mflops=None)), log=lambda _: None)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "ui", "--run-dir", str(tmp_path / "run"), "--port", str(port)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        lines = []
        while not any("MLflow UI for" in line for line in lines):  # mlflow prints lines of its own first
            line = proc.stdout.readline()
            assert line, "nas ui exited: " + "".join(lines)
            lines.append(line)
        assert f"http://127.0.0.1:{port}" in lines[-1]
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 3  # the study's parent run and its two trials
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------ tracking URI typos


@pytest.mark.parametrize(
    "uri", ["sqlte:///x.db", "sqlite:/x.db", "sqlite://", "foo://host/x", "http//host:5000", "http://:5000", "postgresq://u:s3cret@h/db"]
)
def test_a_tracking_uri_typo_is_a_clear_error(uri: str) -> None:
    with pytest.raises(ConfigError) as info:
        MlflowTracker(uri, "typo")
    message = str(info.value)
    assert repr(mask_url(uri)) in message and "sqlite:///PATH" in message and "http://HOST:PORT" in message
    assert "s3cret" not in message


def test_a_tracking_uri_typo_stops_a_search_before_any_data_is_loaded(tmp_path: Path, tiny_config, capsys) -> None:
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    assert main(["search", str(file), "--tracking-uri", "sqlte:///x.db"]) == 2
    captured = capsys.readouterr()
    assert "'sqlte:///x.db' is not a tracking URI" in captured.err and "Traceback" not in captured.err
    assert "Paragon" not in captured.out and not (tmp_path / "run" / "gallery").exists()


def test_a_record_the_store_refuses_is_dropped_not_kept(tmp_path: Path) -> None:
    told: list[str] = []
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "refused", tmp_path / "artifacts", log=told.append, journal_dir=tmp_path)
    parent = tracker.start_study(optuna.create_study(), params={"p": 1}, tags={}, texts={})
    tracker.log(parent, params={"p": 2})  # MLflow never lets a param change: retrying it would block every later record
    tracker.log(parent, metrics={"m": 1.0})
    assert not tracker.backlog and any("refused" in line for line in told)
    assert MlflowClient(uri).get_run(parent).data.metrics["m"] == 1.0
    assert not (tmp_path / JOURNAL_DIR).exists()  # nothing was kept, so nothing was written


# ------------------------------------------------------------------------------ nothing lost when a process dies during an outage

#: A process that logs to a store that becomes unreachable, prints its run ids and dies (SIGKILL) before the store is back.
_DIES_DURING_AN_OUTAGE = r"""
import json, os, signal, sys
from pathlib import Path
import optuna
from nas.tracking import MlflowTracker

uri, folder = sys.argv[1], Path(sys.argv[2])
tracker = MlflowTracker(uri, "outage", folder / "artifacts", log=lambda line: print(line, file=sys.stderr), journal_dir=folder)
study = optuna.create_study(direction="maximize")
parent = tracker.start_study(study, params={"p": 1}, tags={}, texts={})
run_a = tracker.start_trial(parent, study.ask())
tracker.log(run_a, metrics={"val_mAP": 0.1}, step=1)
assert not (folder / "tracking-journal").exists()  # nothing is journaled while the store is reachable


class Down:  # from here on every call to the store fails as a lost connection does
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("the tracking store went away")
        return fail


tracker.client = Down()
for step in (2, 3):
    tracker.log(run_a, metrics={"val_mAP": step / 10}, step=step)
tracker.end_trial(run_a, "complete", None, {"query_mAP": 0.33})
run_b = tracker.start_trial(parent, study.ask())
for step in (1, 2, 3):
    tracker.log(run_b, metrics={"val_mAP": step / 100}, step=step)
tracker.end_trial(run_b, "pruned", "stopped at epoch 3")
tracker.log_text(parent, "kept while the store was down", "notes.txt")
print(json.dumps({"parent": parent, "run_a": run_a, "run_b": run_b, "kept": len(tracker.backlog)}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _die_during_an_outage(folder: Path) -> tuple[str, dict]:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", _DIES_DURING_AN_OUTAGE, uri, str(folder)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ids = json.loads(proc.stdout.splitlines()[-1])
    assert ids["run_b"].startswith("pending-") and ids["kept"] == 11
    assert len(list((folder / JOURNAL_DIR).glob("*.jsonl"))) == 1  # the kept records outlived the process
    return uri, ids


def _assert_logged_exactly_once(uri: str, ids: dict, folder: Path) -> None:
    client = MlflowClient(uri)

    def history(run_id: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "val_mAP"), key=lambda m: m.step)]

    a = client.get_run(ids["run_a"])
    assert history(ids["run_a"]) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert a.info.status == "FINISHED" and a.data.metrics["query_mAP"] == 0.33 and a.data.tags["asymnas.state"] == "complete"
    experiment = client.get_experiment_by_name("outage").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{ids['parent']}'")
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1"]  # trial 1's run was created once
    b = next(r for r in children if r.data.tags["optuna.trial_number"] == "1")
    assert history(b.info.run_id) == [(1, 0.01), (2, 0.02), (3, 0.03)]
    assert b.info.status == "KILLED" and b.data.tags["asymnas.reason"] == "stopped at epoch 3"
    notes = client.download_artifacts(ids["parent"], "notes.txt", str(folder))
    assert Path(notes).read_text() == "kept while the store was down"
    assert not list((folder / JOURNAL_DIR).glob("*.jsonl"))  # the journal is gone once replayed


def test_records_kept_during_an_outage_survive_the_death_of_the_process(tmp_path: Path) -> None:
    uri, ids = _die_during_an_outage(tmp_path)
    told: list[str] = []
    MlflowTracker(uri, "outage", log=told.append, journal_dir=tmp_path)  # the next start replays the journal
    assert any("logged 11 record(s) kept by an earlier process" in line for line in told)
    _assert_logged_exactly_once(uri, ids, tmp_path)
    told.clear()
    MlflowTracker(uri, "outage", log=told.append, journal_dir=tmp_path)  # and a later one finds nothing to replay
    assert not told
    _assert_logged_exactly_once(uri, ids, tmp_path)


class _Died(BaseException):
    """A process dying in the middle of a replay (not an error the tracker could handle)."""


def test_a_death_during_the_replay_duplicates_nothing(tmp_path: Path, monkeypatch) -> None:
    uri, ids = _die_during_an_outage(tmp_path)
    ack = Journal.ack
    deaths = ["log", "create"]  # die right after logging a record of that kind, before acknowledging it

    def ack_or_die(journal: Journal, seq: int) -> None:
        if deaths and journal.pending[0][1]["op"] == deaths[0]:
            deaths.pop(0)
            raise _Died
        ack(journal, seq)

    monkeypatch.setattr(Journal, "ack", ack_or_die)
    for _ in range(2):
        with pytest.raises(_Died):
            MlflowTracker(uri, "outage", log=lambda line: None, journal_dir=tmp_path)
        assert len(list((tmp_path / JOURNAL_DIR).glob("*.jsonl"))) == 1  # what was not acknowledged is still there
    MlflowTracker(uri, "outage", log=lambda line: None, journal_dir=tmp_path)
    _assert_logged_exactly_once(uri, ids, tmp_path)


def test_the_store_going_away_during_the_replay_keeps_the_rest(tmp_path: Path, monkeypatch) -> None:
    uri, ids = _die_during_an_outage(tmp_path)
    apply, applied = MlflowTracker._apply, []

    def apply_then_fail(tracker: MlflowTracker, record: dict, retry: bool):
        if len(applied) == 4:
            raise ConnectionError("the tracking store went away again")
        applied.append(record["op"])
        return apply(tracker, record, retry)

    monkeypatch.setattr(MlflowTracker, "_apply", apply_then_fail)
    tracker = MlflowTracker(uri, "outage", log=lambda line: None, journal_dir=tmp_path)
    assert applied == ["log", "log", "log", "end"] and tracker.backlog[0][1]["op"] == "create"
    assert len(tracker.backlog) == 7  # the rest, in order, now in this process's journal; the dead process's is gone
    assert list((tmp_path / JOURNAL_DIR).glob("*.jsonl")) == [tracker.journal.path]
    monkeypatch.setattr(MlflowTracker, "_apply", apply)
    tracker.flush()
    _assert_logged_exactly_once(uri, ids, tmp_path)


def test_a_journal_of_a_live_process_or_another_store_is_left_alone(tmp_path: Path) -> None:
    live = Journal(tmp_path, "sqlite:///other.db")
    live.append({"op": "end", "run": "x", "status": "FINISHED", "time": 0})
    assert Journal.orphans(tmp_path, "sqlite:///other.db") == []  # locked by its (living) owner
    live.close()
    told: list[str] = []
    assert Journal.orphans(tmp_path, "sqlite:///mine.db", log=told.append) == [] and "another tracking store" in told[0]
    (orphan,) = Journal.orphans(tmp_path, "sqlite:///other.db")
    assert [record["op"] for _, record in orphan.pending] == ["end"]
    orphan.close()


def test_a_trial_killed_before_its_run_was_opened_gets_one_closed_run(tmp_path: Path) -> None:
    """A worker killed between creating a trial and opening its run left no run; one killed between opening the run
    and naming it on the trial left one RUNNING. When such a trial is failed (heartbeat, dead process) or found
    finished, each gets exactly one closed run of its state; a second pass adds nothing."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "killed", tmp_path / "artifacts", log=lambda _: None, journal_dir=tmp_path)
    study = optuna.create_study(direction="maximize")
    parent = tracker.start_study(study, params={}, tags={}, texts={})
    no_run, unnamed, pruned = study.ask(), study.ask(), study.ask()
    run = MlflowClient(uri).create_run(tracker.experiment_id, tags={
        "mlflow.parentRunId": parent, "asymnas.role": "trial", "optuna.trial_number": str(unnamed.number), "asymnas.state": "running"})
    for trial in (no_run, unnamed):
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    frozen = {t.number: t for t in study.get_trials()}
    tracker.fail_trial_run(study, frozen[no_run.number], "the worker stopped sending heartbeats")  # the heartbeat callback's path
    assert tracker.reconcile(study) == 2  # the unnamed run closed, the pruned trial's run created
    assert tracker.reconcile(study) == 0
    runs = {int(r.data.tags["optuna.trial_number"]): r for r in tracker.child_runs(parent)}
    assert sorted(runs) == [no_run.number, unnamed.number, pruned.number]
    assert runs[unnamed.number].info.run_id == run.info.run_id  # closed, not duplicated
    assert [(runs[t.number].data.tags["asymnas.state"], runs[t.number].info.status) for t in (no_run, unnamed, pruned)] == [
        ("failed", "FAILED"), ("failed", "FAILED"), ("pruned", "KILLED")]
    assert runs[no_run.number].data.tags["asymnas.reason"] == "the worker stopped sending heartbeats"
