"""Training images per second under each precision, memory format, compilation and thread count.

Three workloads, each a real training step of this project (AdamW, regression loss toward
random unit targets, images preprocessed once into memory so that only the step is timed):

* **query net @128 (CUB)**: a fixed member of the ``mobilenet`` space at 128 px (width 0.5,
  kernel 3, expansion 4, two blocks per stage, squeeze-excitation; 1280-d embedding, as
  against tf_efficientnet_lite2) on CUB-100 photos (``../shared/data/cub100``), batch 32,
  through ``trainers.train_compatible``;
* **supernet step @128 (CUB)**: one sandwich step of a ``mobilenet``-space supernet at
  96-128 px (largest, smallest and two random members, gradients added, one optimizer step),
  as ``nas.supernet.train_supernet`` takes it, batch 32; images per second count each batch
  once;
* **quickstart trial (Fashion-MNIST)**: the quickstart's trial, a ``mobilenet`` member at 28
  px (width 0.75), batch 128, on the quickstart's grey 28 x 28 training images;
* **quickstart gallery (ResNet-18 @32)**: the quickstart's gallery model (timm's ``resnet18``
  with its 128-d embedding) at 32 px, batch 128, trained like a query network (the gallery's
  own training adds a cosine classifier on top: the same network cost).

Settings (``trainers.Speed``): float32 NCHW eager (the default); channels-last; bfloat16
autocast (on a CPU that has it: AVX-512 BF16 or AMX); both; ``torch.compile`` (float32).
Each at 1 and 2 torch threads (``--threads``). A row times ``--steps`` steps after
``--warmup`` untimed ones on a fresh model; for ``compile`` the first step's extra time is
reported as compile seconds, and "per trial" charges it to one trial of that workload
(quickstart: 4 epochs of 6,000 images; CUB: 3 epochs of 2,660). Settings take turns within
each of ``--repeats`` rounds and the median is printed.

``--quality`` adds the check that a setting does not change what training reaches: the
quickstart trial trained its 4 epochs toward the quickstart's gallery embeddings (the
gallery model from ``runs/quickstart``, trained there first if missing), val and query mAP,
for seeds 0 and 1, under each of ``--settings`` (``compile`` on the first seed only);
``--quality-only`` runs just that.

    .venv/bin/python experiments/benchmarks/train_speed.py --repeats 2 [--quality]

Cost on a quiet 2-core machine: about 7 minutes (compiling takes up to 1.5 minutes a workload), and about 3 more
with ``--quality`` (5 if the quickstart's gallery model has to be trained first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nas.config import load_config
from nas.data import LEGACY_PREPROCESSING, Preprocessing, eval_batches, load_image_folder, load_retrieval_data
from nas.gallery import create_gallery_net
from nas.supernet import random_member
from search_spaces import Supernet, build, create_space
from trainers import GalleryTargets, Speed, create_loss, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CUB = ROOT.parents[1] / "shared" / "data" / "cub100"
#: tf_efficientnet_lite2's data config
LITE2 = Preprocessing((0.5,) * 3, (0.5,) * 3, "bicubic", 0.89)
SETTINGS = {
    "float32": Speed(),
    "channels-last": Speed(channels_last=True),
    "bfloat16": Speed("bfloat16"),
    "bfloat16 + channels-last": Speed("bfloat16", channels_last=True),
    "compile": Speed(compile=True),
}
TRIAL_IMAGES = {"query net @128 (CUB)": 3 * 2660, "quickstart trial (Fashion-MNIST)": 4 * 6000}


def mobilenet(resolutions: list[int], width: float, embed_dim: int, in_chans: int):
    return create_space(
        "mobilenet", embed_dim=embed_dim, in_chans=in_chans, resolutions=resolutions, widths=[width], kernels=[3], expansions=[4],
        depths=[[2]] * 4, se=[True],
    )


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first step minus a steady one, seconds per steady step)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    per = (time.perf_counter() - start) / steps
    return max(first - per, 0.0), per


def plain_step(make_model: Callable[[], torch.nn.Module], images: torch.Tensor, batch: int, speed: Speed) -> Callable[[], None]:
    """A train_compatible step of ``make_model()``, as trainers/_train.py takes it."""
    torch.manual_seed(0)
    model = make_model()
    step_model = speed.model(model)
    opt = make_optimizer(model, "adamw", 2e-3, 1e-4, 0.9)
    loss_fn = create_loss("regression")
    with torch.no_grad():
        embed_dim = model.eval()(images[:2]).shape[1]
    targets = F.normalize(torch.randn(batch, embed_dim, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.zeros(batch, dtype=torch.int64)
    loss_fn.bind(GalleryTargets(targets, labels))
    rng = np.random.default_rng(0)
    model.train()

    def step() -> None:
        xb = speed.batch(images[torch.from_numpy(rng.choice(len(images), batch, replace=False))])
        with speed.autocast(torch.device("cpu")):
            out = step_model(xb)
        loss = loss_fn(out.float(), targets, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def supernet_step(space, images: torch.Tensor, batch: int, speed: Speed) -> Callable[[], None]:
    """A sandwich step of a supernet over ``space``, as nas/supernet.py takes it."""
    torch.manual_seed(0)
    supernet = Supernet(space)
    if speed.channels_last:
        supernet.to(memory_format=torch.channels_last)
    opt = make_optimizer(supernet, "adamw", 2e-3, 1e-4, 0.9)
    loss_fn = create_loss("regression")
    targets = F.normalize(torch.randn(batch, 1280, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.zeros(batch, dtype=torch.int64)
    loss_fn.bind(GalleryTargets(targets, labels))
    rng = np.random.default_rng(0)
    largest, smallest = space.extreme(smallest=False), space.extreme(smallest=True)
    supernet.train()

    def step() -> None:
        xb = speed.batch(images[torch.from_numpy(rng.choice(len(images), batch, replace=False))])
        opt.zero_grad(set_to_none=True)
        for arch in [largest, smallest, random_member(space, rng), random_member(space, rng)]:
            x = xb if arch.resolution == xb.shape[-1] else F.interpolate(xb, size=arch.resolution, mode="bilinear", antialias=True, align_corners=False)
            with speed.autocast(torch.device("cpu")):
                out = supernet(speed.batch(x), arch)
            loss_fn(out.float(), targets, labels).backward()
        opt.step()

    return step


def quality(seeds: list[int], settings: list[str]) -> None:
    """Val and query mAP of the quickstart trial trained under each precision (see the module docstring)."""
    from nas.search.context import prepare
    from nas.search.evaluators import TrainFromScratch
    from nas.scoring import paragon_scores

    base = load_config(ROOT / "quickstart.yaml")
    arch = mobilenet([28], 0.75, base.gallery.embed_dim, 1).extreme(smallest=False)
    print("\nquality: the quickstart trial (4 epochs) toward the quickstart's gallery embeddings")
    print(f"{'setting':<26}{'seed':>5}{'val mAP':>9}{'query mAP':>11}{'train s':>9}")
    for name in settings:
        for seed in seeds if name != "compile" else seeds[:1]:
            s = SETTINGS[name]
            config = load_config(ROOT / "quickstart.yaml", {"train": {"precision": s.precision, "channels_last": s.channels_last, "compile": s.compile}})
            ctx = prepare(config, log=lambda _: None)
            evaluator = TrainFromScratch(ctx, paragon_scores(ctx.retrieval, ctx.embeddings))
            m = evaluator.evaluate(evaluator.build(arch, seed), seed).metrics
            print(f"{name:<26}{seed:>5}{m['val_mAP']:>9.4f}{m['query_mAP']:>11.4f}{m['train_seconds']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, from: " + ", ".join(SETTINGS))
    parser.add_argument("--workloads", default=None, help="comma-separated workload name prefixes (default: all)")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--quality-seeds", default="0,1")
    parser.add_argument("--quality-only", action="store_true", help="only the quality check (of --settings)")
    parser.add_argument("--cub", type=Path, default=CUB)
    args = parser.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if args.quality_only:
        quality([int(s) for s in args.quality_seeds.split(",")], settings)
        return

    cub = load_image_folder(args.cub)
    rows = np.random.default_rng(0).choice(len(cub.images), 256, replace=False)
    cub128 = torch.cat(list(eval_batches(cub.images, np.sort(rows), LITE2.eval_transform(128), 64)))
    cub_space = mobilenet([128], 0.5, 1280, 3)
    super_space = mobilenet([96, 112, 128], 0.5, 1280, 3)
    quick = load_config(ROOT / "quickstart.yaml")
    fm = load_retrieval_data(quick.data)
    fm28 = torch.cat(list(eval_batches(fm.data.images, fm.split.train[:1024], LEGACY_PREPROCESSING.eval_transform(28), 256)))
    quick_space = mobilenet([28], 0.75, quick.gallery.embed_dim, 1)
    fm32 = torch.cat(list(eval_batches(fm.data.images, fm.split.train[:1024], LEGACY_PREPROCESSING.eval_transform(32), 256)))
    workloads = {
        "query net @128 (CUB)": (lambda speed: plain_step(lambda: build(cub_space.extreme(smallest=False)), cub128, 32, speed), 32),
        "supernet step @128 (CUB)": (lambda speed: supernet_step(super_space, cub128, 32, speed), 32),
        "quickstart trial (Fashion-MNIST)": (lambda speed: plain_step(lambda: build(quick_space.extreme(smallest=False)), fm28, 128, speed), 128),
        "quickstart gallery (ResNet-18 @32)": (lambda speed: plain_step(lambda: create_gallery_net(quick.gallery, 1), fm32, 128, speed), 128),
    }
    if args.workloads:
        prefixes = [w.strip() for w in args.workloads.split(",")]
        workloads = {k: v for k, v in workloads.items() if any(k.startswith(p) for p in prefixes)}
    threads = [int(t) for t in args.threads.split(",")]
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for workload, (make, batch) in workloads.items():
            for n in threads:
                torch.set_num_threads(n)
                for name in settings:
                    if name == "compile" and workload.startswith("supernet"):
                        continue  # a supernet changes shape every step: it is never compiled
                    compile_s, per = time_steps(make(SETTINGS[name]), args.warmup, args.steps)
                    results.setdefault((workload, n, name), []).append((compile_s, batch / per))
    torch.set_num_threads(max(threads))
    print(f"CPUs {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, "
          f"bf16 CPU kernels: {torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"{args.steps} timed steps after {args.warmup}, median of {args.repeats} round(s)")
    print(f"{'workload':<34}{'threads':>8}  {'setting':<26}{'images/s':>9}{'vs float32':>11}{'compile s':>10}{'per trial':>10}")
    for (workload, n, name), values in results.items():
        speed = statistics.median(v[1] for v in values)
        compile_s = statistics.median(v[0] for v in values)
        base = statistics.median(v[1] for v in results[(workload, n, "float32")]) if (workload, n, "float32") in results else float("nan")
        per_trial = "-"
        if workload in TRIAL_IMAGES:
            images = TRIAL_IMAGES[workload]
            trial_s = images / speed + (compile_s if name == "compile" else 0.0)
            per_trial = f"{(images / base) / trial_s:.2f}x"
        print(f"{workload:<34}{n:>8}  {name:<26}{speed:>9.1f}{speed / base:>10.2f}x{compile_s if name == 'compile' else 0:>10.1f}{per_trial:>10}")
    if args.quality:
        quality([int(s) for s in args.quality_seeds.split(",")], settings)


if __name__ == "__main__":
    main()
