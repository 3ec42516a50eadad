"""The library calls a step makes, in process A or in process B, and the checks of each call.

A call that raises anything but the resolver's own error breaks P1; one that takes longer than
a lock and a few timeouts explain breaks P2; a resolver error that reaches the caller must come
with nothing servable (P1 again, :meth:`System.check_refusal`); the value a read returns is
checked for P3 and P5 (:meth:`Oracle.check_read`).
"""

from __future__ import annotations

import time
from typing import Any

from oqron_cache.celery.bodies import do_refresh
from oqron_cache.config import current_runtime
from tests.model.oracle import MAX_CALL_SECONDS, P1Broken, P2Broken, breach, make_value
from tests.model.system import System
from tests.model.world import OriginError, Task

JOIN = 5.0  # seconds the refreshes a call asked for may take (they run against one Redis)


def check_duration(what: str, seconds: float) -> None:
    if seconds > MAX_CALL_SECONDS:
        breach(P2Broken(f"{what} took {seconds:.2f}s > {MAX_CALL_SECONDS:.2f}s"))


def read(system: System, proc: str, cache: str, key: str) -> None:
    """``get`` in ``proc``, after its bus delivered what was published before (the bus delay)."""
    system.barrier(proc)
    seen = system.oracle.snapshot(proc)
    now = system.clock.now
    if proc == "A":
        counts = system.caches[cache].stats.counts
        errors = counts["l2_errors"]
        started = time.monotonic()
        try:
            value = system.caches[cache].get(key)
        except OriginError:
            current_runtime().dispatcher.join(JOIN)
            system.check_refusal("A", cache, key, counts["l2_errors"] - errors, seen)
            return
        except Exception as exc:
            raise P1Broken(f"A get({cache}, {key!r}) raised {exc!r}") from exc
        elapsed = time.monotonic() - started
        current_runtime().dispatcher.join(JOIN)  # the refreshes it asked for were handed over
    else:
        reply = system.peer.call("get", system.ctx(), cache, key)
        system.absorb(reply)
        if "error" in reply:
            raise P1Broken(f"B get({cache}, {key!r}) raised {reply['error']}")
        if "origin_error" in reply:
            system.check_refusal("B", cache, key, int(reply["l2_errors"]), seen)
            return
        value, elapsed = reply["value"], float(reply["elapsed"])
    system.oracle.check_read(proc, cache, key, value, now, seen)
    check_duration(f"{proc} get({cache}, {key!r})", elapsed)


def write(system: System, proc: str, kind: str, cache: str, subject: str) -> None:
    """A ``set`` (a new origin version first), ``delete``, pattern or tag invalidation."""
    op = system.oracle.begin(kind, proc, cache, subject, system.redis != "up")
    value: Any = None
    if kind == "set":
        version = system.origin.bump(cache, subject)  # the application writes its origin
        value = make_value(cache, subject, version, op.start, system.clock.now, True)
    what = f"{proc} {kind}({cache}, {subject!r})"
    if proc == "A":
        target = system.caches[cache]
        started = time.monotonic()
        try:
            if kind == "set":
                target.set(subject, value)
            elif kind == "delete":
                target.delete(subject)
            elif kind == "pattern":
                target.invalidate_pattern(subject)
            else:
                target.invalidate_by_tag(subject)
        except Exception as exc:
            raise P1Broken(f"{what} raised {exc!r}") from exc
        elapsed = time.monotonic() - started
    else:
        reply = system.peer.call("write", system.ctx(), kind, cache, subject, value)
        system.absorb(reply)
        if "error" in reply:
            raise P1Broken(f"{what} raised {reply['error']}")
        elapsed = float(reply["elapsed"])
    system.oracle.end(op)
    check_duration(what, elapsed)


def refresh(system: System, task: Task, where: str) -> None:
    """Run a refresh task (the real task body) as a worker in ``where`` would."""
    if where == "A":
        try:
            do_refresh(task.cache, task.key, task.token, task.seen_hex)
        except Exception as exc:
            raise P1Broken(f"refresh task {task} raised {exc!r} in A") from exc
        current_runtime().dispatcher.join(JOIN)
    else:
        reply = system.peer.call(
            "refresh", system.ctx(), task.cache, task.key, task.token, task.seen_hex
        )
        system.absorb(reply)
        if "error" in reply:
            raise P1Broken(f"refresh task {task} raised in B: {reply['error']}")
