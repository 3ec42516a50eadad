"""One table of scenarios through both fronts: the same outcomes and the same counters.

The sync and async fronts are two drivers of the same steps (``oqron_cache.engine.steps``).
Each scenario below is written once, against a small ``Front`` (``get``, ``set``, ...); it runs
on a fresh cache through the sync methods and again through the ``a``-methods on an event
loop, and every value it returns, every error it raises and every counter of the cache's stats
must be equal. A step that one driver ran differently, or a path only one front has, shows up
here as a difference.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.config import current_runtime
from oqron_cache.testing import FakeClock
from tests.redis_server import RedisServer

# Counters that measure time or the machine, not the path taken.
UNCOMPARED = {"scope", "avg_latency_ms", "writes_pending"}


class Front:
    """The cache's API through one front: sync calls, or the a-methods on a private loop."""

    def __init__(self, cache: Any, sync: bool) -> None:
        self.cache = cache
        self.sync = sync
        self._loop = None if sync else asyncio.new_event_loop()

    def close(self) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self.sync:
            return getattr(self.cache, name)(*args, **kwargs)
        assert self._loop is not None
        return self._loop.run_until_complete(getattr(self.cache, "a" + name)(*args, **kwargs))

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", key, default)

    def get_or_set(self, key: str, factory: Callable[[], Any]) -> Any:
        return self._call("get_or_set", key, factory)

    def set(self, key: str, value: Any) -> None:
        self._call("set", key, value)

    def delete(self, key: str) -> None:
        self._call("delete", key)

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        return dict(self._call("get_many", keys))

    def set_many(self, values: dict[str, Any]) -> None:
        self._call("set_many", values)

    def delete_many(self, keys: list[str]) -> None:
        self._call("delete_many", keys)

    def invalidate_by_tag(self, tag: str) -> int:
        return int(self._call("invalidate_by_tag", tag))

    def invalidate_pattern(self, pattern: str) -> int:
        return int(self._call("invalidate_pattern", pattern))


class Origin:
    """A resolver that counts its calls, fails on request, and returns ``key-n``."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.fail:
            raise LookupError(f"origin down for {key}")
        return f"{key}-{n}"


def attempt(fn: Callable[[], Any]) -> Any:
    """``fn()``'s value, or its error's type (errors are outcomes too; their messages name the
    method called, ``get_many`` or ``aget_many``, so only their types are compared)."""
    try:
        return fn()
    except Exception as exc:  # compared between the fronts
        return ("raised", type(exc).__name__)


# -- the scenarios: (front, origin, clock, server) -> list of outcomes -------------------------


def cold_hot_and_l2(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    out = [f.get("a"), f.get("a")]  # a miss loaded, then an L1 hit
    f.cache.stack.l1.clear()
    out.append(f.get("a"))  # an L2 hit
    return [*out, origin.calls]


def stale_while_revalidate(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    out = [f.get("a")]
    clock.tick(11)  # past ttl, within stale_ttl
    out.append(f.get("a"))  # the stale value, a refresh requested
    assert current_runtime().dispatcher.join(10)
    out.append(f.get("a"))
    clock.tick(100)  # past ttl + stale_ttl: never served again
    out.append(f.get("a"))
    return [*out, origin.calls]


def writes_and_deletes(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    f.set("w", {"x": [1, 2]})
    out = [f.get("w")]
    f.delete("w")
    out.append(f.get("w"))  # loaded again
    f.set("big", "x" * 5000)  # larger than max_value_bytes: returned by nobody, not cached
    out.append(f.get("big"))
    out.append(attempt(lambda: f.set("bad", {1, 2})))  # not JSON
    return [*out, origin.calls]


def resolver_errors(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    origin.fail = True
    out = [attempt(lambda: f.get("e"))]  # nothing servable: the resolver's own error
    origin.fail = False
    out.append(f.get("e"))
    clock.tick(200)
    origin.fail = True
    out.append(attempt(lambda: f.get("e")))
    return [*out, origin.calls]


def factories(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    made: list[int] = []

    def factory() -> str:
        made.append(1)
        return "made"

    out = [f.get_or_set("g", factory), f.get_or_set("g", factory), len(made)]
    out.append(attempt(lambda: f.get_or_set("h", "not callable")))  # type: ignore[arg-type]
    return out


def many_keys(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    f.set_many({"m1": 1, "m2": None, "m3": [3]})
    out: list[Any] = [f.get_many(["m1", "m2", "m3", "m4"])]  # m4 loaded by the resolver
    f.cache.stack.l1.clear()
    out.append(f.get_many(["m3", "m1"]))
    f.delete_many(["m1", "m3"])
    out.append(f.get_many(["m1", "m2"]))
    out.append(attempt(lambda: f.get_many("m1")))  # type: ignore[arg-type]
    return [*out, origin.calls]


def tags_and_patterns(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    f.set("user:1", "one")
    f.set("user:2", "two")
    out = [f.invalidate_pattern("user:*"), f.get("user:1")]
    out.append(f.invalidate_by_tag("t:user:1"))
    return [*out, origin.calls]


def redis_down(f: Front, origin: Origin, clock: FakeClock, server: Any) -> list[Any]:
    out = [f.get("d")]
    f.cache.stack.l1.clear()
    server.kill()
    out.append(f.get("d"))  # L2 unreachable: loaded again, no error (P1)
    out.append(f.get("other"))
    f.set("d", "written while down")  # deferred for replay (P14); whether L1 keeps it
    return [*out, origin.calls]  # depends on the breaker's timing: not compared here


SCENARIOS = [
    cold_hot_and_l2,
    stale_while_revalidate,
    writes_and_deletes,
    resolver_errors,
    factories,
    many_keys,
    tags_and_patterns,
    redis_down,
]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as redis_server:
        yield redis_server


def play(scenario: Callable[..., list[Any]], sync: bool, server: RedisServer) -> tuple[Any, Any]:
    """Run ``scenario`` on a fresh configuration and cache; its outcomes and counters."""
    oqron_cache.configure(redis_url=server.url, namespace=f"fronts-{sync}", op_timeout="100ms")
    clock = FakeClock()
    origin = Origin()
    cache = oqron_cache.cache(
        "table",
        tiers=[MemoryTier(max_size=100), RedisTier(ttl="10s")],
        stale_ttl="30s",
        resolver=origin,
        tags=lambda key, value: [f"t:{key}"],
        max_value_bytes=1000,
        clock=clock,
    )
    front = Front(cache, sync)
    try:
        outcomes = scenario(front, origin, clock, server)
        counters = {
            k: v for k, v in cache.get_stats(local=True).items() if k not in UNCOMPARED
        }
    finally:
        front.close()
        cache.close()
        oqron_cache.config.reset()
    return outcomes, counters


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_both_fronts_give_the_same_outcomes_and_counters(
    scenario: Callable[..., list[Any]],
) -> None:
    results = []
    for sync in (True, False):
        with RedisServer() as server:  # a fresh server each: a scenario may kill it
            results.append(play(scenario, sync, server))
    (sync_out, sync_counts), (async_out, async_counts) = results
    assert async_out == sync_out
    assert async_counts == sync_counts
    assert any(sync_counts.values())  # the scenario did something
