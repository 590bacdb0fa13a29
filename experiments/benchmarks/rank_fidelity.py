"""Rank fidelity of one-shot scores: which cheap score ranks supernet members as fine-tuning them would.

Setting: ``--config`` (default ``experiments/cub100_pruned_one_shot.yaml``: CUB-100, the
ImageNet-pretrained ``tf_efficientnet_lite2`` gallery model at 224 px, the ``pruned`` space at
64-128 px). ``--members`` distinct random members within the study's ``budgets.max_mflops``
(1/10 of the gallery model's MFLOPs in that file). For each member, every score a search could
rank it by, each on val:

* ``mflops``: its cost alone (fvcore multiply-accumulates, batch 1): bigger is better;
* ``inherited``: its weights from the trained supernet, batch-norm statistics recalibrated
  (``supernet.score: inherited``);
* ``inherited_tuned_N``: the same after a short fine-tune: one pass over N training images, a
  seeded subset (``supernet.score: tuned`` with ``score_images`` N; N from ``--proxy-images``);
* ``gallery``: the gallery model's own weights pruned to it (no supernet training), the
  gallery's batch-norm statistics or recalibrated ones, whichever scores higher
  (``supernet.score: gallery``);
* ``gallery_tuned_N``: the same after the short fine-tune;
* ``predictor``: a ridge regression from (inherited, gallery, MFLOPs, resolution) to the
  truth, fitted on the other members (leave-one-out): Once-for-All's accuracy predictor
  (Cai et al., ICLR 2020) fitted on the members a search has fine-tuned.

The truth: each member fine-tuned standalone from the gallery's pruned weights (recalibrated;
``--epochs`` epochs, the study's training settings), twice from two seeds; the two runs'
agreement is the ceiling any score can be measured against. Reported per score: Kendall tau
and Spearman rho against the first run and against the mean of both, and the regret of its
top pick (the best member's truth minus the truth of the member the score ranks first).

Results go to ``<out>/rank_fidelity_<i>of<n>.json`` (a member at a time: an interrupted run resumes).
``--shard i/n`` measures every n-th member from the i-th (processes sharing a GPU), after one
``--train-only`` run has trained the supernet; ``--report`` merges the shards' files.

    .venv/bin/python experiments/benchmarks/rank_fidelity.py --members 24 [--device cuda]
        [--train-only | --shard 0/4 | --report]

Cost: per member two standalone fine-tunes and a short one per score and N (with the defaults
about 10 epochs' worth of training images) and about ten val scorings. Measured on one H200
with 16 cores (``--device cuda``, four shards side by side, float32): the supernet's 4 epochs
in 4.7 min, then about 30 s per member in each shard. Not run at this size on the 2-core CPU
machine.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, spearmanr

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))

from _cub100 import add_setting, load_setting  # noqa: E402
from _members import members_within_budget  # noqa: E402

from nas.data import StreamingImages  # noqa: E402
from nas.search.context import Context, prepare  # noqa: E402
from nas.search.evaluators import OneShot  # noqa: E402
from nas.supernet import frozen_batch_norm, gallery_supernet, open_supernet, recalibrated  # noqa: E402
from trainers import train_compatible  # noqa: E402


def score_names(rows: list[dict]) -> list[str]:
    """The scores the rows hold, in the order of the table."""
    tuned = sorted({k.rsplit("_", 1)[1] for k in rows[0] if "_tuned_" in k}, key=int)
    return (["mflops", "inherited"] + [f"inherited_tuned_{n}" for n in tuned] + ["gallery"] + [f"gallery_tuned_{n}" for n in tuned]
            + ["predictor"])


def fine_tune(ctx: Context, model, epochs: int, seed: int, freeze_bn: bool | None = None):
    """``model`` trained toward the gallery embeddings ``epochs`` epochs over every training image with the study's
    settings (in place), as a chosen member's fine-tuning trains it; ``freeze_bn`` (default: the study's batch-norm
    setting) keeps its batch-norm statistics."""
    tc = ctx.config.train
    transform = ctx.preprocessing.for_channels(ctx.data.channels).train_transform(model.arch.resolution, ctx.augmentation)
    feed = StreamingImages(ctx.training.source, ctx.training.indices, transform, tc.batch_size, seed, ctx.workers, for_gpu=ctx.device.type == "cuda")
    train_compatible(model, feed, ctx.targets, ctx.loss, epochs=epochs, batch_size=tc.batch_size, optimizer=tc.optimizer, lr=tc.lr,
                     weight_decay=tc.weight_decay, schedule=tc.schedule, device=ctx.device, seed=seed,
                     freeze_bn=frozen_batch_norm(ctx) if freeze_bn is None else freeze_bn, speed=ctx.speed, average_decay=tc.average_decay)
    return model


def measure(scorer: OneShot, root, arch, mflops: float, args, seed: int) -> dict:
    """Every score of one member (as the search computes it for each ``supernet.score``) and its truth (two standalone
    fine-tunes from ``root``'s weights: the gallery model's, recalibrated)."""
    ctx, trained = scorer.ctx, scorer.supernet
    config = ctx.config
    val = lambda model: scorer.score(model, "val")["mAP"]  # noqa: E731
    start = time.perf_counter()
    row = {"arch": arch.to_string(), "resolution": arch.resolution, "mflops": mflops}
    inherited = recalibrated(ctx, trained.extract(arch), force=True)
    row["inherited"] = val(inherited)
    start_net, row["gallery"], row["gallery_kept_bn"] = scorer.gallery_start(arch)
    for n in args.proxy_images:  # supernet.score tuned with score_images n, from the inherited and from the gallery's weights
        ctx.config = replace(config, supernet=replace(config.supernet, score_images=n))
        for name, net in (("inherited", inherited), ("gallery", start_net)):
            tuned = copy.deepcopy(net)
            scorer.short_tune(tuned, seed, None)
            row[f"{name}_tuned_{n}"] = val(tuned)
    ctx.config = config
    truth_start = recalibrated(ctx, root.extract(arch), force=True)
    for key, run_seed in (("truth", seed), ("truth_repeat", seed + 1000)):
        row[key] = val(fine_tune(ctx, copy.deepcopy(truth_start), args.epochs, run_seed))
    row["seconds"] = time.perf_counter() - start
    return row


def predictor_scores(rows: list[dict], truth: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Leave-one-out predictions of a ridge regression from the cheap scores to ``truth`` (standardised features)."""
    x = np.array([[r["inherited"], r["gallery"], r["mflops"], r["resolution"]] for r in rows], dtype=float)
    out = np.empty(len(rows))
    for i in range(len(rows)):
        rest = np.arange(len(rows)) != i
        mean, std = x[rest].mean(0), x[rest].std(0) + 1e-12
        a = np.c_[(x[rest] - mean) / std, np.ones(rest.sum())]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ truth[rest])
        out[i] = np.r_[(x[i] - mean) / std, 1.0] @ w
    return out


