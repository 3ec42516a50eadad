"""Write-through as a Celery chain (issue 4, item 3): origin first, then the cache.

The chain runs in real ``celery -A workers worker`` subprocesses (prefork, 2 children, each in
its own process group) that import :mod:`tests.procs.wt_caches`, whose origin is a Redis hash
in the test namespace with an exact log of accepted writes, and which can be told per key to
refuse, fail ``n`` times, or block at a chosen point of the chain.

The broker is a private RabbitMQ virtual host (``rabbitmqctl add_vhost``, deleted afterwards):
a SIGKILLed worker's unacknowledged messages go back to the queue as soon as its connection
drops, so a successor redoes the interrupted link at once. With a Redis broker they would stay
invisible for the transport's ``visibility_timeout`` (1 h by default), and ``workers/`` has no
setting for ``broker_transport_options``.

One worker serves the whole module (its start costs seconds); the kill tests replace it. Every
test uses keys of its own in one module namespace, deleted at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from celery import Celery

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.celery.write_through import WriteHandle, WriteThroughError, cache_link
from oqron_cache.config import reset
from oqron_cache.core.codecs import get_codec
from oqron_cache.core.entry import new_version, unpack
from oqron_cache.core.keys import KeySpace
from tests.procs import ROOT
from tests.procs import wt_caches as wt
from tests.redis_server import delete_namespace
from tests.worker_process import WorkerProcess

RABBIT = "amqp://guest:guest@127.0.0.1:5672"
BACKOFF_TOTAL = 0.2 + 0.4 + 0.8 + 1.6 + 3.2  # the origin link's five retries


# -- processes ----------------------------------------------------------------------------------


class Worker(WorkerProcess):
    """A worker serving :mod:`tests.procs.wt_caches` (see :class:`WorkerProcess`)."""

    def __init__(self, log_dir: Path, broker: str, redis_url: str, namespace: str) -> None:
        super().__init__(
            log_dir,
            broker,
            redis_url,
            namespace,
            modules="tests.procs.wt_caches",
            prefix="wt",
            extra_args=("--without-mingle", "--without-gossip"),
        )


class Reader:
    """``python -m tests.procs.wt_caches``: another process reading the cache (no Celery)."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.wt_caches", "--url", redis_url, "--ns", namespace],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self._event()["event"] == "ready"

    def _event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the reader exited (rc={self.proc.poll()})"
        event: dict[str, Any] = json.loads(line)
        assert event["event"] != "error", event["error"]
        return event

    def get(self, key: str) -> tuple[Any, bool]:
        """``(value, whether its L1 held the key before this read)``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": "get", "key": key}) + "\n")
        event = self._event()
        return event["value"], event["l1"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- the origin, seen from the test -------------------------------------------------------------


@dataclass
class Origin:
    """The test side of :mod:`tests.procs.wt_caches`' origin, counters and flags."""

    client: redis.Redis
    namespace: str

    def _k(self, part: str) -> str:
        return wt.test_key(self.namespace, part)

    def value(self, key: str) -> Any:
        raw = cast("bytes | None", self.client.hget(self._k("origin"), key))
        return None if raw is None else json.loads(raw)

    def writes(self, key: str | None = None) -> list[tuple[str, Any]]:
        """Every write the origin accepted, in order: ``(key, value)``."""
        out = []
        for raw in cast("list[bytes]", self.client.lrange(self._k("origin:log"), 0, -1)):
            k, text = raw.decode().split(" ", 1)
            if key is None or k == key:
                out.append((k, json.loads(text)))
        return out

    def attempts(self, key: str) -> int:
        return int(cast("bytes | None", self.client.hget(self._k("attempts"), key)) or 0)

    def flag(self, key: str, mode: str | None) -> None:
        if mode is None:
            self.client.hdel(self._k("flags"), key)
        else:
            self.client.hset(self._k("flags"), key, mode)

    def wait_blocked(self, key: str, at: str, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until a call for ``key`` is blocked at ``at``; return its ``pid``/``ppid``."""
        deadline = time.monotonic() + timeout
        while True:
            raw = cast("bytes | None", self.client.hget(self._k("where"), key))
            if raw is not None and json.loads(raw)["at"] == at:
                where: dict[str, Any] = json.loads(raw)
                return where
            assert time.monotonic() < deadline, f"nothing blocked at {at} for {key}"
            time.sleep(0.005)


# -- fixtures -----------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Env:
    """The module's broker, namespace and current worker."""

    broker: str
    redis_url: str
    namespace: str
    log_dir: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def worker(self) -> Worker:
        return self.workers[-1]

    def start_worker(self) -> Worker:
        worker = Worker(self.log_dir, self.broker, self.redis_url, self.namespace)
        self.workers.append(worker)
        worker.wait_ready()
        return worker


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Env]:
    vhost = f"oqron-wthrough-{uuid.uuid4().hex[:8]}"
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    _rabbitmqctl("add_vhost", vhost)
    state = Env(f"{RABBIT}/{vhost}", redis_url, namespace, tmp_path_factory.mktemp("wt"))
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        state.start_worker()
        yield state
    finally:
        for worker in state.workers:
            worker.kill()
        _rabbitmqctl("delete_vhost", vhost)
        delete_namespace(client, namespace)
        client.close()


