"""Latency runtimes: how a network is run and timed, one registered entry per runtime.

``budgets.latency.runtime`` names one entry of :data:`RUNTIMES`:

* ``torch``: the module run eagerly on the CPU;
* ``onnxruntime``: exported to ONNX (opset 18) and run by ONNX Runtime's CPU execution
  provider with every graph optimisation (``ORT_ENABLE_ALL``);
* ``cuda``: the module run eagerly on the GPU, synchronised after every run;
* ``onnxruntime-basic``: ONNX Runtime as above, with only the basic graph optimisations.

A latency is the median of ``config.repeats`` timed runs of a batch after
``config.warmup`` untimed ones, in milliseconds, with ``config.threads`` intra-op threads;
the p90 is reported beside it (:func:`median_p90`). Adding a runtime is one
:class:`Runtime` subclass registered here, plus its test: the config, the latency budget
and the latency lookup table find it through the registry.

This module is imported by :mod:`nas.config` to check runtime names, so it imports torch
but not the config (type hints only), and onnxruntime only where a session is made.
"""

from __future__ import annotations

import abc
import contextlib
import io
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.errors import BudgetError
from nas.hardware.measure import eval_mode
from nas.registry import Registry

if TYPE_CHECKING:
    import onnxruntime

    from nas.config import LatencyConfig

__all__ = [
    "Runtime",
    "RUNTIMES",
    "TorchRuntime",
    "CudaRuntime",
    "OnnxRuntime",
    "OnnxRuntimeBasic",
    "measure_latency",
    "measure_latency_of_input",
    "measure_runs_of_input",
    "load_probe_ms",
    "LatencyStats",
    "onnxruntime_session",
    "onnxruntime_version",
    "time_runs",
    "median_p90",
]

# --------------------------------------------------------------------------- shared helpers

