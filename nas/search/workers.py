"""Several worker processes on one machine, sharing one study.

``nas search CONFIG --workers N`` writes the effective configuration and starts N ``nas
worker`` processes with the CPU threads split between them (and, on a machine with several
GPUs and ``train.device`` ``auto`` or ``cuda``, one GPU each, in turn), all counting toward one new
request: together they add ``search.trials`` counted trials to the study, as a
single-process ``nas search`` would, whatever other processes add meanwhile (see
:mod:`nas.search.coordination`). The study storage and its locks coordinate them; there is
no scheduler of ours.
"""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import yaml

from nas.config import ExperimentConfig
from nas.errors import NasError
from nas.search.coordination import new_request_id
from nas.search.optuna_setup import open_study
from nas.secrets import masked_config_dict, url_for_child

__all__ = ["run_local_workers"]


def _gpus(device: str) -> int:
    """How many GPUs the workers take turns on: all of them for ``auto`` or ``cuda``, none for a named one or the CPU."""
    if device not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_local_workers(config: ExperimentConfig, workers: int) -> optuna.Study:
    """Start ``workers`` worker processes for ``config`` and wait for all of them."""
    if workers < 1:
        raise NasError(f"--workers must be >= 1, but got {workers}.")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    request = new_request_id()
    threads = max(1, (os.cpu_count() or 1) // workers)
    data = masked_config_dict(config)
    data["out"] = str(config.out_dir.resolve())
    env = dict(os.environ)  # a password reaches the workers through their environment, never the file
    data["search"]["storage"] = url_for_child(config.search.storage, config.storage_url, "NAS_WORKER_STORAGE", env)
    data["search"]["threads"] = threads
    data["tracking"]["uri"] = url_for_child(config.tracking.uri, config.tracking_uri, "NAS_WORKER_TRACKING_URI", env)
    effective = config.out_dir / "effective-config.yaml"
    effective.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"Starting {workers} workers ({threads} thread(s) each) to add {config.search.trials} trials to study "
          f"{config.search.study_name!r}.", flush=True)
    command = [sys.executable, "-m", "nas.cli", "worker", str(effective), "--trials", str(config.search.trials), "--request", request]
    gpus = _gpus(config.train.device)
    procs = [subprocess.Popen(command + ([f"--device=cuda:{i % gpus}"] if gpus > 1 else []), env=env) for i in range(workers)]
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
