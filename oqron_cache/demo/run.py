"""``oqron-cache demo``: many concurrent requests on one key, one resolver call, a real worker.

Three phases, each a burst of concurrent ``get()`` calls on one key from several threads in this
process and in helper processes (``python -m oqron_cache.demo --child``, driven over their
stdin/stdout with one JSON message a line):

1. a cold key (never cached): one caller runs the resolver, the callers in flight wait for it,
   later ones find it cached;
2. an expired key (cached, then past ``ttl + stale_ttl``): never served, loaded again once;
3. a stale key (past ``ttl``, within ``stale_ttl``): every caller gets the stale value at once;
   one process wins the key's lock and enqueues ``oqron_cache.refresh``; a Celery worker runs
   the resolver, writes L2 and announces the fill on the bus; the demo measures how long it took
   until the new value was read (refresh-to-visible latency).

The worker is real (see :mod:`oqron_cache.demo.worker`): ``celery -A workers worker`` in a
subprocess when Redis answers (its broker queues under the demo's namespace), a worker already
running with ``--external-worker`` (docker compose), and otherwise a Celery worker thread on an
in-memory broker, with the memory tier alone, in one process.

The resolver sleeps 50 ms and counts its calls in a Redis hash, so the count covers every
process and the worker. The demo's keys live in the namespace ``demo-<pid>`` and are deleted at
the end (SCAN + UNLINK), also after Ctrl-C.

This module runs the phases one after another (:func:`run_demo`), prints their progress lines
and the final table, and deletes the demo's keys; it is also the helpers' entry point
(``--child``). The parts live next to it: the caches and their counting resolver in
:mod:`~oqron_cache.demo_resolver`, one process's bursts in :mod:`~oqron_cache.demo_participant`,
the helper processes in :mod:`~oqron_cache.demo_helpers`, the choice of Redis or the memory
tier and the starting of the worker in :mod:`~oqron_cache.demo_plan`, the output in
:mod:`~oqron_cache.demo_console` and :mod:`~oqron_cache.demo_table`. Their public names are
importable from here too.
"""

from __future__ import annotations

import sys
import textwrap
import time
from typing import IO, Any, cast

import redis

from .. import __version__
from ..config import mask_url
from ..core.errors import OqronCacheError
from ..core.keys import stats_key
from ..redis.replies import as_int
from .console import Printer, quiet_logging
from .helpers import DemoError, Helper, child_main
from .participant import (
    PHASES,
    TIERS,
    VISIBLE_TIMEOUT,
    Participant,
    Phase,
    RecordingStats,
    split,
)
from .plan import (
    EXTERNAL_TIMEOUT,
    WORKER_TIMEOUT,
    DemoOptions,
    Plan,
    plan_run,
    redis_problem,
    start_worker,
    worker_ready,
)
from .resolver import (
    CACHE_NAMES,
    RESOLVER_SECONDS,
    STALE_TTL,
    TTL,
    CountingResolver,
    counter_key,
    declare_caches,
    quiet_client,
    worker_field,
)
from .table import Totals, format_table

__all__ = [
    "CACHE_NAMES",
    "EXTERNAL_TIMEOUT",
    "PHASES",
    "READY_TIMEOUT",
    "REPLY_TIMEOUT",
    "RESOLVER_SECONDS",
    "STALE_TTL",
    "START_LEAD",
    "TIERS",
    "TTL",
    "VISIBLE_TIMEOUT",
    "WIDTH",
    "WORKER_TIMEOUT",
    "CountingResolver",
    "DemoError",
    "DemoOptions",
    "Helper",
    "Participant",
    "Phase",
    "Plan",
    "RecordingStats",
    "child_main",
    "counter_key",
    "declare_caches",
    "plan_run",
    "quiet_client",
    "redis_problem",
    "run_demo",
    "split",
    "worker_field",
]

