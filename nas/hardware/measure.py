"""What a network costs without running it on a runtime: MACs, parameters, peak memory.

Units:

* **MFLOPs**: millions of multiply-accumulates of conv / linear / matmul as fvcore counts
  them (batch 1, at the candidate's input resolution). Batch-norm, pooling and
  element-wise operations are not counted: the MobileNet/EfficientNet "MAdds" convention.
* **params (M)**: millions of parameters (all, including the embedding layer).
* **memory (MiB)**: peak memory of one inference forward pass: bytes of parameters and
  buffers plus the peak bytes of live tensors (input and activations) of an inference
  forward pass, tracked per ATen operator (see :func:`measure_peak_memory_mb`);
  1 MiB = 2**20 bytes.

Latency, which needs a runtime, is in :mod:`nas.hardware.runtimes`.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["count_mflops", "count_params_m", "measure_peak_memory_mb", "eval_mode"]

#: fvcore operator names kept: the multiply-accumulate ops of conv, linear and matmul.
_COUNTED = ("conv", "addmm", "bmm", "einsum", "matmul", "mm", "linear")


def count_mflops(model: nn.Module, resolution: int, in_chans: int) -> float:
    """Millions of multiply-accumulates (fvcore) of one batch-1 forward pass at ``resolution``.

    Only conv / linear / matmul operators count (see the module docstring); the model's
    training mode is restored.
    """
    # Deferred: fvcore is a heavy third-party import that only MAC counting needs.
    with warnings.catch_warnings():
        # fvcore.nn scripts its focal loss with torch.jit.script when imported (deprecated in torch); MAC counting never uses it
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
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
    return float(sum(v for k, v in by_op.items() if k in _COUNTED)) / 1e6


def count_params_m(model: nn.Module) -> float:
    """Millions of parameters."""
    return sum(p.numel() for p in model.parameters()) / 1e6


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
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
    with eval_mode(model), torch.inference_mode(), tracker:
        for t in tensors:
            tracker.track(t.untyped_storage(), counted=False)
        tracker.track(x.untyped_storage())
        model(x)
    return (weights + tracker.peak) / 2**20
