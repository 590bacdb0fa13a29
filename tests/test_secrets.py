"""Passwords in storage and tracking URLs: never printed or recorded; URLs from environment variables."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import optuna
import psycopg2
from mlflow.tracking import MlflowClient
import pytest
import yaml

from nas.cli import main
from nas.config import config_from_dict, load_config
from nas.errors import ConfigError, NasError
from nas.records import State, TrialWriter
from nas.secrets import mask_process_output, mask_text, mask_url, masked_config_dict, resolve_url
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


def test_the_ui_command_keeps_the_password_out_of_the_process_list(monkeypatch) -> None:
    from nas import ui

    monkeypatch.setenv("NAS_UI_STORE", f"postgresql://u:{SECRET}@127.0.0.1:9/db")
    store = ui.tracking_store(None, None, "env:NAS_UI_STORE")
    server = ui.mlflow_server(store, 5999)  # what nas ui starts: the argv is in the process list, the environment is not
    assert SECRET not in " ".join(server.argv) and SECRET not in server.banner
    assert server.env["MLFLOW_BACKEND_STORE_URI"].endswith(f"u:{SECRET}@127.0.0.1:9/db")


# ------------------------------------------------------------------------------ awkward passwords, every channel

#: Passwords holding every character that has a meaning in a URL, and more. Each piece is distinctive
#: (at least 4 characters), so that its absence from an output is a real check.
AWKWARD = [
    "hunter@2024tail",  # a raw "@": the password's tail once showed up as the host
    "one1@two2@three3",
    "pass:word:4242",
    "sl/ash/pw42",
    "hash#tag#pw42",
    "que?ry&pw=4242",
    "per%cent%41pw",  # a raw "%", and one that reads as an escape
    "space in pw42",
    "quo'te\"pw42",
    "back\\slash42",
    "ünï€ode-pw42",
    "%40enc%2Fpw42",  # given percent-encoded: the password is "@enc/pw42"
]


def _forms(password: str) -> set[str]:
    """What must never be shown: the password, its percent-encoded and -decoded forms, and the pieces a raw "@" splits it into."""
    forms = {password, quote(password, safe=""), unquote(password), quote(unquote(password), safe="")}
    return forms | {piece for piece in password.split("@") if len(piece) >= 4}


def _leaks(text: str, password: str) -> list[str]:
    return sorted(form for form in _forms(password) if form in text)


def _url(password: str, encode: bool, user: str = "postgres", db: str = "test") -> str:
    return f"postgresql://{user}:{quote(password, safe='') if encode else password}@127.0.0.1:5432/{db}"


@pytest.mark.parametrize("password", AWKWARD)
@pytest.mark.parametrize("encode", [False, True], ids=["raw", "encoded"])
def test_an_awkward_password_is_masked_in_every_form(password: str, encode: bool, tiny_config, tmp_path: Path, monkeypatch) -> None:
    url = _url(password, encode)
    assert mask_url(url) == "postgresql://postgres:***@127.0.0.1:5432/test"  # the host and database still shown
    tracking = f"https://admin:{quote(password, safe='') if encode else password}@mlflow.example:5000"
    assert mask_url(tracking) == "https://admin:***@mlflow.example:5000"
    config = config_from_dict(tiny_config(tmp_path, search__storage=url, tracking__uri=tracking))
    assert not _leaks(json.dumps(masked_config_dict(config), ensure_ascii=False), password)
    # a message that quotes the URL, or only the password (as a driver's may), raw, encoded or escaped
    message = (
        f"could not connect to {url!r} ({url}): password authentication failed for {password!r}; "
        f"dsn {quote(password, safe='')} {unquote(password)} {json.dumps(password)}"
    )
    assert not _leaks(mask_text(message), password)


@pytest.mark.parametrize("password", AWKWARD)
def test_a_url_inside_a_message_is_masked_before_its_password_is_known(password: str) -> None:
    fresh = f"{password}{uuid.uuid4().hex[:6]}"  # never seen by this process
    for url in (_url(fresh, encode=True), _url(fresh, encode=" " not in fresh)):
        masked = mask_text(f"error at {url}: refused")
        assert "postgres:***@" in masked and not _leaks(masked, fresh)


def test_query_string_and_named_secrets_are_masked() -> None:
    assert mask_url("postgresql://h/db?user=u&sslpassword=k3y42&token=t0k42") == "postgresql://h/db?user=u&sslpassword=***&token=***"
    assert mask_url("http://h:5000/api?api_key=abc123&x=1") == "http://h:5000/api?api_key=***&x=1"
    text = mask_text("invalid dsn: host=h password='se cret42' user=u; MLFLOW_TRACKING_PASSWORD=pw4242 and token=tk4242")
    assert all(secret not in text for secret in ("se cret42", "pw4242", "tk4242")) and "host=h" in text and "user=u" in text


def test_a_password_that_is_also_a_word_of_the_url_leaves_its_scheme_readable() -> None:
    url = "postgresql://postgresql:postgresql@127.0.0.1:5432/db"
    assert mask_url(url) == "postgresql://postgresql:***@127.0.0.1:5432/db"
    assert mask_text(f"cannot reach {url} as postgresql") == "cannot reach postgresql://***:***@127.0.0.1:5432/db as ***"


def test_environment_secrets_are_masked(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pw@4242")
    monkeypatch.setenv("PGPASSWORD", "pg%pw 4242")
    monkeypatch.setenv("NAS_SOME_URL", "http://u:url-pw42@h:5000")
    text = mask_text("401 for env-pw@4242 / env-pw%404242 / pg%pw 4242 / url-pw42; cwd stays")
    assert not any(secret in text for secret in ("env-pw", "pg%pw", "url-pw42")) and "cwd stays" in text


def test_a_raw_at_in_the_user_info_is_refused_without_showing_the_password(monkeypatch) -> None:
    for password in ("hunter@2024tail", "one1@two2@three3"):
        for value in (_url(password, encode=False), "env:NAS_TEST_RAW_AT"):
            monkeypatch.setenv("NAS_TEST_RAW_AT", _url(password, encode=False))
            with pytest.raises(ConfigError) as info:
                resolve_url(value, "--storage")
            assert "raw '@'" in str(info.value) and "%40" in str(info.value) and not _leaks(str(info.value), password)
    assert resolve_url(_url("hunter@2024tail", encode=True), "--storage") == _url("hunter@2024tail", encode=True)  # encoded: fine
    assert resolve_url("postgresql://u:pw@h/db?application_name=a@b", "--storage")  # an "@" in the query is not the user info


def test_printed_lines_log_records_tracebacks_and_trial_reasons_are_masked(caplog, capsys) -> None:
    password = "log@pw4242"
    url = _url(password, encode=False)
    old_factory, old_hook, old_out, old_err = logging.getLogRecordFactory(), sys.excepthook, sys.stdout, sys.stderr
    mask_process_output()
    try:
        print(f"a line that quotes {url} and {password}")
        print("and a piece of it:", password.split("@")[1], file=sys.stderr)
        captured = capsys.readouterr()
        assert "a line that quotes" in captured.out and "piece" in captured.err
        assert not _leaks(captured.out + captured.err, password)
        with caplog.at_level(logging.WARNING):
            logging.getLogger("sqlalchemy.pool").warning("connection to %s failed for password %r", url, password)
        assert caplog.records and not _leaks(caplog.text, password)
        try:
            raise RuntimeError(f"unexpected: {url}")
        except RuntimeError as exc:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        err = capsys.readouterr().err
        assert "RuntimeError" in err and not _leaks(err, password)
    finally:
        logging.setLogRecordFactory(old_factory)
        sys.excepthook, sys.stdout, sys.stderr = old_hook, old_out, old_err
    study = optuna.create_study()
    trial = study.ask()
    writer = TrialWriter(trial)
    writer.outcome(State.FAILED, reason=f"OperationalError: {url} refused {password}")
    assert not _leaks(json.dumps(study.trials[0].user_attrs, ensure_ascii=False), password)


def test_mlflow_params_tags_and_texts_hold_no_secret(tmp_path: Path) -> None:
    password = "mf@secret4242"
    url = _url(password, encode=False)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", "secrets", artifact_dir=tmp_path / "artifacts")
    study = optuna.create_study()
    parent = tracker.start_study(study, params={"search.storage": url}, tags={"note": f"failed: {password}"}, texts={"config.yaml": f"storage: {url}\n"})
    tracker.end_study(parent)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(parent)
    assert run.data.params["search.storage"] == "postgresql://postgres:***@127.0.0.1:5432/test"
    assert not _leaks(json.dumps(run.data.tags, ensure_ascii=False), password)
    assert not [path for path in _files_holding(tmp_path / "artifacts", "secret4242")]


# ------------------------------------------------------------------------------ through the CLI, against the real server


def _cli_cases() -> list[tuple[str, int, str]]:
    """(URL, exit status, words the error must hold) for every awkward password: a role that does not exist (the
    server refuses the connection), and the existing role under trust auth (no study of that name there)."""
    cases = []
    for password in AWKWARD:
        raw_at = "@" in password
        cases.append((_url(password, encode=False, user="nas_no_such_role"), 2, "raw '@'" if raw_at else "does not exist"))
        cases.append((_url(password, encode=True, user="nas_no_such_role"), 2, "does not exist"))
        cases.append((_url(password, encode=True), 2, "No study named"))
    return cases


@pytest.mark.postgres
def test_failed_connections_through_the_cli_show_no_password(capsys) -> None:
    for url, status, words in _cli_cases():
        assert main(["results", "--study-name", "nas-no-such-study", "--storage", url]) == status, url
        captured = capsys.readouterr()
        password = next(p for p in AWKWARD if p in url or quote(p, safe="") in url)
        assert words in captured.err and not _leaks(captured.out + captured.err, password), captured.err


_SCRIPT = """
import json, sys
from nas.cli import main
for url, status, words in json.loads(sys.argv[1]):
    print("status", main(["results", "--study-name", "nas-no-such-study", "--storage", url]) == status, flush=True)
"""


@pytest.mark.slow
@pytest.mark.postgres
def test_failed_connections_in_a_cli_process_show_no_password(monkeypatch) -> None:
    # the reported case on the command line of the real program, then the whole table in one process (its raw stdout/stderr)
    argv = [sys.executable, "-m", "nas.cli", "results", "--study-name", "x", "--storage", _url("hunter@2024tail", encode=False)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "raw '@'" in done.stderr and not _leaks(done.stdout + done.stderr, "hunter@2024tail")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(_cli_cases())], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.count("status True") == len(_cli_cases()), done.stdout + done.stderr
    for password in AWKWARD:
        assert not _leaks(done.stdout + done.stderr, password)
