"""Hardware budgets: measured quantities with limits, checked cheapest first.

Units:

* **MFLOPs**: millions of multiply-accumulates of conv / linear / matmul as fvcore counts
  them (batch 1, at the candidate's input resolution). Batch-norm, pooling and
  element-wise operations are not counted: the MobileNet/EfficientNet "MAdds" convention.
* **params (M)**: millions of parameters (all, including the embedding layer).
* **latency (ms)**: median of timed batch forward passes after warm-up, on the stated
  runtime with the stated thread count and batch size; the p90 is recorded beside it.
"""

from __future__ import annotations

import abc
import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from nas.config import BudgetConfig, LatencyConfig
from nas.errors import BudgetError

__all__ = [
    "Budget",
    "MflopsBudget",
    "ParamsBudget",
    "LatencyBudget",
    "BudgetReport",
    "make_budgets",
    "check_budgets",
    "count_mflops",
    "count_params_m",
    "measure_latency",
]

# fvcore op handles kept: the multiply-accumulate ops of conv, linear and matmul.
_MAC_OPS = ("aten::_convolution", "aten::addmm", "aten::bmm", "aten::einsum", "aten::matmul", "aten::mm", "aten::linear")


def count_mflops(model: nn.Module, resolution: int, in_chans: int) -> float:
    """Millions of multiply-accumulates (fvcore) of one batch-1 forward pass at ``resolution``."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, resolution, resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        by_op = analysis.by_operator()
    model.train(was_training)
    counted = ("conv", "addmm", "bmm", "einsum", "matmul", "mm", "linear")
    return float(sum(v for k, v in by_op.items() if k in counted)) / 1e6


def count_params_m(model: nn.Module) -> float:
    """Millions of parameters."""
    return sum(p.numel() for p in model.parameters()) / 1e6


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(model: nn.Module, resolution: int, in_chans: int, config: LatencyConfig) -> tuple[float, float]:
    """Median and p90 milliseconds of a forward pass of ``config.batch_size`` images."""
    if config.runtime == "cuda" and not torch.cuda.is_available():
        raise BudgetError("budgets.latency.runtime is 'cuda' but no CUDA device is available; use runtime 'torch' (CPU).")
    device = torch.device("cuda" if config.runtime == "cuda" else "cpu")
    was_training = model.training
    model.eval().to(device)
    x = torch.randn(config.batch_size, in_chans, resolution, resolution, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with _threads(config.threads), torch.inference_mode():
        for _ in range(config.warmup):
            model(x)
        sync()
        for _ in range(config.repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    model.cpu().train(was_training)
    return statistics.median(times), float(np.percentile(times, 90))


@dataclass
class Measurement:
    value: float
    extra: dict[str, float] = field(default_factory=dict)


class Budget(abc.ABC):
    """A measured quantity of a candidate with an optional upper limit."""

    name: str = ""
    unit: str = ""
    #: Relative cost of measuring it; cheaper budgets are checked first.
    cost: int = 0

    def __init__(self, limit: float | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError(f"Budget {self.name} limit must be > 0, but got {limit}.")
        self.limit = limit

    @abc.abstractmethod
    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        """Measure ``model`` at input ``resolution``."""

    def describe(self) -> str:
        limit = "no limit" if self.limit is None else f"<= {self.limit:g}"
        return f"{self.name} {limit} ({self.unit})"


class ParamsBudget(Budget):
    name, unit, cost = "params_m", "M parameters", 0

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(count_params_m(model))


class MflopsBudget(Budget):
    name, unit, cost = "mflops", "M multiply-accumulates (fvcore, batch 1)", 1

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(count_mflops(model, resolution, in_chans))


class LatencyBudget(Budget):
    name, cost = "latency_ms", 2

    def __init__(self, limit: float | None, config: LatencyConfig) -> None:
        super().__init__(limit)
        self.config = config
        self.unit = f"ms median, {config.runtime} runtime, {config.threads} thread(s), batch {config.batch_size}"

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        median, p90 = measure_latency(model, resolution, in_chans, self.config)
        return Measurement(median, {"latency_p90_ms": p90})


def make_budgets(config: BudgetConfig) -> list[Budget]:
    """The budgets of ``config``, cheapest first. Every quantity is measured; limits may be null."""
    budgets: list[Budget] = [
        ParamsBudget(config.max_params_m),
        MflopsBudget(config.max_mflops),
        LatencyBudget(config.max_latency_ms, config.latency),
    ]
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
    """Measure ``budgets`` cheapest first; stop at the first exceeded limit unless ``measure_all``."""
    start = time.perf_counter()
    values: dict[str, float] = {}
    violations: list[str] = []
    constraints: list[float] = []
    for budget in budgets:
        if violations and not measure_all:
            constraints.append(0.0)
            continue
        measured = budget.measure(model, resolution, in_chans)
        values[budget.name] = measured.value
        values.update(measured.extra)
        if budget.limit is None:
            constraints.append(0.0)
            continue
        constraints.append((measured.value - budget.limit) / budget.limit)
        if measured.value > budget.limit:
            violations.append(f"{budget.name} {measured.value:.3g} > limit {budget.limit:g} ({budget.unit})")
    return BudgetReport(values, violations, constraints, time.perf_counter() - start)
