"""Torch's training threads sized to the cores other processes leave free.

PyTorch runs each operator's work on ``torch.get_num_threads()`` threads (one per core by
default) and waits for the slowest of them at the end of every operator. When another busy
process shares the machine, one of those threads is often not scheduled: every operator
then waits for the kernel to give it a time slice, and a training step of many small
operators runs many times slower than its fair share of the cores (measured: the
quickstart's gallery epoch went from 13 s alone to 160 s beside one single-threaded job on
2 cores; see ``experiments/benchmarks/busy_machine.py``). One thread per *free* core avoids
it.

:class:`ThreadSizer` reads how busy the machine's CPUs were since its last look
(``/proc/stat``) and subtracts this process's own CPU time: what remains is the cores other
processes used. :meth:`ThreadSizer.resize` sets torch's threads to the rest (at least 1),
and is called before each epoch of training and before each trial, so a search adapts as
other jobs come and go. Where ``/proc/stat`` cannot be read (not Linux), the thread count is
left as it is.

A thread count chosen by hand is kept: ``search.threads`` (``--threads``), or else the
environment's ``OMP_NUM_THREADS`` (:func:`chosen_threads`). Float sums split over another
number of threads can differ in their last bits, so a run repeats bit for bit only with the
count fixed.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["ThreadSizer", "cpu_count", "apply_threads", "chosen_threads"]


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def chosen_threads(configured: int | None) -> int | None:
    """The thread count chosen by hand: ``configured`` (``search.threads``), else ``OMP_NUM_THREADS`` when it is a
    positive number; ``None``: size to the free cores."""
    if configured:
        return configured
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _machine_busy() -> float | None:
    """Seconds of CPU time all processes have used since boot (all CPUs, from ``/proc/stat``), or ``None``."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy is all but idle and iowait (steal: taken by other guests)
    values = [int(v) for v in fields[1:9]]
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class ThreadSizer:
    """Sizes torch's threads to the free cores (see the module docstring).

    ``fixed``: a thread count to keep instead (``search.threads`` or ``--threads``); ``None`` sizes.
    """

    #: the shortest window (seconds) worth judging; a first look samples this long
    MIN_WINDOW = 0.1

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.cpus = cpu_count()
        self._last: tuple[float, float, float] | None = None  # (wall, machine busy, own CPU)

    def _sample(self) -> tuple[float, float, float] | None:
        busy = _machine_busy()
        return None if busy is None else (time.monotonic(), busy, _own_cpu())

    def others(self) -> float | None:
        """Cores other processes used, on average, since the last call (the first call looks for a tenth of a second)."""
        if self._last is None:
            self._last = self._sample()
            if self._last is None:
                return None
            time.sleep(self.MIN_WINDOW)
        now = self._sample()
        if now is None or self._last is None:
            return None
        wall = now[0] - self._last[0]
        if wall < self.MIN_WINDOW:  # too short to judge: keep the last window open
            return None
        used = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        return max(used / wall, 0.0)

    def threads(self) -> int:
        """The thread count for the next stretch of work: ``fixed``, or the free cores (at least 1)."""
        if self.fixed:
            return self.fixed
        others = self.others()
        if others is None:
            return torch.get_num_threads()
        return max(1, min(self.cpus, round(self.cpus - others)))

    def resize(self) -> int:
        """Set torch's threads to :meth:`threads`; the count set."""
        n = self.threads()
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        return n


def apply_threads(sizer: ThreadSizer | None) -> None:
    """:meth:`ThreadSizer.resize` when there is a sizer."""
    if sizer is not None:
        sizer.resize()
