"""Several worker processes on one machine, sharing one study.

``nas search CONFIG --workers N`` writes the effective configuration, fixes the study's
trial budget (the trials it already holds plus ``search.trials``) and starts N ``nas
worker`` processes with the CPU threads split between them. Each worker runs trials
until the study holds that budget (see :func:`nas.search.driver.run_search`); the study storage
and its locks coordinate them, there is no scheduler of ours.
"""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import yaml

from nas.config import ExperimentConfig, config_to_dict
from nas.errors import NasError
from nas.locks import study_lock
from nas.results import counted_trials
from nas.search.optuna_setup import open_study

__all__ = ["run_local_workers"]


def run_local_workers(config: ExperimentConfig, workers: int) -> optuna.Study:
    """Start ``workers`` worker processes for ``config`` and wait for all of them."""
    if workers < 1:
        raise NasError(f"--workers must be >= 1, but got {workers}.")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    with study_lock(config.storage_url, config.search.study_name, config.out_dir):
        target = counted_trials(open_study(config)) + config.search.trials
    threads = max(1, (os.cpu_count() or 1) // workers)
    data = config_to_dict(config)
    data["out"] = str(config.out_dir.resolve())
    data["search"]["storage"] = config.storage_url
    data["search"]["threads"] = threads
    data["tracking"]["uri"] = config.tracking_uri
    effective = config.out_dir / "effective-config.yaml"
    effective.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"Starting {workers} workers ({threads} thread(s) each) until study {config.search.study_name!r} holds {target} trials.", flush=True)
    command = [sys.executable, "-m", "nas.cli", "worker", str(effective), "--trials", str(target)]
    procs = [subprocess.Popen(command) for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    if any(codes):
        raise NasError(f"{sum(1 for c in codes if c)} of {workers} worker(s) failed (exit codes {codes}); run the same command to resume.")
    return open_study(config)
