"""Exporting a trial's query network, verifying the export, loading and using it.

An export folder holds (``--format`` picks the optional ones):

* ``arch.json``: the architecture (rebuildable without pickle), input shape and preprocessing;
* ``weights.safetensors``: the trained weights (format ``state_dict``, always written);
* ``model.torchscript.pt``: TorchScript, traced (format ``torchscript``);
* ``model.onnx``: ONNX with a dynamic batch dimension, input ``images``, output
  ``embeddings`` (format ``onnx``);
* ``model.int8.onnx``: ONNX Runtime static int8 quantisation (QDQ, per-channel weights,
  calibrated on training images) of ``model.onnx`` (format ``onnx-int8``);
* ``verification.json`` and ``MODEL_CARD.md``.

Verification embeds the evaluation query set with every float format and requires a
cosine of at least :data:`MIN_COSINE` to the trained module for every image, and the
asymmetric mAP recomputed from the ONNX model to equal the trial's within
:data:`MAX_MAP_DIFF`. The int8 model is measured, not held to those thresholds: its
asymmetric mAP against the same float gallery index, the drop from float, and its latency.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nas.config import ExperimentConfig, config_from_dict
from nas.data import PREPROCESSING, IMAGE_SUFFIXES, iter_batches, preprocess
from nas.errors import NasError
from nas.gallery import GalleryEmbeddings, embed, file_sha256, gallery_embeddings, load_gallery
from nas.retrieval_data import load_retrieval_data, score_part
from search_spaces import Architecture, QueryNet, build

__all__ = ["select_trial", "export_trial", "load_query_model", "embed_folder", "FORMATS", "MIN_COSINE", "MAX_MAP_DIFF"]

#: The smallest cosine between an exported float runtime's embedding and the module's that passes.
MIN_COSINE = 0.9999
#: Largest allowed difference between the ONNX model's asymmetric query mAP and the trial's (0.1 point).
MAX_MAP_DIFF = 0.001
FORMATS = ("state_dict", "torchscript", "onnx", "onnx-int8")

Log = Callable[[str], None]


# --------------------------------------------------------------------------- choosing a trial


def select_trial(study: optuna.Study, which: str = "best") -> optuna.trial.FrozenTrial:
    """``best`` (highest val mAP among feasible complete trials), ``pareto:K`` (the K-th point, from 0, of
    the Pareto front against MFLOPs, or against a multi-objective study's first cost) or a trial number."""
    from nas.study import best_trial, front_cost, pareto_front

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
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches:
        raise NasError(f"Study {study.study_name!r} has no trial {number} (it has {len(study.trials)} trials).")
    trial = matches[0]
    if trial.user_attrs.get("state") != "complete":
        state = trial.user_attrs.get("state", trial.state.name.lower())
        raise NasError(f"Trial {number} is {state}, not complete: only trained, feasible trials can be exported.")
    return trial


# --------------------------------------------------------------------------- loading


def load_query_model(folder: str | Path) -> QueryNet:
    """Rebuild an exported query network from ``arch.json`` and ``weights.safetensors`` (no pickle)."""
    folder = Path(folder)
    arch_file, weights_file = folder / "arch.json", folder / "weights.safetensors"
    for file in (arch_file, weights_file):
        if not file.is_file():
            raise NasError(f"{file} is missing: {folder} is not a complete export (see 'nas export').")
    try:
        meta = json.loads(arch_file.read_text())
        arch = Architecture.from_dict(meta["architecture"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise NasError(f"{arch_file} is not a valid architecture file: {exc}") from None
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise NasError(f"{weights_file} is unreadable or truncated ({exc}); export the model again.") from None
    model = build(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise NasError(f"{weights_file} does not fit the architecture in {arch_file}: {str(exc).splitlines()[0]}") from None
    return model.eval()


# --------------------------------------------------------------------------- writing formats


def _example(arch: Architecture, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, arch.in_chans, arch.resolution, arch.resolution)


def _write_torchscript(model: QueryNet, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, _example(model.arch)), str(path))


def _write_onnx(model: QueryNet, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (_example(model.arch),),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _write_onnx_int8(float_path: Path, path: Path, calibration: torch.Tensor) -> None:
    """Static int8 quantisation (QDQ; per-channel int8 weights, uint8 activations) calibrated on ``calibration``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"images": b.numpy()} for b in torch.split(calibration, 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
        )


# --------------------------------------------------------------------------- running formats


def _onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_embed(path: Path, batches: Sequence[torch.Tensor]) -> np.ndarray:
    session = _onnx_session(path)
    return np.concatenate([session.run(["embeddings"], {"images": b.numpy()})[0] for b in batches])


def _onnx_latency_ms(path: Path, arch: Architecture, threads: int, warmup: int = 10, repeats: int = 50) -> dict[str, float]:
    """Median and p90 ms of batch-1 ONNX Runtime CPU runs with ``threads`` threads."""
    session = _onnx_session(path, threads)
    x = np.zeros((1, arch.in_chans, arch.resolution, arch.resolution), dtype=np.float32)
    for _ in range(warmup):
        session.run(["embeddings"], {"images": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["embeddings"], {"images": x})
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "p90": float(np.percentile(times, 90))}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


# --------------------------------------------------------------------------- export


def _parse_formats(formats: str | Sequence[str]) -> list[str]:
    items = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in items if f not in FORMATS]
    if unknown:
        raise NasError(f"Unknown export format(s) {', '.join(unknown)}; valid formats: {', '.join(FORMATS)}.")
    if "onnx-int8" in items and "onnx" not in items:
        items.append("onnx")  # int8 is quantised from the float ONNX model
    return items


def _gallery_side(config: ExperimentConfig, run_dir: Path, data, split, log: Log) -> GalleryEmbeddings | None:
    path = Path(config.gallery.checkpoint) if config.gallery.checkpoint else run_dir / "gallery" / "gallery.safetensors"
    if not path.is_file():
        return None
    gallery = load_gallery(config.gallery, path, data.channels)
    emb, _ = gallery_embeddings(gallery, file_sha256(path), data, split, config.gallery.resolution, run_dir / "cache", log=log)
    return emb


def _trial_model(study: optuna.Study, trial: optuna.trial.FrozenTrial, config: ExperimentConfig, log: Log) -> tuple[QueryNet, dict[str, Any]]:
    """The trial's trained module: its kept weights, or a retrain with its seed when they are gone."""
    arch = Architecture.from_string(trial.user_attrs["arch"])
    weights = trial.user_attrs.get("weights")
    if weights and Path(weights).is_file():
        model = build(arch)
        model.load_state_dict(load_file(weights), strict=True)
        return model.eval(), {"retrained": False, "metrics": trial.user_attrs["metrics"]}
    from nas.study import build_seeded, prepare, train_and_score

    seed = trial.user_attrs.get("seed", config.search.seed * 100003 + trial.number)
    model = build_seeded(arch, seed)
    log(f"The weights of trial {trial.number} were not kept (the search keeps the best search.keep_best); retraining it with seed {seed}.")
    ctx = prepare(config, log=log)
    metrics = train_and_score(ctx, model, seed, study.user_attrs["paragon"])
    log(f"Retrained: query mAP {metrics['query_mAP']:.4f} (the trial had {trial.user_attrs['metrics']['query_mAP']:.4f}).")
    return model.eval(), {"retrained": True, "metrics": metrics}


def export_trial(
    study: optuna.Study, which: str, out: str | Path, formats: str | Sequence[str] = FORMATS, log: Log = print, register: bool = True
) -> dict[str, Any]:
    """Export trial ``which`` of ``study`` to ``out`` in ``formats`` and verify it.

    Returns the verification record (also written to ``verification.json`` and the card);
    raises :class:`NasError` when verification fails. With ``register`` (and tracking on)
    the ONNX model is also logged to the trial's MLflow run and registered as
    ``asymnas-<study name>``.
    """
    chosen = _parse_formats(formats)
    trial = select_trial(study, which)
    config = config_from_dict(study.user_attrs["config"])
    run_dir = Path(study.user_attrs.get("out_dir", str(config.out_dir)))
    config = config_from_dict({**study.user_attrs["config"], "out": str(run_dir)})
    model, origin = _trial_model(study, trial, config, log)
    arch = model.arch
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    (out / "arch.json").write_text(
        json.dumps(
            {
                "architecture": arch.to_dict(),
                "input": {"shape": ["batch", arch.in_chans, arch.resolution, arch.resolution], "preprocessing": PREPROCESSING},
                "output": {"embedding_dim": arch.embed_dim, "normalised": "L2"},
            },
            indent=2,
        )
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
    retrieval = load_retrieval_data(config.data)
    data, split = retrieval.data, retrieval.split
    if "torchscript" in chosen:
        _write_torchscript(model, out / "model.torchscript.pt")
    if "onnx" in chosen:
        _write_onnx(model, out / "model.onnx")
    if "onnx-int8" in chosen:
        calibration = preprocess(data.images[split.train[np.random.default_rng(0).permutation(len(split.train))[:256]]], arch.resolution)
        _write_onnx_int8(out / "model.onnx", out / "model.int8.onnx", calibration)
    written = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors", ".pt", ".onnx"))
    log(f"Exported trial {trial.number} to {out}: {', '.join(written)}")

    # ---- verification on the evaluation query set
    images = data.images[split.query]
    batches = list(iter_batches(images, arch.resolution, 256))
    trained = embed(model, images, arch.resolution)
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        outputs["reloaded"] = torch.cat([load_query_model(out)(b) for b in batches]).numpy()
        if "torchscript" in chosen:
            scripted = torch.jit.load(str(out / "model.torchscript.pt"))
            outputs["torchscript"] = torch.cat([scripted(b) for b in batches]).numpy()
    if "onnx" in chosen:
        outputs["onnx"] = _onnx_embed(out / "model.onnx", batches)
    verification: dict[str, Any] = {
        "trial": trial.number,
        "query_images": int(len(images)),
        "threshold_min_cosine": MIN_COSINE,
        "retrained": origin["retrained"],
        "min_cosine": {name: float(_cosines(emb, trained).min()) for name, emb in outputs.items()},
    }
    checks = [value >= MIN_COSINE for value in verification["min_cosine"].values()]
    trial_map = origin["metrics"]["query_mAP"]
    gallery = _gallery_side(config, run_dir, data, split, log)
    if gallery is not None:
        reference = "onnx" if "onnx" in outputs else "reloaded"
        scored = score_part(retrieval, "query", outputs[reference], gallery)
        verification["query_mAP"] = {"trial": trial_map, reference: scored["mAP"]}
        checks.append(abs(scored["mAP"] - trial_map) <= MAX_MAP_DIFF)
        if "onnx-int8" in chosen:
            int8 = _onnx_embed(out / "model.int8.onnx", batches)
            int8_map = score_part(retrieval, "query", int8, gallery)["mAP"]
            threads = config.budgets.latency.threads
            verification["int8"] = {
                "query_mAP": int8_map,
                "mAP_drop_from_float": scored["mAP"] - int8_map,
                "min_cosine_to_float": float(_cosines(int8, trained).min()),
                "latency_ms_onnxruntime": _onnx_latency_ms(out / "model.int8.onnx", arch, threads),
                "float_latency_ms_onnxruntime": _onnx_latency_ms(out / "model.onnx", arch, threads),
                "threads": threads,
            }
    verification["passed"] = all(checks)
    (out / "verification.json").write_text(json.dumps(verification, indent=2))
    (out / "MODEL_CARD.md").write_text(_model_card(study, trial, arch, config, verification, origin["metrics"]))
    cos = ", ".join(f"{k} {v:.6f}" for k, v in verification["min_cosine"].items())
    log(f"Verification {'passed' if verification['passed'] else 'FAILED'}: min cosine to the trained module on {len(images)} query images: {cos} (threshold {MIN_COSINE})")
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
    run_id = trial.user_attrs.get("mlflow_run_id", "")
    if register and config.tracking.enabled and "onnx" in chosen and run_id and not run_id.startswith("pending-"):
        from nas.tracking import register_onnx_model

        name = f"asymnas-{study.study_name}"
        b = trial.user_attrs["budgets"]
        tags = {
            "trial": trial.number,
            "arch_id": arch.arch_id,
            "mflops": f"{b['mflops']:.4f}",
            "params_m": f"{b['params_m']:.4f}",
            "latency_ms": f"{b['latency_ms']:.3f} ({config.budgets.latency.runtime}, {config.budgets.latency.threads} thread(s), batch {config.budgets.latency.batch_size})",
            **{key: f"{origin['metrics'][key]:.4f}" for key in ("query_mAP", "query_R@1", "query_mAP_ratio") if key in origin["metrics"]},
        }
        version = register_onnx_model(config.tracking_uri, run_id, out / "model.onnx", name, tags)
        verification["registered_model"] = f"models:/{name}/{version}"
        (out / "verification.json").write_text(json.dumps(verification, indent=2))
        log(f"Registered in the MLflow model registry as models:/{name}/{version} (ONNX flavour, budgets and metrics as tags).")
    return verification


def _model_card(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    arch: Architecture,
    config: ExperimentConfig,
    verification: dict[str, Any],
    metrics: dict[str, float],
) -> str:
    b = trial.user_attrs["budgets"]
    paragon = study.user_attrs.get("paragon", {}).get("query", {})
    lat = config.budgets.latency
    gallery_budgets = study.user_attrs.get("gallery_budgets", {})
    dc = config.data
    lines = [
        f"# Query network: study `{study.study_name}`, trial {trial.number}",
        "",
        f"Created {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."
        + (" Weights retrained from the trial's architecture and seed (the search had not kept them)." if verification["retrained"] else ""),
        "",
        "## Architecture",
        f"- `{arch.to_string()}` (id `{arch.arch_id}`)",
        f"- input: {arch.in_chans} x {arch.resolution} x {arch.resolution}; preprocessing: {PREPROCESSING}",
        f"- output: {arch.embed_dim}-d L2-normalised embedding, searchable against the gallery model's index",
        "",
        "## Budgets",
        f"- MFLOPs: {b['mflops']:.4f} (millions of multiply-accumulates, fvcore, batch 1, at {arch.resolution}x{arch.resolution})",
        f"- parameters: {b['params_m']:.4f} M",
        f"- latency: {b['latency_ms']:.3f} ms median, {b.get('latency_p90_ms', float('nan')):.3f} ms p90 "
        f"({lat.runtime} runtime, {lat.threads} thread(s), batch {lat.batch_size}, {lat.warmup} warm-up + {lat.repeats} timed runs)",
        "",
        "## Asymmetric retrieval (query images through this network, gallery through the gallery model)",
        "| metric | this network | paragon | ratio |",
        "|---|---|---|---|",
    ]
    names = ["mAP", "mAP@R", "R@1", "R@5", "R@10"]
    names += [f"{m}_{p}" for p in ("easy", "medium", "hard") for m in ("mAP", "mP@1", "mP@5", "mP@10")]  # revisited Oxford/Paris
    for name in names:
        key = f"query_{name}"
        if key in metrics:
            lines.append(f"| {name} | {metrics[key]:.4f} | {paragon.get(name, float('nan')):.4f} | {metrics.get(key + '_ratio', float('nan')):.3f} |")
    lines += [
        "",
        "## Gallery model",
        f"- {study.user_attrs.get('gallery_model')} at {config.gallery.resolution}x{config.gallery.resolution}, "
        f"{gallery_budgets.get('mflops', float('nan')):.2f} MFLOPs; weights sha256 `{study.user_attrs.get('gallery_sha256')}`",
        "",
        "## Data",
        f"- {dc.dataset} ({dc.resolved_path}); {dc.resolved_protocol} protocol"
        f"{', query = gallery (own entry excluded)' if dc.resolved_query_is_gallery else ''}, seed {dc.seed}; "
        + (
            f"stratified split: train {dc.train}, val {dc.val}, query {dc.query}, gallery {dc.gallery} of each class "
            f"(at most {dc.max_per_class} images per class); "
            if dc.resolved_protocol == "same_classes"
            else ""
        )
        + f"{verification['query_images']} query images",
        "",
        "## Verification",
        "- minimum cosine to the trained module over the query images: "
        + ", ".join(f"{k} {v:.6f}" for k, v in verification["min_cosine"].items())
        + f" (threshold {verification['threshold_min_cosine']})",
    ]
    if "query_mAP" in verification:
        ref, value = list(verification["query_mAP"].items())[1]
        lines.append(f"- asymmetric query mAP recomputed from the {ref} export: {value:.4f} (trial: {verification['query_mAP']['trial']:.4f}; allowed difference {MAX_MAP_DIFF})")
    if "int8" in verification:
        q = verification["int8"]
        lines += [
            "",
            "## int8 (model.int8.onnx)",
            "ONNX Runtime static quantisation (QDQ, per-channel int8 weights, uint8 activations, calibrated on 256 training images), "
            "searched against the same float gallery index:",
            f"- asymmetric query mAP {q['query_mAP']:.4f}, a drop of {q['mAP_drop_from_float']:.4f} from the float ONNX model; "
            f"minimum cosine to the float module {q['min_cosine_to_float']:.4f}",
            f"- latency (ONNX Runtime CPU, {q['threads']} thread(s), batch 1, median / p90): int8 {q['latency_ms_onnxruntime']['median']:.3f} / "
            f"{q['latency_ms_onnxruntime']['p90']:.3f} ms, float {q['float_latency_ms_onnxruntime']['median']:.3f} / {q['float_latency_ms_onnxruntime']['p90']:.3f} ms",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- using an export


def embed_folder(export_dir: str | Path, images_dir: str | Path, batch_size: int = 256) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed every image under ``images_dir`` with an exported model.

    Returns the embeddings (float32, one row per readable image), their ids (paths
    relative to ``images_dir``), and the ``(path, reason)`` of every image that was
    skipped because it could not be read.
    """
    from PIL import Image, UnidentifiedImageError

    model = load_query_model(export_dir)
    arch = model.arch
    root = Path(images_dir)
    if not root.is_dir():
        raise NasError(f"{root} is not a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NasError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    mode = "L" if arch.in_chans == 1 else "RGB"
    ids: list[str] = []
    skipped: list[tuple[str, str]] = []
    tensors: list[torch.Tensor] = []
    for file in files:
        try:
            with Image.open(file) as img:
                array = np.asarray(img.convert(mode), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            skipped.append((str(file.relative_to(root)), f"{type(exc).__name__}: {exc}"))
            continue
        tensors.append(preprocess(array.reshape(array.shape[0], array.shape[1], arch.in_chans)[None], arch.resolution))
        ids.append(str(file.relative_to(root)))
    if not tensors:
        return np.zeros((0, arch.embed_dim), dtype=np.float32), ids, skipped
    x = torch.cat(tensors)
    with torch.inference_mode():
        emb = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy().astype(np.float32)
    return emb, ids, skipped
