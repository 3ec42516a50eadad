"""The async front's hit cost, beside the asyncio caches: L1 (in-process) and L2 (Redis) hits.

Every case runs on one event loop, interleaved one repetition at a time, each repetition a
batch of awaited calls timed together (``--inner`` for in-process hits, 1 for Redis hits):

* in-process hits: oqron ``await cache.aget("k")`` (L1 + Redis tiers, an L1 hit), cashews
  ``mem://`` ``await cache.get("k")``, aiocache ``SimpleMemoryCache.get`` (its default: no
  serializer); and the sync front's
  ``cache.get`` as the reference;
* Redis hits (L1 off): the floor (``redis.asyncio`` GET + ``json.loads``), oqron
  ``await cache.aget("k")`` on ``tiers=[RedisTier]``, cashews ``redis://`` and aiocache
  ``RedisCache`` (JSON serializer), each on its own pool of the same loop.

The value is the ~200-byte JSON dict of every benchmark. Medians and ratios; no target is
asserted (the issue asks for measurement): the table is written to ``bench/RESULTS.md``.

Run: ``.venv/bin/python -m bench.async_hit`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from aiocache import RedisCache, SimpleMemoryCache
from aiocache.serializers import JsonSerializer
from cashews import Cache as CashewsCache

import oqron_cache
from oqron_cache import MemoryTier, RedisTier

from .common import (
    Report,
    Timing,
    bench_namespace,
    markdown_table,
    print_table,
    redis_url,
    sample_value,
    update_section,
)

Batch = Callable[[int], Awaitable[None]]

L1_CASES = (
    "oqron await aget (L1 hit)",
    "oqron get (sync front, L1 hit)",
    "cashews mem:// await get",
    "aiocache SimpleMemoryCache await get",
)
L2_CASES = (
    "floor: redis.asyncio GET + json.loads",
    "oqron await aget (L2 only)",
    "cashews redis:// await get",
    "aiocache RedisCache await get",
)


async def _measure(
    cases: dict[str, Batch], inner: int, reps: int, warmup: int
) -> dict[str, Timing]:
    for _ in range(warmup):
        for batch in cases.values():
            await batch(inner)
    timings = {name: Timing(name) for name in cases}
    for _ in range(reps):
        for name, batch in cases.items():
            started = time.perf_counter_ns()
            await batch(inner)
            timings[name].per_op_ns.append((time.perf_counter_ns() - started) / inner)
    return timings


async def _run(url: str, namespace: str, inner: int, reps: int, warmup: int) -> dict[str, Any]:
    value = sample_value()
    payload = json.dumps(value, separators=(",", ":"))
    host = urlsplit(url)
    oqron_cache.configure(redis_url=url, namespace=namespace)
    both = oqron_cache.cache(
        f"{namespace}-l1", tiers=[MemoryTier(max_size=1000), RedisTier(ttl="10m")]
    )
    l2_only = oqron_cache.cache(f"{namespace}-l2", tiers=[RedisTier(ttl="10m")])
    cashews_mem = CashewsCache()
    cashews_mem.setup("mem://")
    cashews_redis = CashewsCache()
    cashews_redis.setup(url, client_side=False)
    ckey = f"{namespace}:cashews:k"  # in the namespace the run deletes afterwards
    aio_mem = SimpleMemoryCache()  # its default: values kept as they are
    aio_redis = RedisCache(
        serializer=JsonSerializer(),
        endpoint=host.hostname or "127.0.0.1",
        port=host.port or 6379,
        namespace=f"{namespace}:aiocache",
    )
    floor = aredis.Redis.from_url(url)
    floor_key = f"{namespace}:floor:k"
    try:
        await floor.set(floor_key, payload, ex=600)
        await both.aset("k", value)
        await l2_only.aset("k", value)
        await cashews_mem.set("k", value, expire=600)
        await cashews_redis.set(ckey, value, expire=600)
        await aio_mem.set("k", value, ttl=600)
        await aio_redis.set("k", value, ttl=600)
        aget, get, l2_aget = both.aget, both.get, l2_only.aget

        async def oqron_l1(n: int) -> None:
            for _ in range(n):
                await aget("k")

        async def oqron_sync(n: int) -> None:
            for _ in range(n):
                get("k")

        async def cashews_l1(n: int) -> None:
            for _ in range(n):
                await cashews_mem.get("k")

        async def aiocache_l1(n: int) -> None:
            for _ in range(n):
                await aio_mem.get("k")

        floor_get: Any = floor.get  # its reply type differs between redis-py 6 and 8

        async def floor_l2(n: int) -> None:
            for _ in range(n):
                json.loads(await floor_get(floor_key))

        async def oqron_l2(n: int) -> None:
            for _ in range(n):
                await l2_aget("k")

        async def cashews_l2(n: int) -> None:
            for _ in range(n):
                await cashews_redis.get(ckey)

        async def aiocache_l2(n: int) -> None:
            for _ in range(n):
                await aio_redis.get("k")

        for got in (
            await aget("k"), await l2_aget("k"), await cashews_mem.get("k"),
            await cashews_redis.get(ckey), await aio_mem.get("k"), await aio_redis.get("k"),
        ):  # fmt: skip
            if got != value:
                raise AssertionError(f"a case returned {got!r}, not the sample value")
        l1_loops: list[Batch] = [oqron_l1, oqron_sync, cashews_l1, aiocache_l1]
        l2_loops: list[Batch] = [floor_l2, oqron_l2, cashews_l2, aiocache_l2]
        l1_batches = dict(zip(L1_CASES, l1_loops, strict=True))
        l2_batches = dict(zip(L2_CASES, l2_loops, strict=True))
        before = l2_only.get_stats(local=True)["l2_hits"]
        l1 = await _measure(l1_batches, inner, reps, warmup)
        l2 = await _measure(l2_batches, 1, reps, warmup)
        served = l2_only.get_stats(local=True)["l2_hits"] - before
        if served != reps + warmup:
            raise AssertionError(f"expected {reps + warmup} L2 hits, got {served}")
        return {"l1": l1, "l2": l2}
    finally:
        await floor.aclose()
        await cashews_redis.close()
        await aio_redis.close()
        both.close()
        l2_only.close()
        oqron_cache.reset()


def run(url: str | None = None, *, inner: int = 100, reps: int = 2000, warmup: int = 100) -> Report:
    url = url or redis_url()
    with bench_namespace(url) as (_client, namespace):
        found = asyncio.run(_run(url, namespace, inner, reps, warmup))
    headers = ["case", "median ns/op", "p99 ns/op", "vs oqron await aget"]
    l1: dict[str, Timing] = found["l1"]
    l2: dict[str, Timing] = found["l2"]
    ours_l1 = l1[L1_CASES[0]].median_ns
    rows1 = [
        (n, f"{t.median_ns:.0f}", f"{t.p99_ns:.0f}", f"{t.median_ns / ours_l1:.2f}x")
        for n, t in l1.items()
    ]
    floor_us = l2[L2_CASES[0]].median_ns / 1000
    headers2 = ["case", "median us/op", "p99 us/op", "above floor (median, us)"]
    rows2 = [
        (n, f"{t.median_ns / 1000:.1f}", f"{t.p99_ns / 1000:.1f}",
         f"{t.median_ns / 1000 - floor_us:+.1f}")
        for n, t in l2.items()
    ]  # fmt: skip
    print_table("async front: in-process hits", headers, rows1)
    print_table("async front: Redis hits (L1 off)", headers2, rows2)
    body = "\n".join(
        [
            f"One event loop; {reps} repetitions per case, interleaved; in-process hits timed "
            f"in batches of {inner} awaited calls, Redis hits one call each. The value is a "
            "~200-byte JSON dict; every timed oqron Redis call was checked to be an L2 hit.",
            "",
            "In-process hits:",
            "",
            markdown_table(headers, rows1),
            "",
            "Redis hits (L1 off; each library on its own pool of the same loop):",
            "",
            markdown_table(headers2, rows2),
        ]
    )
    return Report("async_hit", "Async front: hit cost beside cashews and aiocache", body, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--inner", type=int, default=100)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    update = not args.no_write
    report = run(url, inner=args.inner, reps=args.reps)
    if update:
        update_section(report, url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
