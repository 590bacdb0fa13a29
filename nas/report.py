"""What a user reads after a search: tables, Pareto plots and parameter importances.

``write_report`` writes into ``<out>/report/`` at the end of every search (and on
``nas report``), and the files are logged to the study's MLflow parent run:

* ``results.txt``: every trial; ``top.txt``: the best ``top`` feasible trials;
* ``pareto.txt``: the Pareto front of val mAP against MFLOPs;
* ``pareto_mflops.png`` and ``pareto_latency.png``: asymmetric query mAP against MFLOPs
  and against latency, with the Pareto front, the paragon line and the hand-designed
  baselines (``nas baseline``) marked;
* ``importances.txt``: Optuna's fANOVA importance of each searched parameter for the val
  mAP of the feasible complete trials;
* ``baselines.txt`` when baselines were recorded;
* ``pictures.txt``: links to the retrieval pictures ``nas export`` drew (:mod:`nas.pictures`), or
  how to draw one.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna

from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.pictures import HTML_NAME, PNG_NAME, QUERIES, TOP_K
from nas.records import QUERY_MAP, StudyRecord
from nas.results import baselines_table, feasible_complete, pareto_front, pareto_table, results_table
from nas.secrets import mask_url
from nas.tracking import MlflowTracker

__all__ = ["write_report", "importances_table", "pictures_text", "log_report_to_mlflow"]


def _plot(study: optuna.Study, path: Path, cost: str, label: str) -> None:
    import matplotlib  # matplotlib is imported only when a plot is drawn: it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in feasible_complete(study) if cost in t.budgets]
    front = sorted((t for t in pareto_front(study, cost) if cost in t.budgets), key=lambda t: t.budgets[cost])
    info = StudyRecord.load(study)
    paragon = info.paragon_query.get("mAP")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([t.budgets[cost] for t in trials], [t.metrics[QUERY_MAP] for t in trials],
               s=18, color="0.6", label="feasible trials")
    ax.plot([t.budgets[cost] for t in front], [t.metrics[QUERY_MAP] for t in front],
            "o-", color="tab:red", label="Pareto front (val mAP)")
    for t in front:
        ax.annotate(f"#{t.number}", (t.budgets[cost], t.metrics[QUERY_MAP]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    baselines = {k: r for k, r in info.baselines.items() if cost in r["budgets"]}
    if baselines:
        ax.scatter([r["budgets"][cost] for r in baselines.values()], [r["metrics"]["query_mAP"] for r in baselines.values()],
                   marker="s", s=28, color="tab:green", label="hand-designed timm baselines")
        for key, r in baselines.items():
            ax.annotate(key, (r["budgets"][cost], r["metrics"]["query_mAP"]), fontsize=6, color="tab:green",
                        textcoords="offset points", xytext=(3, -8))
    if paragon is not None:
        ax.axhline(paragon, color="tab:blue", linestyle="--", label=f"paragon (gallery model, symmetric) {paragon:.3f}")
    if baselines and any(r["budgets"][cost] > 10 * max((t.budgets[cost] for t in trials), default=1) for r in baselines.values()):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("asymmetric query mAP")
    ax.set_title(f"study {study.study_name}: asymmetric mAP against {cost}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def importances_table(study: optuna.Study) -> str:
    """fANOVA importances of the searched parameters for the val mAP of feasible complete trials."""
    keep = {r.number for r in feasible_complete(study) if r.params}
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in keep]  # Optuna's own trials, for a copy of the study
    if len(trials) < 3:
        return f"Parameter importances need at least 3 feasible complete trials with sampled parameters; this study has {len(trials)}."
    copy = optuna.create_study(directions=study.directions)
    copy.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            importances = optuna.importance.get_param_importances(copy, target=lambda t: t.values[0], evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
        except (ValueError, RuntimeError) as exc:
            return f"Parameter importances could not be computed: {exc}"
    lines = [f"Importance of each parameter for val mAP (fANOVA, {len(trials)} feasible complete trials; sums to 1):"]
    lines += [f"  {name:<20} {value:6.3f}  {'#' * round(40 * value)}" for name, value in importances.items()]
    return "\n".join(lines)


def pictures_text(study: optuna.Study) -> str:
    """Where the retrieval pictures of the study's exports are, or the command that draws one."""
    info = StudyRecord.load(study)
    found = {int(trial): Path(png) for trial, png in info.pictures.items() if Path(png).is_file()}
    if found:
        lines = [f"Retrieval pictures of exported trials ({QUERIES} fixed queries: the query network's top {TOP_K} beside the gallery model's own):"]
        lines += [f"  trial {trial}: {png}  (page: {png.with_name(HTML_NAME)})" for trial, png in sorted(found.items())]
        return "\n".join(lines)
    raw = info.config or {}
    out = Path(info.out_dir or raw.get("out") or Path("runs") / study.study_name)
    storage = (raw.get("search") or {}).get("storage")
    where = f"--storage {mask_url(storage)}" if storage else f"--run-dir {out}"
    return (f"No retrieval picture yet. Export a trial to draw one ({PNG_NAME} and {HTML_NAME} in the export folder, linked from its "
            f"MODEL_CARD.md):\n  .venv/bin/nas export --study-name {study.study_name} {where} --out {out / 'export'}")


def write_report(study: optuna.Study, folder: str | Path, top: int = 10) -> list[Path]:
    """Write the report files (see the module docstring) into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "results.txt": results_table(study),
        "top.txt": results_table(study, top=top),
        "pareto.txt": pareto_table(study),
        "importances.txt": importances_table(study),
        "pictures.txt": pictures_text(study),
    }
    if StudyRecord.load(study).baselines:
        texts["baselines.txt"] = baselines_table(study)
    files = []
    for name, text in texts.items():
        (folder / name).write_text(text + "\n")
        files.append(folder / name)
    if pareto_front(study):
        for cost, label in (
            ("mflops", "MFLOPs (millions of multiply-accumulates, fvcore, batch 1)"),
            ("latency_ms", "latency (ms median on the study's runtime)"),
        ):
            path = folder / f"pareto_{cost.split('_')[0]}.png"
            _plot(study, path, cost, label)
            files.append(path)
    return files


def log_report_to_mlflow(study, files, tracking_uri: str | None = None) -> str:
    """Log the report files to the study's MLflow parent run (at ``tracking_uri``, default the recorded one), when it has one."""
    info = StudyRecord.load(study)
    parent, raw = info.mlflow_parent_run_id, info.config
    if parent is None or raw is None:
        return "MLflow: the study has no parent run (tracking was off); files not logged."
    config = config_from_dict({**raw, "out": info.out_dir or raw.get("out")})
    try:
        uri = tracking_uri or config.tracking_uri  # a recorded URI whose password was masked: a clear error
    except ConfigError as exc:
        return f"MLflow: files not logged: {exc}"
    experiment = config.tracking.experiment or config.search.study_name
    tracker = MlflowTracker(uri, experiment, config.out_dir / "mlartifacts", log=print, journal_dir=config.out_dir)
    for path in files:
        tracker.log_artifact(parent, path)
    tracker.flush()
    return f"MLflow: logged {len(files)} file(s) to the parent run {parent} at {mask_url(tracker.uri)}."
