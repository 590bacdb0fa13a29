"""Latency lookup table: per-piece latencies measured once per machine and configuration.

A network that offers ``pieces()`` (a list of modules whose sequential composition is its
forward pass; :class:`search_spaces.QueryNet` does) is cut into those pieces; a network
without it is one piece. Each piece's latency at its input shape is measured once, on the
configured runtime, and stored under a key hashed from

* ``repr(piece)``: timm and torch modules spell out channels, kernels, strides, groups,
  normalisation and activations,
* the plain attributes (numbers, strings, booleans) of its submodules that the repr does
  not show, such as timm's ``has_skip``, and
* its input shape (batch first),

so one table serves every search space. A candidate's latency is then predicted without
running it: the sum of its pieces' latencies, less the runtime's per-call overhead (timed
once on a near-empty graph, see :meth:`LatencyTable.overhead`) for every piece but one, so
the prediction is not the sum of N calls' overheads.

A table is one JSON file per (runtime, threads, batch size, host), by default in
``$XDG_CACHE_HOME/asymnas/latency`` (or ``~/.cache/asymnas/latency``), with a header that
records runtime, threads, batch size, torch and onnxruntime versions, the CPU model (and
the GPU for ``cuda``) and the host name. A file whose header differs from the current one
is not used: the table starts fresh and replaces it on the next save. Workers on one
machine may share the file; saving merges under a file lock and replaces it atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.hardware.runtimes import RUNTIMES, measure_latency_of_input, onnxruntime_version
from nas.locks import file_lock

if TYPE_CHECKING:
    from nas.config import LatencyConfig

__all__ = ["LatencyTable", "default_table_dir", "default_table_path", "machine_header", "piece_key", "split_pieces"]

TABLE_FORMAT = 1
_PLAIN = (bool, int, float, str, type(None))


def default_table_dir() -> Path:
    """``$XDG_CACHE_HOME/asymnas/latency``, or ``~/.cache/asymnas/latency``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "asymnas" / "latency"


def _host() -> str:
    return socket.gethostname() or platform.node() or "unknown-host"


def default_table_path(config: LatencyConfig) -> Path:
    """``<table_dir>/<runtime>-<threads>t-b<batch>-<host>.json`` (``table_dir`` null: :func:`default_table_dir`)."""
    folder = Path(config.table_dir) if config.table_dir else default_table_dir()
    host = re.sub(r"[^A-Za-z0-9._-]", "_", _host())
    return folder / f"{config.runtime}-{config.threads}t-b{config.batch_size}-{host}.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def machine_header(config: LatencyConfig) -> dict[str, Any]:
    """What a table's latencies depend on; a table whose header differs is not used.

    The common entries, plus what the runtime adds (:meth:`Runtime.header`, e.g. the GPU of ``cuda``).
    """
    return {
        "format": TABLE_FORMAT,
        "runtime": config.runtime,
        "threads": config.threads,
        "batch_size": config.batch_size,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime_version(),
        "cpu": _cpu_model(),
        "host": _host(),
        **RUNTIMES.get(config.runtime).header(),
    }


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def piece_key(piece: nn.Module, input_shape: Sequence[int]) -> str:
    """Hash of ``repr(piece)``, its submodules' plain attributes the repr may not show, and ``input_shape``."""
    attrs = [
        [name, type(m).__qualname__, {k: v for k, v in sorted(vars(m).items()) if not k.startswith("_") and k != "training" and _plain(v)}]
        for name, m in piece.named_modules()
    ]
    text = "\n".join([repr(piece), json.dumps(attrs, default=str), json.dumps([int(n) for n in input_shape])])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def split_pieces(model: nn.Module) -> list[nn.Module]:
    """``model.pieces()`` when the model offers it, else the model as a single piece."""
    pieces = getattr(model, "pieces", None)
    return list(pieces()) if callable(pieces) else [model]


