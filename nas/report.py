"""Report files of a study: the results table, the Pareto front and its plot.

Written into ``<out>/report/`` at the end of every search and logged to the study's
MLflow parent run as artifacts.
"""

from __future__ import annotations

from pathlib import Path

import optuna

__all__ = ["write_report"]


def _plot(study: optuna.Study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nas.study import _feasible_complete, pareto_front

    trials = _feasible_complete(study)
    front = pareto_front(study)
    paragon = study.user_attrs.get("paragon", {}).get("query", {}).get("mAP")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter(
        [t.user_attrs["budgets"]["mflops"] for t in trials],
        [t.user_attrs["metrics"]["query_mAP"] for t in trials],
        s=18, color="0.6", label="complete trials",
    )
    ax.plot(
        [t.user_attrs["budgets"]["mflops"] for t in front],
        [t.user_attrs["metrics"]["query_mAP"] for t in front],
        "o-", color="tab:red", label="Pareto front (val mAP vs MFLOPs)",
    )
    for t in front:
        ax.annotate(f"#{t.number}", (t.user_attrs["budgets"]["mflops"], t.user_attrs["metrics"]["query_mAP"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
    if paragon is not None:
        ax.axhline(paragon, color="tab:blue", linestyle="--", label=f"paragon (gallery model, symmetric) {paragon:.3f}")
    ax.set_xlabel("MFLOPs (millions of multiply-accumulates, fvcore, batch 1)")
    ax.set_ylabel("asymmetric query mAP")
    ax.set_title(f"study {study.study_name}: asymmetric mAP against MFLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(study: optuna.Study, folder: str | Path) -> list[Path]:
    """Write ``results.txt``, ``pareto.txt`` and ``pareto.png`` (when there are complete trials)."""
    from nas.study import pareto_front, pareto_table, results_table

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "results.txt", folder / "pareto.txt"]
    files[0].write_text(results_table(study) + "\n")
    files[1].write_text(pareto_table(study) + "\n")
    if pareto_front(study):
        _plot(study, folder / "pareto.png")
        files.append(folder / "pareto.png")
    return files
