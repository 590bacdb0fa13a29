"""Optuna as the search engine: the sampler, pruner and storage registries, and opening a study.

Proposing candidates stays with Optuna's samplers and pruners; this module only names
them for the config (``search.sampler``, ``search.pruner``, the scheme of
``search.storage``) and opens the study with them. The config checks names against these
registries when a file is loaded, so this module imports nothing of :mod:`nas.config` at
run time.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from nas.errors import ConfigError, NasError, StorageError
from nas.registry import Registry
from nas.secrets import mask_url, resolve_url

if TYPE_CHECKING:
    from nas.config import ExperimentConfig, SearchConfig

__all__ = [
    "SAMPLERS", "PRUNERS", "STORAGES", "make_sampler", "make_pruner", "make_storage", "storage_scheme", "check_storage", "storage_errors",
    "open_study", "load_existing_study", "reader_storage_url", "StaleTrialCallback",
]

StaleTrialCallback = Callable[[optuna.Study, optuna.trial.FrozenTrial], None]

#: ``search.sampler``: a factory from the search config to a seeded sampler.
SAMPLERS: Registry[Callable[[SearchConfig], optuna.samplers.BaseSampler]] = Registry("search.sampler")
#: ``search.pruner``: a factory from the search config and the training epochs to a pruner.
PRUNERS: Registry[Callable[[SearchConfig, int], optuna.pruners.BasePruner]] = Registry("search.pruner")
#: The scheme of ``search.storage`` (``sqlite:///...`` -> ``sqlite``): a factory from the URL, the search
#: config (``None``: a reader, without heartbeats) and the stale-trial callback to an Optuna storage.
STORAGES: Registry[Callable[[str, SearchConfig | None, StaleTrialCallback | None], optuna.storages.BaseStorage]] = Registry("search.storage (URL scheme)")


# ----------------------------------------------------------------------------- samplers
# Constraint-aware: Optuna's TPE ranks a trial whose ``trial.set_constraint`` values are
# positive (over budget) below every feasible one, NSGA-II uses constrained domination,
# and the GP sampler models the constraints; so each learns where the budget lies from
# the candidates it was refused. ``random`` and ``qmc`` ignore them.


@SAMPLERS.register("tpe")
def _tpe(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=search.seed, n_startup_trials=search.n_startup_trials)


@SAMPLERS.register("nsga2")
def _nsga2(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=search.seed)


@SAMPLERS.register("gp")
def _gp(search: SearchConfig) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=search.seed, n_startup_trials=search.n_startup_trials)


@SAMPLERS.register("random")
def _random(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """The baseline every claim is measured against."""
    return optuna.samplers.RandomSampler(seed=search.seed)


@SAMPLERS.register("qmc")
def _qmc(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """Scrambled Sobol points (Optuna's ``QMCSampler``): covers the space more evenly than ``random``.

    Categorical choices (most of a space's parameters) are drawn by its independent
    random sampler, seeded the same way.
    """
    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=search.seed, warn_independent_sampling=False)


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    """The study's sampler (``search.sampler``), seeded by ``search.seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS.get(search.sampler)(search)


# ----------------------------------------------------------------------------- pruners


@PRUNERS.register("median")
def _median(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return _percentile_below(search, 50.0)


@PRUNERS.register("percentile")
def _percentile(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return _percentile_below(search, search.prune_below_percentile)


def _percentile_below(search: SearchConfig, below: float) -> optuna.pruners.BasePruner:
    # Optuna's percentile is the share of trials kept (for maximisation it prunes below the
    # (100 - p)-th percentile), so keeping all but the bottom `below` percent is p = 100 - below.
    return optuna.pruners.PercentilePruner(
        100.0 - below, n_startup_trials=search.prune_startup_trials, n_warmup_steps=search.prune_warmup_epochs
    )


@PRUNERS.register("successive_halving")
def _successive_halving(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


@PRUNERS.register("hyperband")
def _hyperband(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1), reduction_factor=3)


@PRUNERS.register("none")
def _none(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


def make_pruner(search: SearchConfig, epochs: int) -> optuna.pruners.BasePruner:
    """The per-epoch pruner of a single-objective study (multi-objective ones use the promotion rule)."""
    if len(search.objectives) > 1:
        return optuna.pruners.NopPruner()
    return PRUNERS.get(search.pruner)(search, epochs)


# ----------------------------------------------------------------------------- storages


def _rdb(url: str, search: SearchConfig | None, on_stale_trial: StaleTrialCallback | None) -> optuna.storages.BaseStorage:
    """SQLAlchemy storage with heartbeats: a trial left running by a killed process is failed after the grace period.

    Without ``search`` (a reader: ``nas results``, ``nas export``) there is no heartbeat. A
    SQLite file's folder is created when missing, as the journal backend's is.
    """
    # SQLite serialises writers: let a worker wait for the lock instead of failing at once
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    path = _sqlite_file(url)
    if path is not None and search is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are marked experimental by Optuna; we rely on them deliberately
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=search.heartbeat_interval if search else None,
            grace_period=search.grace_period if search else None,
            heartbeat_stale_trial_callback=on_stale_trial if search else None,
        )


for _scheme in ("sqlite", "postgresql", "mysql"):
    STORAGES.add(_scheme, _rdb)


@STORAGES.register("journal")
def _journal(url: str, search: SearchConfig | None, on_stale_trial: StaleTrialCallback | None) -> optuna.storages.BaseStorage:
    """Optuna's journal file backend (``journal:///PATH``): concurrent writers on one machine, no heartbeats."""
    path = _journal_file(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def storage_scheme(url: str) -> str:
    """``sqlite`` of ``sqlite:///x.db``, ``postgresql`` of ``postgresql+psycopg2://...``."""
    return url.split(":", 1)[0].split("+", 1)[0]


def make_storage(url: str, search: SearchConfig | None, on_stale_trial: StaleTrialCallback | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage of ``url``, by its scheme (``search`` None: a reader, without heartbeats).

    An unusable URL or database is a :class:`~nas.errors.StorageError` (see :func:`storage_errors`).
    """
    _check_scheme(url)
    with storage_errors(url):
        return STORAGES.get(storage_scheme(url))(url, search, on_stale_trial)


# ----------------------------------------------------------------------------- checking a storage

#: The URL forms a user can copy, for the messages.
URL_FORMS = (
    "sqlite:///relative/path/optuna.db or sqlite:////absolute/path/optuna.db (three slashes, then the path), "
    "postgresql://USER@HOST:PORT/DATABASE, or journal:///absolute/path.log"
)


def _check_scheme(url: str) -> None:
    """A :class:`StorageError` unless ``url`` has the form SCHEME:... with a registered scheme."""
    scheme = storage_scheme(url) if isinstance(url, str) and ":" in url else ""
    if scheme in STORAGES:
        return
    if not scheme:
        hint = f" It has no scheme; for a SQLite file write sqlite:///{Path(url).resolve()}." if url else " It is empty."
    else:
        try:
            STORAGES.check(scheme)
        except ConfigError as exc:
            hint = " " + str(exc).replace("search.storage (URL scheme)", "Its scheme")
    raise StorageError(f"The storage URL {mask_url(url)!r} (--storage, search.storage) is not a study database URL.{hint} Write it as {URL_FORMS}.")


def _parse(url: str):
    """The SQLAlchemy URL of a database URL; a malformed one (no ``//``, a port that is not a number) is a :class:`StorageError`."""
    from sqlalchemy.engine import make_url  # deferred: the config imports this module, and few commands need SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"The storage URL {mask_url(url)!r} is malformed ({_reason(exc)}). Write it as {URL_FORMS}.") from None


def _sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:`` URL (``None``: not SQLite); a malformed or in-memory one is a :class:`StorageError`."""
    if not url.startswith("sqlite:"):
        return None
    database = _parse(url).database
    if url.startswith("sqlite:///") and database not in (None, "", ":memory:"):
        return Path(database)
    if url.startswith("sqlite:///"):
        raise StorageError(f"The storage URL {mask_url(url)!r} is an in-memory SQLite database: the study would be lost when the process ends. Give a file, e.g. sqlite:///runs/NAME/optuna.db.")
    raise StorageError(
        f"The storage URL {mask_url(url)!r} is not a valid SQLite URL: SQLite URLs have three slashes before the path. "
        f"Write it as {URL_FORMS}."
    )


def _journal_file(url: str) -> Path:
    """The file of a ``journal://PATH`` URL."""
    path = url[len("journal://") :] if url.startswith("journal://") else ""
    if not path:
        raise StorageError(f"The storage URL {mask_url(url)!r} is not a valid journal URL. Write it as {URL_FORMS}.")
    return Path(path)


def _reason(exc: BaseException) -> str:
    """The database's own words: the first line of the driver's message, without SQLAlchemy's wrapping."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.rsplit(" failed: ", 1)[-1].replace("FATAL:  ", "").strip()


def _unreadable_file(path: Path, what: str, reason: str) -> StorageError:
    return StorageError(
        f"{path} is not a readable {what} ({reason}): the file is damaged, truncated or not a study database. "
        f"Nothing was changed. Move it away (mv {path} {path}.broken) to start a new study there, restore it from a backup, "
        f"or point --storage at another database."
    )


def _server(url: str) -> str:
    """``host:port/database as user 'u'`` of a server URL, never its password."""
    parsed = _parse(url)
    host = parsed.host or parsed.query.get("host") or "localhost"
    return f"{host}:{parsed.port or 'default port'}/{parsed.database or ''} as user {parsed.username or '(default)'!r}"


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn what the database layer raises for an unusable ``url`` into one :class:`~nas.errors.StorageError`.

    A malformed URL, an unknown or missing driver, a damaged SQLite or journal file, and a
    database server that refuses the connection (down, wrong port, missing role or
    database, wrong password) each get a paragraph naming the database (never its
    password) and what to check. Wrap only the opening of a storage in it.
    """
    import sqlalchemy.exc  # deferred, see _parse

    shown = mask_url(url)
    try:
        yield
    except NasError:
        raise
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise StorageError(f"The storage URL {shown!r} is malformed ({_reason(exc)}). Write it as {URL_FORMS}.") from None
    except ImportError as exc:
        raise StorageError(
            f"The database driver for {shown!r} is not installed ({exc}). Install it (e.g. pip install psycopg for PostgreSQL, "
            f"pymysql for mysql+pymysql://) or use a SQLite or journal storage."
        ) from None
    except (sqlalchemy.exc.DBAPIError, sqlite3.Error) as exc:
        if url.startswith("sqlite:") and _sqlite_file(url) is not None:
            path, reason = _sqlite_file(url), _reason(exc)
            if "not a database" in reason or "malformed" in reason:
                raise _unreadable_file(path, "SQLite study database", reason) from None
            raise StorageError(
                f"Cannot open the SQLite study database {path} ({reason}). Check that {path.parent} is a writable folder "
                f"and {path} a database file, or point --storage at another database."
            ) from None
        raise StorageError(
            f"Cannot connect to the study database at {_server(url)} ({_reason(exc)}). Check that the server is running and "
            f"accepts TCP connections on that host and port, that the role and the database exist (createdb -h HOST -U USER "
            f"DATABASE), and the password; or pass another --storage URL."
        ) from None
    except ValueError as exc:  # a journal file that is not UTF-8 JSON lines; any other ValueError is not the storage's
        if not url.startswith("journal:"):
            raise
        raise _unreadable_file(_journal_file(url), "Optuna journal file", str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise StorageError(f"Cannot open the study storage {shown!r}: {exc}. Point --storage at a file in a writable folder.") from None
    except RuntimeError as exc:  # Optuna: tables of another program or of an incompatible Optuna version
        raise StorageError(
            f"The database {shown!r} is not a study database this Optuna can use ({str(exc).splitlines()[0]}). "
            f"Point --storage at the search's own optuna.db or a new database."
        ) from None


def _check_sqlite_file(path: Path) -> None:
    """An existing SQLite file must be intact and empty or an Optuna study database; a new one needs a folder."""
    if path.is_dir():
        raise StorageError(f"The SQLite study database {path} is a folder. Point --storage at a file, e.g. sqlite:///{path}/optuna.db.")
    if not path.exists():
        folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StorageError(f"Cannot create the SQLite study database {path}: {folder} is not a writable folder.")
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise _unreadable_file(path, "SQLite study database", str(exc)) from None
    if check != "ok":
        raise _unreadable_file(path, "SQLite study database", f"integrity check: {check}")
    if tables and not tables & {"studies", "trials", "version_info", "study_directions"}:  # not even part of Optuna's schema
        shown = ", ".join(sorted(tables)[:4])
        raise StorageError(
            f"{path} is a SQLite database of another program (tables {shown}, ...), not an Optuna study database: is it "
            f"the MLflow store? Nothing was changed. Point --storage at the search's optuna.db or a new file."
        )


def check_storage(url: str) -> None:
    """Check the storage ``url`` cheaply, before anything expensive; a :class:`~nas.errors.StorageError` if unusable.

    The URL must parse, with a registered scheme and an installed driver. An existing
    SQLite file must pass ``PRAGMA quick_check`` and be empty or an Optuna database (a new
    one needs a writable folder); a database server must accept one connection (10 s
    timeout for PostgreSQL); an existing journal file must be readable. Nothing is
    created or changed.
    """
    _check_scheme(url)
    scheme = storage_scheme(url)
    if scheme == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            _check_sqlite_file(path)
        return
    if scheme == "journal":
        path = _journal_file(url)
        if path.is_dir():
            raise StorageError(f"The journal storage {path} is a folder. Point --storage at a file, e.g. journal:///{path}/optuna.log.")
        if path.exists():
            with storage_errors(url):
                optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))).get_all_studies()
        return
    import sqlalchemy  # deferred, see _parse
    from sqlalchemy.pool import NullPool

    _parse(url)
    with storage_errors(url):
        connect_args = {"connect_timeout": 10} if scheme == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("SELECT 1"))
        finally:
            engine.dispose()


# ----------------------------------------------------------------------------- the study


def open_study(config: ExperimentConfig, on_stale_trial: StaleTrialCallback | None = None) -> optuna.Study:
    """Create or load the study named in ``config`` with its sampler and pruner.

    The RDB storages run a heartbeat, so a trial left running by a killed process is
    failed (and ``on_stale_trial`` called for it) once its grace period has passed, when
    any worker starts or asks for its next trial: the study stays resumable.
    """
    config.out_dir.mkdir(parents=True, exist_ok=True)
    url = config.storage_url
    check_storage(url)  # a damaged database or another program's is refused before Optuna writes to it
    sampler, pruner = make_sampler(config.search), make_pruner(config.search, config.train.epochs)
    storage = make_storage(url, config.search, on_stale_trial)
    directions = ["maximize"] + ["minimize"] * (len(config.search.objectives) - 1)
    try:
        with storage_errors(url):
            study = optuna.create_study(
                study_name=config.search.study_name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                directions=directions,
                load_if_exists=True,
            )
    except ValueError as exc:  # an existing study with other objectives
        raise ConfigError(
            f"Study {config.search.study_name!r} exists with other objectives than {list(config.search.objectives)} ({exc}); "
            f"use a new --study-name or the study's own objectives."
        ) from None
    if len(study.directions) != len(directions):
        raise ConfigError(
            f"Study {config.search.study_name!r} has {len(study.directions)} objective(s) but search.objectives lists "
            f"{list(config.search.objectives)}; use a new --study-name or the study's own objectives."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study


def reader_storage_url(storage: str | None, run_dir: str | None, study_name: str) -> str:
    """The storage of a study to read: the URL ``storage`` (``env:NAME`` allowed), else ``<run_dir>/optuna.db``
    (default run folder ``runs/<study_name>``); a missing database is a :class:`NasError` saying what to pass."""
    url = resolve_url(storage, "--storage")
    if url is not None:
        return url
    db = (Path(run_dir) if run_dir else Path("runs") / study_name) / "optuna.db"
    if not db.is_file():
        raise NasError(f"No study database at {db}. Pass --run-dir (the search's --out folder) or --storage URL.")
    return f"sqlite:///{db.resolve()}"


def load_existing_study(url: str, study_name: str) -> optuna.Study:
    """The existing study ``study_name`` at ``url``, for reading (``nas results``, ``nas export``, ``nas report``).

    The storage is checked first (:func:`check_storage`) and opened without heartbeats;
    an unusable storage is a :class:`~nas.errors.StorageError`, a missing study a
    :class:`~nas.errors.NasError` listing the studies there.
    """
    check_storage(url)
    path = _sqlite_file(url) or (_journal_file(url) if storage_scheme(url) == "journal" else None)
    if path is not None and not path.exists():
        absolute = f"sqlite:////{path}" if url.startswith("sqlite:") else f"journal:///{path}"
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()}; for an absolute path write {absolute})"
        raise NasError(f"No study database at {path}{relative}. Pass the search's --storage URL, or --run-dir (its --out folder).")
    storage = make_storage(url, None)
    with storage_errors(url):
        try:
            return optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            names = optuna.get_all_study_names(storage)
    raise NasError(f"No study named {study_name!r} in {mask_url(url)}. Studies there: {', '.join(names) or 'none'}.")
