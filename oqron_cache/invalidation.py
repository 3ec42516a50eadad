"""Pattern and tag invalidation that in-flight loads cannot undo (DESIGN section 5).

Every pattern or tag invalidation is recorded, at Redis's clock, in the cache's invalidation
log (a sorted set). Every fill, right after its compare-and-set, indexes the entry under its
tags and reads the invalidations recorded since its load began, in one atomic script; if one
of them matches the key or a tag, the filler withdraws its entry (drop-if-version). So a value
whose load began before an invalidation never stays: either the invalidation's scan finds it,
or its filler sees the invalidation. (The window in which such a value can be read is the one
round trip between its fill and that check.) ``delete()`` needs none of this: its tombstone
changes the entry's version, so an in-flight fill's compare-and-set fails.

Tag sets hold ``<encoded key>|<version hex>``; invalidating a tag drops exactly those versions
(never a newer write), page by page (SSCAN, COUNT 500, pipelined), so a tag of 100,000 entries
neither blocks Redis nor is loaded into memory at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, cast

from .entry import FLAG_TOMBSTONE, Entry, new_version, pack
from .keys import Glob
from .tiers.redis import L2Unavailable

if TYPE_CHECKING:
    from .stack import CacheStack
    from .tiers.base import L2Store

log = logging.getLogger("oqron_cache")

REMEMBER_MS = 3600 * 1000  # invalidations older than this cannot affect a load still running
PAGE = 500


def _member(encoded_key: str, version: bytes) -> str:
    return f"{encoded_key}|{version.hex()}"


def after_fill(stack: CacheStack, key: str, entry: Entry, started_us: int) -> bool:
    """Index a just-filled entry under its tags; withdraw it if an invalidation raced its load.

    Returns False if the entry was withdrawn (the caller must not keep it in L1 either).
    """
    l2 = stack.l2
    if l2 is None:
        return True
    ks = l2.keys
    keys = [ks.invalidations(), *(ks.tag_set(tag) for tag in entry.tags)]
    ttl_ms = int((stack.opts.ttl + stack.opts.stale_ttl) * 1000) + 60_000
    args = [_member(ks.encoded(key), entry.version), ttl_ms, started_us]
    try:
        recent = cast("list[bytes]", l2.conn.run(l2.conn.index_script, keys=keys, args=args))
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        return True
    if not any(_hits(item.decode("utf-8", "surrogatepass"), key, entry) for item in recent):
        return True
    stack.stats.incr("invalidated_in_flight")
    try:
        _drop(stack, ks.value(key), entry.version, announce=[key])
    except L2Unavailable:
        stack.stats.incr("l2_errors")
    return False


def _hits(invalidation: str, key: str, entry: Entry) -> bool:
    kind, _, subject = invalidation.partition(":")
    if kind == "t":
        return subject in entry.tags
    if kind == "p":
        return Glob(subject).matches(key)
    return False


def _tombstone(stack: CacheStack) -> bytes:
    now = stack.clock()
    return pack(
        Entry(None, now, now, now, new_version(), tombstone=True), stack.codec.codec_id, b""
    )


def _drop(stack: CacheStack, value_key: str, version: bytes, announce: list[str]) -> int:
    l2 = stack.l2
    assert l2 is not None
    channel = l2.channel if announce else ""
    message = stack._message("evict", announce) if announce else b""
    args = [version, _tombstone(stack), int(stack._tombstone_ttl * 1000), channel, message]
    return int(cast("int", l2.conn.run(l2.conn.drop_script, keys=[value_key], args=args)))


def record(stack: CacheStack, invalidation: str) -> None:
    """Log an invalidation (``p:<pattern>`` or ``t:<tag>``) for in-flight fills to see."""
    l2 = stack.l2
    assert l2 is not None
    l2.conn.run(
        l2.conn.record_script, keys=[l2.keys.invalidations()], args=[invalidation, REMEMBER_MS]
    )


def invalidate_tag(stack: CacheStack, tag: str) -> int:
    """Drop every entry of ``stack`` tagged ``tag``, in L2 and in every process's L1."""
    removed = 0
    if stack.l2 is not None:
        l2 = stack.l2
        try:
            record(stack, f"t:{tag}")
            set_key = l2.keys.tag_set(tag)
            client = l2.conn.client
            cursor = 0
            tombstone = _tombstone(stack)
            ttl_ms = int(stack._tombstone_ttl * 1000)
            while True:
                reply = l2.conn.run(client.sscan, set_key, cursor=cursor, count=PAGE)
                cursor, members = cast("tuple[int, list[bytes]]", reply)
                if members:
                    calls: list[tuple[list[str], list[Any]]] = []
                    for member in members:
                        encoded, _, version_hex = member.decode(
                            "utf-8", "surrogatepass"
                        ).rpartition("|")
                        value_key = f"{l2.keys.prefix}{encoded}}}:v"
                        args = [bytes.fromhex(version_hex), tombstone, ttl_ms, "", b""]
                        calls.append(([value_key], args))
                    replies = l2.conn.run(l2.conn.run_each, l2.conn.drop_script, calls)
                    removed += sum(int(r) for r in replies)
                    l2.conn.run(client.srem, set_key, *members)
                if cursor == 0:
                    break
            l2.publish(stack._message("tag", [tag]))
        except L2Unavailable:
            stack.stats.incr("l2_errors")
    stack.epoch += 1
    evict_tags_from_l1(stack, [tag])
    return removed


