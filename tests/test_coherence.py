"""L1 coherence through the bus (promise P7): across processes, after a lost connection, and
against forged messages on the channel."""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.config import current_runtime, reset
from oqron_cache.redis.bus import MAX_KEYS_PER_MESSAGE, MAX_MESSAGE_BYTES, encode_message
from tests.procs import Child, worker_args
from tests.redis_server import RedisServer

WATCHERS = 3


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every millisecond; return how long it took; fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)
    return time.monotonic() - started


def long_l1(**kwargs: Any) -> dict[str, Any]:
    """Tiers whose L1 copy would live 60 s: only the bus can make a process drop it early."""
    return {"tiers": [MemoryTier(max_size=1000, ttl="60s"), RedisTier(ttl="60s")], **kwargs}


@pytest.fixture
def private_configured(private_redis: RedisServer) -> Iterator[str]:
    """``configure()`` on the private Redis in a fresh namespace; reset afterwards."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    oqron_cache.configure(redis_url=private_redis.url, namespace=ns)
    try:
        yield ns
    finally:
        reset()


# -- across processes ----------------------------------------------------------------------


@pytest.mark.slow
def test_set_and_delete_reach_the_l1_of_other_processes(
    configured: str, redis_url: str, make_cache: Callable[..., Any], tmp_path: Path
) -> None:
    name = f"coh-{uuid.uuid4().hex[:8]}"
    key = "shared"
    cache = make_cache(name=name, **long_l1())
    cache.set(key, "v1")
    args = worker_args("watch", redis_url, configured, name, key)
    children = [Child(args, tmp_path / f"watch-{i}.log") for i in range(WATCHERS)]
    delays: dict[str, list[float]] = {}
    try:
        for child in children:
            ready = child.expect("ready", timeout=30)
            assert ready == {"event": "ready", "value": "v1", "bus_healthy": True}

        for op, expected in (("set", "v2"), ("delete", None)):
            for child in children:
                child.send(cmd="expect", value=expected, deadline=2.0)
            for child in children:
                child.expect("polling")  # each is now reading its (stale) L1 copy in a loop
            t_write = time.monotonic()
            if op == "set":
                cache.set(key, "v2")
            else:
                cache.delete(key)
            seen = [child.expect("seen", timeout=10) for child in children]
            assert all(s["ok"] for s in seen), seen
            assert all(s["value"] == expected for s in seen)
            if op == "set":
                # Until the bus evicted it, each child served its L1 copy; then one L2 read.
                assert [s["l2_hits"] for s in seen] == [1] * WATCHERS, seen
            delays[op] = [s["t"] - t_write for s in seen]
            assert all(0 <= d < 2.0 for d in delays[op]), delays
        for child in children:
            child.send(cmd="exit")
    finally:
        for child in children:
            child.close()
    print(
        "\n[bus delay] "
        + "; ".join(
            f"{op}: " + ", ".join(f"{d * 1000:.1f} ms" for d in ds) for op, ds in delays.items()
        )
    )


# -- a lost bus connection -----------------------------------------------------------------


def test_killed_bus_connection_flushes_l1_and_recovers(
    private_configured: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    bus = current_runtime().bus
    assert bus.healthy
    cache = make_cache(**long_l1(resolver=lambda key: f"value:{key}"))
    for i in range(20):
        assert cache.get(f"k{i}") == f"value:k{i}"
    l1 = cache.stack.l1
    assert len(l1) == 20
    reconnects = bus.reconnects
    admin = private_redis.client()

    assert admin.client_kill_filter(_type="pubsub") == 1
    flushed_in = wait_until(lambda: len(l1) == 0, 2.0, "L1 to be flushed")
    back_in = wait_until(
        lambda: bus.healthy and bus.reconnects == reconnects + 1, 5.0, "the bus to resubscribe"
    )
    assert len(l1) == 0  # flushed again on resubscribe: messages may have been missed

    # Back to normal: reads come from L2 (no resolver run) and fill L1 again ...
    hits = cache.get_stats()["l2_hits"]
    calls = cache.get_stats()["resolver_calls"]
    assert cache.get("k3") == "value:k3"
    assert cache.get_stats()["l2_hits"] == hits + 1
    assert cache.get_stats()["resolver_calls"] == calls
    assert l1.get("k3") is not None
    # ... and the new subscription delivers evictions.
    admin.publish(bus.channel, encode_message("another-process", cache.name, "evict", ["k3"]))
    wait_until(lambda: l1.get("k3") is None, 2.0, "the evict message to drop the L1 copy")
    print(
        f"\n[bus lost] L1 flushed {flushed_in * 1000:.1f} ms after CLIENT KILL; resubscribed "
        f"{back_in * 1000:.1f} ms later"
    )


def test_while_the_bus_is_down_reads_come_from_l2_and_l1_is_not_written(
    private_configured: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    bus = current_runtime().bus
    calls: list[str] = []

    def resolver(key: str) -> str:
        calls.append(key)
        return f"value:{key}"

    cache = make_cache(**long_l1(resolver=resolver))
    cache.set("a", "A")
    l1 = cache.stack.l1
    assert l1.get("a") is not None
    admin = private_redis.client()
    # The listener may not SUBSCRIBE any more (PUBLISH, GET, SET and scripts still work):
    # the bus stays down while L2 is up.
    # redis-py leaves execute_command unannotated.
    admin.execute_command("ACL", "SETUSER", "default", "-subscribe")
    try:
        assert admin.client_kill_filter(_type="pubsub") == 1
        wait_until(lambda: not bus.healthy and len(l1) == 0, 2.0, "the bus to be lost")
        stats = cache.get_stats()
        for _ in range(5):
            assert cache.get("a") == "A"  # from L2 every time: L1 may not be trusted
        assert cache.get("b") == "value:b"  # a miss: resolved, written to L2 only
        assert cache.get("b") == "value:b"
        after = cache.get_stats()
        assert after["l2_hits"] - stats["l2_hits"] == 6
        assert calls == ["b"]
        assert len(l1) == 0
        assert after["l2_errors"] == stats["l2_errors"]  # L2 itself was fine all along
        assert private_redis.client().exists(cache.stack.l2.keys.value("b")) == 1
        assert not bus.healthy
    finally:
        # redis-py leaves execute_command unannotated.
        admin.execute_command("ACL", "SETUSER", "default", "+subscribe")
    wait_until(lambda: bus.healthy, 5.0, "the bus to resubscribe")
    assert cache.get("a") == "A"
    assert l1.get("a") is not None  # L1 is written again


# -- forged and malformed messages (P10) ---------------------------------------------------


class Canary:
    """Unpickling this runs code: it creates the file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def malformed_messages(name: str, canary: Path) -> dict[str, bytes]:
    def msg(**fields: Any) -> bytes:
        base: dict[str, Any] = {"o": "forger", "c": name, "op": "evict", "k": ["k"]}
        base.update(fields)
        return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()

    return {
        "garbage": b"{not json at all",
        "binary": b"\xff\xfe\x00\x01" * 16,
        "pickle": pickle.dumps(Canary(canary)),
        "huge": b'{"o":"x","c":"' + b"a" * MAX_MESSAGE_BYTES + b'","op":"clear","k":[]}',
        "not-an-object": b'["forger", "c", "evict", ["k"]]',
        "unknown-op": msg(op="exec"),
        "keys-not-list": msg(k="k"),
        "keys-not-str": msg(k=[1, 2]),
        "cache-not-str": msg(c=["x"]),
        "no-origin": msg(o=...),
        "too-many-keys": msg(k=["k"] * (MAX_KEYS_PER_MESSAGE + 1)),
    }


