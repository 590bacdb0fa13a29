"""Choosing among fine-tuned finalists: which val score picks the member that is better on query.

A search fine-tunes its best few candidates and keeps one by a score on val; on CUB-100 val is
5 classes and 289 photos, and a val mAP that is noisy there can keep the worse of two networks.
This measures, over random members of one budget fine-tuned as a finalist is, how well each
score that needs no query image agrees with the query mAP of the same fine-tuned network:

* ``val_mAP``, ``val_R@1``: as the search scores val now (``split.val_against``; on a
  class-disjoint split each val image against the other val images);
* ``val_distractors_mAP``: each val image against the gallery model's embeddings of val *and*
  of every training image (the training classes as distractors, as the gallery index holds
  other classes), its own entry excluded: the same 5 classes to find, among 55;
* ``val_agreement``: the mean cosine between the member's embedding of each val image and the
  gallery model's embedding of the same image (compatibility itself, per image);
* ``train_mAP``: the training images (centre crop) against the gallery model's embeddings of
  them, own entry excluded: 50 classes, but images the member was trained on.

Setting: ``--config`` (default ``experiments/cub100_pruned_one_shot.yaml``: CUB-100, the
ImageNet-pretrained ``tf_efficientnet_lite2`` gallery model at 224 px, the ``pruned`` space);
for each budget of ``--budgets`` (fractions of the gallery model's MFLOPs), ``--members``
distinct random members within it, each fine-tuned ``--epochs`` epochs with the study's
training settings from the start a finalist gets from the gallery's weights
(``OneShot.gallery_start``: the gallery's pruned weights, the batch-norm statistics with the
higher val mAP). No supernet is trained. Reported per score and budget: Kendall tau against
query mAP, the share of member pairs it orders as query does (all pairs, and pairs closer than
``--close`` in query mAP: the hard choices), and the regret of its top pick (the best query mAP
minus that of the member it ranks first).

Results go to ``<out>/finalist_choice_<i>of<n>.json`` (a member at a time: an interrupted run
resumes); ``--shard i/n`` measures every n-th member (processes sharing a GPU), ``--report``
merges the shards' files and prints the table.

    .venv/bin/python experiments/benchmarks/finalist_choice.py --members 16 [--budgets 1/10,1/30] [--device cuda]
        [--shard 0/4 | --report]

Cost: per member one fine-tuning (``--epochs`` epochs) and the embeddings of val, training and query photos.
Measured on one H200 with 16 cores (``--device cuda``, four shards side by side): 25-65 s per member in each shard
at 1/10; at 1/30, where most random members are over the budget, 4 members in the same time (each draw was then
extracted and counted by fvcore; it is now counted from the supernet's shapes first). Not run at this size on the
2-core CPU machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "experiments" / "benchmarks"))

from _cub100 import add_setting, load_setting  # noqa: E402
from _members import members_within_budget  # noqa: E402
from rank_fidelity import fine_tune  # noqa: E402

from nas.hardware.budgets import relative_fraction  # noqa: E402
from nas.metrics import retrieval_metrics  # noqa: E402
from nas.scoring import embed  # noqa: E402
from nas.search.context import Context, prepare  # noqa: E402
from nas.search.evaluators import OneShot  # noqa: E402
from nas.supernet import frozen_batch_norm, gallery_supernet  # noqa: E402

SCORES = ("val_mAP", "val_R@1", "val_distractors_mAP", "val_agreement", "train_mAP")


def selectors(ctx: Context, scorer: OneShot, model) -> dict[str, float]:
    """Every score of :data:`SCORES` of the fine-tuned ``model``, and its query mAP and R@1 (the truth)."""
    split, labels, gallery_side = ctx.split, ctx.data.labels, ctx.embeddings
    emb = lambda rows: embed(model, ctx.data.images, model.arch.resolution, ctx.preprocessing, indices=rows,  # noqa: E731
                             device=ctx.device, workers=ctx.workers)
    val, train = emb(split.val), emb(split.train)
    searched = scorer.score(model, "val")
    own = np.arange(len(split.val))
    distractors = retrieval_metrics(val, labels[split.val], np.concatenate([gallery_side.val, gallery_side.train]),
                                    np.concatenate([labels[split.val], labels[split.train]]), exclude=own)
    train_scores = retrieval_metrics(train, labels[split.train], gallery_side.train, labels[split.train], exclude=np.arange(len(split.train)))
    query = scorer.score(model, "query")
    return {"val_mAP": searched["mAP"], "val_R@1": searched["R@1"], "val_distractors_mAP": distractors["mAP"],
            "val_agreement": float(np.mean(np.sum(val * gallery_side.val, axis=1))), "train_mAP": train_scores["mAP"],
            "query_mAP": query["mAP"], "query_R@1": query["R@1"]}


def measure(ctx: Context, scorer: OneShot, arch, mflops: float, epochs: int, seed: int) -> dict:
    """One member fine-tuned as a finalist is from the gallery's weights, and its scores."""
    start = time.perf_counter()
    net, before, kept_bn = scorer.gallery_start(arch)
    freeze = frozen_batch_norm(ctx) or kept_bn
    fine_tune(ctx, net, epochs, seed, freeze_bn=freeze)
    return {"arch": arch.to_string(), "resolution": arch.resolution, "mflops": mflops, "start_val_mAP": before, "kept_bn": kept_bn,
            **selectors(ctx, scorer, net), "seconds": time.perf_counter() - start}


