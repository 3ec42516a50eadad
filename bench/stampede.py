"""Cold-key stampede: 4 processes x 64 callers ask for the same missing key at once.

The resolver sleeps 50 ms (a slow database query) and counts its calls with a Redis ``INCR``, so
the count is exact across processes. Compared, each in its natural shape:

* oqron-cache: ``cache.get(key)`` with both tiers and a resolver, 64 threads per process;
* dogpile.cache: ``dogpile.cache.redis`` with ``distributed_lock=True`` (its defaults otherwise:
  ``lock_sleep=0.1``), ``region.get_or_create(key, creator)``, 64 threads per process;
* cashews: ``cache.setup("redis://...")`` and ``@cache(ttl=..., lock=True)``; cashews is
  async-only, so each process runs one asyncio loop with 64 tasks.
* oqron-async: the async front, ``await cache.aget(key)`` from 64 tasks on one asyncio loop
  per process (an async resolver), beside cashews (also 64 tasks per process);
* floor-async (context, not a peer): those 64 tasks around an in-process single-flight of a
  few lines (one ``asyncio.Event`` per key, no Redis): its resolver runs once per process.
* floor (context, not a peer): the same threads around a ten-line in-process single-flight (one
  ``threading.Event`` per key, no Redis), so its resolver runs once per *process* (4 calls). What
  its callers see above 50 ms is what waking 64 threads per process costs on this machine: no
  threaded library can beat it.

Caller threads are long-lived (a service's thread pool): created once per process and reused, so
thread start and exit never fall inside a measured run.

Each run uses a fresh key; every library gets one warm-up run (connections, lazy imports), then
``--runs`` timed runs, interleaved across libraries. Reported per library: resolver calls of each
run, the medians over runs of the callers' p50 and p99 latency, and errors (exceptions, or a value
that is not the resolver's). Keys live under a ``bench-<8 hex>`` namespace, removed afterwards
with SCAN + UNLINK.

Issue 2's targets for oqron: exactly 1 resolver call, p50 <= 55 ms, p99 <= 75 ms, zero errors.

Run: ``.venv/bin/python -m bench.stampede`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from oqron_cache.redis.replies import as_bytes

from .common import (
    Check,
    Report,
    bench_namespace,
    markdown_table,
    median,
    percentile,
    print_table,
    redis_url,
    sample_value,
    update_section,
)

LIBRARIES = ("floor", "oqron", "dogpile", "cashews", "floor-async", "oqron-async")
TARGET_P50_MS = 55.0
TARGET_P99_MS = 75.0
STEP_TIMEOUT = 60.0  # seconds a worker may take to answer one step before the run is abandoned


def counter_key(namespace: str, key: str) -> str:
    """The Redis key counting resolver calls for ``key``."""
    return f"{namespace}:calls:{key}"


# ---------------------------------------------------------------------------------- worker side


@dataclass
class Outcome:
    """What one process's callers saw in one run."""

    latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    samples: list[str] = field(default_factory=list)  # a few error descriptions

    def failed(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 3:
            self.samples.append(what[:200])


class Callers:
    """``threads`` long-lived caller threads (a service's thread pool), reused run after run.

    Per run: :meth:`park` gives them the call and waits until all are parked; :meth:`go` releases
    them at once and waits until each has made its one call. Threads are created once, so neither
    their start nor their exit falls inside a measured run.
    """

    def __init__(self, threads: int) -> None:
        self._n = threads
        self._parked = threading.Barrier(threads + 1)
        self._finished = threading.Barrier(threads + 1)
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._call: Callable[[], Any] = lambda: None
        self._expected: Any = None
        self._latencies: list[int] = [0] * threads
        self._outcome = Outcome()
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
                value = self._call()
                problem = None if value == self._expected else f"wrong value {value!r}"
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self._latencies[index] = time.perf_counter_ns() - started
            if problem is not None:
                with self._lock:
                    self._outcome.failed(problem)
            self._finished.wait()

    def park(self, call: Callable[[], Any], expected: Any) -> Callable[[], Outcome]:
        """Arm the next run; return the function that releases it."""
        self._call, self._expected = call, expected
        self._go = threading.Event()
        self._outcome = Outcome()
        self._parked.wait(timeout=STEP_TIMEOUT)
        return self._release

    def _release(self) -> Outcome:
        self._go.set()
        self._finished.wait(timeout=STEP_TIMEOUT)
        self._outcome.latencies_ns = list(self._latencies)
        return self._outcome

    def stop(self) -> None:
        """Let the threads end (they are parked between runs)."""
        self._stopping = True
        self._parked.wait(timeout=STEP_TIMEOUT)


class Worker:
    """One benchmark process: every library set up once, then runs on command."""

    def __init__(self, url: str, namespace: str, threads: int, sleep: float) -> None:
        import redis

        self.url = url
        self.namespace = namespace
        self.threads = threads
        self.sleep = sleep
        self.counter = redis.Redis.from_url(url)
        self._floor_lock = threading.Lock()
        self._floor_flights: dict[str, tuple[threading.Event, list[Any]]] = {}
        self.callers = Callers(threads)
        self._setup_oqron()
        self._setup_dogpile()
        self._setup_cashews()

    def _resolve(self, key: str) -> dict[str, object]:
        self.counter.incr(counter_key(self.namespace, key))
        time.sleep(self.sleep)
        return sample_value(key)

    def _floor(self, key: str) -> Any:
        """The harness's floor: in-process single-flight in a few lines, no Redis, no library.

        One thread per process runs the resolver, the others wait on an Event; so the resolver
        runs once per *process*. What a caller sees above 50 ms here is the cost of waking 64
        threads on this machine, which every threaded library pays too.
        """
        with self._floor_lock:
            flight = self._floor_flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._floor_flights[key] = (threading.Event(), [])
        event, box = flight
        if leader:
            box.append(self._resolve(key))
            event.set()
        else:
            event.wait()
        return box[0]

    def _setup_oqron(self) -> None:
        import oqron_cache
        from oqron_cache import MemoryTier, RedisTier, Stampede

        oqron_cache.configure(redis_url=self.url, namespace=self.namespace)
        self.oqron = oqron_cache.cache(
            "stampede",
            tiers=[MemoryTier(max_size=1000, ttl="10m"), RedisTier(ttl="10m")],
            stampede=Stampede(enabled=True, lock_ttl="5s"),
            resolver=self._resolve,
        )

    def _setup_dogpile(self) -> None:
        from dogpile.cache import make_region

        namespace = self.namespace
        self.region = make_region(key_mangler=lambda k: f"{namespace}:dogpile:{k}").configure(
            "dogpile.cache.redis",
            expiration_time=600,
            arguments={
                "url": self.url,
                "redis_expiration_time": 660,
                "distributed_lock": True,
                "thread_local_lock": False,
                "lock_timeout": 5,
            },
        )

    def _setup_cashews(self) -> None:
        import redis.asyncio
        from cashews import Cache

        self.loop = asyncio.new_event_loop()
        self.cashews = Cache()
        self.cashews.setup(self.url)
        self.acounter = redis.asyncio.Redis.from_url(self.url)
        sleep = self.sleep
        namespace = self.namespace
        acounter = self.acounter

        @self.cashews(ttl="10m", key=f"{namespace}:cashews:{{key}}", lock=True)
        async def resolve(key: str) -> dict[str, object]:
            await acounter.incr(counter_key(namespace, key))
            await asyncio.sleep(sleep)
            return sample_value(key)

        self.cashews_resolve = resolve
        self.loop.run_until_complete(self.cashews.init())

        async def resolve_async(key: str) -> dict[str, object]:
            await acounter.incr(counter_key(namespace, key))
            await asyncio.sleep(sleep)
            return sample_value(key)

        import oqron_cache
        from oqron_cache import MemoryTier, RedisTier, Stampede

        self.oqron_async = oqron_cache.cache(
            "stampede-async",
            tiers=[MemoryTier(max_size=1000, ttl="10m"), RedisTier(ttl="10m")],
            stampede=Stampede(enabled=True, lock_ttl="5s"),
            resolver=resolve_async,
        )
        self.resolve_async = resolve_async
        self._async_flights: dict[str, tuple[asyncio.Event, list[Any]]] = {}

    def prepare(self, library: str, key: str) -> Callable[[], Outcome]:
        """Park this run's callers; return the function that releases them."""
        expected = sample_value(key)
        if library == "oqron":
            return self.callers.park(lambda: self.oqron.get(key), expected)
        if library == "floor":
            return self.callers.park(lambda: self._floor(key), expected)
        if library == "dogpile":
            return self.callers.park(
                lambda: self.region.get_or_create(key, lambda: self._resolve(key)), expected
            )
        if library == "cashews":
            return lambda: self.loop.run_until_complete(
                self._tasks_run(self.cashews_resolve, key, expected)
            )
        if library == "oqron-async":
            return lambda: self.loop.run_until_complete(
                self._tasks_run(self.oqron_async.aget, key, expected)
            )
        if library == "floor-async":
            return lambda: self.loop.run_until_complete(
                self._tasks_run(self._floor_async, key, expected)
            )
        raise ValueError(f"unknown library {library!r}")

    async def _floor_async(self, key: str) -> Any:
        """The async floor: in-process single-flight of 64 tasks, no Redis, no library."""
        flight = self._async_flights.get(key)
        if flight is None:
            flight = self._async_flights[key] = (asyncio.Event(), [])
            flight[1].append(await self.resolve_async(key))
            flight[0].set()
        else:
            await flight[0].wait()
        return flight[1][0]

    async def _tasks_run(self, call: Callable[[str], Any], key: str, expected: Any) -> Outcome:
        outcome = Outcome()

        async def caller() -> None:
            started = time.perf_counter_ns()
            try:
                value = await call(key)
                problem = None if value == expected else f"wrong value {value!r}"
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
            outcome.latencies_ns.append(time.perf_counter_ns() - started)
            if problem is not None:
                outcome.failed(problem)

        await asyncio.gather(*(caller() for _ in range(self.threads)))
        return outcome

    def close(self) -> None:
        import oqron_cache

        self.callers.stop()
        self.oqron.close()
        self.oqron_async.close()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())  # its pool, on its loop
        oqron_cache.reset()
        self.loop.run_until_complete(self.cashews.close())
        self.loop.run_until_complete(self.acounter.aclose())
        self.loop.close()


