"""Fault injection: SIGKILL a search at random moments, resume it at once, and audit the study.

For each storage (SQLite, and PostgreSQL when the server on 127.0.0.1:5432 answers), a
``nas worker CONFIG --trials TOTAL`` process is started on a small Fashion-MNIST setting
and killed with SIGKILL, ``--kills`` times, alternately after a random delay (seeded,
3-20 s: on a loaded machine mostly during start-up) and at a random moment of one of its
trials (0-8 s after the study shows it running one); after each kill the same command is
started again at once. Then one last run finishes the study (two
more trials than it counts), and the study and its MLflow runs are audited:

* **lost**: trials that were complete at some kill and are not complete at the end;
* **duplicated**: architectures trained to completion by more than one trial (reused
  results and retries excepted), and counted trials beyond ``TOTAL``;
* **runs**: Optuna trials without exactly one MLflow trial run, or whose run's
  ``asymnas.state`` tag or status does not match the trial's state;
* **left running**: Optuna trials or MLflow runs still RUNNING at the end.

The moment of each kill is classified from the study at that instant: ``in a trial``
(a trial of this process was RUNNING: training, scoring or tracking it) or ``between
trials`` (start-up, asking, reporting). Command (about 20 min per storage on the 2-core
machine): ``.venv/bin/python experiments/benchmarks/fault_injection.py --kills 20``
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import psycopg2
import yaml
from mlflow.tracking import MlflowClient

from nas.config import config_from_dict
from nas.records import State, trial_records
from nas.results import counts_toward
from nas.tracking import RUN_STATUS

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _config(out: Path, storage: str | None, total: int) -> dict:
    return {
        "out": str(out),
        "data": {"dataset": "fashion_mnist", "max_per_class": 80, "train": 0.6, "val": 0.1, "query": 0.1, "gallery": 0.2, "seed": 0},
        "gallery": {"model": "resnet18", "embed_dim": 32, "resolution": 16, "train": {"epochs": 1, "batch_size": 64}},
        "space": {"name": "mobilenet", "options": {"resolutions": [16, 20], "widths": [0.35, 0.5]}},
        "budgets": {"max_mflops": 1.0, "latency": {"warmup": 1, "repeats": 3}},
        "train": {"epochs": 3, "batch_size": 64},
        "search": {"study_name": "faults", "storage": storage, "trials": total, "seed": 0, "sampler": "random",
                   "heartbeat_interval": 2, "grace_period": 6, "max_retries": 3},
        "tracking": {"enabled": True},
    }


def _start(file: Path, total: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "nas.cli", "worker", str(file), "--trials", str(total), "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _study(storage: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name="faults", storage=storage)
    except Exception:  # not created yet (killed during start-up), or the schema is being written
        return None


def _run_storage(name: str, storage: str | None, kills: int, total: int, seed: int, work: Path) -> dict:
    out = work / name
    raw = _config(out, storage, total)
    file = work / f"{name}.yaml"
    file.write_text(yaml.safe_dump(raw))
    config = config_from_dict(raw)
    url = config.storage_url
    rng = random.Random(seed)
    complete_at_kills: set[int] = set()
    moments = {"in a trial": 0, "between trials": 0}
    start = time.monotonic()
    for k in range(kills):
        proc = _start(file, total)
        if k % 2 == 0:  # a random moment of the process's life: mostly its start-up on a loaded machine
            time.sleep(rng.uniform(3.0, 20.0))
        else:  # a random moment of one of its trials: wait until it runs one (at most 2 min), then 0-8 s more
            waited = time.monotonic()
            while proc.poll() is None and time.monotonic() - waited < 120:
                study = _study(url)
                if study is not None and any(r.state == State.RUNNING and r.pid == proc.pid for r in trial_records(study)):
                    break
                time.sleep(0.5)
            time.sleep(rng.uniform(0.0, 8.0))
        if proc.poll() is not None:  # the study was already finished: nothing left to kill
            break
        study = _study(url)
        records = trial_records(study) if study is not None else []
        in_trial = any(r.state == State.RUNNING and r.pid == proc.pid for r in records)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        moments["in a trial" if in_trial else "between trials"] += 1
        complete_at_kills |= {r.number for r in records if r.state == State.COMPLETE}
    # finish: the study's total becomes what it counts now plus two more trials, so the last run ends soon
    study = _study(url)
    if study is not None:
        retried = {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
        total = min(total, sum(1 for r in trial_records(study) if counts_toward(r, retried)) + 2)
    final = _start(file, total)
    code = final.wait()
    seconds = time.monotonic() - start
    study = _study(url)
    records = trial_records(study)
    retried = {n for t in study.get_trials(deepcopy=False) for n in t.system_attrs.get("retry_history", [])}
    complete = [r for r in records if r.state == State.COMPLETE and r.duplicate_of is None]
    lost = sorted(complete_at_kills - {r.number for r in records if r.state == State.COMPLETE})
    arch_ids = [r.arch_id for r in complete]
    duplicated = len(arch_ids) - len(set(arch_ids))
    counted = sum(1 for r in records if counts_toward(r, retried))
    client = MlflowClient(config.tracking_uri)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`asymnas.role` = 'trial'", max_results=5000)
    by_number: dict[int, list] = {}
    for run in runs:
        by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    mismatched = 0
    for r in records:
        matching = by_number.get(r.number, [])
        if len(matching) != 1 or matching[0].data.tags.get("asymnas.state") != r.state or matching[0].info.status != RUN_STATUS.get(r.state):
            mismatched += 1
            found = [(m.info.run_id[:8], m.data.tags.get("asymnas.state"), m.info.status) for m in matching]
            print(f"  mismatch: trial {r.number} state {r.state} ({r.optuna_state.name}, reason {r.reason!r}): runs {found}", flush=True)
    running_trials = sum(1 for r in records if r.state in (State.RUNNING, State.WAITING))
    running_runs = sum(1 for run in runs if run.info.status == "RUNNING")
    return {
        "storage": name, "kills": sum(moments.values()), **moments, "exit": code, "trials": len(records), "counted": counted,
        "complete": len(complete), "lost": len(lost), "duplicated": duplicated + max(counted - total, 0),
        "run mismatches": mismatched, "left running": running_trials + running_runs, "minutes": seconds / 60,
    }


def _postgres_database() -> tuple[str | None, str]:
    """A fresh database on the local PostgreSQL server, or None and the reason it is skipped."""
    name = f"faults_{uuid.uuid4().hex[:8]}"
    try:
        conn = psycopg2.connect(ADMIN, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        return None, f"no PostgreSQL server at 127.0.0.1:5432 ({str(exc).splitlines()[0]})"
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql://postgres@127.0.0.1:5432/{name}", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trials", type=int, default=200, help="the study's total while killing (nas worker --trials); the last run finishes two more")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--storages", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.storages.split(","):
            storage = None
            if name == "postgresql":
                storage, why = _postgres_database()
                if storage is None:
                    print(f"postgresql: skipped: {why}")
                    continue
            rows.append(_run_storage(name, storage, args.kills, args.trials, args.seed, work))
            print(rows[-1], flush=True)
    keys = list(rows[0]) if rows else []
    print()
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()
