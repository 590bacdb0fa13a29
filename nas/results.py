"""Read-only queries on a study: the best trial, the Pareto front, counted trials and the tables.

Everything here reads :mod:`nas.records` and writes nothing, so ``nas results``,
``nas report``, ``nas export`` and the driver's progress line share one definition of
"best", "feasible" and "counted".
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from nas.config import ExperimentConfig
from nas.records import QUERY_MAP, QUERY_MAP_RATIO, QUERY_R1, VAL_MAP, State, StudyRecord, TrialRecord, trial_records
from nas.secrets import mask_url

__all__ = [
    "feasible_complete",
    "best_trial",
    "pareto_front",
    "front_cost",
    "counted_trials",
    "counts_toward",
    "state_counts",
    "results_table",
    "pareto_table",
    "baselines_table",
    "recall_text",
    "summary",
    "fmt",
]


def feasible_complete(study: optuna.Study) -> list[TrialRecord]:
    """Trials trained to the end within every budget, by number."""
    return [r for r in trial_records(study, states=(TrialState.COMPLETE,)) if r.feasible_complete]


def best_trial(study: optuna.Study) -> TrialRecord | None:
    """The feasible complete trial with the highest objective (val mAP; the earliest on a tie); ``None`` if there is none."""
    trials = feasible_complete(study)
    return max(trials, key=lambda t: (t.values[0], -t.number)) if trials else None


def pareto_front(study: optuna.Study, cost: str = "mflops") -> list[TrialRecord]:
    """Feasible complete trials that no other beats on both val mAP (higher) and ``cost`` (lower).

    Ordered by the cost, smallest first: ``pareto:K`` in ``nas export`` is the K-th (from 0)
    of the study's front.
    """
    trials = [t for t in feasible_complete(study) if cost in t.budgets]
    front = []
    for t in trials:
        value, c = t.values[0], t.budgets[cost]
        dominated = any(
            o.values[0] >= value and o.budgets[cost] <= c and (o.values[0] > value or o.budgets[cost] < c) for o in trials
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.budgets[cost], -t.values[0]))


def front_cost(study: optuna.Study) -> str:
    """The cost the study's Pareto front is taken against: its first cost objective, else MFLOPs."""
    objectives = StudyRecord.load(study).objectives
    return objectives[1] if len(objectives) > 1 else "mflops"


def counts_toward(record: TrialRecord, retried: set[int]) -> bool:
    """Whether a trial counts toward a trial budget (``search.trials``, ``nas worker --trials``).

    Every trial counts (complete, pruned, failed, running, waiting) except an infeasible
    one (over budget: rejected before any training), a duplicate (an architecture another
    trial evaluated or is evaluating: not trained again) and a failed one whose number is
    in ``retried`` (its retry counts instead).
    """
    if record.state in (State.INFEASIBLE, State.DUPLICATE):
        return False
    return not (record.optuna_state == TrialState.FAIL and record.number in retried)


def counted_trials(study: optuna.Study, request: str | None = None) -> int:
    """Trials that count toward the study's trial budget (:func:`counts_toward`); given ``request``,
    only those counting toward that ``nas search`` invocation (a retry counts toward its original's)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    records = [TrialRecord.from_trial(t) for t in trials]
    return sum(1 for r in records if counts_toward(r, retried) and (request is None or r.request == request))


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many trials are in each effective state."""
    counts: dict[str, int] = {}
    for r in trial_records(study):
        counts[r.state] = counts.get(r.state, 0) + 1
    return counts


def fmt(value: Any, spec: str) -> str:
    """``format(value, spec)``, or a dash as wide as the spec's width when there is no value."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


def results_table(study: optuna.Study, top: int | None = None) -> str:
    """A plain-text table of the study's trials (best first when ``top`` is given)."""
    trials = [r for r in trial_records(study) if r.optuna_state != TrialState.RUNNING]
    if top is not None:
        trials = sorted(feasible_complete(study), key=lambda t: -t.values[0])[:top]
    best = best_trial(study)
    header = f"{'trial':>5} {'state':<11} {'res':>3} {'width':>5} {'MFLOPs':>7} {'params M':>8} {'lat ms':>6} {'val mAP':>7} {'mAP':>6} {'R@1':>6} {'ratio':>6}"
    lines = [header, "-" * len(header)]
    for t in trials:
        b, m = t.budgets, t.metrics
        state = t.state if t.duplicate_of is None else f"dup of {t.duplicate_of}"
        mark = "*" if best is not None and t.number == best.number else " "
        lines.append(
            f"{t.number:>4}{mark} {state:<11} {fmt(_field(t, 'resolution', 'res'), '>3')} {fmt(_field(t, 'width', 'width'), '>5')} "
            f"{fmt(b.get('mflops'), '7.3f')} {fmt(b.get('params_m'), '8.3f')} {fmt(b.get('latency_ms'), '6.2f')} "
            f"{fmt(m.get(VAL_MAP), '7.4f')} {fmt(m.get(QUERY_MAP), '6.4f')} {fmt(m.get(QUERY_R1), '6.4f')} {fmt(m.get(QUERY_MAP_RATIO), '6.3f')}"
        )
    return "\n".join(lines)


def _field(t: TrialRecord, param: str, token: str) -> Any:
    """A sampled parameter of the trial, else (an enqueued trial: warm start, fine-tuning) that field of its architecture string."""
    if param in t.params:
        return t.params[param]
    value = next((v for k, _, v in (tok.partition("=") for tok in (t.arch or "").split()) if k == token), None)
    return None if value is None else float(value) if token == "width" else int(value)


