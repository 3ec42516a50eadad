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
    P4, only with ``Bounds.dedup``: a resolver run of a key overlapped another run of it.

Faults (``fault`` events, or ``windows=``) extend when a write is due. A fault window ``[a, b]``
heals at ``h = b + recovery_base + min(b - a, recovery_cap)``: the library notices Redis is back
at its breaker's next probe (the breaker's cooldown doubles while the fault lasts), then replays
what it deferred. A write that begins before ``h`` and would be due after ``a`` is due at ``h``
(or later, if it completes later). P3 dates a write-through value from its origin write.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import INVALIDATIONS, Event, parse_value

__all__ = ["Bounds", "Report", "Violation", "Window", "check", "percentile"]


def _default_allowed() -> dict[str, frozenset[str]]:
    return {"get": frozenset({"InjectedResolverError"})}


@dataclass(frozen=True)
class Bounds:
    """What the run promised (the caches' options) and the allowances of the checker.

    ``allowed`` maps an op (``"get"``) or an op of one cache (``"set:soak_wt"``) to the
    exception type names a caller may see there.
    """

    ttl: float
    stale_ttl: float
    slack: float = 0.5
    bus_delay: float = 0.5
    recovery_base: float = 1.0
    recovery_cap: float = 5.0
    op_timeout: float = 0.25
    stall_calls: int = 3
    stall_slack: float = 0.5
    allowed: Mapping[str, frozenset[str]] = field(default_factory=_default_allowed)
    dedup: bool = False

    @property
    def staleness_bound(self) -> float:
        """The oldest a served value may be: ``ttl + stale_ttl + slack`` seconds."""
        return self.ttl + self.stale_ttl + self.slack


@dataclass(frozen=True)
class Window:
    """A fault window in wall-clock time."""

    start: float
    end: float
    kind: str = "fault"


@dataclass
class Violation:
    """One broken rule: the op that saw it (``event``) and the op that makes it one (``cause``)."""

    rule: str
    event: Event
    detail: str
    cause: Event | None = None

    def describe(self) -> str:
        text = f"{self.rule}: {self.event.describe()}: {self.detail}"
        if self.cause is not None:
            text += f"\n      because of {self.cause.describe()}"
        return text


@dataclass
class Report:
    """What :func:`check` found; ``violations`` empty means every rule held."""

    bounds: Bounds
    violations: list[Violation] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    served: int = 0
    latency: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    max_staleness: float = 0.0
    acknowledged: Counter[str] = field(default_factory=Counter)  # sets that returned, per cache
    # sets that raised although their version reached the origin (``origin_write``), per cache
    refused_but_written: Counter[str] = field(default_factory=Counter)
    resolver_runs: int = 0
    duplicates: int = 0
    stall_limit: float = 0.0
    max_stall: float = 0.0
    held_stalls: int = 0  # gets that waited past the limit for a holder computing the key
    tasks: dict[str, int] = field(default_factory=dict)
    task_wait: tuple[float, float, float] = (0.0, 0.0, 0.0)  # publication to start: p50/p99/max
    windows: list[Window] = field(default_factory=list)

    def count(self, rule: str, cache: str | None = None) -> int:
        """How many violations of ``rule`` (on ``cache`` only, if given)."""
        return sum(
            1 for v in self.violations if v.rule == rule and (cache is None or v.event.c == cache)
        )

    def rules(self) -> Counter[str]:
        return Counter(v.rule for v in self.violations)

    def summary(self) -> dict[str, Any]:
        """The figures as plain JSON-able data."""
        return {
            "violations": dict(self.rules()),
            "ops": dict(self.ops),
            "failures": dict(self.failures),
            "calls": self.calls,
            "served": self.served,
            "latency_ms": {
                op: [round(x * 1000, 3) for x in values] for op, values in self.latency.items()
            },
            "max_staleness": round(self.max_staleness, 3),
            "staleness_bound": self.bounds.staleness_bound,
            "acknowledged": dict(self.acknowledged),
            "refused_but_written": dict(self.refused_but_written),
            "resolver_runs": self.resolver_runs,
            "duplicates": self.duplicates,
            "stall_limit": round(self.stall_limit, 3),
            "max_stall": round(self.max_stall, 3),
            "held_stalls": self.held_stalls,
            "tasks": dict(self.tasks),
            "task_wait_ms": [round(x * 1000, 1) for x in self.task_wait],
            "windows": len(self.windows),
        }

    def render(self, limit: int = 20) -> str:
        """The violations, ``limit`` per rule, one or two lines each."""
        lines = [f"{len(self.violations)} violation(s): {dict(self.rules())}"]
        shown: Counter[str] = Counter()
        for violation in self.violations:
            shown[violation.rule] += 1
            if shown[violation.rule] <= limit:
                lines.append("  " + violation.describe())
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class _Write:
    """A write or invalidation of one key, with the instant it must be visible everywhere."""

    event: Event
    due: float
    version: int | None  # None: an invalidation


