"""A study database that stops answering during a search: one clear error that says the study is intact and how to resume.

The storage's own errors (SQLAlchemy's ``OperationalError`` for a server that went away or
refuses new connections, ``InterfaceError`` for a connection closed under it) and the
:class:`~nas.errors.StorageError` of a lock that cannot reconnect become one
:class:`StorageError`. Every finished trial was told to the database when it finished and
stays finished; the trial that was running is failed and retried when the search resumes.
"""

from __future__ import annotations

import optuna
import sqlalchemy.exc

from nas.errors import StorageError
from nas.secrets import mask_url

__all__ = ["STORAGE_LOST", "is_storage_lost", "storage_lost"]

#: What a search's storage raises when its database stops answering.
STORAGE_LOST: tuple[type[BaseException], ...] = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, StorageError)


def is_storage_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the study database stopped answering: one of :data:`STORAGE_LOST`, or Optuna's
    ``StorageInternalError`` raised for one (a commit that failed on a lost connection)."""
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        exc = exc.__cause__ or exc
    return isinstance(exc, STORAGE_LOST)


def storage_lost(url: str, study_name: str, exc: BaseException) -> StorageError:
    """The error to raise for ``exc`` (:func:`is_storage_lost`), raised while a search on ``url`` ran."""
    if isinstance(exc, optuna.exceptions.StorageInternalError):
        exc = exc.__cause__ or exc
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = lines[0] if lines else type(cause).__name__
    return StorageError(
        f"The study database {mask_url(url)} stopped answering during the search ({reason}). Study {study_name!r} is intact: "
        f"every trial that finished is stored and stays finished, and the trial that was running is marked failed and "
        f"retried when the search resumes. Once the database answers again, run the same command to resume."
    )
