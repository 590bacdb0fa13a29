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
once on a near-empty graph, see :meth:`LatencyTable._measure_overhead`) for every piece but one, so
the prediction is not the sum of N calls' overheads.

A table is one JSON file per (runtime, threads, batch size, host), by default in
``$XDG_CACHE_HOME/asymnas/latency`` (or ``~/.cache/asymnas/latency``), with a header that
records the table format, runtime, threads, batch size, torch and onnxruntime versions, the
CPU model (and the GPU for ``cuda``) and the host name. A file whose header differs from
the current one is not used: the table starts fresh and replaces it on the next save. Workers
on one machine may share the file; saving merges under a file lock (of two entries of one
piece the newer wins) and replaces it atomically.

A measurement taken while another job loads the machine is not stored (format 2; a format-1
file, whose entries record neither, is not trusted and is re-measured piece by piece):

* **dispersion**: each piece is timed up to :data:`ATTEMPTS` times and the least noisy
  timing is kept; its ``spread`` (median / 10th percentile - 1, see
  :class:`~nas.hardware.runtimes.LatencyStats`) is stored, and a piece whose spread stays
  above :data:`MAX_SPREAD` is refused: not stored, not retried by this table object, and no
  prediction is made for a candidate holding it (the candidate is measured whole);
* **load**: a fixed workload (:func:`~nas.hardware.runtimes.load_probe_ms`) is timed before
  and after the pieces; the fastest time it ever took is kept in the file. Nothing is
  measured while it runs more than :data:`MAX_LOAD` times its fastest (:data:`ATTEMPTS`
  probes in a row), pieces are refused when it still does after them, and an entry whose recorded probe time is above ``MAX_LOAD`` times
  the fastest (it was measured under load before the machine was ever seen idle) is
  re-measured before it is used;
* **disagreement**: :meth:`LatencyTable.reconcile` re-measures and replaces a candidate's
  pieces when its whole measurement and the prediction are more than ``config.margin``
  apart (once per piece per table object), and :meth:`LatencyTable.refresh` does so
  unconditionally (``nas profile --refresh``). A replaced entry that cannot be re-measured
  cleanly is left as a refusal (``"refused"``: why), so no other worker's older copy of it
  returns on a save.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nas.hardware.runtimes import RUNTIMES, LatencyStats, load_probe_ms, measure_runs_of_input, onnxruntime_version
from nas.locks import file_lock

if TYPE_CHECKING:
    from nas.config import LatencyConfig

__all__ = [
    "LatencyTable",
    "default_table_dir",
    "default_table_path",
    "machine_header",
    "piece_key",
    "split_pieces",
    "TABLE_FORMAT",
    "MAX_SPREAD",
    "MAX_LOAD",
    "ATTEMPTS",
]

#: 2: entries record their dispersion and the machine's load (format 1 recorded neither).
TABLE_FORMAT = 2
#: A piece whose median stays more than 50% above its fastest tenth of runs is refused.
MAX_SPREAD = 0.5
#: Nothing is measured (or kept) while the load probe runs more than twice its fastest time.
MAX_LOAD = 2.0
#: Timings of a noisy piece (the least noisy is kept), and load probes before giving up.
ATTEMPTS = 3
#: Seconds between load probes of a busy machine, and seconds a table then stops trying.
BUSY_PAUSE_S, BUSY_BACKOFF_S = 0.05, 5.0
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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0  # JSON allows Infinity


def _valid(entry: Any) -> bool:
    """A format-2 entry: a time ``at`` and either a latency ``ms`` or a ``refused`` reason."""
    return isinstance(entry, dict) and _number(entry.get("at")) and (_number(entry.get("ms")) or isinstance(entry.get("refused"), str))


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


#: One piece of a network to look up: the module, its input shape, its key.
_Piece = tuple[nn.Module, tuple[int, ...], str]


def _unique(pieces: Iterable[_Piece]) -> list[_Piece]:
    """``pieces`` without repeated keys (a net may repeat one block at one shape)."""
    return list({key: (piece, shape, key) for piece, shape, key in pieces}.values())


