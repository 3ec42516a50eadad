"""The admin commands of ``oqron-cache``: ``stats``, ``invalidate`` and ``inspect``.

They work without the application's code: a cache is known by its name only. ``stats`` reads the
cluster-wide counters (the hash each process flushes, see :mod:`oqron_cache.stats_sync`);
``invalidate`` runs the library's own delete / pattern / tag invalidation on an unregistered,
Redis-only stand-in of the cache (so every process's L1 drops the entries through the bus), or
sends the invalidation task by name to a Celery broker (``--via-celery``); ``inspect`` reads one
entry's envelope from L2.

:func:`add_commands` registers the three commands on an ``argparse`` subparsers object; each sets
``func`` (``args.func(args)`` returns the exit code). :func:`main` runs them alone.

Exit codes: 0 done; 1 nothing found or matched; 2 usage error; 3 Redis (or the broker) could not
be reached, or refused us.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import mask_url, validate_redis_url
from .entry import HEADER_SIZE, Corrupt, unpack
from .errors import ConfigurationError
from .frontend import Cache, _matches_everything
from .keys import (
    Glob,
    KeySpace,
    bus_channel,
    glob_literal,
    stats_key,
    unescape,
    validate_cache_name,
)
from .keys import validate_namespace as _validate_namespace
from .metrics import Stats, view
from .options import CacheOptions, RedisTier, Stampede
from .serializers import Codec, get_codec
from .stack import MAX_TAG_BYTES, CacheStack
from .tasks import (
    INVALIDATE_PATTERN_TASK,
    INVALIDATE_TAG_TASK,
    INVALIDATE_TASK,
    MAX_KEY_CHARS,
    MAX_KEYS_PER_TASK,
)
from .tiers.redis import RedisConn, RedisStore

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "oqron"
# The stand-in's lock_ttl only sizes the tombstones it writes (2 x lock_ttl): long enough for a
# load begun before the invalidation under any usual application lock_ttl (up to a minute).
ADMIN_LOCK_TTL = 60.0
L1_NOTE = "per process (not visible from here)"

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


class AdminError(Exception):
    """A command failed: ``code`` is its exit code, the message is one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ parser


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
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
            type=_bounded_int(16, 1 << 20),
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
    stats.add_argument("--iterations", type=_bounded_int(1, 1 << 30), help=argparse.SUPPRESS)
    stats.add_argument("--interval", type=_seconds, default=1.0, help=argparse.SUPPRESS)
    stats.set_defaults(func=functools.partial(_run, _stats, stats))

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
    inv.set_defaults(func=functools.partial(_run, _invalidate, inv))

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
    insp.set_defaults(func=functools.partial(_run, _inspect, insp))


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


# ------------------------------------------------------------------ Redis


def _usage(what: str, exc: Exception) -> AdminError:
    return AdminError(EXIT_USAGE, f"{what}: {exc}")


def _namespace(args: argparse.Namespace) -> str:
    try:
        return _validate_namespace(args.namespace)
    except (ConfigurationError, TypeError) as exc:
        raise _usage("--namespace", exc) from None


def _cache_name(name: str) -> str:
    try:
        return validate_cache_name(name)
    except (ConfigurationError, TypeError) as exc:
        raise _usage("CACHE", exc) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _redis_failure(url: str, exc: BaseException) -> AdminError:
    where = f"Redis at {mask_url(url)}"
    if isinstance(exc, redis.AuthenticationError) or any(
        word in str(exc) for word in ("NOAUTH", "WRONGPASS", "NOPERM")
    ):
        return AdminError(EXIT_UNREACHABLE, f"{where} refused access ({_one_line(exc)})")
    if isinstance(exc, redis.TimeoutError):
        return AdminError(EXIT_UNREACHABLE, f"{where} did not answer in time ({_one_line(exc)})")
    if isinstance(exc, redis.ResponseError):
        return AdminError(EXIT_UNREACHABLE, f"{where} refused the command ({_one_line(exc)})")
    return AdminError(EXIT_UNREACHABLE, f"{where} is unreachable ({_one_line(exc)})")


