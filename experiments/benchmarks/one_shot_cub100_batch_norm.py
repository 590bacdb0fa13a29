"""CUB-100: fine-tuning a pruning of the pretrained gallery model with its batch-norm statistics kept or recalibrated.

Setting: ``experiments/cub100_one_shot.yaml`` (CUB-100, the ImageNet-pretrained
``tf_efficientnet_lite2`` gallery model at 224 px). The unpruned gallery model at
``--resolution`` px (its weights, no supernet training) is fine-tuned ``--epochs`` epochs
with the study's training settings, once per ``supernet.batch_norm`` mode:

* ``frozen``: every batch-norm layer keeps the gallery's running statistics;
* ``recalibrate``: statistics recalibrated on the fixed training subset first, batch
  statistics in training (running statistics updated).

Printed: val mAP before and after every epoch, query mAP and R@1 at the end. MFLOPs are
fvcore multiply-accumulates, batch 1.

    .venv/bin/python experiments/benchmarks/one_shot_cub100_batch_norm.py [--resolution 70] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from convert_efficientnet_lite import VARIANTS, convert_variant  # noqa: E402

from nas.config import load_config  # noqa: E402
from nas.hardware.measure import count_mflops  # noqa: E402
from nas.scoring import paragon_scores  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.search.evaluators import OneShot  # noqa: E402
from nas.supernet import frozen_batch_norm, recalibrated, root_network  # noqa: E402
from search_spaces import Supernet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--cache", default=str(REPO / "runs" / "cub-cache"), help="folder of the gallery-embedding cache")
    parser.add_argument("--resolution", type=int, default=70)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    weights = REPO / "weights" / "tf_efficientnet_lite2.safetensors"
    if not weights.is_file():
        convert_variant(VARIANTS["lite2"], weights)
    rows = []
    for mode in ("frozen", "recalibrate"):
        config = load_config(REPO / "experiments" / "cub100_one_shot.yaml", {
            "out": str(REPO / "runs" / "cub100-batch-norm"), "cache": args.cache, "data.path": args.data, "gallery.weights": str(weights),
            "search.threads": args.threads, "supernet.batch_norm": mode, "space.options.resolutions": [args.resolution],
        })
        ctx = prepare(config, log=lambda _: None)
        root = Supernet(ctx.space, root_network(ctx, ctx.space))
        model = root.extract(ctx.space.extreme(smallest=False))
        mflops = count_mflops(model, args.resolution, model.arch.in_chans)
        paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
        scorer = OneShot(ctx, paragon)
        recalibrated(ctx, model)  # a no-op when frozen
        vals = [scorer.score(model, "val")["mAP"]]
        metrics = scorer.train_and_score(model, config.search.seed, args.epochs, config.train.lr,
                                         lambda result, val: vals.append(val["mAP"]), None, mode, frozen_batch_norm(ctx))
        rows.append((mode, mflops, vals, metrics["query_mAP"], metrics["query_mAP_ratio"], metrics["query_R@1"], metrics["train_seconds"]))
        print(f"{mode}: val mAP {' -> '.join(f'{v:.4f}' for v in vals)}, query mAP {metrics['query_mAP']:.4f}, R@1 {metrics['query_R@1']:.4f}", flush=True)
    print()
    print(f"unpruned tf_efficientnet_lite2 at {args.resolution} px ({rows[0][1]:.1f} MFLOPs), fine-tuned {args.epochs} epochs")
    print(f"{'batch norm':<12} {'val mAP before':>14} {'val mAP after each epoch':>28} {'query mAP':>9} {'ratio':>6} {'R@1':>7} {'train s':>8}")
    for mode, _, vals, query, ratio, r1, seconds in rows:
        print(f"{mode:<12} {vals[0]:>14.4f} {' / '.join(f'{v:.4f}' for v in vals[1:]):>28} {query:>9.4f} {ratio:>6.3f} {r1:>7.4f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
