"""Experiment tracking: one parent run per study, one nested child run per trial.

:class:`Tracker` is the contract the search driver logs through; :class:`MlflowTracker`
logs to MLflow and :class:`NullTracker` does nothing (``tracking.enabled: false``);
:func:`make_tracker` picks one from the config.

This is the only module that imports mlflow. It uses an explicit ``MlflowClient`` and
batched logging (no active-run global). The parent run id is stored on the Optuna study
and each child run id on its trial (user attr ``mlflow_run_id``, through
:mod:`nas.records`), so a resumed study finds its runs again.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from nas.errors import NasError
from nas.records import StudyRecord, StudyWriter, TrialRecord, TrialWriter

if TYPE_CHECKING:
    from nas.config import ExperimentConfig

__all__ = ["Tracker", "MlflowTracker", "NullTracker", "make_tracker", "mlflow_key", "flatten", "register_onnx_model", "RUN_STATUS"]

Log = Callable[[str], None]

#: Trial state (ours) -> MLflow run status. A failed trial is never FINISHED.
RUN_STATUS = {
    "complete": "FINISHED",
    "infeasible": "FINISHED",
    "duplicate": "FINISHED",
    "pruned": "KILLED",
    "interrupted": "KILLED",
    "failed": "FAILED",
}

_BATCH = 100  # MLflow's per-request limit for params and tags (metrics: 1000)


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


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    def start_baseline(self, parent_id: str, study_name: str, name: str) -> str:
        """Create the child run of hand-designed baseline ``name``; returns its id."""

    @abc.abstractmethod
    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Log final metrics, record the trial ``state`` (see :data:`RUN_STATUS`) and ``reason``, close the run."""

    @abc.abstractmethod
    def reconcile(self, study: optuna.Study) -> int:
        """Close runs left open by a crashed process whose trial is no longer running; returns how many."""

    def close_stale_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's heartbeat callback: the trial's process died, so its run is FAILED."""
        run_id = TrialRecord.from_trial(trial).mlflow_run_id
        if run_id is not None:
            self.end_trial(run_id, "failed", "the worker running this trial stopped sending heartbeats (killed or lost)")


class MlflowTracker(Tracker):
    """Logs a study to an MLflow tracking store (``sqlite:///...`` or ``http://host:port``).

    The store must be reachable when the tracker is created (otherwise a :class:`NasError`
    names the URI). If it becomes unreachable during the search, every record is kept in
    order and logged once it is back (retried at most every ``retry_seconds``); the search
    goes on and ``log`` tells the user. ``seconds`` accumulates the time spent tracking.
    """

    def __init__(
        self, uri: str, experiment: str, artifact_dir: str | Path | None = None, log: Log = print, retry_seconds: float = 30.0
    ) -> None:
        # fail fast instead of MLflow's long default HTTP retry schedule (a user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        import mlflow  # deferred: a heavy optional library, imported only when tracking is on
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._entities = (Metric, Param, RunTag)
        self.uri = uri
        self._log = log
        self.retry_seconds = retry_seconds
        self.backlog: list[Callable[[], None]] = []
        self.seconds = 0.0
        self._ids: dict[str, str] = {}  # placeholder id of a run created while unreachable -> real id
        self._next_retry = 0.0
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                # a local store keeps artifacts beside it; a tracking server decides where they go
                local = not uri.startswith(("http://", "https://"))
                location = Path(artifact_dir).resolve().as_uri() if artifact_dir and local else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except mlflow.exceptions.MlflowException as exc:
            raise NasError(
                f"Cannot use the MLflow tracking store at {uri}: {exc}. Check tracking.uri (or --tracking-uri), "
                f"start the tracking server, or disable tracking with tracking.enabled: false."
            ) from None
        except Exception as exc:  # connection errors surface as requests / sqlalchemy exceptions
            raise NasError(
                f"Cannot reach the MLflow tracking store at {uri}: {type(exc).__name__}: {exc}. Start the tracking server, "
                f"fix tracking.uri (or --tracking-uri), or disable tracking with tracking.enabled: false."
            ) from None

    # ------------------------------------------------------------------ resilience
    def _resolve(self, run_id: str) -> str:
        return self._ids.get(run_id, run_id)

    def flush(self) -> None:
        """Log what was kept while the store was unreachable; raises if it still is."""
        if not self.backlog:
            return
        done = 0
        while self.backlog:
            self.backlog[0]()
            self.backlog.pop(0)
            done += 1
        self._log(f"Tracking: the MLflow store at {self.uri} is reachable again; logged {done} kept record(s).")

    def _guard(self, action: Callable[[], Any], what: str) -> Any:
        """Run ``action`` now, or keep it (in order) for later when the store is unreachable."""
        start = time.perf_counter()
        try:
            if self.backlog:
                if time.monotonic() < self._next_retry:
                    self.backlog.append(action)
                    return None
                try:
                    self.flush()
                except Exception:
                    self._next_retry = time.monotonic() + self.retry_seconds
                    self.backlog.append(action)
                    return None
            try:
                return action()
            except Exception as exc:
                self.backlog.append(action)
                self._next_retry = time.monotonic() + self.retry_seconds
                self._log(
                    f"Tracking: cannot log {what} to the MLflow store at {self.uri} ({type(exc).__name__}: {str(exc)[:200]}). "
                    f"The search goes on; this and later records are kept and logged when the store is back."
                )
                return None
        finally:
            self.seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ low level
    def _log_now(self, run_id: str, params: Mapping[str, Any] | None, metrics: Mapping[str, float] | None, tags: Mapping[str, Any] | None, step: int, now: int) -> None:
        Metric, Param, RunTag = self._entities
        run_id = self._resolve(run_id)
        param_list = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        metric_list = [Metric(mlflow_key(k), float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        tag_list = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for chunk in _chunks(param_list, _BATCH):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(tag_list, _BATCH):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(metric_list, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Batched logging of params, metrics (at ``step``) and tags to one run."""
        now = int(time.time() * 1000)  # the time of the event, also when it is logged later
        params, metrics, tags = dict(params or {}), dict(metrics or {}), dict(tags or {})
        self._guard(lambda: self._log_now(run_id, params, metrics, tags, step, now), "metrics and params")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._guard(lambda: self.client.log_text(self._resolve(run_id), text, artifact_file), f"artifact {artifact_file}")

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self._guard(lambda: self.client.log_artifact(self._resolve(run_id), str(path)), f"artifact {Path(path).name}")

    # ------------------------------------------------------------------ study
    def start_study(self, study: optuna.Study, params: Mapping[str, Any], tags: Mapping[str, Any], texts: Mapping[str, str]) -> str:
        """Create (or, on resume, reopen) the study's parent run and log its description."""
        run_id = StudyRecord.load(study).mlflow_parent_run_id
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:
                run_id = None  # the tracking store was replaced; start a new parent run
        run = self.client.create_run(
            self.experiment_id, run_name=f"study:{study.study_name}", tags={"asymnas.role": "study", "optuna.study_name": study.study_name}
        )
        run_id = run.info.run_id
        StudyWriter(study).parent_run(run_id)
        self.log(run_id, params=params, tags=tags)
        for name, text in texts.items():
            self.log_text(run_id, text, name)
        return run_id

    def end_study(self, run_id: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, Any] | None = None, status: str = "FINISHED") -> None:
        self.log(run_id, metrics=metrics, tags=tags)
        self._guard(lambda: self.client.set_terminated(self._resolve(run_id), status=status), "the end of the study")
        if self.backlog:
            try:
                self.flush()
            except Exception:
                self._log(
                    f"Tracking: {len(self.backlog)} record(s) could not be logged to {self.uri} before the search ended; "
                    f"the Optuna study holds every trial's results ('nas results')."
                )

    # ------------------------------------------------------------------ trials
    def start_trial(self, parent_id: str, trial: optuna.Trial) -> str:
        """Create the trial's child run under ``parent_id`` and store its id on the trial.

        While the store is unreachable the run is created later; the trial then holds a
        placeholder id, and the run is found by its ``optuna.trial_number`` tag.
        """
        tags = {
            "mlflow.parentRunId": self._resolve(parent_id),
            "asymnas.role": "trial",
            "optuna.study_name": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
            "asymnas.state": "running",
            "asymnas.host": socket.gethostname(),
            "asymnas.worker": f"{socket.gethostname()}-{os.getpid()}",
        }
        placeholder = f"pending-{trial.study.study_name}-{trial.number}"

        def create() -> str:
            tags["mlflow.parentRunId"] = self._resolve(parent_id)
            run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
            self._ids[placeholder] = run.info.run_id
            return run.info.run_id

        run_id = self._guard(create, f"the run of trial {trial.number}") or placeholder
        TrialWriter(trial).mlflow_run(run_id)
        return run_id

    def start_baseline(self, parent_id: str, study_name: str, name: str) -> str:
        """Create the child run of hand-designed baseline ``name`` (tagged ``asymnas.role=baseline``)."""
        tags = {
            "mlflow.parentRunId": self._resolve(parent_id),
            "asymnas.role": "baseline",
            "asymnas.baseline": "true",
            "optuna.study_name": study_name,
            "asymnas.state": "running",
            "asymnas.host": socket.gethostname(),
        }
        placeholder = f"pending-{study_name}-baseline-{name}"

        def create() -> str:
            tags["mlflow.parentRunId"] = self._resolve(parent_id)
            run = self.client.create_run(self.experiment_id, run_name=f"baseline:{name}", tags=tags)
            self._ids[placeholder] = run.info.run_id
            return run.info.run_id

        return self._guard(create, f"the run of baseline {name}") or placeholder

    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Log final metrics, tag the state (and reason) and close the run with the matching status."""
        tags = {"asymnas.state": state}
        if reason:
            tags["asymnas.reason"] = reason
        self.log(run_id, metrics=metrics, tags=tags)
        self._guard(lambda: self.client.set_terminated(self._resolve(run_id), status=RUN_STATUS[state]), f"the end of run {run_id}")

    def reconcile(self, study: optuna.Study) -> int:
        """Close child runs left RUNNING by a crashed process whose trial is no longer running.

        Returns how many runs were closed.
        """
        closed = 0
        states = (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for trial in study.get_trials(deepcopy=False, states=states):
            run_id = TrialRecord.from_trial(trial).mlflow_run_id
            if run_id is None:
                continue
            try:
                run = self.client.get_run(run_id)
            except Exception:
                continue
            if run.info.status == "RUNNING":
                state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
                self.end_trial(run_id, state, reason="the process running this trial stopped before closing its run")
                closed += 1
        return closed

    def child_runs(self, parent_id: str) -> list[Any]:
        """All child runs of ``parent_id`` (used by tests and reports)."""
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs


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

    def start_baseline(self, parent_id: str, study_name: str, name: str) -> str:
        return ""

    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        pass

    def reconcile(self, study: optuna.Study) -> int:
        return 0


def make_tracker(config: ExperimentConfig, log: Log = print) -> Tracker:
    """The tracker of ``config``: a :class:`NullTracker` when ``tracking.enabled`` is false, else an
    :class:`MlflowTracker` on ``config.tracking_uri`` (experiment ``tracking.experiment``, default the
    study name; a local store keeps artifacts in ``<out>/mlartifacts``)."""
    if not config.tracking.enabled:
        return NullTracker()
    return MlflowTracker(config.tracking_uri, config.tracking.experiment or config.search.study_name, config.out_dir / "mlartifacts", log=log)


def register_onnx_model(uri: str, run_id: str, onnx_path: str | Path, name: str, tags: Mapping[str, Any]) -> str:
    """Log ``onnx_path`` as an MLflow model in run ``run_id`` and register it as ``name``.

    The model registry gets a new version of ``name`` with ``tags`` (budgets and metrics);
    it loads back with ``mlflow.onnx.load_model(f"models:/{name}/{version}")`` or as a
    pyfunc. Returns the version.
    """
    import mlflow  # deferred: heavy optional libraries, needed only when a model is registered
    import onnx

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="query_model", registered_model_name=name)
        client.set_terminated(run_id, status=status)  # keep the trial's own status
    finally:
        mlflow.set_tracking_uri(previous)
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, mlflow_key(key), str(value))
    return version
