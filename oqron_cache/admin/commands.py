"""The admin commands of ``oqron-cache``: ``stats``, ``invalidate`` and ``inspect``.

They work without the application's code: a cache is known by its name only. ``stats`` reads the
cluster-wide counters (the hash each process flushes, see :mod:`oqron_cache.stats_sync`);
``invalidate`` runs the library's own delete / pattern / tag invalidation on an unregistered,
Redis-only stand-in of the cache (so every process's L1 drops the entries through the bus), or
sends the invalidation task by name to a Celery broker (``--via-celery``); ``inspect`` reads one
entry's envelope from L2.

:func:`add_commands` registers the three commands on an ``argparse`` subparsers object; each sets
``func`` (``args.func(args)`` returns the exit code). :func:`main` runs them alone.

This module holds the argument parsing and :func:`main`; each command lives in its own module
(:mod:`~oqron_cache.admin_stats`, :mod:`~oqron_cache.admin_invalidate`,
:mod:`~oqron_cache.admin_inspect`), on the exit codes, errors and Redis client of
:mod:`~oqron_cache.admin_common`. Their public names are importable from here too.

Exit codes: 0 done; 1 nothing found or matched; 2 usage error; 3 Redis (or the broker) could not
be reached, or refused us.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    AdminError,
)
from .inspect import L1_NOTE, human_seconds, run_inspect
from .invalidate import ADMIN_LOCK_TTL, run_invalidate, stand_in
from .stats import render_detail, render_table, run_stats

__all__ = [
    "ADMIN_LOCK_TTL",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "L1_NOTE",
    "AdminError",
    "add_commands",
    "build_parser",
    "human_seconds",
    "main",
    "render_detail",
    "render_table",
    "stand_in",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "oqron"

_EXIT_CODES = """\
exit codes:
  0  done
  1  {not_found}
  2  usage error (bad option, cache name, URL, pattern or tag)
  3  {server} could not be reached, or refused us
"""

_STATS_DESCRIPTION = """\
Show the statistics of one cache, or of every cache of the namespace, summed
over every process and worker that used it (each flushes its counters to Redis
once a second). Caches are found by their stats in Redis: a cache that never ran
with a Redis tier, or was idle for 30 days, has none. Field names are those of
cache.get_stats().
"""

_INVALIDATE_DESCRIPTION = """\
Drop entries of CACHE from L2 and, through the bus, from every process's L1,
with the library's own code: a deleted key leaves a tombstone (a load already in
flight cannot write its older value back); a pattern or tag invalidation is
recorded so that loads in flight withdraw their entry.

With --via-celery the invalidation is sent by name to the broker instead
(oqron_cache.invalidate, oqron_cache.invalidate_pattern or
oqron_cache.invalidate_by_tag), for a worker that has CACHE registered. It
exits 0 once the broker took the task; how many entries the worker drops is
not known here, and no Redis connection is made.
"""

_INSPECT_DESCRIPTION = """\
Show the L2 envelope of KEY in CACHE: its freshness (fresh, stale or expired),
age, fresh_until and stale_until, version, tags, size and codec, the lock, and
which tiers hold it. L1 is per process: a command line cannot see it. The value
is decoded only with --value.
"""


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type=`` accepting whole numbers from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 3600] seconds")
    return value


def _common(key_options: bool) -> argparse.ArgumentParser:
    """The options every admin command takes (a parent parser)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--redis-url",
        default=os.environ.get("OQRON_REDIS_URL") or DEFAULT_REDIS_URL,
        metavar="URL",
        help=f"the cache's Redis (default: $OQRON_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    group.add_argument(
        "--namespace",
        default=os.environ.get("OQRON_NAMESPACE") or DEFAULT_NAMESPACE,
        metavar="NS",
        help="the application's namespace, as given to configure() "
        f"(default: $OQRON_NAMESPACE, else {DEFAULT_NAMESPACE!r})",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="bound on connecting and on each Redis call (default: 2)",
    )
    if key_options:
        group.add_argument(
            "--max-key-bytes",
            type=bounded_int(16, 1 << 20),
            default=200,
            metavar="N",
            help="the cache's max_key_bytes (default: 200, the library's); longer keys are "
            "stored hashed, so this must match the application's setting",
        )
    return parent


