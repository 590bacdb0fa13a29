"""The progress line a search prints after every trial."""

from __future__ import annotations

import time

import optuna

from nas.records import QUERY_MAP, QUERY_MAP_RATIO, VAL_MAP, State, TrialRecord, trial_records
from nas.results import best_trial
from nas.search.context import Log

__all__ = ["Progress", "best_so_far"]


class Progress:
    """One line per finished trial: k of N, state, scores, best so far, elapsed and remaining.

    Only a trial that counts toward this process's goal advances ``k``; a candidate rejected
    over budget, a duplicate of an evaluated architecture, and a trial run for another
    search (a retry of a killed process's trial) are listed without advancing it. Trials
    added beyond the budget (one-shot fine-tuning) raise ``N`` (:meth:`extend`); ``k`` never
    exceeds it. The best so far is the best feasible complete trial, else (one-shot) the best
    feasible one scored with inherited weights.
    """

    def __init__(self, total: int, timeout: float | None, log: Log) -> None:
        self.total, self.timeout, self.log = total, timeout, log
        self.start = time.perf_counter()
        self.done = 0
        self.rejected = 0
        self.duplicates = 0

    def extend(self, trials: int) -> None:
        """``trials`` more will run than the budget said (fine-tuning after a one-shot search)."""
        self.total += trials

    def __call__(self, study: optuna.Study, trial: TrialRecord, counted: bool = True) -> None:
        if trial.state == State.INFEASIBLE:
            self.rejected += 1
            self.log(
                f"[trial {trial.number:>3} | rejected] over budget in {trial.budget_seconds or 0:.2f} s, not trained: "
                f"{trial.reason or ''} ({self.rejected} rejected so far)"
            )
            return
        if trial.state == State.DUPLICATE:
            self.duplicates += 1
            self.log(f"[trial {trial.number:>3} | duplicate] {trial.reason or ''}: not trained, not counted ({self.duplicates} so far)")
            return
        elapsed = time.perf_counter() - self.start
        if counted:
            self.done += 1
            self.total = max(self.total, self.done)  # e.g. a trial of this request that another process began
            label = f"{self.done}/{self.total}"
        else:
            label = f"retry of {trial.retry_of}" if trial.retry_of is not None else "for another search"
        remaining = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
        if self.timeout is not None:
            remaining = min(remaining, max(self.timeout - elapsed, 0.0))
        m, b = trial.metrics, trial.budgets
        detail = ""
        if trial.state == State.COMPLETE:
            detail = f"val mAP {m[VAL_MAP]:.4f}, query mAP {m[QUERY_MAP]:.4f} ({m[QUERY_MAP_RATIO]:.3f} of paragon)"
            if trial.fine_tune_of is not None:
                detail += f", fine-tuned from trial {trial.fine_tune_of}"
        elif trial.state == State.INHERITED:
            detail = f"val mAP {m[VAL_MAP]:.4f} {scored_with(m)}"
        elif trial.reason is not None:
            detail = trial.reason
        budgets = ", ".join(f"{k} {b[k]:.3g}" for k in ("mflops", "params_m", "latency_ms") if k in b)
        self.log(
            f"[trial {trial.number:>3} | {label}] {trial.state:<10} {detail} [{budgets}] | {best_so_far(study)} | "
            f"elapsed {elapsed / 60:.1f} min, ~{remaining / 60:.1f} min left"
        )


def scored_with(metrics: dict[str, float]) -> str:
    """What a one-shot candidate's score was measured with (``supernet.score``, read from the metrics it records)."""
    if "inherited_val_mAP" in metrics:
        return f"after a short fine-tune (inherited weights: {metrics['inherited_val_mAP']:.4f})"
    if "gallery_start_kept_bn" in metrics:
        return "with the gallery's pruned weights"
    return "with inherited weights"


def best_so_far(study: optuna.Study) -> str:
    """The best feasible complete trial; without one, the best feasible trial scored with inherited weights (one-shot)."""
    best = best_trial(study)
    how = ""
    if best is None:
        inherited = [r for r in trial_records(study, states=(optuna.trial.TrialState.COMPLETE,))
                     if r.state == State.INHERITED and r.feasible and r.values]
        if not inherited:
            return "no feasible trial yet"
        best = max(inherited, key=lambda r: (r.values[0], -r.number))
        how = " " + scored_with(best.metrics)
    bb = best.budgets
    return (f"best #{best.number} val mAP {best.values[0]:.4f}{how} ("
            + ", ".join(f"{k} {bb[k]:.3g}" for k in ("mflops", "latency_ms") if k in bb) + ")")
