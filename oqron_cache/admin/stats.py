"""``oqron-cache stats``: the cluster-wide counters of one cache or of every cache.

Reads the stats hashes each process flushes (see :mod:`oqron_cache.stats_sync`) and prints them
as JSON, as a table (:func:`render_table`) or as one cache's fields (:func:`render_detail`);
``--watch`` redraws them until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import redis

from ..config import mask_url
from ..core.keys import glob_literal, stats_key, unescape
from ..core.metrics import view
from .common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    AdminError,
    cache_name_arg,
    namespace_arg,
    redis_client,
    redis_failure,
)


def _read_stats(client: redis.Redis, namespace: str, only: str | None) -> dict[str, dict[str, Any]]:
    """Stats by cache name (sorted): of ``only``, or of every cache with a stats hash."""
    prefix = stats_key(namespace, "")  # what every cache's stats hash starts with
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


def run_stats(args: argparse.Namespace) -> int:
    namespace = namespace_arg(args)
    only = cache_name_arg(args.cache) if args.cache is not None else None
    with redis_client(args) as client:
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
                error = redis_failure(args.redis_url, exc)
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
