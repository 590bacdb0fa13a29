"""Retrieval pictures: the content from hand-made embeddings of real digits, the PNG's layout and marks, the HTML page."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _fixtures import digits_image_set
from nas.data import RetrievalData, Split
from nas.gallery import GalleryEmbeddings
from nas.pictures import (
    FRAME, MATCH_COLOUR, MISS_COLOUR, QUERY_COLOUR, pick_queries, retrieval_picture, split_picture, write_picture,
)  # fmt: skip

#: Six real digits (two each of 0, 1 and 2) and their hand-made 2-d embeddings: angles on the unit circle.
ANGLES = np.array([0.0, 10.0, 60.0, 70.0, 150.0, 160.0])


def _circle(degrees: np.ndarray) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32) * 3.0  # not unit length: cosines are normalised


@pytest.fixture(scope="module")
def six():
    data = digits_image_set(per_class=2)
    rows = np.concatenate([np.flatnonzero(data.labels == c) for c in (0, 1, 2)])
    assert data.labels[rows].tolist() == [0, 0, 1, 1, 2, 2]
    return data, rows


@pytest.fixture(scope="module")
def query_is_gallery(six):
    """Every one of the six is a query and a gallery image; the query net sees query 0 at 68 degrees, the rest as the gallery model."""
    data, rows = six
    net = ANGLES.copy()
    net[0] = 68.0
    return retrieval_picture(data.images, data.labels, rows, rows, _circle(net), _circle(ANGLES), _circle(ANGLES), k=3, classes=data.classes)


def test_known_results_with_the_own_entry_excluded(six, query_is_gallery) -> None:
    _, rows = six
    picture = query_is_gallery
    assert len(picture.rows) == 6 and picture.columns == 7
    first = picture.rows[0]
    assert first.index == rows[0] and first.label == 0
    # the gallery model's own embedding of query 0 equals its gallery entry (cosine 1), which is left out
    assert [h.index for h in first.paragon] == [rows[1], rows[2], rows[3]]
    assert [h.match for h in first.paragon] == [True, False, False]
    assert [h.score for h in first.paragon] == pytest.approx(np.cos(np.deg2rad([10, 60, 70])), abs=1e-6)
    # the query net's embedding at 68 degrees: 70 (class 1), 60 (class 1), then 10 (class 0)
    assert [h.index for h in first.query_net] == [rows[3], rows[2], rows[1]]
    assert [h.match for h in first.query_net] == [False, False, True]
    assert [h.position for h in first.query_net] == [3, 2, 1]
    for row in picture.rows:
        assert all(h.index != row.index for h in row.query_net + row.paragon)
    # query 5 (160 degrees): 150 (match), then 70 and 60
    assert [h.index for h in picture.rows[5].paragon] == [rows[4], rows[3], rows[2]]
    assert picture.matches() == (6, 6, 18)  # one true match in each row's top 3, on each side


def test_png_frames_and_marks(query_is_gallery) -> None:
    picture = query_is_gallery
    image = picture.render()
    assert image.size == picture.size()
    grey = image.convert("L")
    frames = {MATCH_COLOUR, MISS_COLOUR, QUERY_COLOUR}
    for r in range(len(picture.rows)):
        x0, y0, x1, y1 = picture.cell_box(r, 0)
        assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == QUERY_COLOUR
        # along the top frame line of the row: one framed thumbnail per column
        line = [image.getpixel((x, y0 + 1)) in frames for x in range(image.width)]
        runs = sum(1 for x in range(image.width) if line[x] and (x == 0 or not line[x - 1]))
        assert runs == 1 + 2 * picture.k
        for c in range(1, picture.columns):
            hit = picture.hits(r, c)
            x0, y0, x1, y1 = picture.cell_box(r, c)
            assert x1 - x0 == y1 - y0 > 2 * FRAME
            colour = MATCH_COLOUR if hit.match else MISS_COLOUR
            assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == colour
            assert image.getpixel((x1 - 2, y1 - 2)) == colour
            # in grey: a cross is white at the mark's centre, a check leaves it the frame's grey
            assert (grey.getpixel(picture.mark_centre(r, c)) >= 250) == (not hit.match)
    # the query net's first result for query 0 is wrong, the gallery model's right
    x0, y0, _, y1 = picture.cell_box(0, 1)
    assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == MISS_COLOUR
    x0, y0, _, y1 = picture.cell_box(0, 1 + picture.k)
    assert image.getpixel((x0 + 1, (y0 + y1) // 2)) == MATCH_COLOUR


class _Cells(HTMLParser):
    """The rows of the page: per row, ``(class, side, rank, index, mark text)`` of every cell."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[dict]] = []
        self._cell: dict | None = None
        self._marks = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and attrs.get("class") == "query-row":
            self.rows.append([])
        elif tag == "td" and self.rows:
            self._cell = {**attrs, "text": ""}
            self.rows[-1].append(self._cell)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None


