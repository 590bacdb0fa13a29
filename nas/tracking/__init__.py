"""Experiment tracking: one parent run per study, one nested child run per trial.

:class:`Tracker` is the contract the search driver logs through; :class:`MlflowTracker`
logs to MLflow and :class:`NullTracker` does nothing (``tracking.enabled: false``);
:func:`make_tracker` picks one from the config.

Modules: :mod:`~nas.tracking.base` (the contract, :class:`NullTracker`),
:mod:`~nas.tracking.mlflow_tracker` (:class:`MlflowTracker`), :mod:`~nas.tracking.models` (model registration,
files logged to a run; with the tracker, the only code importing mlflow), :mod:`~nas.tracking.journal` (the on-disk journal of records kept
during a tracking outage), :mod:`~nas.tracking.uris` (checking a tracking URI).
"""

from __future__ import annotations

from nas.tracking.base import RUN_STATUS, NullTracker, Tracker, flatten, mlflow_key
from nas.tracking.journal import JOURNAL_DIR, Journal
from nas.tracking.mlflow_tracker import MlflowTracker, make_tracker
from nas.tracking.models import log_run_artifacts, register_onnx_model
from nas.tracking.uris import TRACKING_URI_FORMS, check_tracking_uri

__all__ = [
    "Tracker", "MlflowTracker", "NullTracker", "make_tracker", "mlflow_key", "flatten", "register_onnx_model", "log_run_artifacts", "RUN_STATUS",
    "Journal", "JOURNAL_DIR", "check_tracking_uri", "TRACKING_URI_FORMS",
]