START_LEAD = 0.3  # time between announcing a phase and releasing its requests
READY_TIMEOUT = 30.0  # a helper process must start within this
REPLY_TIMEOUT = 60.0  # ... and finish a phase within this
WIDTH = 92  # of the text around the table


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo and print its progress and table to ``out`` (stdout). Returns the exit code."""
    stream = out if out is not None else sys.stdout
    say = Printer(stream)
    plan, options = plan_run(options)
    for notice in plan.notices:
        say(notice)
    removed: int | None = None
    with quiet_logging(sys.stderr):
        try:
            results, worker = _run(options, plan, say)
        except (DemoError, OqronCacheError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if plan.url is not None:
                removed = _delete_keys(plan.url, _demo_patterns(plan))
    if removed is not None:
        say(f"removed the demo's {removed} keys from Redis (namespace {plan.namespace})")
    say("")
    say(format_table(results, shared=plan.url is not None, worker=worker))
    return 0


def _demo_patterns(plan: Plan) -> list[str]:
    """What to delete at the end: the whole namespace if it is the demo's own, else its keys."""
    ns = plan.namespace
    if plan.own_namespace and plan.namespace.startswith("demo-"):
        return [f"oqron:{ns}:*"]  # demo-<pid>: the entries, counters, stats, broker queues
    patterns = [counter_key(ns)]
    for name in CACHE_NAMES.values():
        patterns += [f"oqron:{ns}:{{{name}:*", f"oqron:{ns}:{{{name}}}:*", stats_key(ns, name)]
    return patterns


def _run(options: DemoOptions, plan: Plan, say: Printer) -> tuple[list[Totals], dict[str, Any]]:
    from .worker import WorkerUnavailable, make_app

    url = plan.url
    where = (
        f"L1 memory in each process + L2 Redis at {mask_url(url)} (namespace {plan.namespace})"
        if url
        else "L1 memory only, no L2"
    )
    shares = split(options.requests, options.processes)
    callers = sum(min(share, options.threads) for share in shares)
    processes = f"{options.processes} process" + ("es" if options.processes > 1 else "")
    header = (
        f"oqron-cache {__version__} demo: {where}. "
        f"Each phase: {options.requests} requests on one key from {callers} callers "
        f"({processes} x {options.threads} threads) started at the same "
        "instant, each sending its share one after the other. The resolver sleeps "
        f"{RESOLVER_SECONDS * 1000:.0f} ms"
        + (" and counts its calls in Redis." if url else ".")
        + (" Stale values are refreshed by a Celery worker." if plan.broker and url else "")
    )
    say(textwrap.fill(header, WIDTH))
    celery = {"broker": plan.broker, "prefix": plan.prefix} if plan.broker and url else None
    config = {"redis_url": url, "namespace": plan.namespace, "threads": options.threads}
    helpers: list[Helper] = []
    participant: Participant | None = None
    worker: Any = None
    info: dict[str, Any] = {"mode": plan.worker_mode, "node": "", "pid": None, "outcomes": {}}
    try:
        if plan.worker_mode == "process":  # first: it starts while the others do
            worker = start_worker(plan, None, say)
        for index in range(1, options.processes):  # one by one: the finally stops those started
            helpers.append(Helper(index, {**config, "celery": celery}))
        app = make_app(plan.broker, plan.prefix) if plan.broker else None
        participant = Participant(url, plan.namespace, options.threads, app)
        if worker is None and plan.worker_mode in ("embedded", "external"):
            worker = start_worker(plan, participant, say)
        for helper in helpers:
            helper.reply(READY_TIMEOUT)
        # The expired and stale phases' keys: cached now, expired or stale when their turn comes.
        primed = [participant.prime(write=True)]
        for helper in helpers:
            helper.send({"cmd": "prime", "write": url is None})
        primed += [helper.reply(REPLY_TIMEOUT)["primed_at"] for helper in helpers]
        due = {"cold": 0.0, "expired": max(primed) + TTL + 0.05, "stale": max(primed) + TTL}
        results = []
        for phase in PHASES:
            if phase.name == "stale" and worker is not None:
                worker = worker_ready(worker, plan, participant, say)
                info.update(node=worker.node, pid=getattr(worker, "pid", None))
            results.append(_phase(phase, due[phase.name], shares, participant, helpers, say))
        if worker is not None:
            # The worker logs a refresh's outcome after its fill, which the readers saw already.
            worker.wait_outcomes(results[-1].in_worker, timeout=2.0)
            info["outcomes"] = dict(worker.outcomes)
        info["mode"] = plan.worker_mode
        return results, info
    except WorkerUnavailable as exc:
        raise DemoError(str(exc)) from None
    finally:
        if worker is not None:
            worker.stop()
        said: dict[str, list[str]] = {}  # a warning -> the helpers that gave it
        for helper in helpers:
            for line in helper.stop():
                if line.startswith("warning: "):
                    said.setdefault(line, []).append(str(helper.index))
        for line, who in said.items():
            print(f"[helper {','.join(who)}] {line}", file=sys.stderr)
        if participant is not None:
            participant.close()