@pytest.fixture(scope="module")
def app(env: Env) -> Iterator[Celery]:
    """The test process's Celery app (the "web" side), on the module's broker."""
    celery = Celery("wt-tests", broker=env.broker)
    celery.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
    )
    yield celery
    celery.close()


@pytest.fixture
def chain(env: Env, app: Celery) -> Iterator[Origin]:
    """This process configured with the module's worker: ``set()`` goes through the chain."""
    oqron_cache.configure(redis_url=env.redis_url, celery_app=app, namespace=env.namespace)
    client = redis.Redis.from_url(env.redis_url)
    try:
        yield Origin(client, env.namespace)
    finally:
        reset()
        client.close()


def _key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _l2(client: redis.Redis, namespace: str, key: str) -> tuple[Any, bytes] | None:
    """``(value, version)`` of ``key`` in L2 (wtc_main), or None."""
    raw = cast("bytes | None", client.get(KeySpace(namespace, wt.MAIN, 200).value(key)))
    if raw is None:
        return None
    entry, _, payload = unpack(raw)
    return get_codec("json").decode(payload), entry.version


def _l2_value(client: redis.Redis, namespace: str, key: str) -> Any:
    """The value of ``key`` in L2 (wtc_main); the entry must exist."""
    found = _l2(client, namespace, key)
    assert found is not None, f"{key} is not in L2"
    return found[0]


def _report(line: str) -> None:
    print(f"\n[test_write_through] {line}", flush=True)


# -- 1. read-your-writes, other processes' L1 -----------------------------------------------------


def test_set_waits_for_the_chain_then_reads_its_write_and_other_l1_drops(
    env: Env, chain: Origin
) -> None:
    cache = wt.main_cache
    key = _key("ryw")
    reader = Reader(env.redis_url, env.namespace)
    try:
        cache.set(key, {"n": 1})
        assert chain.writes(key) == [(key, {"n": 1})]
        assert reader.get(key) == ({"n": 1}, False)
        value, held = reader.get(key)
        if not held:  # the cache link's eviction reached the reader during its first read,
            value, held = reader.get(key)  # which then did not keep its copy (P7)
        assert (value, held) == ({"n": 1}, True)  # the reader's L1 holds n=1 now
        assert cache.get(key) == {"n": 1}  # and so does this process's

        started = time.perf_counter()
        handle = cache.set(key, {"n": 2})
        elapsed = time.perf_counter() - started
        # set() returned only after the whole chain ran: the origin and L2 have the write.
        assert handle is not None and handle.status() == "ok"
        assert chain.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]
        assert _l2_value(chain.client, env.namespace, key) == {"n": 2}
        assert cache.get(key) == {"n": 2}  # read-your-writes, although L1 held n=1

        # The other process dropped its L1 copy (the cache link's bus message).
        deadline = time.monotonic() + 5
        while (seen := reader.get(key)) != ({"n": 2}, True):
            assert seen in (({"n": 1}, True), ({"n": 2}, False)), seen
            assert time.monotonic() < deadline, f"the reader still serves {seen}"
        assert chain.attempts(key) == 2
    finally:
        reader.close()
    _report(f"set() through the chain took {elapsed * 1000:.1f} ms")


# -- 2. the origin refuses ------------------------------------------------------------------------


