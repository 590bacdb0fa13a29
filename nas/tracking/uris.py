"""Checking an MLflow tracking URI before MLflow sees it, so that a typo is one clear error, not a traceback."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from nas.errors import ConfigError
from nas.secrets import mask_url, resolve_url

__all__ = ["TRACKING_URI_FORMS", "check_tracking_uri", "probe_database"]

#: The tracking URIs this project accepts, as told to a user who mistyped one.
TRACKING_URI_FORMS = (
    "sqlite:///PATH (a file: sqlite:////abs/path.db or sqlite:///relative.db), "
    "postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (likewise mysql://, mssql://, with an optional +driver), "
    "http://HOST:PORT or https://HOST[:PORT] (an MLflow tracking server), or env:NAME (the URI in the environment variable NAME)"
)
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str | None, what: str = "tracking.uri (--tracking-uri)") -> str:
    """The usable tracking URI of ``uri`` (``env:NAME`` resolved), or :class:`ConfigError`.

    The error names the URI with its password masked and lists :data:`TRACKING_URI_FORMS`.
    Whether the store can be reached is not checked here (see ``MlflowTracker``).
    """
    resolved = resolve_url(uri, what)
    if not resolved:
        raise ConfigError(f"{what} is empty. Use one of: {TRACKING_URI_FORMS}.")
    shown = mask_url(resolved)
    head = resolved.partition(":")[0] if ":" in resolved else ""
    scheme = head.split("+")[0].lower() if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", head) else ""
    problem = None
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(resolved)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            problem = str(exc)
        else:
            if not parts.hostname:
                problem = "it names no host"
    elif scheme in _DATABASES:
        if scheme == "sqlite" and (not resolved.startswith("sqlite:///") or len(resolved) == len("sqlite:///")):
            problem = "a SQLite store is sqlite:/// followed by a file path (three slashes, then the path)"
        else:
            try:
                make_url(resolved)
            except (ArgumentError, ValueError) as exc:
                problem = f"it is not a valid database URL ({exc})"
    else:
        problem = f"the scheme {scheme!r} is not a tracking store" if scheme else "it has no scheme (such as sqlite:/// or http://)"
    if problem:
        raise ConfigError(f"{what} {shown!r} is not a tracking URI this project can use: {problem}. Use one of: {TRACKING_URI_FORMS}.")
    return resolved


def probe_database(uri: str) -> None:
    """One connection attempt to a database server behind a tracking URI (PostgreSQL, MySQL, SQL Server).

    MLflow retries a database it cannot reach for about 100 s before it gives up; this
    raises the driver's error at once instead. A ``sqlite:///`` file or a tracking server
    is not probed.
    """
    scheme = uri.partition(":")[0].split("+")[0].lower()
    if scheme not in _DATABASES or scheme == "sqlite":
        return
    engine = create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()
