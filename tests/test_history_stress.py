"""A history-checked multi-process stress test: 4 processes, forks after first use, a checker.

Two processes are spawned; one of them uses the caches, then forks two children (what gunicorn
``--preload`` and uWSGI do), and all four run threads doing a seeded random mix of gets, sets,
deletes and pattern and tag invalidations on 16 keys of two caches (one write-through) against
the shared Redis, in a fresh namespace. The first process has a Celery app: its stale values
are refreshed and its write-through sets written by a real ``celery -A workers worker`` (its
broker a private redis-server); the forking process and its children refresh in their own
dispatcher and write through inline. Every operation and resolver run (the worker's too) is
recorded (bench/history.py); the offline checker (bench/history_check.py) then verifies P1-P6
over the merged history. No faults are injected, so duplicate resolver runs count as violations
too (P4).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.history import load
from bench.history_check import Bounds, Report, check
from tests.procs.soak_caches import ENV, Params
from tests.procs.soak_web import Plan, run
from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SEED = 10
DURATION = 15.0
STARTUP = 5.0  # seconds for the spawned processes to import, configure and fork
THREADS = 6


def test_four_processes_two_of_them_forked_after_first_use_break_no_promise(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    report = stress(redis_url, namespace, tmp_path, forked=True)
    assert not report.violations, report.render()


@contextlib.contextmanager
def celery_worker(redis_url: str, namespace: str, params: Params, log_dir: Path) -> Iterator[str]:
    """A ``celery -A workers worker`` serving the soak caches; yields its broker's URL."""
    with RedisServer() as broker:
        saved = os.environ.get(ENV)
        os.environ.update(params.env())  # the worker declares the caches from it
        try:
            worker = WorkerProcess(
                log_dir,
                broker.url,
                redis_url,
                namespace,
                modules="tests.procs.soak_caches",
                prefix="stress",
            )
        finally:
            if saved is None:
                del os.environ[ENV]
            else:
                os.environ[ENV] = saved
        try:
            worker.wait_ready()
            yield broker.url
        finally:
            worker.kill()


def stress(
    redis_url: str, namespace: str, tmp_path: Path, *, forked: bool, celery: bool = True
) -> Report:
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
    with contextlib.ExitStack() as stack:
        broker_url = None
        if celery:
            broker_url = stack.enter_context(celery_worker(redis_url, namespace, params, tmp_path))
        procs, progress = _start(redis_url, namespace, params, broker_url, forked)
        for proc in procs:
            proc.join(STARTUP + DURATION + 60)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    assert all(progress[slot] > 100 for slot in range(4)), list(progress)

    events = load(params.history_dir)
    report = check(events, Bounds(ttl=params.ttl, stale_ttl=params.stale_ttl, dedup=True))
    web = {e.p for e in events if e.th.startswith("mix-")}
    assert len(web) == 4
    for op in ("get", "set", "delete", "pattern", "tag", "origin_read", "origin_write"):
        assert report.ops[op] > 10, (op, dict(report.ops))
    refreshed = {e.p for e in events if e.op == "origin_read" and not e.th.startswith("mix-")}
    assert refreshed, "no stale value was refreshed in the background"
    if celery:
        assert refreshed - web, "the Celery worker refreshed nothing"
        assert report.ops["task_run"] > 10, dict(report.ops)
    print(report.summary())
    return report


def _start(
    redis_url: str, namespace: str, params: Params, broker_url: str | None, forked: bool
) -> tuple[list[Any], Any]:
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
            Plan(index=0, seed=SEED, broker_url=broker_url, **common),
            Plan(index=1, seed=SEED + 1, forks=(2, 3), **common),
        ]
    else:
        plans = [Plan(index=0, seed=SEED, broker_url=broker_url, **common)]
        plans += [Plan(index=i, seed=SEED + i, **common) for i in range(1, 4)]
    procs = [ctx.Process(target=run, args=(plan,), name=f"stress-{plan.index}") for plan in plans]
    for proc in procs:
        proc.start()
    return procs, progress
