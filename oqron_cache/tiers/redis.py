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

from ..breaker import CircuitBreaker
from ..clients import is_cluster_client
from ..keys import KeySpace

log = logging.getLogger("oqron_cache.redis")
T = TypeVar("T")
LOG_EVERY = 10.0


class L2Unavailable(Exception):
    """Internal: L2 could not do what was asked (down, slow, OOM, read-only, circuit open)."""


# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the version the writer saw when it started ('' = no entry)
# ARGV[2] - the new envelope
# ARGV[3] - physical TTL of the envelope, ms
# ARGV[4] - the writer's lock token ('' = it holds no lock)
# ARGV[5] - bus channel
# ARGV[6] - bus message announcing the fill
# Writes only if the entry's version is still ARGV[1] (a newer write or an invalidation wins),
# announces it, and releases the lock if the writer still owns it. Returns 1 if written.
_FILL = """
local cur = redis.call('GET', KEYS[1])
local seen = ''
if cur then seen = string.sub(cur, 3, 10) end
local written = 0
if seen == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  written = 1
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) == ARGV[4] then
  redis.call('DEL', KEYS[2])
end
return written
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the new envelope (a value, or a tombstone for a delete)
# ARGV[2] - physical TTL, ms
# ARGV[3] - bus channel
# ARGV[4] - bus message
# An unconditional write (set/delete) and its announcement, in one round trip.
_PUT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS[1] - the entry's value key
# Redis Cluster only (a single server pipelines TIME and GET): the clock of the entry's node and
# the envelope, in one round trip. Returns {seconds, µs, the envelope or false}.
_READ_AT = """
local t = redis.call('TIME')
return {t[1], t[2], redis.call('GET', KEYS[1])}
"""

# KEYS[1] - the entry's value key
# KEYS[2] - the entry's lock key
# ARGV[1] - the caller's lock token
# ARGV[2] - lock TTL, ms
# Try to take the lock and, in the same round trip, read the entry: a waiter learns whether a
# holder filled it already, a winner double-checks before running the resolver.
# Returns {1 if the lock was taken else 0, the envelope or nil, Redis time in µs, the lock's
# remaining ms (when not taken: when it is worth asking again)}.
_ACQUIRE_OR_READ = """
local won = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if won then
  return {1, cur, now, tonumber(ARGV[2])}
