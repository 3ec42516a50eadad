"""Refresh-trigger cost: what a read that finds a stale value costs its caller, vs a plain hit.

A stale-while-revalidate cache returns the stale value at once and hands the refresh to something
in the background. Its caller pays for noticing and for handing over. Measured on the same tier
as the plain hit it is compared with, in the same run, interleaved:

* **oqron-cache** -- in-process tier: ``cache.get(key)`` on ``[MemoryTier, RedisTier]``, served
  from L1; Redis tier: ``tiers=[RedisTier]`` (no L1), served by one GET.
* **dogpile.cache** with an ``async_creation_runner`` that starts a thread (the documented
  pattern), on the memory backend and on ``dogpile.cache.redis`` with ``distributed_lock=True``.
* **cashews** ``@cache.early(ttl=..., early_ttl=...)`` (async), on ``mem://`` and on Redis.

Five reads per library and tier:

* *fresh hit, one key*: the plain hit, the same key over and over (hot in the CPU's caches);
* *fresh hit, distinct keys*: the plain hit, each read a key not read before: what a first
  stale read is compared with like for like (it, too, reads a key for the first time);
* *first stale read, refresh deferred*: a key nobody has read since it went stale, so the read
  hands a refresh over (oqron: submit to the dispatcher; dogpile: take the key's mutex, read
  again, start the runner thread; cashews: SET NX the early lock, ``create_task``). The
  background work itself is held back until the timed loop is over (oqron: both dispatcher
  threads are busy with a refresh waiting on a gate; dogpile: the runner threads wait on a
  gate; cashews: the recompute waits on an ``asyncio.Event``): the caller's own part;
* *first stale read, refresh concurrent*: the same, with the refreshes running while the loop
  goes on, competing with it for the GIL, the CPU and Redis. oqron runs without a Celery app
  here, so its dispatcher threads run the refresh themselves (resolver and writes): the most a
  refresh can cost the process; with Celery they only take the lock and publish the task;
* *repeated stale read*: a key whose refresh is under way (oqron: served from the L1 hit path,
  since this process already requested the refresh, or else merged by the dispatcher's per-key
  throttle; dogpile: the key's mutex is held; cashews: the early lock is held).

A repetition times a loop of ``inner`` reads; before each loop every background refresh of the
previous one has finished (untimed), so oqron's dispatcher threads are idle and the loop's first
submit wakes one. Issue 3's target: oqron's first stale read (the caller's part) costs at most
1.5x its fresh hit on the same tier; checked against both fresh hits. Ratios are medians of
per-repetition ratios (see :func:`_ratio`).

Run: ``.venv/bin/python -m bench.refresh_trigger`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections.abc import Callable
from statistics import median
from typing import Any

from cashews import Cache as CashewsCache
from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.config import current_runtime

from .common import (
    Check,
    OneRep,
    Report,
    Timing,
    bench_namespace,
    markdown_table,
    measure_each,
    print_table,
    redis_url,
    sample_value,
    timed_loop,
    update_section,
)

TARGET_RATIO = 1.5
STALE_AFTER = 1.0  # seconds: the freshness of the "stale" caches' values
FRESH_TTL = 600
HOLD = "hold-r"  # the key of the "repeated stale read" cases
DRAINERS = 2  # oqron's dispatcher threads (refresh.Dispatcher's default)
TIERS = ("in-process", "Redis")
FRESH = "fresh hit, one key"
COLD = "fresh hit, distinct keys"
DEFERRED = "first stale read, refresh deferred"
CONCURRENT = "first stale read, refresh concurrent"
REPEATED = "repeated stale read"
READS = (FRESH, COLD, DEFERRED, CONCURRENT, REPEATED)
LIBRARIES = ("oqron", "dogpile.cache", "cashews")

Settle = Callable[[], None]


def case_name(library: str, tier: str, read: str) -> str:
    return f"{library} | {tier} | {read}"


class Keys:
    """Distinct keys ``<prefix>0, <prefix>1, ...``, each read once after it went stale."""

    def __init__(self, prefix: str, count: int) -> None:
        self.names = [f"{prefix}{i}" for i in range(count)]
        self.used = 0

    def take(self, n: int) -> list[str]:
        """The next ``n`` keys nobody has read since they went stale."""
        batch = self.names[self.used : self.used + n]
        if len(batch) != n:
            raise RuntimeError("out of prepared stale keys")
        self.used += n
        return batch


def _calls(fn: Callable[[str], object], keys: list[str]) -> Callable[[], None]:
    """The timed loop: ``fn(key)`` for each of ``keys``."""

    def loop() -> None:
        for key in keys:
            fn(key)

    return loop


def _nothing(_key: str) -> None:
    return None


# ---------------------------------------------------------------------------------- oqron


class Oqron:
    """oqron-cache: a fresh and a stale cache per tier; checks its stats afterwards."""

    def __init__(self, namespace: str, count: int) -> None:
        self.gate = threading.Event()  # closed only while a deferred loop runs
        self.gate.set()
        self.entered = threading.Semaphore(0)

        def resolve(key: str) -> dict[str, object]:
            if key == HOLD:  # its refresh fails: the stale value stays, the key is throttled
                raise RuntimeError("the hold key is never refreshed")
            if key.startswith("b"):  # a blocker: keeps a dispatcher thread busy
                self.entered.release()
                self.gate.wait(60)
            return sample_value(key)

        # lock_ttl bounds the throttle of the hold key's failed refresh: longer than a run.
        stampede = Stampede(enabled=True, lock_ttl="10m", stale_while_revalidate=True)

        def make(tier: str, ttl: float) -> oqron_cache.Cache[Any]:
            tiers: list[MemoryTier | RedisTier] = [RedisTier(ttl=ttl)]
            if tier == "in-process":
                tiers.insert(0, MemoryTier(max_size=3 * count + 100, ttl=ttl))
            label = "fresh" if ttl == FRESH_TTL else "stale"
            return oqron_cache.cache(
                f"{namespace}-trigger-{'l1' if tier == 'in-process' else 'l2'}-{label}",
                tiers=tiers,
                stale_ttl="1h",
                stampede=stampede,
                resolver=resolve,
            )

        self.fresh = {tier: make(tier, FRESH_TTL) for tier in TIERS}
        self.stale = {tier: make(tier, STALE_AFTER) for tier in TIERS}
        self.keys = {(tier, v): Keys(v[0], count) for tier in TIERS for v in ("d", "c")}
        self.cold = {tier: Keys("f", count) for tier in TIERS}  # the distinct-key fresh hits
        # Blockers live in the in-process stale cache (the dispatcher serves every cache).
        self.blockers = Keys("b", count // 2)
        self.dispatcher = current_runtime().dispatcher

    def prefill_fresh(self) -> None:
        for tier in TIERS:
            for key in ["k", *self.cold[tier].names]:
                self.fresh[tier].set(key, sample_value(key))

    def prefill_stale(self) -> None:
        for tier in TIERS:
            cache = self.stale[tier]
            names = [HOLD, *self.keys[(tier, "d")].names, *self.keys[(tier, "c")].names]
            if tier == "in-process":
                names += self.blockers.names
            for key in names:
                cache.set(key, sample_value(key))

    def hold(self) -> None:
        """First stale read of the hold key: its refresh fails, later reads are throttled."""
        for tier in TIERS:
            self.stale[tier].get(HOLD)
        self.settle()
        self.before = {tier: self.stale[tier].get_stats(local=True) for tier in TIERS}

    def settle(self) -> None:
        """Open the gate and wait until the dispatcher is idle (every refresh done)."""
        self.gate.set()
        if not self.dispatcher.join(30):
            raise TimeoutError("oqron's dispatcher did not become idle in 30 s")

    def _defer(self) -> None:
        """Make both dispatcher threads busy with a blocked refresh (submits then queue)."""
        self.gate.clear()
        blocker = self.stale["in-process"].get
        for key in self.blockers.take(DRAINERS):
            blocker(key)
        for _ in range(DRAINERS):
            if not self.entered.acquire(timeout=10):
                raise RuntimeError(f"oqron's dispatcher has fewer than {DRAINERS} threads")

    def cases(self, tier: str, inner: int, settle: Settle) -> dict[str, OneRep]:
        fresh, stale = self.fresh[tier].get, self.stale[tier].get
        deferred, concurrent = self.keys[(tier, "d")], self.keys[(tier, "c")]

        def hit() -> Callable[[], object]:
            settle()
            return _calls(fresh, ["k"] * inner)

        def cold_hit() -> Callable[[], object]:
            settle()
            return _calls(fresh, self.cold[tier].take(inner))

        def first_deferred() -> Callable[[], object]:
            settle()
            self._defer()
            return _calls(stale, deferred.take(inner))

        def first_concurrent() -> Callable[[], object]:
            settle()
            return _calls(stale, concurrent.take(inner))

        def repeated() -> Callable[[], object]:
            settle()
            return _calls(stale, [HOLD] * inner)

        return {
            case_name("oqron", tier, FRESH): timed_loop(hit, inner),
            case_name("oqron", tier, COLD): timed_loop(cold_hit, inner),
            case_name("oqron", tier, DEFERRED): timed_loop(first_deferred, inner),
            case_name("oqron", tier, CONCURRENT): timed_loop(first_concurrent, inner),
            case_name("oqron", tier, REPEATED): timed_loop(repeated, inner),
        }

    def verify(self, repeated: int) -> list[str]:
        """Check from the stats that every timed stale read did what its row says."""
        self.settle()
        problems = []
        for tier in TIERS:
            before, after = self.before[tier], self.stale[tier].get_stats(local=True)
            firsts = self.keys[(tier, "d")].used + self.keys[(tier, "c")].used
            if tier == "in-process":
                firsts += self.blockers.used
            served = after["stale_served"] - before["stale_served"]
            submitted = after["refreshes_enqueued"] - before["refreshes_enqueued"]
            merged = after["refreshes_deduplicated"] - before["refreshes_deduplicated"]
            # A repeated read is served from the hit path (its refresh is already requested),
            # or merged by the dispatcher: never a second refresh.
            if (served, submitted) != (firsts + repeated, firsts) or merged > repeated:
                problems.append(
                    f"oqron {tier}: {served} stale served, {submitted} refreshes started, "
                    f"{merged} merged; expected {firsts + repeated}, {firsts}, <= {repeated}"
                )
            fresh = self.fresh[tier].get_stats(local=True)
            if fresh["stale_served"] or fresh["misses"] or fresh["refreshes_enqueued"]:
                problems.append(f"oqron {tier}: a fresh-hit read was not a fresh hit ({fresh})")
        return problems

    def close(self) -> None:
        self.gate.set()
        for cache in [*self.fresh.values(), *self.stale.values()]:
            cache.close()


# ---------------------------------------------------------------------------------- dogpile


class Dogpile:
    """dogpile.cache regions (memory, and redis with a distributed lock) + a thread runner."""

    def __init__(self, namespace: str, url: str, count: int) -> None:
        self.threads: list[threading.Thread] = []
        self.held: list[Any] = []  # mutexes of the hold key, released at close()
        self.runs = 0
        self.gate = threading.Event()  # closed only while a deferred loop runs
        self.gate.set()
        self.keys = {(tier, v): Keys(v[0], count) for tier in TIERS for v in ("d", "c")}
        self.cold = {tier: Keys("f", count) for tier in TIERS}  # the distinct-key fresh hits

        def runner(region: CacheRegion, key: str, creator: Callable[[], Any], mutex: Any) -> None:
            # dogpile's documented async_creation_runner: recompute in a new thread.
            if key == HOLD:
                self.held.append(mutex)  # never released while timing: the mutex stays held
                return
            self.runs += 1

            def work() -> None:
                try:
                    self.gate.wait(60)
                    region.set(key, creator())
                finally:
                    mutex.release()

            thread = threading.Thread(target=work, daemon=True)
            self.threads.append(thread)
            thread.start()

        def memory(expiration: float) -> CacheRegion:
            return make_region(async_creation_runner=runner).configure(
                "dogpile.cache.memory", expiration_time=expiration
            )

        def on_redis(expiration: float) -> CacheRegion:
            label = "fresh" if expiration == FRESH_TTL else "stale"
            return make_region(
                async_creation_runner=runner,
                key_mangler=lambda k: f"{namespace}:dogpile-{label}:{k}",
            ).configure(
                "dogpile.cache.redis",
                expiration_time=expiration,
                arguments={
                    "url": url,
                    "redis_expiration_time": 3600,
                    "distributed_lock": True,
                    "thread_local_lock": False,  # the runner thread releases the lock
                    "lock_timeout": 600,
                },
            )

        self.fresh = {"in-process": memory(FRESH_TTL), "Redis": on_redis(FRESH_TTL)}
        self.stale = {"in-process": memory(STALE_AFTER), "Redis": on_redis(STALE_AFTER)}

    def prefill_fresh(self) -> None:
        for tier in TIERS:
            for key in ["k", *self.cold[tier].names]:
                self.fresh[tier].set(key, sample_value(key))

    def prefill_stale(self) -> None:
        for tier in TIERS:
            names = [HOLD, *self.keys[(tier, "d")].names, *self.keys[(tier, "c")].names]
            for key in names:
                self.stale[tier].set(key, sample_value(key))

    def hold(self) -> None:
        for tier in TIERS:
            self.stale[tier].get_or_create(HOLD, lambda: sample_value(HOLD))
        if len(self.held) != len(TIERS):
            raise AssertionError("dogpile's runner was not called for the hold keys")

    def settle(self) -> None:
        """Open the gate and wait until every runner thread has finished."""
        self.gate.set()
        while self.threads:
            self.threads.pop().join(30)

    def cases(self, tier: str, inner: int, settle: Settle) -> dict[str, OneRep]:
        fresh, stale = self.fresh[tier], self.stale[tier]
        deferred, concurrent = self.keys[(tier, "d")], self.keys[(tier, "c")]

        def creator() -> dict[str, object]:
            return sample_value("k")

        def fresh_get(key: str) -> object:
            return fresh.get_or_create(key, creator)

        def stale_get(key: str) -> object:
            return stale.get_or_create(key, creator)

        def hit() -> Callable[[], object]:
            settle()
            return _calls(fresh_get, ["k"] * inner)

        def cold_hit() -> Callable[[], object]:
            settle()
            return _calls(fresh_get, self.cold[tier].take(inner))

        def first_deferred() -> Callable[[], object]:
            settle()
            self.gate.clear()
            return _calls(stale_get, deferred.take(inner))

        def first_concurrent() -> Callable[[], object]:
            settle()
            return _calls(stale_get, concurrent.take(inner))

        def repeated() -> Callable[[], object]:
            settle()
            return _calls(stale_get, [HOLD] * inner)

        return {
            case_name("dogpile.cache", tier, FRESH): timed_loop(hit, inner),
            case_name("dogpile.cache", tier, COLD): timed_loop(cold_hit, inner),
            case_name("dogpile.cache", tier, DEFERRED): timed_loop(first_deferred, inner),
            case_name("dogpile.cache", tier, CONCURRENT): timed_loop(first_concurrent, inner),
            case_name("dogpile.cache", tier, REPEATED): timed_loop(repeated, inner),
        }

    def verify(self) -> list[str]:
        self.settle()
        firsts = sum(k.used for k in self.keys.values())
        if self.runs != firsts:
            return [f"dogpile: {self.runs} runner threads for {firsts} first stale reads"]
        return []

    def close(self) -> None:
        self.settle()
        for mutex in self.held:
            mutex.release()
        self.stale["Redis"].backend.writer_client.close()
        self.fresh["Redis"].backend.writer_client.close()


# ---------------------------------------------------------------------------------- cashews


class Cashews:
    """cashews ``@cache.early`` on mem:// and on Redis, driven from one asyncio loop."""

    def __init__(self, namespace: str, url: str, count: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.namespace = namespace
        self.keys = {(tier, v): Keys(v[0], count) for tier in TIERS for v in ("d", "c")}
        self.cold = {tier: Keys("f", count) for tier in TIERS}  # the distinct-key fresh hits
        self.computed = dict.fromkeys(TIERS, 0)
        self.resident: set[asyncio.Task[Any]] = set()
        self.gate = asyncio.Event()  # closed only while a deferred loop runs
        self.gate.set()
        self.backends = {"in-process": CashewsCache(), "Redis": CashewsCache()}
        # Room for every key; no expiry sweeper (it wakes every second, walks every key, and
        # would run inside the timed Redis loops, which share this event loop).
        self.backends["in-process"].setup("mem://", size=10 * count, check_interval=0)
        self.backends["Redis"].setup(url)
        self.fns: dict[tuple[str, str], Callable[[str], Any]] = {}
        for tier, backend in self.backends.items():
            for label, early_ttl in (("fresh", FRESH_TTL), ("stale", STALE_AFTER)):
                self.fns[(tier, label)] = self._make(backend, tier, label, early_ttl)
        for backend in self.backends.values():
            self.loop.run_until_complete(backend.init())

    def _make(
        self, backend: CashewsCache, tier: str, label: str, early_ttl: float
    ) -> Callable[[str], Any]:
        namespace = self.namespace
        gate = self.gate

        @backend.early(ttl="1h", early_ttl=early_ttl, key=f"{namespace}:early-{label}:{{key}}")
        async def fetch(key: str) -> dict[str, object]:
            self.computed[tier] += 1
            if not gate.is_set():
                await gate.wait()
            return sample_value(key)

        return fetch

    def settle(self) -> None:
        """Open the gate; run the loop until every background task is done."""

        async def drain() -> None:
            self.gate.set()
            me = asyncio.current_task()
            while pending := asyncio.all_tasks() - self.resident - {me}:
                await asyncio.wait(pending)

        self.loop.run_until_complete(drain())

    def prefill_fresh(self) -> None:
        async def fill() -> None:
            for tier in TIERS:
                for key in ["k", *self.cold[tier].names]:
                    await self.fns[(tier, "fresh")](key)

        self.loop.run_until_complete(fill())

    def prefill_stale(self) -> None:
        async def fill() -> None:
            for tier in TIERS:
                fetch = self.fns[(tier, "stale")]
                for key in [HOLD, *self.keys[(tier, "d")].names, *self.keys[(tier, "c")].names]:
                    await fetch(key)

        self.loop.run_until_complete(fill())

    def hold(self) -> None:
        """Take the early lock of the hold key (as a recompute in progress elsewhere would)."""

        async def take() -> None:
            for backend in self.backends.values():
                found = [k async for k in backend.scan(f"*{self.namespace}:early-stale:{HOLD}")]
                if len(found) != 1:
                    raise AssertionError(f"cashews: hold key not found ({found})")
                # cashews' early() locks "<cache key>:lock" with SET NX before recomputing.
                if not await backend.set(f"{found[0]}:lock", "1", expire=600, exist=False):
                    raise AssertionError("cashews: the hold key's early lock was taken")

        self.loop.run_until_complete(take())
        self.before = dict(self.computed)
        # Tasks the backends keep running are not background work of a read: settle() does
        # not wait for them.
        self.resident = asyncio.all_tasks(self.loop)

    def cases(self, tier: str, inner: int, settle: Settle) -> dict[str, OneRep]:
        fresh, stale = self.fns[(tier, "fresh")], self.fns[(tier, "stale")]
        deferred, concurrent = self.keys[(tier, "d")], self.keys[(tier, "c")]
        clock = time.perf_counter_ns
        loop = self.loop

        async def timed(fn: Callable[[str], Any], batch: list[str]) -> float:
            # Timed inside the loop: run_until_complete's own cost stays out.
            start = clock()
            for key in batch:
                await fn(key)
            return (clock() - start) / len(batch)

        def hit() -> float:
            settle()
            return loop.run_until_complete(timed(fresh, ["k"] * inner))

        def cold_hit() -> float:
            settle()
            return loop.run_until_complete(timed(fresh, self.cold[tier].take(inner)))

        def first_deferred() -> float:
            settle()
            self.gate.clear()
            return loop.run_until_complete(timed(stale, deferred.take(inner)))

        def first_concurrent() -> float:
            settle()
            return loop.run_until_complete(timed(stale, concurrent.take(inner)))

        def repeated() -> float:
            settle()
            return loop.run_until_complete(timed(stale, [HOLD] * inner))

        return {
            case_name("cashews", tier, FRESH): hit,
            case_name("cashews", tier, COLD): cold_hit,
            case_name("cashews", tier, DEFERRED): first_deferred,
            case_name("cashews", tier, CONCURRENT): first_concurrent,
            case_name("cashews", tier, REPEATED): repeated,
        }

    def verify(self) -> list[str]:
        self.settle()
        problems = []
        for tier in TIERS:
            done = self.computed[tier] - self.before[tier]
            firsts = self.keys[(tier, "d")].used + self.keys[(tier, "c")].used
            if done != firsts:
                problems.append(f"cashews {tier}: {done} recomputes for {firsts} first reads")
        return problems

    def close(self) -> None:
        self.settle()
        for backend in self.backends.values():
            self.loop.run_until_complete(backend.close())
        self.loop.close()


# ---------------------------------------------------------------------------------- run


def run(url: str | None = None, *, reps: int = 200, warmup: int = 10, inner: int = 20) -> Report:
    """Measure every case ``reps`` times (loops of ``inner`` reads, interleaved)."""
    url = url or redis_url()
    count = (reps + warmup) * inner
    quiet = logging.getLogger("oqron_cache")
    saved_level = quiet.level
    quiet.setLevel(logging.ERROR)  # the hold keys' failed refreshes log a warning each
    with bench_namespace(url) as (_client, namespace):
        oqron_cache.configure(redis_url=url, namespace=namespace)
        oq = Oqron(namespace, count)
        dp = Dogpile(namespace, url, count)
        cs = Cashews(namespace, url, count)
        sides = (oq, dp, cs)
        try:
            for side in sides:
                side.prefill_fresh()
            started = time.monotonic()
            for side in sides:
                side.prefill_stale()
            prepared = time.monotonic() - started
            time.sleep(STALE_AFTER + 0.2)  # the last "stale" value written is now stale
            for side in sides:
                side.hold()

            def settle() -> None:  # before every timed loop: no background work left
                for side in sides:
                    side.settle()

            empty = timed_loop(lambda: _calls(_nothing, ["k"] * inner), inner)
            cases: dict[str, OneRep] = {"empty": empty}
            for tier in TIERS:
                for side in sides:
                    cases.update(side.cases(tier, inner, settle))
            started = time.monotonic()
            timings = measure_each(cases, reps=reps, warmup=warmup)
            took = time.monotonic() - started
            problems = oq.verify((reps + warmup) * inner) + dp.verify() + cs.verify()
        finally:
            for side in sides:
                side.close()
            oqron_cache.reset()
            quiet.setLevel(saved_level)
    if problems:
        raise AssertionError("a timed read did not do what its row says: " + "; ".join(problems))
    print(f"  prepared the stale keys in {prepared:.1f} s, measured in {took:.1f} s")
    return report(timings, reps, warmup, inner)


def _ratio(timings: dict[str, Timing], name: str, base: str) -> float:
    """The median over repetitions of ``name``'s time / ``base``'s time in the same repetition.

    Both ran in every repetition (in a random order): pairing them cancels the machine's drift
    from one repetition to the next, which on a shared VM is larger than the effect measured.
    """
    pairs = zip(timings[name].per_op_ns, timings[base].per_op_ns, strict=True)
    return median(a / b for a, b in pairs)


def report(timings: dict[str, Timing], reps: int, warmup: int, inner: int) -> Report:
    headers = [
        "library",
        "tier",
        "read",
        "median us/read",
        "p99 us/read",
        "x fresh hit, one key",
        "x fresh hit, distinct keys",
    ]
    empty = timings["empty"]
    rows: list[tuple[str, ...]] = [
        (
            "(none)",
            "-",
            "empty loop",
            f"{empty.median_ns / 1000:.2f}",
            f"{empty.p99_ns / 1000:.2f}",
            "",
            "",
        )
    ]
    for tier in TIERS:
        for library in LIBRARIES:
            base = case_name(library, tier, FRESH)
            cold = case_name(library, tier, COLD)
            for read in READS:
                name = case_name(library, tier, read)
                t = timings[name]
                rows.append(
                    (
                        library,
                        tier,
                        read,
                        f"{t.median_ns / 1000:.2f}",
                        f"{t.p99_ns / 1000:.2f}",
                        f"{_ratio(timings, name, base):.2f}",
                        f"{_ratio(timings, name, cold):.2f}",
                    )
                )
    print_table("Refresh-trigger cost", headers, rows)
    checks = []
    for tier, label in (("in-process", "L1"), ("Redis", "L2")):
        name = case_name("oqron", tier, DEFERRED)
        for read, which in ((COLD, "on distinct keys"), (FRESH, "on one key")):
            base = case_name("oqron", tier, read)
            ratio = _ratio(timings, name, base)
            checks.append(
                Check(
                    f"oqron {label}: a stale read that submits a refresh <= {TARGET_RATIO}x "
                    f"an {label} fresh hit {which}",
                    f"{ratio:.2f}x ({timings[name].median_ns / 1000:.2f} vs "
                    f"{timings[base].median_ns / 1000:.2f} us)",
                    ratio <= TARGET_RATIO,
                )
            )
    concurrent = {
        tier: _ratio(timings, case_name("oqron", tier, CONCURRENT), case_name("oqron", tier, FRESH))
        for tier in TIERS
    }
    body = "\n".join(
        [
            f"{reps} repetitions per case (after {warmup} warm-up ones), interleaved; a "
            f"repetition times a loop of {inner} reads and divides (median and p99 over "
            "repetitions, microseconds per read, the loop's own cost included: first row). "
            "*in-process*: oqron L1 (`[MemoryTier, RedisTier]`), dogpile's memory backend, "
            "cashews `mem://`. *Redis*: oqron `tiers=[RedisTier]`, `dogpile.cache.redis` "
            "(`distributed_lock=True`), cashews on Redis.",
            "",
            "- *fresh hit, one key*: the same key every read, hot in the CPU's caches. "
            "*distinct keys*: each read a key not read before, as every first stale read is; "
            "the difference between the two is the memory a cold key costs, not the cache.",
            "- *first stale read*: a key nobody has read since it went stale, so each read "
            "hands a refresh over (oqron: submit to the dispatcher; dogpile: take the key's "
            "mutex, read again, start the runner thread; cashews: SET NX the early lock, "
            "`create_task`). Before each loop the previous loop's background work has "
            "finished (untimed): oqron's dispatcher is idle and the loop's first submit wakes "
            "one of its threads.",
            "- *refresh deferred*: the background work waits (on a gate) until the loop is "
            "over: the caller's own part. *refresh concurrent*: it runs during the loop and "
            "competes with it for the GIL, the CPU and Redis. oqron runs without a Celery app "
            "here, so its dispatcher threads run the whole refresh (resolver and writes, ~4 "
            "Redis round trips per key): the most a refresh can cost the process; with Celery "
            "they take the lock and publish the task.",
            "- *repeated stale read*: a key whose refresh is under way (oqron: served from the "
            "L1 hit path, its refresh being already requested, or merged by the dispatcher's "
            "per-key throttle; dogpile: its mutex held; cashews: its early lock held).",
            "",
            "Checked afterwards from the stats: every timed oqron stale read was served stale, "
            "each first one started exactly one refresh, no repeated one started another; "
            "dogpile started one runner thread and cashews one recompute per first read.",
            "",
            markdown_table(headers, rows),
            "",
            "Ratios: the median over repetitions of the two cases' times in the same "
            "repetition (pairing cancels the shared machine's drift). Target on the caller's "
            "part (*refresh deferred*), against both fresh hits. With the refreshes running "
            f"alongside, oqron's first stale reads cost {concurrent['in-process']:.2f}x (L1) "
            f"and {concurrent['Redis']:.2f}x (L2) its fresh hit on one key.",
        ]
    )
    return Report("refresh_trigger", "Refresh-trigger cost (stale read vs fresh hit)", body, checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--inner", type=int, default=20, help="reads per timed loop")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    report_ = run(url, reps=args.reps, warmup=args.warmup, inner=args.inner)
    if not args.no_write:
        update_section(report_, url)
    return 0 if all(c.passed for c in report_.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
