"""Bad input from the command line: one ``error:`` paragraph, exit status 2, no traceback, nothing lost.

Each test runs the CLI as a user would (``main([...])``) on small real data and checks the
message names what was wrong and how to fix it, and that nothing expensive ran first (no
gallery model trained) and nothing was written or changed.
"""

from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image
from safetensors.torch import save_file

try:
    from _fixtures import digits_image_set, digits_uint8
except ImportError:  # tests/ imported as a package
    from tests._fixtures import digits_image_set, digits_uint8
from nas.cli import main
from nas.data import LEGACY_PREPROCESSING, RetrievalData, Split
from nas.data.checks import check_scorable
from nas.errors import DataError
from nas.export.loading import WEIGHTS_FILE, write_arch
from search_spaces import build, create_space

PASSWORD = "s3cret-pw"


# --------------------------------------------------------------------------- helpers


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], excerpt: bool = False) -> str:
    """Run ``nas argv``; it must exit 2 with one ``error:`` line and no traceback (``excerpt``: a YAML
    syntax error may add the parser's excerpt of the file after it). Returns the message."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err + captured.out
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: ") and (excerpt or len(lines) == 1), captured.err
    return lines[0]


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """A flag argparse refuses: exit status 2 and its one ``error:`` line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if "error:" in line)


def write_digit_folder(root: Path, classes: list[int], per_class: int = 12) -> Path:
    """``root/<digit>/<n>.png``: the scikit-learn digits of ``classes``, 16x16 grey PNGs."""
    images, labels = digits_uint8()
    for digit in classes:
        folder = root / f"digit{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in np.flatnonzero(labels == digit)[:per_class]:
            Image.fromarray(np.kron(images[n], np.ones((2, 2), dtype=np.uint8))).save(folder / f"{n}.png")
    return root


def write_huge_png(path: Path, side: int = 14000) -> Path:
    """A valid ``side`` x ``side`` grey PNG of one colour: a few hundred KB on disk, ``side**2`` pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    rows = b"\x00" * ((side + 1) * 500)  # 500 rows (filter byte + pixels) at a time
    body = b"".join(compressor.compress(rows[: (side + 1) * min(500, side - start)]) for start in range(0, side, 500))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body + compressor.flush()) + chunk(b"IEND", b""))
    return path


def folder_config(tmp_path: Path, data: Path, **search) -> Path:
    """A tiny image_folder experiment (tracking off) under ``tmp_path/run``."""
    config = {
        "out": str(tmp_path / "run"),
        "data": {"dataset": "image_folder", "path": str(data), "image_size": 16, "channels": 1},
        "gallery": {"model": "resnet18", "embed_dim": 16, "resolution": 16, "train": {"epochs": 1, "batch_size": 32}},
        "space": {"name": "mobilenet", "options": {"resolutions": [16], "widths": [0.35]}},
        "train": {"epochs": 1, "batch_size": 32},
        "search": {"study_name": "errs", "trials": 1, "pruner": "none", **search},
        "tracking": {"enabled": False},
    }
    return _write(tmp_path / "exp.yaml", config)


def write_export(folder: Path) -> Path:
    """An export folder (arch.json, weights.safetensors) of the mobilenet space's smallest member, untrained."""
    arch = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[0.35]).extreme(smallest=True)
    folder.mkdir(parents=True)
    write_arch(arch, folder, LEGACY_PREPROCESSING)
    save_file(build(arch).state_dict(), str(folder / WEIGHTS_FILE))
    return folder


def write_study_db(path: Path, trials: int = 60) -> Path:
    """A real Optuna SQLite study ``kept`` with ``trials`` finished trials (big enough to truncate mid-table)."""
    study = optuna.create_study(study_name="kept", storage=f"sqlite:///{path}")
    for n in range(trials):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("note", "padding " * 40)
        study.tell(trial, float(n))
    return path


# --------------------------------------------------------------------------- data retrieval cannot score


