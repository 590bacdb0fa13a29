"""Hardware budgets: measured quantities with limits, checked cheapest first.

Units:

* **MFLOPs**: millions of multiply-accumulates of conv / linear / matmul as fvcore counts
  them (batch 1, at the candidate's input resolution). Batch-norm, pooling and
  element-wise operations are not counted: the MobileNet/EfficientNet "MAdds" convention.
* **params (M)**: millions of parameters (all, including the embedding layer).
* **memory (MiB)**: peak memory of one inference forward pass: bytes of parameters and
  buffers plus the peak bytes of live tensors (input and activations) of an inference
  forward pass at the latency batch size, tracked per ATen operator (see
  :func:`~nas.hardware.measure.measure_peak_memory_mb`); 1 MiB = 2**20 bytes.
* **latency (ms)**: median of timed batch forward passes after warm-up, on the stated
  runtime (an entry of :data:`~nas.hardware.runtimes.RUNTIMES`: ``torch`` eager CPU,
  ``onnxruntime`` CPU execution provider, ``cuda``, ...) with the stated thread count and
  batch size; the p90 is recorded beside it. With ``latency.predict`` the latency lookup
  table (:mod:`nas.hardware.latency_table`) predicts it first, and a candidate predicted
  beyond ``limit * (1 + margin)`` is rejected without a measurement; a measured candidate
  whose measurement disagrees with the prediction by more than the margin has its table
  entries re-measured and replaced (its own measurement is what the budget uses). A
  measurement over the limit is not believed at once: it is read again, under the table's
  load guard, and the lowest reading is judged (see :meth:`LatencyBudget.measure`).

Every budget is an entry of :data:`BUDGETS`, keyed by the name its value is recorded under;
:func:`make_budgets` builds one of each from the config. Adding a budget is one registered
:class:`Budget` subclass (and its ``max_<name>`` limit in the config).
"""

from __future__ import annotations

import abc
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from nas.hardware.latency_table import ATTEMPTS, BUSY_BACKOFF_S, LatencyTable
from nas.hardware.measure import count_mflops, count_params_m, measure_peak_memory_mb
from nas.hardware.runtimes import measure_latency
from nas.registry import Registry

if TYPE_CHECKING:
    from nas.config import BudgetConfig, LatencyConfig

__all__ = [
    "Budget",
    "BUDGETS",
    "MflopsBudget",
    "ParamsBudget",
    "MemoryBudget",
    "LatencyBudget",
    "Measurement",
    "BudgetReport",
    "make_budgets",
    "check_budgets",
]


@dataclass
class Measurement:
    """What :meth:`Budget.measure` returns.

    ``value`` is compared with the limit; ``extra`` holds further named values for the
    report. ``measured`` is false when ``value`` is an estimate (it is then not recorded under
    the budget's name), and ``note`` says how it was obtained; it is added to a violation.
    """

    value: float
    extra: dict[str, float] = field(default_factory=dict)
    measured: bool = True
    note: str = ""


class Budget(abc.ABC):
    """A measured quantity of a candidate with an optional upper limit.

    ``name`` is the key its value is recorded under and its :data:`BUDGETS` name; its
    limit is the config's ``max_<name>`` (see :meth:`from_config`).
    """

    name: str = ""
    unit: str = ""
    #: Relative cost of measuring it; cheaper budgets are checked first.
    cost: int = 0

    def __init__(self, limit: float | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"Budget {self.name} limit must be > 0, but got {limit}.")
        self.limit = limit

    @classmethod
    def from_config(cls, config: BudgetConfig) -> Budget:
        """This budget with the limit ``config.max_<name>`` (null: measured, not limited)."""
        return cls(getattr(config, f"max_{cls.name}"))

    @abc.abstractmethod
    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        """Measure ``model`` at input ``resolution``."""

    def describe(self) -> str:
        limit = "no limit" if self.limit is None else f"<= {self.limit:g}"
        return f"{self.name} {limit} ({self.unit})"


#: The budgets by the name their value is recorded under, in registration order.
BUDGETS: Registry[type[Budget]] = Registry("budgets")


