"""Functional tests of the core two-tier cache against the real shared Redis.

Every test runs in its own namespace (``configured``) with an injected wall clock (``clock``);
background refreshes are awaited with the dispatcher's ``join()``, never with sleeps.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede, refreshing_cache
from oqron_cache.config import current_runtime, reset
from oqron_cache.core.entry import Entry, new_version, pack, unpack
from oqron_cache.core.errors import NotConfiguredError
from oqron_cache.redis.replies import as_int
from tests.conftest import Closing, FakeClock, T

# ---------------------------------------------------------------------------------------------
# helpers


class Source:
    """A resolver that counts its calls and returns ``<key>-v<n>`` (or what it is told to)."""

    def __init__(self, value: Callable[[str, int], Any] | None = None) -> None:
        self.calls: list[str] = []
        self.value = value or (lambda key, n: f"{key}-v{n}")
        self.error: BaseException | None = None
        self.gate: threading.Event | None = None  # when set, calls block until it opens
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Any:
        with self._lock:
            self.calls.append(key)
            n = len(self.calls)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        if self.error is not None:
            raise self.error
        return self.value(key, n)


class ResolverBroke(Exception):
    """The resolver's own error type (must reach the caller unchanged)."""


def join_refreshes() -> None:
    assert current_runtime().dispatcher.join(10), "background refreshes did not finish"


def envelope(client: redis.Redis, cache: Any, key: str) -> tuple[Entry, Any]:
    """The entry of ``key`` as stored in Redis, with its value decoded."""
    raw = cast("bytes | None", client.get(cache.stack.l2.keys.value(key)))
    assert raw is not None, f"no L2 entry for {key!r}"
    entry, codec_id, payload = unpack(raw)
    assert codec_id == cache.stack.codec.codec_id
    value = None if entry.tombstone else cache.stack.codec.decode(payload)
    return entry, value


def write_behind_its_back(
    client: redis.Redis, cache: Any, key: str, value: Any, now: float, ttl: float
) -> None:
    """Write an envelope straight into Redis, as another process would, without a bus message."""
    entry = Entry(value, now, now + ttl, now + ttl, new_version())
    payload = cache.stack.codec.encode(value, cache.name)
    client.set(cache.stack.l2.keys.value(key), pack(entry, cache.stack.codec.codec_id, payload))


@pytest.fixture
def closing() -> Iterator[Closing]:
    """``closing(decorated_function)``: close its cache after the test (names are reused)."""
    made: list[Any] = []

    def keep(func: T) -> T:
        made.append(func)
        return func

    try:
        yield keep
    finally:
        for func in made:
            func.cache.close()


# ---------------------------------------------------------------------------------------------
# get / set / delete / get_or_set through both tiers


