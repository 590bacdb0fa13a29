"""The progress line of a search: k of N never beyond N, and the best so far where only inherited-weight trials exist."""

from __future__ import annotations

import optuna

from nas.records import State, TrialRecord, TrialWriter, enqueue_architecture
from nas.search.coordination import Goal
from nas.search.driver import _trials_to_run
from nas.search.progress import Progress, best_so_far

ARCH = "space=timm res=32 width=0.5 model=lcnet_050 embed=16 in=1"


def _finished(study: optuna.Study, state: str, value: float, over_budget: bool = False, request: str = "r", **metrics: float) -> TrialRecord:
    """A trial told like the search tells it: its effective state, scores, budgets and constraints recorded."""
    trial = study.ask()
    trial.set_user_attr("state", state)
    trial.set_user_attr("request", request)
    trial.set_user_attr("metrics", {"val_mAP": value, "query_mAP": value, "query_mAP_ratio": value, **metrics})
    trial.set_user_attr("budgets", {"mflops": 1.5, "params_m": 0.1, "latency_ms": 0.4})
    TrialWriter(trial).constraints({"mflops": 1.0 if over_budget else -1.0})
    study.tell(trial, value)
    return TrialRecord.from_trial(study.trials[trial.number])


def test_best_so_far_names_the_best_inherited_trial_when_none_is_complete() -> None:
    study = optuna.create_study(direction="maximize")
    assert best_so_far(study) == "no feasible trial yet"
    _finished(study, State.INHERITED.value, 0.7, over_budget=True)  # over budget: not a candidate
    assert best_so_far(study) == "no feasible trial yet"
    _finished(study, State.INHERITED.value, 0.4)
    _finished(study, State.INHERITED.value, 0.5)
    assert best_so_far(study) == "best #2 val mAP 0.5000 with inherited weights (mflops 1.5, latency_ms 0.4)"
    _finished(study, State.COMPLETE.value, 0.3)  # a fine-tuned, feasible complete trial wins over inherited scores
    assert best_so_far(study) == "best #3 val mAP 0.3000 (mflops 1.5, latency_ms 0.4)"


def test_best_so_far_says_what_a_candidate_was_scored_with() -> None:
    """supernet.score tuned and gallery: the line names the short fine-tune (and the inherited score) or the gallery's weights."""
    study = optuna.create_study(direction="maximize")
    _finished(study, State.INHERITED.value, 0.6, inherited_val_mAP=0.45, train_seconds=2.0)
    assert best_so_far(study) == "best #0 val mAP 0.6000 after a short fine-tune (inherited weights: 0.4500) (mflops 1.5, latency_ms 0.4)"
    _finished(study, State.INHERITED.value, 0.7, gallery_start_kept_bn=1.0)
    assert best_so_far(study) == "best #1 val mAP 0.7000 with the gallery's pruned weights (mflops 1.5, latency_ms 0.4)"


def test_the_count_never_exceeds_the_total() -> None:
    study = optuna.create_study(direction="maximize")
    lines: list[str] = []
    progress = Progress(2, None, lines.append)
    for _ in range(2):
        progress(study, _finished(study, State.INHERITED.value, 0.5))
    assert "| 2/2]" in lines[-1] and "no feasible trial yet" not in lines[-1]
    progress.extend(2)  # one-shot: two fine-tunings after the budget
    progress(study, _finished(study, State.COMPLETE.value, 0.6))
    assert "| 3/4]" in lines[-1]
    progress(study, _finished(study, State.COMPLETE.value, 0.6))
    progress(study, _finished(study, State.COMPLETE.value, 0.6))  # one more than announced: N follows k
    assert "| 5/5]" in lines[-1]


def test_this_runs_trials_include_warm_starts_beyond_the_budget_and_waiting_retries() -> None:
    study = optuna.create_study(direction="maximize")
    for _ in range(5):
        enqueue_architecture(study, ARCH, "mine")
    assert _trials_to_run(study, Goal(3, "mine")) == 5  # all five warm starts run, though the budget is 3
    assert _trials_to_run(study, Goal(8, "mine")) == 8
    _finished(study, State.COMPLETE.value, 0.5, request="other")  # takes the first waiting trial: 4 stay
    assert _trials_to_run(study, Goal(8, "mine")) == 8
    assert _trials_to_run(study, Goal(8, None)) == 7  # nas worker: the study holds 1 finished, so 7 more (4 waiting, 3 new)
