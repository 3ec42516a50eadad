"""The data of a history check: what a run promised (:class:`Bounds`), fault windows, and
what :func:`bench.history_check.check` found (:class:`Report`, :class:`Violation`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import Event

__all__ = ["Bounds", "Report", "Violation", "Window", "Write", "percentile"]


def _default_allowed() -> dict[str, frozenset[str]]:
    return {"get": frozenset({"InjectedResolverError"})}


@dataclass(frozen=True)
class Bounds:
    """What the run promised (the caches' options) and the allowances of the checker.

    ``allowed`` maps an op (``"get"``) or an op of one cache (``"set:soak_wt"``) to the
    exception type names a caller may see there.
    """

    ttl: float
    stale_ttl: float
    slack: float = 0.5
    bus_delay: float = 0.5
    recovery_base: float = 1.25
    recovery_cap: float = 5.0
    op_timeout: float = 0.25
    stall_calls: int = 3
    stall_slack: float = 0.5
    allowed: Mapping[str, frozenset[str]] = field(default_factory=_default_allowed)
    dedup: bool = False

    @property
    def staleness_bound(self) -> float:
        """The oldest a served value may be: ``ttl + stale_ttl + slack`` seconds."""
        return self.ttl + self.stale_ttl + self.slack


@dataclass(frozen=True)
class Window:
    """A fault window in wall-clock time."""

    start: float
    end: float
    kind: str = "fault"


@dataclass
class Violation:
    """One broken rule: the op that saw it (``event``) and the op that makes it one (``cause``)."""

    rule: str
    event: Event
    detail: str
    cause: Event | None = None

    def describe(self) -> str:
        text = f"{self.rule}: {self.event.describe()}: {self.detail}"
        if self.cause is not None:
            text += f"\n      because of {self.cause.describe()}"
        return text


@dataclass
class Report:
    """What :func:`check` found; ``violations`` empty means every rule held."""

    bounds: Bounds
    violations: list[Violation] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    served: int = 0
    latency: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    max_staleness: float = 0.0
    acknowledged: Counter[str] = field(default_factory=Counter)  # sets that returned, per cache
    # sets that raised although their version reached the origin (``origin_write``), per cache
    refused_but_written: Counter[str] = field(default_factory=Counter)
    resolver_runs: int = 0
    duplicates: int = 0
    stall_limit: float = 0.0
    max_stall: float = 0.0
    held_stalls: int = 0  # gets that waited past the limit for a holder computing the key
    tasks: dict[str, int] = field(default_factory=dict)
    task_wait: tuple[float, float, float] = (0.0, 0.0, 0.0)  # publication to start: p50/p99/max
    windows: list[Window] = field(default_factory=list)

    def count(self, rule: str, cache: str | None = None) -> int:
        """How many violations of ``rule`` (on ``cache`` only, if given)."""
        return sum(
            1 for v in self.violations if v.rule == rule and (cache is None or v.event.c == cache)
        )

    def rules(self) -> Counter[str]:
        return Counter(v.rule for v in self.violations)

    def summary(self) -> dict[str, Any]:
        """The figures as plain JSON-able data."""
        return {
            "violations": dict(self.rules()),
            "ops": dict(self.ops),
            "failures": dict(self.failures),
            "calls": self.calls,
            "served": self.served,
            "latency_ms": {
                op: [round(x * 1000, 3) for x in values] for op, values in self.latency.items()
            },
            "max_staleness": round(self.max_staleness, 3),
            "staleness_bound": self.bounds.staleness_bound,
            "acknowledged": dict(self.acknowledged),
            "refused_but_written": dict(self.refused_but_written),
            "resolver_runs": self.resolver_runs,
            "duplicates": self.duplicates,
            "stall_limit": round(self.stall_limit, 3),
            "max_stall": round(self.max_stall, 3),
            "held_stalls": self.held_stalls,
            "tasks": dict(self.tasks),
            "task_wait_ms": [round(x * 1000, 1) for x in self.task_wait],
            "windows": len(self.windows),
        }

    def render(self, limit: int = 20) -> str:
        """The violations, ``limit`` per rule, one or two lines each."""
        lines = [f"{len(self.violations)} violation(s): {dict(self.rules())}"]
        shown: Counter[str] = Counter()
        for violation in self.violations:
            shown[violation.rule] += 1
            if shown[violation.rule] <= limit:
                lines.append("  " + violation.describe())
        return "\n".join(lines)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class Write:
    """A write or invalidation of one key, with the instant it must be visible everywhere."""

    event: Event
    due: float
    version: int | None  # None: an invalidation
