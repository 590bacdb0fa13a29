"""Tracking to MLflow: :class:`MlflowTracker`, :func:`make_tracker` and :func:`register_onnx_model`.

The only code that imports mlflow (deferred: a heavy library, loaded only when tracking
is on). It uses an explicit ``MlflowClient`` and batched logging (no active-run global).
The parent run id is stored on the Optuna study and each child run id on its trial (user
attr ``mlflow_run_id``, through :mod:`nas.records`), so a resumed study finds its runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from nas.errors import NasError
from nas.records import StudyRecord, StudyWriter, TrialRecord, TrialWriter
from nas.secrets import mask_text, mask_url, mask_value
from nas.tracking.base import RUN_STATUS, Log, NullTracker, Tracker, mlflow_key
from nas.tracking.journal import Journal, Record
from nas.tracking.uris import check_tracking_uri, probe_database

if TYPE_CHECKING:
    from nas.config import ExperimentConfig

__all__ = ["MlflowTracker", "make_tracker", "run_key", "PENDING", "RUN_KEY_TAG"]

_BATCH = 100  # MLflow's per-request limit for params and tags (metrics: 1000)
#: The prefix of the run id a trial holds while its run waits to be created (the store was unreachable).
PENDING = "pending-"
#: The tag that finds a run again from its placeholder id (a hash of it), so that creating a run twice is harmless.
RUN_KEY_TAG = "asymnas.run_key"
#: MLflow error codes that mean the store answered and will never accept the record: it is dropped, not retried.
_REFUSED = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE"})


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_key(placeholder: str) -> str:
    """The tag value (RUN_KEY_TAG) that finds the run created for a placeholder id once the journal is replayed."""
    return hashlib.sha256(placeholder.encode()).hexdigest()[:24]


def _now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTracker(Tracker):
    """Logs a study to an MLflow tracking store (``sqlite:///...``, ``postgresql://...`` or ``http://host:port``).

    ``uri`` may be ``env:NAME``; a malformed one is a :class:`~nas.errors.ConfigError`, and a
    store that cannot be reached when the tracker is made is a :class:`NasError`, both naming
    the URI with its password masked. If the store becomes unreachable during the search,
    every record is kept in order (in memory, and with ``journal_dir`` in a journal file
    there, see :mod:`nas.tracking.journal`) and logged once it is back (retried at most
    every ``retry_seconds``); the search goes on and ``log`` tells the user. Made with
    ``journal_dir``, the tracker first replays the journals that dead processes left there
    for the same store, in order. ``seconds`` accumulates the time spent tracking.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_dir: str | Path | None = None,
        log: Log = print,
        retry_seconds: float = 30.0,
        journal_dir: str | Path | None = None,
    ) -> None:
        # fail fast instead of MLflow's long default HTTP retry schedule (a user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri = check_tracking_uri(uri)  # the real URI, kept in memory only
        self.shown_uri = mask_url(self.uri)  # what is printed
        import mlflow  # deferred: a heavy optional library, imported only when tracking is on
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._entities = (Metric, Param, RunTag)
        self._log = log
        self.retry_seconds = retry_seconds
        self.journal = Journal(journal_dir, self.shown_uri, log)
        self.seconds = 0.0
        self._ids: dict[str, str] = {}  # placeholder id of a run created while unreachable -> real id
        self._next_retry = 0.0
        try:
            probe_database(self.uri)  # an unreachable database: an error now, not after MLflow's 100 s of retries
            self.client = MlflowClient(tracking_uri=self.uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                # a local store keeps artifacts beside it; a tracking server decides where they go
                local = not self.uri.startswith(("http://", "https://"))
                location = Path(artifact_dir).resolve().as_uri() if artifact_dir and local else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except mlflow.exceptions.MlflowException as exc:
            raise NasError(
                f"Cannot use the MLflow tracking store at {self.shown_uri}: {mask_text(str(exc))}. Check tracking.uri (or "
                f"--tracking-uri), start the tracking server, or disable tracking with tracking.enabled: false."
            ) from None
        except Exception as exc:  # connection errors surface as requests / sqlalchemy exceptions
            raise NasError(
                f"Cannot reach the MLflow tracking store at {self.shown_uri}: {type(exc).__name__}: {mask_text(str(exc))}. Start the "
                f"tracking server, fix tracking.uri (or --tracking-uri), or disable tracking with tracking.enabled: false."
            ) from None
        if journal_dir is not None:
            self._replay_orphans(journal_dir)

    @property
    def backlog(self) -> list[tuple[int, Record]]:
        """The records kept while the store was unreachable, oldest first (``(sequence number, record)``)."""
        return self.journal.pending

    # ------------------------------------------------------------------ applying records
    def _find(self, placeholder: str) -> str | None:
        """The id of the run created for ``placeholder`` (by its :data:`RUN_KEY_TAG`), or ``None``."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key(placeholder)}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    def _resolve(self, run_id: str) -> str:
        if run_id in self._ids:
            return self._ids[run_id]
        if run_id.startswith(PENDING):
            found = self._find(run_id)
            if found is not None:
                self._ids[run_id] = found
                return found
        return run_id

    def _apply(self, record: Record, retry: bool) -> Any:
        """Log one record to the store; ``retry`` (a kept record) first looks for a run an earlier attempt created."""
        op = record["op"]
        if op == "create":
            key = record["key"]
            run_id = self._find(key) if retry else None
            if run_id is None:
                tags = {**record["tags"], "mlflow.parentRunId": self._resolve(record["parent"]), RUN_KEY_TAG: run_key(key)}
                run = self.client.create_run(record["experiment"], start_time=record["time"], run_name=record["name"], tags=tags)
                run_id = run.info.run_id
            self._ids[key] = run_id
            return run_id
        run_id = self._resolve(record["run"])
        if op == "log":
            Metric, Param, RunTag = self._entities
            params = [Param(k, v) for k, v in record["params"].items()]
            metrics = [Metric(k, v, record["time"], record["step"]) for k, v in record["metrics"].items()]
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            for chunk in _chunks(params, _BATCH):
                self.client.log_batch(run_id, params=chunk)
            for chunk in _chunks(tags, _BATCH):
                self.client.log_batch(run_id, tags=chunk)
            for chunk in _chunks(metrics, 1000):
                self.client.log_batch(run_id, metrics=chunk)
        elif op == "text":
            self.client.log_text(run_id, record["text"], record["file"])
        elif op == "artifact":
            if Path(record["path"]).is_file():
                self.client.log_artifact(run_id, record["path"])
            else:
                self._log(f"Tracking: {record['path']} is gone; not logged to run {run_id}.")
        elif op == "end":
            self.client.set_terminated(run_id, status=record["status"], end_time=record["time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        return None

    def _apply_or_drop(self, record: Record, retry: bool) -> Any:
        """:meth:`_apply`; a record the store refuses for good (a deleted run, a changed param) is dropped with a line."""
        try:
            return self._apply(record, retry)
        except Exception as exc:
            if getattr(exc, "error_code", None) not in _REFUSED:
                raise  # unreachable: keep it
            self._log(f"Tracking: the MLflow store refused a {record['op']} record ({mask_text(str(exc))[:200]}); dropped.")
            return None

    # ------------------------------------------------------------------ resilience
    def _replay_orphans(self, directory: str | Path) -> None:
        """Log, in order, the records that processes which died during an outage left in journals in ``directory``.

        If the store goes away meanwhile, the records not yet logged move, in order, to this
        tracker's own journal (and are logged with its backlog).
        """
        down = False
        for orphan in Journal.orphans(directory, self.shown_uri, self._log):
            path, done = orphan.path, 0
            try:
                try:
                    while orphan.pending and not down:
                        seq, record = orphan.pending[0]
                        self._apply_or_drop(record, retry=True)
                        orphan.ack(seq)
                        done += 1
                except Exception as exc:
                    down = True
                    self._log(f"Tracking: the MLflow store at {self.shown_uri} went away while replaying {path} ({type(exc).__name__}).")
                if done:
                    self._log(f"Tracking: logged {done} record(s) kept by an earlier process during a tracking outage ({path}).")
                if orphan.pending:  # unreachable: this process keeps them, after what it already keeps
                    for _, record in orphan.pending:
                        self.journal.append(record)
                    orphan.delete()
                    self._next_retry = time.monotonic() + self.retry_seconds
                    self._log(f"Tracking: {len(self.backlog)} record(s) of earlier processes are kept and logged when the store is back.")
            finally:
                orphan.close()  # releases its lock, also when this process dies here

    def flush(self) -> None:
        """Log what was kept while the store was unreachable, in order; raises if it still is."""
        if not self.backlog:
            return
        done = 0
        while self.backlog:
            seq, record = self.backlog[0]
            self._apply_or_drop(record, retry=True)
            self.journal.ack(seq)
            done += 1
        self._log(f"Tracking: the MLflow store at {self.shown_uri} is reachable again; logged {done} kept record(s).")

    def _submit(self, record: Record, what: str) -> Any:
        """Log ``record`` now, or keep it (after every record kept before it) while the store is unreachable."""
        start = time.perf_counter()
        try:
            if self.backlog:
                if time.monotonic() < self._next_retry:
                    self.journal.append(record)
                    return None
                try:
                    self.flush()
                except Exception:
                    self._next_retry = time.monotonic() + self.retry_seconds
                    self.journal.append(record)
                    return None
            try:
                return self._apply_or_drop(record, retry=False)
            except Exception as exc:
                self.journal.append(record)
                self._next_retry = time.monotonic() + self.retry_seconds
                kept = f"in {self.journal.path}" if self.journal.path else "in memory"
                self._log(
                    f"Tracking: cannot log {what} to the MLflow store at {self.shown_uri} ({type(exc).__name__}: "
                    f"{mask_text(str(exc))[:200]}). The search goes on; this and later records are kept ({kept}) and logged "
                    f"when the store is back."
                )
                return None
        finally:
            self.seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ logging
    def log(
        self,
        run_id: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """Batched logging of params, metrics (at ``step``, stamped with the time of this call) and tags to one run."""
        record = {
            "op": "log",
            "run": run_id,
            "params": {k: mask_value(str(v))[:6000] for k, v in (params or {}).items()},  # no secret recorded, whatever the caller passed
            "metrics": {mlflow_key(k): float(v) for k, v in (metrics or {}).items() if v is not None},
            "tags": {k: mask_value(str(v))[:5000] for k, v in (tags or {}).items()},
            "step": int(step),
            "time": _now_ms(),
        }
        self._submit(record, "metrics and params")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._submit({"op": "text", "run": run_id, "text": mask_text(text), "file": artifact_file}, f"artifact {artifact_file}")

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self._submit({"op": "artifact", "run": run_id, "path": str(Path(path).resolve())}, f"artifact {Path(path).name}")

    def _end(self, run_id: str, status: str, what: str) -> None:
        self._submit({"op": "end", "run": run_id, "status": status, "time": _now_ms()}, what)

    def _create(self, parent_id: str, placeholder: str, name: str, tags: Mapping[str, str], what: str) -> str:
        """Create a child run of ``parent_id`` now, or later (the caller then holds ``placeholder``)."""
        record = {
            "op": "create", "key": placeholder, "parent": parent_id, "name": name, "tags": dict(tags),
            "experiment": self.experiment_id, "time": _now_ms(),
        }  # fmt: skip
        return self._submit(record, what) or placeholder

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
        self._end(run_id, status, "the end of the study")
        if self.backlog:
            try:
                self.flush()
            except Exception:
                where = (
                    f"they are kept in {self.journal.path} and logged when a search, worker or 'nas report' on this run "
                    f"directory next starts"
                    if self.journal.path else "they are lost"
                )
                self._log(
                    f"Tracking: {len(self.backlog)} record(s) could not be logged to {self.shown_uri} before the search ended; {where}. "
                    f"The Optuna study holds every trial's results ('nas results')."
                )

    # ------------------------------------------------------------------ trials
    def start_trial(self, parent_id: str, trial: optuna.Trial) -> str:
        """Create the trial's child run under ``parent_id`` and store its id on the trial.

        While the store is unreachable the run is created later; the trial then holds a
        placeholder id (``pending-...``), and the run is found by its :data:`RUN_KEY_TAG`.
        """
        tags = {
            "asymnas.role": "trial",
            "optuna.study_name": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
            "asymnas.state": "running",
            "asymnas.host": socket.gethostname(),
            "asymnas.worker": f"{socket.gethostname()}-{os.getpid()}",
        }
        placeholder = f"{PENDING}{trial.study.study_name}-{trial.number}-{uuid.uuid4().hex[:8]}"
        run_id = self._create(parent_id, placeholder, f"trial-{trial.number}", tags, f"the run of trial {trial.number}")
        TrialWriter(trial).mlflow_run(run_id)
        return run_id

    def start_baseline(self, parent_id: str, study_name: str, name: str, role: str = "baseline") -> str:
        """Create the child run of hand-designed baseline ``name`` (tagged ``asymnas.role=baseline``), or of
        another step of the study (``role``, e.g. ``supernet``: the one-shot strategy's supernet training)."""
        tags = {
            "asymnas.role": role,
            **({"asymnas.baseline": "true"} if role == "baseline" else {}),
            "optuna.study_name": study_name,
            "asymnas.state": "running",
            "asymnas.host": socket.gethostname(),
        }
        placeholder = f"{PENDING}{study_name}-{role}-{name}-{uuid.uuid4().hex[:8]}"
        return self._create(parent_id, placeholder, f"{role}:{name}", tags, f"the run of {role} {name}")

    def end_trial(self, run_id: str, state: str, reason: str | None = None, metrics: Mapping[str, float] | None = None) -> None:
        """Log final metrics, tag the state (and reason) and close the run with the matching status."""
        tags = {"asymnas.state": state}
        if reason:
            tags["asymnas.reason"] = reason
        self.log(run_id, metrics=metrics, tags=tags)
        self._end(run_id, RUN_STATUS[state], f"the end of run {run_id}")

    def reconcile(self, study: optuna.Study) -> int:
        """Close child runs left RUNNING by a crashed process whose trial is no longer running; returns how many."""
        closed = 0
        states = (optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for trial in study.get_trials(deepcopy=False, states=states):
            record = TrialRecord.from_trial(trial)
            run_id = record.mlflow_run_id
            if run_id is None:  # killed before its run was opened or named on the trial
                closed += self.missing_run(study, trial, record.state, "the process running this trial was killed before it opened its run")
                continue
            try:
                run = self.client.get_run(self._resolve(run_id))
            except Exception:
                continue
            if run.info.status == "RUNNING":
                state = {optuna.trial.TrialState.COMPLETE: "complete", optuna.trial.TrialState.PRUNED: "pruned"}.get(trial.state, "failed")
                self.end_trial(run_id, state, reason="the process running this trial stopped before closing its run")
                closed += 1
        return closed

    def missing_run(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: str, reason: str) -> bool:
        """Close the child run tagged with ``trial``'s number when it is still RUNNING (created, but its id never stored
        on the trial), or create one and close it as ``state`` with ``reason`` when there is none; whether it did either."""
        parent = StudyRecord.load(study).mlflow_parent_run_id
        if parent is None:
            return False
        try:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`optuna.trial_number` = '{trial.number}' and tags.`asymnas.role` = 'trial'",
                max_results=10,
            )
        except Exception as exc:  # the store is unreachable: the next search's reconcile looks again
            self._log(f"Tracking: could not look up the run of trial {trial.number} ({type(exc).__name__}); it is looked up again on the next start.")
            return False
        if runs:
            open_runs = [run for run in runs if run.info.status == "RUNNING"]
            for run in open_runs:
                self.end_trial(run.info.run_id, state, reason)
            return bool(open_runs)
        tags = {
            "asymnas.role": "trial", "optuna.study_name": study.study_name, "optuna.trial_number": str(trial.number), "asymnas.state": state,
            "asymnas.reason": reason,
        }  # fmt: skip
        placeholder = f"{PENDING}{study.study_name}-{trial.number}-{uuid.uuid4().hex[:8]}"
        run_id = self._create(parent, placeholder, f"trial-{trial.number}", tags, f"the run of trial {trial.number}")
        self._end(run_id, RUN_STATUS[state], f"the end of run {run_id}")
        return True

    def close_stale_steps(self, parent_id: str, role: str, reason: str) -> int:
        closed = 0
        for run in self.child_runs(parent_id):
            tags = run.data.tags
            if run.info.status == "RUNNING" and tags.get("asymnas.role") == role and tags.get("asymnas.host") == socket.gethostname():  # this host's lock
                self.end_trial(run.info.run_id, "interrupted", reason)
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


def make_tracker(config: ExperimentConfig, log: Log = print) -> Tracker:
    """The tracker of ``config``: a :class:`NullTracker` when ``tracking.enabled`` is false, else an
    :class:`MlflowTracker` on ``config.tracking_uri`` (experiment ``tracking.experiment``, default the
    study name; a local store keeps artifacts in ``<out>/mlartifacts``; the outage journal is in ``<out>``)."""
    if not config.tracking.enabled:
        return NullTracker()
    return MlflowTracker(
        config.tracking_uri, config.tracking.experiment or config.search.study_name, config.out_dir / "mlartifacts", log=log,
        journal_dir=config.out_dir,
    )  # fmt: skip
