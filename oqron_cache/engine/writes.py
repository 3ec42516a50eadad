"""Writes: a resolved or set value becomes an envelope in L2 and a copy in L1; a delete a tombstone.

Every write to L2 is one Lua call on the entry's key: a fill only lands if the entry's version is
still the one its load saw (P5), a set always lands, a delete leaves a tombstone that makes older
fills fail. Each announces itself on the bus. A set or delete that L2 cannot take is deferred
and replayed when it answers (:mod:`.recovery`, P14). These are functions of the
:class:`~oqron_cache.stack.CacheStack` whose entry they write.

A load is based on one read of L2 (:class:`Basis`): the version it saw, when, and the key's L1
generation then. Its fill is a compare-and-set on that version; a cold load (no entry seen) older
than the tombstone's lifetime is refused, since a delete made meanwhile may have left a tombstone
that has expired since. So a delete always beats a load that began before it (P5).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.entry import NO_VERSION, Entry, new_version, pack
from ..core.errors import ConfigurationError
from ..core.keys import printable
from ..redis.store import L2Unavailable
from .invalidation import after_fill_steps
from .steps import L2, Step, drive

if TYPE_CHECKING:
    from .stack import CacheStack

log = logging.getLogger("oqron_cache")

MAX_TAG_BYTES = 256  # with max_tags <= 200 the tag block always fits the envelope's 16-bit length
NEVER = 1 << 62  # "the load began at the end of time": no invalidation can postdate it

# What store() did with a loaded value.
STORED = "stored"
OVERSIZE = "oversize"  # too large to cache (P9): returned, not kept
CONFLICT = "conflict"  # a newer write or a delete won the compare-and-set (P5)
WITHDRAWN = "withdrawn"  # a pattern or tag invalidation raced the load
TOO_OLD = "too-old"  # a cold load older than a tombstone's lifetime: it cannot be ordered


@dataclass(slots=True)
class Basis:
    """What a load is based on: the read of L2 whose entry its value replaces.

    ``seen`` is the entry version read (``NO_VERSION``: none); ``stamp`` the key's L1
    generation before the read; ``began`` ``time.monotonic()`` and ``wall`` the cache's clock
    before the read (0: not known); ``started_us`` Redis's clock at the read when known (else
    derived from the fill's clock and the age); ``token`` the key's lock, if this load holds it.
    """

    seen: bytes = NO_VERSION
    stamp: int = -1
    began: float = 0.0
    started_us: int | None = None
    token: str = ""
    wall: float = 0.0


def make_entry(
    stack: CacheStack,
    key: str,
    value: Any,
    delta: float,
    written: bool = False,
    began: float = 0.0,
) -> Entry:
    """A new entry of ``value``, made now (a write) or by a load that began at ``began`` (a
    fill). Its ``created_at`` and the start of its ``ttl`` are that instant: a value a slow
    resolver read long ago is not fresh for a whole ``ttl`` from when it lands (P3), and a
    write-through cache link yields to a fill only if the fill began after its origin write.
    """
    made = began or stack.clock()
    fresh_until = made + stack.opts.ttl
    return Entry(
        value,
        made,
        fresh_until,
        fresh_until + stack.opts.stale_ttl,
        new_version(),
        entry_tags(stack, key, value),
        delta,
        written=written,
    )


def entry_tags(stack: CacheStack, key: str, value: Any) -> tuple[str, ...]:
    if stack.opts.tags is None:
        return ()
    tags = stack.opts.tags(key, value)
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise TypeError(f"tags function of cache {stack.name!r} must return a list of str")
    out = tuple(tags)
    if not all(type(t) is str and t for t in out):
        raise TypeError(f"tags of cache {stack.name!r} must be non-empty str")
    too_long = [t for t in out if len(t.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES]
    if too_long:
        raise ConfigurationError(
            f"cache {stack.name!r}: a tag of {len(too_long[0])} chars is longer than "
            f"{MAX_TAG_BYTES} bytes"
        )
    if len(out) > stack.opts.max_tags:
        raise ConfigurationError(
            f"cache {stack.name!r}: {len(out)} tags on one entry, "
            f"more than max_tags={stack.opts.max_tags}"
        )
    return out


def encode(stack: CacheStack, key: str, entry: Entry) -> bytes | None:
    """The envelope of ``entry``, or ``None`` if its value is too large to cache (P9)."""
    payload = stack.codec.encode(entry.value, stack.name)
    if len(payload) > stack.opts.max_value_bytes:
        stack.stats.incr("oversize")
        log.warning(
            "cache %s: value for %s is %d bytes > max_value_bytes=%d; returned, not cached",
            stack.name,
            printable(key),
            len(payload),
            stack.opts.max_value_bytes,
        )
        return None
    return pack(entry, stack.codec.codec_id, payload)


def store(
    stack: CacheStack, key: str, value: Any, basis: Basis, delta: float, keep_lock: bool = False
) -> str:
    """:func:`store_steps` on this thread."""
    return drive(store_steps(stack, key, value, basis, delta, keep_lock), stack.l2)


def store_steps(
    stack: CacheStack, key: str, value: Any, basis: Basis, delta: float, keep_lock: bool = False
) -> Step[str]:
    """Write a loaded value to L2 (only if still at ``basis.seen``) and to L1.

    Returns :data:`STORED`, or why it was not cached (:data:`OVERSIZE`, :data:`CONFLICT`,
    :data:`WITHDRAWN`, :data:`TOO_OLD`). The lock ``basis.token`` is released, except for an
    oversize value with ``keep_lock`` (a refresh keeps it as a throttle, as after a failure).
    """
    token = basis.token
    try:
        entry = make_entry(stack, key, value, delta, began=basis.wall)
        # Encoded even without L2: the same values are cacheable whatever the tiers, and
        # max_value_bytes bounds L1 too (P9).
        envelope = encode(stack, key, entry)
    except BaseException:
        if token:
            yield from stack._release_steps(key, token)
        raise
    if envelope is None:
        if token and not keep_lock:
            yield from stack._release_steps(key, token)
        return OVERSIZE
    if entry.stale_until <= stack.clock():
        # The load took longer than ttl + stale_ttl: its value may be returned to the callers
        # that waited for it, but it is already past what may ever be served again (P3).
        stack.stats.incr("fills_too_old")
        if token:
            yield from stack._release_steps(key, token)
        return TOO_OLD
    if stack.l2 is not None:
        age = _age(basis)
        try:
            outcome, now_us = yield (
                L2,
                "fill",
                (
                    key,
                    basis.seen,
                    envelope,
                    stack.opts.ttl + stack.opts.stale_ttl,
                    token,
                    stack._message("fill", [key]),
                    age,
                    stack._tombstone_ttl,
                ),
            )
        except L2Unavailable:
            stack.stats.incr("l2_errors")
            if token:  # the fill may not have run: its lock must not outlive us (P14)
                stack._defer_release(key, token)
        else:
            if outcome == 0:
                # A newer set or an invalidation landed while we computed: it wins (P5).
                stack.stats.incr("l2_write_conflicts")
                return CONFLICT
            if outcome == 2:
                stack.stats.incr("fills_too_old")
                log.warning(
                    "cache %s: the load of %s took %.1fs, longer than a delete's tombstone "
                    "lives (%.0fs): returned, not cached (raise lock_ttl for slow resolvers)",
                    stack.name,
                    printable(key),
                    age,
                    stack._tombstone_ttl,
                )
                return TOO_OLD
            started_us = basis.started_us
            if started_us is None:  # the first read failed: the load began ``age`` ago
                started_us = now_us - int(age * 1_000_000)
            if not (yield from after_fill_steps(stack, key, entry, started_us)):
                return WITHDRAWN  # a pattern/tag invalidation raced the load
    stack._put_l1(key, entry, basis.stamp)
    return STORED


def _age(basis: Basis) -> float:
    """How long ago the load began (0 if not known)."""
    return max(0.0, time.monotonic() - basis.began) if basis.began else 0.0


def write(stack: CacheStack, key: str, value: Any) -> None:
    """:func:`write_steps` on this thread."""
    drive(write_steps(stack, key, value), stack.l2)


def write_steps(stack: CacheStack, key: str, value: Any) -> Step[None]:
    """Write ``value`` to every tier and tell other processes to drop their copy."""
    stack.stats.incr("sets")
    entry = make_entry(stack, key, value, 0.0, written=True)
    envelope = encode(stack, key, entry)
    if envelope is None:  # too large to cache: at least stop serving the old value
        yield from remove_steps(stack, key)
        return
    ticket = stack.l1.begin_write(key) if stack.l1 is not None else 0
    try:
        if stack.l2 is not None:
            ttl = stack.opts.ttl + stack.opts.stale_ttl
            try:
                yield (L2, "put", (key, envelope, ttl, stack._message("evict", [key])))
            except L2Unavailable:
                stack.stats.incr("l2_errors")
                stack._defer_write(key, entry, envelope, ttl)
            else:
                stack._settled(key)
                if entry.tags:  # a written value is new data: index it, nothing to withdraw
                    yield from after_fill_steps(stack, key, entry, NEVER)
    finally:
        stack.flights.forget([key])  # later reads must not join a load older than this write
        if stack.l1 is not None:
            item = stack._l1_item(entry) if stack._l1_writable() else None
            stack.l1.end_write(key, item, ticket)


def remove(stack: CacheStack, key: str) -> None:
    """:func:`remove_steps` on this thread."""
    drive(remove_steps(stack, key), stack.l2)


def remove_steps(stack: CacheStack, key: str) -> Step[None]:
    """Remove ``key`` from every tier and every process's L1.

    L2 keeps a tombstone with a new version for ``stack._tombstone_ttl``, so a load or refresh
    that began before the delete cannot write its older value back (its compare-and-set fails,
    or, once the tombstone is gone, it is too old to be stored).
    """
    stack.stats.incr("deletes")
    if stack.l1 is not None:
        stack.l1.evict(key)  # stop serving it at once
    if stack.l2 is None:
        return
    now = stack.clock()
    tomb = Entry(None, now, now, now, new_version(), tombstone=True)
    envelope = pack(tomb, stack.codec.codec_id, b"")
    message = stack._message("evict", [key])
    try:
        yield (L2, "tombstone", (key, envelope, stack._tombstone_ttl, message))
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        stack._defer_write(key, tomb, envelope, stack._tombstone_ttl)
    else:
        stack._settled(key)
    stack.flights.forget([key])  # later reads must not join a load that began before this
    if stack.l1 is not None:
        stack.l1.evict(key)  # reads that began during the call must not put the value back


def write_many_steps(stack: CacheStack, values: dict[str, Any]) -> Step[None]:
    """:func:`write_steps` for many keys, their L2 writes in one pipelined round trip."""
    written: list[tuple[str, Entry, bytes]] = []
    for key, value in values.items():
        entry = make_entry(stack, key, value, 0.0, written=True)
        envelope = encode(stack, key, entry)
        if envelope is None:  # too large to cache: at least stop serving the old value
            stack.stats.incr("sets")
            yield from remove_steps(stack, key)
        else:
            written.append((key, entry, envelope))
    if not written:
        return
    stack.stats.incr("sets", len(written))
    tickets = [stack.l1.begin_write(key) if stack.l1 is not None else 0 for key, _, _ in written]
    try:
        if stack.l2 is not None:
            ttl = stack.opts.ttl + stack.opts.stale_ttl
            items = [
                (key, envelope, ttl, stack._message("evict", [key]))
                for key, _, envelope in written
            ]
            try:
                yield (L2, "put_many", (items,))
            except L2Unavailable:
                stack.stats.incr("l2_errors")
                for key, entry, envelope in written:
                    stack._defer_write(key, entry, envelope, ttl)
            else:
                for key, entry, _ in written:
                    stack._settled(key)
                    if entry.tags:
                        yield from after_fill_steps(stack, key, entry, NEVER)
    finally:
        stack.flights.forget([key for key, _, _ in written])
        if stack.l1 is not None:
            writable = stack._l1_writable()
            for (key, entry, _), ticket in zip(written, tickets, strict=True):
                item = stack._l1_item(entry) if writable else None
                stack.l1.end_write(key, item, ticket)


def remove_many_steps(stack: CacheStack, keys: list[str]) -> Step[None]:
    """:func:`remove_steps` for many keys, their tombstones in one pipelined round trip."""
    if not keys:
        return
    stack.stats.incr("deletes", len(keys))
    if stack.l1 is not None:
        stack.l1.evict_many(keys)
    if stack.l2 is None:
        return
    now = stack.clock()
    tombs = [(key, Entry(None, now, now, now, new_version(), tombstone=True)) for key in keys]
    envelopes = [pack(tomb, stack.codec.codec_id, b"") for _, tomb in tombs]
    ttl = stack._tombstone_ttl
    items = [
        (key, envelope, ttl, stack._message("evict", [key]))
        for (key, _), envelope in zip(tombs, envelopes, strict=True)
    ]
    try:
        yield (L2, "tombstone_many", (items,))
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        for (key, tomb), envelope in zip(tombs, envelopes, strict=True):
            stack._defer_write(key, tomb, envelope, ttl)
    else:
        for key in keys:
            stack._settled(key)
    stack.flights.forget(keys)
    if stack.l1 is not None:
        stack.l1.evict_many(keys)
