"""The demo's two caches and their counting resolver, shared by the demo's processes and worker.

The resolver sleeps :data:`RESOLVER_SECONDS` (the "slow database query") and counts its calls in
a Redis hash (:func:`counter_key`), so the count covers every process and the worker; calls made
inside a Celery refresh task are also counted apart (:func:`worker_field`).
:func:`declare_caches` declares "demo" (``stale_ttl`` 0) and "demo-swr" (``stale_ttl`` 30 s) on
it: the demo's processes call it after ``configure()``, and a worker of the demo imports
:mod:`oqron_cache.demo.caches`, which calls it at import.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from ..celery.tasks import REFRESH_TASK
from ..config import current_runtime
from ..core.options import MemoryTier, RedisTier
from ..frontend import Cache, cache
from ..redis.clients import connect

TTL = 1.0  # freshness of the demo's values, seconds
STALE_TTL = 30.0  # stale window of the stale-key phase's cache
RESOLVER_SECONDS = 0.05  # the "slow database query"
CACHE_NAMES = {"main": "demo", "swr": "demo-swr"}


def counter_key(namespace: str) -> str:
    """The Redis hash counting the resolver's calls (field: key; ``key@worker``: in a worker)."""
    return f"oqron:{namespace}:demo-calls"


def worker_field(key: str) -> str:
    """The counter of ``key``'s resolver calls made inside a Celery refresh task."""
    return f"{key}@worker"


def quiet_client(url: str, timeout: float) -> redis.Redis:
    """A client for the demo's own calls: short timeouts, no retries."""
    return connect(url, socket_timeout=timeout, connect_timeout=timeout, retries=0)


def _in_refresh_task() -> bool:
    try:
        from celery import current_task
    except ImportError:
        return False
    return getattr(current_task, "name", None) == REFRESH_TASK


class CountingResolver:
    """The demo's resolver: a 50 ms "query" that counts its calls here and in Redis.

    Calls made inside a Celery ``oqron_cache.refresh`` task are counted apart. The Redis counts
    (a hash in the configured namespace) cover every process, the worker's included; this
    process's own counts are what is left when Redis is absent or went away.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clients: dict[str, redis.Redis] = {}

    def __call__(self, key: str) -> dict[str, Any]:
        time.sleep(RESOLVER_SECONDS)
        fields = [key, worker_field(key)] if _in_refresh_task() else [key]
        with self._lock:
            self.calls.update(fields)
        runtime = current_runtime(create=False)
        url = runtime.settings.redis_url if runtime is not None else None
        if url is not None:
            # Best effort: if Redis went away, the table falls back to the local counts.
            with contextlib.suppress(redis.RedisError):
                pipe = self._client(url).pipeline(transaction=False)
                for name in fields:
                    pipe.hincrby(counter_key(runtime.settings.namespace), name, 1)
                pipe.execute()
        return {"key": key, "pid": os.getpid(), "computed_at": time.time()}

    def _client(self, url: str) -> redis.Redis:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = quiet_client(url, 1.0)
            return client

    def close(self) -> None:
        """Close the Redis clients."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def declare_caches(resolver: Callable[[str], Any], *, shared: bool) -> dict[str, Cache[Any]]:
    """The demo's two caches: "demo" (``stale_ttl`` 0) and "demo-swr" (``stale_ttl`` 30 s).

    ``shared``: L1 + L2 (Redis); else the memory tier alone.
    """
    tiers: list[MemoryTier | RedisTier]
    if shared:
        tiers = [MemoryTier(max_size=100), RedisTier(ttl=TTL)]
    else:
        tiers = [MemoryTier(max_size=100, ttl=TTL)]
    caches: dict[str, Cache[Any]] = {}
    try:
        caches["main"] = cache(CACHE_NAMES["main"], tiers=tiers, resolver=resolver)
        caches["swr"] = cache(
            CACHE_NAMES["swr"], tiers=tiers, stale_ttl=STALE_TTL, resolver=resolver
        )
    except BaseException:
        for each in caches.values():
            each.close()
        raise
    return caches