class LatencyTable:
    """Per-piece latencies of ``config`` on this machine, cached in the JSON file ``path``.

    ``path`` null means :func:`default_table_path`. A file that is unreadable or whose
    header differs from :func:`machine_header` is reported through ``log`` (its reason is
    kept in ``stale_reason``) and not used. Counters of this object: ``measured`` pieces
    timed (each once, however many ``attempts`` it took), ``refused`` of them not stored,
    ``rechecked`` of them that replaced an entry (after a disagreement or a refresh).
    """

    def __init__(self, config: LatencyConfig, path: str | Path | None = None, log: Callable[[str], None] | None = print) -> None:
        self.config = config
        self.path = Path(path) if path is not None else default_table_path(config)
        self.header = machine_header(config)
        self.entries: dict[str, dict[str, Any]] = {}
        #: The per-call overhead: ``{"ms", "probe_ms", "at"}``, or None until measured.
        self.overhead_entry: dict[str, float] | None = None
        #: The fastest the load probe ever ran on this machine (ms), or None before it ran.
        self.probe_ms: float | None = None
        self.measured = self.attempts = self.refused = self.rechecked = 0
        self.stale_reason: str | None = None
        self._log = log or (lambda message: None)
        self._probed = False
        self._busy_until = 0.0
        self._refused_here: set[str] = set()
        self._rechecked_keys: set[str] = set()
        self._overhead_rechecked = False
        data, reason = self._read()
        if reason is not None:
            self.stale_reason = reason
            self._log(f"Latency table {self.path} is {reason}; starting a fresh one (it is replaced on the next save).")
        elif data is not None:
            self._merge(data)

    def __len__(self) -> int:
        """Entries holding a latency (refusals not counted)."""
        return sum("ms" in e for e in self.entries.values())

    @property
    def overhead_ms(self) -> float | None:
        """Milliseconds of the runtime's per-call overhead (see :meth:`_measure_overhead`), or None."""
        return None if self.overhead_entry is None else self.overhead_entry["ms"]

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
        if data["header"].get("format") != TABLE_FORMAT:
            return None, (
                f"in table format {data['header'].get('format')}, which this version does not trust (format {TABLE_FORMAT} "
                "records each piece's dispersion and the machine's load); its pieces are re-measured as they are needed"
            )
        if data["header"] != self.header:
            keys = sorted(set(data["header"]) | set(self.header))
            differ = [k for k in keys if data["header"].get(k) != self.header.get(k)]
            return None, f"for another machine or configuration (its header differs in: {', '.join(differ)})"
        return data, None

    def _merge(self, data: dict[str, Any]) -> None:
        """Take the file's entries that this table lacks or holds an older version of, and the fastest probe."""
        for key, entry in data["entries"].items():
            if _valid(entry) and (key not in self.entries or entry["at"] > self.entries[key]["at"]):
                self.entries[key] = entry
        overhead = data.get("overhead")
        if _valid(overhead) and _number(overhead.get("ms")) and _number(overhead.get("probe_ms")):
            if self.overhead_entry is None or overhead["at"] > self.overhead_entry["at"]:
                self.overhead_entry = overhead
        if _number(data.get("probe_ms")) and data["probe_ms"] > 0:
            self._note_probe(data["probe_ms"])

    def reload(self) -> None:
        """Add the entries other workers have saved (or replaced) since this table was read."""
        data, _ = self._read()
        if data is not None:
            self._merge(data)

    def save(self) -> None:
        """Merge with the file (under a file lock) and replace it atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self.reload()  # a file with another header is replaced, never mixed in
            data = {"header": self.header, "probe_ms": self.probe_ms, "overhead": self.overhead_entry, "entries": self.entries}
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)

    # ------------------------------------------------------------------ trust
    def _note_probe(self, ms: float) -> None:
        self.probe_ms = ms if self.probe_ms is None else min(self.probe_ms, ms)

    def _busy(self, probe_ms: float) -> bool:
        """Whether a probe time of ``probe_ms`` means the machine was loaded (above :data:`MAX_LOAD` x the fastest)."""
        return self.probe_ms is not None and probe_ms > self.probe_ms * MAX_LOAD

    def _trusted(self, entry: dict[str, Any] | None) -> bool:
        """An entry with a latency, measured while the machine was not loaded (judged against the fastest probe now)."""
        return entry is not None and _number(entry.get("ms")) and _number(entry.get("probe_ms")) and not self._busy(entry["probe_ms"])

    def _probe_once(self) -> None:
        """Time the load probe once per table object, so entries measured under load before are seen as such."""
        if not self._probed:
            self._probed = True
            self._note_probe(load_probe_ms(self.config.threads))

    def load(self) -> tuple[float, bool]:
        """The load probe's time now (ms) and whether the machine is busy: :data:`ATTEMPTS` probes in a row over
        :data:`MAX_LOAD` x the fastest this machine has run it (the guard of every measurement into the table)."""
        self._probed = True
        for attempt in range(ATTEMPTS):
            probe = load_probe_ms(self.config.threads)
            self._note_probe(probe)
            if not self._busy(probe):
                return probe, False
            if attempt < ATTEMPTS - 1:
                time.sleep(BUSY_PAUSE_S)
        return probe, True

    def _idle_probe(self) -> tuple[float, bool]:
        """:meth:`load`; a busy machine stops measurements into the table for :data:`BUSY_BACKOFF_S` seconds."""
        probe, busy = self.load()
        if not busy:
            return probe, False
        self._busy_until = time.monotonic() + BUSY_BACKOFF_S
        self._log(
            f"Latency table {self.path.name}: this machine is busy (a fixed workload runs {probe / self.probe_ms:.1f}x slower than "
            f"its fastest); nothing is measured into the table for {BUSY_BACKOFF_S:g} s, candidates are measured whole."
        )
        return probe, True

    # ------------------------------------------------------------------ measuring
    def _measure_overhead(self) -> float:
        """Milliseconds of one call of the runtime on a near-empty graph.

        The graph is the runtime's :meth:`Runtime.overhead_probe`: for ``torch`` and ``cuda``
        an ``nn.Identity`` module (the module call itself, ~0.7 us on one CPU thread, next to
        pieces of tens of microseconds or more); for ``onnxruntime`` one 1x1 convolution of a
        single pixel. ONNX Runtime skips most of its executor for a graph without a real node,
        so an identity graph (~3.5 us) under-states the fixed cost of a ``run`` (~4.1 us, the
        same as the per-piece difference between the sum of a net's pieces and the whole net).
        """
        config = replace(self.config, warmup=max(self.config.warmup, 20), repeats=max(self.config.repeats, 200))
        probe = RUNTIMES.get(self.config.runtime).overhead_probe()
        return LatencyStats.of(measure_runs_of_input(probe, (self.config.batch_size, 1, 1, 1), config)).median

    def _measure_piece(self, piece: nn.Module, shape: tuple[int, ...]) -> LatencyStats:
        """The least noisy of up to :data:`ATTEMPTS` timings (stopping at the first within :data:`MAX_SPREAD`)."""
        best: LatencyStats | None = None
        for _ in range(ATTEMPTS):
            stats = LatencyStats.of(measure_runs_of_input(piece, shape, self.config))
            self.attempts += 1
            if best is None or stats.spread < best.spread:
                best = stats
            if best.spread <= MAX_SPREAD:
                break
        self.measured += 1
        return best

    def _session(self, pieces: Sequence[_Piece], overhead: bool) -> bool:
        """Measure ``pieces`` (and the overhead) between two load probes, store what is clean, save.

        False, measuring nothing, when the machine is busy before (or was found busy in the
        last :data:`BUSY_BACKOFF_S` seconds).
        """
        if time.monotonic() < self._busy_until:
            return False
        before, busy = self._idle_probe()
        if busy:
            return False
        timed = [(piece, shape, key, self._measure_piece(piece, shape)) for piece, shape, key in pieces]
        overhead_ms = self._measure_overhead() if overhead else None
        after, busy = self._idle_probe()
        probe, now = max(before, after), time.time()
        for piece, shape, key, stats in timed:
            entry = {"piece": type(piece).__name__, "input": list(shape), "at": now, "probe_ms": probe, "spread": stats.spread}
            entry.update({"p10_ms": stats.p10, "p90_ms": stats.p90})
            if stats.spread > MAX_SPREAD or busy:
                self.refused += 1
                if stats.spread > MAX_SPREAD:
                    self._refused_here.add(key)
                    entry["refused"] = f"noisy: its median stayed {stats.spread:.0%} above its fastest runs after {ATTEMPTS} timings"
                else:
                    entry["refused"] = f"the machine was busy (load probe {after / self.probe_ms:.1f}x its fastest)"
                entry["median_ms"] = stats.median
            else:
                entry["ms"] = stats.median
            self.entries[key] = entry
        if overhead_ms is not None and not busy:
            self.overhead_entry = {"ms": overhead_ms, "probe_ms": probe, "at": now}
        self.save()
        return True

    def _pieces(self, model: nn.Module, resolution: int, in_chans: int) -> list[_Piece]:
        pieces = split_pieces(model)
        shapes = _input_shapes(pieces, (self.config.batch_size, in_chans, resolution, resolution))
        return [(p, s, piece_key(p, s)) for p, s in zip(pieces, shapes)]

    # ------------------------------------------------------------------ public
    def predict(self, model: nn.Module, resolution: int, in_chans: int) -> float | None:
        """Predicted median milliseconds of ``model`` at ``resolution`` (batch ``config.batch_size``), or None.

        Pieces not yet in the table (or whose entry is not trusted) are measured and the
        table is saved. The prediction is the sum of the pieces' medians less the per-call
        overhead for every piece but one, and at least the slowest piece's median. None
        when a piece was refused (noisy, or the machine busy): measure the candidate whole.
        """
        pieces = self._pieces(model, resolution, in_chans)
        self._probe_once()
        if not all(self._trusted(self.entries.get(k)) for _, _, k in pieces):
            self.reload()
        todo = [p for p in _unique(pieces) if not self._trusted(self.entries.get(p[2]))]
        if any(key in self._refused_here for _, _, key in todo):
            return None
        if todo or not self._trusted(self.overhead_entry):
            self._session(todo, overhead=not self._trusted(self.overhead_entry))
        if not all(self._trusted(self.entries.get(k)) for _, _, k in pieces) or not self._trusted(self.overhead_entry):
            return None
        times = [self.entries[k]["ms"] for _, _, k in pieces]
        return max(sum(times) - (len(times) - 1) * self.overhead_ms, max(times))

    def reconcile(self, model: nn.Module, resolution: int, in_chans: int, predicted: float | None, measured_ms: float) -> bool:
        """Re-measure and replace ``model``'s pieces if ``predicted`` and its whole ``measured_ms`` disagree.

        They disagree when one is more than ``config.margin`` above the other. Each piece
        (and the overhead) is re-measured at most once per table object. If the machine is
        busy and the table predicted too much, the pieces' entries are dropped (left as
        refusals) rather than kept. True when the table was changed.
        """
        margin = self.config.margin
        if predicted is None or not measured_ms > 0 or 1 / (1 + margin) <= predicted / measured_ms <= 1 + margin:
            return False
        todo = [p for p in _unique(self._pieces(model, resolution, in_chans)) if p[2] not in self._rechecked_keys]
        if not todo:
            return False
        self._rechecked_keys.update(key for _, _, key in todo)
        overhead, self._overhead_rechecked = not self._overhead_rechecked, True
        self._log(
            f"Latency table {self.path.name}: predicted {predicted:.3f} ms for {_candidate(model)} measured at {measured_ms:.3f} ms "
            f"(more than {margin:.0%} apart); re-measuring its {len(todo)} pieces."
        )
        if self._session(todo, overhead):
            self.rechecked += len(todo)
            return True
        if predicted > measured_ms * (1 + margin):
            now = time.time()
            for piece, shape, key in todo:
                reason = f"predicted {predicted / measured_ms:.1f}x a whole measurement; re-measured when the machine is idle"
                self.entries[key] = {"piece": type(piece).__name__, "input": list(shape), "at": now, "refused": reason}
            self.save()
            return True
        return False

    def refresh(self, model: nn.Module, resolution: int, in_chans: int) -> bool:
        """Re-measure every piece of ``model`` and the overhead, and replace their entries (``nas profile --refresh``).

        False when the machine is busy (nothing is changed then).
        """
        pieces = _unique(self._pieces(model, resolution, in_chans))
        held = sum(key in self.entries for _, _, key in pieces)
        self._rechecked_keys.update(key for _, _, key in pieces)
        self._refused_here.difference_update(key for _, _, key in pieces)
        self._overhead_rechecked, self._busy_until = True, 0.0
        if self._session(pieces, overhead=True):
            self.rechecked += held
            return True
        return False


def _candidate(model: nn.Module) -> str:
    """``model`` as a log line names it: its architecture string (``nas profile --arch`` takes it), else its timm name."""
    arch = getattr(model, "arch", None)
    if arch is not None and hasattr(arch, "to_string"):
        return f"candidate {arch.to_string()!r}"
    name = getattr(model, "model_name", None)
    return f"model {name!r}" if name else f"a {type(model).__name__}"
