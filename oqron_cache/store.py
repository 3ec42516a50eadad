"""Writes: a resolved or set value becomes an envelope in L2 and a copy in L1; a delete a tombstone.

Every write to L2 is one Lua call on the entry's key: a fill only lands if the entry's version is
still the one its load saw (P5), a set always lands, a delete leaves a short-lived tombstone that
makes older fills fail. Each announces itself on the bus. These are functions of the
:class:`~oqron_cache.stack.CacheStack` whose entry they write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .entry import Entry, new_version, pack
from .errors import ConfigurationError
from .invalidation import after_fill
from .keys import printable
from .tiers.redis import L2Unavailable

if TYPE_CHECKING:
    from .stack import CacheStack

log = logging.getLogger("oqron_cache")

MAX_TAG_BYTES = 256  # with max_tags <= 200 the tag block always fits the envelope's 16-bit length
NEVER = 1 << 62  # "the load began at the end of time": no invalidation can postdate it


def make_entry(stack: CacheStack, key: str, value: Any, delta: float) -> Entry:
    now = stack.clock()
    fresh_until = now + stack.opts.ttl
    return Entry(
        value,
        now,
        fresh_until,
        fresh_until + stack.opts.stale_ttl,
        new_version(),
        entry_tags(stack, key, value),
        delta,
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
    stack: CacheStack,
    key: str,
    value: Any,
    seen: bytes,
    token: str,
    delta: float,
    started_us: int | None = None,
) -> bool:
    """Write a resolved value to L2 (only if still at ``seen``) and to L1.

    Returns False if it was not cached: too large, or a newer write won (P5).
    """
    try:
        entry = make_entry(stack, key, value, delta)
        # Encoded even without L2: the same values are cacheable whatever the tiers, and
        # max_value_bytes bounds L1 too (P9).
        envelope = encode(stack, key, entry)
    except BaseException:
        if token:
            stack._release(key, token)
        raise
    if envelope is None:
        if token:
            stack._release(key, token)
        return False
    epoch = stack.epoch
    if stack.l2 is not None:
        message = stack._message("fill", [key])
        try:
            written = stack.l2.fill(
                key, seen, envelope, stack.opts.ttl + stack.opts.stale_ttl, token, message
            )
        except L2Unavailable:
            stack.stats.incr("l2_errors")
        else:
            if not written:
                # A newer set or an invalidation landed while we computed: it wins (P5).
                stack.stats.incr("l2_write_conflicts")
                return False
            if started_us is not None and not after_fill(stack, key, entry, started_us):
                return False  # a pattern/tag invalidation raced the load: withdrawn
    stack._put_l1(key, entry, epoch)
    return True


def write(stack: CacheStack, key: str, value: Any) -> None:
    """Write ``value`` to every tier and tell other processes to drop their copy."""
    stack.stats.incr("sets")
    entry = make_entry(stack, key, value, 0.0)
    envelope = encode(stack, key, entry)
    if envelope is None:  # too large to cache: at least stop serving the old value
        remove(stack, key)
        return
    if stack.l2 is not None:
        try:
            stack.l2.put(
                key,
                envelope,
                stack.opts.ttl + stack.opts.stale_ttl,
                stack._message("evict", [key]),
            )
        except L2Unavailable:
            stack.stats.incr("l2_errors")
        else:
            if entry.tags:  # a written value is new data: index it, nothing to withdraw
                after_fill(stack, key, entry, NEVER)
    stack._put_l1(key, entry)


def remove(stack: CacheStack, key: str) -> None:
    """Remove ``key`` from every tier and every process's L1.

    L2 keeps a short-lived tombstone with a new version, so a load or refresh that began
    before the delete cannot write its older value back (compare-and-set fails).
    """
    stack.stats.incr("deletes")
    if stack.l1 is not None:
        stack.l1.discard(key)
    if stack.l2 is None:
        return
    now = stack.clock()
    tomb = Entry(None, now, now, now, new_version(), tombstone=True)
    try:
        stack.l2.tombstone(
            key,
            pack(tomb, stack.codec.codec_id, b""),
            stack._tombstone_ttl,
            stack._message("evict", [key]),
        )
    except L2Unavailable:
        stack.stats.incr("l2_errors")
