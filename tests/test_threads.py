"""nas.threads: torch's threads sized to the cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nas.threads import ThreadSizer, cpu_count

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the sizer reads /proc/stat (Linux)")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_busy_process_beside_takes_its_core_away() -> None:
    before = torch.get_num_threads()
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        sizer = ThreadSizer()
        sizer.others()
        time.sleep(0.6)
        others = sizer.others()
        assert others is not None and others >= 0.7  # the competitor's core
        time.sleep(0.3)
        n = sizer.resize()
        assert n == max(1, cpu_count() - 1) and torch.get_num_threads() == n
    finally:
        competitor.kill()
        competitor.wait()
        torch.set_num_threads(before)


def test_this_process_own_work_is_not_counted() -> None:
    sizer = ThreadSizer()
    sizer.others()
    _spin(0.6)  # one core busy, but with this process
    others = sizer.others()
    assert others is not None and others < 0.6


def test_a_fixed_count_is_kept_and_a_short_window_changes_nothing() -> None:
    before = torch.get_num_threads()
    try:
        assert ThreadSizer(1).resize() == 1 and torch.get_num_threads() == 1
        sizer = ThreadSizer()
        sizer.others()
        assert sizer.others() is None  # too short to judge
        assert sizer.threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