def worker_main(conn: Connection, url: str, namespace: str, threads: int, sleep: float) -> None:
    """Entry point of a benchmark process: set up, then obey the parent's messages."""
    worker = Worker(url, namespace, threads, sleep)
    conn.send(("up", os.getpid()))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, library, key = message
            release = worker.prepare(library, key)
            conn.send(("ready",))
            conn.recv()  # ("go",)
            conn.send(("done", release()))
    finally:
        worker.close()
        conn.close()


# ---------------------------------------------------------------------------------- parent side


@dataclass
class RunResult:
    """One run of one library across all processes."""

    resolver_calls: int
    latencies_ms: list[float]
    errors: int
    samples: list[str]

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 0.99)


def _expect(conn: Connection, what: str) -> Any:
    if not conn.poll(STEP_TIMEOUT):
        raise TimeoutError(f"a stampede worker did not answer {what!r} in {STEP_TIMEOUT:.0f} s")
    message = conn.recv()
    if message[0] != what:
        raise RuntimeError(f"a stampede worker sent {message[0]!r}, expected {what!r}")
    return message[1] if len(message) > 1 else None


class Pool:
    """The benchmark processes (spawned, so no library state is inherited from the parent)."""

    def __init__(self, url: str, namespace: str, processes: int, threads: int, sleep: float):
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(child, url, namespace, threads, sleep), daemon=True
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        for conn in self.conns:
            _expect(conn, "up")

    def run(self, library: str, key: str) -> list[Outcome]:
        for conn in self.conns:
            conn.send(("run", library, key))
        for conn in self.conns:
            _expect(conn, "ready")
        for conn in self.conns:  # back to back: the processes start within microseconds
            conn.send(("go",))
        return [_expect(conn, "done") for conn in self.conns]

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a worker that died already
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()  # only our own worker, by its handle
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()


