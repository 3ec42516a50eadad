"""The "web process" of the multi-process refresh benchmarks (expired_stampede, refresh_visible).

One object per spawned process (see :class:`bench.procs.Pool`), holding every library the same
way a service would:

* **oqron**: the cache of :mod:`bench.refresh_caches` (``[MemoryTier, RedisTier]``, ``ttl=1s``,
  ``stale_ttl=1h``), ``configure(redis_url, celery_app=<this process's Celery app>,
  namespace)``: stale values are refreshed by the Celery worker the benchmark started;
* **dogpile**: ``dogpile.cache.redis`` with ``distributed_lock=True`` (``thread_local_lock=False``
  so the runner thread can release it) and an ``async_creation_runner`` that recomputes in a new
  thread (the documented pattern); ``expiration_time=1``;
* **cashews**: ``@cache.early(ttl="1h", early_ttl=1)`` on Redis, driven by one asyncio loop;
* **floor** (stampede only, context): a dict lookup under a lock, no library;
* **celery** (refresh_visible only, context): the floor of a refresh through Celery, a plain
  task on the same app and worker (:mod:`bench.bare_celery`).

Every resolver does the same: ``INCR <namespace>:calls:<key>``, sleep (50 ms), return the value of
the new generation (:func:`bench.refresh_caches.make_value`), so a reader can tell new from stale.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from oqron_cache.celery.enqueue import REFRESH_QUEUE
from oqron_cache.redis.replies import as_int

from .bare_celery import BareRefresh
from .refresh_caches import TTL, counter_key, make_value

POLL = 0.0005  # seconds between two reads of a process waiting to see a new value
LIBRARIES = ("oqron", "dogpile", "cashews")
STEP_TIMEOUT = 60.0


@dataclass
class Served:
    """What one process's callers got in one run."""

    latencies_ns: list[int] = field(default_factory=list)
    stale: int = 0  # callers served the value the run started with
    new: int = 0  # callers served a newer generation (the refresh had landed already)
    errors: int = 0
    samples: list[str] = field(default_factory=list)

    def judge(self, value: Any, key: str, old_gen: int) -> None:
        """Count ``value``: the stale one, a newer one, or an error."""
        if isinstance(value, dict) and value.get("key") == key:
            gen = value.get("gen")
            if gen == old_gen and value == make_value(key, old_gen):
                self.stale += 1
                return
            if isinstance(gen, int) and gen > old_gen and value == make_value(key, gen):
                self.new += 1
                return
        self.failed(f"wrong value {value!r}")

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 3:
            self.samples.append(what[:200])


class Callers:
    """``threads`` long-lived caller threads, each making one call per run (see stampede.py).

    :meth:`park` gives them the call and waits until all are parked; :meth:`release` lets them
    go at once and waits until each has made its call.
    """

    def __init__(self, threads: int) -> None:
        self._parked = threading.Barrier(threads + 1)
        self._finished = threading.Barrier(threads + 1)
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._call: Callable[[], Any] = lambda: None
        self._key, self._old = "", 0
        self._latencies = [0] * threads
        self._served = Served()
        self._stopping = False
        for i in range(threads):
            threading.Thread(target=self._loop, args=(i,), name=f"caller-{i}", daemon=True).start()

    def _loop(self, index: int) -> None:
        while True:
            self._parked.wait()
            if self._stopping:
                return
            self._go.wait()
            started = time.perf_counter_ns()
            try:
                value: Any = self._call()
                error = None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            self._latencies[index] = time.perf_counter_ns() - started
            with self._lock:
                if error is None:
                    self._served.judge(value, self._key, self._old)
                else:
                    self._served.failed(error)
            self._finished.wait()

    def park(self, call: Callable[[], Any], key: str, old_gen: int) -> None:
        self._call, self._key, self._old = call, key, old_gen
        self._go = threading.Event()
        self._served = Served()
        self._parked.wait(timeout=STEP_TIMEOUT)

    def release(self) -> Served:
        self._go.set()
        self._finished.wait(timeout=STEP_TIMEOUT)
        self._served.latencies_ns = list(self._latencies)
        return self._served

    def stop(self) -> None:
        self._stopping = True
        self._parked.wait(timeout=STEP_TIMEOUT)


