"""Retrieval pictures: what a query network retrieves for a few fixed queries, beside the gallery model's own results.

A picture has one row per query: the query image, then its top-k gallery images by the query
network's embedding of the query (the asymmetric search), then its top-k by the gallery model's
own embedding of the query (the paragon), both searched by cosine against the gallery model's
embeddings of the gallery. Every result is framed by whether it is a true match (same class, or
for revisited Oxford/Paris an easy or hard image of the query, the medium protocol): a green
frame with a check mark, or a red frame with a cross, drawn as shapes so that they read in grey
too. Its rank and cosine score are written under it.

* :func:`pick_queries`: the fixed, seeded queries, one per class from as many classes as possible;
* :func:`retrieval_picture`: the picture's content from images, labels and embeddings, a pure
  function; each query's own gallery entry (the same image, when the query part is the gallery)
  is excluded from its results, as scoring does;
* :class:`RetrievalPicture`: the content (rows of ``(index, score, match)``), rendered to a PNG
  (:meth:`~RetrievalPicture.render`) or a self-contained HTML page with the same content
  (:meth:`~RetrievalPicture.to_html`, thumbnails embedded as data URIs);
* :func:`split_picture` and :func:`write_picture`: the picture of a split's query part, and
  writing ``retrieval.png`` and ``retrieval.html`` (``nas export`` writes both into the export,
  and the study records where: ``nas report`` links them).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data import ImageSource, RetrievalData
from nas.data.sources import as_source

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from nas.gallery import GalleryEmbeddings

__all__ = [
    "Hit", "PictureRow", "RetrievalPicture", "pick_queries", "retrieval_picture", "split_picture", "write_picture",
    "PNG_NAME", "HTML_NAME", "QUERIES", "TOP_K", "MATCH_COLOUR", "MISS_COLOUR",
]  # fmt: skip

PNG_NAME, HTML_NAME = "retrieval.png", "retrieval.html"
#: Default number of queries (rows) and results per side (k).
QUERIES, TOP_K = 8, 5
#: Frame colours of a true match, a wrong result and the query; far apart in grey as well (luma about 146, 71 and 60).
MATCH_COLOUR, MISS_COLOUR, QUERY_COLOUR = (90, 185, 90), (185, 20, 35), (60, 60, 60)
THUMB, FRAME = 96, 4  # thumbnail side and frame width, pixels
CELL = THUMB + 2 * FRAME
MARGIN, GAP, BLOCK_GAP = 12, 6, 22  # around the picture, between cells, between the three column groups
TITLE_H, HEADER_H, LINE_H = 24, 22, 15
ROW_H = CELL + 2 * LINE_H + 12
BACKGROUND, THUMB_BACKGROUND, TEXT = (255, 255, 255), (235, 235, 235), (20, 20, 20)


@dataclass(frozen=True)
class Hit:
    """One result: its image ``index`` in the data set, its ``position`` in the gallery part, cosine ``score``, ``match``."""

    index: int
    position: int
    score: float
    match: bool
    label: int = -1


@dataclass(frozen=True)
class PictureRow:
    """One query (its image ``index`` and ``label``) and its top-k results by the query network and by the paragon."""

    index: int
    label: int
    query_net: tuple[Hit, ...]
    paragon: tuple[Hit, ...]


def pick_queries(labels: np.ndarray, count: int = QUERIES, seed: int = 0) -> np.ndarray:
    """Positions of ``count`` queries among ``labels`` (the query part's), fixed by ``seed``: one query per class,
    from as many classes as there are (classes in a seeded order), then a second one per class, and so on."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in classes}
    picks: list[int] = []
    while len(picks) < min(count, len(labels)):
        for c in classes:
            if pools[c] and len(picks) < count:
                picks.append(int(pools[c].pop()))
    return np.asarray(picks, dtype=np.int64)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_picture(
    images: ImageSource | np.ndarray,
    labels: np.ndarray,
    query_rows: Sequence[int] | np.ndarray,
    gallery_rows: Sequence[int] | np.ndarray,
    query_net: np.ndarray,
    paragon_query: np.ndarray,
    paragon_gallery: np.ndarray,
    *,
    k: int = TOP_K,
    positives: Sequence[np.ndarray] | None = None,
    ignore: Sequence[np.ndarray] | None = None,
    classes: Sequence[str] = (),
    title: str = "",
) -> RetrievalPicture:
    """The picture of queries ``query_rows`` (image indices into ``images`` and ``labels``) searched in the gallery
    ``gallery_rows`` (image indices as well).

    ``query_net`` ``(Q, D)`` and ``paragon_query`` ``(Q, D)`` are the query network's and the gallery model's embeddings
    of the queries, ``paragon_gallery`` ``(G, D)`` the gallery model's of the gallery; scores are cosines. A gallery
    entry that is the query's own image (same index) is never one of its results. A result matches when its label is
    the query's (labels below 0 match nothing), or with ``positives`` (per query, gallery positions) when it is one of
    them; ``ignore`` (per query, gallery positions: revisited junk) are left out of the results.
    """
    query_rows, gallery_rows = np.asarray(query_rows, dtype=np.int64), np.asarray(gallery_rows, dtype=np.int64)
    labels = np.asarray(labels)
    q, g = len(query_rows), len(gallery_rows)
    if k < 1:
        raise ValueError(f"k must be at least 1, but got {k}.")
    for name, emb, rows in (("query_net", query_net, q), ("paragon_query", paragon_query, q), ("paragon_gallery", paragon_gallery, g)):
        if np.ndim(emb) != 2 or len(emb) != rows:
            raise ValueError(f"{name} must have one embedding per image ({rows}), but has shape {np.shape(emb)}.")
    dims = {np.shape(query_net)[1], np.shape(paragon_query)[1], np.shape(paragon_gallery)[1]}
    if len(dims) != 1:
        raise ValueError(f"The query network's and the gallery model's embeddings must have one dimension, but got {sorted(dims)}.")
    for name, per_query in (("positives", positives), ("ignore", ignore)):
        if per_query is not None and len(per_query) != q:
            raise ValueError(f"{name} needs one array per query ({q}), but has {len(per_query)}.")
    gallery, net, own = _normalised(paragon_gallery), _normalised(query_net), _normalised(paragon_query)
    gallery_labels = labels[gallery_rows]

    def top(embeddings: np.ndarray, i: int) -> tuple[Hit, ...]:
        scores = gallery @ embeddings[i]
        allowed = gallery_rows != query_rows[i]
        if ignore is not None:
            allowed[np.asarray(ignore[i], dtype=np.int64)] = False
        order = [int(p) for p in np.argsort(-scores, kind="stable") if allowed[p]][:k]
        truth = set(np.asarray(positives[i]).tolist()) if positives is not None else None
        label = labels[query_rows[i]]
        return tuple(
            Hit(int(gallery_rows[p]), p, float(scores[p]), (p in truth) if truth is not None else bool(label >= 0 and gallery_labels[p] == label),
                int(gallery_labels[p]))
            for p in order
        )  # fmt: skip

    rows = tuple(
        PictureRow(int(query_rows[i]), int(labels[query_rows[i]]), top(net, i), top(own, i)) for i in range(q)
    )  # fmt: skip
    return RetrievalPicture(rows, k, as_source(images), tuple(classes), title)


@dataclass(frozen=True, eq=False)
class RetrievalPicture:
    """The content of a retrieval picture (see the module docstring) and its rendering.

    Columns: 0 the query, ``1 .. k`` the query network's results, ``k + 1 .. 2k`` the paragon's.
    """

    rows: tuple[PictureRow, ...]
    k: int
    images: ImageSource
    classes: tuple[str, ...] = ()
    title: str = ""
    _thumbs: dict[int, PILImage] = field(default_factory=dict, repr=False)

    @property
    def columns(self) -> int:
        return 1 + 2 * self.k

    def hits(self, row: int, column: int) -> Hit | None:
        """The result in ``column`` (1 to 2k) of ``row``, or None where the gallery had fewer results."""
        r = self.rows[row]
        side, rank = (r.query_net, column - 1) if column <= self.k else (r.paragon, column - 1 - self.k)
        return side[rank] if rank < len(side) else None

    def matches(self) -> tuple[int, int, int]:
        """True matches among the query network's results, among the paragon's, and the number of results per side."""
        return (sum(h.match for r in self.rows for h in r.query_net), sum(h.match for r in self.rows for h in r.paragon),
                len(self.rows) * self.k)  # fmt: skip

    def summary(self) -> str:
        net, paragon, total = self.matches()
        return (f"{len(self.rows)} queries, top {self.k}: {net} of {total} results are true matches by the query network, "
                f"{paragon} by the gallery model (paragon)")  # fmt: skip

    # ------------------------------------------------------------------ geometry

    def _top(self) -> int:
        return MARGIN + (TITLE_H if self.title else 0) + HEADER_H

    def column_x(self, column: int) -> int:
        """Left edge of ``column``'s cells."""
        if column == 0:
            return MARGIN
        block, within = divmod(column - 1, self.k)
        return MARGIN + CELL + BLOCK_GAP + block * (self.k * (CELL + GAP) - GAP + BLOCK_GAP) + within * (CELL + GAP)

    def cell_box(self, row: int, column: int) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the framed thumbnail at ``row``, ``column`` (x1, y1 exclusive); its frame is
        :data:`FRAME` pixels wide, so ``(x0 + 1, (y0 + y1) // 2)`` is a frame pixel."""
        x, y = self.column_x(column), self._top() + row * ROW_H
        return x, y, x + CELL, y + CELL

    def mark_centre(self, row: int, column: int) -> tuple[int, int]:
        """Centre of a result's mark: white under a cross, the frame's colour under a check."""
        x0, y0, x1, _ = self.cell_box(row, column)
        return x1 - FRAME - 11, y0 + FRAME + 11

    def size(self) -> tuple[int, int]:
        return self.column_x(self.columns - 1) + CELL + MARGIN, self._top() + len(self.rows) * ROW_H + MARGIN - 12

    # ------------------------------------------------------------------ drawing

    def _class(self, label: int) -> str:
        if 0 <= label < len(self.classes):
            return self.classes[label]
        return "" if label < 0 else f"class {label}"

    def _thumb(self, index: int) -> PILImage:
        """Image ``index`` fitted into THUMB x THUMB (aspect kept) on a grey square, RGB."""
        if index not in self._thumbs:
            from PIL import Image  # deferred: PIL is needed only when a picture is drawn

            img = self.images.open(index, min_side=THUMB).convert("RGB")
            scale = min(THUMB / img.width, THUMB / img.height)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS)
            square = Image.new("RGB", (THUMB, THUMB), THUMB_BACKGROUND)
            square.paste(img, ((THUMB - size[0]) // 2, (THUMB - size[1]) // 2))
            self._thumbs[index] = square
        return self._thumbs[index]

    def render(self) -> PILImage:
        """The picture as an RGB image."""
        from PIL import Image, ImageDraw, ImageFont  # deferred: PIL is needed only when a picture is drawn

        canvas = Image.new("RGB", self.size(), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        font, bold = ImageFont.load_default(size=12), ImageFont.load_default(size=14)
        if self.title:
            draw.text((MARGIN, MARGIN), self.title, fill=TEXT, font=bold)
        header_y = MARGIN + (TITLE_H if self.title else 0)
        width = self.k * (CELL + GAP) - GAP
        for x, span, text in ((MARGIN, CELL, "query"), (self.column_x(1), width, f"query net: top {self.k}"),
                              (self.column_x(self.k + 1), width, f"gallery model (paragon): top {self.k}")):
            draw.text((x + span / 2, header_y + 8), text, fill=TEXT, font=bold, anchor="mm")
        for column in (1, self.k + 1):  # rules between the column groups
            x = self.column_x(column) - BLOCK_GAP // 2
            draw.line([(x, header_y), (x, canvas.height - MARGIN)], fill=(200, 200, 200), width=1)
        for i, row in enumerate(self.rows):
            self._cell(canvas, draw, font, i, 0, row.index, QUERY_COLOUR, None, [f"image {row.index}", self._class(row.label)])
            for column in range(1, self.columns):
                hit = self.hits(i, column)
                if hit is not None:
                    rank = (column - 1) % self.k + 1
                    colour = MATCH_COLOUR if hit.match else MISS_COLOUR
                    self._cell(canvas, draw, font, i, column, hit.index, colour, hit.match, [f"#{rank}  cos {hit.score:.3f}", self._class(hit.label)])
        return canvas

    def _cell(self, canvas: PILImage, draw, font, row: int, column: int, index: int, colour, match: bool | None, lines: list[str]) -> None:
        x0, y0, x1, y1 = self.cell_box(row, column)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        canvas.paste(self._thumb(index), (x0 + FRAME, y0 + FRAME))
        if match is not None:  # the mark: a disc in the frame's colour with a white check or cross
            (cx, cy), r = self.mark_centre(row, column), 9
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(255, 255, 255), width=2)
            if match:
                draw.line([(cx - 6, cy + 1), (cx - 2, cy + 6), (cx + 6, cy - 3)], fill=(255, 255, 255), width=3, joint="curve")
            else:
                draw.line([(cx - 4, cy - 4), (cx + 4, cy + 4)], fill=(255, 255, 255), width=3)
                draw.line([(cx - 4, cy + 4), (cx + 4, cy - 4)], fill=(255, 255, 255), width=3)
        for n, text in enumerate(lines):
            while text and font.getlength(text) > CELL:
                text = text[:-2] + "…"
            draw.text((x0, y1 + 3 + n * LINE_H), text, fill=TEXT, font=font)

    # ------------------------------------------------------------------ HTML

    def to_html(self, rendered: PILImage | None = None) -> str:
        """A self-contained HTML page with the same rows, marks, ranks and scores as :meth:`render`; its thumbnails
        (framed and marked as in the PNG) are cut from ``rendered`` (drawn when not given) and embedded as data URIs."""
        rendered = rendered if rendered is not None else self.render()

        fmt = "png" if self.images.channels == 1 else "jpeg"  # photos as JPEG: a page a tenth the size

        def img(row: int, column: int) -> str:
            buffer = io.BytesIO()
            rendered.crop(self.cell_box(row, column)).save(buffer, format=fmt.upper(), quality=92)
            return f'<img alt="" width="{CELL}" height="{CELL}" src="data:image/{fmt};base64,{base64.b64encode(buffer.getvalue()).decode()}">'

        esc = html.escape
        out = [
            "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(self.title or 'Retrieval picture')}</title>",
            "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{padding:3px;vertical-align:top;"
            f"font-size:12px;width:{CELL}px}}th{{font-size:14px}}td.first{{border-left:1px solid #ccc;padding-left:10px}}"
            ".match .mark{color:#2e7d32}.miss .mark{color:#b71c1c}.mark{font-weight:bold}</style></head><body>",
            f"<h1>{esc(self.title or 'Retrieval picture')}</h1>",
            f"<p>{esc(self.summary())}. Each row: the query, its top {self.k} gallery images by the query network's embedding of "
            "the query, then its top {k} by the gallery model's own (paragon). Green frame with a check (&#10003;): a true match; "
            "red frame with a cross (&#10007;): not; rank and cosine score under each.</p>".replace("{k}", str(self.k)),
            "<table>",
            f'<thead><tr><th>query</th><th class="first" colspan="{self.k}">query net: top {self.k}</th>'
            f'<th class="first" colspan="{self.k}">gallery model (paragon): top {self.k}</th></tr></thead><tbody>',
        ]
        for i, row in enumerate(self.rows):
            cells = [f'<td class="query" data-index="{row.index}">{img(i, 0)}<div>image {row.index}</div><div>{esc(self._class(row.label))}</div></td>']
            for column in range(1, self.columns):
                hit, rank = self.hits(i, column), (column - 1) % self.k + 1
                first = " first" if rank == 1 else ""
                if hit is None:
                    cells.append(f'<td class="empty{first}"></td>')
                    continue
                kind, mark = ("match", "&#10003; match") if hit.match else ("miss", "&#10007; no match")
                side = "query-net" if column <= self.k else "paragon"
                cells.append(
                    f'<td class="hit {kind}{first}" data-side="{side}" data-rank="{rank}" data-index="{hit.index}" data-score="{hit.score:.6f}">'
                    f'{img(i, column)}<div class="mark">{mark}</div><div>#{rank} cos {hit.score:.3f}</div><div>{esc(self._class(hit.label))}</div></td>'
                )
            out.append(f'<tr class="query-row" data-query="{row.index}">' + "".join(cells) + "</tr>")
        out += ["</tbody></table>", "</body></html>"]
        return "\n".join(out) + "\n"


def split_picture(
    retrieval: RetrievalData,
    embed_queries: Callable[[np.ndarray], np.ndarray],
    gallery: GalleryEmbeddings,
    *,
    queries: int = QUERIES,
    k: int = TOP_K,
    seed: int = 0,
    title: str = "",
) -> RetrievalPicture:
    """The picture of ``queries`` queries of ``retrieval``'s query part (:func:`pick_queries` with ``seed``) against its
    gallery part: ``embed_queries(indices)`` gives the query network's embeddings of those images, ``gallery`` the gallery
    model's embeddings of the split (:class:`nas.gallery.GalleryEmbeddings`). Revisited Oxford/Paris ground truth: the
    medium protocol's positives are the matches and its junk is left out."""
    split, labels = retrieval.split, retrieval.data.labels
    picks = pick_queries(labels[split.query], queries, seed)
    rows = split.query[picks]
    positives = ignore = None
    if retrieval.ground_truth is not None:
        truth, junk = retrieval.ground_truth.protocol("medium")
        positives, ignore = [truth[p] for p in picks], [junk[p] for p in picks]
    return retrieval_picture(
        retrieval.data.images, labels, rows, split.gallery, embed_queries(rows), gallery.query[picks], gallery.gallery,
        k=k, positives=positives, ignore=ignore, classes=retrieval.data.classes, title=title,
    )  # fmt: skip


def write_picture(picture: RetrievalPicture, folder: str | Path) -> list[Path]:
    """Write ``retrieval.png`` and ``retrieval.html`` (the same content) into ``folder``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rendered = picture.render()
    png, page = folder / PNG_NAME, folder / HTML_NAME
    rendered.save(png, optimize=True)
    page.write_text(picture.to_html(rendered), encoding="utf-8")
    return [png, page]

