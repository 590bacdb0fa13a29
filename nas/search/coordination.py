"""How processes sharing one study stay exact: the count rule, the sampler's sequence, dead processes' trials.

Every ``nas search`` and ``nas worker`` process is a worker of the study; there is no
scheduler of ours. Three rules make them agree, each applied under the study lock
(:func:`nas.locks.study_lock`):

* **The count rule** (:class:`Goal`). Before every ask a process counts, then asks only if
  its goal is not reached. ``nas worker --trials TOTAL`` runs until the study holds TOTAL
  counted trials; ``nas search --trials N`` until N counted trials belong to its own
  request (an id written on every trial it asks for, and inherited by that trial's retry).
  So two searches asking N each add exactly 2N, whichever runs which trial.
* **The sequence** (:func:`ask_next`). The sampler is reseeded before each ask from the
  search seed and the number of trials the study holds, so a resumed or second process
  continues the sequence instead of proposing the first candidates again, and what is
  proposed is a function of the study's state, not of which process asks.
* **Dead processes** (:func:`fail_dead_local_trials`). Each trial records the host, pid and
  start time of its process. A running trial whose process is gone from *this* machine is
  failed at once (and retried); a trial of another machine waits for Optuna's heartbeat
  rule. Without ``/proc`` (not Linux) a reused pid cannot be told apart: such a trial is
  then only failed by the heartbeat rule once its pid is reused.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.samplers._lazy_random_state import LazyRandomState  # private: pinned with optuna==5.0.0
from optuna.trial import FrozenTrial, TrialState

from nas.records import TrialRecord, fail_trial, sampler_seed, trial_records
from nas.results import counted_trials, counts_toward

__all__ = [
    "Goal",
    "ProcessIdentity",
    "this_process",
    "process_gone",
    "new_request_id",
    "reseed_sampler",
    "ask_next",
    "fail_dead_local_trials",
]


# ----------------------------------------------------------------------------- the count rule


def new_request_id() -> str:
    """A fresh id for one ``nas search`` invocation (its trials count toward it)."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Goal:
    """How many counted trials a process runs toward; checked under the study lock before each ask.

    ``request`` ``None``: the study as a whole must hold ``trials`` counted trials (``nas
    worker --trials TOTAL``). Otherwise ``trials`` counted trials must belong to
    ``request`` (one ``nas search`` invocation, shared by the workers of ``nas search
    --workers``), however many trials other processes add meanwhile. What counts is
    :func:`nas.results.counts_toward`.
    """

    trials: int
    request: str | None = None

    def done(self, study: optuna.Study) -> int:
        """Counted trials toward this goal, running and waiting ones included."""
        return counted_trials(study, self.request)

    def reached(self, study: optuna.Study) -> bool:
        return self.done(study) >= self.trials

    def counts(self, record: TrialRecord) -> bool:
        """Whether a trial that just finished counts toward this goal (for the progress line)."""
        return counts_toward(record, set()) and (self.request is None or record.request == self.request)


# ----------------------------------------------------------------------------- the sequence


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Reseed every random state of ``sampler`` (and of the samplers inside it) with ``seed``, in place.

    The same as constructing it with ``seed`` (Optuna seeds a sampler's own state and its
    inner random sampler with the one seed), but keeping what it holds besides: the QMC
    sampler's scramble seed (whose sequence position lives in the study), the GP sampler's
    fitted kernels. Optuna offers only an unseeded ``reseed_rng``, so this walks its
    private ``LazyRandomState`` attributes (Optuna is pinned).
    """
    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(seed)
        elif isinstance(value, optuna.samplers.BaseSampler):
            reseed_sampler(value, seed)


def ask_next(study: optuna.Study, search_seed: int) -> optuna.Trial:
    """Ask for the next trial with the sampler reseeded for the study's current size (call under the study lock).

    The seed is :func:`nas.records.sampler_seed` of ``search_seed`` and the number of
    trials the study holds, so the k-th ask of a study proposes the same candidate whether
    one process made all k asks or several resumes did.
    """
    reseed_sampler(study.sampler, sampler_seed(search_seed, len(study.get_trials(deepcopy=False))))
    with warnings.catch_warnings():  # the driver runs Optuna's heartbeat thread itself
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        return study.ask()


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as a trial records it: ``host``, ``pid``, ``started`` (its start time in clock ticks
    since boot, Linux only) and ``scope`` (the boot id and pid namespace in which ``pid`` means that
    process, Linux only). Two identities with the same host and scope are on one machine."""

    host: str
    pid: int
    started: int | None = None
    scope: str | None = None

    @classmethod
    def of(cls, record: TrialRecord) -> ProcessIdentity | None:
        """The process of a trial, ``None`` when it recorded none (a trial from before these fields)."""
        if record.host is None or record.pid is None:
            return None
        return cls(record.host, record.pid, record.process_started, record.pid_scope)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``, ``None`` without it."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[19])


def _pid_scope() -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def this_process() -> ProcessIdentity:
    """The identity of the running process."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return ProcessIdentity(socket.gethostname(), pid, stat[1] if stat else None, _pid_scope())


def process_gone(owner: ProcessIdentity) -> bool:
    """Whether ``owner`` is known to have ended: it ran on this machine and its pid is free, a zombie,
    or now another process (a different start time). ``False`` whenever that cannot be known here."""
    me = this_process()
    if owner.host != me.host or owner.scope != me.scope:
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists and belongs to another user
    stat = _proc_stat(owner.pid)
    if stat is None:
        return False
    state, started = stat
    return state in ("Z", "X") or (owner.started is not None and started != owner.started)


def fail_dead_local_trials(study: optuna.Study, on_failed: Callable[[FrozenTrial, str], None]) -> list[int]:
    """Fail every running trial whose process is gone from this machine; call under the study lock.

    ``on_failed(trial, reason)`` gets each failed trial (closing its MLflow run and queueing
    its retry is the caller's). Returns the failed trials' numbers.
    """
    failed = []
    for record in trial_records(study, states=(TrialState.RUNNING,)):
        owner = ProcessIdentity.of(record)
        if owner is None or not process_gone(owner):
            continue
        reason = (f"its process (pid {owner.pid} on {owner.host}) stopped before the trial ended: "
                  f"it is no longer running (killed or crashed)")
        frozen = fail_trial(study, record.number, reason)
        if frozen is not None:
            on_failed(frozen, reason)
            failed.append(record.number)
    return failed

