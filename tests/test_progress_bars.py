"""nas.progress_bars: bars only on a terminal, never under --quiet; items pass through unchanged."""

from __future__ import annotations

import io
import sys

import pytest

from nas.cli import build_parser
from nas.progress_bars import QUIET_ENV, bars_enabled, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_on_a_terminal_and_not_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert bars_enabled()
    assert list(progress(iter(range(7)), 7, "counting", scale=3)) == [0, 1, 2, 3, 4, 5, 6]
    assert "counting" in terminal.getvalue()
    monkeypatch.setenv(QUIET_ENV, "1")
    assert not bars_enabled()
    monkeypatch.setenv(QUIET_ENV, "0")
    assert bars_enabled()


def test_no_bars_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    assert not bars_enabled()
    assert list(progress(range(3), 3, "counting")) == [0, 1, 2]
    assert pipe.getvalue() == ""  # a short step writes nothing into a log


def test_a_long_step_writes_plain_lines_into_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where standard error is a file, a step longer than LINE_EVERY seconds says how far it is, how fast, and how long is left."""
    import nas.progress_bars as bars

    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    monkeypatch.delenv(QUIET_ENV, raising=False)
    clock = iter(float(t) for t in range(0, 1000, 30))  # 30 s a batch
    monkeypatch.setattr(bars.time, "monotonic", lambda: next(clock))
    assert list(progress(range(4), 256, "gallery embedding, query", scale=64)) == [0, 1, 2, 3]
    lines = pipe.getvalue().splitlines()
    assert lines[0] == "gallery embedding, query: 128/256 img after 60 s, 2.1 img/s, about 60 s left"
    assert lines[-1] == "gallery embedding, query: done, 256 img in 2.5 min"
    monkeypatch.setenv(QUIET_ENV, "1")
    pipe.truncate(0)
    clock = iter(float(t) for t in range(0, 1000, 30))
    assert list(progress(range(4), 256, "quiet", scale=64)) == [0, 1, 2, 3]
    assert pipe.getvalue() == ""


def test_quiet_flag_is_accepted_by_the_long_commands() -> None:
    parser = build_parser()
    for argv in (["search", "x.yaml", "--quiet"], ["worker", "x.yaml", "--trials", "2", "--quiet"], ["gallery", "train", "x.yaml", "--quiet"]):
        assert parser.parse_args(argv).quiet
