"""The async front (DESIGN section 10): ``await cache.aget(...)`` and friends, on real Redis.

Single-flight across tasks, threads and processes at once; cancellation of a leader or a waiter
strands no one and leaves no lock; an L1 hit never yields to the loop; one pool per loop (a new
loop per ``asyncio.run`` works); async resolvers on both fronts and in the refresher.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede, refreshing_cache
from oqron_cache.config import current_runtime
from oqron_cache.redis.replies import as_dict, as_int
from tests.procs import Child, worker_args


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def lock_key(cache: Any, key: str) -> str:
    return cast("str", cache.stack.l2.keys.lock(key))


# -- the hot path --------------------------------------------------------------------------


def test_an_l1_hit_does_no_io_and_never_yields_to_the_loop(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(ttl="1m")
    cache.set("k", {"v": 1})
    coro = cache.aget("k")
    with pytest.raises(StopIteration) as done:
        coro.send(None)  # runs to its end without suspending once
    assert done.value.value == {"v": 1}


def test_l2_is_read_on_the_running_loop_one_pool_per_loop(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(ttl="1m")
    cache.set("k", [1, 2])
    runtime = current_runtime()
    seen: list[Any] = []

    async def read() -> Any:
        cache.stack.l1.clear()
        value = await cache.aget("k")
        seen.append(runtime._aconns.get(asyncio.get_running_loop()))
        return value

    # asyncio.run twice: two loops, each with its own pool; no "attached to a different loop"
    assert run(read()) == [1, 2]
    assert run(read()) == [1, 2]
    assert seen[0] is not None and seen[1] is not None and seen[0] is not seen[1]
    assert cache.get_stats(local=True)["l2_hits"] == 2


@pytest.mark.asyncio
async def test_writes_deletes_and_many_keys_on_the_async_front(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    other = make_cache(ttl="1m")
    cache = make_cache(ttl="1m", name=other.name + "-a")
    await cache.aset("a", 1)
    assert await cache.aget("a") == 1
    assert cache.get("a") == 1
    await cache.adelete("a")
    assert await cache.aget("a") is None
    await cache.aset_many({"x": 1, "y": [2], "z": None})
    assert await cache.aget_many(["x", "y", "z", "missing"]) == {"x": 1, "y": [2], "z": None}
    cache.stack.l1.clear()
    assert await cache.aget_many(["y", "x"]) == {"y": [2], "x": 1}
    await cache.adelete_many(["x", "y"])
    assert await cache.aget_many(["x", "y", "z"]) == {"z": None}
    assert await cache.aget_or_set("f", lambda: "sync factory") == "sync factory"

    async def factory() -> str:
        return "async factory"

    assert await cache.aget_or_set("g", factory) == "async factory"
    stats = await cache.aget_stats()
    assert stats["sets"] == 4 and stats["deletes"] == 3


def test_get_many_reads_every_key_below_l1_in_one_round_trip(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    cache = make_cache(ttl="1m")
    cache.set_many({f"k{i}": i for i in range(50)})
    cache.stack.l1.clear()
    before = as_dict(redis_client.info("commandstats"))
    gets_before = before.get("cmdstat_get", {}).get("calls", 0)
    assert cache.get_many([f"k{i}" for i in range(50)]) == {f"k{i}": i for i in range(50)}
    after = as_dict(redis_client.info("commandstats"))
    assert after["cmdstat_get"]["calls"] - gets_before >= 50  # one pipeline of 50 GETs ...
    assert cache.get_stats(local=True)["l2_hits"] == 50  # ... and no second read of any
    with pytest.raises(TypeError, match="list of keys"):
        cache.get_many("k1")
    with pytest.raises(oqron_cache.InvalidKeyError):
        cache.get_many(["ok", 3])


# -- single-flight across tasks, threads and processes -----------------------------------


@pytest.mark.slow
@pytest.mark.asyncio
async def test_64_tasks_8_threads_and_3_processes_run_the_resolver_once(
    configured: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    ns = configured
    name = f"af-{uuid.uuid4().hex[:8]}"
    key = "hot"
    counter = f"oqron:{ns}:test:calls"
    go = f"oqron:{ns}:test:go"
    started = f"oqron:{ns}:test:started"
    processes = 4  # 3 children and this one

    async def resolver(k: str) -> dict[str, Any]:
        n = as_int(redis_client.incr(counter))
        deadline = time.monotonic() + 10
        while int(cast("bytes | None", redis_client.get(started)) or 0) < processes:
            assert time.monotonic() < deadline, "the other processes never started"
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)
        return {"key": k, "n": n}

    cache = oqron_cache.cache(
        name, tiers=[MemoryTier(max_size=1000), RedisTier(ttl="60s")], resolver=resolver
    )
    args = worker_args(
        "stampede", redis_url, ns, name, key, counter=counter, go=go, started=started,
        processes=processes, threads=8, sleep=0.05,
    )  # fmt: skip
    children = [Child(args, tmp_path / f"child-{i}.log") for i in range(3)]
    thread_values: list[Any] = []
    try:
        for child in children:
            child.expect("ready", timeout=30)
        barrier = threading.Barrier(8 + 1)

        def in_thread() -> None:
            barrier.wait()
            thread_values.append(cache.get(key))

        threads = [threading.Thread(target=in_thread) for _ in range(8)]
        for thread in threads:
            thread.start()

        redis_client.rpush(go, *["go"] * 3)
        barrier.wait()
        calls = [asyncio.ensure_future(cache.aget(key)) for _ in range(64)]
        await asyncio.sleep(0)  # every task has started its get
        redis_client.incr(started)
        task_values = await asyncio.gather(*calls)
        for thread in threads:
            thread.join(30)
        results = [child.expect("result", timeout=30) for child in children]
    finally:
        for child in children:
            child.close()
        cache.close()
    assert int(cast("bytes", redis_client.get(counter))) == 1
    values = task_values + thread_values + [v for r in results for v in r["values"]]
    assert len(values) == 64 + 8 + 3 * 8
    assert all(v == {"key": key, "n": 1} for v in values), {repr(v) for v in values}


# -- cancellation ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_cancelled_leader_hands_the_load_on_and_releases_its_lock(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    runs: list[int] = []

    async def resolver(key: str) -> str:
        runs.append(1)
        if len(runs) == 1:
            await asyncio.sleep(3600)  # the first load hangs until cancelled
        return f"{key}-{len(runs)}"

    cache = make_cache(ttl="1m", resolver=resolver)
    leader = asyncio.ensure_future(cache.aget("k"))
    while not runs:
        await asyncio.sleep(0.001)
    assert redis_client.exists(lock_key(cache, "k"))
    waiters = [asyncio.ensure_future(cache.aget("k")) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert cache.stack.flights._flights["k"].followers == 5
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await asyncio.gather(*waiters) == ["k-2"] * 5  # one of the waiters led the second load
    assert len(runs) == 2
    assert not redis_client.exists(lock_key(cache, "k"))
    assert cache.stack.flights._flights == {}


@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_nothing_behind(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    release = asyncio.Event()

    async def resolver(key: str) -> str:
        await release.wait()
        return "v"

    cache = make_cache(ttl="1m", resolver=resolver)
    leader = asyncio.ensure_future(cache.aget("k"))
    await asyncio.sleep(0.01)
    waiter = asyncio.ensure_future(cache.aget("k"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    assert await leader == "v"
    assert cache.stack.flights._flights == {}


@pytest.mark.asyncio
async def test_10000_tasks_on_one_cold_key_all_cancelled_leave_no_lock_no_flight_no_waiter(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    entered = asyncio.Event()

    async def resolver(key: str) -> str:
        entered.set()
        await asyncio.sleep(3600)
        return "never"

    cache = make_cache(ttl="1m", resolver=resolver)
    calls = [asyncio.ensure_future(cache.aget("k")) for _ in range(10_000)]
    await entered.wait()
    await asyncio.sleep(0.01)
    assert cache.stack.flights._flights["k"].followers == 9_999
    for call in calls:
        call.cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert cache.stack.flights._flights == {}
    assert not redis_client.exists(lock_key(cache, "k"))
    assert current_runtime().bus.waiters._events == {}


# -- resolvers of either kind, on either front -------------------------------------------


def test_an_async_resolver_on_the_sync_front_and_a_sync_one_on_the_async_front(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    loop_threads: list[int] = []

    def sync_resolver(key: str) -> str:
        loop_threads.append(threading.get_ident())
        return key.upper()

    async def async_resolver(key: str) -> str:
        await asyncio.sleep(0)
        return key * 2

    sync_backed = make_cache(ttl="1m", resolver=sync_resolver)
    async_backed = make_cache(ttl="1m", resolver=async_resolver)
    assert async_backed.get("ab") == "abab"  # run to completion on this thread's own loop
    loop_thread: list[int] = []

    async def on_loop() -> str:
        loop_thread.append(threading.get_ident())
        return cast(str, await sync_backed.aget("ab"))

    assert run(on_loop()) == "AB"
    assert loop_threads and loop_threads[0] != loop_thread[0]  # a worker thread, not the loop


@pytest.mark.asyncio
async def test_sync_get_inside_a_running_loop_works_and_warns_once(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    from oqron_cache.engine.stack import CacheStack

    CacheStack._warned_in_loop = False
    cache = make_cache(ttl="1m", resolver=lambda key: key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [cache.get("a"), cache.get("b")] == ["a", "b"]
    relevant = [w for w in caught if "aget" in str(w.message)]
    assert len(relevant) == 1 and relevant[0].category is RuntimeWarning


# -- the decorator -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_refreshing_cache_on_an_async_function(configured: str, clock: Any) -> None:
    calls: list[str] = []

    @refreshing_cache(ttl="10s", stale_ttl="1m", clock=clock)
    async def find_user(user_id: str) -> dict[str, Any]:
        calls.append(user_id)
        await asyncio.sleep(0)
        return {"id": user_id, "n": len(calls)}

    try:
        assert await find_user("u1") == {"id": "u1", "n": 1}
        assert await find_user("u1") == {"id": "u1", "n": 1}  # L1 hit
        assert await find_user(user_id="u1") == {"id": "u1", "n": 1}  # the same call
        await find_user.ainvalidate("u1")
        assert await find_user("u1") == {"id": "u1", "n": 2}
        assert await find_user.arefresh("u1") == {"id": "u1", "n": 3}
        assert await find_user("u1") == {"id": "u1", "n": 3}
        clock.tick(11)  # stale: served, refreshed by the dispatcher on its own loop
        assert await find_user("u1") == {"id": "u1", "n": 3}
        assert current_runtime().dispatcher.join(10)
        assert await find_user("u1") == {"id": "u1", "n": 4}
        assert calls == ["u1"] * 4
    finally:
        find_user.cache.close()


@pytest.mark.asyncio
async def test_stampede_options_apply_to_the_async_front(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """A lock holder in another process that never fills: the task waits at most lock_ttl
    (without blocking the loop), then loads it itself (P8)."""
    cache = make_cache(
        ttl="1m", resolver=lambda key: "mine", stampede=Stampede(lock_ttl="300ms")
    )
    l2 = cache.stack.l2
    assert l2.acquire("k", "someone-else", 30.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(ticker())
    started = time.monotonic()
    value = await cache.aget("k")
    beat.cancel()
    assert ticks >= 20  # the loop kept turning while the task waited
    waited = time.monotonic() - started
    assert value == "mine" and 0.25 <= waited < 1.0
    assert cache.get_stats(local=True)["lock_timeouts"] == 1


def test_invalidations_run_on_the_loop_not_in_a_thread(
    configured: str, make_cache: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(ttl="1m", tags=lambda key, value: value["tags"])
    for i in range(1200):  # more than two pages of SCAN and of the tag index
        cache.set(f"p:{i}", {"tags": ["bulk"] if i % 2 else []})

    def no_thread(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("ran in a worker thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)

    async def scenario() -> tuple[int, int]:
        tagged = await cache.ainvalidate_by_tag("bulk")
        patterned = await cache.ainvalidate_pattern("p:1*")
        return tagged, patterned

    tagged, patterned = run(scenario())
    assert tagged == 600
    # p:1, p:10..p:19, p:100..p:199, p:1000..p:1199, of which the odd ones went with the tag
    assert patterned == len([i for i in range(1200) if str(i).startswith("1") and i % 2 == 0])
    assert cache.get("p:1") is None and cache.get("p:2") == {"tags": []}


@pytest.mark.asyncio
async def test_write_through_on_the_async_front(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """P6 through aset: the origin is written first, the cache after it accepted; without
    Celery the origin is called inline and its refusal reaches the caller as it is (as on the
    sync front), leaving the cache as it was."""
    origin: dict[str, Any] = {}

    def save(key: str, value: Any) -> None:
        if value == "refused":
            raise ValueError("the origin says no")
        origin[key] = value

    cache = make_cache(ttl="1m", resolver=origin.get, write_through=save)
    await cache.aset("k", {"v": 1})
    assert origin == {"k": {"v": 1}}
    cache.stack.l1.clear()
    assert await cache.aget("k") == {"v": 1}  # from L2, written after the origin
    with pytest.raises(ValueError, match="says no"):
        await cache.aset("k", "refused")
    assert await cache.aget("k") == {"v": 1} and origin["k"] == {"v": 1}


# -- P5: a load that began before a write or an invalidation never replaces it -----------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "write", ["aset", "adelete", "ainvalidate_by_tag", "ainvalidate_pattern", "aset_many"]
)
async def test_an_async_load_in_flight_never_replaces_a_newer_write_or_invalidation(
    write: str, configured: str, make_cache: Callable[..., Any]
) -> None:
    """An async resolver read the origin (v1), then a write or an invalidation landed through
    the async front, then the resolver returned: its caller gets what it loaded, but neither
    L2 nor L1 keeps it; the next read sees the write, or loads again."""
    origin = {"k": "v1"}
    loaded = asyncio.Event()
    release = asyncio.Event()

    async def resolver(key: str) -> str:
        value = origin[key]
        loaded.set()
        await release.wait()
        return value

    cache = make_cache(ttl="1m", resolver=resolver, tags=lambda key, value: ["t"])
    leader = asyncio.ensure_future(cache.aget("k"))
    await loaded.wait()
    origin["k"] = "v2"
    if write == "aset":
        await cache.aset("k", "written")
    elif write == "aset_many":
        await cache.aset_many({"k": "written", "other": 1})
    elif write == "adelete":
        await cache.adelete("k")
    elif write == "ainvalidate_by_tag":
        await cache.ainvalidate_by_tag("t")
    else:
        await cache.ainvalidate_pattern("k")
    release.set()
    assert await leader == "v1"  # its caller asked before the write: v1 is a fair answer
    expected = "written" if write.startswith("aset") else "v2"
    assert await cache.aget("k") == expected  # L1 did not keep v1
    cache.stack.l1.clear()
    assert await cache.aget("k") == expected  # nor did L2
    counts = cache.get_stats(local=True)
    assert counts["resolver_calls"] == (1 if write.startswith("aset") else 2)
    if write.startswith("ainvalidate"):  # the fill landed, and was dropped after it
        assert (counts["invalidated_in_flight"], counts["l2_write_conflicts"]) == (1, 0)
    else:  # the fill's compare-and-set failed
        assert (counts["invalidated_in_flight"], counts["l2_write_conflicts"]) == (0, 1)
