"""A cold read never waits out a lock that nothing computes under (soak finding; P2, P8).

A key's lock says what its holder does: computing ("r"), a refresh task queued for a worker
("q"), or the throttle a failed refresh leaves ("f"). A cold load takes over a "q" or "f" lock
and computes at once; the queued task, when a worker finally starts it, finds its lock taken
and stands down, so the resolver still runs once. Against the shared Redis, with the real task
body (``run_refresh`` with the task's token, as ``oqron_cache.refresh`` calls it).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.engine.refresh import plan_refresh, run_refresh
from oqron_cache.redis.store import QUEUED
from tests.conftest import FakeClock

LOCK_TTL = "30s"  # what a read would wait, were it to wait for one of these locks


class Origin:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls += 1
        if self.fail:
            raise RuntimeError("origin down")
        return f"{key}#{self.calls}"


def cache_of(make_cache: Callable[..., Any], origin: Origin, clock: FakeClock) -> Any:
    return make_cache(
        tiers=[MemoryTier(max_size=10, ttl="10s"), RedisTier(ttl="10s")],
        stale_ttl="10s",
        resolver=origin,
        clock=clock,
        stampede=Stampede(lock_ttl=LOCK_TTL),
    )


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    value = fn()
    return value, time.monotonic() - started


def test_a_cold_read_takes_over_a_failed_refreshs_throttle(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    origin, clock = Origin(), FakeClock()
    cache = cache_of(make_cache, origin, clock)
    stack = cache.stack
    assert cache.get("k") == "k#1"
    seen = stack._read_l2("k").seen
    clock.tick(11)  # stale
    origin.fail = True
    assert plan_refresh(stack, "k", seen) == "failed"  # its lock now throttles refreshes
    assert plan_refresh(stack, "k", seen) == "locked"
    origin.fail = False
    clock.tick(10)  # expired: the next read is a cold load
    stack.l1.clear()
    value, took = timed(lambda: cache.get("k"))
    assert value == "k#3"
    assert took < 1.0, f"the cold read waited {took:.1f}s for a failed refresh's throttle"


def test_a_cold_read_takes_over_a_queued_refresh_that_then_stands_down(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    origin, clock = Origin(), FakeClock()
    cache = cache_of(make_cache, origin, clock)
    stack = cache.stack
    assert cache.get("k") == "k#1"
    seen = stack._read_l2("k").seen
    # A process sent a refresh task under this lock; no worker has started it (the broker lost
    # it, or the queue is long).
    token = secrets.token_hex(16)
    won, _, _, _ = stack.l2.acquire_or_read("k", token, 30.0, QUEUED)
    assert won
    clock.tick(21)  # past stale_ttl: cold
    stack.l1.clear()
    value, took = timed(lambda: cache.get("k"))
    assert value == "k#2"
    assert took < 1.0, f"the cold read waited {took:.1f}s for a task nobody ran"
    # The task reaches a worker at last: the value is there already; it does not compute.
    assert run_refresh(stack, "k", token, seen) == "superseded"
    assert origin.calls == 2
    # And a task whose lock a cold load holds right now (computing) stands down at once.
    seen = stack._read_l2("k").seen
    queued = secrets.token_hex(16)
    assert stack.l2.acquire_or_read("k", queued, 30.0, QUEUED)[0]
    assert stack.l2.acquire_or_read("k", secrets.token_hex(16), 30.0, take_over=True)[0]
    assert run_refresh(stack, "k", queued, seen) == "taken-over"
    assert origin.calls == 2


def test_a_cold_read_still_waits_for_a_holder_that_computes(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """Dedup stands: a lock taken by a load that computes is waited for (its fill wakes us)."""
    origin, clock = Origin(), FakeClock()
    gate, entered = threading.Event(), threading.Event()

    def slow(key: str) -> str:
        entered.set()
        assert gate.wait(10)
        return origin(key)

    cache = make_cache(
        tiers=[MemoryTier(max_size=10, ttl="10s"), RedisTier(ttl="10s")],
        resolver=slow,
        clock=clock,
        stampede=Stampede(lock_ttl=LOCK_TTL),
    )
    first: list[Any] = []
    loader = threading.Thread(target=lambda: first.append(cache.get("k")))
    loader.start()
    assert entered.wait(5)
    # Another process's cold read of the key (this process's flight would merge it).
    other: list[Any] = []
    stack = cache.stack
    from oqron_cache.engine.load import MISSING, load_as_leader

    waiter = threading.Thread(
        target=lambda: other.append(
            load_as_leader(stack, "k", slow, MISSING, stack._read_l2("k"))
        )
    )
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "the second load did not wait for the holder"
    gate.set()
    loader.join(5)
    waiter.join(5)
    assert first == other == ["k#1"]
    assert origin.calls == 1
