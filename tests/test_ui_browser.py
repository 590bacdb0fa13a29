"""The MLflow UI served by ``nas ui`` and optuna-dashboard served by ``nas dashboard``, checked in a real headless browser (Debian's chromium).

Slow (a search, a UI server and a browser): run with ``make test-slow``, which installs
chromium and Playwright's Python driver (``pip install '.[browser]'``; no browser download).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_mlflow_ui_shows_the_study_and_its_trials(tmp_path: Path, tiny_config) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install '.[browser]' (make test-slow does)")
    assert Path(CHROMIUM).exists(), "apt-get install chromium (make test-slow does)"
    from mlflow.tracking import MlflowClient

    from nas.config import config_from_dict
    from nas.search.driver import run_search

    study = run_search(config_from_dict(tiny_config(tmp_path / "run", search__trials=3)), log=lambda _: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "ui", "--run-dir", str(tmp_path / "run"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        while "MLflow UI for" not in (line := proc.stdout.readline()):
            assert line, "nas ui exited"
        url = f"http://127.0.0.1:{port}"
        experiment = MlflowClient(url).get_experiment_by_name("tiny")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 2400, "height": 1200})
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs")
            page.get_by_text("study:tiny").wait_for(timeout=60000)  # the experiment's parent run
            name_cell = page.locator("[role=gridcell][col-id='attributes.`Run Name`']", has_text="study:tiny").first
            name_cell.locator("button").first.click()  # expand the nested trial runs
            for trial in study.trials:
                page.get_by_text(f"trial-{trial.number}", exact=True).wait_for(timeout=15000)
            page.get_by_role("button", name="Columns", exact=True).click()
            page.get_by_text("mflops", exact=True).click()
            page.keyboard.press("Escape")
            page.locator("[role=columnheader]", has_text="mflops").first.wait_for(timeout=15000)
            page.screenshot(path=str(tmp_path / "mlflow-ui.png"))
            for trial in study.trials:
                # the grid renders a row as a pinned part (run name) and a scrolling part (metrics)
                row_id = page.locator("[role=row]", has_text=f"trial-{trial.number}").first.get_attribute("row-id")
                cell = page.locator(f"[role=row][row-id='{row_id}'] [role=gridcell][col-id*='mflops']").first
                shown = float(cell.inner_text().strip())
                assert shown == pytest.approx(trial.user_attrs["budgets"]["mflops"], rel=1e-3)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)


def test_optuna_dashboard_lists_the_study_and_shows_its_trials(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install '.[browser]' (make test-slow does)")
    assert Path(CHROMIUM).exists(), "apt-get install chromium (make test-slow does)"
    import optuna

    run = tmp_path / "run"
    run.mkdir()
    study = optuna.create_study(study_name="dashboard-study", storage=f"sqlite:///{run / 'optuna.db'}")
    study.optimize(lambda trial: trial.suggest_float("width", 0.25, 1.0), n_trials=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nas.cli", "dashboard", "--run-dir", str(run), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        while "Optuna dashboard" not in (line := proc.stdout.readline()):
            assert line, "nas dashboard exited"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/dashboard")
            page.get_by_text("dashboard-study").first.wait_for(timeout=60000)
            page.get_by_text("dashboard-study").first.click()
            page.get_by_text("width").first.wait_for(timeout=60000)  # the study page: its parameter
            page.screenshot(path=str(tmp_path / "optuna-dashboard.png"))
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
