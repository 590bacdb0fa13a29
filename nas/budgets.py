"""Hardware budgets: measured quantities with limits, checked cheapest first.

Units:

* **MFLOPs**: millions of multiply-accumulates of conv / linear / matmul as fvcore counts
  them (batch 1, at the candidate's input resolution). Batch-norm, pooling and
  element-wise operations are not counted: the MobileNet/EfficientNet "MAdds" convention.
* **params (M)**: millions of parameters (all, including the embedding layer).
* **memory (MiB)**: peak memory of one inference forward pass: bytes of parameters and
  buffers plus the peak bytes of live tensors (input and activations) of an inference
  forward pass at the latency batch size, tracked per ATen operator (see
  :func:`measure_peak_memory_mb`); 1 MiB = 2**20 bytes.
* **latency (ms)**: median of timed batch forward passes after warm-up, on the stated
  runtime (``torch`` eager CPU, ``onnxruntime`` CPU execution provider, ``cuda``) with the
  stated thread count and batch size; the p90 is recorded beside it. With
  ``latency.predict`` the latency lookup table (:mod:`nas.latency_table`) predicts it first,
  and a candidate predicted beyond ``limit * (1 + margin)`` is rejected without a measurement.
"""

from __future__ import annotations

import abc
import contextlib
import io
import statistics
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nas.config import BudgetConfig, LatencyConfig
from nas.errors import BudgetError

if TYPE_CHECKING:
    from nas.latency_table import LatencyTable

__all__ = [
    "Budget",
    "MflopsBudget",
    "ParamsBudget",
    "MemoryBudget",
    "LatencyBudget",
    "Measurement",
    "BudgetReport",
    "make_budgets",
    "check_budgets",
    "count_mflops",
    "count_params_m",
    "measure_latency",
    "measure_latency_of_input",
    "measure_peak_memory_mb",
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
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own mode.

    Per submodule, because a piece of a network (a fresh ``nn.Sequential`` around the net's
    own layers) may be in another mode than the layers it holds.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_latency(model: nn.Module, resolution: int, in_chans: int, config: LatencyConfig) -> tuple[float, float]:
    """Median and p90 milliseconds of a forward pass of ``config.batch_size`` images on ``config.runtime``."""
    return measure_latency_of_input(model, (config.batch_size, in_chans, resolution, resolution), config)


def measure_latency_of_input(model: nn.Module, input_shape: Sequence[int], config: LatencyConfig) -> tuple[float, float]:
    """Median and p90 milliseconds of ``model`` on a random input of ``input_shape`` (batch first).

    ``config.runtime`` ``torch`` runs the module eagerly on the CPU, ``cuda`` on the GPU
    (synchronised), ``onnxruntime`` exports it to ONNX (opset 18) and runs it with ONNX
    Runtime's CPU execution provider; ``config.threads`` intra-op threads, ``config.warmup``
    untimed then ``config.repeats`` timed runs. The module's training mode is restored and it
    is left on the CPU.
    """
    shape = tuple(int(n) for n in input_shape)
    if config.runtime == "onnxruntime":
        times = _onnxruntime_times(model, shape, config)
    else:
        times = _torch_times(model, shape, config)
    return statistics.median(times), float(np.percentile(times, 90))


def _torch_times(model: nn.Module, shape: tuple[int, ...], config: LatencyConfig) -> list[float]:
    if config.runtime == "cuda" and not torch.cuda.is_available():
        raise BudgetError("budgets.latency.runtime is 'cuda' but no CUDA device is available; use runtime 'torch' or 'onnxruntime' (CPU).")
    device = torch.device("cuda" if config.runtime == "cuda" else "cpu")
    model.to(device)
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        with _eval_mode(model), _threads(config.threads), torch.inference_mode():
            for _ in range(config.warmup):
                model(x)
            sync()
            for _ in range(config.repeats):
                start = time.perf_counter()
                model(x)
                sync()
                times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.cpu()
    return times


def _onnxruntime_session(model: nn.Module, x: torch.Tensor, threads: int):
    """An ONNX Runtime CPU session of ``model`` exported in memory (legacy exporter: ~0.2 s vs ~3 s for dynamo)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BudgetError("budgets.latency.runtime is 'onnxruntime' but onnxruntime is not installed; install it or use runtime 'torch'.") from None
    buffer = io.BytesIO()
    model.cpu()
    with _eval_mode(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=18)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: no "removing initializer" chatter
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _onnxruntime_times(model: nn.Module, shape: tuple[int, ...], config: LatencyConfig) -> list[float]:
    x = torch.randn(shape)
    session = _onnxruntime_session(model, x, config.threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(config.warmup):
        session.run(None, feed)
    times = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return times


class _StorageTracker(TorchDispatchMode):
    """Bytes of the tensor storages alive now, and the most alive at once.

    Every operator output's storage is counted the first time it is seen and uncounted when
    it dies (a weakref callback on the storage), so in-place operators and views, which
    return an existing storage, allocate nothing. Workspace an operator frees before it
    returns is not seen: the granularity is one ATen operator.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, storage: torch.UntypedStorage, counted: bool = True) -> None:
        key = id(storage)
        if key in self._live:
            return
        nbytes = storage.nbytes() if counted else 0

        def died(_ref: weakref.ref, key: int = key, nbytes: int = nbytes) -> None:
            self._live.pop(key, None)
            self.current -= nbytes

        self._live[key] = weakref.ref(storage, died)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.track(t.untyped_storage())
        return out


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(seen.values())


