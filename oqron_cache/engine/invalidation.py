"""Pattern and tag invalidation that in-flight loads cannot undo (DESIGN section 5).

Every pattern or tag invalidation is recorded, at Redis's clock, in the cache's invalidation
log (a sorted set). Every fill, right after its compare-and-set, indexes the entry under its
tags and reads the invalidations recorded since its load began, in one atomic script; if one
of them matches the key or a tag, the filler withdraws its entry (drop-if-version). So a value
whose load began before an invalidation never stays: either the invalidation's scan finds it,
or its filler sees the invalidation. (The window in which such a value can be read is the one
round trip between its fill and that check.) ``delete()`` needs none of this: its tombstone
changes the entry's version, so an in-flight fill's compare-and-set fails.

A tag's index is a sorted set of encoded keys, each scored with the Redis time it was last
indexed at (a fill, a set, a slide of a sliding entry). Invalidating a tag walks it page by page
(ZSCAN, COUNT 500, pipelined), so a tag of 100,000 entries neither blocks Redis nor is loaded
into memory at once; it drops each entry that carries the tag *now* (a newer write that dropped
the tag stays), then removes the page's members unless they were indexed again meanwhile. An
index stays as large as the entries it names: a key is one member however often it is written,
and every indexing removes the members not indexed within an entry's lifetime (expired ones).

An invalidation that Redis cannot take is kept and run again when it answers (:mod:`.recovery`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, cast

from ..core.entry import Entry, new_version, pack
from ..core.keys import Glob
from ..redis.store import L2Unavailable
from .steps import CMD, EACH, L2, SCRIPT, Step, drive

if TYPE_CHECKING:
    from .stack import CacheStack
    from .tiers import L2Store

log = logging.getLogger("oqron_cache")

REMEMBER_MS = 3600 * 1000  # invalidations older than this cannot affect a load still running
PAGE = 500
TAG_SET_MARGIN_MS = 60_000  # a tag set outlives the entries it indexes by this much


def _index_steps(stack: CacheStack, key: str, entry: Entry, started_us: int) -> Step[list[bytes]]:
    """Run the INDEX script for ``entry``: the invalidations recorded since ``started_us``."""
    l2 = stack.l2
    assert l2 is not None
    ks = l2.keys
    keys = [ks.invalidations(), *(ks.tag_set(tag) for tag in entry.tags)]
    lifetime_ms = int((stack.opts.ttl + stack.opts.stale_ttl) * 1000)
    args = [ks.encoded(key), lifetime_ms + TAG_SET_MARGIN_MS, started_us, lifetime_ms * 1000]
    return cast("list[bytes]", (yield (SCRIPT, "index_script", keys, args)))


def after_fill(stack: CacheStack, key: str, entry: Entry, started_us: int) -> bool:
    """:func:`after_fill_steps` on this thread."""
    return drive(after_fill_steps(stack, key, entry, started_us), stack.l2)


def after_fill_steps(stack: CacheStack, key: str, entry: Entry, started_us: int) -> Step[bool]:
    """Index a just-filled entry under its tags; withdraw it if an invalidation raced its load.

    Returns False if the entry was withdrawn (the caller must not keep it in L1 either).
    """
    if stack.l2 is None:
        return True
    try:
        recent = yield from _index_steps(stack, key, entry, started_us)
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        return True
    if not any(_hits(item.decode("utf-8", "surrogatepass"), key, entry) for item in recent):
        return True
    stack.stats.incr("invalidated_in_flight")
    try:
        yield from _drop_steps(stack, stack.l2.keys.value(key), entry.version, announce=[key])
    except L2Unavailable:
        stack.stats.incr("l2_errors")
    # Another thread of this process may have read the entry from L2 since the fill and kept
    # it: the announcement evicts it in other processes, this eviction here (a process does
    # not act on its own messages).
    if stack.l1 is not None:
        stack.l1.evict(key)
    return False


def index_tags_steps(stack: CacheStack, key: str, entry: Entry) -> Step[None]:
    """A sliding entry lives on: index it again, so its tags keep finding it (best effort)."""
    if stack.l2 is None or not entry.tags:
        return
    try:
        yield from _index_steps(stack, key, entry, 1 << 62)
    except L2Unavailable:
        stack.stats.incr("l2_errors")


def _value_key(l2: L2Store, member: bytes) -> str:
    """The value key of a tag index member (an encoded key)."""
    return f"{l2.keys.prefix}{member.decode('utf-8', 'surrogatepass')}}}:v"


def _legacy_member(l2: L2Store, member: bytes) -> tuple[str, bytes]:
    """A member of a tag set of versions before 0.2: the value key and the version indexed."""
    encoded, _, version_hex = member.decode("utf-8", "surrogatepass").rpartition("|")
    try:
        version = bytes.fromhex(version_hex)
    except ValueError:
        version = b"?"  # not a member this library wrote: never a live version
    return f"{l2.keys.prefix}{encoded}}}:v", version


def _hits(invalidation: str, key: str, entry: Entry) -> bool:
    kind, _, subject = invalidation.partition(":")
    if kind == "t":
        return subject in entry.tags
    if kind == "p":
        try:
            return Glob(subject).matches(key)
        except ValueError:  # not a pattern this library recorded: it matches nothing
            return False
    return False


def _tombstone(stack: CacheStack) -> bytes:
    now = stack.clock()
    return pack(
        Entry(None, now, now, now, new_version(), tombstone=True), stack.codec.codec_id, b""
    )


def _drop_steps(
    stack: CacheStack, value_key: str, version: bytes, announce: list[str]
) -> Step[int]:
    l2 = stack.l2
    assert l2 is not None
    channel = l2.channel if announce else ""
    message = stack._message("evict", announce) if announce else b""
    args = [version, _tombstone(stack), int(stack._tombstone_ttl * 1000), channel, message]
    return int(cast("int", (yield (SCRIPT, "drop_script", [value_key], args))))


def _record_steps(stack: CacheStack, invalidation: str) -> Step[None]:
    """Log an invalidation (``p:<pattern>`` or ``t:<tag>``) for in-flight fills to see."""
    l2 = stack.l2
    assert l2 is not None
    yield (SCRIPT, "record_script", [l2.keys.invalidations()], [invalidation, REMEMBER_MS])


def invalidate_tag(stack: CacheStack, tag: str) -> int:
    """:func:`invalidate_tag_steps` on this thread."""
    return drive(invalidate_tag_steps(stack, tag), stack.l2)


def invalidate_tag_steps(stack: CacheStack, tag: str) -> Step[int]:
    """Drop every entry of ``stack`` tagged ``tag``, in L2 and in every process's L1.

    If Redis fails part way, the invalidation is kept and run again when it answers (P14).
    """
    removed = 0
    if stack.l2 is not None:
        try:
            removed = yield from _tag_in_l2_steps(stack, tag)
        except L2Unavailable:
            stack.stats.incr("l2_errors")
            _defer(stack, "tag", tag)
        else:
            _settled(stack, "tag", tag)
    evict_tags_from_l1(stack, [tag])
    return removed


def invalidate_tag_in_l2(stack: CacheStack, tag: str) -> int:
    """The L2 part of :func:`invalidate_tag`; raises L2Unavailable if Redis fails."""
    return drive(_tag_in_l2_steps(stack, tag), stack.l2)


def _tag_in_l2_steps(stack: CacheStack, tag: str) -> Step[int]:
    l2 = stack.l2
    assert l2 is not None
    yield from _record_steps(stack, f"t:{tag}")
    tombstone = _tombstone(stack)
    ttl_ms = int(stack._tombstone_ttl * 1000)
    element = json.dumps(tag)  # as it is written in the envelope's tag block
    index = l2.keys.tag_set(tag)
    removed = 0
    cursor = 0
    while True:
        reply = yield (CMD, "zscan", (index, cursor, None, PAGE))
        cursor, page = cast("tuple[int, list[tuple[bytes, float]]]", reply)
        if page:
            calls: list[tuple[list[str], list[Any]]] = [
                ([_value_key(l2, member)], [element, tombstone, ttl_ms]) for member, _ in page
            ]
            replies = yield (EACH, "drop_tagged_script", calls)
            removed += sum(int(r) for r in replies)
            pairs: list[Any] = []
            for member, score in page:
                pairs += [member, repr(int(score))]
            yield (SCRIPT, "unindex_script", [index], pairs)
        if cursor == 0:
            break
    removed += yield from _legacy_steps(stack, tag, tombstone, ttl_ms)
    yield (L2, "publish", (stack._message("tag", [tag]),))
    return removed


def _legacy_steps(stack: CacheStack, tag: str, tombstone: bytes, ttl_ms: int) -> Step[int]:
    """Entries indexed by a version before 0.2 (a plain set of ``key|version``), until its
    sets expire: drop exactly those versions."""
    l2 = stack.l2
    assert l2 is not None
    legacy = l2.keys.legacy_tag_set(tag)
    if not (yield (CMD, "exists", (legacy,))):
        return 0
    removed = 0
    cursor = 0
    while True:
        reply = yield (CMD, "sscan", (legacy, cursor, None, PAGE))
        cursor, members = cast("tuple[int, list[bytes]]", reply)
        if members:
            calls: list[tuple[list[str], list[Any]]] = []
            for member in members:
                value_key, version = _legacy_member(l2, member)
                calls.append(([value_key], [version, tombstone, ttl_ms, "", b""]))
            replies = yield (EACH, "drop_script", calls)
            removed += sum(int(r) for r in replies)
            yield (CMD, "srem", (legacy, *members))
        if cursor == 0:
            return removed


def invalidate_pattern(stack: CacheStack, glob: Glob, scan_count: int, batch: int) -> int:
    """:func:`invalidate_pattern_steps` on this thread."""
    return drive(invalidate_pattern_steps(stack, glob, scan_count, batch), stack.l2)


def invalidate_pattern_steps(
    stack: CacheStack, glob: Glob, scan_count: int, batch: int
) -> Step[int]:
    """Drop every entry of ``stack`` whose key matches ``glob`` (SCAN + UNLINK, then L1).

    If Redis fails part way, the invalidation is kept and run again when it answers (P14).
    """
    removed = 0
    if stack.l2 is not None:
        try:
            removed = yield from _pattern_in_l2_steps(stack, glob, scan_count, batch)
        except L2Unavailable:
            stack.stats.incr("l2_errors")
            _defer(stack, "pattern", glob.pattern)
        else:
            _settled(stack, "pattern", glob.pattern)
    evict_patterns_from_l1(stack, [glob.pattern])
    return removed


def invalidate_pattern_in_l2(stack: CacheStack, glob: Glob, scan_count: int, batch: int) -> int:
    """The L2 part of :func:`invalidate_pattern`; raises L2Unavailable if Redis fails."""
    return drive(_pattern_in_l2_steps(stack, glob, scan_count, batch), stack.l2)


def _pattern_in_l2_steps(stack: CacheStack, glob: Glob, scan_count: int, batch: int) -> Step[int]:
    l2 = stack.l2
    assert l2 is not None
    removed = 0
    yield from _record_steps(stack, f"p:{glob.pattern}")
    pending: list[bytes] = []
    match = l2.keys.match_values(glob)
    node, cursor = 0, 0
    while node >= 0:
        node, cursor, page = yield (L2, "scan_page", (match, scan_count, node, cursor))
        for rkey in page:
            user_key = l2.keys.user_key(rkey.decode("utf-8", "surrogateescape"))
            if user_key is None or not glob.matches(user_key):
                continue  # SCAN's pattern is a superset; the glob decides
            pending.append(rkey)
            if len(pending) >= batch:
                removed += yield (L2, "unlink_live", (pending,))
                pending = []
    if pending:
        removed += yield (L2, "unlink_live", (pending,))
    yield (L2, "publish", (stack._message("pattern", [glob.pattern]),))
    return removed


def _defer(stack: CacheStack, kind: str, subject: str) -> None:
    recovery = stack.runtime.recovery if stack.runtime is not None else None
    if recovery is not None:
        recovery.defer_invalidation(stack, kind, subject)


def _settled(stack: CacheStack, kind: str, subject: str) -> None:
    recovery = stack.runtime.recovery if stack.runtime is not None else None
    if recovery is not None and recovery.pending:
        recovery.settled(stack, subject, kind)


def evict_patterns_from_l1(stack: CacheStack, patterns: list[str]) -> None:
    """Drop this process's L1 copies whose key matches any of ``patterns``."""
    stack.flights.forget()  # later reads must not join loads older than the invalidation
    if stack.l1 is None:
        return
    globs = [Glob(p) for p in patterns]
    stack.l1.evict_matching(lambda key, _item: any(g.matches(key) for g in globs))


def evict_tags_from_l1(stack: CacheStack, tags: list[str]) -> None:
    """Drop this process's L1 copies carrying any of ``tags``."""
    stack.flights.forget()
    if stack.l1 is None:
        return
    wanted = set(tags)
    stack.l1.evict_matching(lambda _key, item: not wanted.isdisjoint(item.tags))
