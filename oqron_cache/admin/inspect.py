"""``oqron-cache inspect``: one entry's L2 envelope, as a table or as JSON.

Shows its freshness, age, ``fresh_until`` and ``stale_until``, version, tags, size and codec, the
lock, and which tiers hold it; the value is decoded only with ``--value``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from typing import Any, cast

from ..core.codecs import Codec, get_codec
from ..core.entry import HEADER_SIZE, Corrupt, unpack
from ..core.errors import ConfigurationError
from ..core.keys import KeySpace
from .common import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    AdminError,
    cache_name_arg,
    namespace_arg,
    one_line,
    redis_client,
)

L1_NOTE = "per process (not visible from here)"


def _codec_by_id(codec_id: int) -> Codec | None:
    """The untyped codec that reads ``codec_id``: typed values (ids 3 and 4) are shown as plain
    JSON / msgpack, since their type lives in the application, not in Redis."""
    codec_name = {1: "json", 2: "msgpack", 3: "json", 4: "msgpack"}.get(codec_id)
    if codec_name is None:
        return None
    try:
        return get_codec(codec_name)
    except ConfigurationError:  # msgpack not installed here
        return None


def _codec_name(codec_id: int) -> str:
    names = {1: "json", 2: "msgpack", 3: "typed json", 4: "typed msgpack"}
    return names.get(codec_id, "unknown")  # ids fixed by the envelope


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


def run_inspect(args: argparse.Namespace) -> int:
    namespace = namespace_arg(args)
    name = cache_name_arg(args.cache)
    key = args.key
    if not key:
        raise AdminError(EXIT_USAGE, "KEY: keys are never empty")
    keyspace = KeySpace(namespace, name, args.max_key_bytes)
    value_key = keyspace.value(key)
    with redis_client(args) as client:
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
                value = codec.read(codec_id, payload)
            except Exception as exc:  # any decoder failure means: not a value we wrote
                value_text = f"cannot decode with {codec.name}: {one_line(exc)}"
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
