"""Auto-recovery (P14, issue 10 defects 14 and 15) against a private Redis that is paused.

A paused Redis (SIGSTOP) is the nastiest outage: the client's requests time out, yet the server
runs them when it wakes. A lock request that timed out must not leave a lock nobody releases;
a set, a delete or an invalidation made meanwhile must not be dropped: each is kept and replayed
once Redis answers, newest per key, never over a newer write, and counted.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.config import current_runtime, reset
from oqron_cache.core.entry import Entry, new_version, pack, unpack
from oqron_cache.engine.recovery import Op, Recovery
from oqron_cache.redis.store import L2Unavailable
from tests.conftest import FakeClock
from tests.redis_server import RedisServer

OP_TIMEOUT = 0.15
SETTLE = 5.0  # seconds Redis gets, once awake, to see every deferred operation applied


@pytest.fixture
def paused_redis(private_redis: RedisServer) -> Iterator[RedisServer]:
    oqron_cache.configure(
        redis_url=private_redis.url,
        namespace=f"t-{uuid.uuid4().hex[:8]}",
        op_timeout=OP_TIMEOUT,
    )
    try:
        yield private_redis
    finally:
        if private_redis.running:
            private_redis.resume()
        reset()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def held(client: redis.Redis, cache: Any, key: str) -> Any:
    """The value of ``key`` in L2 as another process would read it (None: absent/tombstone)."""
    raw = client.get(cache.stack.l2.keys.value(key))
    if raw is None:
        return None
    entry, _, payload = unpack(raw)  # type: ignore[arg-type]
    return None if entry.tombstone else cache.stack.codec.decode(payload)


def locks(client: redis.Redis, cache: Any) -> list[bytes]:
    """The lock keys of ``cache`` in Redis now."""
    match = f"oqron:{cache.stack.l2.keys.namespace}:*"
    return [k for k in client.scan_iter(match=match) if k.endswith(b":l")]


def tiers() -> list[Any]:
    return [MemoryTier(max_size=100, ttl="60s"), RedisTier(ttl="60s")]


# -- defect 15: writes while Redis does not answer -------------------------------------------


def test_a_set_while_redis_is_paused_is_replayed_when_it_wakes(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers())
    cache.set("k", "before")
    client = paused_redis.client()
    with paused_redis.paused():
        assert cache.get("other") is None  # times out: the breaker opens, nothing is sent
        started = time.monotonic()
        cache.set("k", "during")  # refused at once by the breaker; returns (P1, P2)
        assert time.monotonic() - started < OP_TIMEOUT
        assert cache.get("k") == "during"  # this process reads its own write
        assert cache.get_stats(local=True)["writes_pending"] == 1
    wait_until(lambda: not cache.get_stats(local=True)["writes_pending"], SETTLE, "the replay")
    assert held(client, cache, "k") == "during"
    stats = cache.get_stats(local=True)
    assert (stats["writes_deferred"], stats["writes_replayed"], stats["writes_dropped"]) == (
        1,
        1,
        0,
    )
    assert stats["writes_pending"] == 0


def test_delete_and_invalidations_while_paused_are_replayed(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers(), tags=lambda key, value: [value["tag"]])
    for key, tag in (("d", "x"), ("p:1", "y"), ("p:2", "y"), ("t1", "gone"), ("t2", "gone")):
        cache.set(key, {"tag": tag})
    cache.set("keep", {"tag": "x"})
    client = paused_redis.client()
    with paused_redis.paused():
        cache.delete("d")
        cache.invalidate_pattern("p:*")
        cache.invalidate_by_tag("gone")
        for key in ("d", "p:1", "t1"):  # this process stops serving them at once
            assert cache.get(key) is None
    wait_until(
        lambda: all(held(client, cache, k) is None for k in ("d", "p:1", "p:2", "t1", "t2")),
        SETTLE,
        "the replayed delete and invalidations",
    )
    assert held(client, cache, "keep") == {"tag": "x"}
    # Counted once each replay has returned (its last step may land just after its effect).
    wait_until(lambda: cache.get_stats(local=True)["writes_replayed"] == 3, SETTLE, "counts")
    assert cache.get_stats(local=True)["writes_deferred"] == 3


def test_the_newest_deferred_operation_of_a_key_wins(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers())
    cache.set("a", 0)
    cache.set("b", 0)
    client = paused_redis.client()
    with paused_redis.paused():
        cache.set("a", 1)
        cache.set("a", 2)
        cache.delete("a")
        cache.delete("b")
        cache.set("b", 3)
        assert cache.get_stats(local=True)["writes_pending"] == 2
    wait_until(lambda: held(client, cache, "b") == 3, SETTLE, "b's replay")
    wait_until(lambda: not cache.get_stats(local=True)["writes_pending"], SETTLE, "the queue")
    assert held(client, cache, "a") is None
    stats = cache.get_stats(local=True)
    assert (stats["writes_deferred"], stats["writes_replayed"]) == (5, 2)


def test_a_replay_never_overwrites_a_newer_write_but_replaces_a_fill(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """The replay's rule, applied by the recovery queue's own code against the shared Redis."""
    clock = FakeClock()
    cache = make_cache(tiers=tiers(), clock=clock, resolver=lambda key: "filled")
    stack = cache.stack
    recovery = Recovery()
    recovery._stop.set()  # no thread: this test replays by hand
    ttl = 60.0

    def deferred(key: str, value: Any) -> Op:
        entry = stack._entry(key, value, 0.0)
        entry.written = True
        envelope = stack._encode(key, entry)
        recovery.defer_write(stack, key, entry, envelope, ttl)
        return recovery._ops[("k", stack.name, key)]

    deferred("newer-write", "offline")
    deferred("a-fill", "offline")
    clock.tick(1)
    stack.set("newer-write", "online")  # another write, later, reached Redis first
    assert cache.get("a-fill") == "filled"  # a fill (its load may have read old data)
    assert recovery.replay()
    stack.l1.clear()
    assert cache.get("newer-write") == "online"
    assert cache.get("a-fill") == "offline"


def test_a_deferred_value_that_expired_meanwhile_is_not_replayed(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    clock = FakeClock()
    cache = make_cache(ttl="10s", stale_ttl="5s", clock=clock)
    stack = cache.stack
    recovery = Recovery()
    recovery._stop.set()
    entry = stack._entry("k", "offline", 0.0)
    recovery.defer_write(stack, "k", entry, stack._encode("k", entry), 15.0)
    clock.tick(16)  # past stale_until: it could not be served any more
    assert recovery.replay()
    assert stack.l2.read("k") is None
    assert cache.get_stats(local=True)["writes_expired"] == 1


def test_the_queue_is_bounded_and_drops_the_oldest(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers())
    stack = cache.stack
    recovery = Recovery(limit=3)
    recovery._stop.set()
    for n in range(5):
        entry = stack._entry(f"k{n}", n, 0.0)
        recovery.defer_write(stack, f"k{n}", entry, stack._encode(f"k{n}", entry), 60.0)
    assert [ident[2] for ident in recovery._ops] == ["k2", "k3", "k4"]
    stats = cache.get_stats(local=True)
    assert (stats["writes_deferred"], stats["writes_dropped"]) == (5, 2)


# -- defect 14: a lock request that timed out -----------------------------------------------


def test_a_refresh_lock_requested_while_paused_is_released_when_redis_wakes(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    clock = FakeClock()
    cache = make_cache(
        tiers=[MemoryTier(max_size=100, ttl="10s"), RedisTier(ttl="10s")],
        stale_ttl="1h",
        clock=clock,
        resolver=lambda key: f"v@{clock()}",
        stampede=Stampede(lock_ttl="30s"),  # a lock left behind would stall the key for 30 s
    )
    assert cache.get("k").startswith("v@")
    clock.tick(11)  # stale
    client = paused_redis.client()
    runtime = current_runtime()
    with paused_redis.paused():
        assert cache.get("k").startswith("v@")  # stale, served at once; a refresh is asked
        wait_until(
            lambda: cache.get_stats(local=True)["releases_deferred"], 5, "the refresh's attempt"
        )
        assert runtime.dispatcher.join(5)
    # Awake: the SET NX the server had queued ran; the recovery queue releases it.
    wait_until(lambda: not locks(client, cache), SETTLE, "the orphan lock's release")
    assert cache.get_stats(local=True)["releases_replayed"] >= 1


def test_a_load_lock_requested_while_paused_does_not_stall_the_next_reader(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """Seen in the soak: every process's reads of the key waited out lock_ttl together."""
    cache = make_cache(
        tiers=tiers(),
        resolver=lambda key: "computed",
        stampede=Stampede(lock_ttl="30s"),
    )
    stack = cache.stack
    real = stack.l2.acquire_or_read
    pause_once = threading.Event()

    def acquire_or_read(key: str, token: str, ttl: float, *args: Any, **kwargs: Any) -> Any:
        if not pause_once.is_set():
            pause_once.set()
            paused_redis.pause()  # the lock request goes out to a server that is asleep
        return real(key, token, ttl, *args, **kwargs)

    stack.l2.acquire_or_read = acquire_or_read
    assert cache.get("k") == "computed"  # the request timed out: computed without the lock
    paused_redis.resume()
    client = paused_redis.client()
    assert wait_until(lambda: not locks(client, cache), SETTLE, "the orphan lock's release")
    stack.l1.clear()
    client.delete(stack.l2.keys.value("k"))  # a cold read again, as another process would
    started = time.monotonic()
    assert cache.get("k") == "computed"
    assert time.monotonic() - started < 1.0, "the next read waited for a lock nobody holds"


