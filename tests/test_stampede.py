"""Stampede protection under real concurrency (promises P4 and P8), on the shared Redis.

Threads in this process, and separate processes (``tests/procs/stampede_worker.py``) started
together by a Redis list the parent pushes to. The resolver counts its runs exactly (a lock in
this process, an INCR in Redis across processes).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.core.entry import unpack
from oqron_cache.redis.replies import as_int
from tests.procs import Child, worker_args

THREADS = 64
PROCESSES = 4
RESOLVER_SLEEP = 0.05


class ResolverBoom(Exception):
    """The resolver's own error: callers must get exactly this, not a library error."""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every millisecond until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def run_threads(count: int, target: Callable[[int], None], timeout: float = 30.0) -> None:
    """Start ``count`` threads on ``target(index)`` together and join them (bounded)."""
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        barrier.wait()
        target(index)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "callers still blocked after the deadline"


def followers(cache: Any, key: str) -> int:
    """How many callers are waiting on this process's in-flight load of ``key``."""
    flight = cache.stack.flights._flights.get(key)
    return flight.followers if flight is not None else 0


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def two_tier(**kwargs: Any) -> dict[str, Any]:
    return {"tiers": [MemoryTier(max_size=1000), RedisTier(ttl="60s")], **kwargs}


# -- one process, many threads -------------------------------------------------------------


