"""Fork safety (DESIGN section 13, P11), with a bare ``os.fork()`` and a ``multiprocessing`` pool.

Each test uses its caches first, then forks: the child must get its own connections, bus
listener and dispatcher on first use, start with an empty L1, count from zero (never flushing
the parent's counters again), and leave the parent working. Results come back from the child
over pipes (:class:`tests.procs.forking.Forked`); resolver runs are logged in Redis with their
pid (:class:`tests.procs.forking.Origin`), so "exactly once, in that process" is checked as is.
gunicorn ``--preload`` is in ``tests/test_fork_gunicorn.py``.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

import oqron_cache
from oqron_cache.config import current_runtime
from oqron_cache.core.metrics import COUNTERS
from oqron_cache.fork import reinit_after_fork
from oqron_cache.testing import FakeClock, wait_for_refreshes
from tests.procs.forking import Channel, Forked, Origin

# Python 3.12+ warns on fork() in a threaded process; forking one is what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore:.*multi-threaded.*fork:DeprecationWarning")

COUNTED = ("gets", *COUNTERS)
RABBIT = "amqp://guest:guest@127.0.0.1:5672//"


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll ``check`` every 10 ms until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        time.sleep(0.01)


def bus_up() -> None:
    """Wait until this process's own bus subscription is up (so L1 is writable)."""
    wait_until(lambda: current_runtime().bus.healthy, what="the bus subscription")


def poll(read: Callable[[], Any], old: Any, timeout: float = 10.0) -> tuple[Any, int]:
    """Call ``read`` until it returns something other than ``old``: (that value, calls)."""
    calls = 0

    def changed() -> Any:
        nonlocal calls
        calls += 1
        value = read()
        return (value,) if value != old else None

    return wait_until(changed, timeout, f"a value other than {old!r}")[0], calls


