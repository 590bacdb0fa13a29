"""The tracking journal: records kept while the tracking store is unreachable, spooled to disk.

While the MLflow store is unreachable, every tracking record (a run to create, params,
metrics, tags, an artifact, a run to close) is kept in order in memory *and* appended to
this process's journal, ``<run dir>/tracking-journal/<host>-<pid>-<token>.jsonl``, so a
process that dies during the outage loses none. In normal operation nothing is written.

Format: JSON lines, append-only. The first line is a header (``{"journal": 1, "store":
<masked tracking URI>, ...}``); then ``{"seq": N, "record": {...}}`` for a kept record and
``{"ack": N}`` once record ``N`` has been logged to the store. Every line is flushed and
``fsync``-ed before the call that wrote it returns (one fsync per record, only during an
outage). A journal whose records have all been acknowledged is deleted.

A live process holds an exclusive ``flock`` on its journal for as long as the journal
exists; the OS releases it when the process dies. A journal that can be locked is
therefore an orphan: the next tracker made on the same store replays its unacknowledged
records in order (see ``MlflowTracker``), acknowledging each after it is logged. A crash
during the replay leaves the unacknowledged ones for the next start; a record logged but
not yet acknowledged is logged again, which the tracker makes harmless (run creation is
looked up by a key tag, metrics carry their original timestamps and MLflow drops exact
duplicates, params, tags and artifacts are overwritten with the same values).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["JOURNAL_DIR", "Journal", "Record"]

#: The journal folder inside the run directory.
JOURNAL_DIR = "tracking-journal"

#: One tracking record: a JSON-able mapping with an ``op`` (create, log, text, artifact, end).
Record = dict[str, Any]


def _write_line(handle: TextIO, data: dict[str, Any]) -> None:
    handle.write(json.dumps(data, separators=(",", ":")) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """The ordered records not yet logged to the store (:attr:`pending`), spooled to one file.

    ``directory`` ``None`` keeps them in memory only. The file is created (and locked) with
    the first record and deleted once every record is acknowledged. A journal that cannot
    be written says so through ``log`` once and goes on in memory.
    """

    def __init__(self, directory: str | Path | None, store: str, log: Callable[[str], None] = print) -> None:
        self.directory = Path(directory) / JOURNAL_DIR if directory is not None else None
        self.store = store  # masked: a journal never holds a password
        self.path: Path | None = None
        self.pending: list[tuple[int, Record]] = []
        self._handle: TextIO | None = None
        self._next_seq = 1
        self._log = log

    # ------------------------------------------------------------------ writing
    def _open(self) -> None:
        """Create this process's journal: written and locked under a temporary name, then renamed into view."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary, final = self.directory / f".{name}.tmp", self.directory / f"{name}.jsonl"
        handle = open(temporary, "x", encoding="utf-8")
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        header = {"journal": 1, "store": self.store, "host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
        _write_line(handle, header)
        os.replace(temporary, final)  # only now can another process see it, and it is already locked
        _fsync_dir(self.directory)
        self._handle, self.path = handle, final

    def append(self, record: Record) -> int:
        """Keep ``record`` (after every record kept before it); returns its sequence number. Durable on return."""
        seq = self._next_seq
        self._next_seq += 1
        self.pending.append((seq, record))
        if self.directory is not None:
            try:
                if self._handle is None:
                    self._open()
                assert self._handle is not None
                _write_line(self._handle, {"seq": seq, "record": record})
            except OSError as exc:
                self._log(
                    f"Tracking: cannot write the tracking journal in {self.directory} ({exc}); records kept during this outage "
                    f"live in memory only and are lost if this process dies before the store is back."
                )
                self._drop_file(remove=False)
                self.directory = None
        return seq

    def ack(self, seq: int) -> None:
        """Record ``seq`` (the oldest pending one) is in the store: acknowledge it; delete the journal when none is left."""
        if not self.pending or self.pending[0][0] != seq:
            raise ValueError(f"acknowledging record {seq} out of order")
        self.pending.pop(0)
        if self._handle is not None:
            if self.pending:
                _write_line(self._handle, {"ack": seq})
            else:
                self._drop_file(remove=True)

    def close(self) -> None:
        """Release the journal (its lock, and the file when nothing is pending); what is pending stays for a later replay."""
        self._drop_file(remove=not self.pending)

    def delete(self) -> None:
        """Delete the journal file now, pending records and all (they were moved to another journal)."""
        self.pending = []
        self._drop_file(remove=True)

    def _drop_file(self, remove: bool) -> None:
        if self._handle is None:
            return
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)  # still locked: nobody can replay it meanwhile
        self._handle.close()  # releases the lock
        self._handle, self.path = None, None

    def __del__(self) -> None:  # pragma: no cover - a dropped tracker releases its lock; the file stays for a replay
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()

    # ------------------------------------------------------------------ orphans
    @classmethod
    def orphans(cls, directory: str | Path, store: str, log: Callable[[str], None] = print) -> list[Journal]:
        """The journals in ``directory`` left by processes that died, for ``store``, each locked by this process.

        A journal still locked (its process lives) is skipped; one for another store is
        left alone and named through ``log``. Each returned journal's :attr:`pending` holds
        its unacknowledged records in order; acknowledge them as they are logged.
        """
        folder = Path(directory) / JOURNAL_DIR
        found: list[Journal] = []
        for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            try:
                handle = open(path, "r+", encoding="utf-8")
            except FileNotFoundError:  # replayed and deleted by another process meanwhile
                continue
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()  # its process is alive
                continue
            header, pending = cls._read(handle)
            if header.get("store") != store:
                log(f"Tracking: the journal {path} holds records for another tracking store ({header.get('store')}); not replayed here.")
                handle.close()
                continue
            journal = cls(None, store, log)
            journal.path, journal._handle, journal.pending = path, handle, pending
            journal._next_seq = (pending[-1][0] + 1) if pending else 1
            if not pending:  # everything was acknowledged before the process died
                journal._drop_file(remove=True)
                continue
            found.append(journal)
        return found

    @staticmethod
    def _read(handle: TextIO) -> tuple[dict[str, Any], list[tuple[int, Record]]]:
        """The header and the unacknowledged records of an open journal (a torn last line is ignored)."""
        header: dict[str, Any] = {}
        records: dict[int, Record] = {}
        handle.seek(0)
        for number, line in enumerate(handle):
            try:
                data = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written when the process died: never durable, never acknowledged
            if number == 0:
                header = data
            elif "seq" in data:
                records[int(data["seq"])] = data["record"]
            elif "ack" in data:
                records.pop(int(data["ack"]), None)
        handle.seek(0, os.SEEK_END)
        return header, sorted(records.items())