def test_64_threads_on_a_cold_key_run_the_resolver_once(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    calls = 0
    calls_lock = threading.Lock()

    def resolver(key: str) -> dict[str, Any]:
        nonlocal calls
        with calls_lock:
            calls += 1
        # Hold the load until every other caller has joined it, so the counters are exact.
        wait_until(
            lambda: followers(cache, "cold") == THREADS - 1,
            10,
            "every caller to join the in-process load",
        )
        time.sleep(RESOLVER_SLEEP)
        return {"key": key, "payload": list(range(5))}

    cache = make_cache(**two_tier(resolver=resolver))
    results: list[Any] = [None] * THREADS
    errors: list[BaseException] = []

    def call(index: int) -> None:
        try:
            results[index] = cache.get("cold")
        except BaseException as exc:
            errors.append(exc)

    run_threads(THREADS, call)

    assert errors == []
    assert calls == 1
    assert results == [{"key": "cold", "payload": [0, 1, 2, 3, 4]}] * THREADS
    stats = cache.get_stats()
    assert stats["gets"] == THREADS
    assert stats["misses"] == THREADS
    assert stats["hits"] == 0
    assert stats["stampede_prevented"] == THREADS - 1  # every miss but the leader's
    assert stats["resolver_calls"] == 1
    assert stats["lock_timeouts"] == 0
    assert stats["l2_errors"] == 0
    value_key = cache.stack.l2.keys.value("cold")
    assert redis_client.exists(value_key) == 1
    assert redis_client.exists(cache.stack.l2.keys.lock("cold")) == 0  # released by the fill

    assert cache.get("cold") == results[0]  # now an L1 hit
    assert cache.get_stats()["hits"] == 1
    assert calls == 1


# -- several processes ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("state", ["cold", "expired"])
def test_4_processes_x_64_threads_run_the_resolver_once(
    state: str, configured: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ns = configured
    name = f"mp-{uuid.uuid4().hex[:8]}"
    key = "hot:key"
    counter = f"oqron:{ns}:test:calls"
    go = f"oqron:{ns}:test:go"
    if state == "expired":
        past = time.time() - 3600
        old = oqron_cache.cache(name, ttl="60s", stale_ttl="10s", clock=lambda: past)
        try:
            old.set(key, {"key": key, "n": 0})
            l2 = old.stack.l2
            assert l2 is not None
            value_key = l2.keys.value(key)
        finally:
            old.close()
        raw = cast("bytes | None", redis_client.get(value_key))
        assert raw is not None  # physically present (ttl + stale_ttl = 70 s) ...
        entry, _, _ = unpack(raw)
        assert entry.stale_until < time.time() - 3000  # ... and long past its stale_until

    args = worker_args(
        "stampede",
        redis_url,
        ns,
        name,
        key,
        counter=counter,
        go=go,
        started=f"oqron:{ns}:test:started",
        processes=PROCESSES,
        threads=THREADS,
        sleep=RESOLVER_SLEEP,
    )
    children = [Child(args, tmp_path / f"worker-{i}.log") for i in range(PROCESSES)]
    try:
        for child in children:
            child.expect("ready", timeout=30)
        redis_client.rpush(go, *["go"] * PROCESSES)
        results = [child.expect("result", timeout=30) for child in children]
    finally:
        for child in children:
            child.close()

    assert int(cast("bytes | None", redis_client.get(counter)) or 0) == 1
    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    values = [v for r in results for v in r["values"]]
    assert len(values) == PROCESSES * THREADS
    assert all(v == {"key": key, "n": 1} for v in values), {repr(v) for v in values}
    assert sum(r["stats"]["resolver_calls"] for r in results) == 1
    # The processes really contended: the key was cold when more than one of them looked.
    assert sum(1 for r in results if r["stats"]["misses"] > 0) >= 2, results
    assert sum(r["stats"]["lock_timeouts"] for r in results) == 0
    assert sum(r["stats"]["l2_errors"] for r in results) == 0
    latencies = [lat for r in results for lat in r["latencies"]]
    per_process = [(r["stats"]["misses"], r["stats"]["l2_hits"]) for r in results]
    p50 = statistics.median(latencies) * 1000
    print(
        f"\n[{state}] {PROCESSES}x{THREADS} callers: p50 {p50:.1f} ms,"
        f" p99 {percentile(latencies, 0.99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms;"
        f" (misses, l2_hits) per process {per_process}"
    )


# -- a lock holder that dies (P8) ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("holder_lock_ttl", "expect_timeouts"),
    [
        # Same lock_ttl everywhere: the dead holder's lock expires before the waiter's own
        # deadline, so the waiter takes the lock over (no lock_timeout) and fills normally.
        ("1s", 0),
        # The holder locked for 30 s: the waiter gives up after ITS lock_ttl and computes the
        # value itself without the lock (liveness beats dedup): one lock_timeout.
        ("30s", 1),
    ],
)
def test_killed_lock_holder_delays_waiters_by_at_most_lock_ttl(
    holder_lock_ttl: str,
    expect_timeouts: int,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
    tmp_path: Path,
) -> None:
    lock_ttl = 1.0
    name = f"hold-{uuid.uuid4().hex[:8]}"
    key = "slow"
    calls = 0
    calls_lock = threading.Lock()

    def resolver(key: str) -> str:
        nonlocal calls
        with calls_lock:
            calls += 1
        return f"computed:{key}"

    holder = Child(
        worker_args("hold", redis_url, configured, name, key, lock_ttl=holder_lock_ttl),
        tmp_path / "holder.log",
    )
    try:
        holder.expect("holding", timeout=30)  # it holds the key's lock, inside its resolver
        cache = make_cache(
            name=name, **two_tier(resolver=resolver, stampede=Stampede(lock_ttl="1s"))
        )
        lock_key = cache.stack.l2.keys.lock(key)
        t_read = time.monotonic()
        pttl = as_int(redis_client.pttl(lock_key))
        assert pttl > 300, f"the holder's lock should still be held, PTTL={pttl}"
        results: list[Any] = [None] * 8
        done_at = [0.0] * 8
        errors: list[BaseException] = []

        def call(index: int) -> None:
            try:
                results[index] = cache.get(key)
            except BaseException as exc:
                errors.append(exc)
            done_at[index] = time.monotonic()

        waiters = threading.Thread(target=run_threads, args=(8, call))
        waiters.start()
        holder.kill()  # SIGKILL inside the resolver: the lock is never released
        waiters.join(15)
        assert not waiters.is_alive()
    finally:
        holder.close()

    assert errors == []
    assert results == ["computed:slow"] * 8
    assert calls == 1  # one leader in this process; the 7 others shared its load
    waits = [t - t_read for t in done_at]
    # Nobody could get past the lock before it expired (or before the waiter's own lock_ttl)...
    floor = min(pttl / 1000.0, lock_ttl) if expect_timeouts else pttl / 1000.0
    assert min(waits) >= floor - 0.01, (waits, pttl)
    # ... and nobody waited much longer than lock_ttl (P8).
    assert max(waits) < lock_ttl + 1.5, waits
    stats = cache.get_stats()
    assert stats["lock_timeouts"] == expect_timeouts
    assert stats["resolver_calls"] == 1
    assert stats["l2_errors"] == 0
    assert redis_client.exists(cache.stack.l2.keys.value(key)) == 1
    print(
        f"\n[holder lock_ttl={holder_lock_ttl}] lock PTTL when waiting began {pttl} ms; "
        f"waits {min(waits) * 1000:.0f}..{max(waits) * 1000:.0f} ms; "
        f"lock_timeouts={stats['lock_timeouts']}"
    )


# -- a resolver that raises ----------------------------------------------------------------


def test_resolver_error_on_cold_miss_reaches_every_caller_once(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    threads = 16
    calls = 0
    calls_lock = threading.Lock()

    def resolver(key: str) -> Any:
        nonlocal calls
        with calls_lock:
            calls += 1
        if calls == 1:  # the first load waits for every other caller to join it
            wait_until(
                lambda: followers(cache, "bad") == threads - 1,
                10,
                "every caller to join the in-process load",
            )
        raise ResolverBoom(f"origin down for {key}")

    cache = make_cache(**two_tier(resolver=resolver))
    outcomes: list[BaseException | None] = [None] * threads

    def call(index: int) -> None:
        try:
            cache.get("bad")
        except BaseException as exc:
            outcomes[index] = exc

    run_threads(threads, call)

    assert all(type(exc) is ResolverBoom for exc in outcomes), outcomes
    assert all(str(exc) == "origin down for bad" for exc in outcomes)
    assert calls == 1  # the 15 followers shared the leader's error
    stats = cache.get_stats()
    assert stats["resolver_errors"] == 1
    assert stats["resolver_calls"] == 0
    assert stats["stampede_prevented"] == threads - 1
    assert stats["l2_errors"] == 0
    # Nothing was cached and the lock was released: the next caller tries again at once.
    assert redis_client.exists(cache.stack.l2.keys.value("bad")) == 0
    assert redis_client.exists(cache.stack.l2.keys.lock("bad")) == 0
    started = time.monotonic()
    with pytest.raises(ResolverBoom):
        cache.get("bad")
    assert time.monotonic() - started < 0.5
    assert calls == 2


def test_resolver_error_unsynchronised_callers_get_the_resolver_error(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """Without holding the leader back: late callers may start a new load, never a library error."""
    threads = 16
    calls = 0
    calls_lock = threading.Lock()

    def resolver(key: str) -> Any:
        nonlocal calls
        with calls_lock:
            calls += 1
        time.sleep(RESOLVER_SLEEP)
        raise ResolverBoom(key)

    cache = make_cache(**two_tier(resolver=resolver))
    outcomes: list[BaseException | None] = [None] * threads

    def call(index: int) -> None:
        try:
            cache.get("bad")
        except BaseException as exc:
            outcomes[index] = exc

    run_threads(threads, call)

    assert all(type(exc) is ResolverBoom for exc in outcomes), outcomes
    assert 1 <= calls <= threads
    stats = cache.get_stats()
    assert stats["resolver_errors"] == calls
    assert stats["stampede_prevented"] == threads - calls
    print(f"\n[resolver error, 16 unsynchronised threads] resolver ran {calls} time(s)")