@pytest.mark.parametrize("command", [["search"], ["gallery", "train"]])
def test_one_class_image_folder_is_refused_before_any_training(tmp_path: Path, capsys, command: list[str]) -> None:
    config = folder_config(tmp_path, write_digit_folder(tmp_path / "one", [3], per_class=30))
    err = _error(capsys, [*command, str(config)])
    assert "image_folder:one cannot be scored by retrieval" in err and "val part holds 1 class, 1 image" in err
    assert "at least two classes" in err and "mAP is 1.0" in err
    assert not (tmp_path / "run" / "gallery").exists()  # nothing was trained


def _write_inshop(root: Path, items: dict[str, list[tuple[str, int]]]) -> Path:
    rows = []
    for n, (item, parts) in enumerate(items.items()):
        k = 0
        for status, count in parts:
            for _ in range(count):
                rel = f"img/WOMEN/Dresses/{item}/{k + 1:02d}_front.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((12, 12, 3), 20 * n + k, dtype=np.uint8)).save(root / rel)
                rows.append(f"{rel} {item} {status}\n")
                k += 1
    (root / "Eval").mkdir(parents=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(rows))
    return root


def test_queries_without_any_positive_in_the_gallery_are_refused(tmp_path: Path, capsys) -> None:
    """In-Shop list files whose query items never occur in the gallery: no query can be scored."""
    train = {f"id_0000000{i}": [("train", 3)] for i in range(1, 5)}
    evaluation = {"id_00000005": [("query", 2)], "id_00000006": [("query", 2)], "id_00000007": [("gallery", 2)], "id_00000008": [("gallery", 2)]}
    root = _write_inshop(tmp_path / "inshop", {**train, **evaluation})
    config = folder_config(tmp_path, root)
    raw = yaml.safe_load(config.read_text())
    raw["data"] = {"dataset": "inshop", "path": str(root), "image_size": 8, "val_classes": 0.5}
    err = _error(capsys, ["gallery", "train", str(_write(config, raw))])
    assert "none of the 4 images of its query part (2 classes, 4 images)" in err and "in the gallery part (2 classes, 4 images)" in err
    assert not (tmp_path / "run" / "gallery").exists()


def test_check_scorable_on_each_kind_of_part() -> None:
    data = digits_image_set(per_class=6)
    order = np.arange(len(data.labels))
    by_class = np.argsort(data.labels, kind="stable")  # 6 images of each digit in a row
    evaluation = by_class[12:]  # digits 2-9: each query's class also in the gallery
    ok = Split(order[:20], by_class[:12], evaluation[::2], evaluation[1::2], val_against="val")
    check_scorable(RetrievalData(data, ok))
    one_val_class = Split(order[:20], by_class[:6], evaluation[::2], evaluation[1::2], val_against="val")
    with pytest.raises(DataError, match="its val part holds 1 class, 6 images"):
        check_scorable(RetrievalData(data, one_val_class))
    singletons = Split(order[:20], by_class[[0, 6, 12]], evaluation[::2], evaluation[1::2], val_against="val")
    with pytest.raises(DataError, match="none of the 3 images of its val part"):
        check_scorable(RetrievalData(data, singletons))
    disjoint = Split(order[:20], by_class[:12], by_class[24:36], by_class[36:48], val_against="val")
    with pytest.raises(DataError, match="none of the 12 images of its query part"):
        check_scorable(RetrievalData(data, disjoint))
    empty = Split(order[:20], by_class[:0], evaluation[::2], evaluation[1::2])
    with pytest.raises(DataError, match="val part of the split is empty"):
        check_scorable(RetrievalData(data, empty))


