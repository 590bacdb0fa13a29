"""Passwords in storage and tracking URLs: never printed or recorded; URLs from environment variables."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import psycopg2
import pytest
import yaml

from nas.cli import main
from nas.config import config_from_dict, load_config
from nas.errors import ConfigError, NasError
from nas.secrets import mask_url, masked_config_dict, resolve_url
from nas.tracking import MlflowTracker

SECRET = "s3cret"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+psycopg2://u:p@ss:w@h/db", "postgresql+psycopg2://u:***@h/db"),  # over-masks, never under-masks
        ("http://user:pw@mlflow:5000", "http://user:***@mlflow:5000"),
        ("postgresql://h/db?user=u&password=pw&sslmode=require", "postgresql://h/db?user=u&password=***&sslmode=require"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:////abs/optuna.db", "sqlite:////abs/optuna.db"),
        ("journal:///tmp/j.log", "journal:///tmp/j.log"),
        ("env:NAS_STORAGE", "env:NAS_STORAGE"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_masked_config_dict_masks_every_url(tiny_config, tmp_path: Path) -> None:
    config = config_from_dict(
        tiny_config(tmp_path, search__storage=f"postgresql://u:{SECRET}@h/db", tracking__uri=f"http://u:{SECRET}@h:5000")
    )
    data = masked_config_dict(config)
    assert SECRET not in json.dumps(data)
    assert data["search"]["storage"] == "postgresql://u:***@h/db" and data["tracking"]["uri"] == "http://u:***@h:5000"
    assert config.storage_url == f"postgresql://u:{SECRET}@h/db"  # the real URL stays in memory


def test_url_from_an_environment_variable(tiny_config, tmp_path: Path, monkeypatch) -> None:
    config = config_from_dict(tiny_config(tmp_path, search__storage="env:NAS_TEST_STORAGE", tracking__uri="env:NAS_TEST_TRACKING"))
    monkeypatch.setenv("NAS_TEST_STORAGE", f"postgresql://u:{SECRET}@h/db")
    monkeypatch.setenv("NAS_TEST_TRACKING", "sqlite:///x.db")
    assert config.storage_url == f"postgresql://u:{SECRET}@h/db" and config.tracking_uri == "sqlite:///x.db"
    assert masked_config_dict(config)["search"]["storage"] == "env:NAS_TEST_STORAGE"  # recorded as the variable's name
    monkeypatch.delenv("NAS_TEST_STORAGE")
    with pytest.raises(ConfigError, match="NAS_TEST_STORAGE is not set"):
        config.storage_url
    with pytest.raises(ConfigError, match="environment variable"):
        resolve_url("env:not a name", "--storage")
    with pytest.raises(ConfigError, match="masked"):  # a recorded URL cannot be used to connect
        resolve_url("postgresql://u:***@h/db", "--storage")


def test_a_missing_variable_is_a_clear_error_before_any_data_is_loaded(tiny_config, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NAS_NOT_SET", raising=False)
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    for flag in ("--storage", "--tracking-uri"):
        assert main(["search", str(file), flag, "env:NAS_NOT_SET"]) == 2
        captured = capsys.readouterr()
        assert "NAS_NOT_SET is not set" in captured.err and "Traceback" not in captured.err
        assert "Paragon" not in captured.out and not (tmp_path / "run" / "gallery").exists()  # nothing was loaded or trained
    assert main(["results", "--study-name", "x", "--storage", "env:NAS_NOT_SET"]) == 2
    assert "NAS_NOT_SET is not set" in capsys.readouterr().err


def test_an_unreachable_store_is_named_without_its_password() -> None:
    start = time.monotonic()
    with pytest.raises(NasError) as info:
        MlflowTracker(f"postgresql://postgres:{SECRET}@127.0.0.1:9/nothing", "x")
    assert "postgres:***@127.0.0.1:9" in str(info.value) and SECRET not in str(info.value)
    assert time.monotonic() - start < 30  # at once, not after MLflow's 100 s of connection retries


# ------------------------------------------------------------------------------ PostgreSQL, end to end


@pytest.fixture
def pg_urls(pg_databases) -> Iterator:
    """Fresh PostgreSQL databases as URLs with a dummy password (trust auth ignores it); dropped at the end."""
    yield lambda: pg_databases(SECRET)


def _rows_holding(url: str, text: str) -> list[str]:
    """``table: row`` for every row of every table of database ``url`` whose text holds ``text``."""
    conn = psycopg2.connect(url.replace(f":{SECRET}@", "@"))
    found = []
    with conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for (table,) in cur.fetchall():
            cur.execute(f'SELECT t::text FROM "{table}" t WHERE t::text LIKE %s', (f"%{text}%",))
            found += [f"{table}: {row[0][:200]}" for row in cur.fetchall()]
    conn.close()
    return found


def _files_holding(folder: Path, text: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.postgres
def test_a_search_on_postgresql_never_prints_or_records_the_password(tmp_path: Path, tiny_config, capsys, monkeypatch, pg_urls) -> None:
    storage, tracking = pg_urls(), pg_urls()
    monkeypatch.setenv("NAS_TRACKING_URI", tracking)  # the tracking URI from the environment, the storage URL in the file
    out = tmp_path / "run"
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(tiny_config(out, search__storage=storage, tracking__uri="env:NAS_TRACKING_URI", train__epochs=1)))
    assert main(["search", str(file), "--trials", "1", "--study-name", "secret"]) == 0
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "postgres:***@127.0.0.1:5432" in captured.out  # the study line and the summary's commands, masked
    # recorded nowhere: not in the study's attributes, the MLflow params, tags or config.yaml, nor any file of the run
    assert not _rows_holding(storage, SECRET) and not _rows_holding(tracking, SECRET)
    assert not _files_holding(out, SECRET)
    study = optuna.load_study(study_name="secret", storage=storage)
    assert study.user_attrs["config"]["search"]["storage"] == mask_url(storage)
    assert study.user_attrs["config"]["tracking"]["uri"] == "env:NAS_TRACKING_URI"
    config_yaml = next(out.rglob("config.yaml")).read_text()
    assert "postgres:***@" in config_yaml and "env:NAS_TRACKING_URI" in config_yaml
    # reading the study back takes the real URL from the environment; the recorded tracking URI names its variable
    monkeypatch.setenv("NAS_STORAGE", storage)
    assert main(["results", "--study-name", "secret", "--storage", "env:NAS_STORAGE"]) == 0
    assert main(["report", "--study-name", "secret", "--storage", "env:NAS_STORAGE", "--out", str(tmp_path / "report")]) == 0
    report = capsys.readouterr().out
    assert "MLflow: logged" in report and SECRET not in report
    # without the variable the report is written but not logged, and says why; --tracking-uri names the store instead
    monkeypatch.delenv("NAS_TRACKING_URI")
    assert main(["report", "--study-name", "secret", "--storage", "env:NAS_STORAGE", "--out", str(tmp_path / "report")]) == 0
    assert "NAS_TRACKING_URI is not set" in capsys.readouterr().out
    monkeypatch.setenv("MY_TRACKING", tracking)
    argv = ["report", "--study-name", "secret", "--storage", "env:NAS_STORAGE", "--tracking-uri", "env:MY_TRACKING"]
    argv += ["--out", str(tmp_path / "r2")]
    assert main(argv) == 0 and "MLflow: logged" in capsys.readouterr().out


@pytest.mark.postgres
def test_local_workers_get_the_password_through_their_environment(tmp_path: Path, tiny_config, monkeypatch, pg_urls) -> None:
    from nas.search import workers

    storage = pg_urls()
    started: list[dict] = []

    class Worker:  # stands in for the worker process: what it was given, exit status 0
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            started.append({"command": command, "env": env})

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", Worker)
    config = config_from_dict(tiny_config(tmp_path / "run", search__storage=storage, tracking__uri=f"http://u:{SECRET}@127.0.0.1:9"))
    workers.run_local_workers(config, 2)
    effective = tmp_path / "run" / "effective-config.yaml"
    assert len(started) == 2 and SECRET not in effective.read_text()
    assert all(SECRET not in " ".join(s["command"]) for s in started)
    child = load_config(effective)  # as the worker reads it, in the environment it was given
    for name in ("NAS_WORKER_STORAGE", "NAS_WORKER_TRACKING_URI"):
        monkeypatch.setenv(name, started[0]["env"][name])
    assert child.storage_url == storage and child.tracking_uri == f"http://u:{SECRET}@127.0.0.1:9"


def test_the_ui_command_keeps_the_password_out_of_the_process_list(monkeypatch, capsys) -> None:
    from nas import ui

    seen: dict = {}

    def fake_popen(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        seen.update(argv=argv, env=env)
        raise KeyboardInterrupt  # stop before waiting for a server

    monkeypatch.setattr(ui.subprocess, "Popen", fake_popen)
    monkeypatch.setenv("NAS_UI_STORE", f"postgresql://u:{SECRET}@127.0.0.1:9/db")
    with pytest.raises(KeyboardInterrupt):
        ui.serve_ui(None, None, "env:NAS_UI_STORE", 5999)
    assert SECRET not in " ".join(seen["argv"]) and seen["env"]["MLFLOW_BACKEND_STORE_URI"].endswith(f"u:{SECRET}@127.0.0.1:9/db")
