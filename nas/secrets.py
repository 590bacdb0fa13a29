"""Passwords in storage and tracking URLs: masked wherever a URL is printed or recorded.

A storage or tracking URL may carry a password (``postgresql://user:PASSWORD@host/db``).
The real URL lives only in memory, where a connection is made; every line printed, every
MLflow param or artifact and every Optuna attribute gets :func:`mask_url`'s form
(``postgresql://user:***@host/db``), and :func:`masked_config_dict` is the config as it
may be recorded.

So that a password never has to be on a command line or in an experiment file, a URL may
be given as ``env:NAME`` (``--storage env:NAS_STORAGE``, ``search.storage: env:NAS_STORAGE``,
likewise ``--tracking-uri`` / ``tracking.uri``): :func:`resolve_url` reads the variable
``NAME`` when the URL is used, and the config, and everything recorded from it, keeps the
text ``env:NAME``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from nas.errors import ConfigError

__all__ = [
    "MASK", "ENV_PREFIX", "mask_url", "mask_text", "is_masked", "has_secret", "resolve_url", "env_name", "masked_config_dict",
    "url_for_child",
]

#: What a password is replaced with.
MASK = "***"
#: The prefix of a URL taken from an environment variable: ``env:NAME``.
ENV_PREFIX = "env:"

# scheme://userinfo@ : the userinfo runs to the last "@" before the path, query or fragment (over-masks, never under-masks)
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# a query parameter whose name says it is a secret: password=, sslpassword=, pwd=, secret=, token=, ...
_QUERY_SECRET = re.compile(r"(?P<name>[?&;][^=&;#\s]*(?:pass|pwd|secret|token)[^=&;#\s]*=)(?P<value>[^&;#\s]*)", re.IGNORECASE)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, password = match.group("userinfo").partition(":")
    if not sep or not password:
        return match.group(0)
    return f"{match.group('head')}{user}:{MASK}@"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; a URL without one is returned unchanged.

    Masks the password of the user info (``postgresql://u:pw@h:5432/db`` ->
    ``postgresql://u:***@h:5432/db``) and the value of query parameters named like a
    secret (``?password=pw``, ``sslpassword``, ``pwd``, ``secret``, ``token``). Never raises;
    ``None`` and non-URL text (a path, ``env:NAME``) pass through.
    """
    if not isinstance(url, str) or not url:
        return url
    masked = _USERINFO.sub(_mask_userinfo, url)
    return _QUERY_SECRET.sub(lambda m: m.group("name") + (MASK if m.group("value") else ""), masked)


def mask_text(text: str) -> str:
    """Every URL inside ``text`` (an error message, a log line) masked with :func:`mask_url`."""
    return mask_url(text)


def has_secret(url: str | None) -> bool:
    """Whether ``url`` carries a password that :func:`mask_url` would hide."""
    return isinstance(url, str) and mask_url(url) != url


def is_masked(url: str | None) -> bool:
    """Whether ``url`` is a recorded, masked URL (its password is ``***``), which cannot be used to connect."""
    return isinstance(url, str) and (f":{MASK}@" in url or re.search(r"[?&;][^=&;]*=" + re.escape(MASK) + r"(?:[&;#]|$)", url) is not None)


def env_name(value: str | None) -> str | None:
    """``NAME`` of an ``env:NAME`` value, else ``None``."""
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return value[len(ENV_PREFIX) :]
    return None


def resolve_url(value: str | None, what: str) -> str | None:
    """The URL ``value`` stands for: ``env:NAME`` -> the variable ``NAME``; any other value itself.

    ``what`` names the setting in errors (``search.storage (--storage)``). Raises
    :class:`ConfigError` for a malformed name, a variable that is unset or empty, and a
    masked URL (one read back from a record, its password replaced by ``***``).
    """
    name = env_name(value)
    if name is not None:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"{what} {value!r}: after 'env:' comes the name of an environment variable (letters, digits, underscores), "
                f"e.g. env:NAS_STORAGE."
            )
        resolved = os.environ.get(name, "")
        if not resolved.strip():
            raise ConfigError(
                f"{what} is {value!r}, but the environment variable {name} is {'empty' if name in os.environ else 'not set'}. "
                f"Set it to the URL (export {name}='postgresql://USER:PASSWORD@HOST:5432/DB') in the environment of this "
                f"command, or pass the URL itself."
            )
        value = resolved.strip()
    if is_masked(value):
        raise ConfigError(
            f"{what} {value!r} is a recorded URL whose password was masked: it cannot be used to connect. Pass the real URL, "
            f"best from an environment variable (env:NAME, e.g. --storage env:NAS_STORAGE or --tracking-uri env:NAS_TRACKING_URI)."
        )
    return value


def url_for_child(given: str | None, resolved: str, variable: str, env: dict[str, str]) -> str:
    """How a child process's config file names a URL without holding its password.

    ``given`` is the configured value (``env:NAME`` or a URL), ``resolved`` the URL it stands
    for. An ``env:NAME`` value is kept (the child inherits ``NAME``); a URL with a password is
    put in ``env[variable]`` (the child's environment) and named as ``env:<variable>``; any
    other URL is written as it is.
    """
    if env_name(given) is not None:
        return str(given)
    if has_secret(resolved):
        env[variable] = resolved
        return ENV_PREFIX + variable
    return resolved


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value)
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_masked(item) for item in value)
    return value


def masked_config_dict(config: Any) -> dict[str, Any]:
    """The plain-mapping form of an experiment config (a dataclass, or its dict) with every URL's password masked.

    This, never the config itself, is what is printed or recorded (MLflow params and
    ``config.yaml``, the Optuna study's ``config`` attribute, ``effective-config.yaml``).
    """
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return _masked(data)
