"""What the machine's steps draw from, how long a run is, and the record of the steps taken.

Run length and scope come from the environment (see :mod:`tests.model.test_stateful`). Every
rule is :func:`logged`: the steps of the run so far go into the message of any failure, so a
failing run can be replayed (``python -m tests.model.replay``) even when Hypothesis's own
replay of it differs (timing: a bus delay, a lock's real expiry).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from hypothesis import strategies as st

from tests.model.oracle import CACHES, KEYS, PROCS, Op

EXAMPLES = int(os.environ.get("OQRON_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("OQRON_MODEL_STEPS", "40"))
SEED = os.environ.get("OQRON_MODEL_SEED")
SHRINK = os.environ.get("OQRON_MODEL_SHRINK", "1") != "0"  # 0: report the first failure as found
GROUPS = {"peer", "tasks", "outage", "bus", "forged", "slow", "origin", "steady"} - {
    g.strip().lstrip("-") for g in os.environ.get("OQRON_MODEL_RULES", "").split(",") if g.strip()
}

procs = st.sampled_from(PROCS if "peer" in GROUPS else ("A",))
caches = st.sampled_from(CACHES)
keys = st.sampled_from(KEYS)
# Across L1's ttl (20), the ttl (30), the tombstone's life (10), ttl + stale_ttl (90) and the
# tag sets' (150); a small step keeps a value where it is.
seconds = st.sampled_from([1.0, 9.0, 11.0, 16.0, 21.0, 31.0, 61.0, 91.0, 151.0])


@dataclass
class Held:
    """What the held call is: a get (what it had seen, when it began) or a set (its op)."""

    kind: str = ""
    cache: str = ""
    key: str = ""
    seen: frozenset[int] = frozenset()
    began: float = 0.0
    op: Op | None = None

    def is_get(self, cache: str, key: str) -> bool:
        return (self.kind, self.cache, self.key) == ("get", cache, key)


class Recording(Protocol):
    steps: list[str]
    depth: int


F = TypeVar("F", bound=Callable[..., Any])


def logged(fn: F) -> F:
    """Record the step (as Hypothesis prints it) and put the steps so far into any failure.

    Only the steps Hypothesis chose are recorded, not the rules a step calls itself.
    """

    @functools.wraps(fn)
    def step(self: Recording, **kwargs: Any) -> Any:
        top = self.depth == 0
        if top and fn.__name__ != "promises_hold":
            args = ", ".join(f"{name}={value!r}" for name, value in sorted(kwargs.items()))
            self.steps.append(f"state.{fn.__name__}({args})")
        self.depth += 1
        try:
            return fn(self, **kwargs)
        except AssertionError as exc:
            if top and not getattr(exc, "steps_noted", False):
                exc.args = (f"{exc}\n  steps of this run:\n    " + "\n    ".join(self.steps),)
                exc.steps_noted = True  # type: ignore[attr-defined]
            raise
        finally:
            self.depth -= 1

    return cast("F", step)
