"""Exporting a trial's query network, verifying the export, and loading it back.

An export folder holds:

* ``arch.json``: the architecture (rebuildable without pickle) and its preprocessing;
* ``weights.safetensors``: the trained weights;
* ``model.torchscript.pt``: TorchScript (traced);
* ``model.onnx``: ONNX with a dynamic batch dimension (input ``images``, output ``embeddings``);
* ``MODEL_CARD.md`` and ``verification.json``: budgets with units and runtime, metrics,
  gallery model and hash, and the check that TorchScript and ONNX Runtime give the same
  embeddings as the trained module on the evaluation query set.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nas.config import config_from_dict
from nas.data import PREPROCESSING, iter_batches, load_dataset, split_dataset
from nas.errors import NasError
from nas.gallery import embed, file_sha256, gallery_embeddings, load_gallery
from nas.metrics import retrieval_metrics
from search_spaces import Architecture, QueryNet, build

__all__ = ["select_trial", "export_trial", "load_query_model", "MIN_COSINE"]

#: The smallest cosine between an exported runtime's embedding and the module's that passes.
MIN_COSINE = 0.9999


def select_trial(study: optuna.Study, which: str = "best") -> optuna.trial.FrozenTrial:
    """``best`` (highest val mAP among feasible complete trials) or a trial number."""
    from nas.study import best_trial

    if which == "best":
        trial = best_trial(study)
        if trial is None:
            raise NasError(f"Study {study.study_name!r} has no feasible complete trial to export yet; run more trials first.")
        return trial
    try:
        number = int(which)
    except ValueError:
        raise NasError(f"--trial must be 'best' or a trial number, but got {which!r}.") from None
    matches = [t for t in study.get_trials(deepcopy=False) if t.number == number]
    if not matches:
        raise NasError(f"Study {study.study_name!r} has no trial {number} (it has {len(study.trials)} trials).")
    trial = matches[0]
    if trial.user_attrs.get("state") != "complete":
        state = trial.user_attrs.get("state", trial.state.name.lower())
        raise NasError(f"Trial {number} is {state}, not complete: only trained, feasible trials can be exported.")
    return trial


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


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _export_onnx(model: QueryNet, arch: Architecture, path: Path) -> None:
    x = torch.zeros(2, arch.in_chans, arch.resolution, arch.resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def _export_torchscript(model: QueryNet, arch: Architecture, path: Path) -> None:
    x = torch.zeros(2, arch.in_chans, arch.resolution, arch.resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path))


def _onnx_embed(path: Path, batches: list[torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["embeddings"], {"images": b.numpy()})[0] for b in batches])


def export_trial(study: optuna.Study, which: str, out: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export trial ``which`` of ``study`` to ``out`` and verify it; returns the verification record."""

    trial = select_trial(study, which)
    arch = Architecture.from_string(trial.user_attrs["arch"])
    weights = trial.user_attrs.get("weights")
    if not weights or not Path(weights).is_file():
        raise NasError(
            f"The weights of trial {trial.number} were not kept ({weights}): the search keeps the best search.keep_best "
            f"trials. Export the best trial, or raise search.keep_best and search again."
        )
    model = build(arch)
    model.load_state_dict(load_file(weights), strict=True)
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    config = config_from_dict(study.user_attrs["config"])
    run_dir = Path(study.user_attrs.get("out_dir", str(config.out_dir)))

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
    _export_torchscript(model, arch, out / "model.torchscript.pt")
    _export_onnx(model, arch, out / "model.onnx")
    log(f"Exported trial {trial.number} to {out} (arch.json, weights.safetensors, model.torchscript.pt, model.onnx)")

    # Verification on the evaluation query set.
    data = load_dataset(config.data)
    split = split_dataset(data, config.data)
    images = data.images[split.query]
    batches = list(iter_batches(images, arch.resolution, 256))
    reloaded = load_query_model(out)
    with torch.inference_mode():
        ref = torch.cat([reloaded(b) for b in batches]).numpy()
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
        ts = torch.cat([scripted(b) for b in batches]).numpy()
    onnx = _onnx_embed(out / "model.onnx", batches)
    trained = embed(model, images, arch.resolution)
    verification: dict[str, Any] = {
        "query_images": int(len(images)),
        "min_cosine_reloaded_vs_trained": float(_cosines(ref, trained).min()),
        "min_cosine_torchscript_vs_trained": float(_cosines(ts, trained).min()),
        "min_cosine_onnx_vs_trained": float(_cosines(onnx, trained).min()),
        "threshold": MIN_COSINE,
    }
    gallery_path = Path(config.gallery.checkpoint) if config.gallery.checkpoint else run_dir / "gallery" / "gallery.safetensors"
    if gallery_path.is_file():
        gallery = load_gallery(config.gallery, gallery_path, data.channels)
        emb, _ = gallery_embeddings(gallery, file_sha256(gallery_path), data, split, config.gallery.resolution, run_dir / "cache", log=log)
        onnx_scores = retrieval_metrics(onnx, data.labels[split.query], emb.gallery, data.labels[split.gallery])
        verification["onnx_query_mAP"] = onnx_scores["mAP"]
        verification["trial_query_mAP"] = trial.user_attrs["metrics"]["query_mAP"]
    verification["passed"] = all(
        verification[k] >= MIN_COSINE for k in ("min_cosine_reloaded_vs_trained", "min_cosine_torchscript_vs_trained", "min_cosine_onnx_vs_trained")
    )
    (out / "verification.json").write_text(json.dumps(verification, indent=2))
    (out / "MODEL_CARD.md").write_text(_model_card(study, trial, arch, config, verification))
    status = "passed" if verification["passed"] else "FAILED"
    log(
        f"Verification {status}: min cosine to the trained module on {len(images)} query images: TorchScript "
        f"{verification['min_cosine_torchscript_vs_trained']:.6f}, ONNX Runtime {verification['min_cosine_onnx_vs_trained']:.6f} "
        f"(threshold {MIN_COSINE})"
    )
    if not verification["passed"]:
        raise NasError(f"Export verification failed; see {out / 'verification.json'}.")
    return verification


