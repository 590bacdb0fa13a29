"""Progress for steps that can take more than a few seconds (gallery embedding, a trial's epochs).

On a terminal, bars go to standard error through tqdm. When standard error is not a
terminal (a log file, a batch job), a step that runs longer than :data:`LINE_EVERY` seconds
writes a plain line there at most that often (done, rate, time left) and one when it ends, so
a long run never looks hung in its log; short steps write nothing. Both are off when the
environment variable ``NAS_QUIET`` is set to a non-empty value other than ``0`` (``nas ...
--quiet`` sets it for its own process and the loader workers it starts).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "bars_enabled", "quiet", "QUIET_ENV", "LINE_EVERY"]

T = TypeVar("T")

#: Set to a non-empty value other than ``0`` to turn progress bars off.
QUIET_ENV = "NAS_QUIET"
#: Seconds between the plain progress lines written where standard error is not a terminal.
LINE_EVERY = 60.0


def quiet() -> bool:
    """Whether ``NAS_QUIET`` turns progress off."""
    value = os.environ.get(QUIET_ENV, "")
    return bool(value) and value != "0"


def bars_enabled() -> bool:
    """Whether bars are shown: standard error is a terminal and ``NAS_QUIET`` is not set."""
    return not quiet() and sys.stderr.isatty()


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _lines(items: Iterable[T], total: int | None, desc: str, unit: str, scale: int) -> Iterator[T]:
    """``items``, with a plain line on standard error every :data:`LINE_EVERY` seconds and one at the end if any was written."""
    start = last = time.monotonic()
    done, wrote = 0, False
    for item in items:
        yield item
        done += scale if total is None else min(scale, total - done)
        now = time.monotonic()
        if now - last >= LINE_EVERY:
            rate = done / max(now - start, 1e-9)
            of = f"/{total:,}" if total else ""
            left = f", about {_duration((total - done) / rate)} left" if total and rate > 0 else ""
            print(f"{desc}: {done:,}{of} {unit} after {_duration(now - start)}, {rate:.1f} {unit}/s{left}", file=sys.stderr, flush=True)
            last, wrote = now, True
    if wrote:
        print(f"{desc}: done, {done:,} {unit} in {_duration(time.monotonic() - start)}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "img", scale: int = 1) -> Iterator[T]:
    """``items`` with a bar of ``total`` units (each item counting ``scale`` units; the last may count fewer), or plain
    lines where standard error is not a terminal (see the module docstring)."""
    if quiet():
        yield from items
        return
    if not sys.stderr.isatty():
        yield from _lines(items, total, desc, unit, scale)
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr, unit_scale=True) as bar:
        done = 0
        for item in items:
            yield item
            step = scale if total is None else min(scale, total - done)
            bar.update(step)
            done += step
