"""``nas query EXPORT PHOTO [PHOTO...]``: the top-k gallery items of query photos.

The photos are embedded with an exported query network, read and preprocessed exactly as
``nas embed`` reads a folder (:func:`nas.export.loading.query_input`), and searched in a faiss
index over the gallery's embeddings as ``nas embed`` writes them: ``FILE.npy`` and its ids,
one a line, in ``FILE.ids.txt`` (:mod:`nas.retrieval_index` builds the index, exact or
approximate and cached). Scores are cosines, computed exactly for the items the index returns.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

from nas.data.sources import IMAGE_ERRORS, open_image
from nas.errors import DataError
from nas.export.loading import input_pipeline, load_query_model, query_input
from nas.retrieval_index import cached_index, set_search_params

__all__ = ["ids_file", "load_gallery", "embed_photos", "search_gallery", "results_table", "write_html", "query_command"]

_THUMBNAIL_SIDE = 160


def ids_file(embeddings_file: Path) -> Path:
    """The ids file ``nas embed`` writes beside ``FILE.npy``: ``FILE.ids.txt``."""
    return embeddings_file.with_suffix(".ids.txt")


def load_gallery(embeddings_file: str | Path) -> tuple[np.ndarray, list[str]]:
    """The gallery's embeddings (float32, rows L2-normalised) and their ids, as ``nas embed`` wrote them."""
    path = Path(embeddings_file)
    if not path.is_file():
        raise DataError(f"--gallery-embeddings {path} is not a file; pass the FILE.npy written by 'nas embed'.")
    ids_path = ids_file(path)
    if not ids_path.is_file():
        raise DataError(f"The ids file {ids_path} of {path} is missing; 'nas embed --out {path}' writes both.")
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc}); embed the gallery again with 'nas embed'.") from None
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or not np.issubdtype(embeddings.dtype, np.floating):
        raise DataError(f"{path} holds a {embeddings.dtype} array of shape {embeddings.shape}, not one embedding per row; embed the gallery with 'nas embed'.")
    try:
        ids = ids_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the ids file {ids_path}: {exc}.") from None
    if len(ids) != embeddings.shape[0]:
        raise DataError(f"{ids_path} lists {len(ids)} id(s) but {path} holds {embeddings.shape[0]} embeddings; embed the gallery again with 'nas embed'.")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if not np.isfinite(embeddings).all():
        raise DataError(f"{path} holds NaN or infinite values; embed the gallery again with 'nas embed'.")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12), ids


def embed_photos(export_dir: str | Path, photos: list[str], expect_dim: int | None = None) -> np.ndarray:
    """The export's embeddings of ``photos`` (rows L2-normalised); a photo that cannot be read is a
    :class:`DataError` naming it, and ``expect_dim`` (the gallery's) must be the export's output dimension."""
    model = load_query_model(export_dir)
    if expect_dim is not None and expect_dim != model.arch.embed_dim:
        raise DataError(
            f"The gallery embeddings have {expect_dim} dimensions but the export {export_dir} outputs {model.arch.embed_dim}; "
            "pass the embeddings of this export's gallery (nas embed EXPORT GALLERY_FOLDER --out FILE.npy)."
        )
    transform, mode = input_pipeline(export_dir, model)
    inputs = []
    for photo in photos:
        path = Path(photo)
        if path.is_dir():
            raise DataError(f"{path} is a folder; nas query takes image files (to embed a folder use nas embed).")
        if not path.exists():
            raise DataError(f"The photo {path} does not exist.")
        try:
            inputs.append(query_input(path, transform, mode))
        except IMAGE_ERRORS as exc:
            raise DataError(f"The photo {path} is not a readable image ({type(exc).__name__}: {exc}).") from None
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), 64):
            out.append(model(torch.stack(inputs[start : start + 64])).numpy().astype(np.float32))
    embeddings = np.concatenate(out)
    return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)


