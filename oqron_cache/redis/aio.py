"""L2 for the async front: the same entry operations as :mod:`.store`, on ``redis.asyncio``.

One :class:`AsyncRedisConn` per event loop (a redis.asyncio pool belongs to the loop that made
it), built from the same URL and timeouts as the process's sync client and sharing its circuit
breaker and failure log, so both fronts degrade together (P1). The operations' arguments and
replies are :mod:`.store`'s own helpers: the two stores differ only in how they send.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ..core.keys import KeySpace
from .clients import sentinel_kwargs
from .store import (
    COMPUTING,
    FAILURES,
    SCRIPT_SOURCES,
    L2Unavailable,
    RedisConn,
    acquire_args,
    acquire_reply,
    clock_us,
    fill_args,
    live_entries,
    refused_late,
    touch_args,
    write_args,
)
from .urls import CLUSTER_SCHEMES, SENTINEL_SCHEME, check_url, parse_cluster_url, parse_sentinel_url

T = TypeVar("T")
LOOP_CONNECTIONS = 8  # per event loop (see connect_async)


def connect_async(
    url: str, *, socket_timeout: float, connect_timeout: float, retries: int = 1
) -> Any:
    """A ``redis.asyncio`` client for ``url`` with the sync client's timeouts and retries
    (see :func:`oqron_cache.redis.clients.connect`); lazily connected, on the running loop."""
    from redis.asyncio.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
        "retry_on_timeout": False,
        "client_name": "oqron-cache-aio",
    }
    scheme = url.partition(":")[0]
    if scheme in CLUSTER_SCHEMES:
        target = parse_cluster_url(url)
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in target.nodes],
            require_full_coverage=False,  # a slot whose node is down fails alone (P1)
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            username=target.username,
            password=target.password,
            ssl=target.tls,
        )
    if scheme != SENTINEL_SCHEME:
        check_url(url)
        # A bounded pool: a burst of tasks reuses LOOP_CONNECTIONS connections instead of
        # opening one each, which would hold the loop (about 0.3 ms of Python per new
        # connection) for as long as the burst is wide (P12). Tasks beyond it wait, on the
        # loop, for a connection to come back (each request is bounded by the op timeout).
        pool = BlockingConnectionPool.from_url(
            url, max_connections=LOOP_CONNECTIONS, timeout=None, **options
        )
        return aredis.Redis(connection_pool=pool)
    sentinel_target = parse_sentinel_url(url)
    sentinel_options = sentinel_kwargs(sentinel_target, socket_timeout, connect_timeout)
    sentinel = AsyncSentinel(list(sentinel_target.sentinels), sentinel_kwargs=sentinel_options)
    return sentinel.master_for(
        sentinel_target.service,
        db=sentinel_target.db,
        username=sentinel_target.username,
        password=sentinel_target.password,
        **options,
    )


class AsyncRedisConn:
    """A ``redis.asyncio`` client of one loop, with the library's scripts and the sync
    connection's breaker (``base``)."""

    def __init__(self, client: Any, base: RedisConn) -> None:
        self.client = client
        self.base = base
        self.cluster = isinstance(client, AsyncRedisCluster)
        self.breaker = base.breaker
        self.scripts = {name: client.register_script(src) for name, src in SCRIPT_SOURCES.items()}
        self.stores: dict[str, AsyncRedisStore] = {}
        self.closer: Any = None  # what closes it when its loop ends (Runtime.async_conn)

    async def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Await ``fn(*args, **kwargs)`` through the breaker (as ``RedisConn.run``)."""
        if not self.breaker.allow():
            raise L2Unavailable("circuit open")
        try:
            result = await fn(*args, **kwargs)
        except FAILURES as exc:
            raise self.base.unavailable(exc) from exc
        self.breaker.success()
        return result

    async def script(self, name: str, keys: list[Any], args: list[Any]) -> Any:
        """Run the library's script ``name`` (a ``RedisConn`` attribute name)."""
        return await self.run(self.scripts[name], keys=keys, args=args)

    def store(self, keyspace: KeySpace, channel: str) -> AsyncRedisStore:
        """The store of the cache named by ``keyspace`` on this connection (made once)."""
        store = self.stores.get(keyspace.cache)
        if store is None or store.keys is not keyspace:
            store = self.stores[keyspace.cache] = AsyncRedisStore(self, keyspace, channel)
        return store

    async def run_each(self, name: str, calls: list[tuple[list[Any], list[Any]]]) -> list[Any]:
        """The script ``name`` once per ``(keys, args)``, pipelined (a cluster's pipeline
        sends each node its share)."""
        script = self.scripts[name]
        if self.cluster:
            # One call per entry, each to its slot's node, one after another: redis-py's async
            # cluster client can break a connection it is still opening when many commands
            # share it at once (redis-py 8.1: AttributeError on its writer).
            return [await self.script(name, k, a) for k, a in calls]

        async def pipelined() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.scripts.add(script)
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            return cast("list[Any]", await pipe.execute())

        return cast("list[Any]", await self.run(pipelined))

    async def close(self) -> None:
        """Close the client, its pool (which a client given a pool does not close) and, behind
        a Sentinel URL, the clients of the sentinels."""
        with contextlib.suppress(Exception):  # best effort
            await _aclose(self.client)
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()
            manager = getattr(pool, "sentinel_manager", None)
            for sentinel in getattr(manager, "sentinels", ()):
                with contextlib.suppress(Exception):
                    await _aclose(sentinel)
                    await sentinel.connection_pool.disconnect()


