"""Trials per hour with 1 and 2 worker processes, and PostgreSQL against SQLite storage.

Trains one gallery model, then runs the same small search (Fashion-MNIST, fixed budget of
trials, no pruning, single-threaded workers) three times: 1 worker on SQLite, 2 workers on
SQLite, 1 worker on PostgreSQL (a database it creates and drops on 127.0.0.1:5432).
Prints one table: wall time of the trial phase (first trial start to last trial end),
trials per hour, mean trial duration, and the mean per-trial time outside training and
scoring (storage, tracking, budget checks) which is where the storage backends differ.

    .venv/bin/python experiments/benchmarks/workers.py --trials 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import optuna
import psycopg2
import yaml

ADMIN = "postgresql://postgres@127.0.0.1:5432/test"

BASE = {
    "data": {"dataset": "fashion_mnist", "max_per_class": 400, "train": 0.6, "val": 0.05, "query": 0.1, "gallery": 0.25},
    "gallery": {"model": "resnet18", "embed_dim": 64, "resolution": 28, "train": {"epochs": 3}},
    "space": {"name": "mobilenet", "options": {"resolutions": [20, 24], "widths": [0.5, 0.75]}},
    "budgets": {"latency": {"threads": 1, "warmup": 3, "repeats": 10}},
    "train": {"epochs": 2, "batch_size": 128},
    "search": {"study_name": "bench", "seed": 0, "n_startup_trials": 100, "pruner": "none"},
}


def run(root: Path, name: str, workers: int, trials: int, storage: str | None, gallery: Path) -> dict[str, float]:
    config = copy.deepcopy(BASE)
    config["out"] = str(root / name)
    config["gallery"]["checkpoint"] = str(gallery)
    config["search"]["trials"] = trials
    config["search"]["threads"] = 1
    if storage:
        config["search"]["storage"] = storage
    file = root / f"{name}.yaml"
    file.write_text(yaml.safe_dump(config))
    subprocess.run([sys.executable, "-m", "nas.cli", "search", str(file), "--workers", str(workers), "--threads", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    url = storage or f"sqlite:///{(root / name / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name="bench", storage=url)
    done = [t for t in study.trials if t.datetime_complete is not None]
    wall = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    outside = [d - t.user_attrs["metrics"]["train_seconds"] for d, t in zip(durations, done) if "metrics" in t.user_attrs]
    return {"trials": len(done), "wall": wall, "per_hour": 3600 * len(done) / wall,
            "duration": statistics.mean(durations), "outside": statistics.mean(outside)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = f"asymnas_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(ADMIN)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{db}"')
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            gallery_cfg = copy.deepcopy(BASE)
            gallery_cfg["out"] = str(root / "gallery")
            (root / "gallery.yaml").write_text(yaml.safe_dump(gallery_cfg))
            subprocess.run([sys.executable, "-m", "nas.cli", "gallery", "train", str(root / "gallery.yaml")], check=True, stdout=subprocess.DEVNULL)
            gallery = root / "gallery" / "gallery" / "gallery.safetensors"
            rows = [
                ("SQLite", 1, run(root, "sqlite1", 1, args.trials, None, gallery)),
                ("SQLite", 2, run(root, "sqlite2", 2, args.trials, None, gallery)),
                ("PostgreSQL", 1, run(root, "pg1", 1, args.trials, f"postgresql://postgres@127.0.0.1:5432/{db}", gallery)),
            ]
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,))
            cur.execute(f'DROP DATABASE IF EXISTS "{db}"')
        conn.close()
    print(f"{'storage':<11} {'workers':>7} {'trials':>6} {'wall s':>7} {'trials/h':>8} {'mean trial s':>12} {'outside training s':>18}")
    for storage, workers, r in rows:
        print(f"{storage:<11} {workers:>7} {r['trials']:>6} {r['wall']:>7.1f} {r['per_hour']:>8.0f} {r['duration']:>12.2f} {r['outside']:>18.2f}")
    base = rows[0][2]
    print(f"\nspeed-up of 2 workers over 1 (SQLite): {rows[1][2]['per_hour'] / base['per_hour']:.2f}x")
    print(f"PostgreSQL minus SQLite, time outside training per trial: {rows[2][2]['outside'] - base['outside']:+.2f} s")


if __name__ == "__main__":
    main()