def search_gallery(index: faiss.Index, gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The rows of the top ``k`` gallery items of each query and their exact cosine scores, best first
    (an approximate index proposes the items; the scores are recomputed from the embeddings)."""
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    rows, scores = [], []
    for query, candidates in zip(queries, found):
        candidates = candidates[candidates >= 0]
        exact = gallery[candidates] @ query
        order = np.argsort(-exact, kind="stable")
        rows.append(candidates[order])
        scores.append(exact[order])
    return rows, scores


def results_table(results: list[dict]) -> str:
    """The plain-text table of ``nas query``: per photo, rank, cosine score and gallery id."""
    lines = []
    for result in results:
        lines.append(f"query: {result['query']}")
        lines.append(f"  {'rank':>4}  {'score':>7}  id")
        lines.extend(f"  {hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']}" for hit in result["results"])
    return "\n".join(lines)


def _thumbnail(path: Path) -> str | None:
    """A PNG data URI of the picture at ``path``, at most 160 pixels a side; None when it cannot be read."""
    try:
        with open_image(path) as img:
            img.draft("RGB", (_THUMBNAIL_SIDE, _THUMBNAIL_SIDE))
            picture = img.convert("RGB")
    except IMAGE_ERRORS:
        return None
    picture.thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    uri = _thumbnail(path)
    picture = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else '<div class="missing">no picture</div>'
    return f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>"


def write_html(path: str | Path, results: list[dict], gallery_root: str | Path | None) -> Path:
    """A self-contained page: each query photo and its top-k gallery thumbnails (ids read as image paths,
    relative to ``gallery_root`` when given), with rank and cosine score."""
    root = Path(gallery_root) if gallery_root else Path(".")
    sections = []
    for result in results:
        hits = "".join(_figure(root / hit["id"], f"{hit['rank']}. {hit['id']}  {hit['score']:.4f}") for hit in result["results"])
        sections.append(f'<section><div class="query">{_figure(Path(result["query"]), result["query"])}</div><div class="hits">{hits}</div></section>')
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>nas query</title><style>"
        "body{font-family:sans-serif;margin:1em}section{display:flex;gap:2em;margin-bottom:2em;border-bottom:1px solid #ccc}"
        ".hits{display:flex;flex-wrap:wrap;gap:.5em}figure{margin:0;width:10em}figure img{width:8em;image-rendering:pixelated}"
        "figcaption{font-size:.8em;word-break:break-all}.missing{width:8em;height:8em;background:#eee}"
        "</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    out = Path(path)
    if out.is_dir():
        raise DataError(f"--html {out} is a folder; pass a file name, e.g. {out / 'query.html'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"Cannot write the page {out}: {exc}.") from None
    return out


def query_command(args: argparse.Namespace) -> int:
    """``nas query``: print (or ``--json``) the top-k gallery items of each photo; ``--html`` writes the page too."""
    if args.html and Path(args.html).is_dir():  # said before any work, as write_html would say it after
        raise DataError(f"--html {args.html} is a folder; pass a file name, e.g. {Path(args.html) / 'query.html'}.")
    gallery, ids = load_gallery(args.gallery_embeddings)
    queries = embed_photos(args.export_dir, args.photos, expect_dim=gallery.shape[1])
    index, spec, cache = cached_index(Path(args.gallery_embeddings), gallery, args.index, log=lambda text: print(text, file=sys.stderr))
    searched = set_search_params(index, nprobe=args.nprobe, ef_search=args.ef_search)
    k = min(args.k, len(ids))
    rows, scores = search_gallery(index, gallery, queries, k)
    results = [
        {"query": photo, "results": [{"rank": r + 1, "id": ids[row], "score": float(score)} for r, (row, score) in enumerate(zip(found, score_row))]}
        for photo, found, score_row in zip(args.photos, rows, scores)
    ]
    page = write_html(args.html, results, args.gallery_root) if args.html else None
    if args.json:
        print(json.dumps({"index": spec.tag, "search": searched or None, "k": k, "gallery_size": len(ids), "queries": results}, indent=2))
    else:
        note = f"{spec.tag} index" + (f" ({searched})" if searched else "") + (f", cached as {cache}" if cache else "")
        print(f"Top {k} of {len(ids)} gallery item(s), {note}:")
        print(results_table(results))
    if page is not None:
        print(f"Page: {page}", file=sys.stderr if args.json else sys.stdout)
    return 0