@contextlib.contextmanager
def _redis(args: argparse.Namespace) -> Iterator[redis.Redis]:
    """A client of ``--redis-url`` that answered PING; Redis failures inside become exit 3."""
    url = args.redis_url
    try:
        validate_redis_url(url)
        client = redis.Redis.from_url(
            url,
            socket_timeout=args.timeout,
            socket_connect_timeout=args.timeout,
            retry=Retry(NoBackoff(), 1),
            retry_on_timeout=False,
            client_name="oqron-cache-admin",
        )
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise _usage("--redis-url", exc) from None
    try:
        client.ping()
        yield client
    except BrokenPipeError:  # our stdout's reader left (see _run), not Redis
        raise
    except (redis.RedisError, OSError) as exc:
        raise _redis_failure(url, exc) from None
    finally:
        client.close()


# ------------------------------------------------------------------ stats


def _read_stats(client: redis.Redis, namespace: str, only: str | None) -> dict[str, dict[str, Any]]:
    """Stats by cache name (sorted): of ``only``, or of every cache with a stats hash."""
    prefix = f"oqron:{namespace}:stats:"
    keys: list[bytes | str]
    if only is not None:
        keys = [stats_key(namespace, only)]
    else:
        match = glob_literal(prefix) + "*"
        keys = sorted(set(client.scan_iter(match=match, count=500)))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(cast("str", key))  # bytes work too; the stubs say str
    out: dict[str, dict[str, Any]] = {}
    for key, reply in zip(keys, pipe.execute(raise_on_error=False), strict=True):
        if not isinstance(reply, dict) or not reply:
            continue  # absent, or not a hash (someone else's key)
        raw: dict[str, float] = {}
        for field, value in reply.items():
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                raw[field.decode()] = float(value)
        text = key if isinstance(key, str) else key.decode("utf-8", "replace")
        out[unescape(text[len(prefix) :])] = {**view(raw), "scope": "cluster"}
    return out


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def _ms(value: float) -> str:
    return f"{value:.3f}"


_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("gets", lambda s: str(s["gets"])),
    ("hit rate", lambda s: _pct(s["hit_rate"]) if s["gets"] else "-"),
    ("misses", lambda s: str(s["misses"])),
    ("stale served", lambda s: str(s["stale_served"])),
    ("stampede prevented", lambda s: str(s["stampede_prevented"])),
    ("resolver calls", lambda s: str(s["resolver_calls"])),
    ("l2 errors", lambda s: str(s["l2_errors"])),
    ("evictions", lambda s: str(s["evictions"])),
    ("L1 ms", lambda s: _ms(s["avg_latency_ms"]["memory"])),
    ("L2 ms", lambda s: _ms(s["avg_latency_ms"]["redis"])),
    ("resolver ms", lambda s: _ms(s["avg_latency_ms"]["resolver"])),
)


def render_table(stats: dict[str, dict[str, Any]], rates: dict[str, str] | None = None) -> str:
    """The one-row-per-cache table (``rates``: a gets/s column, when watching)."""
    header = ["cache", *(name for name, _ in _COLUMNS)]
    if rates is not None:
        header.insert(2, "gets/s")
    rows = [header]
    for name, s in stats.items():
        row = [name, *(cell(s) for _, cell in _COLUMNS)]
        if rates is not None:
            row.insert(2, rates.get(name, "-"))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def render_detail(name: str, namespace: str, s: dict[str, Any], rate: str | None = None) -> str:
    """Every field of one cache's stats, one per line, named as in ``get_stats()``."""
    lines = [f"cache {name} (namespace {namespace}), summed over every process"]
    fields: list[tuple[str, str]] = []
    if rate is not None:
        fields.append(("gets/s", rate))
    for field, value in s.items():
        if field == "scope":
            continue
        if field == "avg_latency_ms":
            fields += [(f"avg_latency_ms.{tier}", _ms(ms)) for tier, ms in value.items()]
        elif field == "hit_rate":
            fields.append((field, _pct(value)))
        else:
            fields.append((field, str(value)))
    width = max(len(field) for field, _ in fields)
    lines += [f"  {field.ljust(width)}  {value}" for field, value in fields]
    return "\n".join(lines)