def test_html_has_the_same_rows_and_marks(query_is_gallery, tmp_path: Path) -> None:
    picture = query_is_gallery
    png, page = write_picture(picture, tmp_path)
    assert Image.open(png).size == picture.size()
    parser = _Cells()
    parser.feed(page.read_text(encoding="utf-8"))
    assert len(parser.rows) == len(picture.rows)
    for r, (row, cells) in enumerate(zip(picture.rows, parser.rows)):
        assert len(cells) == picture.columns
        assert cells[0]["class"] == "query" and int(cells[0]["data-index"]) == row.index
        for c, cell in enumerate(cells[1:], start=1):
            hit = picture.hits(r, c)
            assert int(cell["data-index"]) == hit.index
            assert cell["data-side"] == ("query-net" if c <= picture.k else "paragon")
            assert int(cell["data-rank"]) == (c - 1) % picture.k + 1
            assert ("match" in cell["class"].split()) == hit.match and ("miss" in cell["class"].split()) == (not hit.match)
            assert ("\u2713 match" in cell["text"]) == hit.match and ("\u2717 no match" in cell["text"]) == (not hit.match)
            assert f"cos {hit.score:.3f}" in cell["text"]
    assert page.read_text().count('src="data:image/png;base64,') == len(picture.rows) * picture.columns


def test_ground_truth_positives_and_ignored_results(six) -> None:
    """Unlabelled data (revisited Oxford/Paris): matches come from per-query positives; ignored (junk) entries are left out."""
    data, rows = six
    labels = np.full(len(data.labels), -1)
    query, gallery = rows[:1], rows[1:]  # disjoint parts: query 0 against the other five
    picture = retrieval_picture(
        data.images, labels, query, gallery, _circle([0.0]), _circle([0.0]), _circle(ANGLES[1:]), k=3,
        positives=[np.array([2])], ignore=[np.array([1])],
    )  # fmt: skip
    hits = picture.rows[0].paragon
    assert [h.position for h in hits] == [0, 2, 3]  # 10, (60 ignored), 70, 150 degrees
    assert [h.match for h in hits] == [False, True, False]
    assert picture.matches() == (1, 1, 3)


def test_split_picture_of_a_query_is_gallery_split(six) -> None:
    data, rows = six
    split = Split(train=np.array([], dtype=np.int64), val=np.array([], dtype=np.int64), query=rows, gallery=rows, query_is_gallery=True)
    emb = _circle(ANGLES)
    gallery = GalleryEmbeddings("key", np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), emb, emb)
    asked = []

    def embed(indices: np.ndarray) -> np.ndarray:
        asked.append(indices.tolist())
        return _circle(ANGLES[[rows.tolist().index(i) for i in indices]])

    picture = split_picture(RetrievalData(data, split), embed, gallery, queries=3, k=2, seed=1)
    assert len(picture.rows) == 3 and asked == [[r.index for r in picture.rows]]
    assert len({r.label for r in picture.rows}) == 3  # one query per class
    for row in picture.rows:
        assert all(h.index != row.index for h in row.query_net + row.paragon)
        assert row.query_net == row.paragon  # same embeddings on both sides
        assert row.paragon[0].match  # each digit's nearest other image is its twin


def test_queries_spread_over_classes() -> None:
    labels = np.repeat(np.arange(10), 5)
    eight = pick_queries(labels, 8, seed=0)
    assert len(eight) == 8 and len(set(labels[eight])) == 8
    twelve = pick_queries(labels, 12, seed=0)
    assert len(set(twelve.tolist())) == 12 and set(labels[twelve]) == set(range(10))
    assert np.array_equal(pick_queries(labels, 8, seed=0), eight)
    assert not np.array_equal(pick_queries(labels, 8, seed=1), eight)
    assert sorted(pick_queries(labels[:3], 8).tolist()) == [0, 1, 2]


def test_mismatched_embeddings_are_a_clear_error(six) -> None:
    data, rows = six
    with pytest.raises(ValueError, match="one dimension"):
        retrieval_picture(data.images, data.labels, rows, rows, np.zeros((6, 3)), _circle(ANGLES), _circle(ANGLES))
    with pytest.raises(ValueError, match=r"query_net must have one embedding per image \(6\)"):
        retrieval_picture(data.images, data.labels, rows, rows, _circle(ANGLES[:2]), _circle(ANGLES), _circle(ANGLES))
