"""One trial: architecture -> budgets -> evaluation -> record.

:meth:`Objective.propose` (called by the driver under the study lock) takes the trial's
architecture (an enqueued one, else the space's sample) and finds an earlier trial of the
same architecture (finished, running in another process, or queued for a retry); such a
trial is recorded by :meth:`Objective.reuse` as a duplicate, not trained and not counted.
Otherwise :meth:`Objective.__call__` builds the candidate with the study's evaluator,
checks the hardware budgets on it (an infeasible candidate is recorded with its reason
and never evaluated), evaluates it with per-epoch reports to the pruner (or the
promotion rule of multi-objective studies), keeps its weights and writes its record
(:mod:`nas.records`) and MLflow child run. The objective value is the asymmetric mAP of
the **val** images; the reported scores are those of the **query** images, which the
search never sees. A candidate scored with inherited weights (the one-shot strategy) is
recorded in state ``inherited`` without weights; a queued fine-tuning of one
(``fine_tune_of``) is evaluated by :meth:`Evaluator.for_trial`'s evaluator, never pruned
and never a duplicate of the trial it fine-tunes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import torch
from safetensors.torch import save_file

from nas.hardware import check_budgets
from nas.records import VAL_MAP, State, TrialRecord, TrialWriter, trial_records, trial_seed
from nas.search.evaluators import Evaluator
from nas.tracking import Tracker
from search_spaces import Architecture
from trainers import EpochResult, TrainingDiverged

__all__ = ["Objective", "DeferredInterrupt"]


class DeferredInterrupt:
    """Ctrl-C during a search, deferred to a safe point.

    A ``KeyboardInterrupt`` raised at an arbitrary bytecode can land inside a database
    transaction (Optuna's or MLflow's SQLite store) and leave a write lock held, so the
    clean-up that marks the trial interrupted would wait on it. While :meth:`installed`,
    the first Ctrl-C only sets a flag; training checks :meth:`requested` before every step
    and the search loop between trials, and both raise ``KeyboardInterrupt`` there. A
    second Ctrl-C interrupts at once.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    def requested(self) -> bool:
        return self._event.is_set()

    def _handler(self, signum: int, frame: object) -> None:
        if self._event.is_set():
            raise KeyboardInterrupt
        self._event.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers live in the main thread only
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class Objective:
    """One trial, as described in the module docstring. Returns the val asymmetric mAP (and the cost objectives)."""

    def __init__(self, evaluator: Evaluator, study: optuna.Study, tracker: Tracker, parent_run: str) -> None:
        self.evaluator = evaluator
        self.ctx = evaluator.ctx
        self.study = study
        self.tracker = tracker
        self.parent_run = parent_run
        self.weights_dir = self.ctx.config.out_dir / "checkpoints"
        self.interrupt = DeferredInterrupt()

    def __call__(self, trial: optuna.Trial, arch: Architecture) -> float | tuple[float, ...]:
        """Evaluate ``arch``, the architecture :meth:`propose` chose for ``trial``."""
        record = TrialWriter(trial)
        run_id = self._start_run(trial, arch)
        try:
            return self._run(trial, arch, record, run_id)
        except optuna.TrialPruned as exc:
            self._end(record, run_id, State.PRUNED, str(exc))
            raise
        except TrainingDiverged as exc:
            self._end(record, run_id, State.FAILED, str(exc))
            raise
        except KeyboardInterrupt:
            self._end(record, run_id, State.INTERRUPTED, "interrupted by the user (Ctrl-C)")
            raise
        except Exception as exc:
            self._end(record, run_id, State.FAILED, f"{type(exc).__name__}: {exc}")
            raise

    def propose(self, trial: optuna.Trial) -> tuple[Architecture, TrialRecord | None]:
        """The trial's architecture, recorded, and the earlier trial it repeats (``None`` if it is new).

        Call under the study lock, so that two processes never both take one architecture.
        """
        record = TrialWriter(trial)
        fixed = record.warm_start_arch()
        arch = Architecture.from_string(fixed) if fixed is not None else self.ctx.space.sample(trial)
        record.architecture(arch.to_string(), arch.arch_id)
        return arch, self._duplicate_of(arch, trial.number, fine_tune=record.fine_tune_of() is not None)

    def reuse(self, trial: optuna.Trial, arch: Architecture, original: TrialRecord) -> None:
        """Record ``trial`` as a duplicate of ``original`` (not trained, not counted) with its MLflow run."""
        reason = f"same architecture as trial {original.number} ({'running in another process' if original.state == State.RUNNING else original.state})"
        TrialWriter(trial).duplicate(original, reason)
        run_id = self._start_run(trial, arch)
        self.tracker.log(run_id, tags={"asymnas.duplicate_of": original.number})
        self.tracker.end_trial(run_id, State.DUPLICATE.value, reason, {**original.budgets, **original.metrics})

    def _start_run(self, trial: optuna.Trial, arch: Architecture) -> str:
        run_id = self.tracker.start_trial(self.parent_run, trial)
        tags = {"asymnas.arch_id": arch.arch_id}
        fine_tune_of = TrialWriter(trial).fine_tune_of()
        if fine_tune_of is not None:
            tags["asymnas.fine_tune_of"] = fine_tune_of
        self.tracker.log(run_id, params={**trial.params, "trial_number": trial.number, "arch": arch.to_string()}, tags=tags)
        self.tracker.log_text(run_id, arch.to_json(), "arch.json")
        return run_id

    def _end(self, record: TrialWriter, run_id: str, state: State, reason: str) -> None:
        record.outcome(state, reason)
        self.tracker.end_trial(run_id, state.value, reason)

    # ---------------------------------------------------------------- steps
    def _duplicate_of(self, arch: Architecture, number: int, fine_tune: bool = False) -> TrialRecord | None:
        """The earliest other trial of ``arch`` with a result (complete, infeasible, pruned), running, or queued for a retry.

        A failed or interrupted trial is no result: its architecture may be proposed again.
        """
        if fine_tune:  # a follow-up of one inherited-weight trial: never a duplicate of it
            return None
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        for other in trial_records(self.study, states=states):
            if other.number != number and other.arch_id == arch.arch_id and other.state != State.DUPLICATE and other.fine_tune_of is None:
                return other
        return None

    def _values(self, val_map: float, budgets: dict[str, float]) -> float | tuple[float, ...]:
        """The objective value(s): val mAP, then each cost objective (a cost not measured counts as 1e9)."""
        costs = self.ctx.config.search.objectives[1:]
        if not costs:
            return float(val_map)
        return (float(val_map), *(float(budgets.get(name, 1e9)) for name in costs))

    def _run(self, trial: optuna.Trial, arch: Architecture, record: TrialWriter, run_id: str) -> float | tuple[float, ...]:
        ctx = self.ctx
        seed = trial_seed(ctx.config.search.seed, trial.number)
        record.seed(seed)
        evaluator = self.evaluator.for_trial(record.fine_tune_of())
        model = evaluator.build(arch, seed)
        report = check_budgets(model, arch.resolution, arch.in_chans, ctx.budgets)
        record.constraints({budget.name: value for budget, value in zip(ctx.budgets, report.constraints, strict=True)})
        record.budgets(report.values, report.seconds)
        if not report.feasible:
            record.outcome(State.INFEASIBLE, report.reason)
            self.tracker.end_trial(run_id, State.INFEASIBLE.value, report.reason, {**report.values, "budget_check_seconds": report.seconds})
            return self._values(0.0, report.values)
        self.tracker.log(run_id, metrics=report.values)
        return self._evaluate(trial, record, run_id, evaluator, model, seed, report.values)

    def _evaluate(self, trial: optuna.Trial, record: TrialWriter, run_id: str, evaluator: Evaluator, model: torch.nn.Module, seed: int,
                  budgets: dict[str, float]) -> float | tuple[float, ...]:
        search = self.ctx.config.search
        fine_tune = record.fine_tune_of() is not None
        multi = len(search.objectives) > 1
        curve: dict[str, float] = {}

        def on_epoch(result: EpochResult, val: dict[str, float]) -> None:
            self.tracker.log(run_id, metrics={"train_loss": result.train_loss, "val_mAP": val["mAP"], "epoch_seconds": result.seconds}, step=result.epoch)
            if fine_tune:  # the chosen few of a one-shot search: trained to the end, never pruned
                return
            if multi:  # Optuna's pruners do not support multi-objective studies: the promotion rule
                curve[str(result.epoch)] = val["mAP"]
                record.val_curve(curve)
                if result.epoch == search.promotion_epoch:
                    beaten_by = self._dominating_at_epoch(trial.number, result.epoch, val["mAP"], budgets)
                    if beaten_by >= search.promotion_dominated_by:
                        raise optuna.TrialPruned(
                            f"not promoted: at epoch {result.epoch} {beaten_by} earlier trials beat its val mAP {val['mAP']:.4f} "
                            f"at lower or equal {', '.join(search.objectives[1:])}"
                        )
                return
            trial.report(val["mAP"], result.epoch)
            # after the last epoch the training is done: a result, never a pruned trial
            if result.epoch < self.ctx.config.train.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"val mAP {val['mAP']:.4f} at epoch {result.epoch} is below what the {search.pruner} pruner keeps")

        evaluation = evaluator.evaluate(model, seed, on_epoch, should_stop=self.interrupt.requested)
        metrics = evaluation.metrics
        if evaluation.inherited:  # scored with a supernet's weights: re-extracted when needed, not kept
            record.outcome(State.INHERITED, "scored with weights inherited from the supernet (not trained)", metrics=metrics,
                           fingerprint=self.ctx.fingerprint.digest)
            self.tracker.log(run_id, tags={"asymnas.inherited": "true"})
            self.tracker.end_trial(run_id, State.INHERITED.value, None, metrics)
            return self._values(metrics[VAL_MAP], budgets)
        record.outcome(State.COMPLETE, metrics=metrics, weights=str(self._save_weights(trial.number, evaluation.model)),
                       fingerprint=self.ctx.fingerprint.digest)
        # val_mAP is already in the run, once per epoch; the last epoch's value is the final one
        self.tracker.end_trial(run_id, State.COMPLETE.value, None, {k: v for k, v in metrics.items() if k != VAL_MAP})
        return self._values(metrics[VAL_MAP], budgets)

    def _dominating_at_epoch(self, number: int, epoch: int, val_map: float, budgets: dict[str, float]) -> int:
        """How many earlier trials had a higher val mAP at ``epoch`` at no higher cost on every cost objective."""
        costs = self.ctx.config.search.objectives[1:]
        count = 0
        for other in trial_records(self.study):
            theirs = other.val_curve.get(str(epoch))
            if other.number == number or theirs is None:
                continue
            cheaper = all(other.budgets.get(c, float("inf")) <= budgets.get(c, float("inf")) for c in costs)
            if theirs > val_map and cheaper:
                count += 1
        return count

    def _save_weights(self, number: int, model: torch.nn.Module) -> Path:
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        path = (self.weights_dir / f"trial-{number}.safetensors").resolve()
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
        return path
