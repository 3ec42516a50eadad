"""Per-cache counters and latency sums, cheap enough for the hot path.

The L1 hit path touches one counter (``gets``, an ``itertools.count``: ``next()`` on it is atomic
under the GIL, so counts stay exact with many threads) and times one read in
``LATENCY_SAMPLE`` to keep clock calls off most hits. Everything else is counted under a lock on the
slow paths. Field names follow DESIGN section 6.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Mapping
from typing import Any

LATENCY_SAMPLE = 16  # time one L1 hit in this many

COUNTERS = (
    "misses",  # reads that needed the resolver (ran it, or waited for a fill)
    "l2_hits",  # reads served from L2 (after an L1 miss)
    "stale_served",  # reads that returned a stale value
    "stampede_prevented",  # callers that got a value another caller's load produced
    "resolver_calls",  # resolver runs in this process
    "resolver_errors",
    "refreshes_enqueued",  # stale-while-revalidate refreshes handed on (to a worker or thread)
    "refreshes_deduplicated",  # refresh requests dropped because one was already pending/locked
    "refreshes_succeeded",
    "refresh_failures",
    "early_refreshes",  # probabilistic early refreshes requested (XFetch)
    "refreshes_dropped",  # the refresh queue was full: the request was dropped
    "enqueue_failures",  # refresh tasks the broker did not take in time (run here instead)
    "l2_errors",  # Redis calls that failed (down, slow, OOM, read-only)
    "l2_write_conflicts",  # fills refused because a newer write or invalidation won (P5)
    "invalidated_in_flight",  # fills withdrawn: a pattern/tag invalidation raced their load
    "oversize",  # values returned but not cached (max_value_bytes)
    "corrupt",  # L2 payloads that were not our envelope (treated as misses)
    "lock_timeouts",  # waiters that passed lock_ttl and computed the value themselves
    "evictions",  # L1 entries dropped because L1 was full
    "sets",
    "deletes",
    "fills_too_old",  # cold loads slower than a tombstone lives: returned, not cached
    "tag_members_pruned",  # tag index members of versions gone, dropped by sampling
    "writes_deferred",  # sets, deletes, invalidations L2 did not take: kept for replay (P14)
    "writes_replayed",  # ... applied when Redis answered again
    "writes_dropped",  # ... lost: the recovery queue overflowed (or the runtime closed)
    "writes_expired",  # ... not replayed: the value's stale_until passed meanwhile
    "releases_deferred",  # lock requests that timed out: released once Redis answers
    "releases_replayed",
    "bus_floods",  # invalidation messages beyond the rate limit: L1 cleared and paused instead
    "links_reloaded",  # write-through cache links retried after Redis failed: key dropped instead
)


TIERS = ("memory", "redis", "resolver")
# Upper bounds (seconds) of the latency histogram buckets, Prometheus-style (cumulative on export).
BUCKETS = (
    0.00001,
    0.00005,
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def count_value(counter: itertools.count[int]) -> int:
    # The next value an itertools.count would return, without consuming it.
    return int(repr(counter)[6:-1])


class Stats:
    """Counters of one cache in this process."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Every counter back to zero, with a new lock (what a forked child does).

        The child's counters start empty: the parent flushes what it counted, the child only
        what it counts itself. Takes no lock: a parent thread may have held the old one at fork.
        """
        self._lock = threading.Lock()
        self.gets = itertools.count()
        self.stale_fast = itertools.count()  # stale L1 hits whose refresh was already requested
        self.l2_hit = itertools.count()  # L2 hits (added to "l2_hits"): no lock on a hit
        self.counts: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # tier -> [total seconds, samples]
        self.latency: dict[str, list[float]] = {tier: [0.0, 0] for tier in TIERS}
        # tier -> observations per bucket (the last slot is +Inf)
        self.buckets: dict[str, list[int]] = {tier: [0] * (len(BUCKETS) + 1) for tier in TIERS}
        self._flushed: dict[str, float] = {}

    def incr(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name``."""
        with self._lock:
            self.counts[name] += amount

    def observe(self, tier: str, seconds: float) -> None:
        """Record one latency sample for ``tier`` ("memory", "redis" or "resolver")."""
        index = bisect.bisect_left(BUCKETS, seconds)
        with self._lock:
            slot = self.latency[tier]
            slot[0] += seconds
            slot[1] += 1
            self.buckets[tier][index] += 1

    def histogram(self, tier: str) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` buckets and the sum of ``tier``'s samples (Prometheus)."""
        with self._lock:
            counts = list(self.buckets[tier])
            total = self.latency[tier][0]
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
            running += count
            out.append((bound, running))
        return out, total

    def raw(self, evictions: int | None = None) -> dict[str, float]:
        """Every counter and latency sum as a flat mapping (what is aggregated in Redis)."""
        with self._lock:
            out: dict[str, float] = dict(self.counts)
            for tier, (total, n) in self.latency.items():
                out[f"lat_{tier}_s"] = total
                out[f"lat_{tier}_n"] = n
        out["gets"] = count_value(self.gets)
        out["stale_served"] += count_value(self.stale_fast)
        out["l2_hits"] += count_value(self.l2_hit)
        return out

    def snapshot(self, evictions: int | None = None) -> dict[str, Any]:
        """The DESIGN section 6 view of this process's counters."""
        return view(self.raw(evictions))

    def pending(self, evictions: int | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """``(current, delta)``: the counters now and what changed since :meth:`flushed`."""
        current = self.raw(evictions)
        delta = {k: v - self._flushed.get(k, 0) for k, v in current.items()}
        return current, {k: v for k, v in delta.items() if v}

    def flushed(self, current: dict[str, float]) -> None:
        """Record that ``current`` (from :meth:`pending`) is now counted in Redis."""
        self._flushed = current


def view(raw: Mapping[str, float]) -> dict[str, Any]:
    """Turn flat counters (one process's, or the sum over processes) into the stats dict."""
    gets = int(raw.get("gets", 0))
    misses = int(raw.get("misses", 0))
    hits = max(gets - misses, 0)
    latency = {}
    for tier in TIERS:
        n = raw.get(f"lat_{tier}_n", 0)
        latency[tier] = raw.get(f"lat_{tier}_s", 0.0) / n * 1000.0 if n else 0.0
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / gets if gets else 0.0,
        "stampede_prevented": int(raw.get("stampede_prevented", 0)),
        "avg_latency_ms": latency,
        "evictions": int(raw.get("evictions", 0)),
        "gets": gets,
        **{
            k: int(raw.get(k, 0))
            for k in COUNTERS
            if k not in ("misses", "stampede_prevented", "evictions")
        },
    }
