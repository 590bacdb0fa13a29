"""``nas dashboard``: optuna-dashboard served on 127.0.0.1 for a real study database, and its bad inputs."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

from nas.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search's output folder holding ``optuna.db``: study ``dash``, three finished trials with user attrs."""
    folder = tmp_path_factory.mktemp("dash") / "run"
    folder.mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="dash", storage=f"sqlite:///{folder / 'optuna.db'}", directions=["maximize", "minimize"])
    for n in range(3):
        trial = study.ask()
        width = trial.suggest_categorical("width", [0.35, 0.5, 0.75])
        trial.set_user_attr("budgets", {"mflops": 1.5 + n})
        study.tell(trial, [0.5 + 0.1 * n, width])
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with status {proc.returncode}: {proc.stderr.read()}") from None
            assert time.monotonic() < deadline, f"nothing answered at {url} within {timeout:.0f} s"
            time.sleep(0.5)


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_dashboard_serves_the_study_and_its_trials(run_dir: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "dashboard", "--run-dir", str(run_dir), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        studies = _wait_for(f"http://127.0.0.1:{port}/api/studies", proc)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        study = _get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert study["name"] == "dash" and len(study["trials"]) == 3
        assert all(t["state"] == "Complete" for t in study["trials"])
        attrs = [{a["key"]: a["value"] for a in t["user_attrs"]} for t in study["trials"]]
        assert [json.loads(a["budgets"])["mflops"] for a in attrs] == [1.5, 2.5, 3.5]
        banner = f"Optuna dashboard 0.21.0 for sqlite:///{(run_dir / 'optuna.db').resolve()}: http://127.0.0.1:{port}/dashboard"
        seen, deadline = "", time.monotonic() + 60  # nas prints it once its own readiness poll sees the server answer
        while banner not in seen and time.monotonic() < deadline:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                seen += proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert banner in seen + out
    assert "Traceback" not in err
    assert _port_closed(port)  # the dashboard's own process was stopped with nas dashboard


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--run-dir", "{tmp}"], "No study database at {tmp}/optuna.db"),
        (["--run-dir", "{run}", "--study-name", "dahs"], "dash"),
        (["--storage", "env:NAS_DASHBOARD_TEST_UNSET"], "NAS_DASHBOARD_TEST_UNSET"),
        (["--storage", "sqlite:///{tmp}/none.db"], "No study database at"),
        ([], "Pass --study-name NAME, --run-dir DIR or --storage URL"),
        (["--run-dir", "{run}", "--port", "{busy}"], "is in use"),
    ],
)
def test_dashboard_bad_inputs_are_clear_errors(argv: list[str], fragment: str, run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        values = {"tmp": str(tmp_path), "run": str(run_dir), "busy": str(busy.getsockname()[1])}
        code = main(["dashboard", *(a.format(**values) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and fragment.format(**values) in err, err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "none.db").exists()  # nothing created


def test_ui_with_dashboard_refuses_one_port_for_both(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ui", "--run-dir", str(run_dir), "--with-dashboard", "--port", "5123", "--dashboard-port", "5123"]) == 2
    assert "--port and --dashboard-port are both 5123" in capsys.readouterr().err
    assert main(["ui", "--run-dir", str(run_dir), "--storage", f"sqlite:///{run_dir / 'optuna.db'}"]) == 2
    assert "add --with-dashboard" in capsys.readouterr().err


@pytest.mark.slow
def test_ui_with_dashboard_serves_both(run_dir: Path, tmp_path: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{run_dir / 'mlflow.db'}")
    mlflow.set_experiment("dash")
    with mlflow.start_run(run_name="study:dash"):
        mlflow.log_metric("val_map", 0.5)
    ui_port, dash_port = _free_port(), _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "ui", "--run-dir", str(run_dir), "--with-dashboard", "--port", str(ui_port), "--dashboard-port", str(dash_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        studies = _wait_for(f"http://127.0.0.1:{dash_port}/api/studies", proc)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["dash"]
        _wait_for(f"http://127.0.0.1:{ui_port}/ajax-api/2.0/mlflow/experiments/search?max_results=10", proc)
        experiments = _get(f"http://127.0.0.1:{ui_port}/ajax-api/2.0/mlflow/experiments/search?max_results=10")["experiments"]
        assert "dash" in [e["name"] for e in experiments]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "MLflow UI for" in out and "Optuna dashboard" in out, err
    assert _port_closed(ui_port) and _port_closed(dash_port)
