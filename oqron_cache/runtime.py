"""The process's live parts after ``configure()``: the Redis client, the bus, the dispatcher.

Each cache builds its :class:`~oqron_cache.stack.CacheStack` from these on first use
(:meth:`Runtime.bind`). A new ``configure()`` makes a new Runtime and closes the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .celery.tasks import Enqueuer, check_timings, install
from .core.breaker import CircuitBreaker
from .core.errors import ConfigurationError, NotConfiguredError
from .core.flood import ADMIT, PAUSE_NOW, FloodGuard
from .core.keys import KeySpace, bus_channel
from .core.settings import Settings, mask_url
from .core.typed import make_codec
from .engine.l1 import MemoryStore
from .engine.recovery import Recovery
from .engine.refresh import Dispatcher
from .engine.stack import CacheStack
from .engine.stats_sync import StatsSync
from .redis.aio import AsyncRedisConn, AsyncRedisStore, connect_async
from .redis.bus import Bus
from .redis.checks import is_tls_failure
from .redis.clients import connect
from .redis.replies import as_dict
from .redis.store import RedisConn, RedisStore

if TYPE_CHECKING:
    from .frontend import Cache

log = logging.getLogger("oqron_cache")


def make_client(settings: Settings, retries: int = 1) -> redis.Redis:
    """A redis-py client with explicit timeouts and at most one immediate retry.

    redis-py 6 retries 3 times with backoff by default (about 9 s against a paused server); we
    retry once, without backoff, and only on connection errors (a stale pooled connection after a
    server restart or a Sentinel failover), never on timeouts.
    """
    assert settings.redis_url is not None
    return connect(
        settings.redis_url,
        socket_timeout=settings.op_timeout,
        connect_timeout=settings.connect_timeout,
        retries=retries,
        client_name="oqron-cache",
        max_connections=256,
    )


def _close_with(loop: asyncio.AbstractEventLoop, conn: AsyncRedisConn) -> None:
    """Close ``conn``'s pool when ``loop`` ends: ``asyncio.run`` (and any runner that calls
    ``loop.shutdown_asyncgens()``) finalises the loop's async generators before it closes the
    loop, and this one's ``finally`` closes the pool there, on its own loop."""

    async def closer() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await conn.close()

    agen = closer()
    conn.closer = agen  # a strong reference: the loop keeps only a weak one
    loop.create_task(agen.__anext__())  # type: ignore[arg-type]