def test_origin_refusal_raises_after_retries_and_leaves_the_cache_untouched(
    env: Env, chain: Origin
) -> None:
    cache = wt.main_cache
    key = _key("refuse")
    cache.set(key, {"n": 1})
    before = _l2(chain.client, env.namespace, key)
    assert before is not None and before[0] == {"n": 1}
    assert cache.get(key) == {"n": 1}

    chain.flag(key, "reject")
    started = time.monotonic()
    with pytest.raises(WriteThroughError, match="origin refused: OriginRejected") as info:
        cache.set(key, {"n": 2}, timeout=30)
    elapsed = time.monotonic() - started

    assert chain.attempts(key) == 1 + 6  # the first write, then 1 try + 5 retries
    assert elapsed >= BACKOFF_TOTAL - 0.05  # with backoff 0.2, 0.4, 0.8, 1.6, 3.2 s
    assert chain.writes(key) == [(key, {"n": 1})]  # nothing refused reached the origin
    assert _l2(chain.client, env.namespace, key) == before  # L2 untouched: same version
    assert cache.get(key) == {"n": 1}
    assert info.value.cache == wt.MAIN
    _report(f"a refused write raised after {elapsed:.2f} s (backoff total {BACKOFF_TOTAL} s)")


# -- 3. the origin fails twice, then accepts ------------------------------------------------------


def test_origin_failing_twice_then_accepting_lands_once(env: Env, chain: Origin) -> None:
    cache = wt.main_cache
    key = _key("flaky")
    chain.flag(key, "fail:2")
    started = time.monotonic()
    handle = cache.set(key, {"n": 1})
    elapsed = time.monotonic() - started
    assert handle is not None and handle.status() == "ok"
    assert chain.attempts(key) == 3
    assert chain.writes(key) == [(key, {"n": 1})]
    assert _l2_value(chain.client, env.namespace, key) == {"n": 1}
    assert cache.get(key) == {"n": 1}
    assert elapsed >= 0.2 + 0.4 - 0.05


# -- 4. a worker SIGKILLed mid-chain ------------------------------------------------------------


def _kill_and_replace(env: Env, where: dict[str, Any], origin: Origin, key: str) -> float:
    """SIGKILL the worker whose child is blocked, clear the flag, start a successor."""
    victim = env.worker
    assert where["ppid"] == victim.pid  # the blocked call runs in a child of that worker
    victim.kill()
    origin.flag(key, None)  # whoever runs the link next goes straight through
    started = time.monotonic()
    env.start_worker()
    return time.monotonic() - started


def test_worker_killed_before_the_origin_write_lands_it_once(env: Env, chain: Origin) -> None:
    cache = wt.main_cache
    key = _key("kill-origin")
    cache.set(key, {"n": 1})
    chain.flag(key, "block")
    handle = cache.set(key, {"n": 2}, wait=False)
    assert handle is not None
    where = chain.wait_blocked(key, "block")
    assert handle.status() == "pending"
    startup = _kill_and_replace(env, where, chain, key)

    handle.wait(timeout=30)  # the successor got the redelivered origin link
    assert handle.status() == "ok"
    assert chain.attempts(key) == 3  # n=1, the killed try of n=2, the redelivered one
    assert chain.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]  # n=2 exactly once
    assert _l2_value(chain.client, env.namespace, key) == {"n": 2}
    assert cache.get(key) == {"n": 2}
    _report(f"worker killed before the origin write; successor ready in {startup:.1f} s")


def test_worker_killed_in_the_cache_link_does_not_write_the_origin_again(
    env: Env, chain: Origin
) -> None:
    cache = wt.main_cache
    key = _key("kill-cache")
    cache.set(key, {"n": 1})
    chain.flag(key, "block-cache")
    handle = cache.set(key, {"n": 2}, wait=False)
    assert handle is not None
    where = chain.wait_blocked(key, "block-cache")
    # The origin has n=2 and the library recorded it; the cache still serves n=1.
    assert chain.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]
    assert _l2_value(chain.client, env.namespace, key) == {"n": 1}
    assert handle.status() == "pending"
    _kill_and_replace(env, where, chain, key)

    handle.wait(timeout=30)
    assert handle.status() == "ok"
    assert chain.attempts(key) == 2  # the origin function never ran again for n=2
    assert chain.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]
    assert _l2_value(chain.client, env.namespace, key) == {"n": 2}
    assert cache.get(key) == {"n": 2}