# --------------------------------------------------------------------------- study databases


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
@pytest.mark.parametrize("command", ["results", "export", "report", "search", "baseline"])
def test_damaged_study_database_is_named_and_left_alone(tmp_path: Path, tiny_config, capsys, damage: str, command: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    db = run / "optuna.db"
    if damage == "garbage":
        db.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    else:
        whole = write_study_db(tmp_path / "whole.db").read_bytes()
        db.write_bytes(whole[: len(whole) // 2])
    before = db.read_bytes()
    argv = {
        "results": ["results", "--study-name", "kept", "--run-dir", str(run)],
        "export": ["export", "--study-name", "kept", "--run-dir", str(run), "--out", str(tmp_path / "export")],
        "report": ["report", "--study-name", "kept", "--run-dir", str(run)],
        "search": ["search", str(_write(tmp_path / "exp.yaml", tiny_config(run)))],
        "baseline": ["baseline", str(_write(tmp_path / "exp.yaml", tiny_config(run))), "--models", "resnet18"],
    }[command]
    err = _error(capsys, argv)
    assert f"{db} is not a readable SQLite study database" in err
    assert f"mv {db} {db}.broken" in err and "--storage" in err
    assert db.read_bytes() == before  # nothing changed
    assert not (run / "gallery").exists() and not (tmp_path / "export").exists()


def test_another_programs_database_is_refused_unchanged(tmp_path: Path, capsys) -> None:
    """Pointing --storage at the MLflow store must not add Optuna's tables to it."""
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE runs (run_uuid TEXT)")
        db.execute("CREATE TABLE experiments (name TEXT)")
    before = store.read_bytes()
    err = _error(capsys, ["results", "--study-name", "x", "--storage", f"sqlite:///{store}"])
    assert "another program" in err and "experiments, runs" in err and "MLflow store" in err
    assert store.read_bytes() == before


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("sqlite:{db}", "is malformed (Could not parse SQLAlchemy URL"),
        ("sqlite://optuna.db", "SQLite URLs have three slashes"),
        ("sqlte:///{db}", "Did you mean 'sqlite'"),
        ("{db}", "It has no scheme; for a SQLite file write sqlite:///"),
        ("postgresql://u@127.0.0.1:port/db", "invalid literal for int()"),
        ("journal:{db}", "not a valid journal URL"),
    ],
)
@pytest.mark.parametrize("command", ["results", "search", "worker"])
def test_storage_url_typos_are_clear_and_checked_before_the_gallery(
    tmp_path: Path, tiny_config, capsys, url: str, fragment: str, command: str
) -> None:
    url = url.format(db=tmp_path / "optuna.db")
    config = str(_write(tmp_path / "exp.yaml", tiny_config(tmp_path / "run")))
    argv = {
        "results": ["results", "--study-name", "tiny", "--storage", url],
        "search": ["search", config, "--storage", url],
        "worker": ["worker", config, "--trials", "1", "--storage", url],
    }[command]
    err = _error(capsys, argv)
    assert fragment in err and "sqlite:////absolute/path/optuna.db" in err
    assert not (tmp_path / "run" / "gallery").exists() and not (tmp_path / "optuna.db").exists()


def test_a_folder_or_a_missing_file_as_sqlite_storage(tmp_path: Path, capsys) -> None:
    err = _error(capsys, ["results", "--study-name", "x", "--storage", f"sqlite:///{tmp_path}"])
    assert f"{tmp_path} is a folder" in err
    err = _error(capsys, ["results", "--study-name", "x", "--storage", f"sqlite:///{tmp_path / 'none' / 'x.db'}"])
    assert "No study database at" in err and not (tmp_path / "none").exists()  # a reader creates nothing
    err = _error(capsys, ["results", "--study-name", "x", "--storage", "sqlite:///tmp/none.db"])  # meant: four slashes
    assert "No study database at tmp/none.db (relative to" in err and "sqlite:////tmp/none.db" in err


def test_other_unusable_storages(tmp_path: Path, capsys) -> None:
    err = _error(capsys, ["results", "--study-name", "x", "--storage", "sqlite:///:memory:"])
    assert "in-memory SQLite database: the study would be lost" in err
    journal = tmp_path / "optuna.log"
    garbage = (bytes(range(128, 256)) + b"\n") * 4  # complete lines that are not UTF-8 JSON (a partial last line is ignored)
    journal.write_bytes(garbage)
    err = _error(capsys, ["results", "--study-name", "x", "--storage", f"journal:///{journal}"])
    assert f"{journal} is not a readable Optuna journal file" in err and journal.read_bytes() == garbage
    err = _error(capsys, ["results", "--study-name", "x", "--storage", "mysql+nosuchdriver://u@127.0.0.1/db"])
    assert "is malformed (Can't load plugin: sqlalchemy.dialects:mysql.nosuchdriver)" in err


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("postgresql://postgres@127.0.0.1:5999/test", ["127.0.0.1:5999/test", "Connection refused"]),
        ("postgresql://postgres@127.0.0.1:5432/no_such_db_h7", ["127.0.0.1:5432/no_such_db_h7", 'database "no_such_db_h7" does not exist']),
        (f"postgresql://no_such_role_h7:{PASSWORD}@127.0.0.1:5432/test", ["as user 'no_such_role_h7'", 'role "no_such_role_h7" does not exist']),
    ],
)
@pytest.mark.parametrize("command", ["results", "search"])
def test_postgres_unreachable_or_missing_role_or_database(
    tmp_path: Path, tiny_config, capsys, url: str, fragments: list[str], command: str
) -> None:
    config = str(_write(tmp_path / "exp.yaml", tiny_config(tmp_path / "run")))
    argv = ["results", "--study-name", "tiny", "--storage", url] if command == "results" else ["search", config, "--storage", url]
    err = _error(capsys, argv)
    assert all(f in err for f in fragments), err
    assert "Check that the server is running" in err and "the role and the database exist" in err
    assert PASSWORD not in err
    assert not (tmp_path / "run" / "gallery").exists()


