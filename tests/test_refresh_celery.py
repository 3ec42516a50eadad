"""Stale-while-revalidate through real Celery tasks, with an in-process worker (issue 3).

The fixtures are the classic ones of ``celery.contrib.pytest``: ``celery_app`` (a fresh app per
test) and ``celery_worker`` (a real worker consuming from a real broker, in a thread of this
process). pytest-celery 1.x is installed too, and its auto-loaded plugin (named "celery")
replaces ``celery_worker`` with a Docker-based fixture that cannot run here, so pyproject's
addopts say ``-p no:celery -p celery.contrib.pytest``; a ``pytest_plugins`` line here would not
do, because that plugin has already imported the module and pytest refuses (warning-as-error)
to register it again.

The broker is a private redis-server (session-scoped; these tests stop and restart it), never the
shared Redis, which holds the caches' L2 in a namespace per test. Worker and "web" code share one
process here, so a cache object is both the caller's and the worker's: counters in
``get_stats(local=True)`` include what the worker did. Waits poll with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, current_task

import oqron_cache
from oqron_cache.celery.tasks import (
    INVALIDATE_PATTERN_TASK,
    INVALIDATE_TAG_TASK,
    INVALIDATE_TASK,
    REFRESH_QUEUE,
    REFRESH_TASK,
    refresh_task_id,
)
from oqron_cache.config import current_runtime, reset
from tests.celery_fixtures import TaskLog, wait_for
from tests.conftest import FakeClock
from tests.redis_server import RedisServer

BUDGET = 0.3  # enqueue_budget of every test app


# ---------------------------------------------------------------------------------------------
# fixtures: the classic celery.contrib.pytest ones, configured for this library


@pytest.fixture(scope="session")
def broker() -> Iterator[RedisServer]:
    """The Celery broker: a private redis-server (tests stop it to simulate an outage)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def celery_config(broker: RedisServer) -> dict[str, Any]:
    return {
        "broker_url": broker.url,
        "result_backend": "cache+memory://",  # only the worker's start-up ping reads results
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        # Celery 6's default; with False, a lost broker connection emits a pending-deprecation
        # warning in the worker thread, which the suite's filterwarnings=error would raise.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    # "threads": a refresh that hangs must not stop the next one from running (P8 tests).
    return "threads"


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    # No ``queues=``: like ``celery -A app worker``, the worker consumes every queue in
    # app.conf.task_queues, to which configure() has added the refresh queue (checked below).
    return {"concurrency": 4, "shutdown_timeout": 15.0}


@pytest.fixture(scope="session")
def celery_enable_logging() -> bool:
    # Keep Celery from reconfiguring logging: pytest's caplog then sees the worker's records.
    return False


@pytest.fixture
def celery_app(
    celery_app: Celery, broker: RedisServer, redis_url: str, namespace: str
) -> Iterator[Celery]:
    """The classic ``celery_app``, wired to the library BEFORE ``celery_worker`` starts.

    ``celery_worker`` depends on ``celery_app``, so overriding it here registers the library's
    tasks and queues on the app before the worker reads them.
    """
    if not broker.running:  # a failed outage test must not break the next tests
        broker.restart()
    broker.flushall()  # no message of an earlier test is delivered to this one
    oqron_cache.configure(
        redis_url=redis_url, celery_app=celery_app, namespace=namespace, enqueue_budget=BUDGET
    )
    try:
        yield celery_app
    finally:
        reset()


@pytest.fixture
def tasks(celery_app: Celery) -> Iterator[TaskLog]:
    """Every task message published and every task run during the test."""
    log = TaskLog()
    log.connect()
    try:
        yield log
    finally:
        log.disconnect()


class Origin:
    """A resolver: counts calls, says where each ran, can block (in tasks only) or fail."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[str, str | None, str]] = []  # key, task id (None: inline), thread
        self.gate = threading.Event()
        self.gate.set()  # open unless a test closes it
        self.entered = threading.Event()
        self.fail = False
        self._lock = threading.Lock()

    def __call__(self, key: str) -> str:
        task_id = current_task.request.id if current_task else None
        with self._lock:
            self.calls.append((key, task_id, threading.current_thread().name))
            n = len(self.calls)
        self.entered.set()
        if task_id is not None:
            assert self.gate.wait(15), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError(f"origin down for {key}")
        return f"{key}-v{n}"

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.calls)

    def in_tasks(self) -> list[str | None]:
        with self._lock:
            return [task_id for _, task_id, _ in self.calls]


@pytest.fixture
def origin(celery_worker: Any) -> Iterator[Origin]:
    """A fresh resolver; its gate is opened before the worker stops (depends on the worker)."""
    made = Origin()
    try:
        yield made
    finally:
        made.gate.set()


def is_refresh_id(task_id: str | None, cache: str, key: str) -> bool:
    """``refresh:<cache>:<key digest>:<lock digest>`` (see tasks.refresh_task_id)."""
    pattern = re.escape(f"refresh:{cache}:{digest(key)}") + r":[0-9a-f]{8}"
    return task_id is not None and re.fullmatch(pattern, task_id) is not None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def join() -> None:
    assert current_runtime().dispatcher.join(10), "background refreshes did not finish"


def stats(cache: oqron_cache.Cache[Any]) -> dict[str, Any]:
    return cache.get_stats(local=True)


# ---------------------------------------------------------------------------------------------
# stale-while-revalidate through a worker


def test_stale_read_returns_at_once_and_one_task_refreshes_it(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
) -> None:
    origin.delay = 0.2
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    cache.set("k", "v0")
    seen = cache.stack.l2.read("k")[2:10]
    clock.tick(61)
    origin.gate.clear()

    timings: list[float] = []

    def timed_read() -> Any:
        started = time.perf_counter()
        value = cache.get("k")
        timings.append(time.perf_counter() - started)
        return value

    assert timed_read() == "v0"  # the read that asks for the refresh
    assert origin.entered.wait(10), "no refresh ran"
    for _ in range(20):
        assert timed_read() == "v0"  # still stale while the worker's resolver runs
    # Returned while the resolver (200 ms) was still blocked in the worker: nobody waited for
    # it. The wall-clock bounds leave room for a shared, loaded machine: one read is allowed a
    # scheduler hiccup, the typical read is not.
    assert timings[0] < 0.05, f"the stale read took {timings[0] * 1000:.1f} ms"
    assert statistics.median(timings) < 0.005, f"stale reads: {statistics.median(timings)} s"
    origin.gate.set()
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "refreshed"
    wait_for(lambda: cache.get("k") == "k-v1", what="the refreshed value")
    assert origin.count == 1
    (ran_id,) = origin.in_tasks()
    assert is_refresh_id(ran_id, cache.name, "k")

    (sent,) = tasks.sent(REFRESH_TASK)
    assert sent.id == ran.id == ran_id
    # Celery sends to a direct queue through the default exchange, keyed by the queue's name.
    assert sent.exchange in ("", REFRESH_QUEUE)
    assert sent.routing_key == REFRESH_QUEUE
    assert ran.delivery_info["routing_key"] == REFRESH_QUEUE
    # expires = lock_ttl (5 s by default) after the publication
    expires = datetime.fromisoformat(sent.headers["expires"]).timestamp()
    assert abs(expires - sent.wall - 5) < 0.5, expires - sent.wall
    assert json.loads(json.dumps(sent.args)) == sent.args  # plain JSON values
    name, key, token, seen_hex = sent.args
    assert (name, key, seen_hex) == (cache.name, "k", seen.hex())
    assert isinstance(token, str) and len(token) == 32
    assert sent.id == refresh_task_id(cache.name, "k", token)  # deterministic per lock hold
    assert token not in sent.headers["argsrepr"]
    assert sent.headers["argsrepr"] == repr([cache.name, "k", "***", seen.hex()])
    assert sent.kwargs == {}
    assert sent.headers.get("kwargsrepr") in ("{}", None)
    counts = stats(cache)
    assert counts["stale_served"] == 21
    assert counts["refreshes_enqueued"] == 1
    assert counts["refreshes_succeeded"] == 1
    assert counts["enqueue_failures"] == 0


def test_64_threads_on_one_stale_key_make_one_task(
    celery_worker: Any, tasks: TaskLog, origin: Origin, make_cache: Any, clock: FakeClock
) -> None:
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    cache.set("hot", "v0")
    clock.tick(61)
    origin.gate.clear()  # the one refresh stays in the worker until every reader is back
    barrier = threading.Barrier(64)
    results: list[Any] = [None] * 64

    def reader(index: int) -> None:
        barrier.wait()
        results[index] = cache.get("hot")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["v0"] * 64  # all served while the refresh was still running
    assert origin.entered.wait(10)
    join()
    counts = stats(cache)
    origin.gate.set()
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "refreshed"
    wait_for(lambda: cache.get("hot") == "hot-v1", what="the refreshed value")
    assert origin.count == 1
    assert len(tasks.sent(REFRESH_TASK)) == 1
    assert counts["stale_served"] == 64
    assert counts["refreshes_enqueued"] == 1
    # The others were merged by the dispatcher, or never asked: once one read has requested
    # the refresh, the stale copy is served straight from the L1 hit path.
    assert counts["refreshes_deduplicated"] <= 63


def test_duplicate_delivery_after_the_refresh_is_superseded(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
    redis_client: Any,
) -> None:
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    cache.set("k", "v0")
    clock.tick(61)
    assert cache.get("k") == "v0"
    (first,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert first.outcome == "refreshed"
    value_key = cache.stack.l2.keys.value("k")
    written = redis_client.get(value_key)
    (sent,) = tasks.sent(REFRESH_TASK)

    # The broker delivers the same message again (a redelivery after a lost ack, say).
    celery_app.send_task(REFRESH_TASK, args=sent.args, task_id=sent.id)
    second = tasks.wait_finished(REFRESH_TASK, 2)[1]
    assert second.args == sent.args
    assert second.outcome == "superseded"
    assert origin.count == 1  # no second resolver run (P4)
    assert redis_client.get(value_key) == written  # the entry is not overwritten (P5)
    assert cache.get("k") == "k-v1"


def test_duplicate_delivery_during_the_refresh_writes_once(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
    redis_client: Any,
) -> None:
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    cache.set("k", "v0")
    seen = cache.stack.l2.read("k")[2:10]
    clock.tick(61)
    origin.gate.clear()
    assert cache.get("k") == "v0"
    assert origin.entered.wait(10)
    (sent,) = tasks.sent(REFRESH_TASK)
    celery_app.send_task(REFRESH_TASK, args=sent.args, task_id=sent.id)  # again, while it runs
    wait_for(lambda: len(tasks.started(REFRESH_TASK)) == 2, what="the duplicate to start")
    origin.gate.set()
    runs = tasks.wait_finished(REFRESH_TASK, 2)
    outcomes = sorted(run.outcome for run in runs)
    # One run writes; the other either skips or loses the compare-and-set (P5). Two resolver
    # runs are allowed here: a duplicate delivery is a fault, outside P4.
    assert outcomes[1] == "refreshed"
    assert outcomes[0] in ("conflict", "superseded", "locked")
    assert origin.count <= 2
    raw = redis_client.get(cache.stack.l2.keys.value("k"))
    assert raw[2:10] != seen
    assert cache.get("k") in {f"k-v{n}" for n in range(1, origin.count + 1)}
    assert stats(cache)["refreshes_succeeded"] == 1


@pytest.mark.parametrize("write", ["set", "delete"])
def test_write_racing_an_inflight_refresh_wins(
    write: str,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
    redis_client: Any,
) -> None:
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    cache.set("k", "v0")
    clock.tick(61)
    origin.gate.clear()
    assert cache.get("k") == "v0"
    assert origin.entered.wait(10)  # the worker's resolver is running
    if write == "set":
        cache.set("k", "written")
    else:
        cache.delete("k")
    origin.gate.set()
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "conflict"  # the refresh began before the write: it must not win (P5)
    assert not redis_client.exists(cache.stack.l2.keys.lock("k"))  # released all the same
    counts = stats(cache)
    assert counts["l2_write_conflicts"] == 1
    assert counts["refreshes_succeeded"] == 0
    found = cache.stack._read_l2("k")
    if write == "set":
        assert found.entry.value == "written"
        assert cache.get("k") == "written"
    else:
        assert found.entry is None  # the tombstone, not the refreshed value
        assert cache.get("k") == "k-v2"  # a cold miss: loaded again, here
        assert origin.in_tasks()[1] is None


def test_failing_resolver_keeps_stale_served_and_throttles_by_the_lock(
    celery_worker: Any, tasks: TaskLog, origin: Origin, make_cache: Any, clock: FakeClock
) -> None:
    from oqron_cache.engine.refresh import plan_refresh

    cache = make_cache(
        ttl="60s",
        stale_ttl="10m",
        resolver=origin,
        clock=clock,
        stampede=oqron_cache.Stampede(lock_ttl="1s"),
    )
    cache.set("k", "v0")
    seen = cache.stack.l2.read("k")[2:10]
    clock.tick(61)
    origin.fail = True
    assert cache.get("k") == "v0"
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "failed"
    (first,) = tasks.sent(REFRESH_TASK)
    assert stats(cache)["refresh_failures"] == 1  # counted by the worker (this process)

    # Within lock_ttl: stale keeps being served, and nobody enqueues another refresh. The failed
    # task kept the key's lock: another process (no local throttle) finds it taken.
    lock_key = cache.stack.l2.keys.lock("k")
    assert 0 < cache.stack.l2.conn.client.pttl(lock_key) <= 1000
    assert plan_refresh(cache.stack, "k", seen) == "locked"
    for _ in range(5):
        assert cache.get("k") == "v0"
    join()
    assert len(tasks.sent(REFRESH_TASK)) == 1

    # After lock_ttl, a stale read enqueues a new refresh, which now succeeds.
    origin.fail = False

    def read_then_count() -> bool:
        assert cache.get("k") in ("v0", "k-v2")
        return len(tasks.sent(REFRESH_TASK)) == 2

    wait_for(read_then_count, timeout=5, interval=0.05, what="a second refresh after lock_ttl")
    second = tasks.sent(REFRESH_TASK)[1]
    # Not before the first refresh's lock expired, nor a lock_ttl after (the stale copy asks
    # again when the lock it found expires).
    assert 0.9 <= second.at - first.at <= 1.5, second.at - first.at
    assert tasks.wait_finished(REFRESH_TASK, 2)[1].outcome == "refreshed"
    assert cache.get("k") == "k-v2"
    assert origin.count == 2


def test_hanging_resolver_delays_a_refresh_by_lock_ttl_and_stale_stays_bounded(
    celery_worker: Any, tasks: TaskLog, origin: Origin, make_cache: Any, clock: FakeClock
) -> None:
    cache = make_cache(
        ttl="10s",
        stale_ttl="20s",
        resolver=origin,
        clock=clock,
        stampede=oqron_cache.Stampede(lock_ttl="1s"),
    )
    cache.set("k", "v0")  # fresh until +10 s, servable stale until +30 s
    clock.tick(11)
    origin.gate.clear()  # every refresh in the worker hangs
    timings: list[float] = []

    def read() -> Any:
        started = time.perf_counter()
        value = cache.get("k")
        timings.append(time.perf_counter() - started)
        return value

    assert read() == "v0"
    assert origin.entered.wait(10)
    (first,) = tasks.sent(REFRESH_TASK)
    # Readers keep getting the stale value at once; after lock_ttl another refresh is enqueued
    # although the first one still hangs (P8).
    wait_for(
        lambda: read() == "v0" and len(tasks.sent(REFRESH_TASK)) >= 2,
        timeout=5,
        interval=0.02,
        what="a second refresh after lock_ttl",
    )
    second = tasks.sent(REFRESH_TASK)[1]
    # Not before the first refresh's lock expired, nor a lock_ttl after (the stale copy asks
    # again when the lock it found expires). The worker's claim restarts the lock's lock_ttl
    # when the task starts, which a loaded machine delays past its publication.
    claimed = tasks.started(REFRESH_TASK)[0].at
    assert first.at <= claimed
    assert 0.9 <= second.at - claimed <= 1.5, (second.at - first.at, claimed - first.at)
    # A reader that waited for the hanging refresh would take lock_ttl (1 s).
    assert max(timings) < 0.2, f"a stale read took {max(timings) * 1000:.1f} ms"
    assert statistics.median(timings) < 0.005
    wait_for(lambda: origin.count == 2, what="the second refresh to run")

    clock.tick(18.9)  # 29.9 s old: still servable
    assert read() == "v0"
    clock.tick(1.1)  # 31 s old: past ttl + stale_ttl, never served again (P3)
    value = cache.get("k")
    # A cold miss: the caller waited at most lock_ttl for the hanging holder, then loaded it.
    inline = [n for n, task_id in enumerate(origin.in_tasks(), 1) if task_id is None]
    assert len(inline) == 1
    assert value == f"k-v{inline[0]}"
    origin.gate.set()
    wait_for(
        lambda: len(tasks.finished(REFRESH_TASK)) == len(tasks.sent(REFRESH_TASK)),
        what="every refresh task to finish",
    )
    outcomes = tasks.outcomes(REFRESH_TASK)
    assert outcomes[:2] == ["conflict", "conflict"]  # the hanging refreshes overwrite nothing
    assert set(outcomes) <= {"conflict", "superseded"}
    assert cache.get("k") == value


@pytest.mark.parametrize("outage", ["stopped", "paused"])
def test_broker_down_falls_back_in_process_then_tasks_resume(
    outage: str,
    broker: RedisServer,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
) -> None:
    """A stopped broker refuses connections (fails fast); a paused one hangs (costs the budget)."""
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=origin, clock=clock)
    keys = [f"k{i}" for i in range(300)]
    for key in keys:
        cache.set(key, "v0")
    clock.tick(61)
    enqueuer = current_runtime().enqueuer
    if outage == "stopped":
        broker.stop()
    else:
        broker.pause()
    try:
        started = time.perf_counter()
        assert cache.get("k0") == "v0"
        took = time.perf_counter() - started
        # Far below the budget: the caller did not wait for the broker. (Not 5 ms: the worker
        # thread of this process is busy reconnecting and competes for the GIL.)
        assert took < BUDGET / 3, f"the stale read took {took * 1000:.1f} ms"
        wait_for(lambda: cache.get("k0") == "k0-v1", timeout=5, what="the fallback refresh")
        took = time.perf_counter() - started
        assert took < BUDGET + 0.5, f"fallback after {took:.2f}s"
        if outage == "paused":
            assert took >= BUDGET * 0.9, f"fallback after {took:.2f}s: did it wait the budget?"
        join()
        assert origin.in_tasks() == [None]  # ran in this process ...
        assert origin.calls[0][2].startswith("oqron-refresh")  # ... in the dispatcher thread
        assert stats(cache)["enqueue_failures"] == 1
        assert enqueuer.breaker.is_open

        # The breaker is open: the next refresh does not wait for the broker again.
        started = time.perf_counter()
        assert cache.get("k1") == "v0"
        wait_for(lambda: cache.get("k1") == "k1-v2", timeout=5, what="the second fallback")
        took = time.perf_counter() - started
        assert took < BUDGET / 2, f"second fallback after {took:.2f}s"
        join()
        assert stats(cache)["enqueue_failures"] == 2
    finally:
        if outage == "stopped":
            broker.restart()
        else:
            broker.resume()

    # The broker is back: after the breaker's cooldown, refreshes go to the worker again.
    def a_task_refreshed() -> bool:
        return any(
            run.outcome == "refreshed" and run.args[1] not in ("k0", "k1")
            for run in tasks.finished(REFRESH_TASK)
        )

    remaining = iter(keys[2:])
    deadline = time.monotonic() + 30
    while not a_task_refreshed():
        assert time.monotonic() < deadline, "refresh tasks never resumed"
        cache.get(next(remaining))  # a stale read: asks for a refresh
        join()
        time.sleep(0.05)
    assert any(task_id is not None for task_id in origin.in_tasks())
    # A message the broker took late (paused) is moot by now: its run changes nothing.
    late = [run for run in tasks.finished(REFRESH_TASK) if run.args[1] in ("k0", "k1")]
    assert all(run.outcome in ("superseded", "already-fresh") for run in late), late


# ---------------------------------------------------------------------------------------------
# miss="worker" and early refresh


def test_miss_worker_computes_the_cold_miss_in_a_task(
    celery_worker: Any, tasks: TaskLog, origin: Origin, make_cache: Any
) -> None:
    cache = make_cache(ttl="60s", resolver=origin, miss="worker")
    assert cache.get("cold") == "cold-v1"
    (ran_id,) = origin.in_tasks()
    assert is_refresh_id(ran_id, cache.name, "cold")
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "refreshed"
    assert cache.get("cold") == "cold-v1"
    assert origin.count == 1
    counts = stats(cache)
    assert counts["misses"] == 1
    assert counts["enqueue_failures"] == 0


def test_miss_worker_with_the_broker_down_loads_inline(
    broker: RedisServer, celery_worker: Any, origin: Origin, make_cache: Any
) -> None:
    cache = make_cache(ttl="60s", resolver=origin, miss="worker")
    broker.stop()
    try:
        started = time.perf_counter()
        assert cache.get("cold") == "cold-v1"
        took = time.perf_counter() - started
    finally:
        broker.restart()
    assert took < BUDGET + 0.5, f"the cold miss took {took:.2f}s"
    assert origin.in_tasks() == [None]
    assert origin.calls[0][2] == threading.current_thread().name
    assert stats(cache)["enqueue_failures"] == 1


def test_early_refresh_renews_a_hot_key_before_it_goes_stale(
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from oqron_cache.engine import stack as stack_module

    draw = [0.5]
    monkeypatch.setattr(stack_module, "random", SimpleNamespace(random=lambda: draw[0]))
    origin.delay = 0.05  # the entry's delta: what the resolver took
    cache = make_cache(ttl="60s", resolver=origin, clock=clock, early_refresh=1.0)
    assert cache.get("k") == "k-v1"  # a cold miss, loaded inline
    entry = cache.stack._read_l2("k").entry
    assert 0.05 <= entry.delta < 1.0

    eager = 1 - 1e-12  # -ln(1 - r) = 27.6: the most eager draw we will use
    draw[0] = eager
    clock.now = entry.fresh_until - 30  # far from fresh_until: never, whatever the draw
    assert cache.get("k") == "k-v1"
    draw[0] = 0.0  # -ln(1) = 0: XFetch only fires at fresh_until itself
    clock.now = entry.fresh_until - entry.delta / 2
    assert cache.get("k") == "k-v1"
    join()
    assert stats(cache)["early_refreshes"] == 0
    assert tasks.sent(REFRESH_TASK) == []

    draw[0] = eager  # now - delta * beta * ln(1 - r) >= fresh_until: refresh early
    assert cache.get("k") == "k-v1"
    (ran,) = tasks.wait_finished(REFRESH_TASK, 1)
    assert ran.outcome == "refreshed"
    assert cache.get("k") == "k-v2"  # renewed while still fresh: nobody ever saw it stale
    assert is_refresh_id(origin.in_tasks()[1], cache.name, "k")
    counts = stats(cache)
    assert counts["early_refreshes"] == 1
    assert counts["refreshes_enqueued"] == 1
    assert counts["stale_served"] == 0


# ---------------------------------------------------------------------------------------------
# tasks other services send by name


def test_invalidation_tasks_sent_by_name(
    celery_app: Celery, celery_worker: Any, tasks: TaskLog, make_cache: Any
) -> None:
    cache = make_cache(ttl="60s", tags=lambda key, value: [f"tenant:{value}"])
    for key in ("a", "b", "c", "user:1", "user:2", "order:1"):
        cache.set(key, "acme" if key == "c" else "other")

    celery_app.send_task(INVALIDATE_TASK, args=[cache.name, ["a", "b"]])
    assert tasks.wait_finished(INVALIDATE_TASK, 1)[0].outcome == "deleted 2"
    celery_app.send_task(INVALIDATE_PATTERN_TASK, args=[cache.name, "user:*"])
    assert tasks.wait_finished(INVALIDATE_PATTERN_TASK, 1)[0].outcome.startswith("deleted")
    celery_app.send_task(INVALIDATE_TAG_TASK, args=[cache.name, "tenant:acme"])
    assert tasks.wait_finished(INVALIDATE_TAG_TASK, 1)[0].outcome == "deleted 1"

    for key in ("a", "b", "c", "user:1", "user:2"):
        assert cache.get(key) is None, key
        assert cache.stack._read_l2(key).entry is None, key
    assert cache.get("order:1") == "other"


def test_bad_task_messages_are_rejected_and_logged(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    make_cache: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(ttl="60s", resolver=str.upper)
    cache.set("k", "kept")
    name = cache.name
    assert "this" not in sys.modules
    bad: list[tuple[str, list[Any]]] = [
        (INVALIDATE_TASK, ["no-such-cache", ["k"]]),
        (INVALIDATE_TASK, ["os.system", ["echo pwned"]]),
        (REFRESH_TASK, ["this.s", "k", "token", "00"]),  # a dotted path is never imported
        (INVALIDATE_TASK, [123, ["k"]]),
        (INVALIDATE_TASK, [name, 123]),
        (INVALIDATE_TASK, [name, [1]]),
        (INVALIDATE_TASK, [name, [""]]),
        (INVALIDATE_TASK, [name, ["x" * (64 * 1024 + 1)]]),
        (INVALIDATE_TASK, [name, ["k"] * 10_001]),
        (INVALIDATE_PATTERN_TASK, [name, "*"]),  # the whole cache: refused as in the API
        (INVALIDATE_PATTERN_TASK, [name, ["k"]]),
        (INVALIDATE_TAG_TASK, [name, ""]),
        (REFRESH_TASK, [name, "k", 123, "00"]),
        (REFRESH_TASK, [name, "k", "t" * 65, "00"]),
        (REFRESH_TASK, [name, "k", "token", "zz"]),
        (REFRESH_TASK, [name, "k", "token", "0" * 18]),
        (REFRESH_TASK, [name, {"k": 1}, "token", "00"]),
    ]
    caplog.set_level(logging.ERROR, logger="oqron_cache.tasks")
    for task, args in bad:
        celery_app.send_task(task, args=args)
    wait_for(
        lambda: sum(len(tasks.finished(t)) for t in {t for t, _ in bad}) == len(bad),
        what="every bad message to be handled",
    )
    outcomes = {
        (run.task, json.dumps(run.args)[:60]): run.outcome
        for task in {t for t, _ in bad}
        for run in tasks.finished(task)
    }
    assert set(outcomes.values()) == {"rejected"}, outcomes
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == len(bad)
    assert "this" not in sys.modules
    assert cache.get("k") == "kept"  # nothing was invalidated or refreshed


def test_wrong_arity_is_dropped_once_and_changes_nothing(
    celery_app: Celery, celery_worker: Any, tasks: TaskLog, make_cache: Any
) -> None:
    cache = make_cache(ttl="60s")
    cache.set("k", "kept")
    celery_app.send_task(INVALIDATE_TASK, args=[cache.name])
    celery_app.send_task(INVALIDATE_TASK, kwargs={"cache": cache.name, "keys": ["k"]})
    runs = tasks.wait_finished(INVALIDATE_TASK, 2)
    for run in runs:  # "rejected", or a failed task (TypeError) that Celery logs and acks
        assert run.outcome == "rejected" or (
            run.state == "FAILURE" and isinstance(run.outcome, TypeError)
        ), (run.state, run.outcome)
    celery_app.send_task(INVALIDATE_TASK, args=[cache.name, ["other"]])
    tasks.wait_finished(INVALIDATE_TASK, 3)  # the worker goes on; nothing was redelivered
    assert len(tasks.started(INVALIDATE_TASK)) == 3
    assert cache.get("k") == "kept"


class Canary:
    """Unpickling this creates ``path``: proof that a pickle payload was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_pickle_message_in_the_refresh_queue_is_never_unpickled(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    make_cache: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = make_cache(ttl="60s", resolver=str.upper)
    canary = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(Canary(canary))) is None  # noqa: S301 - the payload works
    assert canary.exists()
    canary.unlink()
    # ... and a sender that speaks pickle puts it in the refresh queue.
    celery_app.send_task(
        REFRESH_TASK, args=[cache.name, "k", Canary(canary), "00"], serializer="pickle"
    )
    celery_app.send_task(INVALIDATE_TASK, args=[cache.name, ["k"]])  # sent after it
    tasks.wait_finished(INVALIDATE_TASK, 1)
    wait_for(lambda: "untrusted content" in caplog.text, what="the refusal to be logged")
    assert len(tasks.sent(REFRESH_TASK)) == 1  # it did reach the queue
    assert tasks.started(REFRESH_TASK) == []
    assert not canary.exists()
    assert "untrusted content of type pickle" in caplog.text


# ---------------------------------------------------------------------------------------------
# how the library sits on the user's app


def test_worker_consumes_the_refresh_queue_and_configure_is_idempotent(
    celery_app: Celery,
    celery_worker: Any,
    tasks: TaskLog,
    make_cache: Any,
    redis_url: str,
    namespace: str,
) -> None:
    consumed = {queue.name for queue in celery_worker.consumer.task_consumer.queues}
    assert {celery_app.conf.task_default_queue, REFRESH_QUEUE} <= consumed
    assert consumed == {queue.name for queue in celery_app.conf.task_queues}
    names = (REFRESH_TASK, INVALIDATE_TASK, INVALIDATE_PATTERN_TASK, INVALIDATE_TAG_TASK)
    registered = {task: celery_app.tasks[task] for task in names}
    refresh = registered[REFRESH_TASK]
    assert (refresh.acks_late, refresh.reject_on_worker_lost) == (True, True)
    assert (refresh.serializer, refresh.ignore_result) == ("json", True)
    assert celery_app.amqp.router.route({}, REFRESH_TASK)["queue"].name == REFRESH_QUEUE
    queues = [queue.name for queue in celery_app.conf.task_queues]
    routes = dict(celery_app.conf.task_routes)

    oqron_cache.configure(  # again, on the same app: nothing is registered or added twice
        redis_url=redis_url, celery_app=celery_app, namespace=namespace, enqueue_budget=BUDGET
    )
    assert {task: celery_app.tasks[task] for task in names} == registered
    assert [queue.name for queue in celery_app.conf.task_queues] == queues
    assert celery_app.conf.task_routes == routes

    cache = make_cache(ttl="60s")  # and the running worker still serves the new runtime
    cache.set("k", "v")
    celery_app.send_task(INVALIDATE_TASK, args=[cache.name, ["k"]])
    assert tasks.wait_finished(INVALIDATE_TASK, 1)[0].outcome == "deleted 1"
    assert cache.get("k") is None


def test_miss_worker_whose_resolver_fails_raises_after_lock_ttl(
    celery_worker: Any, tasks: TaskLog, origin: Origin, make_cache: Any
) -> None:
    cache = make_cache(
        ttl="60s", resolver=origin, miss="worker", stampede=oqron_cache.Stampede(lock_ttl="1s")
    )
    origin.fail = True
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="origin down for cold"):
        cache.get("cold")
    took = time.perf_counter() - started
    # The task failed (nothing servable exists); the caller waited for a fill until lock_ttl
    # (liveness), then ran the resolver itself, whose own error it gets.
    assert tasks.outcomes(REFRESH_TASK) == ["failed"]
    ran_id, inline = origin.in_tasks()
    assert is_refresh_id(ran_id, cache.name, "cold") and inline is None
    assert 0.9 <= took < 3, f"the caller got the error after {took:.2f}s"
    counts = stats(cache)
    assert (counts["refresh_failures"], counts["resolver_errors"]) == (1, 1)
    assert counts["lock_timeouts"] == 1


