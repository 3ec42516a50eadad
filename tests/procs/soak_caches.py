"""The caches, the origin and the resolver of the history-checked runs (stress test and soak).

The web processes (:mod:`tests.procs.soak_web`) call :func:`declare`; ``celery -A workers
worker`` imports this module (``OQRON_CACHE_MODULES=tests.procs.soak_caches``) and declares the
same caches from ``$SOAK_PARAMS`` (the JSON of :class:`Params`), so both sides know them by name:

* ``soak_swr``: L1 + L2, stale-while-revalidate, tagged ``g<n>`` (:func:`group`);
* ``soak_wt``: the same, with ``write_through`` to the origin.

The *origin* is what the caches cache: a version per key in a Redis of its own (the soak's
cache Redis is killed and restarted empty; the origin never is), in the hash
``oqron:<origin_ns>:origin:<cache>``. A ``soak_swr`` write takes the next version from the origin
itself (``HINCRBY``) and then calls ``set()``; a ``soak_wt`` write takes the next number of the
key's sequence (``...:<cache>:seq``) and ``set()`` writes the origin (the version only grows).
The resolver reads the origin's version and returns :func:`bench.history.make_value`, so every
value says which version it is and since when. Every resolver run, origin write and Celery task
message is recorded in the run's history (:mod:`bench.history`).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

import oqron_cache
from bench.history import Recorder, make_value
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.redis.replies import as_int

SWR = "soak_swr"
WT = "soak_wt"
GROUPS = 3
ENV = "SOAK_PARAMS"

_MAX_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local version = tonumber(ARGV[2])
if version > current then
  redis.call('HSET', KEYS[1], ARGV[1], version)
  return version
end
return current
"""


class InjectedResolverError(RuntimeError):
    """The resolver's own failure, injected at ``Params.error_rate`` (allowed to reach callers)."""


@dataclass(frozen=True)
class Params:
    """What the web processes and the workers must agree on (passed to workers as JSON)."""

    origin_url: str
    origin_ns: str
    history_dir: str
    ttl: float = 1.0
    stale_ttl: float = 2.0
    lock_ttl: float = 2.0
    resolver_sleep: float = 0.02
    error_rate: float = 0.0
    seed: int = 0

    def env(self) -> dict[str, str]:
        """The environment entry that makes a worker declare the same caches."""
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> Params | None:
        raw = os.environ.get(ENV)
        return cls(**json.loads(raw)) if raw else None


def key_name(index: int) -> str:
    """The ``index``-th key: ``k00``, ``k01``, ..."""
    return f"k{index:02d}"


def group(key: str) -> int:
    """The tag group of ``key`` (its number modulo :data:`GROUPS`)."""
    return int(key[1:]) % GROUPS


