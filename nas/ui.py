"""``nas ui``: the MLflow UI for a study's tracking store, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from nas.errors import NasError
from nas.secrets import mask_url
from nas.tracking import check_tracking_uri

__all__ = ["tracking_store", "serve_ui"]


def tracking_store(study_name: str | None, run_dir: str | None, tracking_uri: str | None) -> str:
    """The backend store URI to browse: given (``env:NAME`` allowed), or ``<run dir>/mlflow.db`` (default ``runs/<study name>``)."""
    if tracking_uri:
        return check_tracking_uri(tracking_uri, "--tracking-uri")
    if not (study_name or run_dir):
        raise NasError("Pass --study-name NAME, --run-dir DIR or --tracking-uri URI to say which tracking store to browse.")
    folder = Path(run_dir) if run_dir else Path("runs") / str(study_name)
    db = folder / "mlflow.db"
    if not db.is_file():
        raise NasError(f"No MLflow store at {db}. Pass --run-dir (the search's --out folder) or --tracking-uri.")
    return f"sqlite:///{db.resolve()}"


def serve_ui(study_name: str | None, run_dir: str | None, tracking_uri: str | None, port: int, ready_timeout: float = 120.0) -> int:
    """Run ``mlflow ui`` until interrupted; prints the URL once it answers."""
    store = tracking_store(study_name, run_dir, tracking_uri)
    if store.startswith(("http://", "https://")):
        print(f"{mask_url(store)} is a tracking server: open it in a browser, it is its own UI.")
        return 0
    proc = subprocess.Popen(  # the store URI goes through the environment: a password in it stays out of the process list
        [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_BACKEND_STORE_URI": store},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise NasError(f"mlflow ui exited with status {proc.returncode} (is port {port} free? pass --port).") from None
                if time.monotonic() > deadline:
                    raise NasError(f"mlflow ui did not answer at {url} within {ready_timeout:.0f} s.") from None
                time.sleep(0.5)
        print(f"MLflow UI for {mask_url(store)}: {url}  (Ctrl-C stops it)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