def assert_adds_up(total: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    """Every counter of ``total`` (the cluster view) is the sum of the processes' own."""
    for field in COUNTED:
        assert total[field] == sum(part[field] for part in parts), field


def test_child_hears_the_bus_and_the_parent_hears_the_child(
    configured: str, make_cache: Callable[..., Any], redis_url: str, clock: FakeClock
) -> None:
    origin = Origin(redis_url, configured)
    c = make_cache(ttl="60s", resolver=origin, clock=clock)
    assert c.get("k") == "k#1"
    assert c.get("j") == "j#2"
    parent, runtime = os.getpid(), current_runtime()

    def child(channel: Channel) -> dict[str, Any]:
        bus_up()  # the child's own subscription
        assert c.get("k") == "k#1"
        assert c.get("k") == "k#1"
        reads = c.get_stats(local=True)
        channel.send("ready")
        assert channel.recv() == "deleted"
        value, _ = poll(lambda: c.get("k"), "k#1")  # the parent's delete evicts the L1 copy
        c.set("j", "from the child")
        return {"value": value, "pid": os.getpid(), "reads": reads}

    forked = Forked(child)
    assert forked.recv() == "ready"
    c.delete("k")
    forked.send("deleted")
    result = forked.result()
    assert result["value"] == "k#3"
    assert origin.runs() == [(parent, "k"), (parent, "j"), (result["pid"], "k")]
    reads = result["reads"]  # the first read came from L2 (the child's L1 started empty)
    assert (reads["gets"], reads["l2_hits"], reads["misses"]) == (2, 1, 0), reads
    # The parent is untouched: same runtime, its listener hears the child's set().
    assert current_runtime() is runtime and runtime.bus.healthy
    assert poll(lambda: c.get("j"), "j#2")[0] == "from the child"


def test_the_async_front_after_fork_has_its_own_pool_and_hears_the_bus_both_ways(
    configured: str, make_cache: Callable[..., Any], redis_url: str, clock: FakeClock
) -> None:
    """P7 and P11 on the async front: the parent used ``aget`` (a pool bound to its loop),
    then forked; the child's loop gets its own pool and bus, the parent's ``adelete`` drops
    the child's L1 copy, and the child's ``aset`` reaches the parent's L1."""
    import asyncio

    origin = Origin(redis_url, configured)
    c = make_cache(ttl="60s", resolver=origin, clock=clock)

    async def warm() -> list[Any]:
        return [await c.aget("k"), await c.aget("j")]

    assert asyncio.run(warm()) == ["k#1", "j#2"]
    parent = os.getpid()

    def child(channel: Channel) -> dict[str, Any]:
        bus_up()

        async def main() -> dict[str, Any]:
            assert await c.aget("k") == "k#1"  # from L2: the child's L1 started empty
            assert await c.aget("k") == "k#1"  # from its L1 now
            reads = c.get_stats(local=True)
            channel.send("ready")
            assert await asyncio.to_thread(channel.recv) == "deleted"
            deadline = time.monotonic() + 10
            while (value := await c.aget("k")) == "k#1":
                assert time.monotonic() < deadline, "the parent's adelete never arrived"
                await asyncio.sleep(0.01)
            await c.aset("j", "from the child")
            return {"value": value, "pid": os.getpid(), "reads": reads}

        return asyncio.run(main())

    forked = Forked(child)
    assert forked.recv() == "ready"

    async def delete() -> None:
        await c.adelete("k")

    asyncio.run(delete())
    forked.send("deleted")
    result = forked.result()
    assert result["value"] == "k#3"
    assert origin.runs() == [(parent, "k"), (parent, "j"), (result["pid"], "k")]
    reads = result["reads"]
    assert (reads["gets"], reads["l2_hits"], reads["misses"]) == (2, 1, 0), reads

    async def read_j() -> Any:
        return await c.aget("j")

    assert poll(lambda: asyncio.run(read_j()), "j#2")[0] == "from the child"


def test_child_refreshes_stale_values_and_so_does_the_parent(
    configured: str, make_cache: Callable[..., Any], redis_url: str, clock: FakeClock
) -> None:
    origin = Origin(redis_url, configured)
    c = make_cache(ttl="10s", stale_ttl="1h", resolver=origin, clock=clock)
    assert c.get("s") == "s#1"
    assert c.get("p") == "p#2"
    parent = os.getpid()

    def child(channel: Channel) -> dict[str, Any]:
        clock.tick(20)  # the child's copy of the clock
        assert c.get("s") == "s#1"  # stale: served at once, refreshed in the background
        assert wait_for_refreshes(10.0), "the child's dispatcher did not run the refresh"
        return {"value": c.get("s"), "local": c.get_stats(local=True), "pid": os.getpid()}

    result = Forked(child).result()
    assert result["value"] == "s#3"
    assert origin.runs() == [(parent, "s"), (parent, "p"), (result["pid"], "s")]
    local = result["local"]
    assert (local["stale_served"], local["refreshes_succeeded"], local["resolver_calls"]) == (
        1,
        1,
        1,
    )
    clock.tick(20)  # and the parent's dispatcher still refreshes
    assert c.get("p") == "p#2"
    assert wait_for_refreshes(10.0)
    assert c.get("p") == "p#4"
    assert origin.runs()[-1] == (parent, "p")


def test_counters_add_up_after_fork(
    configured: str, make_cache: Callable[..., Any], redis_url: str
) -> None:
    c = make_cache(ttl="60s", resolver=Origin(redis_url, configured))
    for _ in range(5):  # counted here and not flushed yet when the child is forked
        c.get("a")

    def child(channel: Channel) -> dict[str, Any]:
        for _ in range(3):
            c.get("b")
        c.get_stats()  # flushes this process
        stats: dict[str, Any] = c.get_stats(local=True)
        return stats

    child_local = Forked(child).result()
    assert (child_local["gets"], child_local["misses"], child_local["resolver_calls"]) == (3, 1, 1)
    for _ in range(2):
        c.get("a")
    total = c.get_stats()
    parent_local = c.get_stats(local=True)
    assert (total["gets"], total["misses"], total["resolver_calls"]) == (10, 2, 2)
    assert (parent_local["gets"], parent_local["misses"]) == (7, 1)
    assert_adds_up(total, [parent_local, child_local])


def test_reinit_after_fork_builds_once_after_the_hook(
    configured: str, make_cache: Callable[..., Any], redis_url: str
) -> None:
    c = make_cache(ttl="60s", resolver=Origin(redis_url, configured))
    c.get("k")
    parent_runtime = current_runtime()

    def child(channel: Channel) -> dict[str, Any]:
        reinit_after_fork()  # Celery's worker_process_init: the child's runtime, built now
        built = current_runtime(create=False)
        assert built is not None and built is not parent_runtime
        assert built.bus.healthy  # started (its subscription is up)
        reinit_after_fork()  # a second call changes nothing
        assert current_runtime(create=False) is built
        assert c.get("k") == "k#1"
        assert c.stack.runtime is built
        stats: dict[str, Any] = c.get_stats(local=True)
        return stats

    local = Forked(child).result()
    assert (local["gets"], local["l2_hits"]) == (1, 1)


# -- a multiprocessing "fork" pool -------------------------------------------------------------

_POOL: dict[str, Any] = {}  # what the pool's workers inherit: the cache, its clock, a barrier
WORKERS = 3


def _pool_task(job: tuple[str, int, Any]) -> dict[str, Any]:
    """One task per worker (the barrier holds each worker until all three have one)."""
    action, index, old = job
    c, clock = _POOL["cache"], _POOL["clock"]
    _POOL["barrier"].wait(30)
    out: dict[str, Any] = {"pid": os.getpid(), "reads": 0}
    if action == "read":
        bus_up()
        out["value"] = c.get("k")
        out["again"] = c.get("k")
        out["reads"] = 2
    elif action in ("poll", "invalidate", "stale"):
        if action == "invalidate" and index == 0:
            c.invalidate_pattern("k*")
        if action == "stale":
            clock.tick(20)
        out["value"], out["reads"] = poll(lambda: c.get("k"), old)
    else:  # "flush"
        c.get_stats()
    out["local"] = c.get_stats(local=True)
    return out


def test_fork_pool_sees_deletes_invalidations_and_refreshes(
    configured: str, make_cache: Callable[..., Any], redis_url: str, clock: FakeClock
) -> None:
    origin = Origin(redis_url, configured)
    c = make_cache(ttl="10s", stale_ttl="1h", resolver=origin, clock=clock)
    assert c.get("k") == "k#1"
    parent = os.getpid()
    ctx = multiprocessing.get_context("fork")
    _POOL.update(cache=c, clock=clock, barrier=ctx.Barrier(WORKERS))

    def each(pool: Any, action: str, old: Any = None) -> list[dict[str, Any]]:
        jobs = [(action, i, old) for i in range(WORKERS)]
        answers: list[dict[str, Any]] = pool.map_async(_pool_task, jobs, chunksize=1).get(60)
        assert len({a["pid"] for a in answers}) == WORKERS, answers
        return answers

    reads = 0
    with ctx.Pool(WORKERS) as pool:
        first = each(pool, "read")  # each worker's L1 starts empty: one L2 read, then L1
        assert [(a["value"], a["again"]) for a in first] == [("k#1", "k#1")] * WORKERS
        workers = {a["pid"] for a in first}
        c.delete("k")  # in the parent: every worker's L1 copy goes
        deleted = each(pool, "poll", "k#1")
        assert [a["value"] for a in deleted] == ["k#2"] * WORKERS
        assert all(a["local"]["l2_hits"] == 1 and a["local"]["misses"] == 0 for a in first)
        invalidated = each(pool, "invalidate", "k#2")  # by one worker, seen by all
        assert [a["value"] for a in invalidated] == ["k#3"] * WORKERS
        refreshed = each(pool, "stale", "k#3")  # stale in every worker: refreshed once
        assert [a["value"] for a in refreshed] == ["k#4"] * WORKERS
        flushed = each(pool, "flush")
        assert {a["pid"] for a in flushed} == workers
        reads = sum(a["reads"] for a in (*first, *deleted, *invalidated, *refreshed))
    runs = origin.runs()
    assert runs[0] == (parent, "k") and len(runs) == 4, runs
    assert all(pid in workers for pid, _ in runs[1:]), runs
    locals_ = [a["local"] for a in flushed]
    assert sum(local["gets"] for local in locals_) == reads
    total = c.get_stats()
    assert_adds_up(total, [c.get_stats(local=True), *locals_])
    assert total["gets"] == reads + 1 and total["resolver_calls"] == 4


def test_a_thread_holding_a_lock_at_fork_does_not_block_the_child(
    configured: str, make_cache: Callable[..., Any], redis_url: str
) -> None:
    c = make_cache(ttl="60s", resolver=Origin(redis_url, configured))
    c.get("k")
    from oqron_cache import config
    from oqron_cache.engine import registry

    held, release = threading.Event(), threading.Event()

    def hold_locks() -> None:
        with config._lock, registry._lock, c.stats._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_locks, daemon=True)
    holder.start()
    assert held.wait(10)
    try:

        def child(channel: Channel) -> dict[str, Any]:
            c.get("k")
            registry.names()
            stats: dict[str, Any] = c.get_stats(local=True)
            return stats

        local = Forked(child).result(timeout=20)
    finally:
        release.set()
        holder.join(10)
    assert (local["gets"], local["l2_hits"]) == (1, 1)