def _stats(args: argparse.Namespace) -> int:
    namespace = _namespace(args)
    only = _cache_name(args.cache) if args.cache is not None else None
    with _redis(args) as client:
        if args.watch:
            return _watch(args, client, namespace, only)
        found = _read_stats(client, namespace, only)
    if args.json:
        if only is not None:
            doc: dict[str, Any] = {"namespace": namespace, "cache": only, "stats": found.get(only)}
        else:
            doc = {"namespace": namespace, "caches": found}
        print(json.dumps(doc, indent=2))
    elif only is not None and only in found:
        print(render_detail(only, namespace, found[only]))
    elif found:
        print(render_table(found))
    if not found:
        what = f"cache {only!r}" if only is not None else "any cache"
        raise AdminError(
            EXIT_NOT_FOUND,
            f"no stats for {what} in namespace {namespace!r} at {mask_url(args.redis_url)} "
            "(never used with a Redis tier, idle for 30 days, or another namespace?)",
        )
    return EXIT_OK


def _watch(args: argparse.Namespace, client: redis.Redis, namespace: str, only: str | None) -> int:
    """Redraw the stats every ``--interval`` seconds until Ctrl-C (or ``--iterations``)."""
    tty = sys.stdout.isatty()
    previous: dict[str, tuple[float, int]] = {}
    frame = 0
    try:
        while True:
            started = time.monotonic()
            stamp = _dt.datetime.now().strftime("%H:%M:%S")
            try:
                found = _read_stats(client, namespace, only)
            except (redis.RedisError, OSError) as exc:
                if frame == 0:
                    raise
                error = _redis_failure(args.redis_url, exc)
                found, body = {}, f"{stamp}  {error} - retrying"
            else:
                body = ""
            rates: dict[str, str] = {}
            for name, s in found.items():
                if name in previous:
                    then, gets = previous[name]
                    rates[name] = f"{(s['gets'] - gets) / max(started - then, 1e-9):.1f}"
                previous[name] = (started, s["gets"])
            if args.json:
                if not body:
                    doc = {"time": time.time(), "namespace": namespace, "caches": found}
                    print(json.dumps(doc), flush=True)
            else:
                if not body:
                    if only is not None and only in found:
                        body = render_detail(only, namespace, found[only], rates.get(only, "-"))
                    elif found:
                        body = render_table(found, rates)
                    else:
                        body = "(no stats yet)"
                    every = f"{args.interval:g}s"
                    body = f"{stamp}  namespace {namespace}, every {every}, Ctrl-C to stop\n{body}"
                prefix = "\x1b[H\x1b[2J" if tty else ("\n" if frame else "")
                sys.stdout.write(f"{prefix}{body}\n")
                sys.stdout.flush()
            frame += 1
            if args.iterations is not None and frame >= args.iterations:
                return EXIT_OK
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:  # how a watch ends
        return EXIT_OK


# ------------------------------------------------------------------ invalidate