def invalidate_pattern(stack: CacheStack, glob: Glob, scan_count: int, batch: int) -> int:
    """Drop every entry of ``stack`` whose key matches ``glob`` (SCAN + UNLINK, then L1)."""
    removed = 0
    if stack.l2 is not None:
        l2 = stack.l2
        try:
            record(stack, f"p:{glob.pattern}")
            pending: list[bytes] = []
            for rkey in l2.scan(l2.keys.match_values(glob), scan_count):
                user_key = l2.keys.user_key(rkey.decode("utf-8", "surrogateescape"))
                if user_key is None or not glob.matches(user_key):
                    continue  # SCAN's pattern is a superset; the glob decides
                pending.append(rkey)
                if len(pending) >= batch:
                    removed += _unlink_values(l2, pending)
                    pending.clear()
            if pending:
                removed += _unlink_values(l2, pending)
            l2.publish(stack._message("pattern", [glob.pattern]))
        except L2Unavailable:
            stack.stats.incr("l2_errors")
    stack.epoch += 1
    evict_patterns_from_l1(stack, [glob.pattern])
    return removed


def _unlink_values(l2: L2Store, keys: list[bytes]) -> int:
    """UNLINK value keys; count the live entries among them (tombstones are not entries)."""
    keys = list(dict.fromkeys(keys))  # SCAN may return a key twice
    pipe = l2.conn.client.pipeline(transaction=False)
    for key in keys:
        pipe.getrange(key, 1, 1)  # the flags byte
    flags = cast("list[bytes]", l2.conn.run(pipe.execute))
    l2.unlink(keys)
    return sum(1 for flag in flags if flag and not flag[0] & FLAG_TOMBSTONE)


def evict_patterns_from_l1(stack: CacheStack, patterns: list[str]) -> None:
    """Drop this process's L1 copies whose key matches any of ``patterns``."""
    if stack.l1 is None:
        return
    globs = [Glob(p) for p in patterns]
    for key in stack.l1.keys():  # noqa: SIM118 - a locked snapshot, not a dict
        if any(g.matches(key) for g in globs):
            stack.l1.discard(key)


def evict_tags_from_l1(stack: CacheStack, tags: list[str]) -> None:
    """Drop this process's L1 copies carrying any of ``tags``."""
    if stack.l1 is None:
        return
    wanted = set(tags)
    for key, item in stack.l1.items():
        if wanted.intersection(item.tags):
            stack.l1.discard(key, item.version)
