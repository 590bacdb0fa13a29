"""Fashion-MNIST, one-shot against train-from-scratch: cost, quality per budget, and rank fidelity.

The headline benchmark's setting (``experiments/quickstart.yaml``: Fashion-MNIST, 6,000
training images, the ResNet-18 gallery model at 32 px, 35.47 MFLOPs; the ``mobilenet``
space at 16-32 px; MFLOPs are fvcore multiply-accumulates, batch 1), budgets of 1/10,
1/30 and 1/100 of the gallery model's MFLOPs (params and latency unlimited):

* **train from scratch**: per budget, a constrained-TPE search of ``--trials`` trials
  trained from scratch (the quickstart's 4 epochs, its percentile pruner), the best by val
  mAP scored on query: three searches per seed;
* **one-shot**: one supernet (``search.strategy: one_shot``, random start: the gallery
  model is a ResNet; its sandwich within the largest budget, 1/10, unless
  ``--whole-space``) trained once, then ``nas export --family`` with the three budgets as
  devices: per device ``--trials`` candidates scored with inherited weights, the best
  fine-tuned (the quickstart's 4 epochs), exported and verified;
* **rank fidelity** (the first seed's supernet): ``--fidelity`` random members within
  the largest budget (3.547 MFLOPs), their inherited-weight val mAP against the
  val mAP of the same architecture trained from scratch as a trial (4 epochs, its seed):
  Kendall tau and Spearman rho.

The supernet trains ``--supernet-epochs`` epochs (default 7; 4 members a step); the family
fine-tunes ``--fine-tune-best`` members per device (default 1). One-shot results and rank
fidelity are kept per seed and these settings; the from-scratch side of the fidelity is
kept per architecture and shared by every supernet.

Query mAP per budget: mean ± std over the seeds; wall time: all three searches against the
supernet plus the family export. The gallery model is trained once and shared. Results go
to ``<out>/one_shot_fashion_mnist.json``; a second run only adds what is missing.

    .venv/bin/python experiments/benchmarks/one_shot_fashion_mnist.py --seeds 0 1 2 [--trials 20] [--fidelity 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import kendalltau, spearmanr

from nas.config import config_from_dict, config_to_dict, load_config
from nas.export.family import export_family
from nas.hardware import check_budgets
from nas.records import QUERY_MAP, QUERY_R1, StudyRecord, trial_seed
from nas.results import best_trial
from nas.search.context import prepare
from nas.search.driver import run_search, train_study_supernet
from nas.search.evaluators import OneShot, TrainFromScratch
from nas.search.optuna_setup import load_existing_study
from nas.supernet import open_supernet, random_member, recalibrated
from nas.typed_config import set_dotted

REPO = Path(__file__).resolve().parents[2]
GALLERY_MFLOPS = 35.47
BUDGETS = {"1/10": GALLERY_MFLOPS / 10, "1/30": GALLERY_MFLOPS / 30, "1/100": GALLERY_MFLOPS / 100}


def _config(base: dict, **dotted):
    data = json.loads(json.dumps(base))
    for key, value in dotted.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def _tpe(base: dict, out: Path, seed: int, budget: float, trials: int) -> dict:
    config = _config(base, **{"out": str(out / f"tpe-{budget:.4f}-s{seed}"), "search.study_name": f"tpe-{budget:.4f}-s{seed}", "search.seed": seed,
                              "search.trials": trials, "budgets.max_mflops": budget})
    start = time.perf_counter()
    study = run_search(config, log=lambda _: None)
    best = best_trial(study)
    return {"query_mAP": best.metrics[QUERY_MAP], "query_R@1": best.metrics[QUERY_R1], "mflops": best.budgets["mflops"],
            "seconds": time.perf_counter() - start}


def _one_shot_name(seed: int, epochs: int, fine_tune_best: int, whole_space: bool) -> str:
    return f"one-shot-s{seed}-e{epochs}" + (f"-f{fine_tune_best}" if fine_tune_best != 2 else "") + ("-whole" if whole_space else "")


def _one_shot(base: dict, out: Path, seed: int, trials: int, log) -> dict:
    name = _one_shot_name(seed, base["supernet"]["epochs"], base["supernet"]["fine_tune_best"], base["supernet"]["max_mflops"] is None)
    folder = out / name
    config = _config(base, **{"out": str(folder), "search.study_name": name, "search.seed": seed, "search.strategy": "one_shot",
                              "search.trials": 0, "budgets.max_mflops": max(BUDGETS.values())})
    start = time.perf_counter()
    train_study_supernet(config, log=lambda _: None)
    supernet_seconds = time.perf_counter() - start
    family = folder / "family.yaml"
    family.write_text(yaml.safe_dump({"devices": [{"name": f"b{name.split('/')[1]}", "max_mflops": b} for name, b in BUDGETS.items()],
                                      "trials": trials, "fine_tune_best": config.supernet.fine_tune_best}))
    study = load_existing_study(config.storage_url, config.search.study_name)
    rows = export_family(study, config.storage_url, family, folder / "export", log=lambda _: None)
    return {"members": {name: {k: r[k] for k in ("query_mAP", "query_R@1", "mflops", "arch")} for name, r in zip(BUDGETS, rows)},
            "supernet_seconds": supernet_seconds, "seconds": time.perf_counter() - start, "config": config}


def _fidelity(config, n: int, seed: int, scratch_cache: dict[str, float], log) -> dict:
    ctx = prepare(config, log=lambda _: None)
    paragon = StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).paragon
    supernet, _ = open_supernet(ctx, train=False, log=lambda _: None)
    scorer, scratch = OneShot(ctx, paragon), TrainFromScratch(ctx, paragon)
    budgets = [b for b in ctx.budgets if b.name in ("mflops", "params_m")]
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n:
        arch = random_member(ctx.space, rng)
        model = supernet.extract(arch)
        if arch.arch_id in seen or not check_budgets(model, arch.resolution, arch.in_chans, budgets).feasible:
            continue
        seen.add(arch.arch_id)
        inherited = scorer.score(recalibrated(ctx, model), "val")["mAP"]
        if arch.to_string() not in scratch_cache:  # the from-scratch side does not depend on the supernet: trained once per architecture
            trial_rule_seed = trial_seed(config.search.seed, 1000 + len(rows))
            scratch_cache[arch.to_string()] = scratch.evaluate(scratch.build(arch, trial_rule_seed), trial_rule_seed).metrics["val_mAP"]
        trained = scratch_cache[arch.to_string()]
        rows.append({"arch": arch.to_string(), "inherited_val_mAP": inherited, "scratch_val_mAP": trained})
        log(f"fidelity {len(rows)}/{n}: inherited {inherited:.4f}, from scratch {trained:.4f}")
    a, b = [r["inherited_val_mAP"] for r in rows], [r["scratch_val_mAP"] for r in rows]
    return {"members": rows, "kendall_tau": float(kendalltau(a, b).statistic), "spearman_rho": float(spearmanr(a, b).statistic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "one-shot-fashion-mnist"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--fidelity", type=int, default=30)
    parser.add_argument("--supernet-epochs", type=int, default=7)
    parser.add_argument("--fine-tune-best", type=int, default=1, help="inherited-weight candidates fine-tuned per device")
    parser.add_argument("--whole-space", action="store_true", help="train the supernet's sandwich over the whole space, not within the largest budget")
    parser.add_argument("--no-tpe", action="store_true", help="skip the train-from-scratch searches (report the one-shot side only)")
    parser.add_argument("--tpe-only", action="store_true", help="run only the train-from-scratch searches (e.g. on one core while the one-shot side runs on the other)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny convolutions gain nothing from more on a shared CPU)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(text, flush=True)  # noqa: E731
    quick = load_config(REPO / "experiments" / "quickstart.yaml", {"out": str(out / "gallery"), "search.trials": 0, "tracking.enabled": False})
    run_search(quick, log=lambda _: None)  # the gallery model, trained once
    base = config_to_dict(quick)
    base["gallery"]["checkpoint"] = str(out / "gallery" / "gallery" / "gallery.safetensors")
    base["budgets"].update(max_params_m=1000.0, max_latency_ms=1000.0)
    base["supernet"].update(epochs=args.supernet_epochs, fine_tune_best=args.fine_tune_best, max_mflops=None if args.whole_space else "budget")
    base["search"]["threads"] = args.threads
    results_file = out / "one_shot_fashion_mnist.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for part in ("tpe", "one_shot", "fidelity", "scratch_val_mAP"):
        results.setdefault(part, {})
    shot = lambda seed: _one_shot_name(seed, args.supernet_epochs, args.fine_tune_best, args.whole_space)  # noqa: E731
    for seed in args.seeds:
        for name, budget in BUDGETS.items():
            key = f"{name}-s{seed}"
            if key not in results["tpe"] and not args.no_tpe:
                results["tpe"][key] = _tpe(base, out, seed, budget, args.trials)
                log(f"tpe {key}: {results['tpe'][key]}")
                results_file.write_text(json.dumps(results, indent=2))
        if shot(seed) not in results["one_shot"] and not args.tpe_only:
            row = _one_shot(base, out, seed, args.trials, log)
            row.pop("config")
            results["one_shot"][shot(seed)] = row
            log(f"{shot(seed)}: {row}")
            results_file.write_text(json.dumps(results, indent=2))
    fidelity_key = shot(args.seeds[0])
    if args.tpe_only:
        return
    if args.fidelity and fidelity_key not in results["fidelity"]:
        config = _config(base, **{"out": str(out / fidelity_key), "search.study_name": fidelity_key, "search.seed": args.seeds[0],
                                  "search.strategy": "one_shot", "budgets.max_mflops": max(BUDGETS.values())})
        start = time.perf_counter()
        results["fidelity"][fidelity_key] = _fidelity(config, args.fidelity, args.seeds[0], results["scratch_val_mAP"], log)
        results["fidelity"][fidelity_key]["seconds"] = time.perf_counter() - start
        results_file.write_text(json.dumps(results, indent=2))
    print()
    print(f"{'budget':<8} {'method':<22} {'query mAP':>17} {'R@1':>17} {'MFLOPs':>7}")
    have_tpe = all(f"{n}-s{s}" in results["tpe"] for n in BUDGETS for s in args.seeds)
    for name in BUDGETS:
        methods = [("tpe, from scratch", [results["tpe"][f"{name}-s{s}"] for s in args.seeds])] if have_tpe else []
        for method, rows in (*methods, ("one-shot family", [results["one_shot"][shot(s)]["members"][name] for s in args.seeds])):
            m, r = np.array([x["query_mAP"] for x in rows]), np.array([x["query_R@1"] for x in rows])
            print(f"{name:<8} {method:<22} {m.mean():.4f} ± {m.std():.4f}  {r.mean():.4f} ± {r.std():.4f}  {np.mean([x['mflops'] for x in rows]):>7.3f}")
    shot_time = sum(results["one_shot"][shot(s)]["seconds"] for s in args.seeds)
    supernet_time = sum(results["one_shot"][shot(s)]["supernet_seconds"] for s in args.seeds)
    print(f"wall time over {len(args.seeds)} seed(s), supernet {args.supernet_epochs} epochs: one supernet + family {shot_time / 60:.1f} min "
          f"(supernet {supernet_time / 60:.1f} min)")
    if have_tpe:
        tpe_time = sum(results["tpe"][f"{n}-s{s}"]["seconds"] for n in BUDGETS for s in args.seeds)
        print(f"three TPE searches per seed {tpe_time / 60:.1f} min; ratio one-shot / TPE {shot_time / tpe_time:.2f}")
    for key, f in results["fidelity"].items():
        print(f"rank fidelity ({key}'s supernet) over {len(f['members'])} members: Kendall tau {f['kendall_tau']:.3f}, "
              f"Spearman rho {f['spearman_rho']:.3f}")

if __name__ == "__main__":
    main()
