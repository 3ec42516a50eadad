"""The tag index and the ordering of loads against deletes (issue 10, defects 6 to 9).

A tag set must index every live entry carrying its tag for as long as the entry lives (sliding
entries included), and nothing much else (its size follows the entries it indexes); a fill must
be indexed even when the load's first read of L2 failed; and a delete beats any load that began
before it, however long the load takes. Promises P5 (no stale overwrite), P9/P13 (bounded
memory). All against a real Redis.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.config import reset
from oqron_cache.engine import invalidation as inv
from tests.redis_server import RedisServer


def tagged(**kwargs: Any) -> dict[str, Any]:
    return {"tags": lambda key, value: ["t"], **kwargs}


def tag_members(client: redis.Redis, cache: Any, tag: str = "t") -> set[bytes]:
    return set(client.zrange(cache.stack.l2.keys.tag_set(tag), 0, -1))  # type: ignore[arg-type]


def test_one_key_set_many_times_is_one_member_of_its_tag_set(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    """Defect 8: each fill or set added ``key|version`` and nothing took the old one out."""
    cache = make_cache(ttl="60s", **tagged())
    for n in range(500):
        cache.set("k", n)
    assert len(tag_members(redis_client, cache)) == 1
    calls = {"n": 0}

    def resolver(key: str) -> int:
        calls["n"] += 1
        return calls["n"]

    filled = make_cache(ttl="60s", resolver=resolver, **tagged())
    for _ in range(50):  # fills replacing fills (each time a delete-free miss)
        filled.stack.l1.clear()
        filled.stack.l2.conn.client.delete(filled.stack.l2.keys.value("k"))
        filled.get("k")
    filled.delete("k")
    filled.get("k")
    filled.set("k", "written")
    filled.stack.l1.clear()
    assert filled.get("k") == "written"
    assert tag_members(redis_client, filled) == {b"k"}
    assert filled.invalidate_by_tag("t") == 1
    reloaded = calls["n"] + 1
    assert filled.get("k") == reloaded  # reloaded: the tag found the entry
    assert tag_members(redis_client, filled) == {b"k"}  # ... and indexed it again


def test_members_of_expired_entries_leave_the_index(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    """Defect 8: a busy tag's index does not keep the keys of entries long expired."""
    cache = make_cache(ttl="200ms", **tagged())
    for i in range(1000):
        cache.set(f"old-{i}", 1)
    client = cache.stack.l2.conn.client
    deadline = time.monotonic() + 5
    while client.exists(cache.stack.l2.keys.value("old-999")):  # physically expired
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for i in range(10):
        cache.set(f"new-{i}", 1)
    assert tag_members(redis_client, cache) == {f"new-{i}".encode() for i in range(10)}


def test_a_sliding_entry_read_steadily_stays_in_its_tag_index(
    configured: str,
    make_cache: Callable[..., Any],
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defect 7: a slide extended the entry's life but not its tag set's.

    The tag set is kept alive 60 s past its entries (``TAG_SET_MARGIN_MS``); with no margin
    the defect shows within a second of steady reads instead of a minute.
    """
    monkeypatch.setattr(inv, "TAG_SET_MARGIN_MS", 0)
    loads = {"n": 0}

    def resolver(key: str) -> int:
        loads["n"] += 1
        return loads["n"]

    cache = make_cache(
        tiers=[MemoryTier(max_size=10, ttl="600ms"), RedisTier(ttl="600ms")],
        strategy="sliding",
        resolver=resolver,
        **tagged(),
    )
    assert cache.get("k") == 1
    ends = time.monotonic() + 1.8  # three lifetimes of the entry, read every 50 ms
    while time.monotonic() < ends:
        assert cache.get("k") == 1
        time.sleep(0.05)
    assert tag_members(redis_client, cache), "the tag set expired under a live entry"
    assert cache.invalidate_by_tag("t") == 1
    assert cache.get("k") == 2


@pytest.fixture
def private(private_redis: RedisServer) -> Iterator[RedisServer]:
    oqron_cache.configure(
        redis_url=private_redis.url, namespace=f"t-{uuid.uuid4().hex[:8]}", op_timeout=0.2
    )
    try:
        yield private_redis
    finally:
        reset()


def test_a_fill_after_a_redis_blip_is_tag_indexed(
    private: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """Defect 9: the load's first read of L2 failed, so it had no start time and its fill
    skipped the tag index (and the check for invalidations that raced it)."""
    loads = {"n": 0}

    def resolver(key: str) -> int:
        loads["n"] += 1
        if loads["n"] == 1:  # Redis comes back while the first load runs
            private.restart()
            time.sleep(0.7)  # past the breaker's cooldown: the fill is its probe
        return loads["n"]

    cache = make_cache(ttl="60s", resolver=resolver, **tagged())
    cache.stack  # bound while Redis is up  # noqa: B018
    private.kill()
    assert cache.get("k") == 1  # the L2 read fails; the resolver runs; the fill lands
    client = private.client()
    assert client.exists(cache.stack.l2.keys.value("k")), "the fill did not land"
    assert cache.invalidate_by_tag("t") == 1, "the entry filled after the blip is not indexed"
    cache.stack.l1.clear()
    assert cache.get("k") == 2


def test_delete_beats_a_cold_load_that_outlives_the_tombstone(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """Defect 6 (P5): a load that found no entry, began before a delete and ran longer than
    the tombstone lives must not write its value back."""
    started, release = threading.Event(), threading.Event()

    def resolver(key: str) -> str:
        started.set()
        assert release.wait(10)
        return "read before the delete"

    cache = make_cache(ttl="60s", resolver=resolver)
    stack = cache.stack
    stack._tombstone_ttl = 0.3  # what a tombstone lives (normally >= 30 s)
    out: list[Any] = []
    loader = threading.Thread(target=lambda: out.append(cache.get("k")), daemon=True)
    loader.start()
    assert started.wait(5)
    cache.delete("k")
    client = stack.l2.conn.client
    deadline = time.monotonic() + 5
    while client.exists(stack.l2.keys.value("k")):  # the tombstone expires
        assert time.monotonic() < deadline
        time.sleep(0.02)
    release.set()
    loader.join(5)
    assert out == ["read before the delete"]  # it began before the delete: it may return it
    assert stack.l2.read("k") is None, "a load older than the delete wrote its value back"
    assert stack.l1.get("k") is None
    assert cache.get_stats(local=True)["fills_too_old"] == 1