def test_worker_killed_after_the_origin_commit_before_it_was_recorded(
    env: Env, chain: Origin
) -> None:
    cache = wt.main_cache
    key = _key("kill-after")
    chain.flag(key, "block-after")
    handle = cache.set(key, {"n": 1}, wait=False)
    assert handle is not None
    where = chain.wait_blocked(key, "block-after")
    assert chain.writes(key) == [(key, {"n": 1})]  # committed in the origin, not yet recorded
    _kill_and_replace(env, where, chain, key)
    handle.wait(timeout=30)
    assert handle.status() == "ok"
    assert cache.get(key) == {"n": 1}
    # once: the redelivered link called the origin again, but with the same version, which
    # the (idempotent) origin recognised through current_write_version()
    assert chain.writes(key) == [(key, {"n": 1})]


# -- the async front: aset through the same chain (issue 11, P6) --------------------------------


@pytest.mark.asyncio
async def test_aset_goes_through_the_chain_and_survives_a_worker_killed_mid_chain(
    env: Env, chain: Origin
) -> None:
    """P6 on the async front: ``aset`` sends the same chain; it returns after the cache link
    ran (read-your-writes through ``aget``), and a worker SIGKILLed before the origin write
    loses nothing: the redelivered link lands the write exactly once. The loop keeps running
    while the chain does (the broker is never waited on from the loop)."""
    import asyncio

    cache = wt.main_cache
    key = _key("aset")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    beat = asyncio.create_task(ticker())
    try:
        done = await cache.aset(key, {"n": 1})
        assert done is not None and done.status() == "ok"  # returned once the chain ran
        assert chain.writes(key) == [(key, {"n": 1})]
        assert _l2_value(chain.client, env.namespace, key) == {"n": 1}
        assert await cache.aget(key) == {"n": 1}
        assert ticks > 0  # the loop ran while aset waited for the chain

        chain.flag(key, "block")
        handle = await cache.aset(key, {"n": 2}, wait=False)
        assert handle is not None
        where = await asyncio.to_thread(chain.wait_blocked, key, "block")
        assert handle.status() == "pending"
        # On the main thread (blocking this loop for the successor's start-up): a worker
        # started from another thread dies when that thread does (see WorkerProcess).
        _kill_and_replace(env, where, chain, key)
        await asyncio.to_thread(handle.wait, 30)
        assert handle.status() == "ok"
        assert chain.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]  # n=2 exactly once
        assert _l2_value(chain.client, env.namespace, key) == {"n": 2}
        assert await cache.aget(key) == {"n": 2}

        chain.flag(key, "reject")
        with pytest.raises(WriteThroughError, match="origin refused"):
            await cache.aset(key, {"n": 3}, timeout=30)
        assert await cache.aget(key) == {"n": 2}  # a refused write never reaches the cache
    finally:
        chain.flag(key, None)
        beat.cancel()


# -- two writes of one key, applied out of order --------------------------------------------------


def test_two_writes_of_one_key_leave_origin_and_cache_agreeing(env: Env, chain: Origin) -> None:
    cache = wt.main_cache
    key = _key("order")
    chain.flag(key, "block-first")
    first = cache.set(key, {"n": 1}, wait=False)  # its origin link blocks in one child
    assert first is not None
    chain.wait_blocked(key, "block-first")
    second = cache.set(key, {"n": 2}, wait=False)  # its origin link waits for the key's lock
    assert second is not None
    chain.flag(key, None)
    first.wait(timeout=30)
    second.wait(timeout=30)
    # Origin writes of one key are serialised in write order: n=1, then n=2.
    assert [v for _, v in chain.writes(key)] == [{"n": 1}, {"n": 2}]
    assert cache.get(key) == {"n": 2}
    assert chain.value(key) == cache.get(key)


# -- 5. a thousand writes under load ------------------------------------------------------------

THREADS = 4
KEYS_PER_THREAD = 25
ROUNDS = 10  # THREADS * KEYS_PER_THREAD * ROUNDS = 1000 writes


