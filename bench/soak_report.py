"""What the chaos soak measures besides the history: memory, the broker's queues, and its table.

:func:`summarize` turns a run (the faults injected, the checker's :class:`~bench.history_check.
Report`, the memory peaks) into plain data, with the figures that must be zero under ``"zero"``;
:func:`table` prints it as the soak's one table.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from oqron_cache.redis.replies import as_int

from .history_check import Report, Violation

if TYPE_CHECKING:
    from tests.redis_server import RedisServer

    from .soak import Config
    from .soak_faults import Fault, Workers

HORIZON = 10.0  # a violation this long after a fault ended (and before the next) is the fault's


@dataclass
class Outcome:
    """One injected fault: its window, whether injecting it failed, and the web processes'
    progress counters when it ended (``resumed``: all of them moved on since and no worker
    died; ``workers_died``: workers that exited on their own after it, replaced)."""

    fault: Fault
    t0: float
    t1: float
    error: str
    progress: list[int]
    resumed: bool = False
    workers_died: int = 0


def _status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _children(roots: set[int]) -> set[int]:
    """``roots`` and every process below them (from /proc/<pid>/stat)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = set(roots)
    grew = True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        grew = bool(below)
        tree |= below
    return tree


class RssMonitor:
    """Samples the peak resident memory (VmHWM) of the web processes and the workers, 1/s."""

    def __init__(self, web_pids: list[int], workers: Workers) -> None:
        self.web_pids = web_pids
        self.workers = workers
        self.peak_kb = {"web": 0, "worker": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-rss", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.sample()
            self._thread.join(5)

    def sample(self) -> None:
        for role, roots in (("web", set(self.web_pids)), ("worker", set(self.workers.pids()))):
            for pid in _children(roots):
                self.peak_kb[role] = max(self.peak_kb[role], _status_kb(pid, "VmHWM"))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()


def drain(broker: RedisServer, timeout: float) -> bool:
    """Wait until the broker holds no task (queued or unacknowledged); False if it still does."""
    import time

    deadline = time.monotonic() + timeout
    client = broker.client()
    try:
        while True:
            try:
                pending = 0
                for key in client.scan_iter(count=100):
                    kind = client.type(key)
                    if kind == b"list":
                        pending += as_int(client.llen(key))
                    elif key == b"unacked":
                        pending += as_int(client.hlen(key))
            except redis.RedisError:
                pending = -1
            if pending == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
    finally:
        client.close()


def _attribute(violations: list[Violation], outcomes: list[Outcome]) -> dict[int, int]:
    """Violations per fault (index into ``outcomes``; -1: outside every fault's horizon)."""
    found: Counter[int] = Counter()
    for violation in violations:
        # A read that misses a write belongs to the fault the write was made in.
        cause = violation.cause if violation.rule.startswith("stale_") else None
        at = (cause or violation.event).t0
        owner = -1
        for index, outcome in enumerate(outcomes):
            if outcome.t0 <= at <= outcome.t1 + HORIZON:
                owner = index  # the latest fault that began before it, within its horizon
        found[owner] += 1
    return dict(found)


def summarize(
    config: Config,
    outcomes: list[Outcome],
    report: Report,
    monitor: RssMonitor,
    workers: Workers,
    exit_codes: list[int | None],
    drained: bool,
) -> dict[str, Any]:
    """The run as plain data (JSON-able); ``summary["zero"]`` holds what must be 0."""
    owners = _attribute(report.violations, outcomes)
    workers_ok = workers.replaced == workers.killed + workers.died and not workers.failures
    kinds: dict[str, dict[str, int]] = {}
    faults = []
    for index, outcome in enumerate(outcomes):
        seen = owners.get(index, 0)
        survived = outcome.resumed and not outcome.error and not seen
        if outcome.fault.kind == "worker_kill":
            survived = survived and workers_ok
        row = kinds.setdefault(outcome.fault.kind, {"injected": 0, "survived": 0, "violations": 0})
        row["injected"] += 1
        row["survived"] += int(survived)
        row["violations"] += seen
        faults.append(
            {
                **asdict(outcome.fault),
                "window": [round(outcome.t0, 3), round(outcome.t1, 3)],
                "error": outcome.error,
                "resumed": outcome.resumed,
                "workers_died": outcome.workers_died,
                "violations": seen,
            }
        )
    get_latency = report.latency.get("get", (0.0, 0.0, 0.0))
    zero = {
        "infra_errors": report.count("infra_error"),
        "stale_overwrites": report.count("stale_overwrite"),
        "stale_reads": report.count("stale_read"),
        "past_staleness_bound": report.count("staleness"),
        "lost_writes": report.count("lost_write"),
        "stalled_reads": report.count("stall"),
    }
    return {
        "config": {k: v for k, v in asdict(config).items() if k != "faults"},
        "faults": faults,
        "kinds": kinds,
        "calls": report.calls,
        "served": report.served,
        "failures": dict(report.failures),
        "latency_ms": [round(x * 1000, 2) for x in get_latency],
        "max_staleness": round(report.max_staleness, 3),
        "staleness_bound": report.bounds.staleness_bound,
        "resolver_runs": report.resolver_runs,
        "duplicates": report.duplicates,
        "acknowledged": dict(report.acknowledged),
        "refused_but_written": dict(report.refused_but_written),
        "lost_writes_by_cache": {
            cache: report.count("lost_write", cache) for cache in report.acknowledged
        },
        "stall_limit": round(report.stall_limit, 3),
        "max_stall": round(report.max_stall, 3),
        "held_stalls": report.held_stalls,
        "tasks": report.tasks,
        "task_wait_ms": [round(x * 1000, 1) for x in report.task_wait],
        "drained": drained,
        "peak_rss_mb": {k: round(v / 1024, 1) for k, v in monitor.peak_kb.items()},
        "web_exit_codes": exit_codes,
        "workers": {
            "killed": workers.killed,
            "died": workers.died,
            "replaced": workers.replaced,
        },
        "outside_faults": owners.get(-1, 0),
        "violations": dict(report.rules()),
        "zero": zero,
    }


def table(summary: dict[str, Any]) -> str:
    """The soak's one table."""
    c = summary["config"]
    lines = [
        f"chaos soak: seed {c['seed']}, {c['seconds']:g} s, {c['web']} web x {c['threads']} "
        f"threads, {c['workers']} workers x {c['concurrency']}, {c['keys']} keys, "
        f"ttl {c['ttl']:g} s + stale_ttl {c['stale_ttl']:g} s, lock_ttl {c['lock_ttl']:g} s",
        f"{'fault':<34}{'injected':>10}{'survived':>10}{'violations':>12}",
    ]
    total = Counter[str]()
    for kind, row in sorted(summary["kinds"].items()):
        lines.append(
            f"  {kind:<32}{row['injected']:>10}{row['survived']:>10}{row['violations']:>12}"
        )
        total.update(row)
    lines.append(
        f"  {'all (' + str(len(summary['kinds'])) + ' kinds)':<32}{total['injected']:>10}"
        f"{total['survived']:>10}{total['violations']:>12}"
    )
    failures = summary["failures"]
    zero = summary["zero"]
    p50, p99, most = summary["latency_ms"]
    tasks = summary["tasks"]
    acknowledged = summary["acknowledged"]
    lost = summary["lost_writes_by_cache"]
    rss = summary["peak_rss_mb"]
    rows = [
        ("calls / served (gets)", f"{summary['calls']} / {summary['served']}"),
        ("infrastructure errors surfaced", f"{zero['infra_errors']}"),
        ("  resolver errors passed on", f"{failures.get('get:InjectedResolverError', 0)}"),
        (
            "  write-through sets refused",
            f"{failures.get('set:WriteThroughError', 0)} "
            f"(origin written anyway: {summary['refused_but_written'].get('soak_wt', 0)})",
        ),
        ("latency p50 / p99 / max (get)", f"{p50:.2f} / {p99:.2f} / {most:.1f} ms"),
        (
            "max staleness vs the bound",
            f"{summary['max_staleness']:.2f} s / {summary['staleness_bound']:.2f} s "
            f"({zero['past_staleness_bound']} reads past it)",
        ),
        ("duplicate resolver runs", f"{summary['duplicates']} of {summary['resolver_runs']}"),
        ("stale overwrites (fills, P5)", f"{zero['stale_overwrites']}"),
        ("stale reads (sets not visible, P5)", f"{zero['stale_reads']}"),
        (
            "lost write-through writes",
            f"{lost.get('soak_wt', 0)} of {acknowledged.get('soak_wt', 0)} acknowledged",
        ),
        (
            "lost writes (plain set)",
            f"{lost.get('soak_swr', 0)} of {acknowledged.get('soak_swr', 0)} acknowledged",
        ),
        (
            "stalled reads",
            f"{zero['stalled_reads']} (max {summary['max_stall']:.2f} s, limit "
            f"{summary['stall_limit']:.2f} s; {summary['held_stalls']} waited for a live holder)",
        ),
        (
            "tasks lost",
            f"{tasks.get('lost', 0)} of {tasks.get('published', 0)} published "
            f"({tasks.get('revoked', 0)} expired; drained: {summary['drained']})",
        ),
        (
            "task wait p50 / p99 / max",
            " / ".join(f"{ms / 1000:.2f}" for ms in summary["task_wait_ms"]) + " s",
        ),
        (
            "workers killed / died / replaced",
            f"{summary['workers']['killed']} / {summary['workers']['died']} / "
            f"{summary['workers']['replaced']}",
        ),
        ("peak RSS web / worker", f"{rss['web']:.0f} / {rss['worker']:.0f} MB"),
        ("violations outside fault horizons", f"{summary['outside_faults']}"),
    ]
    lines.extend(f"{name:<36}{value}" for name, value in rows)
    return "\n".join(lines)
