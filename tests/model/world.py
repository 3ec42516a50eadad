"""The system under test, as both processes build it: two caches, a model origin, a fake broker.

Both caches have L1 (``max_size`` below the number of keys) and L2, stale-while-revalidate,
``lock_ttl`` of one real second and tags; one is ``fixed``, one ``sliding``. Their resolver reads
the model origin (a dict of ``(cache, key) -> version`` the test controls) and returns a value
stamped as :mod:`.oracle` describes; the test can make it fail for a key (:class:`OriginError`,
the only error a caller may see). The wall clock is a :class:`~oqron_cache.testing.FakeClock`
given to ``configure(clock=...)``.

Process A (the test's) replaces the runtime's enqueuer by :class:`FakeEnqueuer`: the dispatcher
still takes the key's lock and decides, but the refresh task it sends lands in a list, and the
test runs it (the real task body, ``do_refresh``), drops it, runs it twice or out of order.
Process B (:mod:`.peer`) has no enqueuer: its dispatcher refreshes in its own thread.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.config import current_runtime
from oqron_cache.core.codecs import get_codec
from oqron_cache.core.entry import unpack
from oqron_cache.core.keys import KeySpace
from oqron_cache.redis.bus import encode_message
from oqron_cache.redis.replies import as_int
from oqron_cache.redis.store import L2Unavailable
from tests.model.oracle import (
    CACHES,
    FIXED,
    KEYS,
    L1_MAX,
    L1_TTL,
    LOCK_TTL,
    SLIDING,
    STALE_TTL,
    TTL,
    tags_of,
)

MARKER = "model-marker"  # the cache name of bus barrier messages (no such cache exists)
Slot = tuple[str, str]  # (cache, key)


class OriginError(Exception):
    """The model origin refused a read (the resolver's own error)."""


@dataclass
class Origin:
    """The model's source of truth: versions per (cache, key), and which keys fail to read."""

    versions: dict[Slot, int] = field(default_factory=dict)
    failing: set[Slot] = field(default_factory=set)

    def bump(self, cache: str, key: str) -> int:
        version = self.versions.get((cache, key), 0) + 1
        self.versions[(cache, key)] = version
        return version

    def copy(self) -> Origin:
        return Origin(dict(self.versions), set(self.failing))


@dataclass(frozen=True)
class Task:
    """One ``oqron_cache.refresh`` task the dispatcher sent (what a broker would carry)."""

    cache: str
    key: str
    token: str
    seen_hex: str


class FakeEnqueuer:
    """Stands in for :class:`oqron_cache.enqueue.Enqueuer`: every task is taken, and kept."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self.tokens: set[str] = set()  # every token ever sent (its lock is someone's)

    in_process = False  # the tasks run where the model says (never in an in-memory worker)

    def enqueue(self, cache: str, key: str, token: str, seen: bytes, lock_ttl: float) -> bool:
        self.tasks.append(Task(cache, key, token, seen.hex()))
        self.tokens.add(token)
        return True

    def close(self) -> None:
        """Nothing to stop (``Runtime.close`` calls it)."""


def declare(
    resolver_for: Callable[[str], Callable[[str], Any]],
) -> dict[str, oqron_cache.Cache[Any]]:
    """The two caches of the model (both processes declare them alike)."""
    made = {}
    for name in CACHES:
        made[name] = oqron_cache.cache(
            name,
            tiers=[MemoryTier(max_size=L1_MAX, ttl=L1_TTL), RedisTier(ttl=TTL)],
            stale_ttl=STALE_TTL,
            stampede=Stampede(lock_ttl=LOCK_TTL, stale_while_revalidate=True),
            strategy="sliding" if name == SLIDING else "fixed",
            resolver=resolver_for(name),
            tags=tags_of,
        )
    assert set(made) == {FIXED, SLIDING}
    return made


def bus_barrier(timeout: float) -> bool:
    """Wait until this process's bus delivered everything published before this call.

    Publishes a marker on the namespace's channel and waits for this process's listener to
    hand it over: messages on one channel arrive in the order Redis took them, and the
    listener applies each before it looks at the next. False if Redis or the bus is down.
    """
    runtime = current_runtime(create=False)
    if runtime is None or runtime.bus is None or runtime.client is None:
        return False
    bus = runtime.bus
    token = secrets.token_hex(8)
    event = bus.waiters.register(MARKER, token)
    try:
        try:
            runtime.client.publish(bus.channel, encode_message("model", MARKER, "evict", [token]))
        except redis.RedisError:
            return False
        return bool(event.wait(timeout))
    finally:
        bus.waiters.unregister(MARKER, token, event)


def settle(timeout: float) -> bool:
    """After Redis came back: ping it through the library's breaker until the breaker closes.

    The breaker waits out its cooldown (up to 5 s after repeated failures) before it lets a
    call through; settling here makes the next step meet a recovered process every time.
    """
    runtime = current_runtime(create=False)
    if runtime is None or runtime.conn is None:
        return False
    conn = runtime.conn
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(L2Unavailable):
            conn.run(conn.client.ping)
        if conn.breaker.state == "closed":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def l1_state(caches: dict[str, oqron_cache.Cache[Any]]) -> dict[str, Any]:
    """What this process's L1s hold: per cache, ``(key, value, fresh_until, stale_until,
    version hex)`` of each copy, and the size and bound of each store."""
    out: dict[str, Any] = {"copies": {}, "sizes": {}}
    for name, cache in caches.items():
        l1 = cache.stack.l1
        assert l1 is not None
        out["copies"][name] = [
            (key, item.value, item.fresh_until, item.stale_until, item.version.hex())
            for key, item in l1.items()
        ]
        out["sizes"][name] = (len(l1), L1_MAX)
    runtime = current_runtime(create=False)
    bus = runtime.bus if runtime is not None else None
    out["bus_healthy"] = bool(bus is not None and bus.healthy)
    out["bus_reconnects"] = bus.reconnects if bus is not None else 0
    recovery = runtime.recovery if runtime is not None else None
    out["deferred"] = recovery.pending if recovery is not None else 0
    out["bus_dropped"] = bus.dropped_messages if bus is not None else 0
    out["breaker"] = runtime.conn.breaker.state if runtime is not None and runtime.conn else "-"
    return out


class RedisView:
    """The test's own look at the private Redis: entries, locks, and the passing of time."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.spaces = {name: KeySpace(namespace, name, 200) for name in CACHES}
        self.codec = get_codec("json")

    def age(self, seconds: float) -> None:
        """Let ``seconds`` pass for Redis: every TTL in the namespace shrinks, some keys expire."""
        keys = list(self.client.scan_iter(match=f"oqron:{self.namespace}:*", count=1000))
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        ttls = cast("list[int]", pipe.execute())
        pipe = self.client.pipeline(transaction=False)
        for key, ttl in zip(keys, ttls, strict=True):
            if ttl > 0:
                left = ttl - int(seconds * 1000)
                if left <= 0:
                    pipe.delete(key)
                else:
                    pipe.pexpire(key, left)
        pipe.execute()

    def locks(self) -> list[tuple[Slot | None, str, int]]:
        """Every lock key of the namespace: its (cache, key) if known, its token, its PTTL."""
        names = {
            space.lock(key): (cache, key) for cache, space in self.spaces.items() for key in KEYS
        }
        out = []
        for raw in self.client.scan_iter(match=f"oqron:{self.namespace}:*l", count=1000):
            name = raw.decode()
            if not (name.endswith("}:l") or name.endswith("}:wl")):
                continue
            token = self.client.get(raw)
            pttl = as_int(self.client.pttl(raw))
            if token is None:
                continue  # expired between the scan and the read
            text = cast(bytes, token).decode()
            if len(text) == 33 and text[0] in "rqf":  # a lock's phase, then its holder's token
                text = text[1:]
            out.append((names.get(name), text, pttl))
        return out

    def entry(self, cache: str, key: str) -> tuple[str, Any, float] | None:
        """``(version hex, value, stale_until)`` of the entry in L2 (a tombstone's value is
        None), or None if there is no such key."""
        raw = cast("bytes | None", self.client.get(self.spaces[cache].value(key)))
        if raw is None:
            return None
        entry, _codec, payload = unpack(raw)
        if entry.tombstone:
            return entry.version.hex(), None, entry.stale_until
        return entry.version.hex(), self.codec.decode(payload), entry.stale_until

    def tag_members(self) -> dict[tuple[str, str], int]:
        """Per (tag set key, encoded key): how many members (versions) the tag index holds."""
        counts: dict[tuple[str, str], int] = {}
        for raw in self.client.scan_iter(match=f"oqron:{self.namespace}:*tag:*", count=1000):
            for member in cast("set[bytes]", self.client.smembers(raw)):
                encoded = member.decode("utf-8", "surrogateescape").rpartition("|")[0]
                slot = (raw.decode(), encoded)
                counts[slot] = counts.get(slot, 0) + 1
        return counts

    def publish(self, data: bytes) -> None:
        """Put ``data`` on the namespace's bus channel, as any service on this Redis can."""
        self.client.publish(f"oqron:{self.namespace}:bus", data)

    def kill_bus(self) -> int:
        """``CLIENT KILL TYPE pubsub``: every process's bus connection drops."""
        return as_int(self.client.client_kill_filter(_type="pubsub"))