def test_child_publishes_on_its_own_broker_connection(
    redis_url: str, namespace: str, make_cache: Callable[..., Any]
) -> None:
    app = Celery(f"fork-{namespace}", broker=RABBIT, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_timeout=5)
    oqron_cache.configure(redis_url=redis_url, namespace=namespace, celery_app=app)
    queue = f"oqron-fork-{namespace}"
    try:
        app.send_task("fork.noop", queue=queue)  # the parent's pool now holds a connection
        parent_pool = app.pool
        c = make_cache(ttl="60s")
        c.set("k", 1)

        def child(channel: Channel) -> bool:
            assert c.get("k") == 1  # first use: the child's runtime
            assert app.pool is not parent_pool  # its own connections, not the parent's socket
            app.send_task("fork.noop", queue=queue)
            return True

        assert Forked(child).result() is True
        assert app.pool is parent_pool
        app.send_task("fork.noop", queue=queue)  # the parent's connection still works

        def queued() -> int:
            with app.connection_for_write() as conn:
                ok = conn.default_channel.queue_declare(queue, passive=True)
                return int(ok.message_count) == 3

        wait_until(queued, 10.0, "three messages in the queue")
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(queue)
        oqron_cache.reset()
        app.close()


def test_a_child_never_replays_what_its_parent_deferred(configured: str) -> None:
    """P11 with P14: the parent's recovery queue is the parent's; the child starts empty."""
    cache = oqron_cache.cache(f"fk-{uuid.uuid4().hex[:8]}", ttl="60s")
    try:
        stack = cache.stack
        assert stack.runtime is not None
        recovery = stack.runtime.recovery
        assert recovery is not None
        recovery._stop.set()  # hold the queue: no replay in the parent during the test
        entry = stack._entry("k", "deferred in the parent", 0.0)
        envelope = stack._encode("k", entry)
        assert envelope is not None
        recovery.defer_write(stack, "k", entry, envelope, 60.0)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                cache.get("other")  # first use in the child: its own runtime
                runtime = cache.stack.runtime
                child_recovery = runtime.recovery if runtime is not None else None
                ok = child_recovery is not None and child_recovery is not recovery
                ok = ok and child_recovery is not None and not child_recovery.pending
                ok = ok and not recovery.pending and recovery._stop.is_set()
                os.write(write, b"ok" if ok else b"no")
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        answer = os.read(read, 2)
        os.close(read)
        os.waitpid(pid, 0)
        assert answer == b"ok"
        assert recovery.pending == 1  # the parent's queue is untouched
    finally:
        cache.close()
