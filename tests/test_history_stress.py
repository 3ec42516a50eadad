"""A history-checked multi-process stress test: 4 processes, forks after first use, a checker.

Two processes are spawned; one of them uses the caches, then forks two children (what gunicorn
``--preload`` and uWSGI do), and all four run threads doing a seeded random mix of gets, sets,
deletes and pattern and tag invalidations on 16 keys of two caches (one write-through) against
the shared Redis, in a fresh namespace, with the in-process dispatcher refreshing stale values.
Every operation and resolver run is recorded (bench/history.py); the offline checker
(bench/history_check.py) then verifies P1-P6 over the merged history. No faults are injected, so
duplicate resolver runs count as violations too (P4).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import pytest

from bench.history import load
from bench.history_check import Bounds, Report, check
from tests.procs.soak_caches import Params
from tests.procs.soak_web import Plan, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SEED = 10
DURATION = 15.0
STARTUP = 6.0  # seconds for the spawned processes to import, configure and fork
THREADS = 6


def test_four_processes_two_of_them_forked_after_first_use_break_no_promise(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    report = stress(redis_url, namespace, tmp_path, forked=True)
    assert not report.violations, report.render()


def stress(redis_url: str, namespace: str, tmp_path: Path, *, forked: bool) -> Report:
    """Run the four processes (two forked from a third if ``forked``), check the history."""
    params = Params(
        origin_url=redis_url,
        origin_ns=namespace,
        history_dir=str(tmp_path / "history"),
        ttl=1.0,
        stale_ttl=2.0,
        lock_ttl=2.0,
        resolver_sleep=0.01,
        error_rate=0.02,
        seed=SEED,
    )
    ctx = mp.get_context("spawn")
    progress = ctx.Array("l", 4, lock=False)
    start_at = time.time() + STARTUP
    common: dict[str, Any] = {
        "redis_url": redis_url,
        "namespace": namespace,
        "params": params,
        "start_at": start_at,
        "end_at": start_at + DURATION,
        "threads": THREADS,
        "progress": progress,
    }
    if forked:
        plans = [
            Plan(index=0, seed=SEED, **common),
            Plan(index=1, seed=SEED + 1, forks=(2, 3), **common),
        ]
    else:
        plans = [Plan(index=i, seed=SEED + i, **common) for i in range(4)]
    procs = [ctx.Process(target=run, args=(plan,), name=f"stress-{plan.index}") for plan in plans]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(STARTUP + DURATION + 60)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    assert all(progress[slot] > 100 for slot in range(4)), list(progress)

    events = load(params.history_dir)
    report = check(events, Bounds(ttl=params.ttl, stale_ttl=params.stale_ttl, dedup=True))
    pids = {e.p for e in events if e.th.startswith("mix-")}
    assert len(pids) == 4
    for op in ("get", "set", "delete", "pattern", "tag", "origin_read", "origin_write"):
        assert report.ops[op] > 10, (op, dict(report.ops))
    refreshes = {e.p for e in events if e.op == "origin_read" and not e.th.startswith("mix-")}
    assert refreshes, "no stale value was refreshed in the background"
    print(report.summary())
    return report
