"""Glob matching cost (issue 10 defect 1): ``keys.Glob.matches`` against ``fnmatch``'s regex.

Two tables, printed only (no RESULTS.md section: nothing here is a target of an issue):

(a) ns per key on 2,000 ordinary keys (``user:<n>:profile``, ``order-<nn>-x<n>``) for patterns of
    the shapes users write; the peer is ``re.compile(fnmatch.translate(p)).fullmatch`` with the
    pattern in fnmatch's syntax (``[^`` as ``[!``), the regex engine in C;
(b) the worst cases of the regex ``Glob`` used to compile (it never finished on the first and
    the last), at two key lengths: the time must grow at most ~10x for a 10x longer key
    (linear); fnmatch's regex (atomic groups since Python 3.11) beside it for reference.

Run: ``.venv/bin/python -m bench.glob_match`` (``--reps N`` for more repetitions).
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import time
from collections.abc import Callable

from oqron_cache.core.keys import Glob

from .common import median, print_table

KEYS = [f"user:{i}:profile" for i in range(1000)] + [f"order-{i:02d}-x{i}" for i in range(1000)]
SHAPES = ["user:1", "user:*", "*:profile", "user:*:profile", "*:42:*", "user:?2*", "[uo]*"]
SHAPES += ["*-[0-9][0-9]-*", "[^o]*", "*?*?*rof*"]
WORST = [
    ("*a" * 10 + "*z", "a"),
    ("*a*a*a*a*a*a*a*a*a*b*", "a"),
    ("*" + "a?" * 20 + "b*", "a"),
    ("*[ab]" * 10 + "*c*", "ab"),
]


def _per_key_ns(match: Callable[[str], object], reps: int) -> float:
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        for key in KEYS:
            match(key)
        runs.append((time.perf_counter() - started) / len(KEYS) * 1e9)
    return median(runs)


def _seconds(match: Callable[[str], object], key: str, reps: int) -> float:
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        match(key)
        runs.append(time.perf_counter() - started)
    return median(runs)


def run(reps: int) -> None:
    """Measure and print both tables."""
    rows: list[list[object]] = []
    for pattern in SHAPES:
        glob = Glob(pattern)
        peer = re.compile(fnmatch.translate(pattern.replace("[^", "[!"))).fullmatch
        assert [glob.matches(k) for k in KEYS] == [peer(k) is not None for k in KEYS], pattern
        ours, theirs = _per_key_ns(glob.matches, reps), _per_key_ns(peer, reps)
        rows.append([f"`{pattern}`", f"{ours:.0f}", f"{theirs:.0f}", f"{ours / theirs:.2f}"])
    print_table(
        "(a) ordinary keys, ns per key (median)",
        ["pattern", "Glob.matches", "fnmatch regex", "ratio"],
        rows,
    )
    rows = []
    for pattern, unit in WORST:
        glob = Glob(pattern)
        peer = re.compile(fnmatch.translate(pattern)).fullmatch
        small, large = (unit * (n // len(unit)) for n in (10_000, 100_000))
        t_small, t_large = _seconds(glob.matches, small, reps), _seconds(glob.matches, large, reps)
        p_small, p_large = _seconds(peer, small, reps), _seconds(peer, large, reps)
        rows.append(
            [
                f"`{pattern[:30]}`",
                f"{t_small * 1e3:.3f}",
                f"{t_large * 1e3:.3f}",
                f"{t_large / t_small:.1f}",
                f"{p_small * 1e3:.3f}",
                f"{p_large * 1e3:.3f}",
            ]
        )
    print_table(
        "(b) worst cases of the old regex, ms per match (median); fnmatch's regex for reference",
        ["pattern", "10k chars", "100k chars", "growth", "fnmatch 10k", "fnmatch 100k"],
        rows,
    )


def main() -> None:
    """Command line: ``--reps``."""
    parser = argparse.ArgumentParser(prog="bench.glob_match", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    run(parser.parse_args().reps)


if __name__ == "__main__":
    main()
