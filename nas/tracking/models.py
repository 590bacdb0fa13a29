"""What is done to a trial's MLflow run after the search: its ONNX model registered, files logged to it.

Both import mlflow only when called (a heavy library, needed only then) and reach the store
named by a tracking URI (``env:NAME`` allowed), not a :class:`~nas.tracking.MlflowTracker`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nas.errors import NasError
from nas.secrets import mask_text, mask_url
from nas.tracking.base import mlflow_key
from nas.tracking.mlflow_tracker import PENDING, RUN_KEY_TAG, run_key
from nas.tracking.uris import check_tracking_uri

__all__ = ["register_onnx_model", "log_run_artifacts"]


def register_onnx_model(uri: str, run_id: str, onnx_path: str | Path, name: str, tags: Mapping[str, Any]) -> str:
    """Log ``onnx_path`` as an MLflow model in run ``run_id`` and register it as ``name``.

    ``uri`` is the tracking URI (``env:NAME`` allowed). The model registry gets a new
    version of ``name`` with ``tags`` (budgets and metrics); it loads back with
    ``mlflow.onnx.load_model(f"models:/{name}/{version}")`` or as a pyfunc. Returns the version.
    """
    uri = check_tracking_uri(uri)
    import mlflow  # deferred: heavy optional libraries, needed only when a model is registered
    import onnx

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        if run_id.startswith(PENDING):  # recorded while the store was unreachable, created later by a journal replay
            experiments = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(run_id)}'", max_results=1)
            if not runs:
                raise NasError(
                    f"The trial's MLflow run ({run_id}) was recorded while the tracking store was unreachable and has not been "
                    f"written to {mask_url(uri)} yet: run `nas search` on the study once the store answers (it replays the journal), "
                    f"then export again to register the model."
                )
            run_id = runs[0].info.run_id
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="query_model", registered_model_name=name)
        client.set_terminated(run_id, status=status)  # keep the trial's own status
    finally:
        mlflow.set_tracking_uri(previous)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, mlflow_key(key), str(value))
    return version


def log_run_artifacts(uri: str, run_id: str, paths: Iterable[str | Path]) -> str | None:
    """Log the files ``paths`` to run ``run_id`` of the store at ``uri`` (``env:NAME`` allowed); ``None``, or why they were not
    logged (the store could not be reached or refused them: said, not raised, for work that is already done)."""
    import mlflow  # deferred: a heavy optional library, needed only when tracking is on

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # fail fast, as the tracker does
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        client = mlflow.tracking.MlflowClient(tracking_uri=check_tracking_uri(uri))
        for path in paths:
            client.log_artifact(run_id, str(path))
    except Exception as exc:  # MLflow, HTTP or database errors
        return f"{type(exc).__name__}: {mask_text(str(exc))}"
    return None
