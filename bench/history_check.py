"""The offline checker of a merged history (:mod:`bench.history`): the promises, op by op.

:func:`check` returns a :class:`Report` whose ``violations`` name the rule broken, the
operation that saw it and the operation that makes it a violation:

``infra_error``
    P1: a cache operation raised something other than what ``Bounds.allowed`` lets through
    (the resolver's own injected error on a get with nothing servable, by default).
``staleness``
    P3: a get returned a value whose time (origin read, or version taken by a set) is older
    than ``ttl + stale_ttl + slack`` before the get began.
``stale_overwrite`` / ``stale_read``
    P5: a get that began after a write or invalidation W was due (completed + ``bus_delay``)
    returned a value that predates W. ``stale_overwrite``: a resolver's value (a fill) whose
    origin read gave a lower version than the set W took, or read the origin before the
    invalidation W began. ``stale_read``: a set's value, written by a set that completed before
    W began (W is not visible; sets that overlap may land in either order).
``lost_write``
    P6/P14, once per acknowledged set S: gets ran after S was due and before any later set of
    the key began, and none of them returned S's version or a newer one.
``stall``
    P2/P14: a get took longer than ``stall_calls * op_timeout + stall_slack`` plus the slowest
    resolver run (not counting the resolver runs it did itself) and no other thread or process
    was computing the key meanwhile: it waited out a lock that nobody holds. Waits for a holder
    that is computing the key (bounded by ``lock_ttl``, P8) are counted in ``held_stalls``.
``duplicate_run``
    P4, only with ``Bounds.dedup``: a resolver run of a key overlapped another run of it that
    began before the last change of the key (a set, delete or invalidation) that could have
    landed before this one began: a run after a change is the one new run P4 allows.

Faults (``fault`` events, or ``windows=``) extend when a write is due. A fault window ``[a, b]``
heals at ``h = b + recovery_base + min(b - a, recovery_cap) + bus_delay``: the library notices
Redis is back at its breaker's next probe, then replays what it deferred and announces it. The
breaker's cooldown doubles with each failed probe (0.5 s, 1 s, ... 5 s), so the cooldown running
when the fault ends is at most about the fault's length plus the first 0.5 s and a few timeouts
(``recovery_base``, 1.25 s). A write that begins before ``h`` and would be due after ``a`` is
due at ``h`` (or later, if it completes later). P3 dates a write-through value from its origin
write.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from .history import INVALIDATIONS, Event
from .history_rules import check_gets, check_lost, check_runs, check_stalls, count_tasks
from .history_types import Bounds, Report, Violation, Window, Write, percentile

__all__ = ["Bounds", "Report", "Violation", "Window", "check", "percentile"]


def check(events: Iterable[Event], bounds: Bounds, windows: Iterable[Window] = ()) -> Report:
    """Check every rule of the module's docstring over ``events`` (any order)."""
    history = sorted(events, key=lambda e: (e.t0, e.t1))
    spans = [*windows, *(Window(e.t0, e.t1, e.k or "fault") for e in history if e.op == "fault")]
    report = Report(bounds, windows=sorted(spans, key=lambda w: w.start))
    gets: dict[tuple[str, str], list[Event]] = defaultdict(list)
    writes: dict[tuple[str, str], list[Write]] = defaultdict(list)
    sets: dict[tuple[str, str, int], Event] = {}
    runs: dict[tuple[str, str], list[Event]] = defaultdict(list)
    durations: dict[str, list[float]] = defaultdict(list)
    last_get: dict[tuple[int, str], Event] = {}  # each thread's latest get, by when it began
    began: dict[int, float] = {}  # a resolver run's earliest possible start of its load
    origin_writes = {
        (e.c, e.k, e.v): e.t1 for e in history if e.op == "origin_write" and e.ok
    }  # the latest origin write of each version
    for event in history:
        report.ops[event.op] += 1
        if event.op in ("fault", "fork", "task_pub", "task_run", "task_revoked"):
            continue
        durations[event.op].append(event.duration)
        if event.op == "origin_read":
            runs[(event.c or "", event.k or "")].append(event)
            caller = last_get.get((event.p, event.th))
            if caller and (caller.c, caller.k) == (event.c, event.k) and caller.t1 >= event.t0:
                began[id(event)] = caller.t0  # its get took the lock first
            continue
        if event.op == "origin_write":
            continue
        _check_outcome(report, event)
        cache = event.c or ""
        if event.op == "get":
            last_get[(event.p, event.th)] = event
            report.calls += 1
            if event.ok:
                report.served += 1
                gets[(cache, event.k or "")].append(event)
        elif event.op == "set" and event.v is not None:
            sets[(cache, event.k or "", event.v)] = event
            if not event.ok and (event.c, event.k, event.v) in origin_writes:
                report.refused_but_written[cache] += 1
            if event.ok:
                report.acknowledged[cache] += 1
                due = _due(event, bounds, report.windows)
                writes[(cache, event.k or "")].append(Write(event, due, event.v))
        elif event.op in INVALIDATIONS and event.ok:
            due = _due(event, bounds, report.windows)
            keys = (event.k,) if event.op == "delete" else event.ks
            for key in keys:
                writes[(cache, key or "")].append(Write(event, due, None))
    report.latency = {
        op: (percentile(d, 0.5), percentile(d, 0.99), max(d)) for op, d in durations.items()
    }
    for (cache, key), key_gets in gets.items():
        check_gets(report, key_gets, writes.get((cache, key), []), sets, origin_writes)
        check_lost(report, key_gets, writes.get((cache, key), []), sets)
    check_runs(report, runs, writes, began)
    check_stalls(report, gets, runs)
    count_tasks(report, history)
    report.violations.sort(key=lambda v: (v.rule, v.event.t0))
    return report


def _check_outcome(report: Report, event: Event) -> None:
    if event.ok:
        return
    report.failures[f"{event.op}:{event.out}"] += 1
    allowed = report.bounds.allowed
    if event.out in allowed.get(event.op, ()) or event.out in allowed.get(
        f"{event.op}:{event.c}", ()
    ):
        return
    report.violations.append(Violation("infra_error", event, f"the caller got {event.out}"))


def _due(event: Event, bounds: Bounds, windows: Sequence[Window]) -> float:
    """When ``event`` (a completed write) must be visible in every process."""
    due = event.t1 + bounds.bus_delay
    changed = True
    while changed:  # a window that the extended deadline reaches extends it again
        changed = False
        for window in windows:
            healed = (
                window.end
                + bounds.recovery_base
                + min(window.end - window.start, bounds.recovery_cap)
                + bounds.bus_delay
            )
            if window.start <= due and event.t0 <= healed and healed > due:
                due, changed = healed, True
    return due
