"""Fine-tuning from the gallery's pruned weights: keep the gallery's batch-norm statistics, or recalibrate them?

A finalist fine-tuned from the gallery model's own weights pruned to it (``OneShot.gallery_start``) either keeps the
gallery's running statistics (sliced, frozen through the fine-tuning) or has them recalibrated on training images
(then trained). This fine-tunes members both ways and reports which is better after fine-tuning, and whether the
val mAP of the two starts *before* fine-tuning (what ``gallery_start`` chose by) predicts it.

Setting: ``--config`` (default ``experiments/cub100_pruned_one_shot.yaml``), ``--gallery-weights``; for each budget
of ``--budgets`` (fractions of the gallery model's MFLOPs), the unpruned gallery model at the highest resolution of
the space within it (no width or depth cut), then ``--members`` random members within it; each fine-tuned
``--epochs`` epochs with the study's training settings from both starts. Results go to
``<out>/gallery_start_batch_norm.json`` (a member at a time: an interrupted run resumes).

    .venv/bin/python experiments/benchmarks/gallery_start_batch_norm.py --gallery-weights weights/tf_efficientnet_lite0.safetensors
        [--budgets 1/30] [--members 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))

from _cub100 import add_setting, load_setting  # noqa: E402
from _members import members_within_budget  # noqa: E402
from rank_fidelity import fine_tune  # noqa: E402

from nas.search.evaluators import OneShot  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.supernet import frozen_batch_norm, gallery_supernet, recalibrated  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting(parser, "gallery-start-batch-norm")
    parser.add_argument("--budgets", type=lambda v: v.split(","), default=["1/30"], help="fractions of the gallery model's MFLOPs")
    parser.add_argument("--members", type=int, default=4, help="random members per budget, after the unpruned model")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "gallery_start_batch_norm.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {(r["budget"], r["arch"]) for r in rows}
    log = lambda text: print(text, flush=True)  # noqa: E731
    for budget in args.budgets:
        config = load_setting(args, {"search.threads": args.threads, "train.device": args.device, "budgets.max_mflops": budget,
                                     "tracking.enabled": False})
        ctx = prepare(config, log=log)
        root = gallery_supernet(ctx)
        scorer = OneShot(ctx, {})
        cap = next(b.limit for b in ctx.budgets if b.name == "mflops")
        unpruned = next(a for a in (ctx.space.extreme(smallest=False, resolution=r) for r in sorted(ctx.space.resolutions, reverse=True))
                        if root.mflops(a) <= cap)
        archs = [unpruned] + [a for a, _, _ in itertools.islice(members_within_budget(ctx, root, config.search.seed), args.members)]
        for i, arch in enumerate(archs):
            if (budget, arch.to_string()) in done:
                continue
            row = {"budget": budget, "arch": arch.to_string(), "resolution": arch.resolution, "mflops": root.mflops(arch), "unpruned": i == 0}
            for name in ("kept", "recalibrated"):
                start = time.perf_counter()
                net = root.extract(arch) if name == "kept" else recalibrated(ctx, root.extract(arch), force=True)
                row[f"{name}_start_val_mAP"] = scorer.score(net, "val")["mAP"]
                fine_tune(ctx, net, args.epochs, config.search.seed, freeze_bn=name == "kept" or frozen_batch_norm(ctx))
                row[f"{name}_val_mAP"], row[f"{name}_query_mAP"] = scorer.score(net, "val")["mAP"], scorer.score(net, "query")["mAP"]
                row[f"{name}_seconds"] = time.perf_counter() - start
            rows.append(row)
            results_file.write_text(json.dumps(rows, indent=1))
            log(f"{budget} {row['mflops']:.2f} MFLOPs at {arch.resolution} px{' (unpruned)' if i == 0 else ''}: " + "; ".join(
                f"{name}: val {row[f'{name}_start_val_mAP']:.4f} -> {row[f'{name}_val_mAP']:.4f}, query {row[f'{name}_query_mAP']:.4f}"
                for name in ("kept", "recalibrated")))
    print(f"{'budget':<7} {'MFLOPs':>7} {'res':>4} {'start val kept/recal':>21} {'val kept/recal':>15} {'query kept/recal':>17}  chosen before / after")
    for r in rows:
        before = "kept" if r["kept_start_val_mAP"] >= r["recalibrated_start_val_mAP"] else "recal"
        after = "kept" if r["kept_val_mAP"] >= r["recalibrated_val_mAP"] else "recal"
        print(f"{r['budget']:<7} {r['mflops']:>7.2f} {r['resolution']:>4} {r['kept_start_val_mAP']:>10.4f}/{r['recalibrated_start_val_mAP']:<10.4f} "
              f"{r['kept_val_mAP']:>7.4f}/{r['recalibrated_val_mAP']:<7.4f} {r['kept_query_mAP']:>8.4f}/{r['recalibrated_query_mAP']:<8.4f}  "
              f"{before} / {after}" + ("  (unpruned)" if r["unpruned"] else ""))


if __name__ == "__main__":
    main()
