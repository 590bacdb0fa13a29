"""Every bad input we tried, through the real command line: exit status, message, traceback or not.

Builds small inputs in a temporary folder (scikit-learn's digits as image folders, damaged
and foreign study databases, an untrained export, a 14000 x 14000 PNG of a few hundred KB,
broken experiment files), runs each case as ``python -m nas.cli ...`` in a subprocess and
prints one table: the case, the exit status (and the one expected), the first line of the
message, whether a traceback was printed, and whether anything was lost (no gallery model
trained, no damaged or foreign database changed, no file written where nothing should be).
No case trains anything; the whole run takes a few minutes on two cores.

PostgreSQL cases need the server on 127.0.0.1:5432 (trust auth, database ``test``); they
are skipped, with that reason, when it does not answer.

    .venv/bin/python experiments/benchmarks/bad_inputs.py [--jobs 2] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import optuna
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from nas.config import GalleryConfig, LatencyConfig, load_config
from nas.data import LEGACY_PREPROCESSING, load_retrieval_data
from nas.export.loading import WEIGHTS_FILE, write_arch
from nas.gallery import create_gallery_net, file_sha256, gallery_embeddings, load_gallery, save_gallery
from nas.hardware.latency_table import default_table_path
from search_spaces import build, create_space

PASSWORD = "s3cret-pw"
RAW_AT, ODD, UNICODE = "hunter@2024tail", "sl/ash#tag?q%pw 4242", "pässw@rd/€4242"
SMALLEST = "space=resnet res=16 width=1 stem=16 stages=bb_r1_k3_s1_c8/bb_r1_k3_s2_c16 head=0 embed=8 in=1 act=relu"  # a tiny arch to profile
POSTGRES = ("127.0.0.1", 5432)


@dataclass
class Case:
    """One bad input: ``nas`` arguments, the expected exit status, and what must stay as it was."""

    name: str
    argv: list[str]
    expect: int = 2
    absent: list[Path] = field(default_factory=list)  # must not exist afterwards (a trained gallery, a written file)
    unchanged: list[Path] = field(default_factory=list)  # must keep their bytes
    secret: str | None = None  # must not be printed
    postgres: bool = False
    close_stdout: bool = False  # the reader of stdout is gone (``nas results | head``)
    env: dict[str, str] = field(default_factory=dict)  # set for this case only


# --------------------------------------------------------------------------- inputs


def digit_folder(root: Path, classes: list[int], per_class: int = 12) -> Path:
    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)
    for digit in classes:
        folder = root / f"digit{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in np.flatnonzero(digits.target == digit)[:per_class]:
            Image.fromarray(np.kron(images[n], np.ones((2, 2), dtype=np.uint8))).save(folder / f"{n}.png")
    return root


def huge_png(path: Path, side: int = 14000) -> Path:
    """A valid grey PNG of one colour: a few hundred KB on disk, ``side**2`` pixels when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    rows = b"\x00" * ((side + 1) * 500)
    body = b"".join(compressor.compress(rows[: (side + 1) * min(500, side - start)]) for start in range(0, side, 500))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body + compressor.flush()) + chunk(b"IEND", b""))
    return path


def experiment(root: Path, name: str, data: dict, **changes) -> Path:
    """A tiny experiment file (tracking off) with its output under ``root/run-<name>``."""
    config = {
        "out": str(root / f"run-{name}"),
        "data": {"image_size": 16, "channels": 1, **data},
        "gallery": {"model": "resnet18", "embed_dim": 16, "resolution": 16, "train": {"epochs": 1, "batch_size": 32}},
        "space": {"name": "mobilenet", "options": {"resolutions": [16], "widths": [0.35]}},
        "train": {"epochs": 1, "batch_size": 32},
        "search": {"study_name": name, "trials": 1, "pruner": "none"},
        "tracking": {"enabled": False},
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def inshop_without_positives(root: Path) -> Path:
    """In-Shop list files whose query items never occur in the gallery."""
    items = {f"id_0000000{i}": "train" for i in range(1, 5)}
    items.update({"id_00000005": "query", "id_00000006": "query", "id_00000007": "gallery", "id_00000008": "gallery"})
    rows = []
    for n, (item, status) in enumerate(items.items()):
        for k in range(3):
            rel = f"img/WOMEN/Dresses/{item}/{k + 1:02d}_front.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((12, 12, 3), 20 * n + k, dtype=np.uint8)).save(root / rel)
            rows.append(f"{rel} {item} {status}\n")
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(rows))
    return root


