"""The search loop: open the study and its MLflow parent run, then run trials until this process's goal is met.

``study.optimize`` cannot be used: counting, asking for a trial and choosing its
architecture must happen under the study lock (:func:`nas.locks.study_lock`) so that the
count is exact and no two processes take one architecture (:mod:`nas.search.coordination`).
So the loop asks, proposes, runs the objective with Optuna's own heartbeat thread, and tells.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Iterator

import optuna
import yaml
from optuna.storages._heartbeat import get_heartbeat_thread

from nas.config import ExperimentConfig
from nas.errors import ConfigError, GalleryError, NasError
from nas.locks import file_lock, study_lock
from nas.records import State, StudyRecord, StudyWriter, TrialRecord, TrialWriter, enqueue_architecture
from nas.report import write_report
from nas.results import best_trial, counted_trials, feasible_complete, pareto_front, recall_text
from nas.scoring import paragon_scores
from nas.search.context import Context, Log, prepare
from nas.search.coordination import Goal, ask_next, fail_dead_local_trials, new_request_id, this_process
from nas.search.evaluators import EVALUATORS, OneShot, Paragon, create_evaluator
from nas.search.objective import Objective
from nas.search.fingerprint import ATTR as FINGERPRINT_ATTR, Fingerprint, check_fingerprint, recorded_fingerprint
from nas.search.optuna_setup import StaleTrialCallback, check_storage, load_existing_study, open_study
from nas.search.preflight import check_before_data, warm_start_entry
from nas.search.progress import Progress
from nas.search.storage_loss import is_storage_lost, storage_lost
from nas.secrets import mask_url, masked_config_dict
from nas.study_nets import gallery_costs
from nas.supernet import largest_per_resolution
from nas.tracking import NullTracker, Tracker, check_tracking_uri, flatten, make_tracker
from search_spaces import Architecture
from trainers import TrainingDiverged

__all__ = ["run_search", "open_tracked_study", "study_paragon", "check_recorded_study", "warm_start_architectures", "train_study_supernet"]


def study_paragon(ctx: Context, study: optuna.Study) -> Paragon:
    """Symmetric scores of the gallery model: computed once and stored on the study with the
    fingerprint of what they were measured under (:mod:`nas.search.fingerprint`).

    A study whose recorded fingerprint differs from this run's (other data, split, loss,
    protocol, preprocessing or gallery model) is refused, every changed part named: its paragon
    and trials are not comparable with new ones. A study from before fingerprints were recorded
    is checked by its gallery weights' hash alone, and gets this run's fingerprint.
    """
    info = StudyRecord.load(study)
    if info.gallery_sha256 is not None and info.gallery_sha256 != ctx.gallery_sha:
        raise GalleryError(
            f"Study {study.study_name!r} was searched against gallery weights {info.gallery_sha256[:12]}, but the configured gallery "
            f"model hashes to {ctx.gallery_sha[:12]}: its trials are not comparable. Use a new --study-name or the original checkpoint."
        )
    check_fingerprint(study.study_name, info.fingerprint, ctx.fingerprint)
    if info.paragon is not None:
        if info.fingerprint is None:
            study.set_user_attr(FINGERPRINT_ATTR, dict(ctx.fingerprint.parts))
        return info.paragon
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    StudyWriter(study).paragon(ctx.gallery_sha, ctx.config.gallery.model, paragon, ctx.fingerprint.parts)
    return paragon


def check_recorded_study(config: ExperimentConfig, early: Fingerprint) -> None:
    """Before any gallery work: refuse to resume a study recorded under other data, split, loss or protocol."""
    try:
        study = load_existing_study(config.storage_url, config.search.study_name)
    except NasError:  # no database or no such study yet: a new study, nothing to compare
        return
    check_fingerprint(study.study_name, recorded_fingerprint(study), early)


def open_tracked_study(
    config: ExperimentConfig,
    ctx: Context,
    tracker: Tracker,
    log: Log = print,
    on_stale_trial: StaleTrialCallback | None = None,
    describe: bool = True,
) -> tuple[optuna.Study, str, Paragon, dict[str, float]]:
    """Open the study and its MLflow parent run; returns the study, the parent run id, the
    paragon scores and the gallery model's budgets. Call under the study lock.

    ``describe`` (re)writes the study's config, space and gallery description; a joining
    worker only writes them when the study has none yet.
    """
    study = open_study(config, on_stale_trial=on_stale_trial)
    closed = tracker.reconcile(study)
    if closed:
        log(f"Tracking: closed {closed} MLflow run(s) left open by an interrupted earlier search.")
    paragon = study_paragon(ctx, study)
    description = ctx.space.describe()
    gallery_budgets = gallery_costs(ctx.gallery, config.gallery.resolution, ctx.data.channels, ctx.budgets)
    recorded = masked_config_dict(config)  # what is recorded and printed never holds a password
    if StudyRecord.load(study).config is None or describe:
        StudyWriter(study).description(recorded, str(config.out_dir.resolve()), description, gallery_budgets, ctx.preprocessing.to_dict())
    parent = tracker.start_study(
        study,
        params=flatten({**recorded, "split": ctx.split.sizes()}),
        tags={
            "gallery.sha256": ctx.gallery_sha,
            "fingerprint": ctx.fingerprint.digest,
            "gallery.model": config.gallery.model,
            "preprocessing": ctx.preprocessing.describe(),
            "budgets": "; ".join(b.describe() for b in ctx.budgets),
            "space.num_architectures": description["num_architectures"],
        },
        texts={
            "config.yaml": yaml.safe_dump(recorded, sort_keys=False),
            "space.json": json.dumps(description, indent=2),
            "preprocessing.json": json.dumps(ctx.preprocessing.to_dict(), indent=2),
        },
    )
    tracker.log(
        parent,
        metrics={
            **{f"paragon_query_{k}": v for k, v in paragon["query"].items() if k not in ("queries", "skipped")},
            **{f"paragon_val_{k}": v for k, v in paragon["val"].items() if k not in ("queries", "skipped")},
            **{f"gallery_{k}": v for k, v in gallery_budgets.items()},
            **{f"smallest_candidate_{k}": v for k, v in ctx.smallest.items()},
        },
    )
    return study, parent, paragon, gallery_budgets


# ----------------------------------------------------------------------------- warm start


def warm_start_architectures(config: ExperimentConfig, ctx: Context, study: optuna.Study) -> list[Architecture]:
    """The architectures ``search.warm_start`` names (see :class:`nas.config.SearchConfig`)."""
    spec = config.search.warm_start
    if spec in (None, "none"):
        return []
    if spec == "baselines":
        recorded = StudyRecord.load(study).baselines
        return [Architecture.from_string(r["arch"]) for _, r in sorted(recorded.items()) if r.get("fits")]
    if spec == "largest":  # within the MFLOPs budget where the space is rooted in the gallery model
        return largest_per_resolution(ctx, next((b.limit for b in ctx.budgets if b.name == "mflops"), None))
    archs = []
    for entry in spec:
        arch = warm_start_entry(entry, ctx.space.embed_dim, ctx.data.channels)  # checked before the data too (check_warm_start)
        if (arch.embed_dim, arch.in_chans) != (ctx.space.embed_dim, ctx.data.channels):
            raise ConfigError(
                f"search.warm_start: {entry!r} has embed={arch.embed_dim} in={arch.in_chans}, but this study needs "
                f"embed={ctx.space.embed_dim} in={ctx.data.channels}."
            )
        archs.append(arch)
    return archs


def _warm_start(config: ExperimentConfig, ctx: Context, study: optuna.Study, log: Log, request: str) -> None:
    """Enqueue the warm-start architectures not enqueued before, as the next trials, counted toward ``request``."""
    done = list(StudyRecord.load(study).warm_started)
    new = [a for a in warm_start_architectures(config, ctx, study) if a.to_string() not in done]
    for arch in new:
        enqueue_architecture(study, arch.to_string(), request)
        done.append(arch.to_string())
    if new:
        StudyWriter(study).warm_started(done)
        log(f"Warm start: enqueued {len(new)} architecture(s) as the next trials: " + "; ".join(a.timm_model or a.arch_id for a in new))
    elif config.search.warm_start == "baselines" and not StudyRecord.load(study).baselines:
        log("Warm start: no baselines recorded for this study yet; run 'nas baseline' first.")


@contextlib.contextmanager
def exploring(study: optuna.Study, active: bool) -> Iterator[None]:
    """While ``active``, ``study`` samples its next candidate at random (seeded by :func:`ask_next` like any sampler).

    Used for the trial after a duplicate: a sampler that proposed a known architecture learns
    nothing from it (the duplicate is told as failed), so it would propose the same again.
    TPE on a large categorical space does exactly that once its few good trials agree on
    every choice (each dimension's best value wins on its own). A random candidate adds a
    new observation, and the sampler moves on.
    """
    sampler = study.sampler
    if active:
        study.sampler = optuna.samplers.RandomSampler()
    try:
        yield
    finally:
        study.sampler = sampler


# ----------------------------------------------------------------------------- the loop


def _keep_best_weights(study: optuna.Study, keep: int) -> None:
    """Delete the weights of all but the ``keep`` best trials and the Pareto front's.

    An export of a trial whose weights are gone retrains it with its seed.
    """
    ranked = sorted(feasible_complete(study), key=lambda t: -t.values[0])
    keep_paths = {t.weights for t in ranked[:keep] + pareto_front(study)}
    for trial in ranked[keep:]:
        if trial.weights and trial.weights not in keep_paths and os.path.exists(trial.weights):
            os.remove(trial.weights)


def _run_one(study: optuna.Study, trial: optuna.Trial, objective: Objective, arch: Architecture) -> None:
    """Evaluate ``arch`` on an asked trial, then tell the study its outcome."""
    try:
        value = objective(trial, arch)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except TrainingDiverged:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # that trial fails, the study goes on
        return
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    study.tell(trial, value)


def _goal(config: ExperimentConfig, total_trials: int | None, request: str | None) -> Goal:
    """``nas search``: ``search.trials`` of its own request; ``nas worker``: the study's total, or
    ``total_trials`` of ``request`` for the workers of ``nas search --workers``."""
    if total_trials is None:
        return Goal(config.search.trials, request or new_request_id())
    return Goal(total_trials, request)


def _trials_to_run(study: optuna.Study, goal: Goal) -> int:
    """The counted trials this process expects to run: the waiting ones that count toward ``goal`` (warm starts,
    retries of its own trials) and the new ones the goal still lacks (the waiting ones are counted already)."""
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    own = sum(1 for t in waiting if goal.counts(TrialRecord.from_trial(t)))
    return max(goal.trials - goal.done(study), 0) + own


class _Streak:
    """Candidates in a row that did not count: over budget or already evaluated."""

    def __init__(self) -> None:
        self.states: list[str] = []

    def __call__(self, state: str) -> None:
        self.states = self.states + [state] if state in (State.INFEASIBLE, State.DUPLICATE) else []

    def stop_message(self, config: ExperimentConfig, ctx: Context) -> str:
        n, kinds = len(self.states), set(self.states)
        narrow = f"narrow the space's choices (space.options, see 'nas space show {config.space.name}') or loosen the budgets"
        if kinds == {State.INFEASIBLE}:
            return f"Stopping: the last {n} candidates were all over budget. Few members of the space fit; {narrow}."
        size = ctx.space.describe()["num_architectures"]
        if kinds == {State.DUPLICATE}:
            return (f"Stopping: the last {n} candidates were all architectures already evaluated (or being evaluated by another "
                    f"process); the sampler finds little new in this space of {size:,} architectures. Widen the space "
                    f"(space.options) or stop here.")
        return (f"Stopping: the last {n} candidates were all over budget or already evaluated; few members of this space of "
                f"{size:,} architectures fit and are new: {narrow}.")


def run_search(
    config: ExperimentConfig, log: Log = print, total_trials: int | None = None, worker: str = "", request: str | None = None
) -> optuna.Study:
    """Run (or resume) the study of ``config``.

    Without ``total_trials`` (``nas search``) this process adds ``config.search.trials``
    counted trials to the study, however many other processes add theirs meanwhile. With
    it (``nas worker``) it runs trials until the study as a whole holds ``total_trials``,
    or, given ``request``, until that many count toward the request (the workers of one
    ``nas search --workers``). Counting and asking happen under :func:`nas.locks.study_lock`
    (:mod:`nas.search.coordination`), so the totals are exact. A candidate over budget or
    already evaluated is recorded but not counted. ``search.timeout`` stops this process
    from starting new trials after that many seconds.
    """
    prefix = f"[{worker}] " if worker else ""
    log = (lambda text, _log=log: _log(prefix + text)) if worker else log
    EVALUATORS.check(config.search.strategy)  # a misspelled strategy fails before any data is loaded
    EVALUATORS.get(config.search.strategy).check_config(config)
    storage_url = config.storage_url  # env:NAME resolved, and a tracking URI typo reported, before any data is loaded
    check_storage(storage_url)  # a storage URL typo, a damaged database or an unreachable server: before the gallery
    if config.tracking.enabled:
        check_tracking_uri(config.tracking_uri)
    check_before_data(config)  # a misspelled warm-start model, pretrained weights out of reach: before the gallery too
    with file_lock(config.out_dir / ".gallery.lock"):  # the first worker builds, the others wait and load
        ctx = prepare(config, log, check_study=lambda early: check_recorded_study(config, early))
        config = ctx.config  # budgets written relative to the gallery model are absolute from here on
    tracker: Tracker = NullTracker()  # replaced under the study lock below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.search.max_retries)

    def on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        tracker.close_stale_trial(study, trial)
        retry(study, trial)
        log(f"Trial {trial.number} stopped sending heartbeats (its worker died): marked failed and queued for a retry.")

    def on_dead_trial(trial: optuna.trial.FrozenTrial, reason: str) -> None:
        record = TrialRecord.from_trial(trial)
        tracker.fail_trial_run(study, trial, reason)
        retry(study, trial)
        log(f"Trial {trial.number} belonged to process {record.pid} on {record.host}, which is no longer running: "
            f"marked failed and queued for a retry.")

    goal = _goal(config, total_trials, request)
    me = this_process()
    mine = goal.request or new_request_id()  # the request this process's trials are recorded under
    lock = lambda: study_lock(config.storage_url, config.search.study_name, config.out_dir)  # noqa: E731
    opened = time.monotonic()  # the tracking share counts from here: opening the parent run is tracking time too
    with lock():  # first-time creation of the study and tracking tables, one worker at a time
        tracker = make_tracker(config, log)
        study, parent, paragon, gallery_budgets = open_tracked_study(config, ctx, tracker, log, on_stale_trial, describe=total_trials is None)
        fail_dead_local_trials(study, on_dead_trial)
        before = counted_trials(study)
        _warm_start(config, ctx, study, log, mine)  # the enqueued trials are among this run's trials
        this_run = _trials_to_run(study, goal)
    log(
        f"Paragon (gallery model on both sides): query mAP {paragon['query']['mAP']:.4f}, {recall_text(paragon['query'])}; "
        f"val mAP {paragon['val']['mAP']:.4f}"
    )
    if total_trials is None:
        aim = f"this search adds {goal.trials} (other processes on the study add their own)"
    elif goal.request is not None:
        aim = f"the workers of this search add {goal.trials} together"
    else:
        aim = f"running until it holds {goal.trials}"
    log(
        f"Study {study.study_name!r} at {mask_url(storage_url)}: {before} earlier trial(s); {aim}. "
        f"Budgets: {'; '.join(b.describe() for b in ctx.budgets)}. Gallery model: {gallery_budgets['mflops']:.2f} MFLOPs."
    )
    objective = Objective(create_evaluator(ctx, paragon), study, tracker, parent)
    with file_lock(config.out_dir / ".supernet.lock"), objective.interrupt.installed():  # one worker trains a supernet, the others load it
        objective.evaluator.prepare(log, tracker, parent, study.study_name, should_stop=objective.interrupt.requested)
    progress = Progress(this_run, config.search.timeout, log)
    start = time.monotonic()
    status = "FINISHED"
    streak = _Streak()
    after_duplicate = False  # this process's last candidate repeated an architecture: draw the next one at random
    try:
        while config.search.timeout is None or time.monotonic() - start < config.search.timeout:
            if len(streak.states) >= config.search.max_infeasible_in_a_row:
                log(streak.stop_message(config, ctx))
                break
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # another machine's dead worker: failed, then retried
            with contextlib.ExitStack() as trial_scope:
                with lock():
                    fail_dead_local_trials(study, on_dead_trial)  # a dead process of this machine: at once
                    # waiting trials (warm starts, retries of a dead process's trial) are counted already: run them even at the goal
                    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
                    if goal.reached(study) and not waiting:
                        follow_ups = objective.evaluator.follow_up(study)  # one-shot: fine-tune the best inherited candidates
                        if not follow_ups:
                            break
                        for arch_text, of in follow_ups:
                            enqueue_architecture(study, arch_text, mine, fine_tune_of=of)
                        progress.extend(len(follow_ups))
                        log(f"Fine-tuning the {len(follow_ups)} best candidate(s) by supernet.score {config.supernet.score}: trial(s) "
                            f"{', '.join(str(of) for _, of in follow_ups)}.")
                    with exploring(study, after_duplicate):
                        trial = ask_next(study, config.search.seed)
                        # Optuna's own heartbeat thread, the one ``optimize`` runs (private API, pinned with optuna==5.0.0)
                        trial_scope.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
                        try:
                            TrialWriter(trial).started(me.host, me.pid, me.started, me.scope, mine)
                            arch, original = objective.propose(trial)  # under the lock: no two processes take one architecture
                            if original is not None:
                                objective.reuse(trial, arch, original)
                                study.tell(trial, state=optuna.trial.TrialState.FAIL)  # no new result for the sampler
                        except BaseException:
                            study.tell(trial, state=optuna.trial.TrialState.FAIL)
                            raise
                    after_duplicate = original is not None
                if original is None:
                    with objective.interrupt.installed():
                        _run_one(study, trial, objective, arch)
            if objective.interrupt.requested():  # Ctrl-C outside training: the trial finished, stop here
                raise KeyboardInterrupt
            finished = TrialRecord.from_trial(study._storage.get_trial(trial._trial_id))
            streak(finished.state)
            progress(study, finished, goal.counts(finished))
            _keep_best_weights(study, config.search.keep_best)
    except KeyboardInterrupt:
        status = "KILLED"
        log("Interrupted (Ctrl-C): a trial stopped in training is marked failed (state interrupted); run the same command again to resume the study.")
        raise
    except Exception as exc:  # the database went away: the report cannot be read from it; close the parent run and say so
        if not is_storage_lost(exc):
            raise
        status = "LOST"
        raise storage_lost(storage_url, study.study_name, exc) from None
    finally:
        if status == "LOST":
            with contextlib.suppress(Exception):  # the tracking store may be the same server: the error above is the one to show
                tracker.end_study(parent, status="KILLED")
        else:
            _finish(study, config, tracker, parent, status, time.monotonic() - opened, log)
    return study


def _finish(study: optuna.Study, config: ExperimentConfig, tracker: Tracker, parent: str, status: str, wall: float, log: Log) -> None:
    """Write the report, log it to the parent run and close the run unless other workers go on."""
    best = best_trial(study)
    metrics = {f"best_{k}": v for k, v in best.metrics.items()} if best else {}
    for path in write_report(study, config.out_dir / "report"):
        tracker.log_artifact(parent, path)
    if wall > 0 and config.tracking.enabled:
        log(f"Tracking: {tracker.seconds:.1f} s of this process's {wall:.0f} s search ({100 * tracker.seconds / wall:.1f}%).")
    still_running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    tags = {"best_trial": best.number if best else "none"}
    if still_running and status == "FINISHED":
        tracker.log(parent, metrics=metrics, tags=tags)  # other workers go on
    else:
        tracker.end_study(parent, metrics=metrics, tags=tags, status=status)


def train_study_supernet(config: ExperimentConfig, log: Log = print) -> None:
    """``nas supernet train``: the one-shot strategy's supernet of ``config``, trained (or resumed, or found
    trained) as a child run of the study's MLflow parent run, without running any trial."""
    OneShot.check_config(config)
    storage_url = config.storage_url
    check_storage(storage_url)
    if config.tracking.enabled:
        check_tracking_uri(config.tracking_uri)
    with file_lock(config.out_dir / ".gallery.lock"):
        ctx = prepare(config, log, check_study=lambda early: check_recorded_study(config, early))
        config = ctx.config  # budgets written relative to the gallery model are absolute from here on
    with study_lock(config.storage_url, config.search.study_name, config.out_dir):
        tracker = make_tracker(config, log)
        study, parent, paragon, _ = open_tracked_study(config, ctx, tracker, log, describe=False)
    evaluator = OneShot(ctx, paragon)
    status = "FINISHED"
    interrupt = Objective(evaluator, study, tracker, parent).interrupt
    try:
        with file_lock(config.out_dir / ".supernet.lock"), interrupt.installed():
            evaluator.prepare(log, tracker, parent, study.study_name, should_stop=interrupt.requested)
    except KeyboardInterrupt:
        status = "KILLED"
        log("Interrupted (Ctrl-C): run the same command again to resume the supernet from its last finished epoch.")
        raise
    finally:
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:  # a search on the study goes on: leave its parent run open
            tracker.end_study(parent, status=status)