def _input_shapes(pieces: Sequence[nn.Module], first: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The input shape of every piece, found by running the chain once on zeros."""
    modes = [(m, m.training) for p in pieces for m in p.modules()]
    shapes = []
    device = next((t.device for p in pieces for t in p.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            x = torch.zeros(first, device=device)
            for piece in pieces:
                piece.eval()
                shapes.append(tuple(x.shape))
                x = piece(x)
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes


class LatencyTable:
    """Per-piece latencies of ``config`` on this machine, cached in the JSON file ``path``.

    ``path`` null means :func:`default_table_path`. A file that is unreadable or whose
    header differs from :func:`machine_header` is reported through ``log`` (its reason is
    kept in ``stale_reason``) and not used. ``measured`` counts the pieces this object has
    measured.
    """

    def __init__(self, config: LatencyConfig, path: str | Path | None = None, log: Callable[[str], None] | None = print) -> None:
        self.config = config
        self.path = Path(path) if path is not None else default_table_path(config)
        self.header = machine_header(config)
        self.entries: dict[str, dict[str, Any]] = {}
        self.overhead_ms: float | None = None
        self.measured = 0
        self.stale_reason: str | None = None
        self._log = log or (lambda message: None)
        data, reason = self._read()
        if reason is not None:
            self.stale_reason = reason
            self._log(f"Latency table {self.path} is {reason}; starting a fresh one (it is replaced on the next save).")
        elif data is not None:
            self._merge(data)

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ file
    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """The file's contents if it can be used, else ``(None, reason)``; ``(None, None)`` if absent."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as exc:
            return None, f"unreadable ({type(exc).__name__}: {exc})"
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict) or not isinstance(data.get("header"), dict):
            return None, "unreadable (not a latency table)"
        if data["header"] != self.header:
            keys = sorted(set(data["header"]) | set(self.header))
            differ = [k for k in keys if data["header"].get(k) != self.header.get(k)]
            return None, f"for another machine or configuration (its header differs in: {', '.join(differ)})"
        return data, None

    def _merge(self, data: dict[str, Any]) -> None:
        for key, entry in data["entries"].items():
            if isinstance(entry, dict) and isinstance(entry.get("ms"), (int, float)) and entry["ms"] >= 0:
                self.entries.setdefault(key, entry)
        if self.overhead_ms is None and isinstance(data.get("overhead_ms"), (int, float)):
            self.overhead_ms = float(data["overhead_ms"])

    def reload(self) -> None:
        """Add the entries other workers have saved since this table was read."""
        data, _ = self._read()
        if data is not None:
            self._merge(data)

    def save(self) -> None:
        """Merge with the file (under a file lock) and replace it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self.reload()  # a file with another header is replaced, never mixed in
            data = {"header": self.header, "overhead_ms": self.overhead_ms, "entries": self.entries}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    # ------------------------------------------------------------------ measuring
    def overhead(self) -> float:
        """Milliseconds of one call of the runtime on a near-empty graph (measured once per table).

        The graph is the runtime's :meth:`Runtime.overhead_probe`: for ``torch`` and ``cuda``
        an ``nn.Identity`` module (the module call itself, ~0.7 us on one CPU thread, next to
        pieces of tens of microseconds or more); for ``onnxruntime`` one 1x1 convolution of a
        single pixel. ONNX Runtime skips most of its executor for a graph without a real node,
        so an identity graph (~3.5 us) under-states the fixed cost of a ``run`` (~4.1 us, the
        same as the per-piece difference between the sum of a net's pieces and the whole net).
        """
        if self.overhead_ms is None:
            config = replace(self.config, warmup=max(self.config.warmup, 20), repeats=max(self.config.repeats, 200))
            probe = RUNTIMES.get(self.config.runtime).overhead_probe()
            self.overhead_ms = measure_latency_of_input(probe, (self.config.batch_size, 1, 1, 1), config)[0]
        return self.overhead_ms

    def predict(self, model: nn.Module, resolution: int, in_chans: int) -> float:
        """Predicted median milliseconds of ``model`` at ``resolution`` (batch ``config.batch_size``).

        Pieces not yet in the table are measured and the table is saved. The prediction is
        the sum of the pieces' medians less :meth:`overhead` for every piece but one, and at
        least the slowest piece's median.
        """
        pieces = split_pieces(model)
        shapes = _input_shapes(pieces, (self.config.batch_size, in_chans, resolution, resolution))
        keys = [piece_key(p, s) for p, s in zip(pieces, shapes)]
        if any(k not in self.entries for k in keys):
            self.reload()
        new = False
        for piece, shape, key in zip(pieces, shapes, keys):
            if key in self.entries:
                continue
            median, p90 = measure_latency_of_input(piece, shape, self.config)
            self.measured += 1
            self.entries[key] = {"ms": median, "p90_ms": p90, "piece": type(piece).__name__, "input": list(shape), "at": time.time()}
            new = True
        overhead_known = self.overhead_ms is not None
        overhead = self.overhead()
        if new or not overhead_known:
            self.save()
        times = [self.entries[k]["ms"] for k in keys]
        return max(sum(times) - (len(times) - 1) * overhead, max(times))
