"""Exporting a trial's query network, verifying the export, loading and using it.

An export folder holds (``--format`` picks the optional ones; :data:`EXPORTERS` lists them):

* ``arch.json``: the architecture (rebuildable without pickle), input shape and preprocessing;
* ``weights.safetensors``: the trained weights (format ``state_dict``, always written);
* ``model.torchscript.pt``: TorchScript, traced (format ``torchscript``);
* ``model.onnx``: ONNX with a dynamic batch dimension, input ``images``, output
  ``embeddings`` (format ``onnx``);
* ``model.int8.onnx``: ONNX Runtime static int8 quantisation (QDQ, per-channel weights,
  calibrated on training images) of ``model.onnx`` (format ``onnx-int8``);
* ``verification.json`` and ``MODEL_CARD.md``;
* ``retrieval.png`` and ``retrieval.html``: the retrieval picture (:mod:`nas.pictures`) of 8 fixed
  queries, the exported network's top 5 beside the gallery model's own, when the gallery model is
  at hand; also logged to the trial's MLflow run.

Verification embeds the evaluation query set with every float format and requires a
cosine of at least :data:`MIN_COSINE` to the trained module for every image, and the
asymmetric mAP recomputed from the ONNX model to equal the trial's within
:data:`MAX_MAP_DIFF`. The int8 model is measured, not held to those thresholds: its
asymmetric mAP against the same float gallery index, the drop from float, and its latency.

Modules: :mod:`~nas.export.formats` (the formats), :mod:`~nas.export.verify`
(verification), :mod:`~nas.export.card` (the model card), :mod:`~nas.export.loading`
(loading an export back); this one chooses the trial and runs the steps.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna

from nas.config import ExperimentConfig, config_from_dict
from nas.data import LEGACY_PREPROCESSING, Preprocessing, load_retrieval_data
from nas.errors import ConfigError, NasError
from nas.export.card import model_card
from nas.export.formats import EXPORTERS, ExportContext, Exporter, resolve_formats
from nas.export.loading import embed_folder, load_query_model
from nas.export.verify import MAX_MAP_DIFF, MIN_COSINE, gallery_index, verify_export
from nas.pictures import HTML_NAME, PNG_NAME, split_picture, write_picture
from nas.records import QUERY_MAP, QUERY_MAP_RATIO, QUERY_R1, State, StudyRecord, StudyWriter, TrialRecord, trial_records
from nas.results import best_trial, front_cost, pareto_front
from nas.scoring import embed
from nas.search.context import prepare
from nas.search.fingerprint import check_fingerprint
from nas.search.evaluators import create_evaluator
from nas.tracking import check_tracking_uri, log_run_artifacts, register_onnx_model
from search_spaces import Architecture, QueryNet, build
from trainers import check_state_dict, read_safetensors

__all__ = [
    "select_trial",
    "export_trial",
    "load_query_model",
    "embed_folder",
    "EXPORTERS",
    "Exporter",
    "MIN_COSINE",
    "MAX_MAP_DIFF",
]

Log = Callable[[str], None]


# --------------------------------------------------------------------------- choosing a trial


def select_trial(study: optuna.Study, which: str = "best") -> TrialRecord:
    """``best`` (highest val mAP among feasible complete trials), ``pareto:K`` (the K-th point, from 0, of
    the Pareto front against MFLOPs, or against a multi-objective study's first cost) or a trial number."""
    if which == "best":
        trial = best_trial(study)
        if trial is None:
            raise NasError(f"Study {study.study_name!r} has no feasible complete trial to export yet; run more trials first.")
        return trial
    if which.startswith("pareto:"):
        front = pareto_front(study, front_cost(study))
        try:
            k = int(which.split(":", 1)[1])
            return front[k]
        except (ValueError, IndexError):
            raise NasError(
                f"--trial {which!r}: the Pareto front of study {study.study_name!r} has {len(front)} point(s), "
                f"pareto:0 to pareto:{len(front) - 1}; 'nas results' lists them."
            ) from None
    try:
        number = int(which)
    except ValueError:
        raise NasError(f"--trial must be 'best', 'pareto:K' or a trial number, but got {which!r}.") from None
    records = trial_records(study)
    matches = [t for t in records if t.number == number]
    if not matches:
        raise NasError(f"Study {study.study_name!r} has no trial {number} (it has {len(records)} trials).")
    trial = matches[0]
    if trial.state != State.COMPLETE:
        raise NasError(f"Trial {number} is {trial.state}, not complete: only trained, feasible trials can be exported.")
    return trial


# --------------------------------------------------------------------------- the trained module


def _retrain(config: ExperimentConfig, arch: Architecture, seed: int, study: StudyRecord, log: Log,
             fine_tune_of: int | None = None) -> tuple[QueryNet, dict[str, float]]:
    """Build and train ``arch`` with ``seed`` as the search did (the study's evaluator, and for a one-shot
    study's fine-tuned trial its trained supernet); its module and metrics. Data, split or gallery that
    changed since the study scored it are refused (:func:`nas.search.fingerprint.check_fingerprint`)."""
    ctx = prepare(config, log=log)
    check_fingerprint(study.name, study.fingerprint, ctx.fingerprint)
    paragon = study.paragon
    evaluator = create_evaluator(ctx, paragon)
    evaluator.prepare(log, train=False)
    evaluator = evaluator.for_trial(fine_tune_of)
    model = evaluator.build(arch, seed)
    return model, evaluator.evaluate(model, seed).metrics


def _trial_model(study: StudyRecord, trial: TrialRecord, config: ExperimentConfig, log: Log) -> tuple[QueryNet, dict[str, float], bool]:
    """The trial's trained module, the metrics of those weights, and whether they were retrained:
    its kept weights, or a retrain with its seed when they are gone."""
    arch = Architecture.from_string(trial.arch)
    if trial.weights and Path(trial.weights).is_file():
        model = build(arch)
        advice = "delete it and export again: a trial whose weights are gone is retrained with its seed"
        state, _ = read_safetensors(Path(trial.weights), f"The weights of trial {trial.number}", advice, NasError)
        check_state_dict(state, model, f"The weights of trial {trial.number} ({trial.weights})", advice, NasError, f"its architecture {arch.to_string()}")
        model.load_state_dict(state, strict=True)
        return model.eval(), trial.metrics, False
    seed = trial.seed_for(config.search.seed)
    log(f"The weights of trial {trial.number} were not kept (the search keeps the best search.keep_best); retraining it with seed {seed}.")
    if "fine_tuned_from_gallery" in trial.metrics:  # a one-shot fine-tuning that chose its start: retrained from that start only
        start = "gallery" if trial.metrics["fine_tuned_from_gallery"] else "supernet"
        config = replace(config, supernet=replace(config.supernet, fine_tune_from=start))
    model, metrics = _retrain(config, arch, seed, study, log, trial.fine_tune_of)
    log(f"Retrained: query mAP {metrics[QUERY_MAP]:.4f} (the trial had {trial.metrics[QUERY_MAP]:.4f}).")
    return model.cpu().eval(), metrics, True  # exported and verified on the CPU, wherever it was trained


# --------------------------------------------------------------------------- export

def _register(
    study: StudyRecord, trial: TrialRecord, arch: Architecture, config: ExperimentConfig, metrics: dict[str, float], onnx_path: Path, log: Log,
    uri: str,
) -> str:
    """Log the ONNX model to the trial's MLflow run at tracking URI ``uri`` and register it as ``asymnas-<study>``; its ``models:/`` URI."""
    name = f"asymnas-{study.name}"
    b = trial.budgets
    lat = config.budgets.latency
    tags = {
        "trial": trial.number,
        "arch_id": arch.arch_id,
        "mflops": f"{b['mflops']:.4f}",
        "params_m": f"{b['params_m']:.4f}",
        "latency_ms": f"{b['latency_ms']:.3f} ({lat.runtime}, {lat.threads} thread(s), batch {lat.batch_size})",
        **{key: f"{metrics[key]:.4f}" for key in (QUERY_MAP, QUERY_R1, QUERY_MAP_RATIO) if key in metrics},
    }
    version = register_onnx_model(uri, trial.mlflow_run_id, onnx_path, name, tags)
    log(f"Registered in the MLflow model registry as models:/{name}/{version} (ONNX flavour, budgets and metrics as tags).")
    return f"models:/{name}/{version}"


def export_trial(
    study: optuna.Study, which: str, out: str | Path, formats: str | Sequence[str] | None = None, log: Log = print, register: bool = True,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Export trial ``which`` of ``study`` to ``out`` in ``formats`` and verify it.

    Returns the verification record (also written to ``verification.json`` and the card);
    raises :class:`NasError` when verification fails. With ``register`` (and tracking on)
    the ONNX model is also logged to the trial's MLflow run and registered as
    ``asymnas-<study name>`` in the store at ``tracking_uri`` (``env:NAME`` allowed), by default
    the study's recorded ``tracking.uri``; a recorded URI holds no password (see :mod:`nas.secrets`),
    so a store that needs one is named with ``tracking_uri``. The retrieval picture (``retrieval.png`` and
    ``retrieval.html``) is written when the gallery model is at hand, logged to the trial's MLflow run when it has
    one, and recorded in the study (:attr:`StudyRecord.pictures`) for ``nas report``.
    """
    exporters = resolve_formats(formats)
    tracking_uri = check_tracking_uri(tracking_uri, "--tracking-uri") if tracking_uri else None  # a typo fails before any work
    trial = select_trial(study, which)
    record = StudyRecord.load(study)
    config = config_from_dict(record.config)
    run_dir = Path(record.out_dir if record.out_dir is not None else str(config.out_dir))
    config = config_from_dict({**record.config, "out": str(run_dir)})
    model, metrics, retrained = _trial_model(record, trial, config, log)
    arch = model.arch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    retrieval = load_retrieval_data(config.data)
    preprocessing = Preprocessing.from_dict(record.preprocessing) if record.preprocessing else LEGACY_PREPROCESSING
    context = ExportContext(retrieval, preprocessing)
    for exporter in exporters:
        exporter.write(model, out, context)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors", ".pt", ".onnx"))
    log(f"Exported trial {trial.number} to {out}: {', '.join(written)}")

    trial_map = metrics[QUERY_MAP]
    gallery = gallery_index(config, run_dir, retrieval, log)
    verification = verify_export(
        model, exporters, out, retrieval, gallery,
        trial=trial.number, trial_map=trial_map, retrained=retrained, threads=config.budgets.latency.threads,
        preprocessing=preprocessing, workers=config.data.workers,
    )  # fmt: skip
    (out / "verification.json").write_text(json.dumps(verification, indent=2))
    pictures = []
    if gallery is not None:
        picture = split_picture(
            retrieval, lambda rows: embed(model, retrieval.data.images, arch.resolution, preprocessing, indices=rows, workers=0), gallery,
            title=f"Study {record.name}, trial {trial.number}: the exported query network's retrieval beside the gallery model's",
        )  # fmt: skip
        pictures = write_picture(picture, out)
        log(f"Retrieval picture: {pictures[0]} and {pictures[1].name} ({picture.summary()})")
    (out / "MODEL_CARD.md").write_text(model_card(record, trial, arch, config, verification, metrics, preprocessing, pictures=[p.name for p in pictures]))
    cos = ", ".join(f"{k} {v:.6f}" for k, v in verification["min_cosine"].items())
    log(f"Verification {'passed' if verification['passed'] else 'FAILED'}: min cosine to the trained module on {verification['query_images']} query images: {cos} (threshold {MIN_COSINE})")
    if "query_mAP" in verification:
        log(f"Asymmetric query mAP: trial {trial_map:.4f}, recomputed from the export {list(verification['query_mAP'].values())[1]:.4f}")
    if "int8" in verification:
        q = verification["int8"]
        log(
            f"int8 ONNX: query mAP {q['query_mAP']:.4f} (drop {q['mAP_drop_from_float']:+.4f} from float), "
            f"latency {q['latency_ms_onnxruntime']['median']:.3f} ms vs float {q['float_latency_ms_onnxruntime']['median']:.3f} ms"
        )
    if not verification["passed"]:
        raise NasError(f"Export verification failed; see {out / 'verification.json'}.")
    if pictures:  # for 'nas report' to link
        StudyWriter(study).picture(trial.number, str(pictures[0].resolve()))
    run_id = trial.mlflow_run_id or ""
    onnx = EXPORTERS.get("onnx")
    if not (config.tracking.enabled and run_id):
        return verification
    try:
        uri = tracking_uri or config.tracking_uri
    except ConfigError as exc:  # e.g. the recorded URI's password is masked
        log(f"Not logged to the trial's MLflow run, nor registered in the MLflow model registry: {exc}")
        return verification
    if pictures and not run_id.startswith("pending-"):  # a run recorded during an outage: in the store once its journal is replayed
        failed = log_run_artifacts(uri, run_id, pictures)
        log(f"The retrieval picture was not logged to the trial's MLflow run: {failed}" if failed else f"Logged {PNG_NAME} and {HTML_NAME} to the trial's MLflow run.")
    if register and onnx in exporters:
        try:
            verification["registered_model"] = _register(record, trial, arch, config, metrics, out / onnx.filename, log, uri)
        except NasError as exc:  # the trial's run not replayed into the store yet
            log(f"Not registered in the MLflow model registry: {exc}")
            return verification
        (out / "verification.json").write_text(json.dumps(verification, indent=2))
    return verification