# --------------------------------------------------------------------------- images


def test_huge_training_image_is_named_before_decoding(tmp_path: Path, capsys) -> None:
    data = write_digit_folder(tmp_path / "data", [1, 2], per_class=40)
    huge = write_huge_png(data / "digit1" / "huge.png")
    assert huge.stat().st_size < 1_000_000
    err = _error(capsys, ["search", str(folder_config(tmp_path, data))])
    assert f"Cannot read image {huge}: it is larger than the limit of 89,478,485 pixels (nas.data.sources.MAX_IMAGE_PIXELS" in err
    assert "196000000 pixels" in err and "Remove or replace the file" in err
    assert not (tmp_path / "run" / "gallery").exists()


def test_the_pixel_limit_is_a_stated_setting(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.data.sources

    monkeypatch.setattr(nas.data.sources, "MAX_IMAGE_PIXELS", 100)
    data = write_digit_folder(tmp_path / "data", [1, 2], per_class=40)
    err = _error(capsys, ["gallery", "train", str(folder_config(tmp_path, data))])
    assert "16 x 16 = 256 pixels, more than the limit of 100 pixels (nas.data.sources.MAX_IMAGE_PIXELS" in err


def test_embed_skips_and_lists_a_huge_image(tmp_path: Path, capsys) -> None:
    export = write_export(tmp_path / "export")
    images = write_digit_folder(tmp_path / "images", [4], per_class=3)
    write_huge_png(images / "huge.png")
    out = tmp_path / "emb.npy"
    assert main(["embed", str(export), str(images), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Embedded 3 image(s)" in text and "Skipped 1 unreadable image(s)" in text and "huge.png: ImageTooLarge" in text
    assert np.load(out).shape == (3, 16) and "huge.png" not in (tmp_path / "emb.ids.txt").read_text()


def test_embed_of_a_folder_with_no_readable_image_writes_nothing(tmp_path: Path, capsys) -> None:
    export = write_export(tmp_path / "export")
    images = tmp_path / "images"
    images.mkdir()
    for n in range(5):
        (images / f"bad{n}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    err = _error(capsys, ["embed", str(export), str(images), "--out", str(tmp_path / "emb.npy")])
    assert f"None of the 5 image file(s) under {images} could be read, so nothing was written" in err
    assert "bad0.png (UnidentifiedImageError" in err and "and 2 more" in err
    assert not list(tmp_path.glob("emb*"))


# --------------------------------------------------------------------------- experiment files and flags


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "is empty: write the experiment's settings"),
        ("# only a comment\n\n", "is empty: write the experiment's settings"),
        ("- a\n- b\n", "must hold a mapping (key: value lines) at the top level, but holds a list"),
        (b"\xe0\x80\x80binary", "is not valid YAML text"),
        ("data: [unclosed\n", "is not valid YAML text"),
    ],
)
def test_bad_experiment_files_start_nothing(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, content, fragment: str) -> None:
    monkeypatch.chdir(tmp_path)  # the default output folder would be runs/<study name> here
    file = tmp_path / "exp.yaml"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _error(capsys, ["search", str(file)], excerpt="unclosed" in str(content))
    assert str(file) in err and fragment in err
    assert not (tmp_path / "runs").exists()


def test_a_folder_given_as_the_experiment_file(tmp_path: Path, capsys) -> None:
    assert f"Experiment file {tmp_path} is a folder" in _error(capsys, ["search", str(tmp_path)])


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("search__seed", -1, "search.seed must be in [0, 2**32)"),
        ("data__seed", -3, "data.seed must be >= 0"),
        ("gallery__batch_size", 0, "gallery.batch_size must be >= 1"),
    ],
)
def test_values_found_bad_only_after_the_gallery_are_refused_first(tmp_path: Path, tiny_config, capsys, key: str, value: int, fragment: str) -> None:
    err = _error(capsys, ["search", str(_write(tmp_path / "exp.yaml", tiny_config(tmp_path / "run", **{key: value})))])
    assert fragment in err and not (tmp_path / "run").exists()


