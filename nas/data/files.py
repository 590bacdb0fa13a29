"""Reading a benchmark's index files and the images they list, with errors that say which file.

Shared by the benchmark loaders (:mod:`nas.data.benchmarks`, :mod:`nas.data.revisited`).
``title`` is the benchmark's name as its errors show it (``"CUB-200-2011"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nas.data.sources import FileImages
from nas.errors import DataError

__all__ = ["dataset_root", "need_file", "read_rows", "parse_int", "read_listed_images"]


def dataset_root(path: str | Path, folder: str, marker: str) -> Path:
    """``path`` when it holds ``marker`` or is itself named ``folder``; otherwise ``path/folder``."""
    path = Path(path)
    if (path / marker).is_file() or path.name == folder:
        return path
    return path / folder


def need_file(file: Path, title: str, expected: str, hint: str) -> Path:
    """``file``, or a :class:`DataError` saying what was expected there and where to point ``data.path``."""
    if not file.is_file():
        raise DataError(f"{title}: {file} is missing; expected {expected} there. Point data.path at {hint}.")
    return file


def read_rows(file: Path, title: str, width: int, expected: str) -> list[tuple[int, list[str]]]:
    """Non-empty lines of ``file`` as ``(line number, fields)``; each must have ``width`` fields."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{title}: cannot read {file}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != width:
            raise DataError(f"{title}: {file} line {number} is {line.strip()!r}; expected {expected}.")
        rows.append((number, fields))
    return rows


def parse_int(value: str, file: Path, number: int, title: str, what: str) -> int:
    """``value`` (field ``what`` on line ``number`` of ``file``) as an integer."""
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{title}: {file} line {number}: {what} must be an integer, but got {value!r}.") from None


def read_listed_images(
    title: str,
    root: Path,
    files: Sequence[str],
    image_size: int | None,
    channels: int,
    listed_in: str,
    crops: Sequence[Sequence[float] | None] | None = None,
) -> FileImages:
    """``root/file`` for each file, optionally cropped to ``(x1, y1, x2, y2)`` first, as a
    :class:`~nas.data.sources.FileImages` (decoded on demand; ``image_size``: the longest
    shorter side an image is decoded at, null for its own size). A missing file is an
    error now, naming it and the list it is in; an unreadable one when it is first decoded.
    """
    for name in files:
        if not (root / name).is_file():
            raise DataError(f"{title}: image {root / name} (listed in {listed_in}) is missing. Extract all of the dataset's images there.")
    boxes = {i: box for i, box in enumerate(crops or ()) if box is not None}
    return FileImages(root, files, channels, boxes=boxes, max_side=image_size, listed_in=listed_in, title=title)
