"""PostgreSQL stops answering during a search: one clear error (exit status 2), the finished trials stay finished, and the study resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psycopg2
import pytest
import yaml

from nas.config import config_from_dict
from nas.records import State, trial_records
from nas.search.driver import run_search
from tests.conftest import PG_ADMIN

REPO = Path(__file__).resolve().parents[1]


def _admin(sql: str, *args: object) -> None:
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql, args)
    conn.close()


def _complete(url: str, name: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except Exception:  # not created yet
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


@pytest.mark.slow  # a gallery, then a search that loses its database: one to three minutes on 2 busy cores
def test_postgres_gone_mid_search_is_a_clear_error_and_the_study_resumes(tmp_path: Path, tiny_config, pg_databases) -> None:
    url = pg_databases()
    database = url.rsplit("/", 1)[1]
    raw = tiny_config(
        tmp_path / "run", data__max_per_class=30, budgets__max_mflops=None, train__epochs=1, gallery__train={"epochs": 1},
        search__trials=50, search__storage=url, search__study_name="lost", search__heartbeat_interval=1, search__grace_period=3,
        tracking__enabled=False,
    )
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "search", str(file), "--quiet"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        while _complete(url, "lost") < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        # the server goes away for this database: no new connection, the open ones cut
        _admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", database)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        _admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    assert proc.returncode == 2, out + err
    assert "Traceback" not in err and "stopped answering during the search" in err and "Study 'lost' is intact" in err, err
    assert "run the same command to resume" in err

    study = optuna.load_study(study_name="lost", storage=url)
    finished = {r.number for r in trial_records(study) if r.state == State.COMPLETE}
    assert finished  # told before the database went away: still complete
    resumed = run_search(config_from_dict({**raw, "search": {**raw["search"], "trials": 1}}), log=lambda _: None)
    records = {r.number: r for r in trial_records(resumed)}
    assert all(records[n].state == State.COMPLETE for n in finished)
    assert not resumed.get_trials(states=(optuna.trial.TrialState.RUNNING,))  # the cut trial was failed (and retried)


def test_what_counts_as_a_lost_database() -> None:
    import sqlalchemy.exc

    from nas.search.storage_loss import is_storage_lost, storage_lost

    cut = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly\n\tdetail"))
    try:
        try:
            raise cut
        except Exception as exc:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc
    except optuna.exceptions.StorageInternalError as wrapped:
        assert is_storage_lost(wrapped)
        message = str(storage_lost("postgresql://u:s3cret@db.example/nas", "s", wrapped))
    assert "(server closed the connection unexpectedly)" in message and "s3cret" not in message and "Study 's' is intact" in message
    assert not is_storage_lost(optuna.exceptions.StorageInternalError("invalid data"))  # no lost connection under it
    assert not is_storage_lost(ValueError("a bug, not the database"))
