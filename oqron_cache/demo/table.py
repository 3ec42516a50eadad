"""The demo's final table: each phase summed over every process, and the notes that read it."""

from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .participant import TIERS, VISIBLE_TIMEOUT
from .resolver import STALE_TTL, TTL

WIDTH = 92  # of the notes under the table


@dataclass
class Totals:
    """One phase summed over every process."""

    label: str
    stale: bool = False  # the stale-key phase: refreshed by the worker, visibility measured
    requests: int = 0
    calls: int = 0
    in_worker: int = 0  # resolver calls made inside a Celery refresh task
    errors: int = 0
    burst_end: float = 0.0  # wall clock: when the last process's requests were all answered
    stats: Counter[str] = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)
    tiers: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TIERS})
    first_stale: list[float] = field(default_factory=list)  # per process, wall clock
    visible: list[float | None] = field(default_factory=list)  # per process, None: never

    def add(self, report: dict[str, Any]) -> None:
        """Add one process's report of this phase."""
        self.requests += report["requests"]
        self.calls += report["calls"]
        self.errors += report["errors"]
        self.burst_end = max(self.burst_end, report["burst_end"])
        self.stats.update(report["stats"])
        self.latency.extend(report["latency"])
        for tier in TIERS:
            self.tiers[tier].extend(report["tiers"][tier])
        if report.get("first_stale") is not None:
            self.first_stale.append(report["first_stale"])
        if "visible_at" in report:
            self.visible.append(report["visible_at"])

    def visible_ms(self) -> tuple[float | None, float | None]:
        """Refresh-to-visible latency: from the first stale read (any process) to the first
        read of the refreshed value in the first process, and in every process (``None``: not
        measured, or some process never read it)."""
        if not self.first_stale or not self.visible:
            return None, None
        start = min(self.first_stale)
        seen = [t for t in self.visible if t is not None]
        first = (min(seen) - start) * 1000 if seen else None
        every = (max(seen) - start) * 1000 if seen and len(seen) == len(self.visible) else None
        return first, every


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``samples`` (not empty)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _ms(samples: list[float]) -> str:
    if not samples:
        return "-"
    cells = []
    for fraction in (0.5, 0.99):
        value = percentile(samples, fraction) * 1000
        cells.append(f"{value:.3f}" if value < 1 else f"{value:.1f}")
    return " / ".join(cells)


def _visible(totals: Totals) -> str:
    if not totals.stale or not totals.first_stale:
        return "-"
    first, every = totals.visible_ms()
    if first is None:
        return "never"
    return f"{first:.0f} / {every:.0f}" if every is not None else f"{first:.0f} / never"


def format_table(results: list[Totals], *, shared: bool, worker: dict[str, Any]) -> str:
    """The plain-text table the demo ends with, and the notes that read it."""
    rows: list[tuple[str, list[str]]] = [
        ("phase", [t.label for t in results]),
        ("requests served", [str(t.requests - t.errors) for t in results]),
        ("resolver calls", [str(t.calls) for t in results]),
        ("  in the Celery worker", [str(t.in_worker) for t in results]),
        ("stampedes prevented", [str(t.stats["stampede_prevented"]) for t in results]),
        ("stale served", [str(t.stats["stale_served"]) for t in results]),
        ("fresh from cache", [str(_fresh_from_cache(t)) for t in results]),
        ("refreshes enqueued", [str(t.stats["refreshes_enqueued"]) for t in results]),
        ("refreshes deduplicated", [str(t.stats["refreshes_deduplicated"]) for t in results]),
        ("errors", [str(t.errors) for t in results]),
        ("refresh to visible, ms", [_visible(t) for t in results]),
        ("latency ms, p50 / p99", [""] * len(results)),
        ("  caller (one get())", [_ms(t.latency) for t in results]),
        ("  memory tier (L1)", [_ms(t.tiers["memory"]) for t in results]),
        ("  redis tier (L2)", [_ms(t.tiers["redis"]) for t in results]),
        ("  resolver", [_ms(t.tiers["resolver"]) for t in results]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(results))]
    lines = []
    for label, cells in rows:
        line = label.ljust(label_width) + "".join(
            "   " + cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
        )
        lines.append(line.rstrip())
        if label == "phase":
            lines.append("-" * len(line))
    notes = [
        textwrap.fill(note, WIDTH, subsequent_indent=" " * 13)
        for note in _notes(results, shared=shared, worker=worker)
    ]
    return "\n".join([*lines, "", *notes])