def report(rows: list[dict]) -> dict:
    first = np.array([r["truth"] for r in rows])
    mean = (first + np.array([r["truth_repeat"] for r in rows])) / 2
    table = {}
    for name in score_names(rows):
        against = {}
        for label, truth in (("first run", first), ("mean of both", mean)):
            score = predictor_scores(rows, truth) if name == "predictor" else np.array([r[name] for r in rows], dtype=float)
            against[label] = {"kendall_tau": float(kendalltau(score, truth).statistic), "spearman_rho": float(spearmanr(score, truth).statistic),
                              "regret": float(truth.max() - truth[int(np.argmax(score))])}
        table[name] = against
    ceiling = {"kendall_tau": float(kendalltau(first, [r["truth_repeat"] for r in rows]).statistic),
               "spearman_rho": float(spearmanr(first, [r["truth_repeat"] for r in rows]).statistic)}
    return {"members": len(rows), "scores": table, "ceiling": ceiling, "truth_range": [float(mean.min()), float(mean.max())]}


def print_report(result: dict, rows: list[dict]) -> None:
    print(f"{result['members']} members; truth (val mAP, mean of two standalone fine-tunes) {result['truth_range'][0]:.4f} to "
          f"{result['truth_range'][1]:.4f}; mean seconds per member {np.mean([r['seconds'] for r in rows]):.0f}")
    print(f"{'score':<20} {'tau (1st run)':>13} {'rho':>6} {'regret':>7} {'tau (mean)':>11} {'rho':>6} {'regret':>7}")
    for name, against in result["scores"].items():
        a, b = against["first run"], against["mean of both"]
        print(f"{name:<20} {a['kendall_tau']:>13.3f} {a['spearman_rho']:>6.3f} {a['regret']:>7.4f} {b['kendall_tau']:>11.3f} "
              f"{b['spearman_rho']:>6.3f} {b['regret']:>7.4f}")
    c = result["ceiling"]
    print(f"{'ceiling (2nd run)':<20} {c['kendall_tau']:>13.3f} {c['spearman_rho']:>6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting(parser, "rank-fidelity")
    parser.add_argument("--members", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the standalone fine-tuning (the truth)")
    parser.add_argument("--proxy-images", type=lambda v: [int(n) for n in v.split(",")], default=[512],
                        help="training images of the short fine-tunes (one pass each), comma-separated")
    parser.add_argument("--supernet-epochs", type=int, default=None, help="supernet.epochs (default: the experiment file's)")
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="data.workers (image decoding processes)")
    parser.add_argument("--shard", default="0/1", help="i/n: measure members i, i+n, i+2n, ...")
    parser.add_argument("--train-only", action="store_true", help="train the supernet (and embed the gallery), nothing else")
    parser.add_argument("--report", action="store_true", help="merge the shards' results and print the table, nothing else")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, shards = (int(v) for v in args.shard.split("/"))
    files = sorted(out.glob("rank_fidelity*.json"))
    if args.report:
        rows = sorted((r for f in files for r in json.loads(f.read_text())["rows"]), key=lambda r: r["index"])
        result = report(rows)
        (out / "rank_fidelity_report.txt").write_text(json.dumps(result, indent=2))
        print_report(result, rows)
        return
    config = load_setting(args, {"search.threads": args.threads, "train.device": args.device, "supernet.epochs": args.supernet_epochs,
                                 "data.workers": args.workers})
    log = lambda text: print(text, flush=True)  # noqa: E731
    ctx = prepare(config, log=log)
    began = time.perf_counter()
    trained, _ = open_supernet(ctx, log, train=True)
    log(f"supernet ready in {time.perf_counter() - began:.0f} s")
    if args.train_only:
        return
    root = gallery_supernet(ctx)
    scorer = OneShot(ctx, {"val": {"mAP": 1.0}})  # val mAP needs no paragon
    scorer.supernet = trained
    results_file = out / f"rank_fidelity_{shard}of{shards}.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {"rows": []}
    done = {r["index"] for r in saved["rows"]}
    chosen = itertools.islice(members_within_budget(ctx, root, config.search.seed), args.members)
    for index, (arch, _, mflops) in enumerate(chosen):
        if index % shards != shard or index in done:
            continue
        row = {"index": index, **measure(scorer, root, arch, mflops, args, config.search.seed + index)}
        saved["rows"].append(row)
        results_file.write_text(json.dumps(saved, indent=1))
        log(f"member {index}: {mflops:.1f} MFLOPs at {arch.resolution} px; val mAP " + ", ".join(
            f"{name} {row[name]:.4f}" for name in score_names([row]) if name not in ("mflops", "predictor"))
            + f"; fine-tuned {row['truth']:.4f} and {row['truth_repeat']:.4f} ({row['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
