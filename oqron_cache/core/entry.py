"""The cache entry, its binary envelope in Redis, and the read-path decision.

Envelope layout (DESIGN section 7), one Redis string per entry::

    offset  size  field
    0       1     format version (1)
    1       1     flags: bit 0 = tombstone, bit 1 = written (a set or a delete, not a fill),
                  bits 4-7 = codec id
    2       8     entry version (random bytes; compared by Lua for compare-and-set)
    10      8     created_at   (float64, wall clock seconds)
    18      8     fresh_until  (float64)
    26      8     stale_until  (float64)
    34      8     delta        (float64, seconds the resolver took; for early refresh)
    42      2     n = length of the tags block
    44      n     tags, UTF-8 JSON list of str
    44+n    ...   value bytes, encoded by the codec named in flags

The version sits at a fixed offset so Lua can compare it with ``string.sub`` without decoding.
Anything that does not parse (wrong format byte, short, a pickle someone planted) is a miss.

The *written* flag orders writes against fills where a compare-and-set on the version cannot: a
value someone wrote (``set()``, a write-through chain, a delete's tombstone) replaces any fill,
whatever the fill's ``created_at``, because a fill's value was read from the origin at some
unknown instant before it; two writes are ordered by their ``created_at``.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1
_HEADER = struct.Struct(">BB8sddddH")
HEADER_SIZE = _HEADER.size  # 44
VERSION_OFFSET = 2
FLAG_TOMBSTONE = 0x01
FLAG_WRITTEN = 0x02
NO_VERSION = b""  # the "seen version" of an absent entry


def new_version() -> bytes:
    """A fresh random entry version (8 bytes)."""
    return os.urandom(8)


@dataclass(slots=True)
class Entry:
    """One cached value and its metadata, as read from or written to L2."""

    value: Any
    created_at: float
    fresh_until: float
    stale_until: float
    version: bytes
    tags: tuple[str, ...] = ()
    delta: float = 0.0
    tombstone: bool = False
    size: int = field(default=0, compare=False)
    written: bool = False  # a set() or a delete made it (FLAG_WRITTEN), not a fill


class Corrupt(Exception):
    """The bytes read from Redis are not an envelope this library wrote."""


def pack(entry: Entry, codec_id: int, payload: bytes) -> bytes:
    """Serialize ``entry``'s metadata around an already-encoded ``payload``."""
    tags = json.dumps(list(entry.tags), separators=(",", ":")).encode() if entry.tags else b""
    flags = (
        (codec_id << 4)
        | (FLAG_TOMBSTONE if entry.tombstone else 0)
        | (FLAG_WRITTEN if entry.written or entry.tombstone else 0)
    )
    header = _HEADER.pack(
        FORMAT,
        flags,
        entry.version,
        entry.created_at,
        entry.fresh_until,
        entry.stale_until,
        entry.delta,
        len(tags),
    )
    return header + tags + payload


def unpack(raw: bytes) -> tuple[Entry, int, memoryview]:
    """Parse an envelope; return the entry (value unset), the codec id and the payload bytes."""
    if len(raw) < HEADER_SIZE or raw[0] != FORMAT:
        raise Corrupt("not an oqron envelope")
    _fmt, flags, version, created, fresh, stale, delta, ntags = _HEADER.unpack_from(raw)
    end = HEADER_SIZE + ntags
    if len(raw) < end:
        raise Corrupt("truncated tags")
    tags: tuple[str, ...] = ()
    if ntags:
        try:
            decoded = json.loads(raw[HEADER_SIZE:end])
        except ValueError as exc:
            raise Corrupt("bad tags") from exc
        if not isinstance(decoded, list) or not all(isinstance(t, str) for t in decoded):
            raise Corrupt("bad tags")
        tags = tuple(decoded)
    entry = Entry(
        None,
        created,
        fresh,
        stale,
        version,
        tags,
        delta,
        bool(flags & FLAG_TOMBSTONE),
        len(raw),
        bool(flags & FLAG_WRITTEN),
    )
    return entry, flags >> 4, memoryview(raw)[end:]


class Action(enum.Enum):
    """What the read path does with what it found."""

    SERVE = "serve"  # fresh: return it
    SERVE_AND_REFRESH = "serve_and_refresh"  # stale, stale-while-revalidate: return it, refresh
    LOAD = "load"  # missing, expired, or stale without SWR: load it


def decide(fresh_until: float, stale_until: float, now: float, swr: bool) -> Action:
    """The read-path rule (DESIGN section 2), a pure function of the entry's times and ``now``.

    * ``now < fresh_until``                 -> SERVE
    * ``fresh_until <= now < stale_until``   -> SERVE_AND_REFRESH if ``swr`` else LOAD
      (a LOAD that fails may still fall back to the stale value: see ``CacheStack``)
    * ``now >= stale_until``                 -> LOAD; the value is never served (promise P3)
    """
    if now < fresh_until:
        return Action.SERVE
    if now < stale_until and swr:
        return Action.SERVE_AND_REFRESH
    return Action.LOAD
