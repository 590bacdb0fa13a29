"""Secrets (passwords in storage and tracking URLs, tokens): masked wherever anything is printed or recorded.

A storage or tracking URL may carry a password (``postgresql://user:PASSWORD@host/db``).
The real URL lives only in memory, where a connection is made; every line printed, every
MLflow param or artifact and every Optuna attribute gets :func:`mask_url`'s form
(``postgresql://user:***@host/db``), and :func:`masked_config_dict` is the config as it
may be recorded. A password may hold any character: it is masked up to the last ``@``.
Each password the process resolves or prints is remembered, as are the values of
environment variables named like a secret (``MLFLOW_TRACKING_PASSWORD``, ``PGPASSWORD``):
:func:`mask_text` hides them, raw or percent-encoded, in any message, such as a
database driver's that quotes only the password or a piece of it.

So that a password never has to be on a command line or in an experiment file, a URL may
be given as ``env:NAME`` (``--storage env:NAS_STORAGE``, ``search.storage: env:NAS_STORAGE``,
likewise ``--tracking-uri`` / ``tracking.uri``): :func:`resolve_url` reads the variable
``NAME`` when the URL is used, and the config, and everything recorded from it, keeps the
text ``env:NAME``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import traceback
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from nas.errors import ConfigError

__all__ = [
    "MASK", "ENV_PREFIX", "mask_url", "mask_text", "mask_value", "remember_secret", "is_masked", "has_secret", "resolve_url",
    "env_name", "masked_config_dict", "url_for_child", "mask_process_output",
]

#: What a password is replaced with.
MASK = "***"
#: The prefix of a URL taken from an environment variable: ``env:NAME``.
ENV_PREFIX = "env:"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# one URL: the password runs from the first ":" of the user info to the LAST "@" (raw "@", "/", "#", "?", spaces
# included): over-masks a URL with an "@" in its query, never under-masks
_URL_USERINFO = re.compile(rf"(?P<head>^\s*{_SCHEME})(?P<user>[^:/?#@]*):(?P<password>.*)@", re.DOTALL)
# a URL inside a longer text: the same, within one run of non-blank characters
_TEXT_USERINFO = re.compile(rf"(?P<head>{_SCHEME})(?P<user>[^:/?#@\s]*):(?P<password>\S*)@")
# how SQLAlchemy and libpq split a URL: the password ends at the FIRST "@", the rest up to "/" is the host
_FIRST_AT = re.compile(rf"^\s*{_SCHEME}(?P<user>[^:/@]*)(?::(?P<password>[^@]*))?@(?P<host>[^/?#]*)", re.DOTALL)
_SECRET_WORD = (
    r"[A-Za-z0-9_.\-]*(?:passw(?:or)?d|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)"
    r"[A-Za-z0-9_.\-]*"
)
# NAME=VALUE where the name says it is a secret: a URL's query (?password=, sslpassword=, token=), a libpq
# connection string (password=... host=...), an environment assignment (MLFLOW_TRACKING_PASSWORD=...)
_NAMED_SECRET = re.compile(
    rf"(?P<name>(?<![A-Za-z0-9_]){_SECRET_WORD}\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^&;#\s'\"]*)",
    re.IGNORECASE,
)
# an environment variable whose value is a secret (not PWD, the working folder)
_SECRET_VARIABLE = re.compile(r"PASSW|PASSPHRASE|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL|(?:^|_)PASS(?:$|_)", re.IGNORECASE)
_NOT_SECRETS = {"", "0", "1", "true", "false", "yes", "no", "none", "null", MASK}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# every secret this process has seen (a password of a URL it resolved or printed), in each form it may be quoted in
_known: set[str] = set()
_pattern: tuple[frozenset[str], re.Pattern[str] | None] = (frozenset(), None)


def _forms(secret: str) -> set[str]:
    """``secret`` as a message may quote it: raw, percent-decoded and -encoded, and escaped as repr/JSON do."""
    forms = set()
    for text in {secret, unquote(secret)}:
        forms |= {text, quote(text, safe=""), quote(text, safe="!$&'()*+,;=:"), quote_plus(text), repr(text)[1:-1], ascii(text)[1:-1]}
        forms.add(text.encode("unicode_escape").decode("ascii"))
        forms.add(text.replace("\\", "\\\\").replace('"', '\\"'))  # JSON's escaping of ASCII text
    return {form for form in forms if form.strip() and form != MASK}


def remember_secret(secret: str | None) -> None:
    """From now on :func:`mask_text` hides ``secret`` (and its encoded forms) wherever it appears."""
    if isinstance(secret, str) and secret.strip().lower() not in _NOT_SECRETS:
        _known.update(_forms(secret))


def _url_secrets(url: str) -> list[str]:
    """Every string a reader of ``url`` might take for its password: by the last and the first "@", by
    :func:`urllib.parse.urlsplit`, the parts of a password split at a raw "@", and secret-named query values."""
    found = []
    match = _URL_USERINFO.match(url)
    if match and match.group("password"):
        password = match.group("password")
        found += [password, *(piece for piece in password.split("@") if len(piece) >= 3)]
    first = _FIRST_AT.match(url)
    if first and first.group("password"):
        found.append(first.group("password"))
    try:
        found.append(urlsplit(url.strip()).password or "")
    except ValueError:
        pass
    query = url.partition("?")[2]
    found += [value for name, value in parse_qsl(query, keep_blank_values=True) if re.fullmatch(_SECRET_WORD, name, re.IGNORECASE)]
    found += [m.group("value").strip("'\"") for m in _NAMED_SECRET.finditer(url)]
    return [secret for secret in found if secret]


def _remember_url(url: str) -> None:
    for secret in _url_secrets(url):
        remember_secret(secret)


def _environment_secrets() -> None:
    """Remember the values of environment variables named like a secret (MLFLOW_TRACKING_PASSWORD, PGPASSWORD, ...)
    and the passwords of URLs held in any variable."""
    for name, value in os.environ.items():
        if _SECRET_VARIABLE.search(name):
            remember_secret(value)
        if "://" in value and "@" in value:
            _remember_url(value)


def _known_pattern() -> re.Pattern[str] | None:
    global _pattern
    known = frozenset(_known)
    if known != _pattern[0]:
        alternatives = []
        for secret in sorted(known, key=len, reverse=True):  # the longest first: a secret that holds another is hidden whole
            escaped = re.escape(secret) + r"(?![A-Za-z0-9+.\-]*://)"  # not a URL's scheme (a password "postgres")
            # a short secret only where it stands alone, so that a 2-letter password does not blank every word holding it
            alternatives.append(escaped if len(secret) >= 4 else rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])")
        _pattern = (known, re.compile("|".join(alternatives)) if alternatives else None)
    return _pattern[1]


def _mask_userinfo(match: re.Match[str]) -> str:
    if not match.group("password"):
        return match.group(0)
    return f"{match.group('head')}{match.group('user')}:{MASK}@"


def _mask_named(text: str) -> str:
    return _NAMED_SECRET.sub(lambda m: m.group("name") + (MASK if m.group("value").strip("'\"") else m.group("value")), text)


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; a URL without one is returned unchanged.

    Masks the password of the user info (``postgresql://u:pw@h:5432/db`` ->
    ``postgresql://u:***@h:5432/db``) whatever characters it holds: it runs from the first
    ``:`` of the user info to the last ``@`` (a raw ``@``, ``/``, ``#``, ``?`` or space in it
    is hidden too). Also masks the value of query parameters named like a secret
    (``?password=pw``, ``sslpassword``, ``pwd``, ``secret``, ``token``, ``api_key``). The
    secrets found are remembered, so :func:`mask_text` hides them in any later message.
    Never raises; ``None`` and non-URL text (a path, ``env:NAME``) pass through.
    """
    if not isinstance(url, str) or not url:
        return url
    _remember_url(url)
    return _mask_named(_URL_USERINFO.sub(_mask_userinfo, url, count=1))


