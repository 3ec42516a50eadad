"""One bad bus message costs one dropped message, never the bus (issue 10 defect 13, P7).

A message the listener cannot apply (a pattern that does not parse, or a handler that raises for
any other reason) used to escape the listener loop, be taken for a lost connection, and make
every process of the namespace flush its L1 and resubscribe. Now it is dropped and counted
(``dropped_messages``), logged at most once per few seconds, and the subscription stays up.
Real Redis; the forged messages are published by another client, as another process would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from oqron_cache import MemoryTier, RedisTier
from oqron_cache.config import current_runtime
from oqron_cache.core.keys import bus_channel
from oqron_cache.redis.bus import Bus, decode_message, encode_message

BAD_PATTERNS = [["[abc"], ["x["], ["[z-a]"], ["[^]"], ["*1", "[abc"]]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every millisecond; fail after ``timeout`` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def long_l1() -> dict[str, Any]:
    """Tiers whose L1 copy lives a minute: only the bus (or a flush) can drop it early."""
    return {"tiers": [MemoryTier(max_size=100, ttl="60s"), RedisTier(ttl="60s")]}


@pytest.mark.parametrize("patterns", BAD_PATTERNS)
def test_decode_refuses_a_pattern_message_whose_patterns_do_not_parse(patterns: list[str]) -> None:
    assert decode_message(encode_message("o", "c", "pattern", patterns)) is None
    assert decode_message(encode_message("o", "c", "pattern", ["*1", "[a-c]?"])) is not None
    # the same text is a plain key in any other operation
    assert decode_message(encode_message("o", "c", "evict", patterns)) is not None


def test_patterns_that_do_not_parse_keep_the_bus_and_l1(
    configured: str, redis_client: redis.Redis, make_cache: Callable[..., Any]
) -> None:
    bus = current_runtime().bus
    assert bus is not None and bus.healthy
    cache = make_cache(**long_l1())
    for key in ("k1", "k2", "x"):
        cache.set(key, key)
    l1 = cache.stack.l1
    dropped, reconnects = bus.dropped_messages, bus.reconnects

    for patterns in BAD_PATTERNS:
        message = encode_message("another-process", cache.name, "pattern", patterns)
        assert redis_client.publish(bus.channel, message) == 1, "the bus unsubscribed"
    redis_client.publish(bus.channel, b"\xff not json")  # and one that is not even JSON
    wait_until(
        lambda: (
            bus.dropped_messages >= dropped + len(BAD_PATTERNS) + 1
            or not bus.healthy
            or bus.reconnects != reconnects
        ),
        5.0,
        "the bad messages to be dropped",
    )

    assert bus.healthy
    assert bus.reconnects == reconnects  # no resubscription, so no flush in any process
    assert bus.dropped_messages == dropped + len(BAD_PATTERNS) + 1
    assert all(l1.get(key) is not None for key in ("k1", "k2", "x"))  # "*1" was not applied
    # ... and the next valid pattern is applied as usual.
    message = encode_message("another-process", cache.name, "pattern", ["k*"])
    redis_client.publish(bus.channel, message)
    wait_until(lambda: l1.get("k1") is None and l1.get("k2") is None, 2.0, "the valid pattern")
    assert l1.get("x") is not None
    assert bus.dropped_messages == dropped + len(BAD_PATTERNS) + 1


def test_a_handler_error_is_a_dropped_message_not_a_lost_connection(
    redis_url: str, namespace: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    applied: list[list[str]] = []
    flushes: list[float] = []

    def handler(cache: str, op: str, keys: list[str], from_self: bool) -> None:
        if keys and keys[0].startswith("boom"):
            raise RuntimeError(f"a bug in the handler with {keys[0]}")
        applied.append(keys)

    bus = Bus(
        redis.Redis.from_url(redis_url, socket_timeout=5),
        bus_channel(namespace),
        handler,
        lambda: flushes.append(time.monotonic()),
    )
    try:
        assert bus.start(wait=5.0)
        waiter = bus.waiters.register("c", "boom\n\x1b[31m")
        caplog.set_level(logging.WARNING, logger="oqron_cache.bus")
        for _ in range(5):
            message = encode_message("another-process", "c", "evict", ["boom\n\x1b[31m"])
            assert redis_client.publish(bus.channel, message) == 1, "the bus unsubscribed"
        redis_client.publish(bus.channel, encode_message("another-process", "c", "evict", ["ok"]))
        wait_until(lambda: applied == [["ok"]] or not bus.healthy, 5.0, "the valid message")

        assert bus.healthy and bus.reconnects == 0 and flushes == []
        assert bus.dropped_messages == 5
        assert waiter.is_set()  # the waiters of an evicted key are woken all the same
        records = [r for r in caplog.records if r.name == "oqron_cache.bus"]
        assert len(records) == 1, [r.getMessage() for r in records]  # at most one per window
        shown = records[0].getMessage()
        assert "RuntimeError" in shown and "boom" in shown
        assert "\n" not in shown and "\x1b" not in shown  # escaped: no log injection
    finally:
        bus.stop()
        bus.client.close()


def test_a_flood_of_bad_messages_is_logged_once_per_window(
    redis_url: str, namespace: str, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    done = threading.Event()

    def handler(cache: str, op: str, keys: list[str], from_self: bool) -> None:
        if keys == ["ok"]:
            done.set()

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    bus = Bus(client, bus_channel(namespace), handler, lambda: None)
    try:
        assert bus.start(wait=5.0)
        caplog.set_level(logging.WARNING, logger="oqron_cache.bus")
        for i in range(200):
            bad = b"not json" if i % 2 else encode_message("o", "c", "pattern", [f"[{i}"])
            redis_client.publish(bus.channel, bad)
        redis_client.publish(bus.channel, encode_message("o", "c", "evict", ["ok"]))
        assert done.wait(5.0)
        assert bus.dropped_messages == 200 and bus.reconnects == 0 and bus.healthy
        records = [r for r in caplog.records if r.name == "oqron_cache.bus"]
        assert len(records) == 1, [r.getMessage() for r in records]
    finally:
        bus.stop()
        bus.client.close()
