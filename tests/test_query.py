"""``nas query``: a real (untrained) export, digit PNGs embedded by ``nas embed``, queried through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from nas.cli import main
from nas.data import LEGACY_PREPROCESSING
from nas.export.loading import WEIGHTS_FILE, write_arch
from nas.retrieval_index import build_index, file_sha256, index_spec
from search_spaces import build, create_space


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """45 digit PNGs (three classes), a random-weight mobilenet export (16-d output) and ``nas embed``'s files of them."""
    root = tmp_path_factory.mktemp("query")
    digits = load_digits()
    images = (digits.images * 16).clip(0, 255).astype(np.uint8)
    for digit in (0, 1, 2):
        folder = root / "gallery" / f"digit{digit}"
        folder.mkdir(parents=True)
        for n in np.flatnonzero(digits.target == digit)[:15]:
            Image.fromarray(np.kron(images[n], np.ones((2, 2), dtype=np.uint8))).save(folder / f"{n}.png")
    arch = create_space("mobilenet", embed_dim=16, in_chans=1, resolutions=[16], widths=[0.35]).extreme(smallest=True)
    export = root / "export"
    export.mkdir()
    write_arch(arch, export, LEGACY_PREPROCESSING)
    save_file(build(arch).state_dict(), str(export / WEIGHTS_FILE))
    assert main(["embed", str(export), str(root / "gallery"), "--out", str(root / "emb.npy")]) == 0
    return {"root": root, "export": export, "images": root / "gallery", "embeddings": root / "emb.npy"}


def _query(gallery: dict[str, Path], photo: Path, *extra: str, embeddings: Path | None = None) -> int:
    return main(["query", str(gallery["export"]), str(photo), "--gallery-embeddings", str(embeddings or gallery["embeddings"]), *extra])


