"""The tracking contract: :class:`Tracker` (what the search logs through), :class:`NullTracker`
(tracking off), the run status of each trial state, and the naming helpers."""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from nas.records import TrialRecord

__all__ = ["Tracker", "NullTracker", "RUN_STATUS", "mlflow_key", "flatten", "Log"]

Log = Callable[[str], None]

#: Trial state (ours) -> MLflow run status. A failed trial is never FINISHED.
RUN_STATUS = {
    "complete": "FINISHED",
    "inherited": "FINISHED",
    "infeasible": "FINISHED",
    "duplicate": "FINISHED",
    "pruned": "KILLED",
    "interrupted": "KILLED",
    "failed": "FAILED",
}

def mlflow_key(name: str) -> str:
    """Metric names as MLflow accepts them: ``R@1`` -> ``R_at_1``, ``mAP@R`` -> ``mAP_at_R``."""
    return name.replace("@", "_at_")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> ``{"a.b.c": "value"}`` with values as strings (lists as JSON)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple, Mapping)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


class Tracker(abc.ABC):
    """What the search logs to a tracking store: a parent run per study, a child run per trial.

    Run ids are strings (``""`` when nothing is tracked). ``seconds`` accumulates the
    wall-clock seconds spent tracking, so the driver can report the overhead. The logging
    calls do not raise when the store goes away during a search: the records are kept and
    logged later (:meth:`flush`).
    """

    #: Seconds spent tracking so far.
    seconds: float = 0.0

    @abc.abstractmethod
    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Log params, metrics (at ``step``) and tags to run ``run_id``."""

    @abc.abstractmethod
    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` of run ``run_id``."""

    @abc.abstractmethod
    def log_artifact(self, run_id: str, path: str | Path) -> None:
        """Store the file ``path`` as an artifact of run ``run_id``."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Log whatever was kept while the store was unreachable; raises if it still is."""

    @abc.abstractmethod
    def start_study(self, study: optuna.Study, params: Mapping[str, Any], tags: Mapping[str, Any], texts: Mapping[str, str]) -> str:
        """Create (or, on resume, reopen) the study's parent run, log its description; returns its id."""

    @abc.abstractmethod
    def end_study(self, run_id: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> None:
        """Log the study's final metrics and tags and close its parent run with ``status``."""

    @abc.abstractmethod
    def start_trial(self, parent_id: str, trial: optuna.Trial) -> str:
        """Create the trial's child run under ``parent_id``, store its id on the trial; returns it."""

    @abc.abstractmethod
    def start_baseline(self, parent_id: str, study_name: str, name: str, role: str = "baseline") -> str:
        """Create the child run of hand-designed baseline ``name`` (or, with another ``role``, e.g.
        ``supernet``, of that step of the study); returns its id."""

    @abc.abstractmethod
    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Log final metrics, record the trial ``state`` (see :data:`RUN_STATUS`) and ``reason``, close the run."""

    @abc.abstractmethod
    def reconcile(self, study: optuna.Study) -> int:
        """Close runs left open by a crashed process whose trial is no longer running; returns how many."""

    def close_stale_steps(self, parent_id: str, role: str, reason: str) -> int:
        """Close ``parent_id``'s child runs of step ``role`` (e.g. ``supernet``) left RUNNING by a process that died,
        as ``interrupted`` with ``reason``; only this host's runs, and only while no live process can own one (under the
        step's lock on this host). How many."""
        return 0

    def close_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's heartbeat callback: the trial's process died, so its run is FAILED."""
        self.fail_trial_run(study, trial, "the worker running this trial stopped sending heartbeats (killed or lost)")

    def fail_trial_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str) -> None:
        """The run of a trial whose process died is FAILED with ``reason``. A process killed after the trial was
        created and before its run was opened (or its run's id stored on the trial) left none on record: the run is
        then found by its trial number, or created, so that every trial has exactly one run (:meth:`missing_run`)."""
        run_id = TrialRecord.from_trial(trial).mlflow_run_id
        if run_id is not None:
            self.end_trial(run_id, "failed", reason)
        else:
            self.missing_run(study, trial, "failed", reason)

    def missing_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: str, reason: str) -> bool:
        """Close (as ``state``) the run of a finished ``trial`` that does not name its run, or create one closed;
        whether a run was closed or created."""
        return False


class NullTracker(Tracker):
    """Tracking switched off (``tracking.enabled: false``): every call does nothing, run ids are ``""``."""

    uri = None
    seconds = 0.0

    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        pass

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        pass

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        pass

    def flush(self) -> None:
        pass

    def start_study(self, study: optuna.Study, params: Mapping[str, Any], tags: Mapping[str, Any], texts: Mapping[str, str]) -> str:
        return ""

    def end_study(self, run_id: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> None:
        pass

    def start_trial(self, parent_id: str, trial: optuna.Trial) -> str:
        return ""

    def start_baseline(self, parent_id: str, study_name: str, name: str, role: str = "baseline") -> str:
        return ""

    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        pass

    def reconcile(self, study: optuna.Study) -> int:
        return 0