def _fresh_from_cache(totals: Totals) -> int:
    # Requests that neither ran the resolver, nor waited for another's load, nor got a stale
    # value: they came after the value was back in L1 or L2.
    inline = totals.stats["resolver_calls"] - totals.stats["refreshes_succeeded"]
    rest = totals.requests - totals.errors - inline - totals.stats["stampede_prevented"]
    return max(0, rest - totals.stats["stale_served"])


def _where(worker: dict[str, Any]) -> str:
    mode = worker.get("mode")
    node = worker.get("node") or "the worker"
    if mode == "process":
        return f"the worker process {node} (`celery -A workers worker`, pid {worker.get('pid')})"
    if mode == "embedded":
        return f"the worker thread {node} in this process"
    if mode == "external":
        return f"the running worker {node}"
    return "no worker"


def _notes(results: list[Totals], *, shared: bool, worker: dict[str, Any]) -> list[str]:
    stale = results[-1]
    first, every = stale.visible_ms()
    started = stale.stats["refreshes_enqueued"]
    deduplicated = stale.stats["refreshes_deduplicated"]
    if stale.in_worker:
        ran = (
            f"{started} refresh task (oqron_cache.refresh) was enqueued by the process that won "
            f"the key's lock, and {_where(worker)} ran the resolver ({stale.in_worker} call)"
        )
    elif worker.get("mode") == "none":
        ran = f"{started} refresh ran in the background thread of the process that won the lock"
    elif not shared:
        ran = (
            f"{started} refresh ran in this process's background thread, not in the worker: "
            "the library refreshes memory-only caches in-process"
        )
    else:
        ran = (
            f"{started} refresh ran in the background thread of the process that won the lock, "
            "not in the worker (the broker did not take the task in time)"
        )
    visible = (
        f"the key's new value was read {first:.0f} ms after the first stale read"
        + (f" ({every:.0f} ms until every process had read it)" if every is not None else "")
        if first is not None
        else f"the key's new value was not read within {VISIBLE_TIMEOUT:.0f} s"
    )
    stale_note = (
        f"stale key    past ttl ({TTL:.0f} s), within stale_ttl ({STALE_TTL:.0f} s): every "
        f"caller got the stale value at once. {ran}; {deduplicated} other refresh requests "
        f"were merged or lost the lock (deduplicated), and the rest did not ask again (the "
        f"refresh was already requested); {visible}."
    )
    if not stale.first_stale:
        stale_note = (
            "stale key    no caller got a stale value: the entry was gone (without Redis, L1 "
            "is flushed when the bus is lost), so it was loaded like a cold key."
        )
    notes = [
        "cold key     never cached: one caller ran the resolver; callers that arrived while it "
        "ran waited for its value (stampedes prevented), later ones found it cached.",
        f"expired key  cached, then past ttl + stale_ttl ({TTL:.0f} s + 0 s): never served, "
        "loaded once more.",
        stale_note,
        "latency      caller: one get() as its caller timed it (threads share the CPUs); tiers: "
        "the library's own timings (1 fresh L1 hit in 16 is timed; stale hits are not).",
    ]
    if not shared:
        notes.append(
            "memory only  without Redis there is no shared tier, lock or bus: each process "
            "would compute every value itself, so the demo runs in one process, whose threads "
            "share one resolver call."
        )
    if worker.get("outcomes"):
        outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(worker["outcomes"].items()))
        notes.append(f"worker       refresh tasks it ran: {outcomes}.")
    l2_errors = sum(t.stats["l2_errors"] for t in results)
    if l2_errors:
        notes.append(
            f"L2 errors    {l2_errors} Redis calls failed (Redis went away during the run). No "
            "request failed, but without the shared tier (and with L1 flushed when the bus "
            "was lost) each process loaded the values by itself."
        )
    failures = sum(t.stats["enqueue_failures"] for t in results)
    if failures:
        notes.append(
            f"broker       {failures} refresh task(s) could not be enqueued in time; the "
            "process refreshed the key itself (the library's fallback)."
        )
    return notes
