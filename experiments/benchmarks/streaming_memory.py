"""Peak memory of a one-trial search against the number of images in an image folder.

Generates, once, a folder of 256 x 256 px JPEGs (quality 85) in ``--classes`` classes: every
class has its own background colour, palette and shapes (PIL-drawn ellipses, rectangles and
polygons at random places and sizes) plus low- and high-frequency noise. The images are made
by ``--jobs`` processes (default: all CPUs) into ``--work DIR/pool`` and every size's folder
(``DIR/images-N``) holds hard links to the first N of them, so the 5k, 20k and 50k sets
share one pool; a rerun generates nothing that is already there.

Then, per size, runs ``python -m nas.cli search EXP.yaml`` in its own process on a fresh
output folder: ``data.dataset: image_folder`` decoded at the images' own size
(``data.image_size: null``), ``data.workers`` loader processes (null: automatic, see
``nas.data.resolve_workers``), a gallery model from ``gallery.weights`` (a randomly initialised
``mobilenetv2_050`` state dict saved first, ``embed_dim: 64``, gallery resolution 64), the
``mobilenet`` space at 32 px and width 0.35, one trial of one epoch, no budget limits, no
latency table, tracking off. So every run embeds all N images with the gallery model, trains
one candidate on 60% of them and scores val and query: the whole streaming path.

While a search runs, every ``--interval`` seconds (default 0.2) psutil samples the resident
set (RSS) of the search process, the sum of RSS over it and all its descendants (DataLoader
workers; forked, so their RSS double-counts pages shared with the parent) and, where Linux
gives it, the sum of PSS over the same tree (shared pages split between the processes that
map them). The kernel's own peak (``ru_maxrss`` from ``wait4``: the largest RSS any one
process of the tree reached, not sampled) is printed beside them. Every sample, with the
search's last log line at that moment, goes to ``DIR/runs/size-N.trace.csv``; the search's
output to ``DIR/runs/size-N.log``.

Prints per size: images, the main process's RSS once the search printed its first line
(imports done, folder listed: the part that does not depend on N), its peak RSS, the peak
RSS and PSS of the process tree, the kernel max RSS, wall time and the log line current
when the main RSS first came within 2% of its peak; then the ratio max / min of the peak
main-process RSS over the sizes (flat memory means close to 1; the target is within 1.25)
and what the gallery index itself needs (N x embed_dim x 4 bytes of float32), for context.

    .venv/bin/python experiments/benchmarks/streaming_memory.py --sizes 5000,20000,50000

Cost: generating the 50,000 images takes about 6 CPU-minutes (about 7.5 ms each) and 700 MB
under ``--work``; each search costs about 25 CPU-seconds of fixed work (imports, budget
measurements, the summary) plus about 18 CPU-milliseconds per image (gallery embedding of
all, training on 60%, scoring val and query), so the default sizes take about 25 CPU-minutes
of searching (measured on a busy 2-core machine at 1k and 2k images; extrapolated). A smoke
run, ``--sizes 200,400 --classes 10 --work /tmp/smoke``, takes about a minute and a half.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import yaml

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


# --------------------------------------------------------------------------- images


def _class_style(label: int) -> dict:
    """The fixed look of one class: background, palette, which shapes, how many, how large."""
    rng = np.random.default_rng([7, label])
    return {
        "background": tuple(int(v) for v in rng.integers(0, 256, 3)),
        "palette": [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(3)],
        "shapes": [str(s) for s in rng.choice(["ellipse", "rectangle", "triangle", "star"], size=2, replace=False)],
        "count": int(rng.integers(2, 7)),
        "scale": float(rng.uniform(0.15, 0.45)),
    }


def _draw(label: int, index: int, px: int) -> PILImage:
    from PIL import Image, ImageDraw

    style = _class_style(label)
    rng = np.random.default_rng([11, label, index])
    img = Image.new("RGB", (px, px), style["background"])
    draw = ImageDraw.Draw(img)
    for _ in range(style["count"] + int(rng.integers(-1, 2))):
        shape = style["shapes"][int(rng.integers(len(style["shapes"])))]
        colour = np.array(style["palette"][int(rng.integers(len(style["palette"])))]) + rng.integers(-25, 26, 3)
        colour = tuple(int(v) for v in colour.clip(0, 255))
        r = px * style["scale"] * rng.uniform(0.6, 1.4) / 2
        cx, cy = rng.uniform(r, px - r, 2)
        if shape == "ellipse":
            draw.ellipse((cx - r, cy - r * rng.uniform(0.5, 1.0), cx + r, cy + r * rng.uniform(0.5, 1.0)), fill=colour)
        elif shape == "rectangle":
            draw.rectangle((cx - r, cy - r * rng.uniform(0.4, 1.0), cx + r, cy + r), fill=colour)
        else:
            points = 3 if shape == "triangle" else 10
            turn = rng.uniform(0, 2 * math.pi)
            radii = [r if (k % 2 == 0 or shape == "triangle") else r * 0.45 for k in range(points)]
            draw.polygon(
                [(cx + radii[k] * math.cos(turn + 2 * math.pi * k / points), cy + radii[k] * math.sin(turn + 2 * math.pi * k / points)) for k in range(points)],
                fill=colour,
            )
    coarse = rng.integers(-20, 21, (px // 16, px // 16, 3), dtype=np.int16) + 128  # low-frequency shading
    coarse = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((px, px), Image.Resampling.BILINEAR), dtype=np.int16) - 128
    fine = rng.integers(-10, 11, (px, px, 3), dtype=np.int16)  # sensor-like grain (uniform, sd about 6)
    pixels = (np.asarray(img, dtype=np.int16) + coarse + fine).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _pool_file(pool: Path, label: int, index: int) -> Path:
    return pool / f"c{label:03d}" / f"{index:06d}.jpg"


def _make_one(task: tuple[str, int, int, int]) -> int:
    pool, label, index, px = task
    path = _pool_file(Path(pool), label, index)
    if path.is_file():
        return 0
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    _draw(label, index, px).save(tmp, "JPEG", quality=85)
    os.replace(tmp, path)
    return 1


def _layout(n: int, classes: int) -> list[tuple[int, int]]:
    """Image ``i`` of a set of ``n`` is image ``i // classes`` of class ``i % classes``."""
    return [(i % classes, i // classes) for i in range(n)]


def ensure_images(work: Path, sizes: list[int], classes: int, px: int, jobs: int) -> dict[int, Path]:
    """Generate the pool (missing files only) and one folder of hard links per size."""
    pool = work / "pool"
    for label in range(classes):
        (pool / f"c{label:03d}").mkdir(parents=True, exist_ok=True)
    tasks = [(str(pool), label, index, px) for label, index in _layout(max(sizes), classes)]
    missing = [t for t in tasks if not _pool_file(pool, t[1], t[2]).is_file()]
    if missing:
        start = time.perf_counter()
        print(f"generating {len(missing)} images of {px} px in {pool} with {jobs} processes ...", flush=True)
        with multiprocessing.get_context("fork").Pool(jobs) as workers:
            made = sum(workers.imap_unordered(_make_one, missing, chunksize=64))
        print(f"generated {made} images in {time.perf_counter() - start:.1f} s", flush=True)
    folders = {}
    for n in sizes:
        folder = work / f"images-{n}"
        marker = folder / ".complete"
        if not marker.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            for label, index in _layout(n, classes):
                target = folder / f"c{label:03d}" / f"{index:06d}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(_pool_file(pool, label, index), target)
                except OSError:  # another file system, or no hard links: copy
                    shutil.copy2(_pool_file(pool, label, index), target)
            marker.write_text(f"{n} images, {classes} classes, {px} px\n")
        folders[n] = folder
    return folders


def save_gallery_weights(path: Path, model: str) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    if path.is_file():
        return
    torch.manual_seed(0)
    backbone = timm.create_model(model, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))


# --------------------------------------------------------------------------- one search


def experiment(folder: Path, out: Path, weights: Path, args: argparse.Namespace) -> dict:
    return {
        "out": str(out),
        "data": {
            "dataset": "image_folder", "path": str(folder), "image_size": None, "max_per_class": None,
            "workers": args.workers, "train": 0.6, "val": 0.05, "query": 0.1, "gallery": 0.25, "seed": 0,
        },
        "gallery": {"model": args.gallery_model, "weights": str(weights), "embed_dim": args.embed_dim, "resolution": 64, "batch_size": 256},
        "space": {"name": "mobilenet", "options": {"resolutions": [32], "widths": [0.35]}},
        "budgets": {
            "max_mflops": None, "max_params_m": None, "max_latency_ms": None, "max_memory_mb": None,
            "latency": {"predict": False, "warmup": 1, "repeats": 3, "threads": 1},
        },
        "train": {"loss": "regression", "epochs": 1, "batch_size": 128, "device": "cpu"},
        "search": {"study_name": "streaming-memory", "trials": 1, "seed": 0, "pruner": "none", "keep_best": 1},
        "tracking": {"enabled": False},
    }


class Sampler:
    """Peak RSS of a process, and of RSS / PSS summed over its process tree, sampled on a thread.

    ``trace`` keeps every sample: seconds, main RSS, tree RSS, tree PSS (bytes) and the
    process's last log line (``phase[0]``) at that moment.
    """

    def __init__(self, pid: int, interval: float, phase: list[str]) -> None:
        self.proc = psutil.Process(pid)
        self.interval, self.phase = interval, phase
        self.pss_available = True
        self.trace: list[tuple[float, int, int, int, str]] = []
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _pss(self, proc: psutil.Process) -> int:
        if not self.pss_available:
            return 0
        try:
            return int(proc.memory_full_info().pss)
        except AttributeError:  # not Linux: no PSS
            self.pss_available = False
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.Error:
                break  # the search process is gone
            rss = pss = 0
            main = None
            for proc in procs:
                try:
                    r = int(proc.memory_info().rss)
                    p = self._pss(proc)
                except psutil.Error:  # a loader worker that just exited
                    continue
                rss, pss = rss + r, pss + p
                if proc.pid == self.proc.pid:
                    main = r
            if main:  # None: unreadable; 0: the search exited and is not yet reaped (a zombie has no memory)
                self.trace.append((time.perf_counter() - self._start, main, rss, pss, self.phase[0]))
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        """Peaks (MiB), the main RSS once the first log line was out (imports done, data listed),
        and the log line current when the main RSS first came within 2% of its peak."""
        if not self.trace:
            return {"main": float("nan"), "tree_rss": float("nan"), "tree_pss": float("nan"), "start": float("nan"), "phase": "", "samples": 0}
        main = max(t[1] for t in self.trace)
        near = next(t for t in self.trace if t[1] >= 0.98 * main)
        started = next((t[1] for t in self.trace if t[4] != "starting"), float("nan"))
        return {
            "main": main / MIB,
            "tree_rss": max(t[2] for t in self.trace) / MIB,
            "tree_pss": max(t[3] for t in self.trace) / MIB if self.pss_available else float("nan"),
            "start": started / MIB,
            "phase": near[4],
            "samples": len(self.trace),
        }

    def write(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["seconds", "main_rss_mib", "tree_rss_mib", "tree_pss_mib", "last_log_line"])
            for t, main, rss, pss, phase in self.trace:
                out.writerow([f"{t:.2f}", f"{main / MIB:.1f}", f"{rss / MIB:.1f}", f"{pss / MIB:.1f}", phase[:120]])


def run_search(n: int, folder: Path, work: Path, weights: Path, args: argparse.Namespace) -> dict:
    out = work / "runs" / f"size-{n}"
    shutil.rmtree(out, ignore_errors=True)  # fresh: the gallery embeddings are computed, not read from the cache
    out.mkdir(parents=True)
    exp = out.parent / f"size-{n}.yaml"
    exp.write_text(yaml.safe_dump(experiment(folder, out, weights, args), sort_keys=False))
    log_file = out.parent / f"size-{n}.log"
    env = {**os.environ, "NAS_QUIET": "1", "PYTHONUNBUFFERED": "1"}
    phase = ["starting"]
    start = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nas.cli", "search", str(exp)], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

        def read() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                if line.strip():
                    phase[0] = line.strip()

        reader = threading.Thread(target=read, daemon=True)
        with Sampler(proc.pid, args.interval, phase) as sampler:
            reader.start()
            _, status, usage = os.wait4(proc.pid, 0)
        reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the search of {n} images failed (exit status {proc.returncode}); its output is in {log_file}:\n"
                 + "".join(log_file.read_text().splitlines(keepends=True)[-25:]))
    sampler.write(out.parent / f"size-{n}.trace.csv")
    return {"images": n, **sampler.summary(), "maxrss": usage.ru_maxrss * 1024 / MIB, "wall": wall}  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="5000,20000,50000", help="comma-separated numbers of images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/asymnas-streaming-memory"), help="cache of images, weights and runs")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--px", type=int, default=256, help="image side in pixels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes generating images")
    parser.add_argument("--workers", type=int, default=None, help="data.workers of the searches (default null: automatic)")
    parser.add_argument("--gallery-model", default="mobilenetv2_050", help="timm architecture of the random gallery model")
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 20 * args.classes:  # the split's val fraction, 0.05, must give every class one image
        parser.error(f"every size must be at least 20 x --classes ({20 * args.classes}) so that each class has a val image")

    args.work.mkdir(parents=True, exist_ok=True)
    folders = ensure_images(args.work, sizes, args.classes, args.px, max(1, args.jobs))
    weights = args.work / f"gallery-{args.gallery_model}.safetensors"
    save_gallery_weights(weights, args.gallery_model)

    rows = []
    for n in sizes:
        print(f"searching {n} images ...", flush=True)
        rows.append(run_search(n, folders[n], args.work, weights, args))

    print()
    print(f"CPUs: {os.cpu_count()}; data.workers: {'auto' if args.workers is None else args.workers}; "
          f"gallery {args.gallery_model} at 64 px, embed_dim {args.embed_dim}; {args.px} px JPEGs, {args.classes} classes; "
          f"samples every {args.interval:g} s; logs in {args.work / 'runs'}")
    print(f"{'images':>7} {'main RSS at start':>17} {'peak RSS main':>13} {'peak tree RSS':>13} {'peak tree PSS':>13} "
          f"{'kernel max RSS':>14} {'wall s':>7} {'samples':>7}  log line when main RSS first within 2% of its peak")
    for r in rows:
        print(f"{r['images']:>7} {r['start']:>17.1f} {r['main']:>13.1f} {r['tree_rss']:>13.1f} {r['tree_pss']:>13.1f} "
              f"{r['maxrss']:>14.1f} {r['wall']:>7.1f} {r['samples']:>7}  {r['phase'][:60]}")
    print("(MiB; 'at start': once the search printed its first line, i.e. imports done and the folder listed; "
          "traces per sample in runs/size-N.trace.csv)")
    mains = [r["main"] for r in rows]
    if len(rows) > 1:
        print(f"\npeak main RSS, max / min over sizes: {max(mains) / min(mains):.3f} "
              f"({mains[-1] - mains[0]:+.1f} MiB from {rows[0]['images']} to {rows[-1]['images']} images)")
        pss = [r["tree_pss"] for r in rows]
        if not any(math.isnan(p) for p in pss):
            print(f"peak tree PSS, max / min over sizes: {max(pss) / min(pss):.3f}")
    print("\ngallery index (float32 embeddings of every image, N x embed_dim x 4 bytes), for context:")
    for n in sizes:
        print(f"  {n:>7} images x {args.embed_dim} dims: {n * args.embed_dim * 4 / MIB:8.2f} MiB")


if __name__ == "__main__":
    main()
