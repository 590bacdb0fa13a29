"""The model card (``MODEL_CARD.md``) of an export: architecture, budgets, retrieval scores, data, verification."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nas.data import Preprocessing
from nas.export.verify import MAX_MAP_DIFF
from nas.pictures import QUERIES, TOP_K
from nas.records import StudyRecord, TrialRecord
from search_spaces import Architecture

if TYPE_CHECKING:
    from nas.config import ExperimentConfig

__all__ = ["model_card"]

#: Metric names of the retrieval table (``query_<name>`` in the trial's metrics), when present.
CARD_METRICS = ["mAP", "mAP@R", "R@1", "R@5", "R@10"]
CARD_METRICS += [f"{m}_{p}" for p in ("easy", "medium", "hard") for m in ("mAP", "mP@1", "mP@5", "mP@10")]  # revisited Oxford/Paris


def _embedding_layer(arch: Architecture) -> str:
    if not arch.projection:
        return "none: the pooled features, L2-normalised, are the embedding (they are the gallery model's own; no parameters)"
    return f"a linear projection of the pooled features to {arch.embed_dim} dimensions (its parameters are counted below)"


def model_card(
    study: StudyRecord,
    trial: TrialRecord,
    arch: Architecture,
    config: ExperimentConfig,
    verification: dict[str, Any],
    metrics: dict[str, float],
    preprocessing: Preprocessing,
    pictures: Sequence[str] = (),
) -> str:
    """The card's Markdown text. ``metrics`` are those of the exported weights (the trial's, or a retrain's);
    ``preprocessing`` is the study's (the gallery model's), which the export records and ``nas embed`` applies;
    ``pictures`` the retrieval picture's file names in the export (none: it was not drawn)."""
    b = trial.budgets
    paragon = study.paragon_query
    lat = config.budgets.latency
    gallery_budgets = study.gallery_budgets
    dc = config.data
    lines = [
        f"# Query network: study `{study.name}`, trial {trial.number}",
        "",
        f"Created {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."
        + (" Weights retrained from the trial's architecture and seed (the search had not kept them)." if verification["retrained"] else ""),
        "",
        "## Architecture",
        f"- `{arch.to_string()}` (id `{arch.arch_id}`)",
        f"- input: {arch.in_chans} x {arch.resolution} x {arch.resolution}; preprocessing (the gallery model's, `arch.json`): {preprocessing.describe()}",
        f"- output: {arch.embed_dim}-d L2-normalised embedding, searchable against the gallery model's index",
        f"- embedding layer: {_embedding_layer(arch)}",
        *([f"- a structured pruning of `{arch.timm_model}` (`{arch.pruning}`), its channels ranked by the weights with SHA-256 "
           f"`{arch.root}...`"] if arch.pruning and arch.root else []),
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
    for name in CARD_METRICS:
        key = f"query_{name}"
        if key in metrics:
            lines.append(f"| {name} | {metrics[key]:.4f} | {paragon.get(name, float('nan')):.4f} | {metrics.get(key + '_ratio', float('nan')):.3f} |")
    lines += ["", "## Retrieval picture"]
    if pictures:
        lines.append(
            f"- {' and '.join(f'[`{name}`]({name})' for name in pictures)} (the same content): {QUERIES} fixed queries "
            f"(one per class, seeded), each with its top {TOP_K} gallery images by this network beside the top {TOP_K} by the "
            "gallery model's own embedding of the query (paragon); a green frame with a check marks a true match, a red frame "
            "with a cross a wrong one; rank and cosine score under each"
        )
    else:
        lines.append("- not drawn: the gallery model's embeddings of the split were not available to the export")
    lines += [
        "",
        "## Gallery model",
        f"- {study.gallery_model} at {config.gallery.resolution}x{config.gallery.resolution}, "
        f"{gallery_budgets.get('mflops', float('nan')):.2f} MFLOPs; weights sha256 `{study.gallery_sha256}`",
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