def test_get_set_delete_through_both_tiers(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s")
    assert c.get("k") is None
    assert c.get("k", default="dflt") == "dflt"
    c.set("k", {"a": [1, 2.5, None, "é"]})
    assert c.get("k") == {"a": [1, 2.5, None, "é"]}
    assert envelope(redis_client, c, "k")[1] == {"a": [1, 2.5, None, "é"]}

    c.stack.l1.clear()  # only L2 holds it now
    before = c.get_stats()["l2_hits"]
    assert c.get("k") == {"a": [1, 2.5, None, "é"]}
    assert c.get_stats()["l2_hits"] == before + 1
    assert c.stack.l1.get("k") is not None  # L2 hit copied up into L1

    c.delete("k")
    assert c.stack.l1.get("k") is None
    assert envelope(redis_client, c, "k")[0].tombstone
    assert c.get("k") is None
    assert c.get("k", default=0) == 0


def test_get_or_set_calls_the_factory_once(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="60s")
    calls: list[int] = []

    def factory() -> list[int]:
        calls.append(1)
        return [len(calls)]

    assert c.get_or_set("k", factory) == [1]
    assert c.get_or_set("k", factory) == [1]
    c.stack.l1.clear()
    assert c.get_or_set("k", factory) == [1]  # from L2
    assert c.get("k") == [1]
    assert calls == [1]


def test_get_with_resolver_fills_both_tiers_once(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    source = Source()
    c = make_cache(ttl="60s", resolver=source)
    assert [c.get("k") for _ in range(5)] == ["k-v1"] * 5
    c.stack.l1.clear()
    assert c.get("k") == "k-v1"
    assert source.calls == ["k"]
    assert envelope(redis_client, c, "k")[1] == "k-v1"


@pytest.mark.parametrize("via", ["resolver", "get_or_set"])
def test_cached_none_is_a_value_not_a_miss(configured: str, make_cache: Any, via: str) -> None:
    source = Source(lambda key, n: None)
    if via == "resolver":
        c = make_cache(ttl="60s", resolver=source)

        def read() -> Any:
            return c.get("k", default="MISSING")
    else:
        c = make_cache(ttl="60s")

        def read() -> Any:
            return c.get_or_set("k", lambda: source("k"))

    for _ in range(3):
        assert read() is None
    c.stack.l1.clear()
    assert read() is None  # from L2
    assert source.calls == ["k"]
    assert c.get("k", default="MISSING") is None  # a cached None is not the default


def test_get_without_resolver_returns_default_and_caches_nothing(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s")
    sentinel = object()
    assert c.get("nope", default=sentinel) is sentinel
    assert c.get("nope") is None
    assert c.stack.l1.get("nope") is None
    assert redis_client.exists(c.stack.l2.keys.value("nope")) == 0


def test_miss_without_resolver_counts_as_a_miss(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="60s")
    c.get("nope")
    stats = c.get_stats()
    assert (stats["hits"], stats["misses"]) == (0, 1)


# ---------------------------------------------------------------------------------------------
# the entry in Redis


def test_entry_in_redis_has_physical_ttl_of_ttl_plus_stale_ttl(
    configured: str, make_cache: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s", stale_ttl="30s", resolver=Source(), clock=clock)
    start = clock.now
    assert c.get("k") == "k-v1"
    value_key = c.stack.l2.keys.value("k")
    assert value_key == f"oqron:{configured}:{{{c.name}:k}}:v"
    pttl = as_int(redis_client.pttl(value_key))
    assert 85_000 < pttl <= 90_000
    entry, value = envelope(redis_client, c, "k")
    assert value == "k-v1"
    assert entry.created_at == start
    assert entry.fresh_until == start + 60
    assert entry.stale_until == start + 90
    assert not entry.tombstone
    assert len(entry.version) == 8

    clock.tick(5)
    c.set("k", "set-value")
    pttl = as_int(redis_client.pttl(value_key))
    assert 85_000 < pttl <= 90_000
    entry, value = envelope(redis_client, c, "k")
    assert value == "set-value"
    assert (entry.fresh_until, entry.stale_until) == (start + 65, start + 95)


def test_entry_without_stale_window_expires_at_ttl(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="2m")
    c.set("k", 1)
    assert 115_000 < as_int(redis_client.pttl(c.stack.l2.keys.value("k"))) <= 120_000


# ---------------------------------------------------------------------------------------------
# fixed vs sliding


def test_fixed_goes_stale_at_ttl_regardless_of_reads(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    source = Source()
    c = make_cache(ttl="30s", resolver=source, clock=clock)
    for _ in range(3):  # t = 0, 10, 20
        assert c.get("k") == "k-v1"
        clock.tick(10)
    assert len(source.calls) == 1
    assert c.get("k") == "k-v2"  # t = 30: no stale window, so a reload
    assert len(source.calls) == 2


def test_sliding_keeps_a_read_entry_fresh_in_l1_and_l2(
    configured: str, make_cache: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    source = Source()
    c = make_cache(ttl="30s", stale_ttl="15s", strategy="sliding", resolver=source, clock=clock)
    start = clock.now
    assert c.get("k") == "k-v1"
    for _ in range(15):  # read every ttl/3 for 5 ttls
        clock.tick(10)
        assert c.get("k") == "k-v1"
    join_refreshes()
    assert source.calls == ["k"]
    stats = c.get_stats()
    assert stats["stale_served"] == 0
    assert stats["l2_hits"] >= 5  # L1 went back to L2 (at least every ttl/2) and slid it

    entry, value = envelope(redis_client, c, "k")
    assert value == "k-v1"
    assert entry.fresh_until > start + 150  # moved far past the first fill's start + 30
    assert entry.fresh_until <= clock.now + 30
    assert entry.stale_until - entry.fresh_until == 15
    assert as_int(redis_client.pttl(c.stack.l2.keys.value("k"))) > 40_000  # PEXPIRE slid too

    clock.tick(46)  # unread for longer than ttl + stale_ttl: a cold miss again
    assert c.get("k") == "k-v2"
    assert len(source.calls) == 2


def test_sliding_memory_only_keeps_a_read_entry_fresh(make_cache: Any, clock: FakeClock) -> None:
    reset()
    try:
        source = Source()
        c = make_cache(
            tiers=[MemoryTier(ttl="30s")], strategy="sliding", resolver=source, clock=clock
        )
        for _ in range(15):
            assert c.get("k") == "k-v1"
            clock.tick(10)
        join_refreshes()
        assert source.calls == ["k"]
    finally:
        reset()


# ---------------------------------------------------------------------------------------------
# stale-while-revalidate, bounded staleness, fail-safe


def test_stale_while_revalidate_serves_old_value_and_refreshes_once(
    configured: str, make_cache: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    source = Source()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=source, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(11)
    source.gate = threading.Event()  # hold the background refresh while we read
    source.entered.clear()
    for _ in range(5):
        assert c.get("k") == "k-v1"  # returned at once, stale
    assert source.entered.wait(10)
    source.gate.set()
    join_refreshes()
    assert source.calls == ["k", "k"]
    stats = c.get_stats()
    assert stats["stale_served"] == 5
    assert stats["refreshes_enqueued"] == 1
    assert stats["refreshes_succeeded"] == 1
    assert stats["refresh_failures"] == 0

    assert c.get("k") == "k-v2"
    c.stack.l1.clear()
    assert c.get("k") == "k-v2"
    entry, value = envelope(redis_client, c, "k")
    assert value == "k-v2"
    assert entry.fresh_until == clock.now + 10
    assert len(source.calls) == 2


def _wait_calls(source: Source, n: int) -> None:
    deadline = time.monotonic() + 10
    while len(source.calls) < n:
        assert time.monotonic() < deadline, f"resolver called {len(source.calls)} times, not {n}"
        time.sleep(0.001)


def test_a_full_refresh_queue_drops_the_request_and_the_next_stale_read_asks_again(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    dispatcher = current_runtime().dispatcher
    dispatcher.max_queue = 2  # read when the stack is built (below)
    source = Source()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=source, clock=clock)
    keys = ["a", "b", "c", "d", "e"]
    for key in keys:
        assert c.get(key) == f"{key}-v{len(source.calls)}"
    clock.tick(11)
    source.gate = threading.Event()
    # Both drainer threads take a refresh and block in the resolver; two more wait in the queue.
    assert [c.get(k) for k in ("a", "b")] == ["a-v1", "b-v2"]
    _wait_calls(source, 7)
    assert [c.get(k) for k in ("c", "d")] == ["c-v3", "d-v4"]
    assert c.get("e") == "e-v5"  # the queue is full: served stale, the request dropped
    stats = c.get_stats(local=True)
    assert (stats["stale_served"], stats["refreshes_dropped"]) == (5, 1)
    source.gate.set()
    join_refreshes()
    assert sorted(source.calls[5:]) == ["a", "b", "c", "d"]
    # The dropped copy was not marked as asked for: its next read asks again.
    assert c.get("e") == "e-v5"
    join_refreshes()
    assert source.calls[-1] == "e"
    assert c.get("e") == "e-v10"
    assert c.get_stats(local=True)["refreshes_dropped"] == 1


def test_a_failed_refresh_is_retried_when_its_lock_expires_not_a_lock_ttl_later(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    # Real time on purpose: the key's lock (the retry throttle) is a Redis TTL.
    lock_ttl, work = 1.0, 0.4
    calls: list[tuple[float, float]] = []  # (start, end) of each resolver run, monotonic

    def slow_to_fail(key: str) -> str:
        start = time.monotonic()
        if calls:  # the retry succeeds
            calls.append((start, start))
            return "v2"
        time.sleep(work)
        calls.append((start, time.monotonic()))
        raise ResolverBroke("origin down")

    c = make_cache(
        ttl="10s",
        stale_ttl="60s",
        resolver=slow_to_fail,
        clock=clock,
        stampede=Stampede(lock_ttl=lock_ttl),
    )
    c.set("k", "v1")
    clock.tick(11)
    deadline = time.monotonic() + 10
    while len(calls) < 2:  # a reader polling the stale value every 5 ms
        assert c.get("k") in ("v1", "v2")
        assert time.monotonic() < deadline, "the failed refresh was never retried"
        time.sleep(0.005)
    # The failure held the lock for lock_ttl from its end: the retry comes then. Before, the
    # copy asked again lock_ttl after its first request, found the lock taken (work seconds
    # left) and waited a whole lock_ttl more.
    retry_wait = calls[1][0] - calls[0][1]
    assert lock_ttl - 0.05 <= retry_wait <= lock_ttl + 0.3, retry_wait
    join_refreshes()
    assert c.get("k") == "v2"


def test_dispatcher_join_waits_for_running_refreshes_and_times_out_cleanly(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    dispatcher = current_runtime().dispatcher
    source = Source()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=source, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(11)
    source.gate = threading.Event()
    assert c.get("k") == "k-v1"
    _wait_calls(source, 2)
    assert dispatcher.join(0.05) is False  # the refresh is still running
    # Two joins at once must not split the drainers between them (each would wait for both).
    results: list[bool] = []
    joiners = [threading.Thread(target=lambda: results.append(dispatcher.join(10))) for _ in "ab"]
    for joiner in joiners:
        joiner.start()
    source.gate.set()
    for joiner in joiners:
        joiner.join(15)
    assert results == [True, True]
    assert c.get("k") == "k-v2"


@pytest.mark.parametrize("l1_cleared", [False, True], ids=["from-L1", "from-L2"])
def test_value_older_than_ttl_plus_stale_ttl_is_never_served(
    configured: str, make_cache: Any, clock: FakeClock, l1_cleared: bool
) -> None:
    source = Source()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=source, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(70)  # exactly stale_until: expired (P3)
    if l1_cleared:
        c.stack.l1.clear()
    assert c.get("k") == "k-v2"  # blocked on the resolver, got the new value
    join_refreshes()
    assert len(source.calls) == 2
    stats = c.get_stats()
    assert stats["stale_served"] == 0
    assert stats["refreshes_enqueued"] == 0


def test_resolver_failing_in_background_refresh_keeps_stale_value(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    source = Source()
    c = make_cache(ttl="10s", stale_ttl="60s", resolver=source, clock=clock)
    assert c.get("k") == "k-v1"
    clock.tick(11)
    source.error = ResolverBroke("origin down")
    assert c.get("k") == "k-v1"
    join_refreshes()
    assert c.get_stats()["refresh_failures"] == 1
    # Still served, no exception, and the failed key is throttled (no retry storm).
    for _ in range(5):
        assert c.get("k") == "k-v1"
        clock.tick(1)
    join_refreshes()
    stats = c.get_stats()
    assert len(source.calls) == 2
    assert stats["refresh_failures"] == 1
    assert stats["refreshes_succeeded"] == 0
    # Every read got the stale value; the five after the first did not even ask again (this
    # copy's refresh was requested and is throttled for lock_ttl).
    assert stats["stale_served"] == 6


def test_resolver_failing_on_a_stale_load_without_swr_falls_back_to_stale(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    source = Source()
    c = make_cache(
        ttl="10s",
        stale_ttl="60s",
        stampede=Stampede(stale_while_revalidate=False),
        resolver=source,
        clock=clock,
    )
    assert c.get("k") == "k-v1"
    clock.tick(11)
    source.error = ResolverBroke("origin down")
    assert c.get("k") == "k-v1"  # foreground load failed: fail-safe to the stale value
    source.error = None
    assert c.get("k") == "k-v3"  # a stale read without SWR loads in the foreground
    assert len(source.calls) == 3


def test_resolver_failing_on_a_cold_miss_raises_its_own_error(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    source = Source()
    source.error = ResolverBroke("no such user")
    c = make_cache(ttl="60s", resolver=source)
    with pytest.raises(ResolverBroke, match="no such user"):
        c.get("k")
    assert c.get_stats()["resolver_errors"] == 1
    assert redis_client.exists(c.stack.l2.keys.value("k")) == 0
    assert redis_client.exists(c.stack.l2.keys.value("k")[:-1] + "l") == 0  # lock released
    source.error = None
    assert c.get("k") == "k-v2"  # the error was not cached


# ---------------------------------------------------------------------------------------------
# L1 bounds


def test_l1_ttl_shorter_than_l2_ttl_rereads_l2(
    configured: str, make_cache: Any, clock: FakeClock, redis_client: redis.Redis
) -> None:
    source = Source()
    c = make_cache(tiers=[MemoryTier(ttl="5s"), RedisTier(ttl="60s")], resolver=source, clock=clock)
    assert c.get("k") == "k-v1"
    assert c.get("k") == "k-v1"
    assert c.get_stats()["l2_hits"] == 0
    # Another process rewrites L2 (no bus message reaches us): L1 keeps its copy ...
    write_behind_its_back(redis_client, c, "k", "behind", clock.now, 60)
    clock.tick(4)
    assert c.get("k") == "k-v1"
    assert c.get_stats()["l2_hits"] == 0
    # ... only until its own ttl; then it looks below again.
    clock.tick(1.5)
    assert c.get("k") == "behind"
    assert c.get_stats()["l2_hits"] == 1
    assert c.get("k") == "behind"
    assert c.get_stats()["l2_hits"] == 1
    assert source.calls == ["k"]


@pytest.mark.parametrize("with_l2", [True, False], ids=["L1+L2", "L1-only"])
def test_l1_evictions_and_max_size(
    make_cache: Any, redis_url: str, namespace: str, with_l2: bool
) -> None:
    reset()
    if with_l2:
        oqron_cache.configure(redis_url=redis_url, namespace=namespace)
    try:
        tiers: list[Any] = [MemoryTier(max_size=3, ttl="60s")]
        if with_l2:
            tiers.append(RedisTier(ttl="60s"))
        c = make_cache(tiers=tiers, resolver=Source())
        for i in range(5):
            c.set(f"s{i}", i)
            assert len(c.stack.l1) <= 3
        assert c.get_stats()["evictions"] == 2
        for i in range(5):
            c.get(f"g{i}")
            assert len(c.stack.l1) <= 3
        assert c.get_stats()["evictions"] == 7
        assert len(c.stack.l1) == 3
        assert sorted(c.stack.l1.keys()) == ["g2", "g3", "g4"]
    finally:
        reset()


# ---------------------------------------------------------------------------------------------
# max_value_bytes (P9)


def test_oversize_value_is_returned_but_not_cached(
    configured: str,
    make_cache: Any,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = Source(lambda key, n: "x" * 200 + str(n))
    c = make_cache(ttl="60s", resolver=source, max_value_bytes=100)
    with caplog.at_level(logging.WARNING, logger="oqron_cache"):
        assert c.get("big") == "x" * 200 + "1"
        assert c.get("big") == "x" * 200 + "2"  # not cached: the resolver runs again
    assert len(source.calls) == 2
    assert c.get_stats()["oversize"] == 2
    assert c.stack.l1.get("big") is None
    assert redis_client.exists(c.stack.l2.keys.value("big")) == 0
    assert redis_client.exists(c.stack.l2.keys.value("big")[:-1] + "l") == 0  # lock released
    assert any("max_value_bytes=100" in r.getMessage() for r in caplog.records)


def test_oversize_set_drops_the_previous_value(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s", max_value_bytes=100)
    c.set("k", "small")
    assert c.get("k") == "small"
    c.set("k", "x" * 500)
    assert c.get("k") is None  # the old value is not served any more
    c.stack.l1.clear()
    assert c.get("k") is None
    assert envelope(redis_client, c, "k")[0].tombstone
    assert c.get_stats()["oversize"] == 1


def test_value_exactly_max_value_bytes_is_cached(configured: str, make_cache: Any) -> None:
    source = Source(lambda key, n: "y" * 98)  # JSON: 98 chars + 2 quotes = 100 bytes
    c = make_cache(ttl="60s", resolver=source, max_value_bytes=100)
    c.get("k")
    c.get("k")
    assert len(source.calls) == 1
    assert c.get_stats()["oversize"] == 0


def test_oversize_value_is_not_cached_by_a_memory_only_cache(make_cache: Any) -> None:
    reset()
    try:
        source = Source(lambda key, n: "x" * 200)
        c = make_cache(tiers=[MemoryTier(ttl="60s")], resolver=source, max_value_bytes=100)
        c.get("big")
        c.get("big")
        assert len(source.calls) == 2
        assert c.get_stats()["oversize"] == 2
        assert c.stack.l1.get("big") is None
        c.set("k", "small")
        c.set("k", "x" * 200)
        assert c.stack.l1.get("k") is None  # the oversize set dropped the old value
        with pytest.raises(oqron_cache.SerializationError, match="set"):
            c.set("k", {1, 2})  # same codec rules as with an L2
    finally:
        reset()


# ---------------------------------------------------------------------------------------------
# stats


def test_stats_fields_and_exact_values_after_a_scripted_sequence(
    configured: str, make_cache: Any
) -> None:
    c = make_cache(ttl="60s", resolver=Source())
    empty = c.get_stats()
    for name in ("hits", "misses", "stampede_prevented", "evictions"):
        assert type(empty[name]) is int, name
        assert empty[name] == 0, name
    assert type(empty["hit_rate"]) is float
    assert empty["hit_rate"] == 0.0
    assert set(empty["avg_latency_ms"]) == {"memory", "redis", "resolver"}
    assert all(type(v) is float for v in empty["avg_latency_ms"].values())
    for name in ("stale_served", "refreshes_enqueued", "refreshes_succeeded", "refresh_failures"):
        assert empty[name] == 0, name

    c.get("a")  # miss -> resolver
    c.get("a")  # L1 hit
    c.get("a")  # L1 hit
    c.get("b")  # miss -> resolver
    c.stack.l1.clear()
    c.get("a")  # L2 hit
    stats = c.get_stats()
    assert stats["hits"] == 3
    assert stats["misses"] == 2
    assert stats["hit_rate"] == pytest.approx(0.6)
    assert stats["stampede_prevented"] == 0
    assert stats["evictions"] == 0
    assert stats["resolver_calls"] == 2
    assert stats["l2_hits"] == 1
    assert stats["stale_served"] == 0
    assert stats["avg_latency_ms"]["resolver"] > 0.0
    assert stats["avg_latency_ms"]["redis"] > 0.0
    assert stats["avg_latency_ms"]["memory"] >= 0.0


# ---------------------------------------------------------------------------------------------
# options: dict forms, memory-only without configure()


def test_seed_dict_forms_mean_the_same_as_the_objects(
    configured: str, make_cache: Any, clock: FakeClock
) -> None:
    by_dict = make_cache(
        tiers=[
            {"name": "memory", "adapter": "memory", "max_size": 1000, "ttl": "30s"},
            {"name": "redis", "adapter": "redis", "ttl": "10m"},
        ],
        stampede={"enabled": True, "lock_ttl_ms": 5000, "stale_while_revalidate": True},
        resolver=Source(),
        clock=clock,
    )
    by_object = make_cache(
        tiers=[MemoryTier(max_size=1000, ttl="30s"), RedisTier(ttl="10m")],
        stampede=Stampede(enabled=True, lock_ttl="5s", stale_while_revalidate=True),
        resolver=Source(),
        clock=clock,
    )
    assert by_dict.options.l1 == by_object.options.l1 == MemoryTier(1000, 30)
    assert by_dict.options.l2 == by_object.options.l2
    assert by_dict.options.l2.ttl == 600
    assert by_dict.options.stampede == by_object.options.stampede
    assert by_dict.options.stampede.lock_ttl == 5.0
    assert by_dict.options.ttl == by_object.options.ttl == 600
    assert by_dict.get("k") == by_object.get("k") == "k-v1"
    assert by_dict.stack.l1 is not None
    assert by_dict.stack.l2 is not None


def test_memory_only_cache_works_without_configure(make_cache: Any, clock: FakeClock) -> None:
    reset()
    try:
        source = Source()
        c = make_cache(tiers=[MemoryTier(max_size=10, ttl="30s")], resolver=source, clock=clock)
        assert c.get("k") == "k-v1"
        assert c.get("k") == "k-v1"
        c.set("s", [1])
        assert c.get("s") == [1]
        c.delete("s")
        assert c.stack.l1.get("s") is None
        assert c.get("s") == "s-v2"  # deleted, so the resolver loads it
        assert c.stack.l2 is None
        assert source.calls == ["k", "s"]
        clock.tick(30)
        assert c.get("k") == "k-v3"  # the memory tier's ttl is the freshness
    finally:
        reset()


def test_redis_tier_without_configure_is_one_clear_error(make_cache: Any) -> None:
    reset()
    try:
        c = make_cache(ttl="30s")
        with pytest.raises(NotConfiguredError, match=c.name) as info:
            c.get("k")
        assert "configure" in str(info.value)
        assert info.value.cache == c.name
    finally:
        reset()


# ---------------------------------------------------------------------------------------------
# writes, deletes and versioned fills (P5)


def test_set_is_visible_to_get_through_l2(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    source = Source()
    c = make_cache(ttl="60s", resolver=source)
    assert c.get("k") == "k-v1"
    c.set("k", "written")
    assert c.get("k") == "written"
    c.stack.l1.clear()
    assert c.get("k") == "written"
    assert envelope(redis_client, c, "k")[1] == "written"
    assert source.calls == ["k"]


def test_delete_tombstone_defeats_an_older_in_flight_fill(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s")
    c.set("k", "old")
    found = c.stack._read_l2("k")  # a fill/refresh starts: it saw this version
    assert found is not None
    assert found.entry is not None
    c.delete("k")  # ... then the key is deleted
    c.stack._store("k", "old", found.basis(), 0.0)  # ... then the fill tries to land
    assert c.get("k") is None
    c.stack.l1.clear()
    assert c.get("k") is None
    assert envelope(redis_client, c, "k")[0].tombstone
    assert c.get_stats()["l2_write_conflicts"] == 1


def test_set_defeats_an_older_in_flight_fill(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="60s")
    c.set("k", "v1")
    found = c.stack._read_l2("k")
    assert found is not None
    c.set("k", "v2")
    c.stack._store("k", "v1-recomputed", found.basis(), 0.0)
    assert c.get("k") == "v2"
    c.stack.l1.clear()
    assert c.get("k") == "v2"
    assert c.get_stats()["l2_write_conflicts"] == 1


def test_fill_after_delete_then_reload_works(configured: str, make_cache: Any) -> None:
    source = Source()
    c = make_cache(ttl="60s", resolver=source)
    assert c.get("k") == "k-v1"
    c.delete("k")
    assert c.get("k") == "k-v2"  # a tombstone is a miss for a new load (which saw it)
    c.stack.l1.clear()
    assert c.get("k") == "k-v2"


# ---------------------------------------------------------------------------------------------
# invalidate_pattern


def test_invalidate_pattern_is_confined_to_the_cache_and_literal(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="60s")
    sibling = make_cache(ttl="60s")
    for key in ("user_1", "user_2", "order_1", "a*b", "axb", "user_[1]"):
        c.set(key, key)
    sibling.set("user_1", "sibling")

    assert c.invalidate_pattern("user_*") == 3
    for key in ("user_1", "user_2", "user_[1]"):
        assert c.get(key) is None
        assert redis_client.exists(c.stack.l2.keys.value(key)) == 0
    assert c.get("order_1") == "order_1"
    assert sibling.get("user_1") == "sibling"
    assert redis_client.exists(sibling.stack.l2.keys.value("user_1")) == 1

    assert c.invalidate_pattern("a\\*c") == 0
    assert c.invalidate_pattern("a\\*b") == 1  # the literal star only
    assert c.get("a*b") is None
    assert c.get("axb") == "axb"
    assert c.invalidate_pattern("[ab]x[b]") == 1
    assert c.get("axb") is None
    assert c.get("order_1") == "order_1"


@pytest.mark.parametrize("pattern", ["*", "", "**"])
def test_invalidate_everything_needs_allow_all(
    configured: str, make_cache: Any, pattern: str
) -> None:
    c = make_cache(ttl="60s")
    c.set("k", 1)
    with pytest.raises(ValueError, match="allow_all"):
        c.invalidate_pattern(pattern)
    assert c.get("k") == 1


def test_invalidate_all_with_allow_all_leaves_siblings(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="60s")
    sibling = make_cache(ttl="60s")
    for i in range(3):
        c.set(f"k{i}", i)
    sibling.set("k0", "s")
    assert c.invalidate_pattern("*", allow_all=True) == 3
    assert [c.get(f"k{i}") for i in range(3)] == [None] * 3
    assert sibling.get("k0") == "s"


def test_invalidate_pattern_question_mark_matches_any_one_character(
    configured: str, make_cache: Any
) -> None:
    c = make_cache(ttl="60s")
    c.set("a b", 1)
    c.set("aéb", 2)
    c.set("a\nb", 3)
    c.set("ab", 4)
    c.set("a  b", 5)
    assert c.invalidate_pattern("a?b") == 3
    assert [c.get(k) for k in ("a b", "aéb", "a\nb", "ab", "a  b")] == [None, None, None, 4, 5]


# ---------------------------------------------------------------------------------------------
# @refreshing_cache


def test_decorated_keys_are_typed(configured: str, closing: Closing) -> None:
    calls: list[Any] = []

    @closing
    @refreshing_cache(ttl="60s")
    def f(*args: Any) -> str:
        calls.append(args)
        return "|".join(repr(a) for a in args)

    assert f(1) == "1"
    assert f(True) == "True"
    assert f(1.0) == "1.0"
    assert f("a:b", "c") == "'a:b'|'c'"
    assert f("a", "b:c") == "'a'|'b:c'"
    for _ in range(2):  # all cached, each under its own key
        assert [f(1), f(True), f(1.0), f("a:b", "c"), f("a", "b:c")] == [
            "1",
            "True",
            "1.0",
            "'a:b'|'c'",
            "'a'|'b:c'",
        ]
    assert len(calls) == 5


def test_decorated_kwargs_order_is_irrelevant(configured: str, closing: Closing) -> None:
    calls: list[Any] = []

    @closing
    @refreshing_cache(ttl="60s")
    def g(**kw: Any) -> dict[str, Any]:
        calls.append(kw)
        return kw

    assert g(a=1, b=2) == {"a": 1, "b": 2}
    assert g(b=2, a=1) == {"a": 1, "b": 2}
    assert g(**{"a": "b=1"}) == {"a": "b=1"}
    assert g(**{"a=b": "1"}) == {"a=b": "1"}
    assert len(calls) == 3


def test_decorated_methods_of_two_classes_are_distinct_caches(
    configured: str, closing: Closing
) -> None:
    class A:
        def __cache_key__(self) -> str:
            return "same"

        @refreshing_cache(ttl="60s")
        def active(self) -> str:
            return "A"

    class B:
        def __cache_key__(self) -> str:
            return "same"

        @refreshing_cache(ttl="60s")
        def active(self) -> str:
            return "B"

    closing(A.active)
    closing(B.active)
    assert A.active.cache.name != B.active.cache.name
    assert A.active.cache.name == f"{__name__}.{A.__qualname__}.active".replace("<", "").replace(
        ">", ""
    )
    assert A.active.cache.name.endswith("A.active")
    # A decorated method binds self (for mypy too: CachedFunction declares __get__); its
    # controls take self explicitly.
    assert A().active() == "A"
    assert B().active() == "B"
    assert A().active() == "A"
    A.active.invalidate(A())
    assert A.active.key_for(A()) == A.active.key_for(A())
    assert A().active() == "A"


def test_decorated_controls_and_wraps(configured: str, closing: Closing) -> None:
    calls: list[int] = []

    def square(x: int) -> int:
        """Square a number."""
        calls.append(x)
        return x * x * (len(calls) if x == 3 else 1)

    f = closing(refreshing_cache(ttl="60s", name="core-square-" + configured)(square))
    assert f.__name__ == "square"
    assert f.__doc__ == "Square a number."
    assert f.__wrapped__ is square
    assert f.original is square
    assert isinstance(f.cache, oqron_cache.Cache)
    assert f.cache.name == "core-square-" + configured

    assert f(3) == 9
    assert f(3) == 9
    assert calls == [3]
    f.invalidate(3)
    assert f(3) == 18  # recomputed (call #2)
    assert f.refresh(3) == 27  # recomputed now and stored (call #3)
    assert f(3) == 27
    l1 = f.cache.stack.l1
    assert l1 is not None
    l1.clear()
    assert f(3) == 27  # the refresh reached L2 too
    assert calls == [3, 3, 3]
    assert f.get_stats()["misses"] == 2


def test_decorated_function_is_refreshed_in_the_background_from_its_key(
    configured: str, closing: Closing, clock: FakeClock
) -> None:
    calls: list[tuple[Any, ...]] = []

    @closing
    @refreshing_cache(ttl="10s", stale_ttl="60s", clock=clock)
    def h(n: int | str, tags: tuple[str, ...] = (), *, scale: float = 1.0) -> list[Any]:
        calls.append((n, tags, scale))
        return [n, list(tags), scale, len(calls)]

    assert h(2, ("x", "y"), scale=0.5) == [2, ["x", "y"], 0.5, 1]
    assert h("id") == ["id", [], 1.0, 2]  # the fast path's key
    clock.tick(11)
    assert h(2, ("x", "y"), scale=0.5) == [2, ["x", "y"], 0.5, 1]  # stale, served at once
    assert h("id") == ["id", [], 1.0, 2]
    join_refreshes()
    # Rebuilt from the keys alone, with their types (a tuple is not equal to a list).
    assert sorted(calls[2:], key=repr) == sorted([(2, ("x", "y"), 0.5), ("id", (), 1.0)], key=repr)
    assert h(2, ("x", "y"), scale=0.5)[3] in (3, 4)
    assert h("id")[3] in (3, 4)
    assert len(calls) == 4
    assert h.get_stats()["refreshes_succeeded"] == 2


def test_decorated_function_caches_none(configured: str, closing: Closing) -> None:
    calls: list[str] = []

    @closing
    @refreshing_cache(ttl="60s")
    def find(user: str) -> None:
        calls.append(user)

    for _ in range(3):
        assert find("u1") is None
    assert calls == ["u1"]


class Adder:
    """A callable object."""

    def __call__(self, a: int) -> int:
        return a + 1


def _add(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize(
    ("target", "expected", "name_end"),
    [(functools.partial(_add, 5), 6, "._add"), (Adder(), 2, ".Adder")],
    ids=["partial", "callable"],
)
@pytest.mark.parametrize("explicit", [False, True], ids=["default-name", "named"])
def test_partial_or_callable_object_can_be_decorated(
    configured: str, target: Any, expected: int, name_end: str, explicit: bool
) -> None:
    name = f"core-callable-{configured}" if explicit else None
    f = refreshing_cache(ttl="60s", name=name)(target)
    try:
        assert f(1) == expected
        assert f(1) == expected
        assert f.cache.name == name if explicit else f.cache.name.endswith(name_end)
        assert f.cache.name.startswith("core-callable-" if explicit else __name__)
    finally:
        f.cache.close()


def test_the_one_str_argument_fast_path_uses_the_key_every_other_path_uses(
    configured: str,
) -> None:
    """``f("id")`` builds its key inline (and remembers it); it must be the key of
    ``f(user_id="id")``, of ``key_for`` and of the workers' refreshes, past the memo's bound
    too."""
    from oqron_cache import refreshing_cache
    from oqron_cache.core.call_keys import encode_call_ex
    from oqron_cache.decorator import MEMO_SIZE, callable_name

    calls: list[str] = []

    @refreshing_cache(ttl="1m", name="fast-path-keys")
    def profile(user_id: str) -> str:
        calls.append(user_id)
        return f"p:{user_id}"

    try:
        for n in range(MEMO_SIZE + 10):  # past the memo's bound: it starts over, still right
            arg = f"u{n}"
            assert profile(arg) == f"p:{arg}"
        assert profile("u3") == profile(user_id="u3") == "p:u3"
        assert calls.count("u3") == 1  # one entry for both call shapes
        qualname = callable_name(profile.original)
        expected = encode_call_ex(qualname, ("user_id",), ("é:x",), {})[0]
        assert profile.key_for("é:x") == expected
        profile("é:x")
        l1 = profile.cache.stack.l1
        assert l1 is not None and l1.get(expected) is not None
    finally:
        profile.cache.close()


def test_a_lock_in_its_last_millisecond_is_not_taken_for_one_without_a_ttl() -> None:
    """Found by CI (P8): a failed refresh's retry, timed for its throttle lock's expiry, found
    the lock with PTTL 0 (its last millisecond), took that for "no TTL" and waited a whole
    lock_ttl more (2.0 s instead of 1.0 in test_a_failed_refresh_is_retried_...)."""
    from oqron_cache.redis.store import acquire_reply

    assert acquire_reply([0, None, 1, 0, b"f"], 5.0)[3] == 0.001  # about to expire
    assert acquire_reply([0, None, 1, 1500, b"f"], 5.0)[3] == 1.5
    assert acquire_reply([0, None, 1, -1, b"f"], 5.0)[3] == 5.0  # no TTL: not ours
