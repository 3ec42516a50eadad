"""The rules of :func:`bench.history_check.check` over the gets, writes and resolver runs of one
history (see that module for what each rule means)."""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .history import Event, parse_value
from .history_types import Report, Violation, Write, percentile

__all__ = ["check_gets", "check_lost", "check_runs", "check_stalls", "count_tasks"]


def _made_at(
    value: tuple[int, float, str], key: tuple[str, str], sets: Mapping[Any, Event]
) -> float:
    """When a value came to be: its resolver's origin read, or the end of the set that wrote it."""
    version, at, writer = value
    if writer.startswith("s:"):
        made = sets.get((*key, version))
        if made is not None:
            return made.t1
    return at


class _Newest:
    """Writes of one key ordered by when they are due, with running maxima: which write that is
    due by some instant began last, and which carries the highest version."""

    def __init__(self, writes: Iterable[Write]) -> None:
        self.ordered = sorted(writes, key=lambda w: w.due)
        self.dues = [w.due for w in self.ordered]
        self.latest: list[Write] = []
        self.highest: list[Write] = []
        for write in self.ordered:
            latest = self.latest[-1] if self.latest else write
            highest = self.highest[-1] if self.highest else write
            self.latest.append(write if write.event.t0 >= latest.event.t0 else latest)
            self.highest.append(
                write if (write.version or 0) >= (highest.version or 0) else highest
            )

    def due_by(self, instant: float) -> int:
        """How many of the writes are due before ``instant``."""
        return bisect.bisect_left(self.dues, instant)


def check_gets(
    report: Report,
    key_gets: list[Event],
    key_writes: list[Write],
    sets: Mapping[tuple[str, str, int], Event],
    origin_writes: Mapping[tuple[str | None, str | None, int | None], float],
) -> None:
    """P3 and P5 for every get of one key."""
    bounds = report.bounds
    writes = _Newest(w for w in key_writes if w.version is not None)
    invalidations = _Newest(w for w in key_writes if w.version is None)
    for get in key_gets:
        value = parse_value({"v": get.v, "t": get.vt, "w": get.w})
        if value is None:
            report.violations.append(Violation("bad_value", get, "not a versioned value"))
            continue
        # A write-through set's value is as old as its origin write (its cache step follows).
        born = value[1]
        if value[2].startswith("s:"):
            born = max(born, origin_writes.get((get.c, get.k, get.v), born))
        age = get.t0 - born
        report.max_staleness = max(report.max_staleness, age)
        if age > bounds.staleness_bound:
            report.violations.append(
                Violation(
                    "staleness",
                    get,
                    f"value {age:.3f}s old > ttl + stale_ttl + slack = {bounds.staleness_bound}s",
                )
            )
        made = _made_at(value, (get.c or "", get.k or ""), sets)
        filled = value[2].startswith("r:")
        culprit: Write | None = None
        n = writes.due_by(get.t0)
        if n:
            if filled:
                # A resolver's value must carry every version whose set is due: a fill that
                # read the origin before a set took its version cannot win over that set.
                highest = writes.highest[n - 1]
                if (highest.version or 0) > value[0]:
                    culprit = highest
            else:
                # A set's value may lose only to a set that began after it completed; sets
                # that overlapped may land in either order.
                latest = writes.latest[n - 1]
                if latest.event.t0 > made and (latest.version or 0) > value[0]:
                    culprit = latest
        n = invalidations.due_by(get.t0)
        if culprit is None and n and invalidations.latest[n - 1].event.t0 > made:
            culprit = invalidations.latest[n - 1]  # loaded before the invalidation began
        if culprit is None:
            continue
        what = f"v={culprit.version}" if culprit.version is not None else "an invalidation"
        report.violations.append(
            Violation(
                "stale_overwrite" if filled else "stale_read",
                get,
                f"value made at {made:.3f}; {what} ({culprit.event.op} began "
                f"{culprit.event.t0:.3f}) was due at {culprit.due:.3f}, "
                f"{get.t0 - culprit.due:.3f}s before this get",
                culprit.event,
            )
        )


def check_lost(
    report: Report,
    key_gets: list[Event],
    key_writes: list[Write],
    sets: Mapping[tuple[str, str, int], Event],
) -> None:
    """``lost_write``: an acknowledged set that no later get saw before the next set began.

    A get sees a set S if it returns S's version or a newer one, or the value of a set that
    overlapped S (which may land after S).
    """
    starts = [g.t0 for g in key_gets]

    def sees(get: Event, write: Write) -> bool:
        if (get.v or 0) >= (write.version or 0):
            return True
        value = parse_value({"v": get.v, "t": get.vt, "w": get.w})
        if value is None or not value[2].startswith("s:"):
            return False
        return _made_at(value, (get.c or "", get.k or ""), sets) >= write.event.t0

    set_writes = sorted((w for w in key_writes if w.version is not None), key=lambda w: w.event.t0)
    set_starts = [w.event.t0 for w in set_writes]
    for write in set_writes:
        following = bisect.bisect_right(set_starts, write.event.t1)
        until = set_starts[following] if following < len(set_starts) else float("inf")
        first = bisect.bisect_right(starts, write.due)
        last = bisect.bisect_left(starts, until)
        if first >= last:
            continue  # nobody looked while it was the newest write
        if not any(sees(key_gets[i], write) for i in range(first, last)):
            seen = key_gets[first]
            report.violations.append(
                Violation(
                    "lost_write",
                    write.event,
                    f"{last - first} get(s) after it was due ({write.due:.3f}) returned older "
                    f"versions, e.g. v={seen.v}",
                    seen,
                )
            )


