"""The ``oqron-cache`` command; ``python -m oqron_cache`` runs the same :func:`main`.

Subcommands: ``demo`` (stampede protection and background refresh by a real Celery worker,
shown with concurrent requests; see :mod:`oqron_cache.demo`) and ``version``. Exit codes: 0 on
success, 1 when the command failed, 2 for a usage error, 130 when interrupted (Ctrl-C or
SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence

from .. import __version__
from ..core.errors import ConfigurationError
from .commands import DEFAULT_REDIS_URL, bounded_int

_DEMO_DESCRIPTION = """\
Show stampede protection and background refresh at work. Three phases, each a burst of
concurrent get() calls from several threads in several processes on one key, with a resolver
that sleeps 50 ms:

  cold key     never cached: one caller runs the resolver, the callers in flight wait for it
  expired key  past ttl + stale_ttl: never served, loaded again once
  stale key    past ttl, within stale_ttl: served at once; one refresh task
               (oqron_cache.refresh) is enqueued and a Celery worker runs the resolver

The worker is real: with Redis, the demo starts `celery -A workers worker -l info` as a
subprocess (its broker queues under the demo's namespace); with --external-worker it uses one
that is already running (docker compose's); without Redis, it runs on the memory tier alone in
one process, with a Celery worker thread on an in-memory broker. It shows the worker's refresh
lines live and ends with a table of requests, resolver calls (and those in the worker),
stampedes prevented, stale values served, refreshes enqueued and deduplicated, the
refresh-to-visible latency, errors and latencies. Its keys live under the namespace
demo-<pid> and are deleted at the end, also after Ctrl-C.
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and its subcommand parsers by name."""
    parser = argparse.ArgumentParser(
        prog="oqron-cache",
        description="oqron-cache: a two-tier cache (in-process L1 + Redis L2) with "
        "cross-process stampede protection.",
        epilog="Run 'oqron-cache COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"oqron-cache {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="show stampede protection and background refresh by a Celery worker",
        description=_DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--redis-url",
        default=os.environ.get("OQRON_REDIS_URL") or DEFAULT_REDIS_URL,
        metavar="URL",
        help=f"Redis for the L2 tier (default: $OQRON_REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    demo.add_argument(
        "--requests",
        type=bounded_int(1, 100_000),
        metavar="N",
        help="requests per phase, spread over every process (default: 1000; 200 with --quick)",
    )
    demo.add_argument(
        "--processes",
        type=bounded_int(1, 16),
        metavar="N",
        help="processes sending requests, this one included (default: 4; 2 with --quick)",
    )
    demo.add_argument(
        "--threads",
        type=bounded_int(1, 200),
        metavar="N",
        help="threads per process, all started at the same instant; each sends its share of "
        "the requests one after the other (default: 25; 10 with --quick)",
    )
    demo.add_argument(
        "--external-worker",
        action="store_true",
        help="do not start a worker: use one already running (celery -A workers worker with "
        "OQRON_CACHE_MODULES=oqron_cache.demo.caches, as docker compose runs it) on the broker "
        "$OQRON_BROKER_URL (default: the Redis URL), in the namespace $OQRON_NAMESPACE (default: "
        "oqron); only the demo's own keys are deleted at the end",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smaller run (200 requests, 2 processes x 10 threads), for tests and slow machines",
    )

    version = commands.add_parser(
        "version",
        help="print the installed version",
        description="Print the version of oqron-cache.",
    )
    from .commands import add_commands

    add_commands(commands)  # stats, invalidate, inspect
    return parser, {"demo": demo, "version": version}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``oqron-cache`` command line with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit code: 0 on success, 1 if the command failed, 2 for a usage error.
    """
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        if args.command == "version":
            print(f"oqron-cache {__version__}")
            return 0
        if args.command != "demo":
            code: int = args.func(args)
            return code
        return _demo(args, commands["demo"])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `oqron-cache demo | head`: the reader left; leave quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..config import validate_redis_url
    from ..demo.run import DemoOptions, run_demo

    try:
        validate_redis_url(args.redis_url)
    except (ConfigurationError, TypeError) as exc:
        parser.print_usage(sys.stderr)
        print(f"oqron-cache demo: error: --redis-url: {exc}", file=sys.stderr)
        return 2
    requests = args.requests or (200 if args.quick else 1000)
    processes = args.processes or (2 if args.quick else 4)
    threads = args.threads or (10 if args.quick else 25)
    options = DemoOptions(
        args.redis_url, requests, processes, threads, external_worker=args.external_worker
    )
    if threading.current_thread() is not threading.main_thread():
        return run_demo(options)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, `kill`: clean up too
    try:
        return run_demo(options)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
