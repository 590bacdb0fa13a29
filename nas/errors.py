"""User-facing errors.

Every error a user can cause (a bad config, missing data, a budget nothing can meet, a
broken checkpoint) is raised as a :class:`NasError` with a message that says what was
wrong and how to fix it. The CLI prints the message and exits with status 2 instead of
showing a traceback.
"""

from __future__ import annotations

__all__ = ["NasError", "ConfigError", "DataError", "GalleryError", "BudgetError", "TrainingError", "StorageError"]


class NasError(Exception):
    """Base class of the errors that are the user's to fix."""


class ConfigError(NasError, ValueError):
    """The experiment file or a command-line flag is invalid."""


class DataError(NasError):
    """The data set is missing, unreadable or in the wrong layout."""


class GalleryError(NasError):
    """The gallery checkpoint is unreadable or does not match the configuration."""


class BudgetError(NasError):
    """A hardware budget cannot be met by any architecture of the search space."""


class TrainingError(NasError):
    """Training a candidate diverged (for example a NaN loss); the trial fails, the study goes on."""


class StorageError(NasError):
    """The study database (the Optuna storage) is unreachable or unreadable, or its URL is malformed."""