def test_a_gallery_image_finds_itself_first(gallery: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    photo = gallery["images"] / "digit1" / sorted(p.name for p in (gallery["images"] / "digit1").iterdir())[3]
    own_id = str(photo.relative_to(gallery["images"]))
    capsys.readouterr()
    assert _query(gallery, photo, "-k", "5") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("Top 5 of 45 gallery item(s), flat index")
    first = table[3].split()
    assert first[0] == "1" and float(first[1]) == pytest.approx(1.0, abs=1e-4) and first[2] == own_id
    assert len(table) == 3 + 5

    other = gallery["images"] / "digit2" / sorted(p.name for p in (gallery["images"] / "digit2").iterdir())[0]
    page = gallery["root"] / "pages" / "q.html"
    assert _query(gallery, photo, "-k", "4", "--json", "--html", str(page), "--gallery-root", str(gallery["images"]), embeddings=None) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["index"] == "flat" and result["k"] == 4 and result["gallery_size"] == 45
    hits = result["queries"][0]["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and hits[0]["id"] == own_id
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 1 + 4  # the query photo and its four thumbnails
    assert own_id in text

    assert main(["query", str(gallery["export"]), str(photo), str(other), "--gallery-embeddings", str(gallery["embeddings"]), "-k", "100", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["k"] == 45 and [q["results"][0]["id"] for q in both["queries"]] == [own_id, str(other.relative_to(gallery["images"]))]


def test_hnsw_index_agrees_and_is_cached_until_the_embeddings_change(gallery: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    embeddings = tmp_path / "g.npy"  # a copy: this test rewrites it
    shutil.copy(gallery["embeddings"], embeddings)
    shutil.copy(gallery["embeddings"].with_suffix(".ids.txt"), tmp_path / "g.ids.txt")
    photo = next((gallery["images"] / "digit0").iterdir())
    own_id = str(photo.relative_to(gallery["images"]))
    capsys.readouterr()
    assert _query(gallery, photo, "--json", embeddings=embeddings) == 0
    flat = json.loads(capsys.readouterr().out)["queries"][0]["results"]
    assert _query(gallery, photo, "--json", "--index", "hnsw", embeddings=embeddings) == 0
    out = capsys.readouterr()
    hnsw = json.loads(out.out)
    assert hnsw["index"].startswith("hnsw") and hnsw["search"] == "efSearch 128" and "Building" in out.err
    assert hnsw["queries"][0]["results"][0]["id"] == flat[0]["id"] == own_id
    (cache,) = tmp_path.glob("g.hnsw-*.faiss")
    meta = json.loads(cache.with_name(cache.name + ".json").read_text())
    assert meta["embeddings_sha256"] == file_sha256(embeddings) and meta["vectors"] == 45
    built = cache.stat().st_mtime_ns

    assert _query(gallery, photo, "--index", "hnsw", "--json", embeddings=embeddings) == 0
    again = capsys.readouterr()
    assert "Building" not in again.err and cache.stat().st_mtime_ns == built  # read back, not rebuilt
    assert json.loads(again.out)["queries"][0]["results"] == hnsw["queries"][0]["results"]

    vectors, ids = np.load(embeddings), (tmp_path / "g.ids.txt").read_text().splitlines()
    np.save(embeddings, vectors[::-1])  # the same gallery in another order: another file, another index
    (tmp_path / "g.ids.txt").write_text("".join(f"{i}\n" for i in ids[::-1]))
    assert _query(gallery, photo, "--index", "hnsw", "--json", embeddings=embeddings) == 0
    rebuilt = capsys.readouterr()
    assert "Building" in rebuilt.err and json.loads(rebuilt.out)["queries"][0]["results"][0]["id"] == own_id
    assert json.loads(cache.with_name(cache.name + ".json").read_text())["embeddings_sha256"] == file_sha256(embeddings)
    assert sorted(p.name for p in tmp_path.glob("g.hnsw-*")) == [cache.name, cache.name + ".json"]


def test_build_index_kinds_find_each_vector_itself() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert index_spec("auto", 400, 16).kind == "flat" and index_spec("auto", 200_000, 16).kind == "ivf"
    assert index_spec("ivfpq", 400, 16).tag == "ivfpq-nlist10-m4-nbits3"
    for kind in ("flat", "hnsw", "ivf", "ivfpq"):
        index = build_index(x, kind)
        if kind.startswith("ivf"):
            index.nprobe = index.nlist
        _, found = index.search(x[:20], 1)
        hits = (found[:, 0] == np.arange(20)).mean()
        assert hits >= (1.0 if kind != "ivfpq" else 0.5), (kind, hits)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("not an image", "is not a readable image"),
        ("missing photo", "does not exist"),
        ("dimension mismatch", "have 8 dimensions but the export"),
        ("missing ids file", ".ids.txt of"),
        ("ids and rows disagree", "lists 3 id(s) but"),
        ("not an export", "is not a complete export"),
        ("ivfpq on 45 vectors", "needs at least 78 gallery vectors"),
    ],
)
def test_bad_inputs_are_clear_errors(case: str, fragment: str, gallery: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photo = next((gallery["images"] / "digit2").iterdir())
    export, embeddings, extra = gallery["export"], gallery["embeddings"], []
    if case == "not an image":
        photo = tmp_path / "notes.png"
        photo.write_text("not an image")
    elif case == "missing photo":
        photo = tmp_path / "gone.png"
    elif case == "dimension mismatch":
        embeddings = tmp_path / "e8.npy"
        np.save(embeddings, np.ones((3, 8), dtype=np.float32))
        (tmp_path / "e8.ids.txt").write_text("a\nb\nc\n")
    elif case == "missing ids file":
        embeddings = tmp_path / "e.npy"
        shutil.copy(gallery["embeddings"], embeddings)
    elif case == "ids and rows disagree":
        embeddings = tmp_path / "e.npy"
        shutil.copy(gallery["embeddings"], embeddings)
        (tmp_path / "e.ids.txt").write_text("a\nb\nc\n")
    elif case == "not an export":
        export = gallery["images"]
    else:
        extra = ["--index", "ivfpq"]
    capsys.readouterr()
    code = main(["query", str(export), str(photo), "--gallery-embeddings", str(embeddings), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and fragment in err, err
    if case == "not an image":
        assert str(photo) in err
    assert "Traceback" not in err and not list(embeddings.parent.glob("*.ivfpq-*"))  # no index built


def test_k_below_one_is_a_usage_error(gallery: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    photo = next((gallery["images"] / "digit2").iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(["query", str(gallery["export"]), str(photo), "--gallery-embeddings", str(gallery["embeddings"]), "-k", "0"])
    assert exit_.value.code == 2 and "argument -k: must be >= 1, but got 0" in capsys.readouterr().err