def add_commands(subparsers: Any) -> None:
    """Register ``stats``, ``invalidate`` and ``inspect`` on an argparse subparsers object.

    Each command's namespace gets ``func``: call ``args.func(args)`` for its exit code.
    """
    fmt = argparse.RawDescriptionHelpFormatter
    stats = subparsers.add_parser(
        "stats",
        parents=[_common(key_options=False)],
        formatter_class=fmt,
        help="cache statistics summed over every process (a table, or --json)",
        description=_STATS_DESCRIPTION,
        epilog=_EXIT_CODES.format(
            not_found="no stats for CACHE (or for any cache)", server="Redis"
        ),
    )
    stats.add_argument("cache", nargs="?", metavar="CACHE", help="one cache (default: every one)")
    stats.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    stats.add_argument(
        "--watch",
        action="store_true",
        help="refresh every second until Ctrl-C (with --json: one JSON object per line)",
    )
    # For tests: stop --watch after N frames, and its period.
    stats.add_argument("--iterations", type=bounded_int(1, 1 << 30), help=argparse.SUPPRESS)
    stats.add_argument("--interval", type=_seconds, default=1.0, help=argparse.SUPPRESS)
    stats.set_defaults(func=functools.partial(_run, run_stats, stats))

    inv = subparsers.add_parser(
        "invalidate",
        parents=[_common(key_options=True)],
        formatter_class=fmt,
        help="drop entries by key, pattern or tag, from L2 and every process's L1",
        description=_INVALIDATE_DESCRIPTION,
        epilog=_EXIT_CODES.format(
            not_found="no entry had the key, matched the pattern or carried the tag",
            server="Redis (with --via-celery: the broker)",
        )
        + "\nexamples:\n"
        "  oqron-cache invalidate products --key sku-42\n"
        "  oqron-cache invalidate products --pattern 'sku-4*'\n"
        "  oqron-cache invalidate products --tag tenant:acme --via-celery\n",
    )
    inv.add_argument("cache", metavar="CACHE", help="the cache's name")
    what = inv.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", action="append", metavar="K", help="a key (repeat for several)")
    what.add_argument(
        "--pattern",
        metavar="P",
        help="a glob over the keys: * ? [abc], \\* for a literal star; keys longer than "
        "--max-key-bytes are stored hashed and never match",
    )
    what.add_argument("--tag", metavar="T", help="a tag (literal: * and ? mean themselves)")
    inv.add_argument(
        "--all",
        action="store_true",
        help="allow a pattern that matches every key ('*'): drops the whole cache",
    )
    inv.add_argument(
        "--via-celery",
        action="store_true",
        help="send the task to the broker instead of touching Redis (needs a worker)",
    )
    inv.add_argument(
        "--broker",
        default=os.environ.get("OQRON_BROKER_URL") or None,
        metavar="URL",
        help="the Celery broker for --via-celery (default: $OQRON_BROKER_URL, else --redis-url)",
    )
    inv.add_argument(
        "--queue",
        default="celery",
        metavar="Q",
        help="the queue the workers consume for --via-celery (default: celery)",
    )
    inv.set_defaults(func=functools.partial(_run, run_invalidate, inv))

    insp = subparsers.add_parser(
        "inspect",
        parents=[_common(key_options=True)],
        formatter_class=fmt,
        help="show one entry's envelope: freshness, age, version, tags, size, tiers",
        description=_INSPECT_DESCRIPTION,
        epilog=_EXIT_CODES.format(
            not_found="KEY is not in L2, was deleted, or is not a readable entry",
            server="Redis",
        ),
    )
    insp.add_argument("cache", metavar="CACHE", help="the cache's name")
    insp.add_argument("key", metavar="KEY", help="the key (as given to get/set)")
    insp.add_argument("--value", action="store_true", help="decode and print the value too")
    insp.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    insp.set_defaults(func=functools.partial(_run, run_inspect, insp))


def build_parser() -> argparse.ArgumentParser:
    """A parser with the admin commands only (what :func:`main` runs)."""
    parser = argparse.ArgumentParser(prog="oqron-cache", description="oqron-cache admin commands.")
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one admin command with ``argv`` (default ``sys.argv[1:]``); return its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(
    command: Callable[[argparse.Namespace], int],
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
) -> int:
    """Run ``command``; turn its failures into one line on stderr and an exit code."""
    try:
        return command(args)
    except AdminError as exc:
        if exc.code == EXIT_USAGE:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        else:
            print(f"{parser.prog}: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # `oqron-cache stats | head`: the reader left; leave quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
