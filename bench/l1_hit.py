"""L1 hit cost: what a fresh in-process hit costs in oqron-cache and in its peers.

Cases, measured in the same run, interleaved:

(a) oqron ``cache.get("k")`` on a cache with both tiers (memory + Redis) configured;
(b) an oqron ``@refreshing_cache`` function ``f("u1")`` (same tiers);
(c) ``cachetools.cached(TTLCache(maxsize=1000, ttl=600), lock=threading.Lock())`` -- the baseline;
(d) a bare ``TTLCache`` lookup ``c["k"]`` (no lock, no function call: the floor of a dict cache);
(e) dogpile.cache memory region: ``region.get_or_create("k", creator)`` and a
    ``@region.cache_on_arguments()`` function.

Issue 2's target: oqron's hit costs at most 1.2x the cachetools.cached figure.

Run: ``.venv/bin/python -m bench.l1_hit`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable
from typing import Any

import cachetools
from dogpile.cache import make_region

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, refreshing_cache

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

TARGET_RATIO = 1.2
BASELINE = "(c) cachetools.cached + Lock, f('u1')"
OQRON_GET = "(a) oqron cache.get('k')"
OQRON_FN = "(b) oqron @refreshing_cache f('u1')"


def _loop_calling(fn: Callable[[str], Any], arg: str) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            fn(arg)

    return loop


def _empty_loop(n: int) -> None:
    for _ in range(n):
        pass


def build_cases(namespace: str) -> tuple[dict[str, Loop], Callable[[], list[str]]]:
    """The cases (each filled, so every timed call is a hit) and a post-run sanity check."""
    # (a) + (b): oqron, memory + Redis tiers; the value is set first so reads hit L1.
    tiers: list[MemoryTier | RedisTier] = [
        MemoryTier(max_size=1000, ttl="10m"),
        RedisTier(ttl="10m"),
    ]
    ocache = oqron_cache.cache(f"{namespace}-l1-get", tiers=tiers)
    ocache.set("k", sample_value())

    @refreshing_cache(name=f"{namespace}-l1-fn", tiers=tiers)
    def profile(user_id: str) -> dict[str, object]:
        return sample_value(user_id)

    # (c): cachetools' decorator with a lock (what a threaded service must use).
    @cachetools.cached(cachetools.TTLCache(maxsize=1000, ttl=600), lock=threading.Lock())
    def ct_profile(user_id: str) -> dict[str, object]:
        return sample_value(user_id)

    # (d): the bare cache.
    ttl_cache: cachetools.TTLCache[str, object] = cachetools.TTLCache(maxsize=1000, ttl=600)
    ttl_cache["k"] = sample_value()

    def bare_lookup(n: int) -> None:
        c = ttl_cache
        for _ in range(n):
            c["k"]

    # (e): dogpile.cache, memory backend.
    region = make_region().configure("dogpile.cache.memory", expiration_time=600)

    def creator() -> dict[str, object]:
        return sample_value()

    @region.cache_on_arguments()
    def dp_profile(user_id: str) -> dict[str, object]:
        return sample_value(user_id)

    get_or_create = region.get_or_create

    def dogpile_get_or_create(n: int) -> None:
        for _ in range(n):
            get_or_create("k", creator)

    # Fill the decorated functions and check every case returns the value.
    expected = sample_value()
    for got in (
        ocache.get("k"),
        profile("u1"),
        ct_profile("u1"),
        ttl_cache["k"],
        region.get_or_create("k", creator),
        dp_profile("u1"),
    ):
        if got != expected:
            raise AssertionError(f"a case returned {got!r}, not the sample value")
    base = {
        "get": ocache.get_stats(),
        "fn": profile.get_stats(),
    }

    cases: dict[str, Loop] = {
        "empty loop (overhead of the timing loop)": _empty_loop,
        OQRON_GET: _loop_calling(ocache.get, "k"),
        OQRON_FN: _loop_calling(profile, "u1"),
        BASELINE: _loop_calling(ct_profile, "u1"),
        "(d) bare TTLCache c['k']": bare_lookup,
        "(e) dogpile memory region.get_or_create('k')": dogpile_get_or_create,
        "(e) dogpile @cache_on_arguments f('u1')": _loop_calling(dp_profile, "u1"),
    }

    def sanity() -> list[str]:
        """Problems that would make the oqron figures not be L1 hits."""
        problems = []
        for label, cache_obj, before in (
            ("cache.get", ocache, base["get"]),
            ("decorated", profile.cache, base["fn"]),
        ):
            after = cache_obj.get_stats()
            for counter in ("misses", "l2_hits", "l2_errors", "resolver_calls"):
                if after[counter] != before[counter]:
                    problems.append(
                        f"{label}: {counter} went {before[counter]} -> {after[counter]} "
                        "during the timed loop (not all L1 hits)"
                    )
        ocache.close()
        profile.cache.close()
        return problems

    return cases, sanity


def run(url: str | None = None, *, reps: int = 300, inner: int = 1000, warmup: int = 30) -> Report:
    """Measure every case; return the report (tables and the target check)."""
    url = url or redis_url()
    with bench_namespace(url) as (_client, namespace):
        oqron_cache.configure(redis_url=url, namespace=namespace)
        try:
            cases, sanity = build_cases(namespace)
            timings = measure(cases, inner=inner, reps=reps, warmup=warmup)
            problems = sanity()
        finally:
            oqron_cache.reset()
    if problems:
        raise AssertionError("; ".join(problems))

    base = timings[BASELINE].median_ns
    headers = ["case", "median ns/op", "p99 ns/op", "x cachetools.cached"]
    rows = [
        (name, f"{t.median_ns:.0f}", f"{t.p99_ns:.0f}", f"{t.median_ns / base:.2f}")
        for name, t in timings.items()
    ]
    print_table("L1 hit cost", headers, rows)
    checks = [
        Check(
            f"{label} <= {TARGET_RATIO}x cachetools.cached",
            f"{timings[name].median_ns / base:.2f}x "
            f"({timings[name].median_ns:.0f} vs {base:.0f} ns)",
            timings[name].median_ns <= TARGET_RATIO * base,
        )
        for label, name in (("oqron cache.get", OQRON_GET), ("oqron decorated", OQRON_FN))
    ]
    body = "\n".join(
        [
            f"{reps} repetitions of {inner} calls per case, interleaved; per-op ns of each "
            "repetition; median and p99 over repetitions. Figures include the timing loop's "
            "own cost (first row). Every oqron call was checked to be an L1 hit (no L2 read, "
            "no resolver call during the timed loops).",
            "",
            markdown_table(headers, rows),
        ]
    )
    return Report("l1_hit", "L1 hit cost", body, checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--inner", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    report = run(url, reps=args.reps, inner=args.inner)
    if not args.no_write:
        update_section(report, url)
    return 0 if all(c.passed for c in report.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
