"""The shipped stores against the tier conformance suites, and the rest of oqron_cache.testing.

``L1StoreContract`` runs against ``MemoryStore``; ``L2StoreContract`` against ``RedisStore`` on
the shared Redis, built as ``Runtime.bind`` builds it, inside the test's namespace (deleted
afterwards). Then ``FakeClock`` and ``wait_for_refreshes`` with a real cache, and static checks
(read by mypy) that the concrete stores satisfy the protocols.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import oqron_cache.testing
from oqron_cache.config import Settings, current_runtime, reset
from oqron_cache.core.breaker import CircuitBreaker
from oqron_cache.core.keys import KeySpace, bus_channel
from oqron_cache.engine.l1 import MemoryStore
from oqron_cache.engine.tiers import L1Store, L2Store
from oqron_cache.redis.store import RedisConn, RedisStore
from oqron_cache.runtime import make_client
from oqron_cache.testing import FakeClock, L1StoreContract, L2StoreContract, wait_for_refreshes

# ---------------------------------------------------------------------------------------------
# the conformance suites


class TestMemoryStore(L1StoreContract):
    @pytest.fixture
    def store(self) -> MemoryStore:
        return MemoryStore(max_size=self.capacity)


class TestRedisStore(L2StoreContract):
    @pytest.fixture
    def store(self, redis_url: str, namespace: str) -> Iterator[RedisStore]:
        # As Runtime.bind: one client and RedisConn per runtime, a KeySpace per cache, the
        # namespace's bus channel. The ``namespace`` fixture deletes every key afterwards.
        client = make_client(Settings(redis_url, namespace, None, 1.0, 1.0, None))
        keyspace = KeySpace(namespace, "conformance", 200)
        try:
            yield RedisStore(RedisConn(client, CircuitBreaker()), keyspace, bus_channel(namespace))
        finally:
            client.close()


def test_the_shipped_stores_satisfy_the_protocols(redis_url: str) -> None:
    # Checked by mypy: each assignment type-checks only if the store satisfies the protocol,
    # and the ignore on the last one would be reported as unused if it were accepted.
    client = redis.Redis.from_url(redis_url)  # connects on first use, never here
    try:
        l1: L1Store = MemoryStore(max_size=10)
        l2: L2Store = RedisStore(RedisConn(client), KeySpace("t", "c", 200), bus_channel("t"))
        wrong_tier: L2Store = MemoryStore(max_size=10)  # type: ignore[assignment]
        assert isinstance(l1, MemoryStore)
        assert isinstance(l2, RedisStore)
        assert not hasattr(wrong_tier, "fill")
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# FakeClock


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == clock.now == 1_800_000_000.0
    time.sleep(0.01)
    assert clock() == 1_800_000_000.0
    clock.tick(1.5)
    assert clock() == 1_800_000_001.5
    clock.tick(0)
    assert clock() == 1_800_000_001.5
    assert FakeClock(start=5.0)() == 5.0


def test_the_clock_fixture_is_the_shipped_fake_clock(clock: FakeClock) -> None:
    assert type(clock) is oqron_cache.testing.FakeClock


# ---------------------------------------------------------------------------------------------
# wait_for_refreshes


class SlowRefresh:
    """A resolver whose refreshes (every call after the first) take a while, or wait on a gate."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.gate = gate
        self.refreshing = threading.Event()

    def __call__(self, key: str) -> str:
        self.calls.append(key)
        if len(self.calls) > 1:
            self.refreshing.set()
            if self.gate is not None:
                assert self.gate.wait(10), "test gate never opened"
            else:
                time.sleep(0.2)
        return f"{key}-v{len(self.calls)}"


def test_wait_for_refreshes_returns_once_the_refresh_is_written(
    configured: str, make_cache: Any
) -> None:
    # configured: Redis, no Celery app, so the refresh runs in the dispatcher's thread.
    clock = FakeClock()
    resolver = SlowRefresh()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=resolver, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(11)  # stale
    assert c.get("k") == "k-v1"  # served at once; the refresh takes 0.2 s in the background
    assert wait_for_refreshes()
    assert resolver.calls == ["k", "k"]  # the load, and exactly one refresh
    assert c.get("k") == "k-v2"


def test_wait_for_refreshes_gives_up_after_its_timeout(configured: str, make_cache: Any) -> None:
    clock = FakeClock()
    gate = threading.Event()
    resolver = SlowRefresh(gate)
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=resolver, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(11)
    assert c.get("k") == "k-v1"
    assert resolver.refreshing.wait(5)
    try:
        assert wait_for_refreshes(timeout=0.05) is False
    finally:
        gate.set()
    assert wait_for_refreshes() is True
    assert c.get("k") == "k-v2"


def test_wait_for_refreshes_without_a_runtime_is_true_and_makes_none() -> None:
    reset()
    assert wait_for_refreshes() is True
    assert current_runtime(create=False) is None