def run(
    url: str | None = None,
    *,
    runs: int = 5,
    processes: int = 4,
    threads: int = 64,
    sleep: float = 0.05,
    libraries: tuple[str, ...] = LIBRARIES,
) -> Report:
    """Run the stampede ``runs`` times per library; return the report."""
    url = url or redis_url()
    results: dict[str, list[RunResult]] = {lib: [] for lib in libraries}
    with bench_namespace(url) as (client, namespace):
        pool = Pool(url, namespace, processes, threads, sleep)
        try:
            for library in libraries:
                pool.run(library, f"warm-{library}")
            for i in range(runs):
                for library in libraries:
                    key = f"{library}-{i}"
                    outcomes = pool.run(library, key)
                    count = int(as_bytes(client.get(counter_key(namespace, key))) or 0)
                    results[library].append(
                        RunResult(
                            count,
                            [ns / 1e6 for o in outcomes for ns in o.latencies_ns],
                            sum(o.errors for o in outcomes),
                            [s for o in outcomes for s in o.samples],
                        )
                    )
                    r = results[library][-1]
                    print(
                        f"  run {i + 1}/{runs} {library:8s} calls={r.resolver_calls} "
                        f"p50={r.p50:.1f}ms p99={r.p99:.1f}ms errors={r.errors}",
                        flush=True,
                    )
        finally:
            pool.close()

    headers = [
        "library",
        "resolver calls per run",
        "p50 ms (median of runs)",
        "p99 ms (median of runs)",
        "max ms (worst run)",
        "errors (all runs)",
    ]
    rows = []
    for library, rs in results.items():
        rows.append(
            (
                library,
                ", ".join(str(r.resolver_calls) for r in rs),
                f"{median([r.p50 for r in rs]):.1f}",
                f"{median([r.p99 for r in rs]):.1f}",
                f"{max(max(r.latencies_ms) for r in rs):.1f}",
                str(sum(r.errors for r in rs)),
            )
        )
    print_table("Cold-key stampede", headers, rows)
    notes = []
    for library, rs in results.items():
        samples = sorted({s for r in rs for s in r.samples})
        if samples:
            notes.append(f"- {library} errors, e.g.: " + "; ".join(samples[:3]))
    checks: list[Check] = []
    if "oqron" in results:
        rs = results["oqron"]
        calls = [r.resolver_calls for r in rs]
        p50 = median([r.p50 for r in rs])
        p99 = median([r.p99 for r in rs])
        errors = sum(r.errors for r in rs)
        checks = [
            Check(
                "stampede: exactly 1 resolver call per run",
                ", ".join(map(str, calls)),
                all(c == 1 for c in calls),
            ),
            Check(
                f"stampede: p50 <= {TARGET_P50_MS:.0f} ms", f"{p50:.1f} ms", p50 <= TARGET_P50_MS
            ),
            Check(
                f"stampede: p99 <= {TARGET_P99_MS:.0f} ms", f"{p99:.1f} ms", p99 <= TARGET_P99_MS
            ),
            Check("stampede: zero errors", str(errors), errors == 0),
        ]
    if "oqron-async" in results and "floor-async" in results:
        rs = results["oqron-async"]
        calls = [r.resolver_calls for r in rs]
        p50 = median([r.p50 for r in rs])
        floor = median([r.p50 for r in results["floor-async"]])
        checks += [
            Check(
                "async stampede: exactly 1 resolver call per run",
                ", ".join(map(str, calls)),
                all(c == 1 for c in calls),
            ),
            Check(
                "async stampede: p50 <= floor-async + 3 ms",
                f"{p50:.1f} ms (floor-async {floor:.1f} ms)",
                p50 <= floor + 3.0,
            ),
        ]
    body = "\n".join(
        [
            f"{processes} processes x {threads} callers, resolver sleeping {sleep * 1000:.0f} ms; "
            f"{runs} runs per library after one warm-up run each, interleaved; a fresh key per "
            "run. Latency is each caller's own (from its call to its return), over all "
            f"{processes * threads} callers of a run; p50 and p99 are the medians over runs. "
            "oqron and dogpile.cache use threads; cashews (async-only) uses one asyncio loop "
            f"with {threads} tasks per process. dogpile.cache runs with its default "
            "`lock_sleep=0.1` (its waiters poll the Redis lock every 100 ms); cashews' lock "
            "waiters poll with `check_interval=0` (its default). *floor* is no library: one "
            "in-process `threading.Event` per key and no Redis, so its resolver runs once per "
            "process; its latencies are what waking the threads costs on this machine. "
            "*oqron-async* is the async front (64 tasks per process, an async resolver), "
            "*floor-async* the same tasks around one `asyncio.Event` per key (no Redis).",
            "",
            markdown_table(headers, rows),
            *(["", *notes] if notes else []),
        ]
    )
    return Report("stampede", "Cold-key stampede", body, checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    report = run(
        url,
        runs=args.runs,
        processes=args.processes,
        threads=args.threads,
        libraries=tuple(args.libraries.split(",")),
    )
    if not args.no_write:
        update_section(report, url)
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
