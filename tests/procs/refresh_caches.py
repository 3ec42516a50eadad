"""Caches for the worker tests (``tests/test_workers.py``).

``celery -A workers worker`` imports this module
(``OQRON_CACHE_MODULES=tests.procs.refresh_caches``) and so do the web processes
(``tests/procs/web.py``), so both declare the same caches by name.

Every resolver reports to the test through the shared Redis, under the test's namespace
(``oqron:<ns>:test:<cache>:<key>:...``, deleted with the namespace):

* ``...:calls``: INCR'd when the resolver starts (exact call counts across processes);
* ``...:runs``: one JSON line per run that returned: ``pid``, ``ppid`` (the worker's main process
  for a prefork child), ``n`` (its call number), ``started``/``ended`` (``time.monotonic()``,
  comparable across processes on Linux);
* ``...:where``: the ``pid``/``ppid`` of the run in progress (a blocked run can be found and
  killed).

and obeys the flag ``...:flag``, read at each call: ``block`` (wait until the flag changes),
``raise`` (raise :class:`ResolverFailure`), ``sleep:<seconds>``. A run returns
``{"gen": "new", "n": <call number>}``; tests seed the stale ``{"gen": "old"}`` themselves.

The namespace and the Redis URL are the ones ``oqron_cache.configure()`` was given in this
process, so nothing here depends on environment variables.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, cast

import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.redis.clients import connect
from oqron_cache.redis.replies import as_int

SWR = "wt_swr"  # lock 5 s: the headline, broker faults, a set racing a refresh
CRASH = "wt_crash"  # lock 2 s: a worker killed mid-refresh
FAIL = "wt_fail"  # the raising resolver: lock 1 s
QUICK = "wt_quick"  # lock 1 s: tests that wait for a lock or a message to expire
PLAIN = "wt_plain"  # no resolver: invalidation by task name

BLOCK_LIMIT = 60.0  # a blocked resolver gives up after this long (a test that forgot the flag)

_clients: dict[tuple[int, str], redis.Redis] = {}
_clients_lock = threading.Lock()


def control_key(namespace: str, cache: str, key: str, part: str) -> str:
    """The Redis key of a test-control value (``part``: calls, runs, where, flag)."""
    return f"oqron:{namespace}:test:{cache}:{key}:{part}"


def _settings() -> Any:
    runtime = oqron_cache.config.current_runtime(create=False)
    if runtime is None or runtime.settings.redis_url is None:
        raise RuntimeError("tests.procs.refresh_caches needs oqron_cache.configure(redis_url=...)")
    return runtime.settings


def _client(url: str) -> redis.Redis:
    # One client per process (a prefork child must not share its parent's sockets).
    ident = (os.getpid(), url)
    with _clients_lock:
        client = _clients.get(ident)
        if client is None:
            client = connect(url, socket_timeout=5, connect_timeout=5)  # any URL form
            _clients[ident] = client
        return client


class ResolverFailure(RuntimeError):
    """Raised by a resolver whose flag says ``raise``."""


def _resolve(cache: str, key: str) -> dict[str, Any]:
    settings = _settings()
    raw = _client(settings.redis_url)

    def ctl(part: str) -> str:
        return control_key(settings.namespace, cache, key, part)

    started = time.monotonic()
    n = as_int(raw.incr(ctl("calls")))
    raw.set(ctl("where"), json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "n": n}))
    flag = (cast("bytes | None", raw.get(ctl("flag"))) or b"").decode()
    if flag == "block":
        deadline = time.monotonic() + BLOCK_LIMIT
        while raw.get(ctl("flag")) == b"block" and time.monotonic() < deadline:
            time.sleep(0.005)
    elif flag == "raise":
        raise ResolverFailure(f"{cache} {key}: told to fail (call {n})")
    elif flag.startswith("sleep:"):
        time.sleep(float(flag.split(":", 1)[1]))
    run = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "n": n,
        "started": started,
        "ended": time.monotonic(),
    }
    raw.rpush(ctl("runs"), json.dumps(run))
    return {"gen": "new", "n": n}


def _resolver(cache: str) -> Any:
    def resolver(key: str) -> dict[str, Any]:
        return _resolve(cache, key)

    resolver.__name__ = f"resolve_{cache}"
    return resolver


def _tags(key: str, value: Any) -> list[str]:
    """A ``wt_plain`` value ``{"tags": [...], ...}`` carries those tags."""
    return list(value.get("tags", [])) if isinstance(value, dict) else []


def _tiers() -> list[Any]:
    return [MemoryTier(max_size=1000, ttl="30s"), RedisTier(ttl="30s")]


swr_cache = oqron_cache.cache(
    SWR,
    tiers=_tiers(),
    stale_ttl="300s",
    stampede=Stampede(lock_ttl="5s"),
    resolver=_resolver(SWR),
)
crash_cache = oqron_cache.cache(
    CRASH,
    tiers=_tiers(),
    stale_ttl="300s",
    stampede=Stampede(lock_ttl="2s"),
    resolver=_resolver(CRASH),
)
fail_cache = oqron_cache.cache(
    FAIL,
    tiers=_tiers(),
    stale_ttl="300s",
    stampede=Stampede(lock_ttl="1s"),
    resolver=_resolver(FAIL),
)
quick_cache = oqron_cache.cache(
    QUICK,
    tiers=_tiers(),
    stale_ttl="300s",
    stampede=Stampede(lock_ttl="1s"),
    resolver=_resolver(QUICK),
)
plain_cache = oqron_cache.cache(PLAIN, tiers=_tiers(), tags=_tags)

CACHES = {c.name: c for c in (swr_cache, crash_cache, fail_cache, quick_cache, plain_cache)}
TTL = 30.0
STALE_TTL = 300.0