def test_a_lock_request_that_runs_after_its_caller_gave_up_takes_no_lock(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """Found by the 10-minute soak (P2): the orphan lock of a timed-out request is released by
    the recovery queue once this process's breaker lets it through, but until then (its
    cooldown) readers in every other process waited it out. A request that Redis runs after
    its deadline (the caller's timeout, in Redis's clock) now takes no lock at all."""
    cache = make_cache(tiers=tiers(), resolver=lambda key: "v", stampede=Stampede(lock_ttl="30s"))
    l2 = cache.stack.l2
    assert l2.acquire_or_read("warm", "t0", 1.0)[0]  # a reply: the clock offset is known
    client = paused_redis.client()
    with paused_redis.paused():
        with pytest.raises(L2Unavailable):
            l2.acquire_or_read("k", "t1", 30.0)  # queued in the sleeping server; we give up
        time.sleep(OP_TIMEOUT)  # well past the request's deadline when the server wakes
    time.sleep(0.2)  # the server has run what it had queued
    assert client.get(l2.keys.lock("k")) is None
    # A request answered in time still takes the lock.
    l2.conn.breaker.success()  # (this process's breaker opened during the pause)
    assert l2.acquire_or_read("k", "t2", 30.0)[0]
    assert client.get(l2.keys.lock("k")) == b"rt2"


def test_a_wrong_idea_of_redis_clock_costs_one_more_round_trip_never_a_lock(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """If this process believes Redis's clock is further behind than it is (a reply that sat
    in a buffer), its requests look late to Redis and take no lock although it still waits
    for the answer: it asks again without a deadline, and measures the clock anew."""
    cache = make_cache(tiers=tiers(), resolver=lambda key: "v", stampede=Stampede(lock_ttl="30s"))
    l2 = cache.stack.l2
    assert l2.acquire_or_read("warm", "t0", 1.0)[0]
    right = l2.conn.clock_offset_us
    assert right is not None
    l2.conn.clock_offset_us = right - 10_000_000  # 10 s off: every deadline is long past
    won, _raw, _now, _held = l2.acquire_or_read("k", "t1", 30.0)
    assert won
    assert paused_redis.client().get(l2.keys.lock("k")) == b"rt1"
    assert abs(l2.conn.clock_offset_us - right) < 1_000_000  # measured again


def test_the_envelope_of_a_deferred_delete_is_a_tombstone_written_flag(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """What a replayed delete writes: a tombstone that orders against later writes by time."""
    cache = make_cache(tiers=tiers())
    tomb = Entry(None, 1.0, 1.0, 1.0, new_version(), tombstone=True)
    raw = pack(tomb, cache.stack.codec.codec_id, b"")
    entry, _, _ = unpack(raw)
    assert entry.tombstone and entry.written


def test_an_origin_write_lock_requested_while_paused_is_released(
    paused_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """Soak finding (P14): the write-through origin lock (30 s) of a request that timed out
    was left behind, and every later write of the key spun in a worker until it expired."""
    from types import SimpleNamespace

    from oqron_cache.celery.write_through import origin_link

    written: list[Any] = []
    cache = make_cache(tiers=tiers(), write_through=lambda key, value: written.append(value))
    stack = cache.stack
    conn = stack.l2.conn
    real = conn.origin_begin_script
    first = threading.Event()

    def origin_begin(*args: Any, **kwargs: Any) -> Any:
        if not first.is_set():
            first.set()
            paused_redis.pause()  # the lock request reaches a server that is asleep
        return real(*args, **kwargs)

    conn.origin_begin_script = origin_begin
    task = SimpleNamespace(request=SimpleNamespace(retries=0))
    payload = base64.b64encode(stack.codec.encode({"n": 1}, cache.name)).decode()
    with pytest.raises(L2Unavailable):  # the task is retried (autoretry_for)
        origin_link(task, stack, "k", payload, new_version().hex(), time.time())
    paused_redis.resume()
    client = paused_redis.client()
    wait_until(
        lambda: cache.get_stats(local=True)["releases_replayed"], SETTLE, "the lock's release"
    )
    assert not client.exists(stack.l2.keys.write_lock("k"))
    started = time.monotonic()
    forward = origin_link(task, stack, "k", payload, new_version().hex(), time.time())
    assert forward is not None and written == [{"n": 1}]
    assert time.monotonic() - started < 1.0
