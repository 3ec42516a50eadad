"""L2: the shared Redis tier. One entry = one envelope string (see :mod:`oqron_cache.entry`).

Every check-then-act is one Lua script touching one entry's keys only (its value and its lock,
which share a Redis Cluster hash tag), so the same code runs on one server and on a Redis Cluster
(``RedisConn.cluster``): there, keyless commands that must sit next to an entry (the clock read
with it) are a script on the entry's keys instead of a pipeline, scans walk every primary, and
scripts over many entries are pipelined per node. Every call goes through :meth:`RedisConn.run`,
which applies the circuit breaker and turns infrastructure failures into :class:`L2Unavailable`,
so the read path can degrade (promise P1) instead of raising.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.breaker import CircuitBreaker
from ..core.entry import FLAG_TOMBSTONE
from ..core.keys import KeySpace
from . import scripts
from .cluster import is_cluster_client
from .replies import as_int, as_list

log = logging.getLogger("oqron_cache.redis")
T = TypeVar("T")
LOG_EVERY = 10.0
_TIMES = struct.Struct(">dd")  # fresh_until, stale_until (the touch script's ARGV[2])


class L2Unavailable(Exception):
    """Internal: L2 could not do what was asked (down, slow, OOM, read-only, circuit open)."""


# The phases of a lock (see the scripts): the first character of its value.
COMPUTING, QUEUED, FAILED = "r", "q", "f"


# What a call to Redis may raise that the library degrades on (anything else is a bug).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)
FAILURES = (*UNREACHABLE, RedisError)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


# Arguments and replies of the entry operations, shared by the sync store below and the async
# front's (:mod:`.aio`): the two differ only in how they send.


def acquire_args(
    token: str, ttl: float, phase: str, take_over: bool, deadline_us: int = 0
) -> list[Any]:
    return [token, _ms(ttl), phase, "1" if take_over else "0", deadline_us]


def acquire_reply(reply: Any, ttl: float) -> tuple[bool, bytes | None, int, float]:
    won, raw, now, left_ms, _phase = cast("list[Any]", reply)
    # 0 is a lock in its last millisecond (PTTL rounds down), not one without a TTL (-1): a
    # retry timed for its expiry often finds it so, and must not wait a whole ttl more.
    left = max(int(left_ms), 1) / 1000 if int(left_ms) >= 0 else ttl
    return bool(won), raw, int(now), left


def refused_late(reply: Any) -> bool:
    """Did ACQUIRE_OR_READ refuse the request as past its deadline (phase ``-``)?"""
    phase = cast("list[Any]", reply)[4]
    return phase in (b"-", "-")


def fill_args(
    seen_version: bytes,
    envelope: bytes,
    ttl: float,
    token: str,
    channel: str,
    message: bytes,
    age: float,
    horizon: float,
) -> list[Any]:
    limit = 1 << 62 if horizon == float("inf") else _ms(horizon)
    return [seen_version, envelope, _ms(ttl), token, channel, message, int(age * 1000), limit]


def write_args(envelope: bytes, ttl: float, channel: str, message: bytes) -> list[Any]:
    """A put's or a tombstone's arguments."""
    return [envelope, max(1, int(ttl * 1000)), channel, message]


def touch_args(version: bytes, fresh_until: float, stale_until: float, ttl: float) -> list[Any]:
    return [version, _TIMES.pack(fresh_until, stale_until), max(1, int(ttl * 1000))]


def live_entries(flags: list[bytes]) -> int:
    """How many of these envelope flag bytes are of live entries (not tombstones)."""
    return sum(1 for flag in flags if flag and not flag[0] & FLAG_TOMBSTONE)


def clock_us(seconds: Any, micros: Any) -> int:
    return int(seconds) * 1_000_000 + int(micros)


# The library's scripts, by the attribute of a connection that runs them.
SCRIPT_SOURCES: dict[str, str] = {
    "fill_script": scripts.FILL,
    "put_script": scripts.PUT,
    "release_script": scripts.RELEASE,
    "extend_script": scripts.EXTEND,
    "touch_script": scripts.TOUCH,
    "tombstone_script": scripts.TOMBSTONE,
    "acquire_script": scripts.ACQUIRE_OR_READ,
    "index_script": scripts.INDEX,
    "record_script": scripts.RECORD,
    "drop_script": scripts.DROP_IF_VERSION,
    "put_if_newer_script": scripts.PUT_IF_NEWER,
    "write_if_newer_script": scripts.WRITE_IF_NEWER,
    "drop_tagged_script": scripts.DROP_IF_TAGGED,
    "unindex_script": scripts.UNINDEX,
    "origin_begin_script": scripts.ORIGIN_BEGIN,
    "origin_done_script": scripts.ORIGIN_DONE,
    "read_at_script": scripts.READ_AT,
    "claim_read_script": scripts.CLAIM_READ,
}


class RedisConn:
    """A redis-py client with a circuit breaker and the library's scripts registered once."""

    fill_script: Script
    put_script: Script
    release_script: Script
    extend_script: Script
    touch_script: Script
    tombstone_script: Script
    acquire_script: Script
    index_script: Script
    record_script: Script
    drop_script: Script
    put_if_newer_script: Script
    write_if_newer_script: Script
    drop_tagged_script: Script
    unindex_script: Script
    origin_begin_script: Script
    origin_done_script: Script
    read_at_script: Script
    claim_read_script: Script

    def __init__(
        self,
        client: redis.Redis,
        breaker: CircuitBreaker | None = None,
        on_failure: Callable[[str], None] | None = None,
        op_timeout: float | None = None,
    ) -> None:
        self.client = client
        # How long a caller waits for a reply (the client's socket timeout), and how far
        # Redis's clock is ahead of ours (µs; None until a reply told us): together they tell
        # a lock request when its caller stops waiting, in Redis's clock (see ACQUIRE_OR_READ).
        self.op_timeout = op_timeout
        self.clock_offset_us: int | None = None
        self._offset_until = 0.0  # when the offset kept is re-measured from scratch
        self.cluster = is_cluster_client(client)
        self.breaker = breaker or CircuitBreaker()
        self._on_failure = on_failure
        self._quiet_until: dict[str, float] = {}
        for name, source in SCRIPT_SOURCES.items():
            setattr(self, name, client.register_script(source))

    def primaries(self) -> list[redis.Redis]:
        """A client of each primary: the client itself on one server, one per cluster node."""
        if not self.cluster:
            return [self.client]
        cluster = cast("RedisCluster", self.client)
        return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]

    def run_each(self, script: Script, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """``script`` once per ``(keys, args)``, pipelined; the replies in order.

        Each call's keys must share a slot. On a cluster, the calls are grouped by the node
        holding their slot and pipelined on it; a call that the node refuses (its slot moved
        meanwhile) is run again alone through the cluster client, which follows redirections.
        Call through :meth:`run`.
        """
        if not self.cluster:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                script(keys=keys, args=args, client=pipe)
            return pipe.execute()
        cluster = cast("RedisCluster", self.client)
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i, (keys, _args) in enumerate(calls):
            node = cluster.get_node_from_key(keys[0])
            groups.setdefault(node.name, (node, []))[1].append(i)
        replies: list[Any] = [None] * len(calls)
        for node, indexes in groups.values():
            pipe = cluster.get_redis_connection(node).pipeline(transaction=False)
            for i in indexes:
                script(keys=calls[i][0], args=calls[i][1], client=pipe)
            for i, reply in zip(indexes, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(reply, ResponseError):  # MOVED/ASK: the slot is elsewhere now
                    replies[i] = script(keys=calls[i][0], args=calls[i][1])
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[i] = reply
        return replies

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn`` through the breaker; raise :class:`L2Unavailable` on any Redis failure.

        Connection errors and timeouts open the breaker. Error replies (OOM, READONLY, NOPERM)
        do not: the server answered, reads still work.
        """
        if not self.breaker.allow():
            raise L2Unavailable("circuit open")
        try:
            result = fn(*args, **kwargs)
        except FAILURES as exc:
            raise self.unavailable(exc) from exc
        self.breaker.success()
        return result

    def deadline_us(self) -> int:
        """When a request sent now stops being waited for, in Redis's clock (0: unknown).

        A tenth of the timeout (and 5 ms) of slack: a request refused by mistake only costs
        its caller another look (it waits as if the lock were taken), never a stall.
        """
        offset = self.clock_offset_us
        if offset is None or self.op_timeout is None:
            return 0
        slack = max(0.005, self.op_timeout / 10)
        return int((time.time() + self.op_timeout + slack) * 1_000_000) + offset

    def observe_clock(self, redis_now_us: int, reset: bool = False) -> None:
        """A reply carried Redis's clock: note how far ahead of ours it is.

        A reply that waited (in a socket buffer, for the GIL) makes Redis look less ahead than
        it is, so the largest offset seen over the last minute is kept: an offset too small
        would make requests look late to Redis. ``reset``: start again from this one.
        """
        offset = redis_now_us - int(time.time() * 1_000_000)
        now = time.monotonic()
        known = self.clock_offset_us
        if reset or known is None or offset > known or now >= self._offset_until:
            self.clock_offset_us = offset
            self._offset_until = now + 60.0

    def unavailable(self, exc: BaseException) -> L2Unavailable:
        """Count a failed call in the breaker and the log; the error to raise in its place.

        Shared with the async front's connections (:mod:`.aio`), which use the same breaker.
        """
        if isinstance(exc, ResponseError):
            self.breaker.success()
            self._failed("refused", exc)
            return L2Unavailable(f"redis refused: {str(exc)[:80]}")
        self.breaker.failure()
        if isinstance(exc, UNREACHABLE):
            # RedisClusterException: no node answers the layout query, or a slot has no node.
            self._failed("unreachable", exc)
            return L2Unavailable(f"redis unreachable: {type(exc).__name__}")
        self._failed("error", exc)
        return L2Unavailable(f"redis error: {type(exc).__name__}")

    def _failed(self, kind: str, exc: BaseException) -> None:
        # At most one warning per kind every LOG_EVERY seconds: an outage must not flood logs.
        now = time.monotonic()
        if now >= self._quiet_until.get(kind, 0.0):
            self._quiet_until[kind] = now + LOG_EVERY
            log.warning("L2 %s: %s: %s", kind, type(exc).__name__, str(exc)[:200])
        if self._on_failure is not None:
            self._on_failure(kind)


class RedisStore:
    """The L2 operations of one cache: reads, versioned fills, puts, locks."""

    def __init__(self, conn: RedisConn, keyspace: KeySpace, channel: str) -> None:
        self.conn = conn
        self.keys = keyspace
        self.channel = channel

    def read(self, key: str) -> bytes | None:
        """The raw envelope of ``key``, or ``None`` if absent."""
        raw = self.conn.run(self.conn.client.get, self.keys.value(key))
        return cast("bytes | None", raw)

    def read_at(self, key: str) -> tuple[bytes | None, int]:
        """Redis's clock (µs), then the raw envelope of ``key``: one round trip (a pipeline)."""

        if self.conn.cluster:  # TIME cannot be pipelined there: it names no slot
            reply = self.conn.run(self.conn.read_at_script, keys=[self.keys.value(key)])
            seconds, micros, found = cast("list[Any]", reply)
            return found or None, clock_us(seconds, micros)

        def both() -> list[Any]:
            pipe = self.conn.client.pipeline(transaction=False)
            pipe.time()
            pipe.get(self.keys.value(key))
            return pipe.execute()

        (seconds, micros), raw = self.conn.run(both)
        return cast("bytes | None", raw), clock_us(seconds, micros)

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        """Try to take ``key``'s lock (``SET NX PX``, phase "r"); True if this caller holds it."""
        ok = self.conn.run(
            self.conn.client.set, self.keys.lock(key), COMPUTING + token, nx=True, px=_ms(ttl)
        )
        return bool(ok)

    def acquire_or_read(
        self,
        key: str,
        token: str,
        ttl: float,
        phase: str = COMPUTING,
        take_over: bool = False,
    ) -> tuple[bool, bytes | None, int, float]:
        """Try to take ``key``'s lock in ``phase`` and read its envelope, in one round trip.

        With ``take_over`` (a cold load) a lock held by a queued refresh or a failed one's
        throttle is taken over: only a lock whose holder computes is waited for (see the lock
        phases in :mod:`.scripts`). Also returns Redis's clock (µs): the instant a load that
        follows begins, comparable with the instants invalidations are recorded at; and the
        seconds the lock is held for (``ttl`` if taken, else what is left of the holder's).
        """
        keys = [self.keys.value(key), self.keys.lock(key)]
        args = acquire_args(token, ttl, phase, take_over, self.conn.deadline_us())
        reply = self.conn.run(self.conn.acquire_script, keys=keys, args=args)
        if refused_late(reply):  # yet here is the answer: our idea of Redis's clock was off
            self.conn.observe_clock(int(reply[2]), reset=True)
            args = acquire_args(token, ttl, phase, take_over, 0)
            reply = self.conn.run(self.conn.acquire_script, keys=keys, args=args)
        found = acquire_reply(reply, ttl)
        self.conn.observe_clock(found[2])
        return found

    def claim_read(self, key: str, token: str, ttl: float) -> tuple[bytes | None, int, int]:
        """A worker starts the refresh it was sent under lock ``token``: claim the lock (its
        phase becomes "r" for ``ttl``) and read the entry and Redis's clock, in one round trip.

        Returns ``(envelope or None, now_us, claim)``: ``claim`` is 1 if claimed, 0 if the lock
        is gone (expired), -1 if someone else holds it (a cold load took it over).
        """
        keys = [self.keys.value(key), self.keys.lock(key)]
        reply = self.conn.run(self.conn.claim_read_script, keys=keys, args=[token, _ms(ttl)])
        seconds, micros, found, claim = cast("list[Any]", reply)
        return found or None, int(seconds) * 1_000_000 + int(micros), int(claim)

    def now_us(self) -> int:
        """Redis's clock, in µs."""
        seconds, micros = as_list(self.conn.run(self.conn.client.time))
        return int(seconds) * 1_000_000 + int(micros)

    def release(self, key: str, token: str) -> bool:
        """Release ``key``'s lock if ``token`` still owns it."""
        return bool(
            self.conn.run(self.conn.release_script, keys=[self.keys.lock(key)], args=[token])
        )

    def hold(self, key: str, token: str, ttl: float, phase: str = "") -> bool:
        """Extend ``key``'s lock to ``ttl`` seconds if ``token`` still owns it; with ``phase``,
        mark it so (``FAILED``: only a throttle now; ``COMPUTING``)."""
        return bool(
            self.conn.run(
                self.conn.extend_script,
                keys=[self.keys.lock(key)],
                args=[token, _ms(ttl), phase],
            )
        )

    def fill(
        self,
        key: str,
        seen_version: bytes,
        envelope: bytes,
        ttl: float,
        token: str,
        message: bytes,
        age: float = 0.0,
        horizon: float = float("inf"),
    ) -> tuple[int, int]:
        """Write ``envelope`` if the entry's version is still ``seen_version``; announce; unlock.

        ``age`` is how long ago the load read the entry (seconds); a load that found no entry
        and is older than ``horizon`` (a tombstone's lifetime) is refused. Returns ``(1, now)``
        if written, ``(0, now)`` if a newer version is there, ``(2, now)`` if too old, with
        Redis's clock in µs.
        """
        keys = [self.keys.value(key), self.keys.lock(key)]
        args = fill_args(seen_version, envelope, ttl, token, self.channel, message, age, horizon)
        reply = self.conn.run(self.conn.fill_script, keys=keys, args=args)
        written, now_us = cast("list[int]", reply)
        return int(written), int(now_us)

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """The raw envelopes of ``keys`` (``None`` where absent), in one pipelined round trip
        (one per node on a cluster)."""

        def all_of_them() -> list[bytes | None]:
            pipe = self.conn.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self.keys.value(key))
            return cast("list[bytes | None]", pipe.execute())

        return self.conn.run(all_of_them)

    def put_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        """:meth:`put` each ``(key, envelope, ttl, message)``, pipelined."""
        calls = [
            ([self.keys.value(key)], write_args(envelope, ttl, self.channel, message))
            for key, envelope, ttl, message in items
        ]
        self.conn.run(self.conn.run_each, self.conn.put_script, calls)

    def tombstone_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        """:meth:`tombstone` each ``(key, envelope, ttl, message)``, pipelined."""
        calls = [
            (
                [self.keys.value(key), self.keys.lock(key)],
                write_args(envelope, ttl, self.channel, message),
            )
            for key, envelope, ttl, message in items
        ]
        self.conn.run(self.conn.run_each, self.conn.tombstone_script, calls)

    def put(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """Write ``envelope`` unconditionally (a set or a tombstone) and announce it."""
        args = write_args(envelope, ttl, self.channel, message)
        self.conn.run(self.conn.put_script, keys=[self.keys.value(key)], args=args)

    def scan(self, match: str, count: int) -> Iterator[bytes]:
        """Keys matching ``match``, one SCAN page per call (each page through the breaker), on
        every primary of a cluster in turn."""
        for client in self.conn.run(self.conn.primaries):
            cursor = 0
            while True:
                reply = self.conn.run(client.scan, cursor=cursor, match=match, count=count)
                cursor, page = cast("tuple[int, list[bytes]]", reply)
                yield from page
                if cursor == 0:
                    break

    def scan_page(
        self, match: str, count: int, node: int, cursor: int
    ) -> tuple[int, int, list[bytes]]:
        """One SCAN page of primary number ``node`` (0 on one server) from ``cursor``: the
        ``(node, cursor)`` to ask next (``node`` -1: done) and the keys."""
        clients = self.conn.run(self.conn.primaries)
        if node >= len(clients):
            return -1, 0, []
        reply = self.conn.run(clients[node].scan, cursor=cursor, match=match, count=count)
        cursor, page = cast("tuple[int, list[bytes]]", reply)
        if cursor == 0:
            node = node + 1 if node + 1 < len(clients) else -1
        return node, cursor, page

    def unlink_live(self, keys: list[bytes]) -> int:
        """UNLINK value keys; how many of them were live entries (tombstones are not)."""
        keys = list(dict.fromkeys(keys))  # SCAN may return a key twice

        def flags() -> list[bytes]:
            pipe = self.conn.client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 1, 1)  # the flags byte
            return cast("list[bytes]", pipe.execute())

        found = self.conn.run(flags)
        self.unlink(keys)
        return live_entries(found)

    def unlink(self, keys: list[bytes]) -> int:
        """UNLINK ``keys`` (one round trip; on a cluster, one per node); how many existed."""
        if self.conn.cluster:  # one UNLINK per key, pipelined: keys of many slots cannot share one

            def each() -> list[int]:
                pipe = self.conn.client.pipeline(transaction=False)
                for key in keys:
                    pipe.unlink(key)
                return cast("list[int]", pipe.execute())

            return sum(self.conn.run(each))
        return as_int(self.conn.run(self.conn.client.unlink, *keys))

    def publish(self, message: bytes) -> None:
        """Send ``message`` on the bus channel."""
        self.conn.run(self.conn.client.publish, self.channel, message)

    def tombstone(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """Delete ``key``'s value, announce it, and leave ``envelope`` (a tombstone) behind."""
        args = write_args(envelope, ttl, self.channel, message)
        keys = [self.keys.value(key), self.keys.lock(key)]
        self.conn.run(self.conn.tombstone_script, keys=keys, args=args)

    def touch(
        self, key: str, version: bytes, fresh_until: float, stale_until: float, ttl: float
    ) -> bool:
        """Sliding strategy: move the entry's freshness forward if it is still ``version``."""
        args = touch_args(version, fresh_until, stale_until, ttl)
        return bool(self.conn.run(self.conn.touch_script, keys=[self.keys.value(key)], args=args))