async def _aclose(client: Any) -> None:
    """``await client.aclose()``; redis-py 5.0.0 has only ``close()`` (``aclose`` is 5.0.1's)."""
    closer = getattr(client, "aclose", None) or client.close
    await closer()


class AsyncRedisStore:
    """The entry operations of one cache on one loop (the methods the steps name)."""

    def __init__(self, conn: AsyncRedisConn, keyspace: KeySpace, channel: str) -> None:
        self.conn = conn
        self.keys = keyspace
        self.channel = channel

    async def read(self, key: str) -> bytes | None:
        return cast("bytes | None", await self.conn.run(self.conn.client.get, self.keys.value(key)))

    async def read_at(self, key: str) -> tuple[bytes | None, int]:
        if self.conn.cluster:
            reply = await self.conn.script("read_at_script", [self.keys.value(key)], [])
            seconds, micros, found = cast("list[Any]", reply)
            return found or None, clock_us(seconds, micros)

        async def both() -> list[Any]:
            pipe = self.conn.client.pipeline(transaction=False)
            pipe.time()
            pipe.get(self.keys.value(key))
            return cast("list[Any]", await pipe.execute())

        (seconds, micros), raw = await self.conn.run(both)
        return cast("bytes | None", raw), clock_us(seconds, micros)

    async def acquire_or_read(
        self,
        key: str,
        token: str,
        ttl: float,
        phase: str = COMPUTING,
        take_over: bool = False,
    ) -> tuple[bool, bytes | None, int, float]:
        keys = [self.keys.value(key), self.keys.lock(key)]
        base = self.conn.base
        args = acquire_args(token, ttl, phase, take_over, base.deadline_us())
        reply = await self.conn.script("acquire_script", keys, args)
        if refused_late(reply):  # answered after all: our idea of Redis's clock was off
            base.observe_clock(int(reply[2]), reset=True)
            args = acquire_args(token, ttl, phase, take_over, 0)
            reply = await self.conn.script("acquire_script", keys, args)
        found = acquire_reply(reply, ttl)
        base.observe_clock(found[2])
        return found

    async def release(self, key: str, token: str) -> bool:
        return bool(await self.conn.script("release_script", [self.keys.lock(key)], [token]))

    async def fill(
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
        keys = [self.keys.value(key), self.keys.lock(key)]
        args = fill_args(seen_version, envelope, ttl, token, self.channel, message, age, horizon)
        written, now_us = cast("list[int]", await self.conn.script("fill_script", keys, args))
        return int(written), int(now_us)

    async def put(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        args = write_args(envelope, ttl, self.channel, message)
        await self.conn.script("put_script", [self.keys.value(key)], args)

    async def tombstone(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        args = write_args(envelope, ttl, self.channel, message)
        keys = [self.keys.value(key), self.keys.lock(key)]
        await self.conn.script("tombstone_script", keys, args)

    async def touch(
        self, key: str, version: bytes, fresh_until: float, stale_until: float, ttl: float
    ) -> bool:
        args = touch_args(version, fresh_until, stale_until, ttl)
        return bool(await self.conn.script("touch_script", [self.keys.value(key)], args))

    async def read_many(self, keys: list[str]) -> list[bytes | None]:
        async def all_of_them() -> list[bytes | None]:
            pipe = self.conn.client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self.keys.value(key))
            return cast("list[bytes | None]", await pipe.execute())

        return cast("list[bytes | None]", await self.conn.run(all_of_them))

    async def put_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        calls = [
            ([self.keys.value(key)], write_args(envelope, ttl, self.channel, message))
            for key, envelope, ttl, message in items
        ]
        await self.conn.run_each("put_script", calls)

    async def tombstone_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        calls = [
            (
                [self.keys.value(key), self.keys.lock(key)],
                write_args(envelope, ttl, self.channel, message),
            )
            for key, envelope, ttl, message in items
        ]
        await self.conn.run_each("tombstone_script", calls)

    async def scan_page(
        self, match: str, count: int, node: int, cursor: int
    ) -> tuple[int, int, list[bytes]]:
        if self.conn.cluster:
            raise NotImplementedError("pattern scans on a cluster run on the sync front")
        reply = await self.conn.run(self.conn.client.scan, cursor=cursor, match=match, count=count)
        cursor, page = cast("tuple[int, list[bytes]]", reply)
        return (-1 if cursor == 0 else 0), cursor, page

    async def unlink_live(self, keys: list[bytes]) -> int:
        keys = list(dict.fromkeys(keys))

        async def flags() -> list[bytes]:
            pipe = self.conn.client.pipeline(transaction=False)
            for key in keys:
                pipe.getrange(key, 1, 1)
            return cast("list[bytes]", await pipe.execute())

        found = await self.conn.run(flags)
        await self.conn.run(self.conn.client.unlink, *keys)
        return live_entries(found)

    async def publish(self, message: bytes) -> None:
        await self.conn.run(self.conn.client.publish, self.channel, message)
