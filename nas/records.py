"""The typed records of a study and its trials: the only code that reads or writes Optuna user attributes.

A trial's results live in Optuna's storage as user attributes (JSON values under string
keys), so that any worker, ``nas results``, ``nas export`` and ``nas report`` read the
same facts. This module owns those keys: :class:`TrialRecord` reads a finished (or
running) trial into typed fields, :class:`TrialWriter` writes a live one, and
:class:`StudyRecord` / :class:`StudyWriter` do the same for the study's own attributes.
Everything else uses the fields.

It also holds the facts that must agree everywhere: the trial states, the names of the
stored metrics and the per-trial seed rule.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.secrets import mask_text, mask_value

__all__ = [
    "State",
    "TrialRecord",
    "TrialWriter",
    "StudyRecord",
    "StudyWriter",
    "trial_seed",
    "baseline_seed",
    "sampler_seed",
    "fail_trial",
    "enqueue_architecture",
    "trial_records",
    "VAL_MAP",
    "QUERY_MAP",
    "QUERY_MAP_RATIO",
    "QUERY_R1",
]

#: The stored metric names the tables, the report and export read (the rest are ``val_*`` / ``query_*`` too).
VAL_MAP = "val_mAP"
QUERY_MAP = "query_mAP"
QUERY_MAP_RATIO = "query_mAP_ratio"
QUERY_R1 = "query_R@1"


class State(str, enum.Enum):
    """What happened to a trial, as the tables, MLflow tags and exit codes say it.

    ``infeasible``: over budget, never trained; ``duplicate``: an architecture evaluated
    (or being evaluated) by an earlier trial, not trained again; ``pruned``: stopped by the
    pruner or the promotion rule; ``interrupted``: Ctrl-C; ``failed``: an error (or a dead
    worker). Infeasible and duplicate trials do not count toward ``search.trials``.
    ``inherited``: scored on val with weights inherited from a supernet, not trained
    (``search.strategy: one_shot``); a result for the sampler, not one to export (the
    fine-tuned trials of the best of them are).
    """

    COMPLETE = "complete"
    INHERITED = "inherited"
    INFEASIBLE = "infeasible"
    DUPLICATE = "duplicate"
    PRUNED = "pruned"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    RUNNING = "running"
    WAITING = "waiting"

    def __str__(self) -> str:
        return self.value


def trial_seed(search_seed: int, number: int) -> int:
    """The seed of trial ``number`` (weights initialisation and data order): one rule for search, export and retries."""
    return search_seed * 100003 + number


def baseline_seed(search_seed: int) -> int:
    """The one fixed seed of every hand-designed baseline of a study (outside the trial numbers' range)."""
    return trial_seed(search_seed, 99991)


def sampler_seed(search_seed: int, trials_held: int) -> int:
    """The sampler's seed for the ask that creates a study's trial number ``trials_held``.

    A function of the study's state, not of the process: a resumed search continues the
    sequence one long run would have proposed (see :mod:`nas.search.coordination`).
    """
    return (search_seed * 1_000_003 + trials_held * 7919 + 17) % 2**32


# ----------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class TrialRecord:
    """One trial as stored: Optuna's own fields and ours, typed.

    ``state`` is the effective state: ``duplicate`` for a trial that reused another's
    architecture, ours when the trial recorded one, ``failed`` for any other trial Optuna
    marked FAIL (a dead worker's trial records nothing itself), else Optuna's state in lower
    case (``running``, ``waiting``).

    ``host``, ``pid``, ``process_started`` (clock ticks since boot) and ``pid_scope`` (boot
    id and pid namespace) identify the process that ran it (see
    :class:`nas.search.coordination.ProcessIdentity`); ``request`` is the ``nas search``
    invocation it counts toward (a retry keeps its original's); ``retry_of`` is the failed
    trial a retry repeats.
    """

    number: int
    optuna_state: TrialState
    state: str
    values: tuple[float, ...] | None
    params: dict[str, Any]
    constraints: dict[str, float]
    arch: str | None = None
    arch_id: str | None = None
    seed: int | None = None
    budgets: dict[str, float] = field(default_factory=dict)
    budget_seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    weights: str | None = None
    reason: str | None = None
    duplicate_of: int | None = None
    worker: str | None = None
    mlflow_run_id: str | None = None
    val_curve: dict[str, float] = field(default_factory=dict)
    warm_start_arch: str | None = None
    fine_tune_of: int | None = None
    host: str | None = None
    pid: int | None = None
    process_started: int | None = None
    pid_scope: str | None = None
    request: str | None = None
    retry_of: int | None = None
    fingerprint: str | None = None  # the digest of what its scores were measured under (nas.search.fingerprint)

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> TrialRecord:
        a = {k: v for k, v in trial.user_attrs.items() if v is not None}  # None: cleared for a retry (TrialWriter.started)
        state = a.get("state", trial.state.name.lower())
        if a.get("duplicate_of") is not None:
            state = State.DUPLICATE.value
        elif trial.state == TrialState.FAIL:
            state = State.FAILED.value
        return cls(
            number=trial.number,
            optuna_state=trial.state,
            state=state,
            values=tuple(trial.values) if trial.values is not None else None,
            params=dict(trial.params),
            constraints=dict(trial.constraints),
            arch=a.get("arch"),
            arch_id=a.get("arch_id"),
            seed=a.get("seed"),
            budgets=dict(a.get("budgets", {})),
            budget_seconds=a.get("budget_seconds"),
            metrics=dict(a.get("metrics", {})),
            weights=a.get("weights"),
            reason=a.get("reason"),
            duplicate_of=a.get("duplicate_of"),
            worker=a.get("worker"),
            mlflow_run_id=a.get("mlflow_run_id"),
            val_curve=dict(a.get("val_curve", {})),
            warm_start_arch=a.get("warm_start_arch"),
            fine_tune_of=a.get("fine_tune_of"),
            host=a.get("host"),
            pid=a.get("pid"),
            process_started=a.get("process_started"),
            pid_scope=a.get("pid_scope"),
            request=a.get("request"),
            retry_of=trial.system_attrs.get("failed_trial"),
            fingerprint=a.get("fingerprint"),
        )

    @property
    def value(self) -> float | None:
        """The first objective (val asymmetric mAP), ``None`` until the trial finished."""
        return self.values[0] if self.values else None

    @property
    def feasible(self) -> bool:
        """Within every budget (Optuna's convention: a constraint value <= 0 is satisfied)."""
        return all(v <= 0 for v in self.constraints.values())

    @property
    def feasible_complete(self) -> bool:
        """Trained to the end within every budget: a result that may be exported."""
        return self.optuna_state == TrialState.COMPLETE and self.state == State.COMPLETE and self.feasible

    def seed_for(self, search_seed: int) -> int:
        """The recorded seed, or the rule's for a trial that recorded none."""
        return self.seed if self.seed is not None else trial_seed(search_seed, self.number)


class TrialWriter:
    """Writes the user attributes of a live Optuna trial (the objective's side of :class:`TrialRecord`)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    @property
    def number(self) -> int:
        return self.trial.number

    def warm_start_arch(self) -> str | None:
        """The architecture string a queued trial (warm start) was enqueued with, if any."""
        return self.trial.user_attrs.get("warm_start_arch")

    def fine_tune_of(self) -> int | None:
        """The inherited-weight trial a queued fine-tuning trial fine-tunes, if it is one."""
        return self.trial.user_attrs.get("fine_tune_of")

    #: What a trial records about its own run; a retry inherits its original's user attributes, and these are cleared.
    _RUN_KEYS = ("state", "reason", "duplicate_of", "metrics", "weights", "val_curve", "budgets", "budget_seconds", "seed", "mlflow_run_id")

    def started(self, host: str, pid: int, process_started: int | None, pid_scope: str | None, request: str) -> None:
        """The process running the trial and the request it counts toward (a retry or warm start keeps the one it
        was queued with); clears what a retried trial inherited of its original's run."""
        attrs = self.trial.user_attrs
        for key in self._RUN_KEYS:
            if attrs.get(key) is not None:
                self.trial.set_user_attr(key, None)
        self.trial.set_user_attr("host", host)
        self.trial.set_user_attr("pid", pid)
        self.trial.set_user_attr("process_started", process_started)
        self.trial.set_user_attr("pid_scope", pid_scope)
        self.trial.set_user_attr("worker", f"{host}-{pid}")
        if attrs.get("request") is None:
            self.trial.set_user_attr("request", request)

    def mlflow_run(self, run_id: str) -> None:
        self.trial.set_user_attr("mlflow_run_id", run_id)

    def architecture(self, arch: str, arch_id: str) -> None:
        self.trial.set_user_attr("arch", arch)
        self.trial.set_user_attr("arch_id", arch_id)

    def seed(self, seed: int) -> None:
        self.trial.set_user_attr("seed", seed)

    def budgets(self, values: Mapping[str, float], seconds: float) -> None:
        self.trial.set_user_attr("budgets", dict(values))
        self.trial.set_user_attr("budget_seconds", seconds)

    def constraints(self, values: Mapping[str, float]) -> None:
        """Optuna constraints (> 0: over budget); a retried trial keeps its original's (same architecture)."""
        for name, value in values.items():
            if name not in self.trial.constraints:
                self.trial.set_constraint(name, value)

    def val_curve(self, curve: Mapping[str, float]) -> None:
        self.trial.set_user_attr("val_curve", dict(curve))

    def outcome(
        self, state: State, reason: str | None = None, metrics: Mapping[str, float] | None = None, weights: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        """The trial's result: state, and the reason, final metrics (with the fingerprint digest they were measured
        under) and kept weights where there are any."""
        if metrics is not None:
            self.trial.set_user_attr("metrics", dict(metrics))
            if fingerprint is not None:
                self.trial.set_user_attr("fingerprint", fingerprint)
        if weights is not None:
            self.trial.set_user_attr("weights", weights)
        self.trial.set_user_attr("state", state.value)
        if reason is not None:
            self.trial.set_user_attr("reason", mask_text(reason))  # an error's words may quote a URL or a password

    def duplicate(self, original: TrialRecord, reason: str) -> None:
        """A trial not trained because ``original`` has (or is getting) its architecture's result: state
        ``duplicate``, the reason, and for reading convenience the original's budgets and metrics so far."""
        for key, value in {"budgets": original.budgets, "metrics": original.metrics}.items():
            if value:
                self.trial.set_user_attr(key, dict(value))
        if original.fingerprint is not None:
            self.trial.set_user_attr("fingerprint", original.fingerprint)
        self.trial.set_user_attr("state", State.DUPLICATE.value)
        self.trial.set_user_attr("reason", reason)
        self.trial.set_user_attr("duplicate_of", original.number)


def enqueue_architecture(study: optuna.Study, arch: str, request: str | None = None, fine_tune_of: int | None = None) -> None:
    """Queue a trial that evaluates the architecture string ``arch`` instead of sampling one, counted toward ``request``;
    ``fine_tune_of``: the inherited-weight trial (one-shot strategy) whose network the trial fine-tunes."""
    attrs = {"warm_start_arch": arch, "request": request, **({"fine_tune_of": fine_tune_of} if fine_tune_of is not None else {})}
    study.enqueue_trial({}, user_attrs=attrs, skip_if_exists=False)


def fail_trial(study: optuna.Study, number: int, reason: str) -> FrozenTrial | None:
    """Mark running trial ``number`` failed with ``reason`` (its process is gone); the failed trial, or
    ``None`` when it finished first (another process failed it, or it ended on its own)."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    storage = study._storage  # Optuna's storage API: the trial belongs to no live process of ours
    try:
        storage.set_trial_user_attr(trial._trial_id, "reason", reason)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    return storage.get_trial(trial._trial_id)


def trial_records(study: optuna.Study, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """Every trial of ``study`` (optionally only those in Optuna ``states``) as records, by number."""
    return [TrialRecord.from_trial(t) for t in study.get_trials(deepcopy=False, states=states)]



# ----------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class StudyRecord:
    """What a study stores about itself: its config, run folder, gallery model, paragon and baselines."""

    name: str
    config: dict[str, Any] | None = None
    out_dir: str | None = None
    space: dict[str, Any] | None = None
    paragon: dict[str, dict[str, float]] | None = None
    gallery_sha256: str | None = None
    gallery_model: str | None = None
    gallery_budgets: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    warm_started: tuple[str, ...] = ()
    mlflow_parent_run_id: str | None = None
    preprocessing: dict[str, Any] | None = None  # nas.data.Preprocessing.to_dict(); None: studies before it was recorded
    fingerprint: dict[str, str] | None = None  # what its numbers depend on, part by part (nas.search.fingerprint); None: older studies
    pictures: dict[str, str] = field(default_factory=dict)  # trial number -> its latest exported retrieval.png (nas.pictures)

    @classmethod
    def load(cls, study: optuna.Study) -> StudyRecord:
        a = study.user_attrs
        return cls(
            name=study.study_name,
            config=a.get("config"),
            out_dir=a.get("out_dir"),
            space=a.get("space"),
            paragon=a.get("paragon"),
            gallery_sha256=a.get("gallery_sha256"),
            gallery_model=a.get("gallery_model"),
            gallery_budgets=dict(a.get("gallery_budgets", {})),
            baselines=dict(a.get("baselines", {})),
            warm_started=tuple(a.get("warm_started", [])),
            mlflow_parent_run_id=a.get("mlflow_parent_run_id"),
            preprocessing=a.get("preprocessing"),
            fingerprint=a.get("fingerprint"),
            pictures=dict(a.get("retrieval_pictures", {})),
        )

    @property
    def objectives(self) -> list[str]:
        """The study's objectives as configured (``["mAP", cost, ...]``)."""
        return list((self.config or {}).get("search", {}).get("objectives", ["mAP"]))

    @property
    def paragon_query(self) -> dict[str, float]:
        return (self.paragon or {}).get("query", {})


class StudyWriter:
    """Writes the study's own user attributes (the driver's side of :class:`StudyRecord`)."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study

    def description(
        self, config: Mapping[str, Any], out_dir: str, space: Mapping[str, Any], gallery_budgets: Mapping[str, float],
        preprocessing: Mapping[str, Any],
    ) -> None:
        self.study.set_user_attr("preprocessing", dict(preprocessing))
        self.study.set_user_attr("config", mask_value(dict(config)))
        self.study.set_user_attr("out_dir", out_dir)
        self.study.set_user_attr("space", dict(space))
        self.study.set_user_attr("gallery_budgets", dict(gallery_budgets))

    def paragon(
        self, gallery_sha256: str, gallery_model: str, paragon: Mapping[str, Mapping[str, float]], fingerprint: Mapping[str, str],
    ) -> None:
        """The paragon scores with what they were measured under (``fingerprint``: part -> description)."""
        self.study.set_user_attr("fingerprint", dict(fingerprint))
        self.study.set_user_attr("gallery_sha256", gallery_sha256)
        self.study.set_user_attr("gallery_model", gallery_model)
        self.study.set_user_attr("paragon", {k: dict(v) for k, v in paragon.items()})

    def baselines(self, results: Mapping[str, Mapping[str, Any]]) -> None:
        self.study.set_user_attr("baselines", {k: dict(v) for k, v in results.items()})

    def warm_started(self, archs: list[str]) -> None:
        self.study.set_user_attr("warm_started", list(archs))

    def parent_run(self, run_id: str) -> None:
        self.study.set_user_attr("mlflow_parent_run_id", run_id)

    def picture(self, trial: int, png: str) -> None:
        """Trial ``trial``'s latest exported retrieval picture is ``png`` (``nas report`` links it)."""
        self.study.set_user_attr("retrieval_pictures", {**self.study.user_attrs.get("retrieval_pictures", {}), str(trial): png})