@BUDGETS.register("params_m")
class ParamsBudget(Budget):
    name, unit, cost = "params_m", "M parameters", 0

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(count_params_m(model))


@BUDGETS.register("mflops")
class MflopsBudget(Budget):
    name, unit, cost = "mflops", "M multiply-accumulates (fvcore, batch 1)", 1

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(count_mflops(model, resolution, in_chans))


@BUDGETS.register("memory_mb")
class MemoryBudget(Budget):
    """Peak MiB of one inference forward pass (weights + activations), see :func:`measure_peak_memory_mb`."""

    name, cost = "memory_mb", 2

    def __init__(self, limit: float | None, batch_size: int = 1) -> None:
        super().__init__(limit)
        if batch_size < 1:
            raise ValueError(f"MemoryBudget batch_size must be >= 1, but got {batch_size}.")
        self.batch_size = batch_size
        self.unit = f"MiB peak of one forward pass (weights + activations), batch {batch_size}"

    @classmethod
    def from_config(cls, config: BudgetConfig) -> Budget:
        """At the latency batch size."""
        return cls(config.max_memory_mb, config.latency.batch_size)

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(measure_peak_memory_mb(model, resolution, in_chans, self.batch_size))


@BUDGETS.register("latency_ms")
class LatencyBudget(Budget):
    """Median latency on ``config.runtime``; with ``config.predict`` the lookup table predicts it first.

    A candidate predicted above ``limit * (1 + config.margin)`` is rejected without being
    measured; otherwise it is measured, and judged on that measurement. The prediction is
    recorded as ``latency_predicted_ms`` beside ``latency_ms`` (measured) and
    ``latency_p90_ms``; the table makes none for a candidate holding a piece it refused as
    noisy (see :mod:`nas.hardware.latency_table`), which is then measured. A measurement
    more than the margin away from the prediction re-measures the candidate's entries
    (:meth:`LatencyTable.reconcile`). A measurement over the limit is read again, each time
    once the table's load probe says the machine is not busy, and the lowest reading is
    judged (:meth:`_confirm`): one reading slowed by another job rejects nothing, not even
    the up-front check that some member of the space meets the budgets.
    """

    name, cost = "latency_ms", 3

    def __init__(self, limit: float | None, config: LatencyConfig) -> None:
        super().__init__(limit)
        self.config = config
        self.unit = f"ms median, {config.runtime} runtime, {config.threads} thread(s), batch {config.batch_size}"
        self._table: LatencyTable | None = None

    @classmethod
    def from_config(cls, config: BudgetConfig) -> Budget:
        """Measured as ``config.latency`` says."""
        return cls(config.max_latency_ms, config.latency)

    @property
    def table(self) -> LatencyTable:
        """The lookup table of ``config`` (opened on first use)."""
        if self._table is None:
            self._table = LatencyTable(self.config)
        return self._table

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        extra: dict[str, float] = {}
        predicted = self.table.predict(model, resolution, in_chans) if self.config.predict else None
        if predicted is not None:
            extra["latency_predicted_ms"] = predicted
            if self.limit is not None and predicted > self.limit * (1 + self.config.margin):
                note = f"predicted from the latency lookup table, not measured: more than {self.config.margin:.0%} over the limit"
                return Measurement(predicted, extra, measured=False, note=note)
        median, p90 = measure_latency(model, resolution, in_chans, self.config)
        if predicted is not None:
            self.table.reconcile(model, resolution, in_chans, predicted, median)
        note = ""
        if self.limit is not None and median > self.limit:
            median, p90, note = self._confirm(model, resolution, in_chans, median, p90)
        return Measurement(median, {"latency_p90_ms": p90, **extra}, note=note)

    def _confirm(self, model: nn.Module, resolution: int, in_chans: int, median: float, p90: float) -> tuple[float, float, str]:
        """A reading over the limit, read again under the latency table's load guard before it is believed.

        Read again once the load probe says the machine is not busy (:meth:`LatencyTable.load`, the
        guard of the table's own measurements; a busy machine is waited for up to
        :data:`~nas.hardware.latency_table.BUSY_BACKOFF_S` seconds). The lowest median is kept
        (another job only ever slows a run); a reading within the limit, or one over it taken on an
        idle machine, ends it; a machine that stays busy gets up to
        :data:`~nas.hardware.latency_table.ATTEMPTS` readings. Returns the lowest median, its p90 and a
        note of the readings (and of the load, when the machine stayed busy).
        """
        readings, busy_ratio = [median], 0.0
        for _ in range(ATTEMPTS):
            deadline = time.monotonic() + BUSY_BACKOFF_S
            probe, busy = self.table.load()
            while busy and time.monotonic() < deadline:
                time.sleep(BUSY_BACKOFF_S / 10)
                probe, busy = self.table.load()
            if busy and self.table.probe_ms:
                busy_ratio = max(busy_ratio, probe / self.table.probe_ms)
            reading, reading_p90 = measure_latency(model, resolution, in_chans, self.config)
            readings.append(reading)
            if reading < median:
                median, p90 = reading, reading_p90
            if median <= self.limit or not busy:  # within, or over it on an idle machine: believed
                break
        note = f"the lowest of {len(readings)} readings: {', '.join(f'{r:.3g}' for r in readings)} ms"
        if busy_ratio:
            note += (f"; the machine was busy (a fixed workload ran {busy_ratio:.1f}x its fastest), so the latency may be "
                     "overstated: measure again when the machine is idle")
        return median, p90, note


