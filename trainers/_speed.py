"""How a training step uses the hardware: numeric precision, memory format, compilation.

:class:`Speed` is what :func:`trainers.train_compatible` and the supernet's training take:

* ``precision``: ``float32``; ``bfloat16`` (autocast: convolutions and matrix products in
  bfloat16, weights, optimizer and loss in float32; on CPUs with AVX-512 BF16 or AMX, and on
  GPUs that have it); ``float16`` (CUDA only, with a gradient scaler against underflow);
* ``channels_last``: the model and its input batches in NHWC memory format;
* ``compile``: the model wrapped by ``torch.compile`` (its compile time is paid once per
  model, so once per trial).

The network's output is cast to float32 before the loss, so every loss sees float32
embeddings whatever the precision. :func:`resolve_precision` turns ``auto`` into a concrete
choice per device (see ``experiments/benchmarks/train_speed.py`` for the measurements the
CPU default follows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Speed", "PRECISIONS", "resolve_precision", "CPU_DEFAULT_PRECISION"]

PRECISIONS = ("float32", "bfloat16", "float16")
#: ``auto`` on a CPU (experiments/benchmarks/train_speed.py, 2-core AMD EPYC with AVX-512 BF16: bfloat16
#: autocast trained the query networks of this project at 0.43-1.22x the speed of float32, the quickstart's
#: small grey network at half; channels-last was the setting that paid, 1.05-1.5x).
CPU_DEFAULT_PRECISION = "float32"


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` with ``auto`` resolved for ``device``: bfloat16 on a CUDA device that supports it, else
    float16 there; :data:`CPU_DEFAULT_PRECISION` on a CPU. ``float16`` on a CPU is a ``ValueError``."""
    device = torch.device(device)
    if precision not in (*PRECISIONS, "auto"):
        raise ValueError(f"precision must be one of {('auto', *PRECISIONS)}, but got {precision!r}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return CPU_DEFAULT_PRECISION
    if precision == "float16" and device.type != "cuda":
        raise ValueError("precision float16 needs a CUDA device; on a CPU use bfloat16 or float32 (train.precision).")
    return precision


@dataclass(frozen=True)
class Speed:
    """Precision, memory format and compilation of one training run (see the module docstring)."""

    precision: str = "float32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} (resolve 'auto' first), but got {self.precision!r}.")

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """The forward pass's context: autocast to the precision, or nothing for float32."""
        if self.precision == "float32":
            yield
            return
        with torch.autocast(device_type=device.type, dtype=getattr(torch, self.precision)):
            yield

    def scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """A gradient scaler for float16 on CUDA; ``None`` otherwise (bfloat16 has float32's range)."""
        return torch.amp.GradScaler("cuda") if self.precision == "float16" and device.type == "cuda" else None

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in the memory format (in place) and, with ``compile``, the compiled module that calls it."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in the memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x
