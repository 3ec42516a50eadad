"""L2 hit cost: a read served by Redis (no L1), against the raw floor.

Cases, measured in the same run, interleaved one call at a time:

* floor: redis-py ``GET`` of the value's JSON and ``json.loads`` of it -- the least any Redis
  cache in Python can do for this read;
* oqron ``cache.get("k")`` on ``tiers=[RedisTier(ttl="10m")]`` (L1 disabled): GET of the
  envelope, header parse, JSON decode, freshness decision, stats;
* dogpile.cache ``dogpile.cache.redis`` backend ``region.get("k")`` (pickle, its default);
* typed (issue 14): a 20-field dataclass (:class:`bench.codecs.Row`) read by a cache declared
  ``value_type=Row``, against its own floor: ``GET`` and ``msgspec.json`` typed decode.

The value is the same ~200-byte JSON dict everywhere. Issue 14's targets: oqron's median at most
8 us above the floor's and below dogpile's in the same run; the typed case at most 8 us above
its own floor.

Run: ``.venv/bin/python -m bench.l2_hit`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import json

import msgspec
import redis
from dogpile.cache import make_region

import oqron_cache
from oqron_cache import RedisTier

from .codecs import Row, sample_row
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

TARGET_ABOVE_FLOOR_US = 8.0  # issue 14 (issue 2's was 15)
FLOOR = "floor: redis-py GET + json.loads"
OQRON = "oqron cache.get('k'), L2 only"
DOGPILE = "dogpile.cache redis region.get('k')"
TYPED_FLOOR = "typed floor: GET + msgspec typed decode (20-field dataclass)"
TYPED = "oqron value_type=Row cache.get('r'), L2 only"
TARGET_TYPED_US = 8.0
TYPED_CASES = (TYPED_FLOOR, TYPED)


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
        tcache = oqron_cache.cache(
            f"{namespace}-l2-typed", tiers=[RedisTier(ttl="10m")], value_type=Row
        )
        row = sample_row()
        try:
            floor_key = f"{namespace}:floor:k"
            floor_client.set(floor_key, payload, ex=600)
            ocache.set("k", value)
            region.set("k", value)
            tcache.set("r", row)
            typed_key = f"{namespace}:floor:r"
            floor_client.set(typed_key, msgspec.json.encode(row), ex=600)
            typed_decode = msgspec.json.Decoder(Row).decode
            typed_get = tcache.get
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

            def typed_floor(n: int) -> None:
                for _ in range(n):
                    typed_decode(get_floor(typed_key))  # type: ignore[arg-type]

            def typed(n: int) -> None:
                for _ in range(n):
                    typed_get("r")

            if typed_get("r") != row or typed_decode(get_floor(typed_key)) != row:  # type: ignore[arg-type]
                raise AssertionError("the typed cases did not return the sample row")
            for got in (loads(get_floor(floor_key)), oqron_get("k"), dogpile_get("k")):  # type: ignore[arg-type]
                if got != value:
                    raise AssertionError(f"a case returned {got!r}, not the sample value")
            before = ocache.get_stats()
            cases: dict[str, Loop] = {
                FLOOR: floor,
                OQRON: oqron,
                DOGPILE: dogpile,
                TYPED_FLOOR: typed_floor,
                TYPED: typed,
            }
            timings = measure(cases, inner=1, reps=reps, warmup=warmup)
            after = ocache.get_stats()
        finally:
            ocache.close()
            tcache.close()
            floor_client.close()
            region.backend.writer_client.close()
            oqron_cache.reset()
    served = after["l2_hits"] - before["l2_hits"]
    if served != reps + warmup or after["misses"] != before["misses"]:
        raise AssertionError(f"expected {reps + warmup} L2 hits, got {served} (stats {after})")

    floor_us = timings[FLOOR].median_ns / 1000
    typed_floor_us = timings[TYPED_FLOOR].median_ns / 1000
    headers = ["case", "median us/op", "p99 us/op", "above its floor (median, us)"]
    rows = [
        (
            name,
            f"{t.median_ns / 1000:.1f}",
            f"{t.p99_ns / 1000:.1f}",
            f"{t.median_ns / 1000 - (typed_floor_us if name in TYPED_CASES else floor_us):+.1f}",
        )
        for name, t in timings.items()
    ]
    print_table("L2 hit cost", headers, rows)
    above = timings[OQRON].median_ns / 1000 - floor_us
    typed_above = timings[TYPED].median_ns / 1000 - typed_floor_us
    dogpile_above = timings[DOGPILE].median_ns / 1000 - floor_us
    checks = [
        Check(
            f"oqron L2 hit <= floor + {TARGET_ABOVE_FLOOR_US:.0f} us",
            f"floor + {above:.1f} us ({timings[OQRON].median_ns / 1000:.1f} vs {floor_us:.1f} us)",
            above <= TARGET_ABOVE_FLOOR_US,
        ),
        Check(
            "oqron L2 hit below dogpile's in the same run",
            f"+{above:.1f} vs dogpile +{dogpile_above:.1f} us",
            above < dogpile_above,
        ),
        Check(
            f"typed 20-field dataclass L2 hit <= its floor + {TARGET_TYPED_US:.0f} us",
            f"floor + {typed_above:.1f} us",
            typed_above <= TARGET_TYPED_US,
        ),
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
