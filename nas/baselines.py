"""Hand-designed baselines: off-the-shelf timm models trained and scored like a search trial.

``nas baseline CONFIG --models mobilenetv3_small_050,lcnet_050 --resolutions 32,48``
trains each timm model (classifier replaced by the embedding head, random init) with the
experiment's loss, epochs, data and seed rule, measures the same budgets (all of them,
whether or not a limit is exceeded: a baseline that does not fit is still worth seeing),
and records the result on the study (``study.user_attrs['baselines']``) and as an MLflow
child run of the study's parent run tagged ``asymnas.role=baseline``, beside the trials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from nas.config import ExperimentConfig
from nas.errors import ConfigError
from nas.hardware import check_budgets, make_budgets
from nas.locks import file_lock, study_lock
from nas.records import QUERY_MAP, QUERY_MAP_RATIO, StudyRecord, StudyWriter, baseline_seed
from nas.search.context import prepare
from nas.search.driver import check_recorded_study, open_tracked_study
from nas.search.evaluators import TrainFromScratch
from nas.search.optuna_setup import check_storage
from nas.tracking import make_tracker
from search_spaces import timm_architecture, timm_model_exists
from trainers import EpochResult

__all__ = ["run_baselines", "DEFAULT_BASELINES"]

Log = Callable[[str], None]

#: The small timm models a user would otherwise pick.
DEFAULT_BASELINES = ("mobilenetv3_small_050", "mobilenetv3_small_100", "lcnet_050", "efficientnet_lite0", "resnet18")


def run_baselines(config: ExperimentConfig, models: Sequence[str], resolutions: Sequence[int], log: Log = print) -> optuna.Study:
    """Train and score every ``model`` at every resolution; returns the study holding the results.

    A hand-designed baseline is trained from scratch whatever the study's strategy: it is
    the reference a searched net is compared with, trained as a user would train it.
    """
    unknown = [m for m in models if not timm_model_exists(m)]
    if unknown:
        raise ConfigError(f"Unknown timm model(s) {', '.join(unknown)}; `python -c \"import timm; print(timm.list_models('lcnet*'))\"` lists names.")
    small = [r for r in resolutions if r < 32]
    if small:
        raise ConfigError(f"Baseline resolutions must be >= 32 (timm's nets downsample 32x), but got {small}.")
    check_storage(config.storage_url)  # a storage typo or a damaged database: before the gallery model is trained
    with file_lock(config.out_dir / ".gallery.lock"):
        ctx = prepare(config, log, check_study=lambda early: check_recorded_study(config, early))
        config = ctx.config  # budgets written relative to the gallery model are absolute from here on
    with study_lock(config.storage_url, config.search.study_name, config.out_dir):
        tracker = make_tracker(config, log)
        study, parent, paragon, _ = open_tracked_study(config, ctx, tracker, log, describe=False)
    evaluator = TrainFromScratch(ctx, paragon)
    results: dict[str, Any] = dict(StudyRecord.load(study).baselines)
    # a baseline's latency is always measured, never only predicted from the lookup table
    latency = dataclasses.replace(config.budgets.latency, predict=False)
    budgets = make_budgets(dataclasses.replace(config.budgets, latency=latency))
    seed = baseline_seed(config.search.seed)
    for model_name in models:
        for resolution in resolutions:
            key = f"{model_name}@{resolution}"
            arch = timm_architecture(model_name, resolution, ctx.space.embed_dim, ctx.data.channels)
            net = evaluator.build(arch, seed)
            report = check_budgets(net, resolution, arch.in_chans, budgets, measure_all=True)
            fits = report.feasible
            run_id = tracker.start_baseline(parent, study.study_name, key)
            tracker.log(run_id, params={"arch": arch.to_string(), "timm_model": model_name, "resolution": resolution}, metrics=report.values,
                        tags={"asymnas.arch_id": arch.arch_id, "asymnas.fits_budget": str(fits).lower()})
            log(f"Baseline {key}: {', '.join(f'{k} {v:.3g}' for k, v in report.values.items())}; "
                f"{'fits the budgets' if fits else 'over budget: ' + report.reason}; training")

            def on_epoch(result: EpochResult, val: dict[str, float], _run: str = run_id) -> None:
                tracker.log(_run, metrics={"train_loss": result.train_loss, "val_mAP": val["mAP"], "epoch_seconds": result.seconds}, step=result.epoch)

            metrics = evaluator.evaluate(net, seed, on_epoch).metrics
            tracker.end_trial(run_id, "complete", None if fits else report.reason, {k: v for k, v in metrics.items() if k != "val_mAP"})
            results[key] = {
                "arch": arch.to_string(), "budgets": report.values, "fits": fits, "reason": report.reason, "metrics": metrics,
            }
            StudyWriter(study).baselines(results)
            log(f"Baseline {key}: query mAP {metrics[QUERY_MAP]:.4f} ({metrics[QUERY_MAP_RATIO]:.3f} of the paragon)")
    return study