def _phase(
    phase: Phase,
    due: float,
    shares: list[int],
    participant: Participant,
    helpers: list[Helper],
    say: Printer,
) -> Totals:
    counted_before = _redis_counts(participant, phase.key)
    start_at = max(time.time() + START_LEAD, due)
    for helper, share in zip(helpers, shares[1:], strict=True):
        helper.send({"cmd": "phase", "phase": phase.name, "requests": share, "start_at": start_at})
    totals = Totals(phase.label, stale=phase.name == "stale")
    totals.add(participant.run_phase(phase.name, shares[0], start_at))
    for helper in helpers:
        totals.add(helper.reply(REPLY_TIMEOUT))
    if phase.name == "stale":
        totals.in_worker = participant.resolver.calls[worker_field(phase.key)]
        # The refresh may finish after the callers reported: its call counts all the same.
        totals.calls = max(totals.calls, totals.in_worker)
    counted_after = _redis_counts(participant, phase.key)
    if counted_before is not None and counted_after is not None:
        # The counts Redis saw, across processes and the worker, unless Redis lost increments
        # (it went away): then the processes' own counts, summed.
        totals.calls = max(totals.calls, counted_after[0] - counted_before[0])
        totals.in_worker = max(totals.in_worker, counted_after[1] - counted_before[1])
    took = totals.burst_end - start_at
    line = f"  {phase.label}: {totals.requests} requests done in {took:.2f} s"
    if totals.stale:
        line += f", {totals.stats['stale_served']} of them served a stale value at once"
    say(line)
    if totals.stale and not totals.first_stale:
        say(f"  {phase.label}: no stale value was served (the entry was gone): nothing to refresh")
    elif totals.stale:
        first, every = totals.visible_ms()
        if first is None:
            say(f"  {phase.label}: the refreshed value was not read within {VISIBLE_TIMEOUT:.0f} s")
        else:
            say(
                f"  {phase.label}: the refreshed value was read {first:.0f} ms after the first "
                "stale read" + (f" (in every process: {every:.0f} ms)" if every is not None else "")
            )
    return totals


def _redis_counts(participant: Participant, key: str) -> tuple[int, int] | None:
    """(resolver calls for ``key``, of which in a worker), as counted in Redis."""
    if participant.counter is None:
        return None
    try:
        raw = participant.counter.hmget(
            counter_key(participant.namespace), [key, worker_field(key)]
        )
    except redis.RedisError:
        return None
    calls, in_worker = (int(value or 0) for value in cast("list[bytes | None]", raw))
    return calls, in_worker


def _delete_keys(url: str, patterns: list[str]) -> int | None:
    """Delete the keys matching ``patterns`` with SCAN + UNLINK; never FLUSHALL.

    Returns how many were deleted, or ``None`` (after a warning) if Redis would not let us.
    """
    removed = 0
    try:
        client = quiet_client(url, 2.0)
        try:
            for pattern in patterns:
                batch: list[bytes] = []
                for key in client.scan_iter(match=pattern, count=500):
                    batch.append(key)
                    if len(batch) >= 500:
                        removed += as_int(client.unlink(*batch))
                        batch.clear()
                if batch:
                    removed += as_int(client.unlink(*batch))
        finally:
            client.close()
    except redis.RedisError as exc:
        print(
            f"warning: could not delete the demo's keys ({patterns[0]}): {type(exc).__name__}",
            file=sys.stderr,
        )
        return None
    return removed