class Runtime:
    """Live parts shared by every cache of this process."""

    def __init__(self, settings: Settings, implicit: bool = False) -> None:
        self.settings = settings
        self.implicit = implicit
        self.pid = os.getpid()  # a child forked without at-fork hooks finds another pid here
        self.dispatcher = Dispatcher()
        self.client: redis.Redis | None = None
        self.conn: RedisConn | None = None
        self.bus: Bus | None = None
        self.stacks: dict[str, CacheStack] = {}
        self.enqueuer: Enqueuer | None = None
        self.stats_sync: StatsSync | None = None
        self.recovery: Recovery | None = None
        self.flood = FloodGuard()
        if settings.celery_app is not None:
            install(settings.celery_app)
            self.enqueuer = Enqueuer(settings.celery_app, settings.enqueue_budget)
        self._lock = threading.Lock()
        # The async front's connections, one per event loop (a pool belongs to its loop).
        self._aconns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncRedisConn] = (
            weakref.WeakKeyDictionary()
        )
        if settings.redis_url is not None:
            self.client = make_client(settings)
            self.conn = RedisConn(self.client, CircuitBreaker(), op_timeout=settings.op_timeout)
            self.recovery = Recovery()
            self.conn.breaker.on_close = self.recovery.wake
            self.stats_sync = StatsSync(
                self.conn, settings.namespace, lambda: list(self.stacks.values())
            )
            # The bus has its own client without retries: a dropped subscription must surface
            # as an error here (and flush L1), not be silently re-established by redis-py.
            self.bus = Bus(
                make_client(settings, retries=0),
                bus_channel(settings.namespace),
                self._on_bus,
                self.flush_l1,
            )

    def start(self, check_policy: bool = True) -> None:
        """Check credentials and TLS now (fail fast), then start the bus listener.

        ``check_policy`` also warns if the Celery broker shares this Redis and may evict it.
        """
        if self.client is None or self.bus is None:
            return
        url = mask_url(self.settings.redis_url or "")
        try:
            self.client.ping()
        except AuthenticationError as exc:
            raise ConfigurationError(f"Redis at {url} refused the credentials: {exc}") from exc
        except ResponseError as exc:
            if "NOAUTH" in str(exc) or "NOPERM" in str(exc) or "WRONGPASS" in str(exc):
                raise ConfigurationError(f"Redis at {url} refused access: {exc}") from exc
            raise
        except (RedisConnectionError, OSError) as exc:
            if is_tls_failure(exc):
                raise ConfigurationError(f"TLS to Redis at {url} failed: {exc}") from exc
            log.warning(
                "Redis at %s is not reachable now (%s); caches serve from L1 and the "
                "resolver until it is",
                url,
                type(exc).__name__,
            )
        except redis.exceptions.TimeoutError:
            log.warning(
                "Redis at %s did not answer within %ss; caches degrade until it does",
                url,
                self.settings.op_timeout,
            )
        if check_policy:
            self._check_eviction_policy()
        self.bus.start(wait=1.0)
        if self.stats_sync is not None:
            self.stats_sync.start()
        if self.recovery is not None:
            self.recovery.start()

    def _check_eviction_policy(self) -> None:
        """Warn if the cache's Redis is also the Celery broker and evicts any key (row 19)."""
        app = self.settings.celery_app
        if app is None or self.client is None:
            return
        broker = str(app.conf.broker_url or "")
        if not broker.startswith(("redis://", "rediss://", "unix://")):
            return
        if not str(self.settings.redis_url or "").startswith(("redis://", "rediss://", "unix://")):
            return  # a sentinel-managed master: its address is not in the URL
        same = urlsplit(broker)._replace(path="", query="", fragment="")
        ours = urlsplit(self.settings.redis_url or "")._replace(path="", query="", fragment="")
        if (same.hostname, same.port) != (ours.hostname, ours.port):
            return
        try:
            info = as_dict(self.client.info("memory"))
        except redis.RedisError:
            return  # INFO may be forbidden by an ACL; nothing to check then
        policy = str(info.get("maxmemory_policy", ""))
        if policy.startswith("allkeys"):
            warnings.warn(
                f"Redis {mask_url(broker)} is both the cache and the Celery broker, and its "
                f"maxmemory-policy is {policy}: under memory pressure it can evict queued "
                "tasks. Use a separate instance (or volatile-lru).",
                stacklevel=4,
            )

    def bind(self, cache: Cache[Any]) -> CacheStack:
        """Build (once) the stack of ``cache`` from this runtime's parts."""
        with self._lock:
            stack = self.stacks.get(cache.name)
            if stack is not None and stack.owner is cache:
                return stack
            opts = cache.options
            l2 = None
            if opts.l2 is not None:
                if self.conn is None:
                    raise NotConfiguredError(
                        f"cache {cache.name!r} has a Redis tier but Redis is not configured: "
                        "call oqron_cache.configure(redis_url=...) at start-up "
                        "(or set OQRON_REDIS_URL)",
                        cache=cache.name,
                    )
                keyspace = KeySpace(self.settings.namespace, cache.name, opts.max_key_bytes)
                l2 = RedisStore(self.conn, keyspace, bus_channel(self.settings.namespace))
            l1 = (
                MemoryStore(opts.l1.max_size, lambda: cache.stats.incr("evictions"))
                if opts.l1 is not None
                else None
            )
            clock = cache.clock or self.settings.clock or time.time
            codec = make_codec(opts.codec, opts.value_type)
            stack = CacheStack(opts, codec, l1, l2, self, cache.stats, clock)
            if self.settings.celery_app is not None:
                check_timings(self.settings.celery_app, cache.name, opts.stampede.lock_ttl)
            stack.owner = cache
            self.stacks[cache.name] = stack
            return stack

    def async_store(self, stack: CacheStack) -> AsyncRedisStore:
        """``stack``'s L2 store on the running event loop."""
        assert stack.l2 is not None
        return self.async_conn().store(stack.l2.keys, stack.l2.channel)

    def async_conn(self) -> AsyncRedisConn:
        """The running loop's connection to Redis (made on its first use; no I/O until then)."""
        loop = asyncio.get_running_loop()
        conn = self._aconns.get(loop)
        if conn is None:
            with self._lock:
                conn = self._aconns.get(loop)
                if conn is None:
                    assert self.conn is not None and self.settings.redis_url is not None
                    client = connect_async(
                        self.settings.redis_url,
                        socket_timeout=self.settings.op_timeout,
                        connect_timeout=self.settings.connect_timeout,
                    )
                    conn = self._aconns[loop] = AsyncRedisConn(client, self.conn)
                    _close_with(loop, conn)
        return conn

    def unbind(self, name: str) -> None:
        """Forget the stack of cache ``name`` (the cache was closed)."""
        with self._lock:
            self.stacks.pop(name, None)

    def _on_bus(self, cache: str, op: str, keys: list[str], from_self: bool) -> None:
        stack = self.stacks.get(cache)
        if stack is None:
            return
        if op in ("clear", "pattern", "tag") and not from_self and stack.l1 is not None:
            verdict = self.flood.admit()
            if verdict != ADMIT:
                stack.stats.incr("bus_floods")
                if verdict == PAUSE_NOW:
                    self.flush_l1()  # once; L1 stays off while the flood lasts (flood.py)
                return
        stack.on_bus(op, keys, from_self)

    def flush_l1(self) -> None:
        """Drop every L1 entry of every cache (the bus was lost or came back)."""
        for stack in list(self.stacks.values()):
            stack.flush_l1()

    def close(self) -> None:
        """Stop the bus and the dispatcher, close connections."""
        if self.recovery is not None:
            self.recovery.close()
        if self.stats_sync is not None:
            self.stats_sync.stop()
        if self.bus is not None:
            self.bus.stop()
            with contextlib.suppress(Exception):  # closing is best effort
                self.bus.client.close()
        self.dispatcher.stop()
        if self.enqueuer is not None:
            self.enqueuer.close()
        if self.client is not None:
            with contextlib.suppress(Exception):  # closing is best effort
                self.client.close()
        self._close_async()

    def _close_async(self) -> None:
        """Close the async front's pools on their own loops (those still running)."""
        with self._lock:
            conns = list(self._aconns.items())
            self._aconns.clear()
        for loop, conn in conns:
            if loop.is_closed() or not loop.is_running():
                continue  # its sockets go with the loop
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(conn.close(), loop)

    def abandon(self) -> None:
        """In a forked child: make this inherited Runtime inert, without I/O or locks.

        Nothing is closed or stopped: its sockets are the parent's too, and its threads did
        not survive the fork. Its bus says unhealthy (a stack still holding this Runtime keeps
        L1 off) and its flusher never flushes in this process, not even at exit.
        """
        if self.bus is not None:
            self.bus.healthy = False
        if self.stats_sync is not None:
            self.stats_sync.abandon()
        if self.recovery is not None:
            self.recovery.abandon()  # the parent replays what it deferred, not the child

    def status(self) -> dict[str, Any]:
        """A summary for diagnostics (no secrets)."""
        return {
            "redis_url": mask_url(self.settings.redis_url) if self.settings.redis_url else None,
            "namespace": self.settings.namespace,
            "bus_healthy": bool(self.bus and self.bus.healthy),
            "breaker": self.conn.breaker.state if self.conn else None,
        }