def study_db(path: Path, trials: int = 60, running: bool = False) -> Path:
    """A real Optuna study ``kept`` (``running``: its last trial left running)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="kept", storage=f"sqlite:///{path}")
    for n in range(trials):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("note", "padding " * 40)
        study.tell(trial, float(n))
    if running:
        study.ask()
    return path


def export_folder(folder: Path) -> Path:
    arch = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[0.35]).extreme(smallest=True)
    folder.mkdir(parents=True)
    write_arch(arch, folder, LEGACY_PREPROCESSING)
    save_file(build(arch).state_dict(), str(folder / WEIGHTS_FILE))
    return folder


def wrong_shape_gallery(path: Path) -> Path:
    """A gallery checkpoint of the experiments' gallery model (untrained) whose projection has one row too many."""
    model = create_gallery_net(GalleryConfig(model="resnet18", embed_dim=16, resolution=16), 1)
    with torch.no_grad():
        model.proj.weight = torch.nn.Parameter(torch.cat([model.proj.weight, model.proj.weight[:1]]))
    return save_gallery(model, path, 16, ("digit1", "digit7"))


def damaged_embedding_cache(config_file: Path) -> Path:
    """The gallery embedding cache ``nas search config_file`` will look for, written as it would, then cut short."""
    config = load_config(config_file)
    retrieval = load_retrieval_data(config.data)
    model = load_gallery(config.gallery, config.gallery.checkpoint, retrieval.data.channels)
    gallery_embeddings(model, file_sha256(config.gallery.checkpoint), retrieval.data, retrieval.split, config.gallery.resolution,
                       config.cache_dir / "cache", log=lambda message: None, workers=0)
    (path,) = (config.cache_dir / "cache").glob("gallery-*.npz")
    path.write_bytes(path.read_bytes()[:200])
    return path


def postgres_up() -> bool:
    try:
        with socket.create_connection(POSTGRES, timeout=2):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the cases


