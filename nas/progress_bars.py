"""Progress bars for steps that can take more than a few seconds (gallery embedding, a trial's epochs).

Bars go to standard error through tqdm, and only when standard error is a terminal; they
are off when the environment variable ``NAS_QUIET`` is set to a non-empty value other than
``0`` (``nas ... --quiet`` sets it for its own process and the loader workers it starts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "bars_enabled", "QUIET_ENV"]

T = TypeVar("T")

#: Set to a non-empty value other than ``0`` to turn progress bars off.
QUIET_ENV = "NAS_QUIET"


def bars_enabled() -> bool:
    """Whether bars are shown: standard error is a terminal and ``NAS_QUIET`` is not set."""
    quiet = os.environ.get(QUIET_ENV, "")
    return not (quiet and quiet != "0") and sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "img", scale: int = 1) -> Iterator[T]:
    """``items`` with a bar of ``total`` units (each item counting ``scale`` units; the last may count fewer)."""
    if not bars_enabled():
        yield from items
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr, unit_scale=True) as bar:
        done = 0
        for item in items:
            yield item
            step = scale if total is None else min(scale, total - done)
            bar.update(step)
            done += step