def report(rows: list[dict], close: float) -> dict:
    """Per budget and score: Kendall tau against query mAP, pairwise agreement (all pairs and close ones), regret."""
    result = {}
    for budget in sorted({r["budget"] for r in rows}, key=relative_fraction, reverse=True):
        part = [r for r in rows if r["budget"] == budget]
        truth = np.array([r["query_mAP"] for r in part])
        pairs = [(i, j) for i, j in itertools.combinations(range(len(part)), 2) if truth[i] != truth[j]]
        hard = [(i, j) for i, j in pairs if abs(truth[i] - truth[j]) < close]
        table = {}
        for name in SCORES:
            score = np.array([r[name] for r in part])
            agree = lambda ps: float(np.mean([(score[i] > score[j]) == (truth[i] > truth[j]) for i, j in ps])) if ps else float("nan")  # noqa: E731
            table[name] = {"kendall_tau": float(kendalltau(score, truth).statistic), "pairs": agree(pairs), "close_pairs": agree(hard),
                           "regret": float(truth.max() - truth[int(np.argmax(score))])}
        result[budget] = {"members": len(part), "pairs": len(pairs), "close_pairs": len(hard), "query_mAP_range": [float(truth.min()), float(truth.max())],
                          "mflops_range": [min(r["mflops"] for r in part), max(r["mflops"] for r in part)], "scores": table}
    return result


def print_report(result: dict, close: float) -> None:
    for budget, r in result.items():
        print(f"budget {budget} of the gallery's MFLOPs: {r['members']} members, {r['mflops_range'][0]:.1f}-{r['mflops_range'][1]:.1f} MFLOPs, "
              f"query mAP {r['query_mAP_range'][0]:.4f}-{r['query_mAP_range'][1]:.4f}; {r['pairs']} pairs, {r['close_pairs']} closer than {close}")
        print(f"  {'score':<22} {'tau':>6} {'pairs':>6} {'close pairs':>11} {'regret':>7}")
        for name, s in r["scores"].items():
            print(f"  {name:<22} {s['kendall_tau']:>6.3f} {s['pairs']:>6.3f} {s['close_pairs']:>11.3f} {s['regret']:>7.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting(parser, "finalist-choice")
    parser.add_argument("--budgets", type=lambda v: v.split(","), default=["1/10", "1/30"], help="fractions of the gallery model's MFLOPs")
    parser.add_argument("--members", type=int, default=16, help="members per budget")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each member's fine-tuning")
    parser.add_argument("--close", type=float, default=0.02, help="query mAP difference under which a pair counts as close")
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="data.workers (image decoding processes)")
    parser.add_argument("--shard", default="0/1", help="i/n: measure members i, i+n, i+2n, ... of each budget")
    parser.add_argument("--report", action="store_true", help="merge the shards' results and print the table, nothing else")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = [r for f in sorted(out.glob("finalist_choice_*of*.json")) for r in json.loads(f.read_text())["rows"]]
        result = report(rows, args.close)
        (out / "finalist_choice_report.json").write_text(json.dumps(result, indent=2))
        print_report(result, args.close)
        return
    shard, shards = (int(v) for v in args.shard.split("/"))
    results_file = out / f"finalist_choice_{shard}of{shards}.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {"rows": []}
    done = {(r["budget"], r["index"]) for r in saved["rows"]}
    log = lambda text: print(text, flush=True)  # noqa: E731
    for budget in args.budgets:
        config = load_setting(args, {"search.threads": args.threads, "train.device": args.device, "data.workers": args.workers,
                                     "budgets.max_mflops": budget, "tracking.enabled": False})
        ctx = prepare(config, log=log)
        scorer = OneShot(ctx, {"val": {"mAP": 1.0}, "query": {"mAP": 1.0}})  # ratios are not reported
        chosen = itertools.islice(members_within_budget(ctx, gallery_supernet(ctx), config.search.seed), args.members)
        for index, (arch, _, mflops) in enumerate(chosen):
            if index % shards != shard or (budget, index) in done:
                continue
            row = {"budget": budget, "index": index, **measure(ctx, scorer, arch, mflops, args.epochs, config.search.seed + index)}
            saved["rows"].append(row)
            results_file.write_text(json.dumps(saved, indent=1))
            log(f"{budget} member {index}: {mflops:.1f} MFLOPs at {arch.resolution} px; " + ", ".join(
                f"{name} {row[name]:.4f}" for name in (*SCORES, "query_mAP")) + f" ({row['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