def test_reset_stops_the_refresh_publisher_thread(
    celery_app: Celery, tasks: TaskLog, make_cache: Any, clock: FakeClock
) -> None:
    def publishers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "oqron-enqueue" and t.is_alive()]

    before = set(publishers())
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=str.upper, clock=clock)
    cache.set("k", "v0")
    clock.tick(61)
    assert cache.get("k") == "v0"
    join()
    assert len(tasks.sent(REFRESH_TASK)) == 1  # no worker: the message just waits in the queue
    (publisher,) = set(publishers()) - before
    reset()
    publisher.join(1)
    assert not publisher.is_alive()


# ---------------------------------------------------------------------------------------------
# the async front through the same worker (issue 11: P4, P5 and refresh on the async front)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_64_tasks_on_one_stale_key_make_one_task_whatever_the_resolver(
    kind: str,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
) -> None:
    """64 tasks of a loop read a stale key: all get the stale value at once, one Celery task
    refreshes it; an ``async def`` resolver runs to completion on the worker's own loop."""
    import asyncio

    resolver: Any = origin
    if kind == "async":

        async def resolve(key: str) -> str:
            await asyncio.sleep(0)
            return origin(key)  # blocks the worker's loop: it is the worker's own

        resolver = resolve
    cache = make_cache(ttl="60s", stale_ttl="10m", resolver=resolver, clock=clock)
    await cache.aset("hot", "v0")
    clock.tick(61)
    origin.gate.clear()
    results = await asyncio.gather(*(cache.aget("hot") for _ in range(64)))
    assert results == ["v0"] * 64  # nobody waited for the refresh
    assert await asyncio.to_thread(origin.entered.wait, 10)
    origin.gate.set()
    (ran,) = await asyncio.to_thread(tasks.wait_finished, REFRESH_TASK, 1)
    assert ran.outcome == "refreshed"
    deadline = time.monotonic() + 10
    while await cache.aget("hot") != "hot-v1":
        assert time.monotonic() < deadline, "the refreshed value never arrived"
        await asyncio.sleep(0.01)
    assert origin.count == 1
    (ran_id,) = origin.in_tasks()
    assert is_refresh_id(ran_id, cache.name, "hot")
    assert len(tasks.sent(REFRESH_TASK)) == 1
    counts = stats(cache)
    assert counts["stale_served"] == 64
    assert counts["refreshes_enqueued"] == 1
    assert counts["refreshes_succeeded"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("write", ["aset", "adelete", "ainvalidate_by_tag", "ainvalidate_pattern"])
async def test_an_async_write_racing_an_inflight_refresh_wins(
    write: str,
    celery_worker: Any,
    tasks: TaskLog,
    origin: Origin,
    make_cache: Any,
    clock: FakeClock,
    redis_client: Any,
) -> None:
    """P5 on the async front: a refresh that began before an ``aset``, ``adelete`` or an async
    invalidation never replaces what it did."""
    import asyncio

    cache = make_cache(
        ttl="60s", stale_ttl="10m", resolver=origin, clock=clock, tags=lambda k, v: ["t"]
    )
    await cache.aset("k", "v0")
    clock.tick(61)
    origin.gate.clear()
    assert await cache.aget("k") == "v0"
    assert await asyncio.to_thread(origin.entered.wait, 10)  # the worker's resolver runs
    if write == "aset":
        await cache.aset("k", "written")
    elif write == "adelete":
        await cache.adelete("k")
    elif write == "ainvalidate_by_tag":
        assert await cache.ainvalidate_by_tag("t") == 1
    else:
        assert await cache.ainvalidate_pattern("k*") == 1
    origin.gate.set()
    (ran,) = await asyncio.to_thread(tasks.wait_finished, REFRESH_TASK, 1)
    assert ran.outcome == "conflict"  # it began before the write: it must not win
    assert not redis_client.exists(cache.stack.l2.keys.lock("k"))
    assert stats(cache)["refreshes_succeeded"] == 0
    if write == "aset":
        assert await cache.aget("k") == "written"
    else:
        assert cache.stack._read_l2("k") is None or cache.stack._read_l2("k").entry is None
        assert await cache.aget("k") == "k-v2"  # a cold miss after the drop: loaded again