def build_cases(root: Path, busy_port: int) -> list[Case]:
    two = digit_folder(root / "two", [1, 7], per_class=40)  # 40 per class: every split part gets at least one
    one = digit_folder(root / "one", [3], per_class=30)
    flat = root / "flat"
    flat.mkdir()
    for png in (two / "digit1").glob("*.png"):
        (flat / png.name).write_bytes(png.read_bytes())
    fake = digit_folder(root / "fake", [1, 7])
    (fake / "digit1" / "notes.png").write_text("not an image")
    huge = digit_folder(root / "huge", [1, 7])
    huge_png(huge / "digit1" / "huge.png")
    a_file = root / "a_file"
    a_file.write_text("keep me")
    folder = {"dataset": "image_folder", "path": str(two)}

    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "optuna.db").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = root / "truncated"
    truncated.mkdir()
    whole = study_db(root / "whole" / "optuna.db").read_bytes()
    (truncated / "optuna.db").write_bytes(whole[: len(whole) // 2])
    running = root / "running"
    study_db(running / "optuna.db", trials=2, running=True)
    foreign = root / "mlflow.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT)")
        db.execute("CREATE TABLE experiments (name TEXT)")
    journal = root / "garbage.log"
    journal.write_bytes((bytes(range(128, 256)) + b"\n") * 8)
    export = export_folder(root / "export")
    broken_images = root / "broken_images"
    broken_images.mkdir()
    for n in range(5):
        (broken_images / f"bad{n}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    embed_huge = digit_folder(root / "embed_huge", [4], per_class=3)
    huge_png(embed_huge / "huge.png")
    (root / "gallery.safetensors").write_bytes(b"not a checkpoint")
    stale = root / "run-stale" / "optuna.db"  # a study recorded under another split (as after data.max_per_class 100 -> 120)
    study_db(stale, trials=2)
    optuna.load_study(study_name="kept", storage=f"sqlite:///{stale}").set_user_attr(
        "fingerprint", {"split": "train 1, val 1, query 1, gallery 1, sha256 000000000000"})
    embed_deep = root / "embed_deep"  # 16-bit grey PNGs (PIL mode I;16): decoded by their bit depth, not clipped white
    embed_deep.mkdir()
    for n in range(3):
        Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257) // (n + 1)).save(embed_deep / f"deep{n}.png")
    floaty = digit_folder(root / "float", [1, 7], per_class=40)
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(floaty / "digit7" / "float.tif")
    embed_float = digit_folder(root / "embed_float", [4], per_class=3)
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)).save(embed_float / "float.tif")
    wrong_shape_gallery(root / "wide_gallery.safetensors")
    cut_export = export_folder(root / "cut_export")
    (cut_export / WEIGHTS_FILE).write_bytes((cut_export / WEIGHTS_FILE).read_bytes()[:300])
    table = default_table_path(LatencyConfig(runtime="torch", threads=1, batch_size=1, table_dir=str(root / "tables")))
    table.parent.mkdir(parents=True)
    table.write_bytes(b'{"header": {"format": 2}, "entries": {"x": {"ms": 1.5, "at": 1')  # cut short while written
    untrained = save_gallery(create_gallery_net(GalleryConfig(model="resnet18", embed_dim=16, resolution=16), 1), root / "untrained.safetensors", 16, ("digit1", "digit7"))

    rng = np.random.default_rng(0)
    gallery16, gallery8, no_ids = root / "gallery16.npy", root / "gallery8.npy", root / "no_ids.npy"
    for path, dim in ((gallery16, 16), (gallery8, 8), (no_ids, 16)):  # the export outputs 16 dimensions
        np.save(path, rng.standard_normal((20, dim)).astype(np.float32))
    for path in (gallery16, gallery8):
        path.with_suffix(".ids.txt").write_text("".join(f"img{n}.png\n" for n in range(20)))
    photo = str(next((two / "digit1").glob("*.png")))

    cfg = {
        "two": experiment(root, "two", folder),
        "one": experiment(root, "one", {"dataset": "image_folder", "path": str(one)}),
        "flat": experiment(root, "flat", {"dataset": "image_folder", "path": str(flat)}),
        "fake": experiment(root, "fake", {"dataset": "image_folder", "path": str(fake)}),
        "huge": experiment(root, "huge", {"dataset": "image_folder", "path": str(huge)}),
        "pathfile": experiment(root, "pathfile", {"dataset": "image_folder", "path": str(a_file)}),
        "nodata": experiment(root, "nodata", {"dataset": "image_folder", "path": str(root / "nowhere")}),
        "inshop": experiment(root, "inshop", {"dataset": "inshop", "path": str(inshop_without_positives(root / "inshop")), "image_size": 8, "val_classes": 0.5}),
        "garbage": experiment(root, "garbage", folder, out=str(garbage)),
        "truncated": experiment(root, "truncated", folder, out=str(truncated)),
        "nockpt": experiment(root, "nockpt", folder, gallery__checkpoint=str(root / "missing.safetensors")),
        "badckpt": experiment(root, "badckpt", folder, gallery__checkpoint=str(root / "gallery.safetensors")),
        "wideckpt": experiment(root, "wideckpt", folder, gallery__checkpoint=str(root / "wide_gallery.safetensors")),
        "cutcache": experiment(root, "cutcache", folder, gallery__checkpoint=str(untrained)),
        "seed": experiment(root, "seed", folder, search__seed=-5),
        "dataseed": experiment(root, "dataseed", folder, data__seed=-1),
        "gbs": experiment(root, "gbs", folder, gallery__batch_size=0),
        "stale": experiment(root, "stale", folder, search__study_name="kept"),
        "float": experiment(root, "float", {"dataset": "image_folder", "path": str(floaty)}),
        "notrials": experiment(root, "notrials", folder, search__trials=0),
        "warmname": experiment(root, "warmname", folder, search__warm_start=["lcnet_051@32"]),
        "offline": experiment(root, "offline", folder, gallery__model="lcnet_050", gallery__pretrained=True, gallery__embed_dim=None),
        "warmarch": experiment(root, "warmarch", folder, search__warm_start=["space=mobilenet res=16 width=0.35 stages=zz_r1_k3_s1_c16"]),
    }
    damaged_embedding_cache(cfg["cutcache"])
    files = {"empty.yaml": b"", "comments.yaml": b"# settings to come\n", "list.yaml": b"- data\n- search\n", "binary.yaml": bytes(range(128, 200)), "invalid.yaml": b"data: [unclosed\n"}
    for name, content in files.items():
        (root / name).write_bytes(content)

    def no_gallery(name: str) -> list[Path]:
        return [root / f"run-{name}" / "gallery"]

    two_cfg = str(cfg["two"])
    pg = "postgresql://postgres@127.0.0.1"
    return [
        # data retrieval cannot score
        Case("one-class image_folder: nas search", ["search", str(cfg["one"])], absent=no_gallery("one")),
        Case("one-class image_folder: nas gallery train", ["gallery", "train", str(cfg["one"])], absent=no_gallery("one")),
        Case("In-Shop queries with no positive in the gallery", ["gallery", "train", str(cfg["inshop"])], absent=no_gallery("inshop")),
        # study databases
        Case("garbage optuna.db: nas search", ["search", str(cfg["garbage"])], absent=[garbage / "gallery"], unchanged=[garbage / "optuna.db"]),
        Case("garbage optuna.db: nas results", ["results", "--study-name", "kept", "--run-dir", str(garbage)], unchanged=[garbage / "optuna.db"]),
        Case("garbage optuna.db: nas export", ["export", "--study-name", "kept", "--run-dir", str(garbage), "--out", str(root / "x1")], absent=[root / "x1"], unchanged=[garbage / "optuna.db"]),
        Case("garbage optuna.db: nas report", ["report", "--study-name", "kept", "--run-dir", str(garbage)], absent=[garbage / "report"], unchanged=[garbage / "optuna.db"]),
        Case("garbage optuna.db: nas baseline", ["baseline", str(cfg["garbage"]), "--models", "resnet18"], absent=[garbage / "gallery"], unchanged=[garbage / "optuna.db"]),
        Case("truncated optuna.db: nas search", ["search", str(cfg["truncated"])], absent=[truncated / "gallery"], unchanged=[truncated / "optuna.db"]),
        Case("truncated optuna.db: nas results", ["results", "--study-name", "kept", "--run-dir", str(truncated)], unchanged=[truncated / "optuna.db"]),
        Case("MLflow store given as --storage", ["results", "--study-name", "kept", "--storage", f"sqlite:///{foreign}"], unchanged=[foreign]),
        Case("garbage journal file as --storage", ["results", "--study-name", "kept", "--storage", f"journal://{journal}"], unchanged=[journal]),
        # storage URL typos
        Case("--storage sqlite:/path: nas results", ["results", "--study-name", "x", "--storage", f"sqlite:{root}/s.db"]),
        Case("--storage sqlte:///path: nas results", ["results", "--study-name", "x", "--storage", f"sqlte:///{root}/s.db"]),
        Case("--storage sqlite:/path: nas search", ["search", two_cfg, "--storage", f"sqlite:{root}/s.db"], absent=no_gallery("two")),
        Case("--storage sqlte:///path: nas search", ["search", two_cfg, "--storage", f"sqlte:///{root}/s.db"], absent=no_gallery("two")),
        Case("--storage sqlite:/path: nas search --workers 2", ["search", two_cfg, "--workers", "2", "--storage", f"sqlite:{root}/s.db"], absent=no_gallery("two")),
        Case("--storage sqlite:/path: nas worker", ["worker", two_cfg, "--trials", "1", "--storage", f"sqlite:{root}/s.db"], absent=no_gallery("two")),
        Case("--storage sqlite://rel.db (two slashes)", ["results", "--study-name", "x", "--storage", "sqlite://rel.db"]),
        Case("--storage a plain path", ["results", "--study-name", "x", "--storage", str(root / "s.db")]),
        Case("--storage with a port that is not a number", ["results", "--study-name", "x", "--storage", "postgresql://u@127.0.0.1:port/db"]),
        Case("--storage journal:/path (one slash)", ["results", "--study-name", "x", "--storage", f"journal:{root}/j.log"]),
        Case("--storage sqlite:///FOLDER", ["results", "--study-name", "x", "--storage", f"sqlite:///{root}"]),
        Case("--storage sqlite:///tmp/x.db meant absolute", ["results", "--study-name", "x", "--storage", "sqlite:///tmp/h7-none.db"], absent=[Path("tmp/h7-none.db")]),
        Case("--storage mysql:// without its driver", ["results", "--study-name", "x", "--storage", "mysql://root@127.0.0.1/test"]),
        Case("--storage env:UNSET", ["results", "--study-name", "x", "--storage", "env:NAS_H7_UNSET"]),
        Case("--out is a file: nas search", ["search", two_cfg, "--out", str(a_file)], unchanged=[a_file]),
        # PostgreSQL
        Case("PostgreSQL wrong port: nas results", ["results", "--study-name", "x", "--storage", f"{pg}:5999/test"], postgres=True),
        Case("PostgreSQL wrong port: nas search", ["search", two_cfg, "--storage", f"{pg}:5999/test"], absent=no_gallery("two"), postgres=True),
        Case("PostgreSQL missing database: nas results", ["results", "--study-name", "x", "--storage", f"{pg}:5432/no_such_db_h7"], postgres=True),
        Case("PostgreSQL missing role, password in URL", ["results", "--study-name", "x", "--storage", f"postgresql://nobody_h7:{PASSWORD}@127.0.0.1:5432/test"], secret=PASSWORD, postgres=True),
        Case("PostgreSQL missing role: nas search", ["search", two_cfg, "--storage", f"postgresql://nobody_h7:{PASSWORD}@127.0.0.1:5432/test"], absent=no_gallery("two"), secret=PASSWORD, postgres=True),
        # images
        Case("14000x14000 PNG in training data: nas search", ["search", str(cfg["huge"])], absent=no_gallery("huge")),
        Case("14000x14000 PNG: nas embed skips and lists it", ["embed", str(export), str(embed_huge), "--out", str(root / "e1.npy")], expect=0),
        Case("all images unreadable: nas embed", ["embed", str(export), str(broken_images), "--out", str(root / "e2.npy")], absent=[root / "e2.npy", root / "e2.ids.txt"]),
        Case("non-image file named .png in a class folder", ["search", str(cfg["fake"])], absent=no_gallery("fake")),
        Case("images in the root, no class folders", ["search", str(cfg["flat"])], absent=no_gallery("flat")),
        Case("data.path is a file", ["search", str(cfg["pathfile"])]),
        Case("data.path does not exist", ["search", str(cfg["nodata"])]),
        # experiment files
        Case("empty experiment file", ["search", str(root / "empty.yaml")], absent=[root / "runs", Path("runs/quickstart")]),
        Case("experiment file of comments only", ["search", str(root / "comments.yaml")], absent=[Path("runs/quickstart")]),
        Case("experiment file holding a list", ["search", str(root / "list.yaml")]),
        Case("binary experiment file", ["search", str(root / "binary.yaml")]),
        Case("invalid YAML", ["search", str(root / "invalid.yaml")]),
        Case("a folder as the experiment file", ["search", str(root)]),
        Case("missing experiment file", ["search", str(root / "nope.yaml")]),
        Case("search.seed -5", ["search", str(cfg["seed"])], absent=[root / "run-seed"]),
        Case("data.seed -1", ["search", str(cfg["dataseed"])], absent=[root / "run-dataseed"]),
        Case("gallery.batch_size 0", ["search", str(cfg["gbs"])], absent=[root / "run-gbs"]),
        # gallery checkpoints
        Case("missing gallery checkpoint", ["search", str(cfg["nockpt"])]),
        Case("unreadable gallery checkpoint", ["search", str(cfg["badckpt"])]),
        # exports, reports, embeds
        Case("nas export --out an existing file", ["export", "--study-name", "kept", "--run-dir", str(running), "--out", str(a_file)], unchanged=[a_file]),
        Case("nas report --out under a file", ["report", "--study-name", "kept", "--run-dir", str(running), "--out", str(a_file / "r")], unchanged=[a_file]),
        Case("nas export --trial of a running trial", ["export", "--study-name", "kept", "--run-dir", str(running), "--trial", "2", "--out", str(root / "x2")], absent=[root / "x2"]),
        Case("nas export --trial 999", ["export", "--study-name", "kept", "--run-dir", str(running), "--trial", "999", "--out", str(root / "x3")], absent=[root / "x3"]),
        Case("nas export --trial pareto:x", ["export", "--study-name", "kept", "--run-dir", str(running), "--trial", "pareto:x", "--out", str(root / "x4")], absent=[root / "x4"]),
        Case("nas embed --out a folder", ["embed", str(export), str(embed_huge), "--out", str(root)]),
        Case("nas embed of a folder that is no export", ["embed", str(root), str(embed_huge), "--out", str(root / "e3.npy")], absent=[root / "e3.npy"]),
        Case("nas results: unknown study name", ["results", "--study-name", "kep", "--run-dir", str(running)]),
        Case("nas results: no study database", ["results", "--study-name", "x", "--run-dir", str(root / "nowhere")]),
        Case("nas results | a reader that has gone", ["results", "--study-name", "kept", "--run-dir", str(running)], expect=141, close_stdout=True),
        # flags
        Case("--workers 0", ["search", two_cfg, "--workers", "0"]),
        Case("nas worker --trials -1", ["worker", two_cfg, "--trials", "-1"]),
        Case("--trials -1", ["search", two_cfg, "--trials", "-1"]),
        Case("--max-mflops -1", ["search", two_cfg, "--max-mflops", "-1"]),
        Case("nas report --top 0", ["report", "--study-name", "kept", "--run-dir", str(running), "--top", "0"]),
        Case("nas ui --port 99999", ["ui", "--run-dir", str(root), "--port", "99999"]),
        Case("nas ui on a port in use", ["ui", "--run-dir", str(root), "--port", str(busy_port)]),
        Case("nas baseline --models ''", ["baseline", two_cfg, "--models", ""]),
        Case("nas baseline --resolutions 8", ["baseline", two_cfg, "--resolutions", "8"]),
        # studies resumed under other settings
        Case("resume a study recorded under another data split", ["search", str(cfg["stale"])], absent=no_gallery("stale"), unchanged=[stale]),
        # image files of every kind: decoded as a viewer shows them, or refused naming the file and its mode
        Case("16-bit grey PNGs: nas embed decodes them", ["embed", str(export), str(embed_deep), "--out", str(root / "e4.npy")], expect=0),
        Case("float TIFF (mode F) in training data: nas search", ["search", str(cfg["float"])], absent=no_gallery("float")),
        Case("float TIFF (mode F): nas embed skips and lists it", ["embed", str(export), str(embed_float), "--out", str(root / "e5.npy")], expect=0),
        # requests that cannot work: refused before the gallery
        Case("--trials 0", ["search", two_cfg, "--trials", "0"], absent=[root / "run-two"]),
        Case("search.trials 0", ["search", str(cfg["notrials"])], absent=[root / "run-notrials"]),
        Case("search.warm_start: unknown timm model", ["search", str(cfg["warmname"])], absent=[root / "run-warmname"]),
        Case("search.warm_start: unparsable architecture", ["search", str(cfg["warmarch"])], absent=[root / "run-warmarch"]),
        Case("gallery.pretrained, weights host unreachable, nothing cached", ["search", str(cfg["offline"])], absent=no_gallery("offline"),
             env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(root / "hf-empty")}),
        # passwords holding characters that mean something in a URL: no part of them printed
        Case("password with a raw '@': nas results", ["results", "--study-name", "x", "--storage", f"postgresql://nobody_h7:{RAW_AT}@127.0.0.1:5432/test"], secret=RAW_AT),
        Case("password with a raw '@': nas export --tracking-uri", ["export", "--study-name", "kept", "--run-dir", str(running), "--out", str(root / "x5"), "--tracking-uri", f"http://admin:{RAW_AT}@127.0.0.1:9"], absent=[root / "x5"], secret=RAW_AT),
        Case("password with raw / # ? % and a space: nas results", ["results", "--study-name", "x", "--storage", f"postgresql://nobody_h7:{ODD}@127.0.0.1:5432/test"], secret=ODD, postgres=True),
        Case("percent-encoded unicode password: nas results", ["results", "--study-name", "x", "--storage", f"postgresql://nobody_h7:{quote(UNICODE, safe='')}@127.0.0.1:5432/test"], secret=UNICODE, postgres=True),
        # weights and caches read back
        Case("wrong-shape gallery checkpoint", ["search", str(cfg["wideckpt"])], absent=no_gallery("wideckpt"), unchanged=[root / "wide_gallery.safetensors"]),
        Case("truncated export weights: nas embed", ["embed", str(cut_export), str(embed_huge), "--out", str(root / "e_cut.npy")], absent=[root / "e_cut.npy"]),
        Case("damaged gallery embedding cache: nas search rebuilds it", ["search", str(cfg["cutcache"]), "--timeout", "0.001"], expect=0, absent=no_gallery("cutcache")),
        Case("damaged latency table: nas profile starts a fresh one", ["profile", "--arch", SMALLEST, "--table-dir", str(root / "tables"), "--threads", "1"], expect=0),
        Case("nas profile --sample 0", ["profile", "--space", "mobilenet", "--sample", "0"]),
        Case("nas profile --seed -1", ["profile", "--space", "mobilenet", "--seed", "-1"]),
        Case("nas profile --resolution 0", ["profile", "--timm", "resnet18", "--resolution", "0"]),
        Case("nas profile --threads 0", ["profile", "--timm", "resnet18", "--threads", "0"]),
        Case("nas profile --batch-size -1", ["profile", "--timm", "resnet18", "--batch-size", "-1"]),
        Case("nas profile --embed-dim 0 of a space", ["profile", "--space", "mobilenet", "--embed-dim", "0"]),
        Case("nas profile of a 224 px ViT at 32 px", ["profile", "--timm", "vit_tiny_patch16_224", "--resolution", "32"]),
        Case("missing gallery checkpoint and a budget nothing meets", ["search", str(cfg["nockpt"]), "--max-mflops", "0.0001"]),
        # nas query
        Case("nas query: a photo that is not an image", ["query", str(export), str(fake / "digit1" / "notes.png"), "--gallery-embeddings", str(gallery16)]),
        Case("nas query: a photo that does not exist", ["query", str(export), str(root / "nope.png"), "--gallery-embeddings", str(gallery16)]),
        Case("nas query: embeddings of another dimension", ["query", str(export), photo, "--gallery-embeddings", str(gallery8)]),
        Case("nas query: embeddings without their ids file", ["query", str(export), photo, "--gallery-embeddings", str(no_ids)]),
        Case("nas query: embeddings file missing", ["query", str(export), photo, "--gallery-embeddings", str(root / "none.npy")]),
        Case("nas query: a folder that is no export", ["query", str(root), photo, "--gallery-embeddings", str(gallery16)]),
        Case("nas query -k 0", ["query", str(export), photo, "--gallery-embeddings", str(gallery16), "-k", "0"]),
        Case("nas query --index ivfpq on 20 vectors", ["query", str(export), photo, "--gallery-embeddings", str(gallery16), "--index", "ivfpq"],
             unchanged=[gallery16]),
        Case("nas query --html a folder", ["query", str(export), photo, "--gallery-embeddings", str(gallery16), "--html", str(root)]),
        # nas dashboard
        Case("nas dashboard: no study database", ["dashboard", "--run-dir", str(root / "nowhere")], absent=[root / "nowhere"]),
        Case("nas dashboard: unknown study name", ["dashboard", "--run-dir", str(running), "--study-name", "kep"]),
        Case("nas dashboard: garbage optuna.db", ["dashboard", "--run-dir", str(garbage)], unchanged=[garbage / "optuna.db"]),
        Case("nas dashboard --storage sqlite:///missing.db", ["dashboard", "--storage", f"sqlite:///{root}/missing.db"], absent=[root / "missing.db"]),
        Case("nas dashboard --storage env:UNSET", ["dashboard", "--storage", "env:NAS_H7_UNSET"]),
        Case("nas dashboard --port 99999", ["dashboard", "--run-dir", str(running), "--port", "99999"]),
        Case("nas dashboard on a port in use", ["dashboard", "--run-dir", str(running), "--port", str(busy_port)]),
        Case("nas ui --with-dashboard, one port for both", ["ui", "--run-dir", str(running), "--with-dashboard", "--port", "5123", "--dashboard-port", "5123"]),
        Case("nas dashboard: PostgreSQL missing role, password in URL", ["dashboard", "--storage", f"postgresql://nobody_h7:{PASSWORD}@127.0.0.1:5432/test"], secret=PASSWORD, postgres=True),
    ]


