"""L2 hit cost: a read served by Redis (no L1), against the raw floor.

Cases, measured in the same run, interleaved one call at a time:

* floor: redis-py ``GET`` of the value's JSON and ``json.loads`` of it -- the least any Redis
  cache in Python can do for this read;
* oqron ``cache.get("k")`` on ``tiers=[RedisTier(ttl="10m")]`` (L1 disabled): GET of the
  envelope, header parse, JSON decode, freshness decision, stats;
* dogpile.cache ``dogpile.cache.redis`` backend ``region.get("k")`` (pickle, its default).

The value is the same ~200-byte JSON dict everywhere. Issue 2's target: oqron's median is at most
15 us above the floor's.

Run: ``.venv/bin/python -m bench.l2_hit`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json

import redis
from dogpile.cache import make_region

import oqron_cache
from oqron_cache import RedisTier

from .common import (
    Check,
    Loop,
    Report,
    bench_namespace,
    markdown_table,
    measure,
    print_table,
    redis_url,
    sample_value,
    update_section,
)

TARGET_ABOVE_FLOOR_US = 15.0
FLOOR = "floor: redis-py GET + json.loads"
OQRON = "oqron cache.get('k'), L2 only"
DOGPILE = "dogpile.cache redis region.get('k')"


def run(url: str | None = None, *, reps: int = 5000, warmup: int = 200) -> Report:
    """Measure every case ``reps`` times, one call per repetition; return the report."""
    url = url or redis_url()
    value = sample_value()
    payload = json.dumps(value, separators=(",", ":")).encode()
    with bench_namespace(url) as (_client, namespace):
        oqron_cache.configure(redis_url=url, namespace=namespace)
        floor_client = redis.Redis.from_url(url)
        region = make_region(key_mangler=lambda k: f"{namespace}:dogpile:{k}").configure(
            "dogpile.cache.redis",
            expiration_time=600,
            arguments={"url": url, "redis_expiration_time": 660},
        )
        ocache = oqron_cache.cache(f"{namespace}-l2", tiers=[RedisTier(ttl="10m")])
        try:
            floor_key = f"{namespace}:floor:k"
            floor_client.set(floor_key, payload, ex=600)
            ocache.set("k", value)
            region.set("k", value)
            get_floor = floor_client.get
            loads = json.loads
            oqron_get = ocache.get
            dogpile_get = region.get

            def floor(n: int) -> None:
                for _ in range(n):
                    loads(get_floor(floor_key))  # type: ignore[arg-type]

            def oqron(n: int) -> None:
                for _ in range(n):
                    oqron_get("k")

            def dogpile(n: int) -> None:
                for _ in range(n):
                    dogpile_get("k")

            for got in (loads(get_floor(floor_key)), oqron_get("k"), dogpile_get("k")):  # type: ignore[arg-type]
                if got != value:
                    raise AssertionError(f"a case returned {got!r}, not the sample value")
            before = ocache.get_stats()
            cases: dict[str, Loop] = {FLOOR: floor, OQRON: oqron, DOGPILE: dogpile}
            timings = measure(cases, inner=1, reps=reps, warmup=warmup)
            after = ocache.get_stats()
        finally:
            ocache.close()
            floor_client.close()
            region.backend.writer_client.close()
            oqron_cache.reset()
    served = after["l2_hits"] - before["l2_hits"]
    if served != reps + warmup or after["misses"] != before["misses"]:
        raise AssertionError(f"expected {reps + warmup} L2 hits, got {served} (stats {after})")

    floor_us = timings[FLOOR].median_ns / 1000
    headers = ["case", "median us/op", "p99 us/op", "above floor (median, us)"]
    rows = [
        (
            name,
            f"{t.median_ns / 1000:.1f}",
            f"{t.p99_ns / 1000:.1f}",
            f"{t.median_ns / 1000 - floor_us:+.1f}",
        )
        for name, t in timings.items()
    ]
    print_table("L2 hit cost", headers, rows)
    above = timings[OQRON].median_ns / 1000 - floor_us
    checks = [
        Check(
            f"oqron L2 hit <= floor + {TARGET_ABOVE_FLOOR_US:.0f} us",
            f"floor + {above:.1f} us ({timings[OQRON].median_ns / 1000:.1f} vs {floor_us:.1f} us)",
            above <= TARGET_ABOVE_FLOOR_US,
        )
    ]
    body = "\n".join(
        [
            f"{reps} single calls per case (after {warmup} warm-up calls), interleaved, each "
            "timed on its own; the value is a ~200-byte JSON dict. Redis on loopback. Every "
            "timed oqron call was checked to be an L2 hit.",
            "",
            markdown_table(headers, rows),
        ]
    )
    return Report("l2_hit", "L2 hit cost (L1 disabled)", body, checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5000)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    report = run(url, reps=args.reps)
    if not args.no_write:
        update_section(report, url)
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