def test_malformed_bus_messages_are_dropped_counted_and_harmless(
    configured: str, redis_client: redis.Redis, make_cache: Callable[..., Any], tmp_path: Path
) -> None:
    bus = current_runtime().bus
    cache = make_cache(**long_l1())
    cache.set("k", "v")
    l1 = cache.stack.l1
    canary = tmp_path / "pwned"
    messages = malformed_messages(cache.name, canary)
    dropped, reconnects = bus.dropped_messages, bus.reconnects

    for label, payload in messages.items():
        assert redis_client.publish(bus.channel, payload) == 1, label
    wait_until(
        lambda: bus.dropped_messages == dropped + len(messages),
        5.0,
        "every malformed message to be dropped",
    )

    assert not canary.exists()
    assert l1.get("k") is not None  # none of them evicted anything
    assert cache.get("k") == "v"
    assert bus.healthy
    assert bus.reconnects == reconnects  # the listener kept its connection
    # ... and still obeys a well-formed message.
    redis_client.publish(bus.channel, encode_message("another", cache.name, "evict", ["k"]))
    wait_until(lambda: l1.get("k") is None, 2.0, "the valid evict to drop the L1 copy")
    assert bus.dropped_messages == dropped + len(messages)


def test_deeply_nested_json_message_is_dropped_like_any_malformed_one(
    configured: str, redis_client: redis.Redis, make_cache: Callable[..., Any]
) -> None:
    bus = current_runtime().bus
    cache = make_cache(**long_l1())
    cache.set("k", "v")
    dropped, reconnects = bus.dropped_messages, bus.reconnects

    assert redis_client.publish(bus.channel, b"[" * 100_000) == 1
    redis_client.publish(bus.channel, encode_message("another", cache.name, "evict", ["other"]))
    time.sleep(0.3)  # no event to wait for when the bug makes the listener reconnect instead

    assert bus.reconnects == reconnects
    assert bus.dropped_messages == dropped + 1
    assert cache.stack.l1.get("k") is not None