def check(events: Iterable[Event], bounds: Bounds, windows: Iterable[Window] = ()) -> Report:
    """Check every rule of the module's docstring over ``events`` (any order)."""
    history = sorted(events, key=lambda e: (e.t0, e.t1))
    spans = [*windows, *(Window(e.t0, e.t1, e.k or "fault") for e in history if e.op == "fault")]
    report = Report(bounds, windows=sorted(spans, key=lambda w: w.start))
    gets: dict[tuple[str, str], list[Event]] = defaultdict(list)
    writes: dict[tuple[str, str], list[_Write]] = defaultdict(list)
    sets: dict[tuple[str, str, int], Event] = {}
    runs: dict[tuple[str, str], list[Event]] = defaultdict(list)
    durations: dict[str, list[float]] = defaultdict(list)
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
            continue
        if event.op == "origin_write":
            continue
        _check_outcome(report, event)
        cache = event.c or ""
        if event.op == "get":
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
                writes[(cache, event.k or "")].append(_Write(event, due, event.v))
        elif event.op in INVALIDATIONS and event.ok:
            due = _due(event, bounds, report.windows)
            keys = (event.k,) if event.op == "delete" else event.ks
            for key in keys:
                writes[(cache, key or "")].append(_Write(event, due, None))
    report.latency = {
        op: (percentile(d, 0.5), percentile(d, 0.99), max(d)) for op, d in durations.items()
    }
    for (cache, key), key_gets in gets.items():
        _check_gets(report, key_gets, writes.get((cache, key), []), sets, origin_writes)
        _check_lost(report, key_gets, writes.get((cache, key), []), sets)
    _check_runs(report, runs)
    _check_stalls(report, gets, runs)
    _count_tasks(report, history)
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
            )
            if window.start <= due and event.t0 <= healed and healed > due:
                due, changed = healed, True
    return due


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

    def __init__(self, writes: Iterable[_Write]) -> None:
        self.ordered = sorted(writes, key=lambda w: w.due)
        self.dues = [w.due for w in self.ordered]
        self.latest: list[_Write] = []
        self.highest: list[_Write] = []
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


def _check_gets(
    report: Report,
    key_gets: list[Event],
    key_writes: list[_Write],
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
        culprit: _Write | None = None
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


def _check_lost(
    report: Report,
    key_gets: list[Event],
    key_writes: list[_Write],
    sets: Mapping[tuple[str, str, int], Event],
) -> None:
    """``lost_write``: an acknowledged set that no later get saw before the next set began.

    A get sees a set S if it returns S's version or a newer one, or the value of a set that
    overlapped S (which may land after S).
    """
    starts = [g.t0 for g in key_gets]

    def sees(get: Event, write: _Write) -> bool:
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


def _check_runs(report: Report, runs: Mapping[tuple[str, str], list[Event]]) -> None:
    """Count resolver runs of one key that overlap another run of it."""
    for key_runs in runs.values():
        report.resolver_runs += len(key_runs)
        ordered = sorted(key_runs, key=lambda e: e.t0)
        end = float("-inf")
        for run in ordered:
            if run.t0 < end:
                report.duplicates += 1
                if report.bounds.dedup:
                    report.violations.append(
                        Violation("duplicate_run", run, f"overlaps another run ending {end:.3f}")
                    )
            end = max(end, run.t1)


def _check_stalls(
    report: Report,
    gets: Mapping[tuple[str, str], list[Event]],
    runs: Mapping[tuple[str, str], list[Event]],
) -> None:
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
                if (r.p, r.th) != thread and r.t1 >= get.t0 - bounds.op_timeout and r.t0 <= latest
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


def _count_tasks(report: Report, history: Sequence[Event]) -> None:
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