class _Conn(RedisConn):
    """A RedisConn that remembers its failures for the one-line message instead of logging."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.failures: list[str] = []

    def _failed(self, kind: str, exc: BaseException) -> None:
        self.failures.append(f"{kind}: {_one_line(exc)}")


class _StandIn(Cache):
    """A Redis-only cache of a given name, bound to a stack built here and never registered.

    The admin command line knows caches by name only; this runs the library's own delete and
    invalidation code on the cache's keys without declaring it (a process that declared the
    real cache keeps its registration). ``Cache.__init__`` is not called: it registers.
    """

    def __init__(self, options: CacheOptions, stack: CacheStack) -> None:
        self.options = options
        self.name = options.name
        self.clock = None
        self.stats = stack.stats
        self._stack = stack


def stand_in(client: redis.Redis, namespace: str, name: str, max_key_bytes: int) -> Cache:
    """A :class:`~oqron_cache.frontend.Cache` of ``name`` that only knows its Redis keys."""
    ttl = 1.0  # unused: the stand-in never fills
    options = CacheOptions(
        name=name,
        ttl=ttl,
        stale_ttl=0.0,
        l1=None,
        l2=RedisTier(ttl=ttl),
        stampede=Stampede(lock_ttl=ADMIN_LOCK_TTL),
        strategy="fixed",
        resolver=None,
        tags=None,
        write_through=None,
        miss="inline",
        codec="json",
        max_value_bytes=1 << 20,
        max_key_bytes=max_key_bytes,
    )
    store = RedisStore(
        _Conn(client), KeySpace(namespace, name, max_key_bytes), bus_channel(namespace)
    )
    stack = CacheStack(options, get_codec("json"), None, store, None, Stats(), time.time)
    return _StandIn(options, stack)


def _check_target(args: argparse.Namespace) -> None:
    """Usage errors of the key/pattern/tag, found before any connection."""
    if args.key is not None:
        if any(not key for key in args.key):
            raise AdminError(EXIT_USAGE, "--key: keys are never empty")
        if args.via_celery and len(args.key) > MAX_KEYS_PER_TASK:
            raise AdminError(EXIT_USAGE, f"--key: at most {MAX_KEYS_PER_TASK} keys per task")
        if args.via_celery and any(len(key) > MAX_KEY_CHARS for key in args.key):
            raise AdminError(
                EXIT_USAGE, f"--key: a task takes keys of at most {MAX_KEY_CHARS} chars"
            )
    elif args.pattern is not None:
        if not args.pattern:
            raise AdminError(EXIT_USAGE, "--pattern: a pattern must not be empty")
        if _matches_everything(args.pattern):
            if args.via_celery:
                raise AdminError(
                    EXIT_USAGE,
                    f"--pattern {args.pattern!r} matches the whole cache, which the "
                    "invalidate_pattern task refuses; drop --via-celery and add --all",
                )
            if not args.all:
                raise AdminError(
                    EXIT_USAGE,
                    f"--pattern {args.pattern!r} would drop the whole cache {args.cache!r}; "
                    "add --all if that is what you mean",
                )
        if len(args.pattern) > 1024:
            raise AdminError(EXIT_USAGE, "--pattern: at most 1024 characters")
        try:
            Glob(args.pattern)
        except ConfigurationError as exc:
            raise AdminError(EXIT_USAGE, f"--pattern: {exc}") from None
    else:
        size = len(args.tag.encode("utf-8", "surrogatepass"))
        if not 1 <= size <= MAX_TAG_BYTES:
            raise AdminError(EXIT_USAGE, f"--tag: a tag holds 1..{MAX_TAG_BYTES} bytes; got {size}")


def _invalidate(args: argparse.Namespace) -> int:
    namespace = _namespace(args)
    name = _cache_name(args.cache)
    _check_target(args)
    if args.via_celery:
        return _send_task(args, name)
    with _redis(args) as client:
        cache = stand_in(client, namespace, name, args.max_key_bytes)
        stats = cache.stats
        if args.key is not None:
            keys = list(dict.fromkeys(args.key))
            present = _present(client, cache, keys)
            for key in keys:
                cache.delete(key)
            removed = len(present)
            if len(keys) == 1:
                done = f"deleted key {keys[0]!r}"
                none = f"no entry had key {keys[0]!r}"
            else:
                done = f"deleted {removed} of {len(keys)} keys"
                none = f"no entry had any of the {len(keys)} keys"
            none += " (tombstones were written anyway: loads in flight cannot write back)"
        elif args.pattern is not None:
            removed = cache.invalidate_pattern(args.pattern, allow_all=args.all)
            done = f"deleted {_entries(removed)} matching {args.pattern!r}"
            none = f"no entry matched {args.pattern!r}"
        else:
            removed = cache.invalidate_by_tag(args.tag)
            done = f"deleted {_entries(removed)} tagged {args.tag!r}"
            none = f"no entry carried tag {args.tag!r}"
        if stats.counts["l2_errors"]:  # the library degrades quietly; a command must not
            l2 = cache.stack.l2
            failures = l2.conn.failures if l2 is not None and isinstance(l2.conn, _Conn) else []
            cause = f" ({failures[0]})" if failures else ""
            raise AdminError(
                EXIT_UNREACHABLE,
                f"Redis at {mask_url(args.redis_url)} failed during the invalidation{cause}; "
                "it may be partial: run it again",
            )
    if not removed:
        raise AdminError(EXIT_NOT_FOUND, f"cache {name}: {none}")
    print(f"cache {name}: {done} from L2; every process's L1 was told to drop them")
    return EXIT_OK


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _present(client: redis.Redis, cache: Cache, keys: list[str]) -> list[str]:
    """The keys of ``keys`` that hold an entry in L2 (not a tombstone)."""
    store = cache.stack.l2
    assert store is not None
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(store.keys.value(key))
    found = []
    for key, raw in zip(keys, pipe.execute(), strict=True):
        if raw is None:
            continue
        try:
            entry, _codec, _payload = unpack(raw)
        except Corrupt:
            found.append(key)  # something is there; the delete removes it
            continue
        if not entry.tombstone:
            found.append(key)
    return found


def _send_task(args: argparse.Namespace, name: str) -> int:
    """Send the invalidation task by name (``app.send_task``) to the broker."""
    from celery import Celery
    from kombu.exceptions import KombuError

    broker = args.broker or args.redis_url
    if args.key is not None:
        task, task_args = INVALIDATE_TASK, [name, list(dict.fromkeys(args.key))]
    elif args.pattern is not None:
        task, task_args = INVALIDATE_PATTERN_TASK, [name, args.pattern]
    else:
        task, task_args = INVALIDATE_TAG_TASK, [name, args.tag]
    app = Celery("oqron-cache-admin", broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_timeout=args.timeout,
        broker_transport_options={"socket_timeout": args.timeout},
    )
    where = f"broker at {mask_url(broker)}"
    try:
        result = app.send_task(
            task,
            args=task_args,
            queue=args.queue,
            serializer="json",
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
        )
    except (KombuError, OSError, redis.RedisError) as exc:
        raise AdminError(EXIT_UNREACHABLE, f"{where} is unreachable ({_one_line(exc)})") from None
    except (KeyError, ValueError, ImportError) as exc:  # kombu: unknown transport, bad URL
        raise AdminError(EXIT_USAGE, f"--broker {mask_url(broker)}: {_one_line(exc)}") from None
    finally:
        with contextlib.suppress(Exception):  # closing is best effort
            app.close()
    print(
        f"sent {task} {json.dumps(task_args[1:])[1:-1]} for cache {name} to queue {args.queue} "
        f"on the {where} (task id {result.id}); a worker with cache {name!r} registered runs it"
    )
    return EXIT_OK


# ------------------------------------------------------------------ inspect


def _codec_by_id(codec_id: int) -> Codec | None:
    for codec_name in ("json", "msgpack"):
        with contextlib.suppress(ConfigurationError):
            codec = get_codec(codec_name)
            if codec.codec_id == codec_id:
                return codec
    return None


def _codec_name(codec_id: int) -> str:
    return {1: "json", 2: "msgpack"}.get(codec_id, "unknown")  # ids fixed by the envelope


def human_seconds(seconds: float) -> str:
    """A short duration: ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _relative(instant: float, now: float) -> str:
    delta = instant - now
    return f"in {human_seconds(delta)}" if delta >= 0 else f"{human_seconds(delta)} ago"


