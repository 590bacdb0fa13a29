"""``nas dashboard``: optuna-dashboard for a study's storage, on 127.0.0.1; and the local servers it shares with ``nas ui``.

The dashboard runs in a child process (so that ``nas ui --with-dashboard`` can serve it beside
the MLflow UI): the storage URL reaches it through the environment, so a password in it stays
out of the process list, and only its masked form is ever printed. The study storage is
opened as a reader (no heartbeats); a missing database is refused rather than created.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import optuna
import optuna_dashboard

from nas.errors import ConfigError, NasError
from nas.search.optuna_setup import check_storage, load_existing_study, make_storage, reader_storage_url, storage_errors
from nas.secrets import mask_url

__all__ = ["LocalServer", "check_port", "run_servers", "dashboard_storage", "dashboard_server", "dashboard_command"]

#: The environment variable that hands the storage URL to the dashboard's process.
STORAGE_ENV = "NAS_DASHBOARD_STORAGE"

#: The dashboard's process: optuna-dashboard's WSGI app on 127.0.0.1, one thread per request, no request log,
#: until SIGINT. It imports only Optuna and optuna-dashboard (not this package, whose import pulls in torch);
#: the storage was checked before it starts, and is opened as a reader, as make_storage(url, None) opens it.
_SERVE = f"""
import os, sys
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
import optuna
from optuna_dashboard import wsgi

class Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass

url, port = os.environ.pop("{STORAGE_ENV}"), int(sys.argv[1])
try:
    if url.startswith("journal://"):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url[len("journal://"):]))
    else:
        kwargs = {{"connect_args": {{"timeout": 60}}}} if url.startswith("sqlite:") else {{"pool_pre_ping": True}}
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    server = make_server("127.0.0.1", port, wsgi(storage), server_class=Server, handler_class=Quiet)
except OSError as exc:
    sys.exit(f"error: cannot listen on 127.0.0.1:{{port}}: {{exc.strerror or exc}}")
except Exception as exc:
    sys.exit(f"error: the dashboard cannot open the study storage: {{type(exc).__name__}}")
try:
    server.serve_forever()
except KeyboardInterrupt:
    pass
"""


@dataclass
class LocalServer:
    """A server process on 127.0.0.1: its command, environment, the URL that answers once it is up, and what to print then."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    port_flag: str
    ready_path: str
    banner: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def check_port(port: int, flag: str = "--port") -> None:
    """A :class:`ConfigError` when ``port`` on 127.0.0.1 is in use: say so, rather than report another server's answer as ours."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port in TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"Port {port} on 127.0.0.1 is in use ({exc.strerror}); pass another {flag}, e.g. {flag} {port + 1}.") from None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGINT to the server's process group (``mlflow ui`` starts helper processes of its own); SIGKILL to what is
    left of it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    while time.monotonic() < deadline:
        proc.poll()  # reaps the server itself; its group lives on while a helper does
        if not _group_alive(proc.pid):
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_servers(servers: list[LocalServer], ready_timeout: float = 120.0) -> int:
    """Start ``servers``, print each one's banner once it answers, and serve until Ctrl-C (status 0) or until one
    exits (its status); the others are then stopped. One that exits or stays silent while starting is a :class:`NasError`."""
    for server in servers:
        check_port(server.port, server.port_flag)
    procs: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # stopped by SIGTERM as by Ctrl-C: the servers with it
    try:
        for server in servers:  # each in a process group of its own, which _stop ends as a whole
            procs.append(subprocess.Popen(server.argv, env=server.env, process_group=0))
        pending = list(zip(servers, procs))
        deadline = time.monotonic() + ready_timeout
        while pending:
            for server, proc in list(pending):
                try:
                    with urllib.request.urlopen(server.url + server.ready_path, timeout=2):
                        pass
                except OSError:
                    if proc.poll() is not None:
                        raise NasError(f"{server.name} exited with status {proc.returncode} (is port {server.port} free? pass {server.port_flag}).") from None
                    continue
                pending.remove((server, proc))
                print(server.banner, flush=True)
            if pending and time.monotonic() > deadline:
                raise NasError(f"{pending[0][0].name} did not answer at {pending[0][0].url} within {ready_timeout:.0f} s.")
            if pending:
                time.sleep(0.5)
        print("Ctrl-C stops " + ("it" if len(servers) == 1 else "them") + ".", flush=True)
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
        return next(proc.returncode for proc in procs if proc.poll() is not None)
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in procs:
            _stop(proc)
        signal.signal(signal.SIGTERM, previous)


def _storage_file(url: str) -> Path | None:
    """The file of a SQLite or journal URL (already checked by :func:`check_storage`), None for a database server."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            return Path(url[len(prefix):])
    return None


def dashboard_storage(study_name: str | None, run_dir: str | None, storage: str | None) -> tuple[str, list[str]]:
    """The study storage URL to serve (``--storage``, ``env:NAME`` allowed, else ``<run dir>/optuna.db``, default
    ``runs/<study name>``) and the names of its studies; ``study_name``, when given, must be one of them."""
    if not (study_name or run_dir or storage):
        raise NasError("Pass --study-name NAME, --run-dir DIR or --storage URL to say which study storage to browse.")
    url = reader_storage_url(storage, run_dir, study_name or "")
    if study_name:
        study = load_existing_study(url, study_name)  # a missing database or study: an error listing the studies there
        return url, [study.study_name]
    check_storage(url)
    path = _storage_file(url)
    if path is not None and not path.is_file():
        raise NasError(f"No study database at {path}. Pass the search's --storage URL, or --run-dir (its --out folder).")
    with storage_errors(url):
        names = optuna.get_all_study_names(storage=make_storage(url, None))
    return url, names


def dashboard_server(url: str, port: int, port_flag: str = "--port") -> LocalServer:
    """The optuna-dashboard process for the storage ``url`` on 127.0.0.1:``port``."""
    return LocalServer(
        name="optuna-dashboard",
        argv=[sys.executable, "-c", _SERVE, str(port)],
        env={**os.environ, STORAGE_ENV: url},
        port=port,
        port_flag=port_flag,
        ready_path="/api/studies",
        banner=f"Optuna dashboard {optuna_dashboard.__version__} for {mask_url(url)}: http://127.0.0.1:{port}/dashboard",
    )


def dashboard_command(args: argparse.Namespace) -> int:
    """``nas dashboard``: serve optuna-dashboard for the study's storage on 127.0.0.1 until Ctrl-C."""
    check_port(args.port)
    url, names = dashboard_storage(args.study_name, args.run_dir, args.storage)
    if not names:
        print(f"{mask_url(url)} holds no study yet; the dashboard shows them as they are created.")
    return run_servers([dashboard_server(url, args.port)])