class Origin:
    """The origin's versions in Redis; one client per process (forked children get their own)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self._clients: dict[int, tuple[redis.Redis, Any]] = {}

    def _client(self) -> tuple[redis.Redis, Any]:
        pid = os.getpid()
        found = self._clients.get(pid)
        if found is None:  # no lock: one held at a fork would stay held in the child
            client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)
            found = self._clients[pid] = (client, client.register_script(_MAX_SCRIPT))
        return found

    def _hash(self, cache: str, part: str = "") -> str:
        return f"oqron:{self.namespace}:origin:{cache}{part}"

    def read(self, cache: str, key: str) -> int:
        """The version the origin holds for ``key`` (0: never written)."""
        raw = cast("bytes | None", self._client()[0].hget(self._hash(cache), key))
        return int(raw or 0)

    def bump(self, cache: str, key: str) -> int:
        """Write a new version to the origin and return it (a ``soak_swr`` write)."""
        return as_int(self._client()[0].hincrby(self._hash(cache), key, 1))

    def next_seq(self, cache: str, key: str) -> int:
        """The next number of the key's write sequence (a ``soak_wt`` write's version)."""
        return as_int(self._client()[0].hincrby(self._hash(cache, ":seq"), key, 1))

    def store_max(self, cache: str, key: str, version: int) -> int:
        """Write ``version`` unless the origin holds a newer one; return what it holds."""
        script = self._client()[1]
        return int(script(keys=[self._hash(cache)], args=[key, version]))


_state: dict[str, Any] = {}
_state_lock = threading.Lock()


def params() -> Params:
    found: Params | None = _state.get("params")
    if found is None:
        raise RuntimeError("tests.procs.soak_caches: declare(params) was not called")
    return found


def recorder() -> Recorder:
    rec: Recorder = _state["recorder"]
    return rec


def origin() -> Origin:
    found: Origin = _state["origin"]
    return found


def _rng() -> random.Random:
    # One generator per process, seeded by the run's seed and the pid.
    pid = os.getpid()
    rng: random.Random | None = _state.get(f"rng:{pid}")
    if rng is None:
        rng = _state[f"rng:{pid}"] = random.Random(f"{params().seed}:{pid}")
    return rng


def _resolver(cache: str) -> Any:
    def resolve(key: str) -> dict[str, Any]:
        settings = params()
        with recorder().op("origin_read", cache, key) as rec:
            if settings.error_rate and _rng().random() < settings.error_rate:
                raise InjectedResolverError(f"{cache} {key}: injected")
            version = origin().read(cache, key)
            at = time.time()
            rec["v"] = version
            if settings.resolver_sleep:
                time.sleep(settings.resolver_sleep)
        return make_value(version, at, f"r:{os.getpid()}")

    resolve.__name__ = f"resolve_{cache}"
    return resolve


def _write_origin(key: str, value: Any) -> None:
    with recorder().op("origin_write", WT, key) as rec:
        rec["v"] = value["v"]
        origin().store_max(WT, key, int(value["v"]))


def _tags(key: str, value: Any) -> list[str]:
    return [f"g{group(key)}"]


def _on_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    task_id = (headers or {}).get("id")
    recorder().event("task_pub", k=str(sender), x={"id": task_id})


def _on_prerun(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    name = getattr(sender, "name", str(sender))
    recorder().event("task_run", k=name, x={"id": task_id})


def _on_revoked(sender: Any = None, request: Any = None, expired: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    recorder().event("task_revoked", k=str(sender), x={"id": task_id, "expired": bool(expired)})


def _hook_celery() -> None:
    try:
        from celery.signals import after_task_publish, task_prerun, task_revoked
    except ImportError:  # pragma: no cover - celery is a dev dependency
        return
    after_task_publish.connect(_on_publish, weak=False)
    task_prerun.connect(_on_prerun, weak=False)
    task_revoked.connect(_on_revoked, weak=False)


def declare(settings: Params) -> dict[str, oqron_cache.Cache[Any]]:
    """Declare the two caches (once per process) and set up the origin and the recorder."""
    with _state_lock:
        if "caches" in _state:
            if _state["params"] != settings:
                raise RuntimeError("soak caches declared twice with different parameters")
            caches: dict[str, oqron_cache.Cache[Any]] = _state["caches"]
            return caches
        _state["params"] = settings
        _state["origin"] = Origin(settings.origin_url, settings.origin_ns)
        _state["recorder"] = Recorder(settings.history_dir)
        common: dict[str, Any] = {
            "tiers": [MemoryTier(max_size=1000), RedisTier(ttl=settings.ttl)],
            "stale_ttl": settings.stale_ttl,
            "stampede": Stampede(lock_ttl=settings.lock_ttl),
            "tags": _tags,
        }
        caches = {
            SWR: oqron_cache.cache(SWR, resolver=_resolver(SWR), **common),
            WT: oqron_cache.cache(
                WT, resolver=_resolver(WT), write_through=_write_origin, **common
            ),
        }
        _state["caches"] = caches
        _hook_celery()
        return caches


_from_env = Params.from_env()
if _from_env is not None:
    declare(_from_env)