def measure_peak_memory_mb(model: nn.Module, resolution: int, in_chans: int, batch_size: int = 1) -> float:
    """Peak MiB (2**20 bytes) of one inference forward pass of ``batch_size`` images.

    Bytes of the parameters and buffers (each storage once) plus the peak bytes of live
    tensors during an eval-mode ``torch.inference_mode`` forward: the input, every
    activation from when its operator returns until nothing references it, and the output.
    Tracked per ATen operator on the model's device (see :class:`_StorageTracker`); allocator
    rounding, operator workspaces and the runtime's own memory are not included.
    """
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    weights = _storage_bytes(iter(tensors))
    x = torch.zeros(batch_size, in_chans, resolution, resolution, device=device)
    tracker = _StorageTracker()
    with _eval_mode(model), torch.inference_mode(), tracker:
        for t in tensors:
            tracker.track(t.untyped_storage(), counted=False)
        tracker.track(x.untyped_storage())
        model(x)
    return (weights + tracker.peak) / 2**20


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


class MemoryBudget(Budget):
    """Peak MiB of one inference forward pass (weights + activations), see :func:`measure_peak_memory_mb`."""

    name, cost = "memory_mb", 2

    def __init__(self, limit: float | None, batch_size: int = 1) -> None:
        super().__init__(limit)
        if batch_size < 1:
            raise ValueError(f"MemoryBudget batch_size must be >= 1, but got {batch_size}.")
        self.batch_size = batch_size
        self.unit = f"MiB peak of one forward pass (weights + activations), batch {batch_size}"

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        return Measurement(measure_peak_memory_mb(model, resolution, in_chans, self.batch_size))


class LatencyBudget(Budget):
    """Median latency on ``config.runtime``; with ``config.predict`` the lookup table predicts it first.

    A candidate predicted above ``limit * (1 + config.margin)`` is rejected without being
    measured; otherwise it is measured. The prediction is recorded as
    ``latency_predicted_ms`` beside ``latency_ms`` (measured) and ``latency_p90_ms``.
    """

    name, cost = "latency_ms", 3

    def __init__(self, limit: float | None, config: LatencyConfig) -> None:
        super().__init__(limit)
        self.config = config
        self.unit = f"ms median, {config.runtime} runtime, {config.threads} thread(s), batch {config.batch_size}"
        self._table: LatencyTable | None = None

    @property
    def table(self) -> LatencyTable:
        """The lookup table of ``config`` (opened on first use)."""
        if self._table is None:
            from nas.latency_table import LatencyTable

            self._table = LatencyTable(self.config)
        return self._table

    def measure(self, model: nn.Module, resolution: int, in_chans: int) -> Measurement:
        extra: dict[str, float] = {}
        if self.config.predict:
            predicted = self.table.predict(model, resolution, in_chans)
            extra["latency_predicted_ms"] = predicted
            if self.limit is not None and predicted > self.limit * (1 + self.config.margin):
                note = f"predicted from the latency lookup table, not measured: more than {self.config.margin:.0%} over the limit"
                return Measurement(predicted, extra, measured=False, note=note)
        median, p90 = measure_latency(model, resolution, in_chans, self.config)
        return Measurement(median, {"latency_p90_ms": p90, **extra})


def make_budgets(config: BudgetConfig) -> list[Budget]:
    """The budgets of ``config``, cheapest first. Every quantity is measured; limits may be null."""
    budgets: list[Budget] = [
        ParamsBudget(config.max_params_m),
        MflopsBudget(config.max_mflops),
        MemoryBudget(config.max_memory_mb, config.latency.batch_size),
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
