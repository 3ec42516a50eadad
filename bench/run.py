"""Run every benchmark (issues 2 and 3) and rewrite bench/RESULTS.md.

Usage: ``.venv/bin/python -m bench.run [--note TEXT] [--quick] [--only l1_hit,stampede,...]``.
The header of RESULTS.md names the commit (``git rev-parse --short HEAD``, flagged when oqron_cache/
has uncommitted changes), the date, the machine, and every target with PASS/FAIL. Exit status 0
when every target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from . import (
    async_hit,
    codecs,
    expired_stampede,
    l1_hit,
    l2_hit,
    refresh_trigger,
    refresh_visible,
    stampede,
)
from .common import Report, machine_info, redis_url, write_results

ALL = (
    "l1_hit",
    "l2_hit",
    "stampede",
    "refresh_trigger",
    "expired_stampede",
    "refresh_visible",
    "async_hit",
    "codecs",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--note", help="a line quoted under the header (e.g. the machine's state)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke test)")
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated subset")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS.md")
    args = parser.parse_args(argv)
    url = redis_url()
    quick = args.quick
    benchmarks: dict[str, Callable[[], Report]] = {
        "l1_hit": lambda: l1_hit.run(url, reps=60 if quick else 300),
        "l2_hit": lambda: l2_hit.run(url, reps=300 if quick else 5000),
        "stampede": lambda: stampede.run(url, runs=1 if quick else 5),
        "refresh_trigger": lambda: refresh_trigger.run(
            url, reps=20 if quick else 200, warmup=2 if quick else 10
        ),
        "expired_stampede": lambda: expired_stampede.run(url, runs=1 if quick else 5),
        "refresh_visible": lambda: refresh_visible.run(url, rounds=3 if quick else 20),
        "async_hit": lambda: async_hit.run(url, reps=200 if quick else 2000),
        "codecs": lambda: codecs.run(reps=100 if quick else 2000),
    }
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in benchmarks]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(benchmarks)}")
    info = machine_info(url)  # before the runs: the load average of the machine, not ours
    started = time.monotonic()
    reports = []
    for name in wanted:
        print(f"== {name}", flush=True)
        reports.append(benchmarks[name]())
    print(f"all benchmarks took {time.monotonic() - started:.0f} s")
    if not args.no_write:
        write_results(reports, url, note=args.note, info=info)
    failed = [c.target for r in reports for c in r.checks if not c.passed]
    for target in failed:
        print(f"FAIL: {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