def _model_card(study: optuna.Study, trial: optuna.trial.FrozenTrial, arch: Architecture, config: Any, verification: dict[str, Any]) -> str:
    b, m = trial.user_attrs["budgets"], trial.user_attrs["metrics"]
    paragon = study.user_attrs.get("paragon", {}).get("query", {})
    lat = config.budgets.latency
    gallery_budgets = study.user_attrs.get("gallery_budgets", {})
    lines = [
        f"# Query network: study `{study.study_name}`, trial {trial.number}",
        "",
        f"Created {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Architecture",
        f"- `{arch.to_string()}` (id `{arch.arch_id}`)",
        f"- input: {arch.in_chans} x {arch.resolution} x {arch.resolution}; preprocessing: {PREPROCESSING}",
        f"- output: {arch.embed_dim}-d L2-normalised embedding, compatible with the gallery model's index",
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
    for name in ("mAP", "mAP@R", "R@1", "R@5", "R@10"):
        key = f"query_{name}"
        if key in m:
            lines.append(f"| {name} | {m[key]:.4f} | {paragon.get(name, float('nan')):.4f} | {m.get(key + '_ratio', float('nan')):.3f} |")
    split = study.user_attrs.get("config", {}).get("data", {})
    lines += [
        "",
        "## Gallery model",
        f"- {study.user_attrs.get('gallery_model')} at {config.gallery.resolution}x{config.gallery.resolution}, "
        f"{gallery_budgets.get('mflops', float('nan')):.2f} MFLOPs; weights sha256 `{study.user_attrs.get('gallery_sha256')}`",
        "",
        "## Data",
        f"- {config.data.dataset} ({config.data.resolved_path}); stratified split seed {split.get('seed')}: "
        f"train {split.get('train')}, val {split.get('val')}, query {split.get('query')}, gallery {split.get('gallery')} "
        f"of each class (max {split.get('max_per_class')} per class)",
        "",
        "## Verification",
        f"- on {verification['query_images']} query images, minimum cosine to the trained module: "
        f"reloaded {verification['min_cosine_reloaded_vs_trained']:.6f}, TorchScript {verification['min_cosine_torchscript_vs_trained']:.6f}, "
        f"ONNX Runtime {verification['min_cosine_onnx_vs_trained']:.6f} (threshold {verification['threshold']})",
    ]
    if "onnx_query_mAP" in verification:
        lines.append(
            f"- asymmetric query mAP recomputed from the ONNX model: {verification['onnx_query_mAP']:.4f} "
            f"(trial: {verification['trial_query_mAP']:.4f})"
        )
    return "\n".join(lines) + "\n"