def check_runs(
    report: Report,
    runs: Mapping[tuple[str, str], list[Event]],
    changes: Mapping[tuple[str, str], list[Write]] | None = None,
    began: Mapping[int, float] | None = None,
) -> None:
    """Count resolver runs of one key that overlap another run of it.

    A run that begins after a change of its key (a set, delete or invalidation) that landed
    while the older run was going is not a duplicate: the older run's value predates the change
    and cannot be served to a read that begins after it (P5), so a second run is what P4 allows
    (one run per expiry or change). The change may land anywhere in ``[t0, t1]``, and a run's
    load may have begun (taken its lock) anywhere from when its get began (``began``, by the
    run's ``id()``) to its origin read: a change excuses a run that began after the change's
    ``t0`` overlapping one whose load began before the change's ``t1``, in either order: the
    run whose origin read began later may be the older load (its thread took the lock, the
    change dropped it, another took it and read the origin first).
    """
    changes = changes or {}
    began = began or {}
    for key, key_runs in runs.items():
        report.resolver_runs += len(key_runs)
        ordered = sorted(key_runs, key=lambda e: e.t0)
        spans = sorted((w.event.t0, w.event.t1) for w in changes.get(key, ()))
        active: list[Event] = []
        for run in ordered:
            active = [a for a in active if a.t1 > run.t0]
            mine = began.get(id(run), run.t0)
            stale = [
                a
                for a in active
                if not _changed_between(spans, min(began.get(id(a), a.t0), mine), run.t0)
            ]
            if stale:
                report.duplicates += 1
                if report.bounds.dedup:
                    end = max(a.t1 for a in stale)
                    report.violations.append(
                        Violation("duplicate_run", run, f"overlaps another run ending {end:.3f}")
                    )
            active.append(run)


def _changed_between(spans: Sequence[tuple[float, float]], began: float, now: float) -> bool:
    """Whether some change ``(t0, t1)`` may have landed after ``began`` and before ``now``."""
    hi = bisect.bisect_right(spans, (now, float("inf")))
    return any(t1 >= began for _, t1 in spans[:hi])


def check_stalls(
    report: Report,
    gets: Mapping[tuple[str, str], list[Event]],
    runs: Mapping[tuple[str, str], list[Event]],
) -> None:
    """``stall``: gets that waited past the limit while nobody computed their key."""
    bounds = report.bounds
    all_runs = [r for key_runs in runs.values() for r in key_runs]
    slowest = max((r.duration for r in all_runs), default=0.0)
    report.stall_limit = bounds.stall_calls * bounds.op_timeout + bounds.stall_slack + slowest
    own: dict[tuple[int, str], list[Event]] = defaultdict(list)
    for run in sorted(all_runs, key=lambda r: r.t0):
        own[(run.p, run.th)].append(run)
    own_starts = {thread: [r.t0 for r in thread_runs] for thread, thread_runs in own.items()}
    for key, key_gets in gets.items():
        for get in key_gets:
            thread = (get.p, get.th)
            mine = 0.0
            if thread in own:
                lo = bisect.bisect_left(own_starts[thread], get.t0)
                hi = bisect.bisect_right(own_starts[thread], get.t1)
                mine = sum(r.duration for r in own[thread][lo:hi])
            waited = get.duration - mine
            report.max_stall = max(report.max_stall, waited)
            if waited <= report.stall_limit:
                continue
            # Waiting for a holder that is computing the key (slow, or cut off from Redis since)
            # is bounded by lock_ttl (P8). Waiting while nobody computes it is waiting out a
            # lock nobody holds.
            latest = get.t1 - report.stall_limit
            holders = [
                r
                for r in runs.get(key, ())
                if r.ok  # a failed run stores nothing: its lock only throttles
                and (r.p, r.th) != thread
                and r.t1 >= get.t0 - bounds.op_timeout
                and r.t0 <= latest
            ]
            if holders:
                report.held_stalls += 1
                continue
            first = min((r.t0 for r in runs.get(key, ()) if r.t0 >= get.t0), default=None)
            began = "none" if first is None else f"{first - get.t0:.3f}s after it began"
            report.violations.append(
                Violation(
                    "stall",
                    get,
                    f"waited {waited:.3f}s > {report.stall_limit:.3f}s while nobody computed the "
                    f"key (a lock nobody holds?); the key's first resolver run: {began}",
                )
            )


def count_tasks(report: Report, history: Sequence[Event]) -> None:
    """Task messages published, started, revoked (expired) and lost (never started), and how
    long each waited from its (first) publication to its (first) start."""
    published: Counter[str] = Counter()
    handled: Counter[str] = Counter()
    sent: dict[str, float] = {}
    waits: list[float] = []
    for event in history:
        task_id = str(event.x.get("id", ""))
        if event.op == "task_pub":
            published[task_id] += 1
            sent.setdefault(task_id, event.t0)
        elif event.op in ("task_run", "task_revoked"):
            if event.op == "task_run" and not handled[task_id] and task_id in sent:
                waits.append(event.t0 - sent[task_id])
            handled[task_id] += 1
    report.tasks = {
        "published": sum(published.values()),
        "started": report.ops["task_run"],
        "revoked": report.ops["task_revoked"],
        "lost": sum(max(0, n - handled[task_id]) for task_id, n in published.items()),
    }
    report.task_wait = (percentile(waits, 0.5), percentile(waits, 0.99), max(waits, default=0.0))