end
return {0, cur, now, redis.call('PTTL', KEYS[2])}
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the tombstone envelope (a new version, no value)
# ARGV[2] - physical TTL of the tombstone, ms
# ARGV[3] - bus channel
# ARGV[4] - bus message
# A delete: drop the value first (DEL is allowed even when Redis is out of memory), announce it,
# then leave the tombstone that makes in-flight older fills fail their compare-and-set. If the
# tombstone cannot be written (OOM), the delete has still happened.
_TOMBSTONE = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
redis.pcall('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] - the lock key
# ARGV[1] - the token of the holder
# Compare-and-delete: a holder can only release its own lock.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] - the lock key
# ARGV[1] - the token of the holder
# ARGV[2] - new TTL, ms
# Compare-and-extend: used to keep a failed key's lock as a refresh throttle.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


# KEYS[1] - the entry's value key
# ARGV[1] - the version the toucher read
# ARGV[2] - 16 bytes: new fresh_until and stale_until (float64 big-endian)
# ARGV[3] - new physical TTL, ms
# Sliding strategy: move an entry's freshness forward, only if it was not replaced meanwhile.
_TOUCH = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 3, 10) == ARGV[1] then
  redis.call('SETRANGE', KEYS[1], 18, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""
_TIMES = struct.Struct(">dd")  # fresh_until, stale_until


# KEYS[1]    - the cache's invalidation log (sorted set, cache-wide slot)
# KEYS[2..n] - the tag sets of the entry's tags (same slot)
# ARGV[1]    - the member naming the entry: encoded key .. '|' .. version hex
# ARGV[2]    - how long the tag sets must live at least, ms
# ARGV[3]    - when the load of the entry began (Redis time, µs)
# After a fill: index the entry under its tags, and return the invalidations recorded since the
# load began. Atomic: an invalidation either comes before (the filler sees it and withdraws its
# entry) or after (its scan of the tag set finds the entry).
_INDEX = """
for i = 2, #KEYS do
  redis.call('SADD', KEYS[i], ARGV[1])
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[2]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
end
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
"""

# KEYS[1] - the cache's invalidation log
# ARGV[1] - the invalidation ('p:' .. pattern or 't:' .. tag)
# ARGV[2] - how long invalidations are remembered, ms
# Records an invalidation at Redis's clock (µs) and forgets the old ones; returns the time.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]) * 1000)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
"""

# KEYS[1] - the entry's value key
# ARGV[1] - the version to drop (8 bytes)
# ARGV[2] - tombstone envelope
# ARGV[3] - tombstone TTL, ms
# ARGV[4] - bus channel ('' = do not announce; the caller announces in bulk)
# ARGV[5] - bus message
# Drop the entry only if it is still that version (an invalidation must not hit a newer write).
_DROP_IF_VERSION = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 3, 10) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[4] ~= '' then
    redis.call('PUBLISH', ARGV[4], ARGV[5])
  end
  redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""


# KEYS[1] - the entry's value key
# KEYS[2] - the entry's write-through outcomes (hash: version hex -> status)
# ARGV[1] - the new envelope
# ARGV[2] - its physical TTL, ms
# ARGV[3] - its created_at (seconds, the writer's wall clock)
# ARGV[4] - bus channel
# ARGV[5] - bus message
# ARGV[6] - the new envelope's version (8 bytes)
# ARGV[7] - the version as hex (the outcome's field)
# ARGV[8] - how long outcomes are kept, ms
# Write-through's cache link: write unless a newer write (or delete) is already there, record
# the outcome "ok" either way, announce. Idempotent: a redelivered link rewrites the same entry.
_PUT_IF_NEWER = """
local cur = redis.call('GET', KEYS[1])
local write = true
if cur and string.len(cur) >= 44 and string.sub(cur, 3, 10) ~= ARGV[6] then
  local created = struct.unpack('>d', string.sub(cur, 11, 18))
  if created > tonumber(ARGV[3]) then
    write = false
  end
end
if write then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
redis.call('HSET', KEYS[2], ARGV[7], 'ok')
redis.call('PEXPIRE', KEYS[2], ARGV[8])
redis.call('PUBLISH', ARGV[4], ARGV[5])
if write then
  return 1
end
return 0
"""


# KEYS[1] - the entry's write-through outcomes (hash; field "hw" = newest created_at written)
# KEYS[2] - the entry's origin-write lock
# ARGV[1] - the link's lock token
# ARGV[2] - lock TTL, ms
# ARGV[3] - the write's version hex
# ARGV[4] - the write's created_at
# ARGV[5] - how long outcomes are kept, ms
# Before an origin write: 'done' (already written: a redelivery), 'superseded' (a newer write
# reached the origin first; recorded as ok), 'go' (lock taken: write now) or 'wait'.
_ORIGIN_BEGIN = """
local state = redis.call('HGET', KEYS[1], ARGV[3])
if state == 'origin' or state == 'ok' then
  return 'done'
end
local hw = tonumber(redis.call('HGET', KEYS[1], 'hw') or '-1')
if hw > tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], ARGV[3], 'ok')
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  return 'superseded'
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 'go'
end
return 'wait'
"""

# KEYS[1] - the entry's write-through outcomes
# KEYS[2] - the entry's origin-write lock
# ARGV[1] - the link's lock token
# ARGV[2] - the write's version hex
# ARGV[3] - the write's created_at
# ARGV[4] - how long outcomes are kept, ms
# After an origin write: record it (and the high-water mark), release the lock.
_ORIGIN_DONE = """
redis.call('HSET', KEYS[1], ARGV[2], 'origin')
local hw = tonumber(redis.call('HGET', KEYS[1], 'hw') or '-1')
if tonumber(ARGV[3]) > hw then
  redis.call('HSET', KEYS[1], 'hw', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisConn:
    """A redis-py client with a circuit breaker and the library's scripts registered once."""

    def __init__(
        self,
        client: redis.Redis,
        breaker: CircuitBreaker | None = None,
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.cluster = is_cluster_client(client)
        self.breaker = breaker or CircuitBreaker()
        self._on_failure = on_failure
        self._quiet_until: dict[str, float] = {}
        self.fill_script = client.register_script(_FILL)
        self.put_script = client.register_script(_PUT)
        self.release_script = client.register_script(_RELEASE)
        self.extend_script = client.register_script(_EXTEND)
        self.touch_script = client.register_script(_TOUCH)
        self.tombstone_script = client.register_script(_TOMBSTONE)
        self.acquire_script = client.register_script(_ACQUIRE_OR_READ)
        self.index_script = client.register_script(_INDEX)
        self.record_script = client.register_script(_RECORD)
        self.drop_script = client.register_script(_DROP_IF_VERSION)
        self.put_if_newer_script = client.register_script(_PUT_IF_NEWER)
        self.origin_begin_script = client.register_script(_ORIGIN_BEGIN)
        self.origin_done_script = client.register_script(_ORIGIN_DONE)
        self.read_at_script = client.register_script(_READ_AT)

    def primaries(self) -> list[redis.Redis]:
        """A client of each primary: the client itself on one server, one per cluster node."""
        if not self.cluster:
            return [self.client]
        cluster = cast("RedisCluster", self.client)
        return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]  # type: ignore[no-untyped-call]

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
            node = cluster.get_node_from_key(keys[0])  # type: ignore[no-untyped-call]
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
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException) as exc:
            # RedisClusterException: no node answers the layout query, or a slot has no node.
            self.breaker.failure()
            self._failed("unreachable", exc)
            raise L2Unavailable(f"redis unreachable: {type(exc).__name__}") from exc
        except ResponseError as exc:
            self.breaker.success()
            self._failed("refused", exc)
            raise L2Unavailable(f"redis refused: {str(exc)[:80]}") from exc
        except RedisError as exc:
            self.breaker.failure()
            self._failed("error", exc)
            raise L2Unavailable(f"redis error: {type(exc).__name__}") from exc
        self.breaker.success()
        return result

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
            return found or None, int(seconds) * 1_000_000 + int(micros)

        def both() -> list[Any]:
            pipe = self.conn.client.pipeline(transaction=False)
            pipe.time()
            pipe.get(self.keys.value(key))
            return pipe.execute()

        (seconds, micros), raw = self.conn.run(both)
        return cast("bytes | None", raw), int(seconds) * 1_000_000 + int(micros)

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        """Try to take ``key``'s lock (``SET NX PX``); True if this caller now holds it."""
        ok = self.conn.run(
            self.conn.client.set, self.keys.lock(key), token, nx=True, px=max(1, int(ttl * 1000))
        )
        return bool(ok)

    def acquire_or_read(
        self, key: str, token: str, ttl: float
    ) -> tuple[bool, bytes | None, int, float]:
        """Try to take ``key``'s lock and read its envelope, in one round trip.

        Also returns Redis's clock (µs): the instant a load that follows begins, comparable
        with the instants invalidations are recorded at; and the seconds the lock is held for
        (``ttl`` if taken, else what is left of the holder's).
        """
        keys = [self.keys.value(key), self.keys.lock(key)]
        reply = self.conn.run(self.conn.acquire_script, keys=keys, args=[token, _ms(ttl)])
        won, raw, now, left_ms = cast("list[Any]", reply)
        left = int(left_ms) / 1000 if int(left_ms) > 0 else ttl  # -1: no TTL (not ours)
        return bool(won), raw, int(now), left

    def now_us(self) -> int:
        """Redis's clock, in µs."""
        seconds, micros = cast("tuple[int, int]", self.conn.run(self.conn.client.time))
        return int(seconds) * 1_000_000 + int(micros)

    def release(self, key: str, token: str) -> bool:
        """Release ``key``'s lock if ``token`` still owns it."""
        return bool(
            self.conn.run(self.conn.release_script, keys=[self.keys.lock(key)], args=[token])
        )

    def hold(self, key: str, token: str, ttl: float) -> bool:
        """Extend ``key``'s lock to ``ttl`` seconds if ``token`` still owns it."""
        return bool(
            self.conn.run(
                self.conn.extend_script,
                keys=[self.keys.lock(key)],
                args=[token, max(1, int(ttl * 1000))],
            )
        )

    def fill(
        self, key: str, seen_version: bytes, envelope: bytes, ttl: float, token: str, message: bytes
    ) -> bool:
        """Write ``envelope`` if the entry's version is still ``seen_version``; announce; unlock."""
        keys = [self.keys.value(key), self.keys.lock(key)]
        args = [seen_version, envelope, max(1, int(ttl * 1000)), token, self.channel, message]
        return bool(self.conn.run(self.conn.fill_script, keys=keys, args=args))

    def put(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """Write ``envelope`` unconditionally (a set or a tombstone) and announce it."""
        args = [envelope, max(1, int(ttl * 1000)), self.channel, message]
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

    def unlink(self, keys: list[bytes]) -> int:
        """UNLINK ``keys`` (one round trip; on a cluster, one per node); how many existed."""
        if self.conn.cluster:  # one UNLINK per key, pipelined: keys of many slots cannot share one

            def each() -> list[int]:
                pipe = self.conn.client.pipeline(transaction=False)
                for key in keys:
                    pipe.unlink(key)
                return cast("list[int]", pipe.execute())

            return sum(self.conn.run(each))
        return cast(int, self.conn.run(self.conn.client.unlink, *keys))

    def publish(self, message: bytes) -> None:
        """Send ``message`` on the bus channel."""
        self.conn.run(self.conn.client.publish, self.channel, message)

    def tombstone(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """Delete ``key``'s value, announce it, and leave ``envelope`` (a tombstone) behind."""
        args = [envelope, max(1, int(ttl * 1000)), self.channel, message]
        self.conn.run(self.conn.tombstone_script, keys=[self.keys.value(key)], args=args)

    def touch(
        self, key: str, version: bytes, fresh_until: float, stale_until: float, ttl: float
    ) -> bool:
        """Sliding strategy: move the entry's freshness forward if it is still ``version``."""
        args = [version, _TIMES.pack(fresh_until, stale_until), max(1, int(ttl * 1000))]
        return bool(self.conn.run(self.conn.touch_script, keys=[self.keys.value(key)], args=args))