def test_output_paths_of_the_wrong_kind(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    err = _error(capsys, ["export", "--study-name", "x", "--run-dir", str(tmp_path), "--out", str(a_file)])
    assert f"--out {a_file} is a file, but it must be a folder" in err
    err = _error(capsys, ["report", "--study-name", "x", "--run-dir", str(tmp_path), "--out", str(a_file / "sub")])
    assert f"lies under {a_file}, which is a file" in err
    err = _error(capsys, ["embed", str(tmp_path), str(tmp_path), "--out", str(tmp_path)])
    assert "is a folder, but it must be a file" in err
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["search", "x.yaml", "--workers", "0"], "argument --workers: must be >= 1, but got 0"),
        (["worker", "x.yaml", "--trials", "-1"], "argument --trials: must be >= 0, but got -1"),
        (["report", "--study-name", "x", "--top", "0"], "argument --top: must be >= 1, but got 0"),
        (["ui", "--port", "99999"], "argument --port: must be between 1 and 65535, but got 99999"),
    ],
)
def test_flags_out_of_range_are_usage_errors(capsys, argv: list[str], fragment: str) -> None:
    assert fragment in _usage_error(capsys, argv)


def test_ui_on_a_port_in_use(tmp_path: Path, capsys) -> None:
    (tmp_path / "mlflow.db").touch()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        err = _error(capsys, ["ui", "--run-dir", str(tmp_path), "--port", str(port)])
    assert f"Port {port} on 127.0.0.1 is in use" in err and "--port" in err


def test_baseline_with_nothing_to_train(tmp_path: Path, tiny_config, capsys) -> None:
    config = str(_write(tmp_path / "exp.yaml", tiny_config(tmp_path / "run")))
    assert "must each name at least one" in _error(capsys, ["baseline", config, "--models", " , "])


def test_a_file_given_as_the_image_folder(tmp_path: Path, capsys) -> None:
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK")
    err = _error(capsys, ["gallery", "train", str(folder_config(tmp_path, a_file))])
    assert f"Image folder {a_file} is a file, not a folder" in err


def test_output_piped_into_a_closed_reader_is_not_a_traceback() -> None:
    """``nas spaces | head -c1``: the reader is gone before the first line; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "nas.cli", "spaces"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
