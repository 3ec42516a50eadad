"""Replay a step list printed by Hypothesis, outside Hypothesis, and say which promise broke.

Paste the ``state.<rule>(...)`` lines of a failure into a file and run::

    python -m tests.model.replay steps.txt [--times N]

Each line is a rule call on :class:`tests.model.test_stateful.CacheModel`; the invariant runs
after every step, as in the test. Some failures depend on timing (a bus delay, a lock's real
expiry): ``--times`` replays the list N times and counts the outcomes.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tests.model.system import System
from tests.model.test_stateful import CacheModel

Step = tuple[str, dict[str, Any]]


def parse(text: str) -> list[Step]:
    """The ``state.rule(k=v, ...)`` calls of ``text`` (other lines are ignored)."""
    steps: list[Step] = []
    for raw in text.splitlines():
        line = raw.strip().lstrip("|").strip()
        if not line.startswith("state.") or line.startswith("state.teardown"):
            continue
        call = ast.parse(line, mode="eval").body
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        if call.func.attr != "promises_hold":
            steps.append((call.func.attr, kwargs))
    return steps


def replay(system: System, steps: list[Step]) -> tuple[str, str]:
    """Run ``steps`` in a fresh example: the promise broken (``"ok"`` if none), and how."""
    machine = CacheModel(system)
    try:
        machine.promises_hold()
        for index, (name, kwargs) in enumerate(steps):
            try:
                getattr(machine, name)(**kwargs)
                machine.promises_hold()
            except AssertionError as exc:
                return type(exc).__name__, f"step {index + 1} ({name}): {exc}"
    finally:
        machine.teardown()
    return "ok", ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", type=Path)
    parser.add_argument("--times", type=int, default=1)
    args = parser.parse_args(argv)
    steps = parse(args.steps.read_text())
    system = System()
    outcomes: Counter[str] = Counter()
    first: dict[str, str] = {}
    try:
        for _ in range(args.times):
            outcome, how = replay(system, steps)
            outcomes[outcome] += 1
            first.setdefault(outcome, how)
    finally:
        system.close()
    for outcome, count in outcomes.most_common():
        sys.stdout.write(f"{count:4d}  {outcome}  {first[outcome]}\n")
    return 0 if set(outcomes) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())