_RELATIVE = re.compile(r"^\s*(?:(?P<num>\d+(?:\.\d+)?)\s*/\s*(?P<den>\d+(?:\.\d+)?)|(?P<pct>\d+(?:\.\d+)?)\s*%)\s*$")


def relative_fraction(value: object) -> float | None:
    """The fraction a budget written relative to the gallery model means (``"1/10"`` -> 0.1, ``"5%"`` -> 0.05),
    or None when ``value`` is not such a string (a number is an absolute limit)."""
    if not isinstance(value, str):
        return None
    match = _RELATIVE.match(value)
    if match is None:
        return None
    if match.group("pct") is not None:
        return float(match.group("pct")) / 100
    den = float(match.group("den"))
    return float(match.group("num")) / den if den > 0 else None


def make_budgets(config: BudgetConfig) -> list[Budget]:
    """One budget of every :data:`BUDGETS` entry, cheapest first. Every quantity is measured; limits may be null."""
    budgets = [BUDGETS.get(name).from_config(config) for name in BUDGETS.names()]
    return sorted(budgets, key=lambda b: b.cost)


@dataclass
class BudgetReport:
    """What was measured, which limits were exceeded, and Optuna constraint values.

    ``constraints`` has one entry per budget, ``(value - limit) / limit`` (<= 0 means
    within budget); a budget not measured because a cheaper one already failed, or one
    without a limit, contributes 0.
    """

    values: dict[str, float]
    violations: list[str]
    constraints: list[float]
    seconds: float

    @property
    def feasible(self) -> bool:
        return not self.violations

    @property
    def reason(self) -> str:
        return "; ".join(self.violations)


def check_budgets(model: nn.Module, resolution: int, in_chans: int, budgets: Sequence[Budget], measure_all: bool = False) -> BudgetReport:
    """Measure ``budgets`` cheapest first; stop at the first exceeded limit unless ``measure_all``.

    ``seconds`` of the report is the wall-clock time of the whole check.
    """
    start = time.perf_counter()
    values: dict[str, float] = {}
    violations: list[str] = []
    constraints: list[float] = []
    for budget in budgets:
        if violations and not measure_all:
            constraints.append(0.0)
            continue
        measured = budget.measure(model, resolution, in_chans)
        if measured.measured:
            values[budget.name] = measured.value
        values.update(measured.extra)
        if budget.limit is None:
            constraints.append(0.0)
            continue
        constraints.append((measured.value - budget.limit) / budget.limit)
        if measured.value > budget.limit:
            note = f"; {measured.note}" if measured.note else ""
            violations.append(f"{budget.name} {measured.value:.3g} > limit {budget.limit:g} ({budget.unit}{note})")
    return BudgetReport(values, violations, constraints, time.perf_counter() - start)
