"""``nas ui``: the MLflow UI for a study's tracking store, on 127.0.0.1 (with ``--with-dashboard``, optuna-dashboard beside it)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nas.dashboard import LocalServer, check_port, dashboard_server, dashboard_storage, run_servers
from nas.errors import ConfigError, NasError
from nas.secrets import mask_url
from nas.tracking import check_tracking_uri

__all__ = ["tracking_store", "mlflow_server", "serve_ui", "ui_command"]


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


def mlflow_server(store: str, port: int) -> LocalServer:
    """The ``mlflow ui`` process for the backend store ``store`` on 127.0.0.1:``port``."""
    return LocalServer(  # the store URI goes through the environment: a password in it stays out of the process list
        name="mlflow ui",
        argv=[sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_BACKEND_STORE_URI": store},
        port=port,
        port_flag="--port",
        ready_path="/health",
        banner=f"MLflow UI for {mask_url(store)}: http://127.0.0.1:{port}",
    )


def serve_ui(study_name: str | None, run_dir: str | None, tracking_uri: str | None, port: int, ready_timeout: float = 120.0) -> int:
    """Run ``mlflow ui`` until interrupted; prints the URL once it answers."""
    check_port(port)
    store = tracking_store(study_name, run_dir, tracking_uri)
    if store.startswith(("http://", "https://")):
        print(f"{mask_url(store)} is a tracking server: open it in a browser, it is its own UI.")
        return 0
    return run_servers([mlflow_server(store, port)], ready_timeout)


def ui_command(args: argparse.Namespace) -> int:
    """``nas ui``: the MLflow UI, and with ``--with-dashboard`` optuna-dashboard for the study's storage beside it."""
    if not args.with_dashboard:
        if args.storage:
            raise ConfigError("--storage names the study storage of --with-dashboard; add --with-dashboard, or pass --tracking-uri for MLflow.")
        return serve_ui(args.study_name, args.run_dir, args.tracking_uri, args.port)
    if args.port == args.dashboard_port:
        raise ConfigError(f"--port and --dashboard-port are both {args.port}; give the dashboard another, e.g. --dashboard-port {args.port + 1}.")
    check_port(args.port)
    check_port(args.dashboard_port, "--dashboard-port")
    store = tracking_store(args.study_name, args.run_dir, args.tracking_uri)
    url, _ = dashboard_storage(args.study_name, args.run_dir, args.storage)
    dashboard = dashboard_server(url, args.dashboard_port, "--dashboard-port")
    if store.startswith(("http://", "https://")):
        print(f"{mask_url(store)} is a tracking server: open it in a browser, it is its own UI.")
        return run_servers([dashboard])
    return run_servers([mlflow_server(store, args.port), dashboard])
