"""Operation histories of a multi-process run: the per-process recorder and the events it writes.

Every process (web process, forked child, Celery worker child) appends one JSON line per
operation to ``<dir>/h-<pid>.jsonl``; :func:`load` merges the files of a run, and
:mod:`bench.history_check` checks the promises over the merged history. The processes share one
machine, so ``time.time()`` (``t0``/``t1``) orders events across processes; ``time.monotonic()``
(``m0``/``m1``) gives each operation's duration.

A line's fields (absent ones are ``None``):

=====  ===================================================================================
``p``  pid of the process that did it; ``th``: its thread's name
``op`` ``get``, ``set``, ``delete``, ``pattern``, ``tag`` (cache operations), ``origin_read``
       (a resolver run), ``origin_write`` (a write-through function), ``task_pub`` /
       ``task_run`` / ``task_revoked`` (Celery messages), ``fault`` (an injected fault)
``c``  the cache's name; ``k``: the key (the pattern, the tag, the fault's kind)
``ks`` the keys an invalidation covers (``pattern``, ``tag``)
``t0`` ``t1``: wall clock at start and end; ``m0`` ``m1``: monotonic clock at start and end
``out`` ``"ok"`` or the type name of the exception the caller got
``v``  a version: of the value a get returned, of the value a set wrote, read by a resolver
``vt`` the value's time: when its version was read from the origin (a resolver's value) or
       taken from the origin's sequence (a set's value)
``w``  who made the value: ``r:<pid>`` (a resolver) or ``s:<pid>:<thread>`` (a set)
``x``  anything else (a task's id, a fault's details)
=====  ===================================================================================

Cached values carry what the checker needs: :func:`make_value` builds ``{"v", "t", "w"}``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "Event",
    "Recorder",
    "Timed",
    "load",
    "make_value",
    "parse_value",
]

CACHE_OPS = frozenset({"get", "set", "delete", "pattern", "tag"})
INVALIDATIONS = frozenset({"delete", "pattern", "tag"})


def make_value(version: int, at: float, writer: str) -> dict[str, Any]:
    """The cached value of the stress tests: a version, the time it stands for, its maker."""
    return {"v": version, "t": at, "w": writer}


def parse_value(value: object) -> tuple[int, float, str] | None:
    """``(v, t, w)`` of a value made by :func:`make_value`; ``None`` for anything else."""
    if not isinstance(value, dict):
        return None
    v, t, w = value.get("v"), value.get("t"), value.get("w")
    if type(v) is not int or not isinstance(t, int | float) or not isinstance(w, str):
        return None
    return v, float(t), w


@dataclass(slots=True)
class Event:
    """One line of a history (see the module's docstring for the fields)."""

    p: int
    th: str
    op: str
    t0: float
    t1: float
    m0: float = 0.0
    m1: float = 0.0
    c: str | None = None
    k: str | None = None
    ks: tuple[str, ...] = ()
    out: str = "ok"
    v: int | None = None
    vt: float | None = None
    w: str | None = None
    x: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.out == "ok"

    @property
    def duration(self) -> float:
        """Seconds the operation took (monotonic clock; wall clock if it was not recorded)."""
        if self.m1 or self.m0:
            return self.m1 - self.m0
        return self.t1 - self.t0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        known = {name: data[name] for name in _FIELDS if name in data and name != "ks"}
        return cls(ks=tuple(data.get("ks") or ()), **known)

    def describe(self) -> str:
        """A one-line rendering for violation reports."""
        where = f"{self.op} {self.c or ''}:{self.k or ''}".rstrip(":")
        value = f" v={self.v}" if self.v is not None else ""
        if self.w:
            value += f" by {self.w}"
        return (
            f"{where} [{self.t0:.3f} .. {self.t1:.3f}] pid {self.p} {self.th} -> {self.out}{value}"
        )


_FIELDS = tuple(Event.__dataclass_fields__)


class Recorder:
    """Appends this process's operations to ``<directory>/h-<pid>.jsonl``, thread-safe.

    The file is opened on the first write in each process: a child forked after first use
    writes its own file (the lock and the file handle are replaced in the child at fork).
    Lines are written whole and unbuffered, so a process killed by SIGKILL loses nothing it
    finished; :func:`load` skips a torn last line.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._pid = -1
        self._file: Any = None
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's handle stays open but unused: closing it could flush a line that one of
        # the parent's threads was writing at the fork into the parent's file a second time.
        self._lock = threading.Lock()
        self._pid = -1
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; ``p`` and ``th`` are filled in if missing."""
        record.setdefault("p", os.getpid())
        record.setdefault("th", threading.current_thread().name)
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self._pid != os.getpid():
                self.directory.mkdir(parents=True, exist_ok=True)
                path = self.directory / f"h-{os.getpid()}.jsonl"
                self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
                self._pid = os.getpid()
            self._file.write(line)

    def op(self, op: str, cache: str | None = None, key: str | None = None, **fields: Any) -> Timed:
        """Time one operation: ``with recorder.op("get", name, key) as rec: rec["v"] = ...``.

        The record is written when the block ends, with ``out`` set to the type name of the
        exception that left it (which is re-raised), or ``"ok"``.
        """
        return Timed(self, {"op": op, "c": cache, "k": key, **fields})

    def event(self, op: str, **fields: Any) -> None:
        """Record an instantaneous event (both clocks read once)."""
        now, mono = time.time(), time.monotonic()
        self.write({"op": op, "t0": now, "t1": now, "m0": mono, "m1": mono, **fields})

    def close(self) -> None:
        with self._lock:
            if self._file is not None and self._pid == os.getpid():
                self._file.close()
            self._file = None
            self._pid = -1


class Timed:
    """The context manager of :meth:`Recorder.op`; item assignment adds fields to the record."""

    def __init__(self, recorder: Recorder, record: dict[str, Any]) -> None:
        self.recorder = recorder
        self.record = record

    def __setitem__(self, name: str, value: Any) -> None:
        self.record[name] = value

    def __enter__(self) -> Timed:
        self.record["t0"] = time.time()
        self.record["m0"] = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.record["m1"] = time.monotonic()
        self.record["t1"] = time.time()
        self.record["out"] = "ok" if exc_type is None else exc_type.__name__
        self.recorder.write(self.record)


def iter_file(path: Path) -> Iterator[Event]:
    """The events of one history file; a torn or unreadable line is skipped."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and "op" in data and "t0" in data:
                yield Event.from_json(data)


def load(directory: str | os.PathLike[str]) -> list[Event]:
    """Every event of every ``h-*.jsonl`` file in ``directory``, ordered by start time."""
    events: list[Event] = []
    for path in sorted(Path(directory).glob("h-*.jsonl")):
        events.extend(iter_file(path))
    events.sort(key=lambda e: (e.t0, e.t1))
    return events
