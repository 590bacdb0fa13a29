"""A search process killed in the middle of a trial loses nothing: the study resumes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from nas.config import config_from_dict
from nas.search.driver import run_search
from nas.search.optuna_setup import open_study


def _running_trial_in_training(db: Path, name: str) -> bool:
    """Whether study ``name`` in SQLite file ``db`` has a running trial past its budget check.

    Read with the sqlite3 module, read-only: opening the file through Optuna while the
    search process is still creating its tables would race it for the schema.
    """
    if not db.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            rows = con.execute(
                "SELECT 1 FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE s.study_name = ? AND t.state = 'RUNNING' AND a.key = 'budgets'",
                (name,),
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error:  # not created yet, or the writer holds the lock
        return False
    return bool(rows)


def start_search_until_training(file: Path, db: Path, name: str) -> subprocess.Popen:
    """Start ``nas search FILE`` in a subprocess and return once a trial of study ``name`` is training."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "search", str(file)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not _running_trial_in_training(db, name):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the search never started training a trial"
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        raise
    return proc


def kill_search_in_training(file: Path, db: Path, name: str) -> int:
    """Start ``nas search FILE``, SIGKILL it while a trial of study ``name`` is training; returns its pid."""
    proc = start_search_until_training(file, db, name)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.pid


@pytest.mark.slow  # long end-to-end; the default run stays under 15 min (covered in part by faster tests)
def test_sigkill_mid_trial_then_resume(tmp_path: Path, tiny_config) -> None:
    raw = tiny_config(
        tmp_path / "run",
        budgets__max_mflops=None,
        train__epochs=200,  # long enough that the kill lands during training
        search__trials=2,
        search__heartbeat_interval=1,
        search__grace_period=3,
        search__study_name="killed",
    )
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)
    kill_search_in_training(file, config.out_dir / "optuna.db", "killed")

    killed = [t for t in open_study(config).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(killed) == 1  # left behind by the dead process
    time.sleep(4)  # longer than the grace period

    resumed_raw = {**raw, "train": {**raw["train"], "epochs": 1}, "search": {**raw["search"], "trials": 1}}
    study = run_search(config_from_dict(resumed_raw), log=lambda _: None)
    by_number = {t.number: t for t in study.trials}
    dead = by_number[killed[0].number]
    assert dead.state == optuna.trial.TrialState.FAIL
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # the dead trial was retried once (same parameters) and the one requested trial was added
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].params == dead.params
    assert len(complete) == 2

    client = MlflowClient(config.tracking_uri)
    run = client.get_run(dead.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert "heartbeat" in run.data.tags["asymnas.reason"] or "stopped" in run.data.tags["asymnas.reason"]
    parent = study.user_attrs["mlflow_parent_run_id"]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=100
    )
    assert len(children) == len(study.trials)