def pareto_table(study: optuna.Study, cost: str | None = None) -> str:
    """The Pareto front of val mAP against ``cost`` (default :func:`front_cost`), with the ``pareto:K`` index of each point."""
    cost = cost or front_cost(study)
    lines = [f"{'K':>3} {'trial':>5} {'MFLOPs':>7} {'lat ms':>6} {'val mAP':>7} {'query mAP':>9} {'ratio':>6}"]
    for k, t in enumerate(pareto_front(study, cost)):
        b, m = t.budgets, t.metrics
        lines.append(
            f"{k:>3} {t.number:>5} {b['mflops']:>7.3f} {b['latency_ms']:>6.2f} {m[VAL_MAP]:>7.4f} {m[QUERY_MAP]:>9.4f} {m[QUERY_MAP_RATIO]:>6.3f}"
        )
    return "\n".join(lines)


def baselines_table(study: optuna.Study) -> str:
    """The study's hand-designed baselines (``nas baseline``): budgets, whether they fit, and their scores."""
    baselines = StudyRecord.load(study).baselines
    header = (f"{'baseline':<28} {'fits':<4} {'MFLOPs':>8} {'params M':>8} {'mem MiB':>7} {'lat ms':>6} "
              f"{'val mAP':>7} {'mAP':>6} {'R@1':>6} {'ratio':>6}")
    lines = [header, "-" * len(header)]
    for key, r in sorted(baselines.items(), key=lambda kv: kv[1]["budgets"].get("mflops", 0)):
        b, m = r["budgets"], r["metrics"]
        lines.append(
            f"{key:<28} {'yes' if r['fits'] else 'no':<4} {fmt(b.get('mflops'), '8.3f')} {fmt(b.get('params_m'), '8.3f')} "
            f"{fmt(b.get('memory_mb'), '7.2f')} {fmt(b.get('latency_ms'), '6.2f')} {fmt(m.get(VAL_MAP), '7.4f')} "
            f"{fmt(m.get(QUERY_MAP), '6.4f')} {fmt(m.get(QUERY_R1), '6.4f')} {fmt(m.get(QUERY_MAP_RATIO), '6.3f')}"
        )
    return "\n".join(lines)


def recall_text(metrics: dict[str, float], prefix: str = "") -> str:
    """``R@1 x``, or for the revisited Oxford/Paris protocols (no R@K) ``mP@10 (medium) x``."""
    if f"{prefix}R@1" in metrics:
        return f"R@1 {metrics[f'{prefix}R@1']:.4f}"
    if f"{prefix}mP@10_medium" in metrics:
        return f"mP@10 (medium) {metrics[f'{prefix}mP@10_medium']:.4f}"
    return "no R@1"


def summary(study: optuna.Study, config: ExperimentConfig) -> str:
    """Results table, the best trial against the paragon, and where to look next."""
    info = StudyRecord.load(study)
    paragon, gallery = info.paragon_query, info.gallery_budgets
    lines = [results_table(study), ""]
    objectives = list(config.search.objectives)
    if len(objectives) > 1:
        for cost in objectives[1:]:
            lines.append(f"Pareto front, the result of this multi-objective study (val mAP against {cost}; export one with --trial pareto:K):")
            lines += [pareto_table(study, cost), ""]
    counts = state_counts(study)
    lines.append(f"Trials: {len(study.trials)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    if paragon:
        lines.append(
            f"Paragon ({config.gallery.model} on both sides, {gallery.get('mflops', float('nan')):.2f} MFLOPs): "
            f"query mAP {paragon['mAP']:.4f}, {recall_text(paragon)}"
        )
    best = best_trial(study)
    if best is None:
        lines.append("No feasible trial has completed yet.")
    else:
        m, b = best.metrics, best.budgets
        share = b["mflops"] / gallery["mflops"] if gallery.get("mflops") else float("nan")
        lines.append(
            f"Best trial #{best.number}: asymmetric query mAP {m[QUERY_MAP]:.4f} = {m[QUERY_MAP_RATIO]:.3f} of the paragon; "
            f"{recall_text(m, 'query_')}; {b['mflops']:.3f} MFLOPs (1/{1 / share:.1f} of the gallery model), "
            f"{b['params_m']:.3f} M params, {b['latency_ms']:.2f} ms"
        )
        lines.append(f"  architecture: {best.arch}")
    lines.append("")
    if not config.tracking.enabled:
        lines.append("Tracking is off (tracking.enabled: false): no MLflow runs were recorded; set tracking.enabled: true to record the next searches.")
    else:
        lines.append("Browse the trials in the MLflow UI:")
        if config.tracking.uri:
            lines.append(f"  .venv/bin/nas ui --tracking-uri {mask_url(config.tracking.uri)}")
        else:
            lines.append(f"  .venv/bin/nas ui --run-dir {config.out_dir}")
    storage = f" --storage {mask_url(config.search.storage)}" if config.search.storage else f" --run-dir {config.out_dir}"
    if best is not None:  # else an export has nothing to export
        lines.append("Export the best query network:")
        lines.append(f"  .venv/bin/nas export --study-name {study.study_name}{storage} --out {config.out_dir / 'export'}")
    else:
        lines.append(f"No feasible trial to export yet; the trials: .venv/bin/nas results --study-name {study.study_name}{storage}")
    return "\n".join(lines)
