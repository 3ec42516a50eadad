"""One process's part in the demo: its caches, and bursts of concurrent ``get()`` calls on a key.

The demo sends the same three phases (:data:`PHASES`) to a :class:`Participant` in its own
process and in each helper process. A participant configures the library (Redis, namespace,
Celery app), declares the demo's caches on a counting resolver, records every latency sample
(:class:`RecordingStats`), and reports each burst as a JSON-able dict that
:class:`oqron_cache.demo_table.Totals` adds up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from ..config import configure, current_runtime, reset
from ..core.metrics import Stats
from ..frontend import Cache
from .resolver import CountingResolver, declare_caches, quiet_client

VISIBLE_TIMEOUT = 8.0  # the refreshed value must be read within this (lock_ttl is 5 s)
TIERS = ("memory", "redis", "resolver")


@dataclass(frozen=True)
class Phase:
    """One burst of requests on one key."""

    name: str
    label: str
    cache: str  # "main" (stale_ttl 0) or "swr" (stale_ttl 30 s)
    key: str


PHASES = (
    Phase("cold", "cold key", "main", "cold-key"),
    Phase("expired", "expired key", "main", "expiring-key"),
    Phase("stale", "stale key", "swr", "stale-key"),
)
_BY_NAME = {phase.name: phase for phase in PHASES}


class RecordingStats(Stats):
    """The library's stats, also keeping every latency sample so percentiles can be shown."""

    def __init__(self) -> None:
        super().__init__()
        self._samples: dict[str, list[float]] = {tier: [] for tier in TIERS}

    def observe(self, tier: str, seconds: float) -> None:
        super().observe(tier, seconds)
        with self._lock:
            self._samples[tier].append(seconds)

    def take_samples(self) -> dict[str, list[float]]:
        """The samples recorded since the last call (seconds, by tier)."""
        with self._lock:
            taken, self._samples = self._samples, {tier: [] for tier in TIERS}
        return taken


@contextlib.contextmanager
def _without_env_redis() -> Iterator[None]:
    # configure(redis_url=None) falls back to $OQRON_REDIS_URL; without Redis we mean none.
    saved = os.environ.pop("OQRON_REDIS_URL", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["OQRON_REDIS_URL"] = saved


class Participant:
    """One process's part: the demo's two caches, a counting resolver, bursts of requests."""

    def __init__(
        self, redis_url: str | None, namespace: str, threads: int, app: Any = None
    ) -> None:
        self.namespace = namespace
        self.threads = threads
        self.app = app
        self.resolver = CountingResolver()
        self.counter: redis.Redis | None = None
        self.caches: dict[str, Cache[Any]] = {}
        self.configured = redis_url is not None or app is not None
        try:
            if self.configured:
                env = _without_env_redis() if redis_url is None else contextlib.nullcontext()
                with env, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    configure(redis_url=redis_url, namespace=namespace, celery_app=app)
                for warning in caught:  # one line each, e.g. the broker eviction policy
                    print(f"warning: {warning.message}", file=sys.stderr)
            if redis_url is not None:
                self.counter = quiet_client(redis_url, 1.0)
            self.caches = declare_caches(self.resolver, shared=redis_url is not None)
        except BaseException:
            self.close()
            raise
        self.recorders: dict[str, RecordingStats] = {}
        for label, each in self.caches.items():
            # Before first use: the cache's engine binds to its stats object then.
            each.stats = self.recorders[label] = RecordingStats()

    def prime(self, write: bool) -> float:
        """Cache the keys of the expired and stale phases (``write``) and copy them into L1."""
        for phase in PHASES[1:]:
            target = self.caches[phase.cache]
            if write:
                target.set(phase.key, {"key": phase.key, "pid": os.getpid(), "primed": True})
            target.get(phase.key)
        return time.time()

    def run_phase(self, name: str, requests: int, start_at: float) -> dict[str, Any]:
        """Send ``requests`` concurrent ``get()`` calls at ``start_at``; report what happened.

        In the stale phase, also when this process first read a stale value and when it first
        read the refreshed one (waiting for it, up to :data:`VISIBLE_TIMEOUT`, after the burst).
        """
        phase = _BY_NAME[name]
        target = self.caches[phase.cache]
        recorder = self.recorders[phase.cache]
        stale_phase = phase.name == "stale"
        before = target.get_stats(local=True)
        calls_before = self.resolver.calls[phase.key]
        recorder.take_samples()  # drop samples of earlier work
        latencies: list[float] = []
        failures: list[int] = []
        stale_reads: list[float] = []  # wall clock of each thread's first stale read
        new_reads: list[float] = []  # ... and of its first read of the refreshed value
        go = threading.Event()

        def caller(count: int) -> None:
            go.wait()
            mine: list[float] = []
            failed = 0
            first_stale = first_new = None
            for _ in range(count):
                at = time.time()
                started = time.perf_counter()
                try:
                    value = target.get(phase.key)
                except Exception:
                    failed += 1
                    value = None
                mine.append(time.perf_counter() - started)
                if stale_phase and isinstance(value, dict):
                    if value.get("primed"):
                        first_stale = at if first_stale is None else first_stale
                    elif first_new is None:
                        first_new = time.time()
            latencies.extend(mine)  # one atomic extend per thread
            failures.append(failed)
            if first_stale is not None:
                stale_reads.append(first_stale)
            if first_new is not None:
                new_reads.append(first_new)

        callers = [
            threading.Thread(target=caller, args=(count,), name=f"demo-{index}", daemon=True)
            for index, count in enumerate(split(requests, self.threads))
            if count
        ]
        for thread in callers:
            thread.start()
        time.sleep(max(0.0, start_at - time.time()))
        go.set()
        for thread in callers:
            thread.join()
        burst_end = time.time()
        if stale_phase:  # this process's refresh request: handed to the worker (or run here)
            current_runtime().dispatcher.join(timeout=10.0)
        after = target.get_stats(local=True)
        delta = {
            counter: after[counter] - before[counter]
            for counter in (
                "stampede_prevented",
                "stale_served",
                "l2_errors",
                "resolver_errors",
                "resolver_calls",
                "refreshes_enqueued",
                "refreshes_deduplicated",
                "refreshes_succeeded",
                "enqueue_failures",
            )
        }
        report: dict[str, Any] = {
            "phase": name,
            "requests": requests,
            "errors": sum(failures),
            "calls": self.resolver.calls[phase.key] - calls_before,
            "stats": delta,
            "latency": latencies,
            "tiers": recorder.take_samples(),
            "burst_end": burst_end,
        }
        if stale_phase:
            report["first_stale"] = min(stale_reads, default=None)
            report["visible_at"] = min(new_reads, default=None) or self._wait_for_new(target, phase)
        return report

    @staticmethod
    def _wait_for_new(target: Cache[Any], phase: Phase) -> float | None:
        """Read ``phase.key`` until the refreshed value shows; when it did (``None``: never)."""
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                value = target.get(phase.key)
                if isinstance(value, dict) and not value.get("primed"):
                    return time.time()
            time.sleep(0.001)
        return None

    def close(self) -> None:
        """Close the caches and stop the library's threads."""
        for each in self.caches.values():
            each.close()
        self.caches.clear()
        self.resolver.close()
        if self.counter is not None:
            self.counter.close()
        if self.configured:
            reset()


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]