def _when(instant: float, now: float) -> str:
    try:
        text = _dt.datetime.fromtimestamp(instant).astimezone().isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        text = repr(instant)
    return f"{text} ({_relative(instant, now)})"


def _jsonable(value: object) -> str:
    return repr(value)  # bytes (msgpack) and anything else JSON has no form for: shown as repr


def _inspect(args: argparse.Namespace) -> int:
    namespace = _namespace(args)
    name = _cache_name(args.cache)
    key = args.key
    if not key:
        raise AdminError(EXIT_USAGE, "KEY: keys are never empty")
    keyspace = KeySpace(namespace, name, args.max_key_bytes)
    value_key = keyspace.value(key)
    with _redis(args) as client:
        pipe = client.pipeline(transaction=False)
        pipe.get(value_key)
        pipe.pttl(value_key)
        pipe.pttl(keyspace.lock(key))
        raw, value_pttl, lock_pttl = pipe.execute()
    now = time.time()
    doc: dict[str, Any] = {
        "cache": name,
        "namespace": namespace,
        "key": key,
        "redis_key": value_key,
        "hashed_key": keyspace.encoded(key).startswith("#"),
    }
    lock_s = lock_pttl / 1000 if lock_pttl > 0 else None
    if raw is None:
        raise _missing(args, doc, "absent", f"key {key!r} is not in L2", lock_s)
    raw = cast("bytes", raw)
    try:
        entry, codec_id, payload = unpack(raw)
    except Corrupt as exc:
        raise _missing(
            args,
            doc,
            "corrupt",
            f"the L2 entry of {key!r} is not an oqron envelope ({exc})",
            lock_s,
        ) from None
    redis_ttl = value_pttl / 1000 if value_pttl > 0 else None
    if entry.tombstone:
        doc["deleted_at"] = entry.created_at
        doc["redis_ttl_s"] = redis_ttl
        raise _missing(
            args,
            doc,
            "deleted",
            f"key {key!r} was deleted {_relative(entry.created_at, now)} (a tombstone "
            "blocks loads that began before it)",
            lock_s,
        )
    if now < entry.fresh_until:
        state = "fresh"
    elif now < entry.stale_until:
        state = "stale"
    else:
        state = "expired"
    doc.update(
        {
            "found": True,
            "state": state,
            "age_s": now - entry.created_at,
            "created_at": entry.created_at,
            "fresh_until": entry.fresh_until,
            "stale_until": entry.stale_until,
            "redis_ttl_s": redis_ttl,
            "version": entry.version.hex(),
            "tags": list(entry.tags),
            "size_bytes": entry.size,
            "value_bytes": len(payload),
            "codec": _codec_name(codec_id),
            "codec_id": codec_id,
            "resolver_s": entry.delta,
            "lock_ttl_s": lock_s,
            "tiers": {"l2": True, "l1": L1_NOTE},
        }
    )
    code = EXIT_OK
    value_text = ""
    if args.value:
        codec = _codec_by_id(codec_id)
        if codec is None:
            value_text = f"cannot decode: codec id {codec_id} is not known here"
            doc["value_error"] = value_text
            code = EXIT_NOT_FOUND
        else:
            try:
                value = codec.decode(payload)
            except Exception as exc:  # any decoder failure means: not a value we wrote
                value_text = f"cannot decode with {codec.name}: {_one_line(exc)}"
                doc["value_error"] = value_text
                doc["state"] = "corrupt"
                code = EXIT_NOT_FOUND
            else:
                doc["value"] = value
                # msgpack values may hold bytes and int dict keys: Python's repr shows them as-is.
                value_text = (
                    json.dumps(value, ensure_ascii=False) if codec.name == "json" else repr(value)
                )
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False, default=_jsonable))
        return code
    rows = [
        ("cache", f"{name} (namespace {namespace})"),
        ("key", key),
        (
            "redis key",
            value_key + ("  (hashed: longer than --max-key-bytes)" if doc["hashed_key"] else ""),
        ),
        (
            "freshness",
            state + (" (never served again; Redis drops it soon)" if state == "expired" else ""),
        ),
        ("age", human_seconds(now - entry.created_at)),
        ("created", _when(entry.created_at, now)),
        ("fresh_until", _when(entry.fresh_until, now)),
        ("stale_until", _when(entry.stale_until, now)),
        ("redis ttl", human_seconds(redis_ttl) if redis_ttl is not None else "none"),
        ("version", entry.version.hex()),
        ("tags", ", ".join(entry.tags) if entry.tags else "(none)"),
        (
            "size",
            f"{entry.size} bytes (value {len(payload)}, header {HEADER_SIZE}, "
            f"tags {entry.size - HEADER_SIZE - len(payload)})",
        ),
        ("codec", f"{_codec_name(codec_id)} (id {codec_id})"),
        ("resolver time", f"{entry.delta * 1000:.1f} ms"),
        (
            "lock",
            f"held, {human_seconds(lock_s)} left (a load or refresh is running)"
            if lock_s
            else "free",
        ),
        ("tiers", f"L2: yes; L1: {L1_NOTE}"),
    ]
    if args.value:
        rows.append(("value", value_text))
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label.ljust(width)}  {text}" for label, text in rows))
    return code


def _missing(
    args: argparse.Namespace, doc: dict[str, Any], state: str, message: str, lock_s: float | None
) -> AdminError:
    """Print (with --json) what was found instead of an entry; the error to raise (exit 1)."""
    doc.update({"found": False, "state": state, "lock_ttl_s": lock_s})
    doc["tiers"] = {"l2": False, "l1": L1_NOTE}
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    ns = doc["namespace"]
    return AdminError(EXIT_NOT_FOUND, f"cache {doc['cache']} (namespace {ns}): {message}")


if __name__ == "__main__":
    raise SystemExit(main())