#: ``optimization`` names of :func:`onnxruntime_session` -> ``onnxruntime.GraphOptimizationLevel`` members.
_ORT_OPTIMIZATION = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def onnxruntime_session(model: str | Path | bytes, threads: int | None = None, optimization: str = "all") -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU execution provider for an ONNX file or its bytes.

    ``threads`` None keeps ONNX Runtime's default thread pools; a number sets
    ``threads`` intra-op threads and one inter-op thread. ``optimization`` is the graph
    optimisation level: ``"all"`` (ONNX Runtime's default), ``"extended"``, ``"basic"`` or
    ``"disabled"``. Runs are sequential and only errors are logged. Every ONNX Runtime
    session of the project is made here.
    """
    if optimization not in _ORT_OPTIMIZATION:
        valid = ", ".join(repr(name) for name in _ORT_OPTIMIZATION)
        raise ValueError(f"ONNX Runtime optimization must be one of {valid}, but got {optimization!r}.")
    # Deferred: onnxruntime is a heavy optional dependency, imported only to make a session.
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_OPTIMIZATION[optimization])
    options.log_severity_level = 3  # errors only: no "removing initializer" chatter
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime version, or None when it is not installed."""
    try:
        # Deferred: onnxruntime is a heavy optional dependency.
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def time_runs(run: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Call ``run`` ``warmup`` times untimed, then ``repeats`` times timed: milliseconds per run.

    ``run`` must finish its work before it returns (synchronise a GPU inside it).
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_p90(times: Sequence[float]) -> tuple[float, float]:
    """The median and the 90th percentile (numpy's linear interpolation) of ``times``, same unit."""
    return statistics.median(times), float(np.percentile(times, 90))


@dataclass(frozen=True)
class LatencyStats:
    """Median, 10th and 90th percentile (numpy's linear interpolation) of timed runs, in milliseconds.

    ``spread`` is ``median / p10 - 1``: how far the median sits above the fastest tenth of
    the runs, as a fraction. A few slow runs (a preemption, a page fault) raise the p90 but
    not the median, and leave it near 0; it grows when more than half of the runs were
    slowed but not all of them, which is when the median itself is wrong. (A slowdown of
    every run, another job holding the cores throughout, leaves it near 0 as well: the
    lookup table's load probe is there for that.)
    """

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, times: Sequence[float]) -> LatencyStats:
        p10, p90 = np.percentile(times, [10, 90])
        return cls(statistics.median(times), float(p10), float(p90))

    @property
    def spread(self) -> float:
        return self.median / self.p10 - 1 if self.p10 > 0 else float("inf")


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """``n`` torch intra-op threads inside the block; the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- runtimes


class Runtime(abc.ABC):
    """A way to run a model and time it, named by ``budgets.latency.runtime``.

    :meth:`times` is the contract; :meth:`overhead_probe` and :meth:`header` serve the
    latency lookup table (:mod:`nas.hardware.latency_table`).
    """

    @abc.abstractmethod
    def times(self, model: nn.Module, input_shape: tuple[int, ...], config: LatencyConfig) -> list[float]:
        """Milliseconds of ``config.repeats`` timed runs of ``model`` on a random input of ``input_shape``.

        ``config.warmup`` untimed runs come first, with ``config.threads`` intra-op threads.
        The module's training mode is restored and it is left on the CPU; a runtime that
        cannot run here raises :class:`~nas.errors.BudgetError`.
        """

    def overhead_probe(self) -> nn.Module:
        """A near-empty module whose latency is the runtime's fixed cost of one call."""
        return nn.Identity()

    def header(self) -> dict[str, Any]:
        """What this runtime's latencies depend on beyond the common table header (e.g. the GPU)."""
        return {}


class TorchRuntime(Runtime):
    """``torch``: the module run eagerly on the CPU, under ``torch.inference_mode``, in eval mode.

    The overhead probe is an ``nn.Identity`` module: the module call itself, ~0.7 us on one
    CPU thread, next to pieces of tens of microseconds or more.
    """

    def device(self, config: LatencyConfig) -> torch.device:
        """Where the module runs."""
        return torch.device("cpu")

    def synchronize(self) -> None:
        """Wait until the device has finished (nothing to wait for on the CPU)."""

    def times(self, model: nn.Module, input_shape: tuple[int, ...], config: LatencyConfig) -> list[float]:
        device = self.device(config)
        model.to(device)
        x = torch.randn(input_shape, device=device)

        def run() -> None:
            model(x)
            self.synchronize()

        try:
            with eval_mode(model), _threads(config.threads), torch.inference_mode():
                return time_runs(run, config.warmup, config.repeats)
        finally:
            model.cpu()


class CudaRuntime(TorchRuntime):
    """``cuda``: the module run eagerly on the GPU, synchronised after every run; the table header names the GPU."""

    def device(self, config: LatencyConfig) -> torch.device:
        if not torch.cuda.is_available():
            raise BudgetError(
                f"budgets.latency.runtime is {config.runtime!r} but no CUDA device is available; use runtime 'torch' or 'onnxruntime' (CPU)."
            )
        return torch.device("cuda")

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def header(self) -> dict[str, Any]:
        return {"gpu": torch.cuda.get_device_name()} if torch.cuda.is_available() else {}


class OnnxRuntime(Runtime):
    """``onnxruntime``: exported in memory to ONNX (opset 18), run by ONNX Runtime's CPU execution provider.

    The legacy exporter is used (~0.2 s vs ~3 s for dynamo). The graph optimisation level
    is :attr:`optimization` (see :func:`onnxruntime_session`).

    The overhead probe is one 1x1 convolution of a single pixel: ONNX Runtime skips most of
    its executor for a graph without a real node, so an identity graph (~3.5 us)
    under-states the fixed cost of a ``run`` (~4.1 us, the same as the per-piece difference
    between the sum of a net's pieces and the whole net).
    """

    optimization = "all"

    def times(self, model: nn.Module, input_shape: tuple[int, ...], config: LatencyConfig) -> list[float]:
        if onnxruntime_version() is None:
            raise BudgetError(
                f"budgets.latency.runtime is {config.runtime!r} but onnxruntime is not installed; install it or use runtime 'torch'."
            )
        x = torch.randn(input_shape)
        session = onnxruntime_session(_onnx_bytes(model, x), config.threads, self.optimization)
        feed = {session.get_inputs()[0].name: x.numpy()}
        return time_runs(lambda: session.run(None, feed), config.warmup, config.repeats)

    def overhead_probe(self) -> nn.Module:
        return nn.Conv2d(1, 1, 1)


class OnnxRuntimeBasic(OnnxRuntime):
    """``onnxruntime-basic``: ONNX Runtime's CPU execution provider with only the basic graph optimisations.

    ``ORT_ENABLE_BASIC`` keeps the semantics-preserving rewrites every execution provider
    gets (constant folding, redundant-node elimination, conv + add / mul / batch-norm
    fusion) and leaves out the extended fusions (e.g. conv + activation) and the layout
    optimisations (NCHWc) that ``ORT_ENABLE_ALL`` adds on the CPU; see "Graph Optimizations
    in ONNX Runtime", https://onnxruntime.ai/docs/performance/model-optimizations/graph-optimizations.html.
    Its latencies stand for a deployment without those CPU-specific fusions (another
    execution provider, a minimal build), and show what they buy a candidate. Its lookup
    table is a file of its own; everything else is as for ``onnxruntime``.
    """

    optimization = "basic"


#: The latency runtimes by ``budgets.latency.runtime`` name, in the order the config lists them.
RUNTIMES: Registry[Runtime] = Registry("budgets.latency.runtime")
RUNTIMES.add("torch", TorchRuntime())
RUNTIMES.add("onnxruntime", OnnxRuntime())
RUNTIMES.add("cuda", CudaRuntime())
RUNTIMES.add("onnxruntime-basic", OnnxRuntimeBasic())


def _onnx_bytes(model: nn.Module, x: torch.Tensor) -> bytes:
    """``model`` exported to ONNX (opset 18, legacy exporter) for input ``x``, in eval mode; left on the CPU."""
    buffer = io.BytesIO()
    model.cpu()
    with eval_mode(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=18)
    return buffer.getvalue()


# --------------------------------------------------------------------------- measuring


def measure_latency(model: nn.Module, resolution: int, in_chans: int, config: LatencyConfig) -> tuple[float, float]:
    """Median and p90 milliseconds of a forward pass of ``config.batch_size`` images on ``config.runtime``."""
    return measure_latency_of_input(model, (config.batch_size, in_chans, resolution, resolution), config)


def measure_latency_of_input(model: nn.Module, input_shape: Sequence[int], config: LatencyConfig) -> tuple[float, float]:
    """Median and p90 milliseconds of ``model`` on a random input of ``input_shape`` (batch first).

    ``config.runtime`` names the :data:`RUNTIMES` entry that runs it (``torch`` eagerly on
    the CPU, ``cuda`` on the GPU, synchronised; ``onnxruntime`` exported to ONNX and run with
    ONNX Runtime's CPU execution provider); ``config.threads`` intra-op threads,
    ``config.warmup`` untimed then ``config.repeats`` timed runs. The module's training mode
    is restored and it is left on the CPU.
    """
    return median_p90(measure_runs_of_input(model, input_shape, config))


def measure_runs_of_input(model: nn.Module, input_shape: Sequence[int], config: LatencyConfig) -> list[float]:
    """Milliseconds of each of the ``config.repeats`` timed runs that :func:`measure_latency_of_input` summarises."""
    shape = tuple(int(n) for n in input_shape)
    return RUNTIMES.get(config.runtime).times(model, shape, config)


#: The load probe's fixed workload: a 3x3 convolution of 16 channels on a 32x32 input (2.4 M
#: multiply-accumulates, ~0.12 ms on one thread of a 2020s laptop core).
_PROBE_INPUT, _PROBE_WEIGHT = (1, 16, 32, 32), (16, 16, 3, 3)


def load_probe_ms(threads: int) -> float:
    """Median milliseconds of 15 runs (after 3 warm-up) of a fixed convolution: how busy this machine is now.

    The same work every time, run eagerly by torch on the CPU with ``threads`` intra-op
    threads, so its time changes only with what else the machine is doing (another job on
    the cores slows it as it slows every latency measurement). It draws no random numbers.
    """
    x, weight = torch.ones(_PROBE_INPUT), torch.full(_PROBE_WEIGHT, 0.01)
    with _threads(threads), torch.inference_mode():
        return statistics.median(time_runs(lambda: F.conv2d(x, weight, padding=1), 3, 15))
