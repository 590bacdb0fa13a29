"""Locks that let several workers share one study without a scheduler of our own.

* :func:`file_lock`: an exclusive ``fcntl`` lock on a file, for workers on one machine
  (the gallery model and its cache are built by the first worker; the others wait, then
  load what it wrote).
* :func:`study_lock`: serialises "count the study's trials, then ask for a new one"
  across workers so that the study ends with exactly its trial budget. On PostgreSQL it
  is a session-level advisory lock held by the database (workers on many machines); on
  other storages a file lock beside the study (one machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

from nas.search.optuna_setup import storage_errors

__all__ = ["file_lock", "study_lock"]


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _advisory_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"asymnas:{name}".encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(storage_url: str, study_name: str, lock_dir: str | Path) -> Iterator[None]:
    """Exclusive lock named after ``study_name``: a PostgreSQL advisory lock, or a file in ``lock_dir``."""
    if storage_url.startswith("postgresql"):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(storage_url, poolclass=NullPool)
        key = _advisory_key(study_name)
        try:
            with storage_errors(storage_url):  # the server unreachable: one clear error (a lost connection later stays an error)
                conn = engine.connect()
            with conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
        return
    with file_lock(Path(lock_dir) / f".{study_name}.study.lock"):
        yield