class Web:
    """One web process: every library, its readers, and what the parent asks of them."""

    def __init__(
        self,
        *,
        index: int,
        url: str,
        namespace: str,
        broker_url: str,
        threads: int = 0,
        resolver_sleep: float = 0.05,
    ) -> None:
        # The resolver module reads these (as the worker does from the environment it gets).
        os.environ["OQRON_REDIS_URL"] = url
        os.environ["OQRON_NAMESPACE"] = namespace
        os.environ["BENCH_RESOLVER_SLEEP"] = str(resolver_sleep)
        import redis

        self.index = index
        self.url = url
        self.namespace = namespace
        self.sleep = resolver_sleep
        self.threads = threads
        self.counter = redis.Redis.from_url(url)
        self.callers = Callers(threads) if threads else None
        self._armed: Callable[[], Served] | None = None
        self._floor_lock = threading.Lock()
        self._floor: dict[str, Any] = {}
        self._setup_oqron(broker_url)
        self.bare = BareRefresh(self.app, url, namespace, REFRESH_QUEUE)
        self._setup_dogpile()
        self._setup_cashews()

    # ------------------------------------------------------------------ libraries

    def _setup_oqron(self, broker_url: str) -> None:
        from celery import Celery

        import oqron_cache

        from .refresh_caches import bench_cache

        app = Celery(f"bench-web-{self.index}", broker=broker_url)
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_serializer="json",
            result_accept_content=["json"],
            task_ignore_result=True,
            broker_connection_retry_on_startup=True,
        )
        oqron_cache.configure(redis_url=self.url, celery_app=app, namespace=self.namespace)
        self.app = app
        self.oqron = bench_cache

    def _resolve(self, key: str) -> dict[str, Any]:
        gen = as_int(self.counter.incr(counter_key(self.namespace, key)))
        time.sleep(self.sleep)
        return make_value(key, gen)

    def _setup_dogpile(self) -> None:
        from dogpile.cache import make_region

        def runner(region: Any, key: str, creator: Callable[[], Any], mutex: Any) -> None:
            # dogpile's documented async_creation_runner: recompute in a new thread.
            def work() -> None:
                try:
                    region.set(key, creator())
                finally:
                    mutex.release()

            threading.Thread(target=work, daemon=True).start()

        namespace = self.namespace
        self.region = make_region(
            async_creation_runner=runner, key_mangler=lambda k: f"{namespace}:dogpile:{k}"
        ).configure(
            "dogpile.cache.redis",
            expiration_time=TTL,
            arguments={
                "url": self.url,
                "redis_expiration_time": 3600,
                "distributed_lock": True,
                "thread_local_lock": False,  # the runner thread releases the lock
                "lock_timeout": 5,
            },
        )

    def _setup_cashews(self) -> None:
        import redis.asyncio
        from cashews import Cache

        self.loop = asyncio.new_event_loop()
        self.cashews = Cache()
        self.cashews.setup(self.url)
        acounter = redis.asyncio.Redis.from_url(self.url)
        self.acounter = acounter
        namespace, sleep = self.namespace, self.sleep

        @self.cashews.early(ttl="1h", early_ttl=TTL, key=f"{namespace}:cashews:{{key}}")
        async def fetch(key: str) -> dict[str, Any]:
            gen = int(await acounter.incr(counter_key(namespace, key)))
            await asyncio.sleep(sleep)
            return make_value(key, gen)

        self.cashews_fetch = fetch
        self.loop.run_until_complete(self.cashews.init())

    def read(self, library: str, key: str) -> Any:
        """One read of ``key`` (cashews: from outside its loop)."""
        if library == "oqron":
            return self.oqron.get(key)
        if library == "dogpile":
            return self.region.get_or_create(key, lambda: self._resolve(key))
        if library == "cashews":
            return self.loop.run_until_complete(self.cashews_fetch(key))
        if library == "floor":
            with self._floor_lock:
                return self._floor[key]
        if library == "celery":
            return self.bare.read(key)
        raise ValueError(f"unknown library {library!r}")

    # ------------------------------------------------------------------ steps

    def prefill(self, library: str, keys: list[str]) -> dict[str, int]:
        """Write the first generation of ``keys`` (one process does it); return their gens."""
        if library == "oqron":
            for key in keys:
                self.oqron.set(key, make_value(key, 0))
            return dict.fromkeys(keys, 0)
        if library == "dogpile":
            for key in keys:
                self.region.set(key, make_value(key, 0))
            return dict.fromkeys(keys, 0)
        if library == "cashews":  # no set() for early(): compute them, all at once

            async def fill() -> list[Any]:
                return list(await asyncio.gather(*(self.cashews_fetch(k) for k in keys)))

            values = self.loop.run_until_complete(fill())
            return {v["key"]: v["gen"] for v in values}
        if library == "celery":
            return self.bare.prefill(keys)
        raise ValueError(f"unknown library {library!r}")

    def warm(self, library: str, keys: list[str], gens: dict[str, int]) -> int:
        """Read every key once while it is fresh (oqron: into L1); return how many were wrong."""
        if library == "floor":
            with self._floor_lock:
                self._floor.update({k: make_value(k, gens[k]) for k in keys})
            return 0
        if library == "celery":
            return self.bare.warm(keys, gens)
        wrong = 0
        for key in keys:
            if self.read(library, key) != make_value(key, gens[key]):
                wrong += 1
        return wrong

    def arm(self, library: str, key: str, old_gen: int) -> None:
        """Get this process's callers ready to read ``key`` (stale) at once."""
        if library == "cashews":
            self._armed = lambda: self.loop.run_until_complete(self._cashews_run(key, old_gen))
            return
        assert self.callers is not None
        self.callers.park(lambda: self.read(library, key), key, old_gen)
        self._armed = self.callers.release

    def fire(self) -> Served:
        """Release the armed callers; return what they were served."""
        assert self._armed is not None
        armed, self._armed = self._armed, None
        return armed()

    async def _cashews_run(self, key: str, old_gen: int) -> Served:
        served = Served()

        async def caller() -> None:
            started = time.perf_counter_ns()
            try:
                value = await self.cashews_fetch(key)
            except Exception as exc:
                served.latencies_ns.append(time.perf_counter_ns() - started)
                served.failed(f"{type(exc).__name__}: {exc}")
                return
            served.latencies_ns.append(time.perf_counter_ns() - started)
            served.judge(value, key, old_gen)

        await asyncio.gather(*(caller() for _ in range(self.threads)))
        return served

    def watch(self, library: str, key: str, old_gen: int, timeout: float) -> dict[str, int]:
        """Read ``key`` every POLL s until a newer generation shows.

        Returns monotonic ns (CLOCK_MONOTONIC is system-wide, so the parent can compare
        processes): ``first`` when this process's first read began, ``visible`` when the read
        that returned a newer value ended (0: not within ``timeout``); ``first_wall`` is
        ``first`` on the wall clock (ns, to line up with the worker's log); ``reads``.
        """
        if library == "cashews":
            return self.loop.run_until_complete(self._watch_async(key, old_gen, timeout))
        clock = time.monotonic_ns
        first_wall, first = time.time_ns(), clock()
        deadline = first + int(timeout * 1e9)
        reads = 0
        while True:
            value = self.read(library, key)
            reads += 1
            now = clock()
            if isinstance(value, dict) and value.get("gen", old_gen) > old_gen:
                return {"first": first, "visible": now, "first_wall": first_wall, "reads": reads}
            if now > deadline:
                return {"first": first, "visible": 0, "first_wall": first_wall, "reads": reads}
            time.sleep(POLL)

    async def _watch_async(self, key: str, old_gen: int, timeout: float) -> dict[str, int]:
        clock = time.monotonic_ns
        first_wall, first = time.time_ns(), clock()
        deadline = first + int(timeout * 1e9)
        reads = 0
        while True:
            value = await self.cashews_fetch(key)
            reads += 1
            now = clock()
            if isinstance(value, dict) and value.get("gen", old_gen) > old_gen:
                return {"first": first, "visible": now, "first_wall": first_wall, "reads": reads}
            if now > deadline:
                return {"first": first, "visible": 0, "first_wall": first_wall, "reads": reads}
            await asyncio.sleep(POLL)

    def close(self) -> None:
        import oqron_cache

        if self.callers is not None:
            self.callers.stop()
        self.bare.close()
        oqron_cache.reset()

        async def drain() -> None:  # cashews' background tasks (recomputes, lock deletes)
            me = asyncio.current_task()
            pending = asyncio.all_tasks() - {me}
            if pending:
                await asyncio.wait(pending, timeout=5)

        self.loop.run_until_complete(drain())
        self.loop.run_until_complete(self.cashews.close())
        self.loop.run_until_complete(self.acounter.aclose())
        self.loop.close()
        self.counter.close()