def mask_text(text: str) -> str:
    """``text`` (an error message, a log line, a recorded value) with every secret hidden.

    Every URL in it gets :func:`mask_url`'s treatment (its password up to the last ``@``
    of the URL's run of non-blank characters), every ``NAME=VALUE`` whose name says it is
    a secret (``password=``, ``token=``, ``MLFLOW_TRACKING_PASSWORD=``) loses its value, and
    every secret this process knows (the password of each URL it resolved or printed, and
    the values of environment variables named like a secret) is replaced by ``***``
    wherever it appears, raw, percent-encoded or -decoded, or escaped: a driver's message
    that quotes only the password, or a piece of it, shows none of it.
    """
    if not isinstance(text, str) or not text:
        return text
    _environment_secrets()
    for match in _TEXT_USERINFO.finditer(text):
        _remember_url(match.group(0))
    masked = _mask_named(_TEXT_USERINFO.sub(_mask_userinfo, text))
    pattern = _known_pattern()
    return pattern.sub(MASK, masked) if pattern is not None else masked


def mask_value(value: Any) -> Any:
    """``value`` (a string, or a mapping or sequence of them) with :func:`mask_text` applied to every string, and the
    value of every key named like a secret (``password``, ``token``) masked."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {
            key: MASK if isinstance(key, str) and re.fullmatch(_SECRET_WORD, key, re.IGNORECASE) and isinstance(item, str) and item
            else mask_value(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(mask_value(item) for item in value)
    return value


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


def _reject_raw_at(url: str, what: str, variable: str | None) -> None:
    """A :class:`ConfigError` when the user info of ``url`` holds a raw "@": SQLAlchemy and libpq end the password at
    the first "@" and would take the rest of it for the host (a connection to the wrong host, an error quoting it)."""
    first = _FIRST_AT.match(url)
    if first is None or "@" not in first.group("host"):
        return
    source = f"the URL in {variable}" if variable else repr(mask_url(url))
    raise ConfigError(
        f"{what}: the user name or password of {source} holds a raw '@', which would end it there and make the rest the "
        f"host name. Percent-encode the password: '@' as %40 (likewise ':' %3A, '/' %2F, '?' %3F, '#' %23, '%' %25, "
        f"a space %20), e.g. with python3 -c \"import urllib.parse, getpass; print(urllib.parse.quote(getpass.getpass(), safe=''))\"."
    )


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
    if isinstance(value, str):
        _remember_url(value)
        _reject_raw_at(value, what, name)
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


def masked_config_dict(config: Any) -> dict[str, Any]:
    """The plain-mapping form of an experiment config (a dataclass, or its dict) with every secret masked (:func:`mask_value`).

    This, never the config itself, is what is printed or recorded (MLflow params and
    ``config.yaml``, the Optuna study's ``config`` attribute, ``effective-config.yaml``).
    """
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return mask_value(data)


class _MaskingRecords:
    """A logging record factory that masks each record's message (and its traceback) as it is made."""

    def __init__(self, make: Any) -> None:
        self.make = make

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's to report
            return record
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = mask_text("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record


class _MaskingStream:
    """``sys.stdout`` or ``sys.stderr`` with :func:`mask_text` applied to every string written; all else is the stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(mask_text(text) if isinstance(text, str) else text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _masking_excepthook(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    sys.stderr.write(mask_text("".join(traceback.format_exception(kind, exc, tb))))


def mask_process_output() -> None:
    """Mask everything this process prints: the lines written to ``sys.stdout`` and ``sys.stderr``, the records of
    :mod:`logging` (ours, Optuna's, MLflow's, SQLAlchemy's, whatever stream their handlers hold) and the traceback of
    an unexpected error."""
    if not isinstance(logging.getLogRecordFactory(), _MaskingRecords):
        logging.setLogRecordFactory(_MaskingRecords(logging.getLogRecordFactory()))
    sys.excepthook = _masking_excepthook
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _MaskingStream):
            setattr(sys, name, _MaskingStream(stream))
