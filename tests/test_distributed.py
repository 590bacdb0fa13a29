"""Many workers on one PostgreSQL study (and one MLflow tracking server), against real servers.

PostgreSQL runs on 127.0.0.1:5432 with trust authentication; every test creates and drops
its own databases. The MLflow server is started and stopped (by its PID) by the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from nas.results import counted_trials

pytestmark = pytest.mark.postgres

COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(pg_databases, tmp_path: Path) -> Iterator[str]:
    """``mlflow server`` with a PostgreSQL backend store on 127.0.0.1, stopped by its PID."""
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", pg_databases(), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not come up in 120 s"
            time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _worker(config_file: Path, total: int, storage: str, tracking: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "worker", str(config_file), "--trials", str(total), "--storage", storage,
         "--tracking-uri", tracking, "--threads", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
    )


def _children(tracking: str, study: optuna.Study) -> list:
    client = MlflowClient(tracking)
    parent = study.user_attrs["mlflow_parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)


@pytest.mark.slow  # about 45 s on 2 quiet cores; the killed-worker test below keeps PostgreSQL workers in the default run
def test_three_workers_finish_exactly_the_trial_budget(tmp_path: Path, tiny_config, pg_databases, mlflow_server: str) -> None:
    storage = pg_databases()
    raw = tiny_config(tmp_path / "run", budgets__max_mflops=None, train__epochs=4, search__study_name="dist")
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [_worker(file, 6, storage, mlflow_server, log) for log in logs]
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0, 0], "\n".join(t[-1500:] for t in texts)

    study = optuna.load_study(study_name="dist", storage=storage)
    assert len(study.trials) == 6 and counted_trials(study) == 6
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state == COMPLETE for t in study.trials)
    # the gallery model was trained once; the other workers waited on the lock and loaded it
    assert sum("no checkpoint configured; training" in t for t in texts) == 1
    assert sum("Gallery model: loading" in t for t in texts) == 2

    client = MlflowClient(mlflow_server)
    experiment = client.get_run(study.user_attrs["mlflow_parent_run_id"]).info.experiment_id
    parents = client.search_runs([experiment], filter_string="tags.`asymnas.role` = 'study'")
    assert len(parents) == 1
    children = _children(mlflow_server, study)
    assert len(children) == 6
    assert {r.data.tags["optuna.trial_number"] for r in children} == {str(n) for n in range(6)}
    assert all(r.info.status == "FINISHED" and "query_mAP" in r.data.metrics for r in children)
    assert len({r.data.tags["asymnas.worker"] for r in children}) >= 2  # the server took runs from several workers


@pytest.mark.slow  # about 70 s; a killed trial retried on SQLite stays in the default run (tests/test_resume.py)
def test_a_killed_worker_trial_is_failed_and_retried(tmp_path: Path, tiny_config, pg_databases) -> None:
    storage, tracking = pg_databases(), pg_databases()  # MLflow writes straight to a PostgreSQL store
    raw = tiny_config(
        tmp_path / "run", budgets__max_mflops=None, train__epochs=10, search__study_name="kill",
        search__heartbeat_interval=1, search__grace_period=3,
        gallery__train={"epochs": 1, "batch_size": 64, "lr": 0.003},
    )
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    procs = [_worker(file, 4, storage, tracking, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no trial started training"
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="kill", storage=storage).get_trials(deepcopy=False)
            except KeyError:
                continue
            for t in trials:
                if t.state == optuna.trial.TrialState.RUNNING and "budgets" in t.user_attrs and "worker" in t.user_attrs:
                    victim = t
        pid = int(victim.user_attrs["worker"].rsplit("-", 1)[1])
        killed = next(p for p in procs if p.pid == pid)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        survivor = next(p for p in procs if p.pid != pid)
        assert survivor.wait(timeout=600) == 0, (tmp_path / f"worker{procs.index(survivor)}.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    study = optuna.load_study(study_name="kill", storage=storage)
    by_number = {t.number: t for t in study.trials}
    dead = by_number[victim.number]
    assert dead.state == FAIL
    complete = [t for t in study.trials if t.state == COMPLETE]
    assert len(complete) == 4 and counted_trials(study) == 4
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params  # retried once, not twice
    assert len({t.number for t in study.trials}) == len(study.trials) == 5

    runs = {r.data.tags["optuna.trial_number"]: r for r in _children(tracking, study)}
    assert len(runs) == len(study.trials)
    assert runs[str(dead.number)].info.status == "FAILED"
    assert "heartbeats" in runs[str(dead.number)].data.tags["asymnas.reason"]
