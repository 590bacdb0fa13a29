"""The headline benchmark: searched query nets against hand-designed ones, at three budgets.

On Fashion-MNIST with the quickstart's gallery model (ResNet-18, 32 px), at budgets of
1/10, 1/30 and 1/100 of the gallery model's MFLOPs (params and latency unlimited), runs
for each budget:

* every hand-designed baseline (``nas baseline``: off-the-shelf timm models at 32 px,
  trained and scored like a trial); the one that fits the budget with the best query
  mAP is reported (picked on the query set itself: generous to the baselines);
* searches of the ``mobilenet`` space with the random sampler and with constrained TPE,
  the same number of trials each, several seeds (a trial: the quickstart's 4 epochs,
  percentile pruner); the best trial by val mAP is reported, scored on the held-out query set.

Results are kept in ``<out>/headline.json``; running the script again only adds what is missing.

Prints one table: asymmetric query mAP, R@1 and ratio to the paragon (mean ± std over the
seeds), MFLOPs and latency (torch, 1 thread, batch 1) of the best net, and the number of
trials TPE needed to reach random search's final best val mAP.

    .venv/bin/python experiments/benchmarks/headline.py --trials 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna

from nas.baselines import run_baselines
from nas.config import load_config
from nas.results import best_trial
from nas.search.driver import run_search

BASELINES = (
    "lcnet_035", "lcnet_050", "lcnet_075", "mobilenetv3_small_050", "mobilenetv3_small_075", "mobilenetv3_small_100",
    "mobilenetv3_large_075", "efficientnet_lite0", "resnet18",
)


def _search(base: str, out: Path, gallery: str, budget: float, sampler: str, seed: int, trials: int) -> dict:
    name = f"{sampler}-{budget:.4f}-s{seed}"
    config = load_config(
        base,
        {
            "out": str(out), "gallery.checkpoint": gallery, "tracking.enabled": False, "search.study_name": name,
            "search.sampler": sampler, "search.seed": seed, "search.trials": trials, "budgets.max_mflops": budget,
            "budgets.max_params_m": 1000.0, "budgets.max_latency_ms": 1000.0,  # MFLOPs is the budget here
        },
    )
    start = time.perf_counter()
    study = run_search(config, log=lambda _: None)
    best = best_trial(study)
    done = sorted((t for t in study.trials if t.user_attrs.get("state") in ("complete", "pruned")), key=lambda t: t.number)
    curve, running = [], 0.0  # best val mAP after k counted trials
    for t in done:
        if t.user_attrs.get("state") == "complete":
            running = max(running, t.values[0])
        curve.append(running)
    return {
        "seconds": time.perf_counter() - start, "curve": curve,
        "metrics": best.metrics, "budgets": best.budgets, "arch": best.arch,
    }


def _fmt(values: list[float], spec: str = ".4f") -> str:
    return f"{np.mean(values):{spec}} ± {np.std(values):{spec}}" if len(values) > 1 else f"{values[0]:{spec}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--out", default="runs/headline")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=int, nargs="+", default=[10, 30, 100], help="budgets: 1/F of the gallery model's MFLOPs")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    quick = load_config(args.config)
    gallery = str(quick.out_dir / "gallery" / "gallery.safetensors")
    results_file = out / "headline.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}

    # hand-designed baselines, once (their budgets decide where they fit)
    base_config = load_config(args.config, {"out": str(out), "gallery.checkpoint": gallery, "tracking.enabled": False,
                                            "search.study_name": "baselines", "budgets.max_mflops": 1e6,
                                            "budgets.max_params_m": 1000.0, "budgets.max_latency_ms": 1000.0})
    if "baselines" not in results:
        study = run_baselines(base_config, BASELINES, [32], log=lambda _: None)
        results["baselines"] = study.user_attrs["baselines"]
        results["paragon"] = study.user_attrs["paragon"]["query"]
        results["gallery_mflops"] = study.user_attrs["gallery_budgets"]["mflops"]
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1))
    gallery_mflops, paragon = results["gallery_mflops"], results["paragon"]

    for fraction in args.fractions:
        budget = gallery_mflops / fraction
        for sampler in ("random", "tpe"):
            for seed in args.seeds:
                key = f"1/{fraction} {sampler} {seed} {args.trials}"
                if key not in results:
                    results[key] = _search(args.config, out, gallery, budget, sampler, seed, args.trials)
                    results_file.write_text(json.dumps(results, indent=1))
                    print(f"done {key}: best query mAP {results[key]['metrics']['query_mAP']:.4f} in {results[key]['seconds']:.0f} s", flush=True)

    print(f"\nGallery model: {quick.gallery.model}, {gallery_mflops:.2f} MFLOPs (multiply-accumulates, fvcore, batch 1); "
          f"paragon query mAP {paragon['mAP']:.4f}, R@1 {paragon['R@1']:.4f}. Search: mobilenet space, {args.trials} trials, "
          f"seeds {args.seeds}; latency: torch, 1 thread, batch 1.")
    header = f"{'budget':<18} {'method':<26} {'query mAP':>17} {'R@1':>17} {'ratio':>15} {'MFLOPs':>7} {'lat ms':>6} {'trials to random best':>22}"
    print(header)
    print("-" * len(header))
    for fraction in args.fractions:
        budget = gallery_mflops / fraction
        label = f"1/{fraction} ({budget:.3f})"
        fitting = {k: r for k, r in results["baselines"].items() if r["budgets"]["mflops"] <= budget}
        if fitting:
            # the best on the query set itself: generous to the baselines (searched nets are picked by val mAP)
            name, r = max(fitting.items(), key=lambda kv: kv[1]["metrics"]["query_mAP"])
            m, b = r["metrics"], r["budgets"]
            print(f"{label:<18} {'baseline ' + name:<26} {m['query_mAP']:>17.4f} {m['query_R@1']:>17.4f} {m['query_mAP_ratio']:>15.3f} "
                  f"{b['mflops']:>7.3f} {b['latency_ms']:>6.2f} {'':>22}")
        else:
            print(f"{label:<18} {'baseline: none fits':<26}")
        random_best = {s: results[f"1/{fraction} random {s} {args.trials}"]["curve"] for s in args.seeds}
        for sampler in ("random", "tpe"):
            runs = [results[f"1/{fraction} {sampler} {s} {args.trials}"] for s in args.seeds]
            reach = ""
            if sampler == "tpe":
                needed = []
                for s, r in zip(args.seeds, runs):
                    target = random_best[s][-1] if random_best[s] else 0.0
                    hit = next((i + 1 for i, v in enumerate(r["curve"]) if v >= target), None)
                    needed.append(str(hit) if hit else f">{len(r['curve'])}")
                reach = ", ".join(needed)
            print(
                f"{label:<18} {sampler + ' search':<26} {_fmt([r['metrics']['query_mAP'] for r in runs]):>17} "
                f"{_fmt([r['metrics']['query_R@1'] for r in runs]):>17} {_fmt([r['metrics']['query_mAP_ratio'] for r in runs], '.3f'):>15} "
                f"{np.mean([r['budgets']['mflops'] for r in runs]):>7.3f} {np.mean([r['budgets']['latency_ms'] for r in runs]):>6.2f} {reach:>22}"
            )


if __name__ == "__main__":
    main()
