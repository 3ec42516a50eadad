"""The cache the refresh benchmarks share with their Celery worker (issue 3).

Both sides import this module: the benchmark's web processes, and the worker started with
``OQRON_CACHE_MODULES=bench.refresh_caches`` (so the worker's registry knows the cache a refresh
task names). Everything it needs comes from the environment the worker is given:

* ``OQRON_REDIS_URL``, ``OQRON_NAMESPACE``: the cache's Redis and the benchmark's namespace
  (``bench-<8 hex>``); the resolver counts its calls there, under ``<namespace>:calls:<key>``;
* ``BENCH_RESOLVER_SLEEP``: seconds the resolver sleeps (a slow query), default 0.05.

The resolver's value carries ``gen``, the call count of its key after this call, so a reader can
tell a refreshed value from the one it replaced.

It also holds the benchmarks' *floor* of a Celery refresh, :func:`bare_refresh` (task
``bench.bare_refresh``): the same resolver run by a plain Celery task that stores the value and
announces it, value included, in one round trip, with no library in between.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis
from celery import shared_task

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.redis.replies import as_int

from .common import sample_value

NAME = "bench-refresh"
TTL = 1.0  # seconds a value is fresh (L1 and L2): the benchmarks wait this long for staleness
STALE_TTL = "1h"
LOCK_TTL = "5s"

_client: redis.Redis | None = None


def counter_key(namespace: str, key: str) -> str:
    """The Redis key counting resolver calls for ``key`` (inside the benchmark's namespace)."""
    return f"{namespace}:calls:{key}"


def make_value(key: str, gen: int) -> dict[str, Any]:
    """The cached value of ``key`` at generation ``gen`` (about 200 bytes of JSON)."""
    return {**sample_value(key), "key": key, "gen": gen}


def resolver_sleep() -> float:
    """How long the resolver sleeps, from ``$BENCH_RESOLVER_SLEEP``."""
    return float(os.environ.get("BENCH_RESOLVER_SLEEP", "0.05"))


def _counter() -> redis.Redis:
    global _client  # noqa: PLW0603 - one client per process, made on first use (after a fork)
    if _client is None:
        _client = redis.Redis.from_url(os.environ["OQRON_REDIS_URL"])
    return _client


def resolve(key: str) -> dict[str, Any]:
    """Count the call, sleep like a slow query, return the value of the new generation."""
    gen = as_int(_counter().incr(counter_key(os.environ["OQRON_NAMESPACE"], key)))
    time.sleep(resolver_sleep())
    return make_value(key, gen)


bench_cache = oqron_cache.cache(
    NAME,
    tiers=[MemoryTier(max_size=10_000, ttl=TTL), RedisTier(ttl=TTL)],
    stale_ttl=STALE_TTL,
    stampede=Stampede(enabled=True, lock_ttl=LOCK_TTL, stale_while_revalidate=True),
    resolver=resolve,
)


BARE_TASK = "bench.bare_refresh"


def bare_names(namespace: str, key: str) -> tuple[str, str, str]:
    """The floor's Redis names for ``key``: its value, its lock, the channel announcing it."""
    return f"{namespace}:bare:{key}", f"{namespace}:bare-lock:{key}", f"{namespace}:bare"


def bare_refresh(key: str) -> None:
    """The floor of a Celery refresh: run the resolver; then, in one round trip, store the value,
    announce it with the value in the message (each process takes it from there, no re-read)
    and drop the lock. No envelope, no version check, no re-check before the resolver."""
    value_key, lock_key, channel = bare_names(os.environ["OQRON_NAMESPACE"], key)
    payload = json.dumps(resolve(key))
    pipe = _counter().pipeline(transaction=False)
    pipe.set(value_key, payload, ex=3600)
    pipe.publish(channel, json.dumps({"k": key, "v": payload}))
    pipe.delete(lock_key)
    pipe.execute()


# A shared task: registered on every Celery app of the process, the worker's included.
shared_task(name=BARE_TASK, ignore_result=True)(bare_refresh)