def test_a_thousand_writes_under_load_none_lost(env: Env, chain: Origin) -> None:
    cache = wt.main_cache
    run = uuid.uuid4().hex[:6]
    handles: list[list[tuple[str, int, Any]]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    go = threading.Barrier(THREADS)

    def writer(t: int) -> None:
        keys = [f"load-{run}-{t}-{j}" for j in range(KEYS_PER_THREAD)]
        go.wait()
        try:
            for r in range(ROUNDS):
                for key in keys:
                    handles[t].append((key, r, cache.set(key, {"k": key, "r": r}, wait=False)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = time.monotonic() - started
    assert errors == []
    every = [h for per_thread in handles for h in per_thread]
    assert len(every) == 1000
    for _, _, handle in every:
        handle.wait(timeout=60)
    elapsed = time.monotonic() - started
    assert {handle.status() for _, _, handle in every} == {"ok"}

    # None lost, none written twice: the origin accepted each of the 1000 writes exactly once.
    accepted = [(k, v["r"]) for k, v in chain.writes() if k.startswith(f"load-{run}-")]
    assert len(accepted) == 1000
    assert sorted(accepted) == sorted((k, r) for k, r, _ in every)
    # Each key ends with its last write, in the origin, in L2 and through the cache.
    keys = {k for k, _, _ in every}
    last = {"r": ROUNDS - 1}
    for key in keys:
        assert chain.value(key) == {"k": key, **last}
        assert _l2_value(chain.client, env.namespace, key) == {"k": key, **last}
        assert cache.get(key) == {"k": key, **last}
    _report(
        f"1000 write-through sets from {THREADS} threads: sent in {sent:.2f} s, all done in "
        f"{elapsed:.2f} s ({1000 / elapsed:.0f} writes/s, one worker -c 2)"
    )


# -- 6. a redelivered cache link ------------------------------------------------------------------


def _link(
    cache: Any,
    key: str,
    value: Any,
    version: bytes,
    created_at: float,
    origin_at: float | None = None,
    retried: bool = False,
) -> str:
    """Run the cache link in this process, as a (re)delivered ``oqron_cache.write_cache``.

    Its write is recorded as its origin link leaves it (``origin``), unless already recorded.
    """
    l2 = cache.stack.l2
    l2.conn.client.hsetnx(l2.keys.writes(key), version.hex(), "origin")
    payload = cache.stack.codec.encode(value, cache.name)
    b64 = base64.b64encode(payload).decode()
    return cache_link(cache.stack, key, b64, version.hex(), created_at, origin_at, retried=retried)


def _tiers() -> list[Any]:
    return [MemoryTier(max_size=100, ttl="60s"), RedisTier(ttl="60s")]


def _l2_of(cache: Any, key: str) -> tuple[Any, bytes]:
    raw = cache.stack.l2.read(key)
    assert raw is not None
    entry, _, payload = unpack(raw)
    return cache.stack.codec.decode(payload), entry.version


def test_a_redelivered_cache_link_is_harmless(configured: str, make_cache: Any) -> None:
    saved: list[tuple[str, Any]] = []
    cache = make_cache(tiers=_tiers(), write_through=lambda k, v: saved.append((k, v)))
    key = "k"
    v1 = new_version()
    t1 = time.time()
    assert _link(cache, key, {"n": 1}, v1, t1) == "written"
    assert _link(cache, key, {"n": 1}, v1, t1) == "written"  # the same entry, written again
    assert _l2_of(cache, key) == ({"n": 1}, v1)
    assert cache.get(key) == {"n": 1}

    cache.set(key, {"n": 2})  # inline (no Celery here): origin, then the cache
    assert saved == [(key, {"n": 2})]
    newer = _l2_of(cache, key)
    assert newer[0] == {"n": 2}
    # The link of v1 redelivered after the newer set(), and a link of an even older write:
    # neither replaces the newer value.
    assert _link(cache, key, {"n": 1}, v1, t1) == "superseded"
    assert _link(cache, key, {"n": 0}, new_version(), t1 - 1) == "superseded"
    assert _l2_of(cache, key) == newer
    assert cache.get(key) == {"n": 2}
    # Each link recorded its outcome, so a handle waiting on any of them is released.
    outcomes = cache.stack.l2.conn.client.hgetall(cache.stack.l2.keys.writes(key))
    assert outcomes[v1.hex().encode()] == b"ok"
    assert saved == [(key, {"n": 2})]  # links never call the origin


def test_a_fill_that_read_the_origin_before_the_write_never_beats_its_cache_link(
    configured: str, make_cache: Any
) -> None:
    """Issue 10, defect 4 (P5, P6): order a write-through set against fills by what it is.

    The chain of a set() carries the instant set() began. A load that read the origin before
    the origin link wrote it, and filled L2 between the origin link and the cache link, has a
    later ``created_at`` (its resolver returned later) but an older value: the cache link must
    replace it, or set() reports success while get() serves the old value for a whole ttl.
    """
    origin = {"k": {"n": 0}}
    cache = make_cache(
        tiers=_tiers(),
        resolver=lambda key: dict(origin[key]),
        write_through=lambda key, value: None,
    )
    key = "k"
    set_began = time.time()  # set({"n": 1}) starts: its chain carries this created_at
    assert cache.get(key) == {"n": 0}  # ... a load reads the old origin and fills, later
    origin[key] = {"n": 1}  # the origin link writes the origin; then the cache link runs:
    origin_at = time.time()
    assert _link(cache, key, {"n": 1}, new_version(), set_began, origin_at) == "written"
    assert _l2_of(cache, key)[0] == {"n": 1}
    assert cache.get(key) == {"n": 1}


def test_a_late_cache_link_never_serves_a_value_past_its_bound_nor_beats_a_newer_fill(
    configured: str, make_cache: Any
) -> None:
    """Soak finding (P3, P5): a cache link retried long after its origin write (Redis was
    restarted empty meanwhile) reinstalled a value 15 s old, and hid a newer fill."""
    origin = {"k": {"n": 2}}
    cache = make_cache(
        ttl="1s", stale_ttl="1s", resolver=lambda key: dict(origin[key]),
        write_through=lambda key, value: None,
    )
    now = time.time()
    # Its origin write was 5 s ago, past ttl + stale_ttl: not written, set() still succeeded.
    assert _link(cache, "k", {"n": 1}, new_version(), now - 5.5, now - 5) == "expired"
    assert cache.stack.l2.read("k") is None
    outcome = cache.stack.l2.conn.client.hget(cache.stack.l2.keys.writes("k"), new_version().hex())
    assert outcome is None
    # A fill whose load began after the link's origin write read that value or a newer one.
    written_at = time.time()
    assert cache.get("k") == {"n": 2}
    assert _link(cache, "k", {"n": 1}, new_version(), written_at - 0.2, written_at) == (
        "superseded"
    )
    assert _l2_of(cache, "k")[0] == {"n": 2}
    # Its freshness counts from the origin write, not from when the link ran.
    at = time.time() - 0.5
    assert _link(cache, "k2", {"n": 3}, new_version(), at - 0.1, at) == "written"
    raw = cache.stack.l2.read("k2")
    assert unpack(raw)[0].fresh_until == pytest.approx(at + 1.0)


def test_a_link_that_yields_to_a_delete_still_refuses_fills_that_read_the_origin_before_it(
    configured: str, make_cache: Any
) -> None:
    """Found by the 60 s soak in CI (P5): set(v2) began; a delete landed while it ran; a load
    began after the delete (its basis: the tombstone) and read the origin before v2's origin
    write (v1); v2's link yielded to the newer delete, leaving the tombstone as it was; the
    load's fill then passed its compare-and-set on the tombstone, and v1 was served for a
    whole ttl. A link that yields to a delete now re-versions the tombstone, so fills based on
    it fail."""
    from oqron_cache.engine.writes import Basis

    origin = {"k": {"n": 1}}
    cache = make_cache(tiers=_tiers(), resolver=lambda key: dict(origin[key]),
                       write_through=lambda key, value: None)  # fmt: skip
    stack = cache.stack
    set_began = time.time()
    cache.delete("k")  # lands while the set runs (after it began)
    tomb = stack._read_l2("k")  # the load that begins now is based on the tombstone
    assert tomb is not None and tomb.entry is None
    read_v1 = dict(origin["k"])  # ... and reads the origin before v2's origin write
    origin["k"] = {"n": 2}  # v2's origin write
    assert _link(cache, "k", {"n": 2}, new_version(), set_began, time.time()) == "superseded"
    basis = Basis(tomb.seen, tomb.stamp, tomb.began, None, "", tomb.wall)
    assert stack._store("k", read_v1, basis, 0.001) == "conflict"  # refused: it predates v2
    # A redelivered link yields to the (re-versioned) delete again, and writes nothing.
    assert _link(cache, "k", {"n": 2}, new_version(), set_began, time.time()) == "superseded"
    stack.l1.clear()
    assert cache.get("k") == {"n": 2}


def test_a_cache_link_older_than_a_write_that_reached_the_origin_does_not_land(
    configured: str, make_cache: Any
) -> None:
    """A link whose write was overtaken in the origin by a newer one leaves the cache to it."""
    cache = make_cache(tiers=_tiers(), write_through=lambda key, value: None)
    key = "k"
    stack = cache.stack
    l2 = stack.l2
    stack.set(key, {"n": "earlier"})  # what the cache holds: written before both writes began
    older, newer = time.time() + 1, time.time() + 2
    # The newer write's origin link ran (its high-water mark is recorded); its cache link has
    # not run yet when the older write's cache link arrives.
    l2.conn.client.hset(l2.keys.writes(key), "hw", repr(newer))
    assert _link(cache, key, {"n": "older"}, new_version(), older) == "superseded"
    assert _l2_of(cache, key)[0] == {"n": "earlier"}
    assert _link(cache, key, {"n": "newer"}, new_version(), newer) == "written"
    assert _l2_of(cache, key)[0] == {"n": "newer"}


def test_a_retried_cache_link_drops_the_key_rather_than_write_a_value_redis_may_have_lost(
    configured: str, make_cache: Any, redis_client: Any, namespace: str
) -> None:
    """Found by the 10-minute soak (P5): a cache link that failed while Redis was read-only
    was retried after Redis restarted empty, and wrote its value over nothing, although a
    newer write had landed (and been lost with the restart): its old value was served for
    seconds. A retried link cannot know what Redis lost, but the origin has the newest
    write: it drops the key (a tombstone) so that the next read loads it from there."""
    origin: dict[str, Any] = {}
    cache = make_cache(
        tiers=_tiers(),
        resolver=origin.get,
        write_through=origin.__setitem__,
    )
    key = "k"
    t1 = time.time()
    origin[key] = {"n": 1}
    v1 = new_version()
    origin[key] = {"n": 2}  # a newer write reached the origin, and its cache link landed ...
    assert _link(cache, key, {"n": 2}, new_version(), t1 + 1) == "written"
    delete_namespace(redis_client, namespace)  # ... and Redis restarted empty
    cache.stack.l1.clear()
    assert _link(cache, key, {"n": 1}, v1, t1, retried=True) == "reloaded"
    outcomes = cache.stack.l2.conn.client.hgetall(cache.stack.l2.keys.writes(key))
    assert outcomes[v1.hex().encode()] == b"ok:reloaded"  # in the origin: its set() succeeded
    assert cache.get(key) == {"n": 2}  # loaded from the origin, never the retried old value
    # A first delivery writes its value as before.
    assert _link(cache, "j", {"n": 3}, new_version(), time.time()) == "written"


def _chain_here(cache: Any, key: str, value: Any, version: bytes, created_at: float) -> str:
    """Run both links of one write in this process, as a worker would, without retries."""
    from types import SimpleNamespace

    from oqron_cache.celery.write_through import origin_link

    task = SimpleNamespace(request=SimpleNamespace(retries=0))
    b64 = base64.b64encode(cache.stack.codec.encode(value, cache.name)).decode()
    forward = origin_link(task, cache.stack, key, b64, version.hex(), created_at)
    if forward is None:
        return "origin: superseded"
    return cache_link(cache.stack, *forward[1:])


def _sent(cache: Any, key: str, version: bytes) -> None:
    """What set() records before it sends the chain: the write's outcome field, "sent"."""
    l2 = cache.stack.l2
    l2.conn.client.hset(l2.keys.writes(key), version.hex(), "sent")


def test_a_chain_older_than_a_redis_restart_drops_the_key_rather_than_write_its_value(
    configured: str, make_cache: Any, redis_client: Any, namespace: str
) -> None:
    """Found by the 60 s soak in CI (P5): set(v19) timed out while its chain waited in the
    queue; set(v23) went through; the cache's Redis restarted empty, taking the high-water
    mark that orders writes; then v19's chain ran. The origin kept v23 (it orders its own
    writes), but the cache link found nothing newer recorded and wrote v19, which was served
    for a whole ttl. A chain whose record ("sent", written by set()) is gone cannot be ordered
    against the writes Redis forgot: it writes the origin and drops the key instead."""
    origin: dict[str, Any] = {}

    def store_newest(key: str, value: Any) -> None:  # an origin that fences its writes
        if value["n"] > origin.get(key, {"n": 0})["n"]:
            origin[key] = value

    cache = make_cache(tiers=_tiers(), resolver=origin.get, write_through=store_newest)
    key = "k"
    v19, t19 = new_version(), time.time()
    _sent(cache, key, v19)  # set(v19): recorded and sent; its chain waits in the queue
    v23 = new_version()
    _sent(cache, key, v23)
    assert _chain_here(cache, key, {"n": 23}, v23, t19 + 1) == "written"
    delete_namespace(redis_client, namespace)  # the cache's Redis restarts empty
    cache.stack.l1.clear()
    assert _chain_here(cache, key, {"n": 19}, v19, t19) == "reloaded"
    assert origin[key] == {"n": 23}
    assert cache.get(key) == {"n": 23}  # loaded from the origin, never v19
    outcomes = cache.stack.l2.conn.client.hgetall(cache.stack.l2.keys.writes(key))
    assert outcomes[v19.hex().encode()] == b"ok:reloaded"  # its set() did reach the origin
    assert WriteHandle(cache.stack, key, v19).status() == "ok"
    _sent(cache, key, v20 := new_version())
    assert WriteHandle(cache.stack, key, v20).status() == "pending"
    # The record lost between the origin link and the cache link: the same.
    v24 = new_version()
    _sent(cache, key, v24)
    b64 = base64.b64encode(cache.stack.codec.encode({"n": 24}, cache.name)).decode()
    from types import SimpleNamespace

    from oqron_cache.celery.write_through import origin_link

    task = SimpleNamespace(request=SimpleNamespace(retries=0))
    forward = origin_link(task, cache.stack, key, b64, v24.hex(), time.time())
    assert forward is not None
    delete_namespace(redis_client, namespace)
    assert cache_link(cache.stack, *forward[1:]) == "reloaded"
    cache.stack.l1.clear()
    assert cache.get(key) == {"n": 24}
    # With its record intact, a chain writes its value as before.
    v25 = new_version()
    _sent(cache, key, v25)
    assert _chain_here(cache, key, {"n": 25}, v25, time.time()) == "written"
    assert _l2_of(cache, key)[0] == {"n": 25}


def test_a_cache_link_drops_its_own_process_l1_copy(configured: str, make_cache: Any) -> None:
    cache = make_cache(tiers=_tiers(), write_through=lambda k, v: None)
    key = "k"
    cache.set(key, {"n": 1})  # L1 and L2 hold n=1
    assert cache.get(key) == {"n": 1}
    assert _link(cache, key, {"n": 2}, new_version(), time.time() + 1) == "written"
    assert _l2_of(cache, key)[0] == {"n": 2}
    deadline = time.monotonic() + 1.0
    while cache.get(key) != {"n": 2} and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get(key) == {"n": 2}  # fails: L1 still serves n=1


# -- 7. without Celery ----------------------------------------------------------------------------


def test_without_celery_the_origin_is_written_inline_before_the_cache(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    origin = Origin(redis_client, configured)
    cache_seen: list[Any] = []  # what L2 held when the origin was called

    def save(key: str, value: Any) -> None:
        raw = cache.stack.l2.read(key)
        cache_seen.append(None if raw is None else cache.stack.codec.decode(unpack(raw)[2]))
        wt.origin_write(key, value)

    cache = make_cache(tiers=_tiers(), write_through=save)
    key = "inline"
    handle = cache.set(key, {"n": 1})
    assert oqron_cache.config.current_runtime().enqueuer is None
    assert handle is not None and handle.status() == "ok"
    assert cache.set(key, {"n": 2}, wait=False).status() == "ok"  # done before it returns
    assert cache_seen == [None, {"n": 1}]  # the origin ran before the cache was updated
    assert origin.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]
    before = _l2_of(cache, key)
    assert before[0] == {"n": 2}

    origin.flag(key, "reject")
    with pytest.raises(wt.OriginRejected):  # the origin's own exception
        cache.set(key, {"n": 3})
    assert origin.attempts(key) == 3  # no retries inline
    assert origin.writes(key) == [(key, {"n": 1}), (key, {"n": 2})]
    assert _l2_of(cache, key) == before  # the cache is untouched
    assert cache.get(key) == {"n": 2}