# --------------------------------------------------------------------------- running


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _shows(secret: str, output: str) -> bool:
    """Whether ``output`` holds ``secret``, raw or percent-encoded, or a piece of it (4+ characters) that a raw '@' splits off."""
    forms = {secret, quote(secret, safe=""), *(piece for piece in secret.split("@") if len(piece) >= 4)}
    return any(form in output for form in forms)


def run_case(case: Case, cwd: Path, env: dict[str, str], root: Path) -> dict[str, object]:
    env = {**env, **case.env}
    before = {p: _digest(p) for p in case.unchanged}
    start = time.monotonic()
    command = [sys.executable, "-m", "nas.cli", *case.argv]
    if case.close_stdout:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        output = proc.stderr.read().decode(errors="replace")
        code = proc.wait(timeout=300)
    else:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        code, output = done.returncode, done.stdout + done.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith(("error:", "nas ")) and "error:" in line), None)
    skipped = next((n for n, line in enumerate(lines) if line.startswith("Skipped")), None)
    if message is None and skipped is not None:  # nas embed: the skip and its first listed file
        message = " ".join(lines[skipped : skipped + 2])
    if message is None:  # a damaged cache: the line reporting it
        message = next((line for line in lines if "rebuilding it" in line or "starting a fresh one" in line), None)
    message = message or (lines[-1] if lines else "(no output)")
    message = message.replace(str(root), "<tmp>")
    lost = [str(p) for p in case.absent if (p if p.is_absolute() else cwd / p).exists()]
    lost += [str(p) for p in case.unchanged if _digest(p) != before[p]]
    if case.secret and _shows(case.secret, output):
        lost.append("the password was printed")
    return {
        "case": case.name,
        "status": code,
        "ok": code == case.expect,
        "message": message,
        "traceback": "yes" if "Traceback" in output else "no",
        "lost": "; ".join(lost) or "nothing",
        "seconds": time.monotonic() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--width", type=int, default=150, help="characters of each message shown (default 150)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp, socket.socket() as busy:
        root = Path(tmp)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = build_cases(root / "inputs", busy.getsockname()[1])
        if args.only:
            cases = [c for c in cases if args.only in c.name]
        cwd = root / "cwd"  # the default output folder runs/<study> would land here
        cwd.mkdir()
        env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache"), "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
        have_pg = postgres_up()
        runnable = [c for c in cases if have_pg or not c.postgres]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = dict(zip((c.name for c in runnable), pool.map(lambda c: run_case(c, cwd, env, root), runnable)))
    width = max(len(c.name) for c in cases)
    print(f"{'case':<{width}}  status  expected  traceback  lost     message")
    print("-" * (width + 2 + 46 + min(args.width, 80)))
    for case in cases:
        if case.name not in results:
            print(f"{case.name:<{width}}  skipped: no PostgreSQL server answers on {POSTGRES[0]}:{POSTGRES[1]}")
            continue
        r = results[case.name]
        text = str(r["message"])
        text = text if len(text) <= args.width else text[: args.width - 3] + "..."
        print(f"{case.name:<{width}}  {r['status']:>6}  {case.expect:>8}  {r['traceback']:>9}  {r['lost']:<7}  {text}")
    bad = [r for r in results.values() if not r["ok"] or r["traceback"] == "yes" or r["lost"] != "nothing"]
    skipped = len(cases) - len(results)
    print(
        f"\n{len(results)} case(s) run, {skipped} skipped; {len(bad)} with an unexpected exit status, a traceback or something lost; "
        f"{sum(float(r['seconds']) for r in results.values()):.0f} s of subprocess time."
    )
    for r in bad:
        print(f"  NOT OK: {r['case']}: status {r['status']}, traceback {r['traceback']}, lost {r['lost']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
