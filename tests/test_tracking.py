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

import optuna
import pytest
from mlflow.tracking import MlflowClient

from nas.errors import NasError
from nas.tracking import MlflowTracker


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
    finally:
        _stop(server)


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
        while not any(f"MLflow UI for" in line for line in lines):  # mlflow prints lines of its own first
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
