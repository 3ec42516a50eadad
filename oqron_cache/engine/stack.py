"""The engine of one cache in one process: its read path, L1 first, then L2 (DESIGN section 2).

``CacheStack`` is built from parts (an L1 store, an L2 store, the process's bus and refresh
dispatcher, the stats) when a cache is first used after :func:`oqron_cache.configure`. The
decision of what to do with what a tier holds is :func:`oqron_cache.entry.decide`; this module
only does the I/O around it. A miss that must be loaded goes on in :mod:`.load`; what a load or
a ``set()`` writes is :mod:`.store`; a background refresh is :mod:`.refresh`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..core.codecs import Codec
from ..core.entry import NO_VERSION, Action, Corrupt, Entry, decide, unpack
from ..core.keys import printable
from ..core.metrics import LATENCY_SAMPLE, Stats
from ..core.options import CacheOptions
from ..redis.bus import encode_message
from ..redis.store import L2Unavailable
from .flight import Flights, HandedOn
from .l1 import L1Item
from .load import MISSING, load_as_leader_steps
from .steps import JOIN, L2, Step, adrive, drive
from .tiers import L1Store, L2Store
from .writes import MAX_TAG_BYTES, NEVER, Basis, encode, make_entry, remove, store, write

if TYPE_CHECKING:
    from .parts import Parts
    from .refresh import Job

log = logging.getLogger("oqron_cache")

__all__ = ["MAX_TAG_BYTES", "NEVER", "CacheStack", "Found", "Resolver"]

Resolver = Callable[[str], Any]
EARLY_SPAN = 10.0  # see CacheStack._early_from
TOMBSTONE_MIN = 30.0  # seconds a tombstone lives at least (see CacheStack._tombstone_ttl)


class Found:
    """What a read of L2 found: the entry (if any usable), and the version a writer must see."""

    __slots__ = ("began", "entry", "seen", "stamp", "wall")

    def __init__(
        self,
        entry: Entry | None,
        seen: bytes,
        stamp: int = -1,
        began: float = 0.0,
        wall: float = 0.0,
    ) -> None:
        self.entry = entry
        self.seen = seen
        self.stamp = stamp  # the key's L1 generation before the read (see CacheStack._put_l1)
        self.began = began  # time.monotonic() before the read
        self.wall = wall  # the cache's clock before the read

    def basis(self, token: str = "", started_us: int | None = None) -> Basis:
        """What a load that replaces this read's entry is based on (see :class:`Basis`)."""
        return Basis(self.seen, self.stamp, self.began, started_us, token, self.wall)


UNREAD: Any = object()  # "L2 not read yet" (see CacheStack._below_steps)


class _Pending:
    """What the hot path returns to :meth:`CacheStack.aget` when L1 cannot serve: the
    arguments of the steps below it (a value of this type is never cached)."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args


def _no_touch(key: str) -> None:
    """The stores without lock-free hits mark use in their own lookup."""


def _in_loop() -> bool:
    """Is an event loop running in this thread (sync code called from async code)?"""
    return asyncio._get_running_loop() is not None


class CacheStack:
    """The engine of one cache in one process."""

    _warned_in_loop = False  # once per process: get() below L1 inside a running event loop

    def __init__(
        self,
        opts: CacheOptions,
        codec: Codec,
        l1: L1Store | None,
        l2: L2Store | None,
        runtime: Parts | None,
        stats: Stats,
        clock: Callable[[], float],
    ) -> None:
        self.opts = opts
        self.name = opts.name
        self.codec = codec
        self.l1 = l1
        self.l2 = l2
        self.runtime = runtime
        self.stats = stats
        self.clock = clock
        self.flights = Flights()
        self._gets = stats.gets
        # The resolver whose stale values are served while refreshed (None: no SWR).
        self._swr_resolver = opts.resolver if opts.stampede.stale_while_revalidate else None
        self._lock_ttl = opts.stampede.lock_ttl
        # The stale hit path's hand-over to the dispatcher: its queue's put and size.
        self._post: Callable[[Job], None] | None = None
        self._queued: Callable[[], int] = int
        self._max_queued = 0
        if runtime is not None and self._swr_resolver is not None:
            self._post, self._queued = runtime.dispatcher.start()
            self._max_queued = runtime.dispatcher.max_queue
        self._stale_fast = stats.stale_fast
        self._l2_hit = stats.l2_hit
        self._l1_data = l1.data if l1 is not None else None
        self._l1_lock = l1.lock if l1 is not None else None
        # A store that offers lock-free hits (MemoryStore.unlocked) gets them.
        unlocked = getattr(l1, "unlocked", None)
        fast = unlocked() if unlocked is not None else None
        self._l1_raw: dict[str, L1Item] | None = fast[0] if fast is not None else None
        self._l1_touch: Callable[[str], None] = fast[1] if fast is not None else _no_touch
        self.owner: Any = None  # the Cache this stack serves (set by Runtime.bind)
        self._swr = opts.stampede.stale_while_revalidate
        self._sliding = opts.strategy == "sliding"
        l1_ttl = opts.l1_ttl
        # Sliding caches come back to L2 at least twice per ttl, so L2 slides too.
        self._l1_ttl = min(l1_ttl, opts.ttl / 2) if self._sliding and l2 is not None else l1_ttl
        # How long a delete's tombstone lives; also the oldest a cold load may be and still be
        # stored (store.py): long enough for any load that honours its lock_ttl.
        self._tombstone_ttl = max(2 * opts.stampede.lock_ttl, TOMBSTONE_MIN)

    # ------------------------------------------------------------------ reads

    def get(
        self,
        key: str,
        resolver: Resolver | None,
        default: Any = None,
        below: Callable[[str, L1Item | None, Resolver | None, Any], Any] | None = None,
    ) -> Any:
        """Return the value for ``key`` (L1 -> L2 -> ``resolver``); ``default`` if none.

        The L1 part is the same for both fronts; what is not served from L1 goes on in
        ``below`` (the sync front's :meth:`_read_below` by default; :meth:`aget` passes one that
        hands the steps to the async driver instead).
        """
        # The hot path (a fresh L1 hit): one counter, one dict lookup, one clock read. The
        # lookup is MemoryStore.get inlined (a call costs as much as the rest), lock-free when
        # the store offers it (MemoryStore.unlocked), else under the store's lock.
        sample = not (next(self._gets) % LATENCY_SAMPLE)
        started = time.perf_counter() if sample else 0.0
        item = None
        raw = self._l1_raw
        if raw is not None:
            item = raw.get(key)
            if item is not None:
                try:  # noqa: SIM105 - contextlib.suppress would cost more than the hit
                    self._l1_touch(key)  # recently used
                except KeyError:  # evicted since the lookup: serve the copy read
                    pass
        elif self._l1_data is not None:
            with self._l1_lock:  # type: ignore[union-attr]
                try:
                    item = self._l1_data[key]
                except KeyError:
                    item = None
        if item is not None:
            now = self.clock()
            if now < item.fresh_until and now < item.l1_until:
                if now >= item.early_from:
                    self._maybe_early(
                        key, item.fresh_until, item.early_from, item.delta, item.version, now
                    )
                if self._sliding:
                    item.fresh_until = now + self.opts.ttl
                    item.stale_until = item.fresh_until + self.opts.stale_ttl
                    if self.l2 is None:  # L1 is the last tier: its copy's bound slides too
                        item.l1_until = item.fresh_until
                if sample:
                    self.stats.observe("memory", time.perf_counter() - started)
                return item.value
            if (
                item.fresh_until <= now < item.stale_until
                and resolver is self._swr_resolver is not None
            ):
                # Stale, within stale_ttl, refreshable in the background: serve it now and
                # make sure a refresh is requested (the rule of entry.decide, inlined).
                # At most once per lock_ttl (real time, as the key's Redis lock) per copy.
                mono = time.monotonic()
                if mono >= item.refresh_after and self._post is not None:
                    if self._queued() < self._max_queued:
                        # Before the put: the drainer may set it nearer (see retry_after).
                        item.refresh_after = mono + self._lock_ttl
                        self._post((self, key, item.version, False, False))
                    else:
                        self.stats.incr("refreshes_dropped")
                next(self._stale_fast)
                return item.value
        return (below or self._read_below)(key, item, resolver, default)

    async def aget(self, key: str, resolver: Resolver | None, default: Any = None) -> Any:
        """:meth:`get` on the running event loop: the same L1 path (no I/O, no yield to the
        loop on a hit), then the same steps below it through the async driver."""
        value = self.get(key, resolver, default, _Pending)
        if type(value) is _Pending:
            return await adrive(self._below_steps(*value.args), self.async_l2())
        return value

    def get_many(self, keys: list[str], resolver: Resolver | None) -> dict[str, Any]:
        """:meth:`get` of each key: L1 first, then one L2 round trip for all the rest; a key
        with no value (and no resolver) is left out of the result."""
        return drive(self.get_many_steps(keys, resolver), self.l2)

    async def aget_many(self, keys: list[str], resolver: Resolver | None) -> dict[str, Any]:
        """:meth:`get_many` on the running loop."""
        return await adrive(self.get_many_steps(keys, resolver), self.async_l2())

    def get_many_steps(self, keys: list[str], resolver: Resolver | None) -> Step[dict[str, Any]]:
        found: dict[str, Any] = {}
        below: list[tuple[Any, ...]] = []
        for key in dict.fromkeys(keys):
            value = self.get(key, resolver, MISSING, _Pending)
            if type(value) is _Pending:
                below.append(value.args)
            else:
                found[key] = value
        reads: list[Any] = [UNREAD] * len(below)
        if len(below) > 1 and self.l2 is not None:
            pending = [args[0] for args in below]
            starts = [self.start(key) for key in pending]
            try:
                raws = yield (L2, "read_many", (pending,))
            except L2Unavailable:
                self.stats.incr("l2_errors")
                reads = [None] * len(below)
            else:
                reads = [
                    self._parse(key, raw, False, *start)
                    for key, raw, start in zip(pending, raws, starts, strict=True)
                ]
        for (key, item, _resolver, default), first in zip(below, reads, strict=True):
            found[key] = yield from self._below_steps(key, item, resolver, default, first)
        return {key: found[key] for key in keys if found.get(key, MISSING) is not MISSING}

    def async_l2(self) -> Any:
        """The running loop's async L2 store of this cache (``None`` without L2)."""
        if self.l2 is None or self.runtime is None:
            return None
        return self.runtime.async_store(self)

    def _read_below(
        self, key: str, item: L1Item | None, resolver: Resolver | None, default: Any
    ) -> Any:
        if self.l2 is not None and not CacheStack._warned_in_loop and _in_loop():
            CacheStack._warned_in_loop = True
            warnings.warn(
                f"cache {self.name!r}: get() called inside a running event loop waits for "
                "Redis (and maybe the resolver) and blocks the loop meanwhile; use "
                "'await cache.aget(...)' in async code",
                RuntimeWarning,
                stacklevel=4,
            )
        return drive(self._below_steps(key, item, resolver, default), self.l2)

    def _below_steps(
        self,
        key: str,
        item: L1Item | None,
        resolver: Resolver | None,
        default: Any,
        first: Any = UNREAD,
    ) -> Step[Any]:
        """Everything a read does below L1's hot path (see :mod:`.steps`).

        ``first`` is this key's L2 read if the caller made it (``get_many``: one round trip
        for all its keys), a :class:`Found` or ``None`` (L2 unavailable).
        """
        now = self.clock()
        fallback: Any = MISSING  # a value we may still serve if everything below fails
        l1_fresh = False  # L1's copy is fresh; only its per-process bound (l1 ttl) has passed
        if item is not None:
            action = decide(item.fresh_until, item.stale_until, now, self._can_swr(resolver))
            if action is Action.SERVE_AND_REFRESH:
                self.stats.incr("stale_served")
                # Later stale reads of this copy take the hot path until the refresh is due
                # again (the dispatcher throttles the key as long). Set before the request: its
                # drainer may set it nearer (see retry_after).
                due = item.refresh_after
                item.refresh_after = time.monotonic() + self.opts.stampede.lock_ttl
                if not self._request_refresh(key, item.version):
                    item.refresh_after = due
                return item.value
            if action is Action.SERVE:  # fresh, but this process's copy is due for a look below
                fallback = item.value
                l1_fresh = True
            elif now < item.stale_until:
                fallback = item.value  # stale and no SWR: load, but fail-safe to this
            else:
                self.l1.discard(key, item.version)  # type: ignore[union-attr]
        if resolver is None:
            steps = self._l2_steps(key, now, None, default, fallback, l1_fresh, first)
            return (yield from steps)[0]
        # Single-flight from here on: one thread or task per key and process goes to L2 (and
        # maybe the resolver); the others wait for it. Reading L2 before joining would send
        # every caller's GET to Redis and queue the leader behind them.
        while True:
            flight, leader = self.flights.join(key)
            if leader:
                break
            try:
                return (yield (JOIN, flight))
            except HandedOn:
                continue  # its leader was cancelled: one of us leads now
            finally:
                if flight.loaded:  # the leader loaded (or failed to): one load served us all
                    self.stats.incr("misses")
                    self.stats.incr("stampede_prevented")
        try:
            steps = self._l2_steps(key, now, resolver, default, fallback, l1_fresh, first)
            value, loaded = yield from steps
        except Exception as exc:
            flight.loaded = True
            self.flights.finish(key, flight, error=exc)
            raise
        except BaseException:  # cancelled (or interrupted): the followers carry on without us
            self.flights.hand_on(key, flight)
            raise
        flight.loaded = loaded
        self.flights.finish(key, flight, value)
        return value

    def _l2_steps(
        self,
        key: str,
        now: float,
        resolver: Resolver | None,
        default: Any,
        fallback: Any,
        l1_fresh: bool,
        first: Any = UNREAD,
    ) -> Step[tuple[Any, bool]]:
        """L2, then the resolver. Returns the value and whether it had to be loaded."""
        found = (yield from self._read_l2_steps(key)) if first is UNREAD else first
        if found is not None and found.entry is not None:
            entry = found.entry
            action = decide(entry.fresh_until, entry.stale_until, now, self._can_swr(resolver))
            if action is Action.SERVE:
                next(self._l2_hit)  # the "l2_hits" counter, without its lock
                if self.opts.early_refresh is not None:
                    early_from = self._early_from(entry)
                    self._maybe_early(
                        key, entry.fresh_until, early_from, entry.delta, entry.version, now
                    )
                if self._sliding:
                    entry = yield from self._slide_steps(key, entry, now)
                self._put_l1(key, entry, found.stamp)
                return entry.value, False
            if action is Action.SERVE_AND_REFRESH:
                self.stats.incr("stale_served")
                self._put_l1(key, entry, found.stamp)
                self._request_refresh(key, entry.version)
                return entry.value, False
            if now < entry.stale_until:
                fallback = entry.value
        elif found is None and l1_fresh:
            return fallback, False  # L2 unavailable and L1 still holds a fresh copy: serve it (P1)
        self.stats.incr("misses")
        if resolver is None:
            return default, False
        return (yield from load_as_leader_steps(self, key, resolver, fallback, found)), True

    def _can_swr(self, resolver: Resolver | None) -> bool:
        # A stale value can only be refreshed in the background by the cache's own resolver.
        return self._swr and self.opts.resolver is not None and resolver is self.opts.resolver

    def _read_l2(self, key: str, recheck: bool = False) -> Found | None:
        """Read ``key`` from L2 (see :meth:`_read_l2_steps`), on this thread."""
        return drive(self._read_l2_steps(key, recheck), self.l2)

    def _read_l2_steps(self, key: str, recheck: bool = False) -> Step[Found | None]:
        """Read ``key`` from L2. ``None`` if L2 is absent or unavailable.

        ``recheck`` marks a second read of the same key in one get (not counted as corrupt
        again).
        """
        if self.l2 is None:
            return None
        started = time.perf_counter()
        stamp, began, wall = self.start(key)
        try:
            raw = yield (L2, "read", (key,))
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return None
        found = self._parse(key, raw, recheck, stamp, began, wall)
        self.stats.observe("redis", time.perf_counter() - started)
        return found

    def _read_l2_at(self, key: str, token: str = "") -> tuple[Found | None, int | None, int]:
        """:meth:`_read_l2` and Redis's clock before the read (µs), in one round trip.

        For a refresh task: the clock is the instant its load begins (see ``after_fill``).
        With the ``token`` it was sent under, it also claims that lock (see
        ``L2Store.claim_read``); the third value says how that went (1 claimed, 0 no lock, -1
        another holder; 0 without a token).
        """
        if self.l2 is None:
            return None, None, 0
        stamp, began, wall = self.start(key)
        claim = 0
        try:
            if token:
                lock_ttl = self.opts.stampede.lock_ttl
                raw, now_us, claim = self.l2.claim_read(key, token, lock_ttl)
            else:
                raw, now_us = self.l2.read_at(key)
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return None, None, 0
        return self._parse(key, raw, False, stamp, began, wall), now_us, claim

    def start(self, key: str) -> tuple[int, float, float]:
        """Taken before a read of L2 a load may be based on: ``key``'s L1 generation, the
        monotonic time and the cache's clock (see :class:`Basis`)."""
        return self.stamp(key), time.monotonic(), self.clock()

    def stamp(self, key: str) -> int:
        """``key``'s L1 generation: take it before reading L2, pass it to :meth:`_put_l1`."""
        return self.l1.stamp(key) if self.l1 is not None else 0

    def _parse(
        self,
        key: str,
        raw: bytes | None,
        recheck: bool,
        stamp: int,
        began: float,
        wall: float = 0.0,
    ) -> Found:
        """Decode an envelope read from L2 (``None``: absent). Corrupt data is a miss.

        ``stamp`` is the key's L1 generation and ``began`` the monotonic time, both taken
        before the read.
        """
        if raw is None:
            return Found(None, NO_VERSION, stamp, began, wall)
        try:
            entry, codec_id, payload = unpack(raw)
            if entry.tombstone:
                return Found(None, entry.version, stamp, began, wall)
            entry.value = self.codec.read(codec_id, payload)
        except (Corrupt, ValueError, TypeError) as exc:
            if recheck:
                return Found(None, raw[2:10], stamp, began, wall)
            self.stats.incr("corrupt")
            log.warning(
                "cache %s: unreadable L2 entry for %s treated as a miss (%s)",
                self.name,
                printable(key),
                exc,
            )
            return Found(None, raw[2:10], stamp, began, wall)
        return Found(entry, entry.version, stamp, began, wall)

    def _slide_steps(self, key: str, entry: Entry, now: float) -> Step[Entry]:
        """Sliding strategy: push the entry's freshness forward in L2 (best effort)."""
        entry.fresh_until = now + self.opts.ttl
        entry.stale_until = entry.fresh_until + self.opts.stale_ttl
        if self.l2 is None:
            return entry
        args = (key, entry.version, entry.fresh_until, entry.stale_until)
        try:
            touched = yield (L2, "touch", (*args, self.opts.ttl + self.opts.stale_ttl))
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return entry
        if touched and entry.tags:
            # The entry lives longer now: so must its tag index, or invalidate_by_tag would
            # no longer find it.
            from .invalidation import index_tags_steps

            yield from index_tags_steps(self, key, entry)
        return entry

    # ------------------------------------------------------------------ writes and loads

    # Functions of the stack (store.py), as methods for the front end and the tests.
    set = write  # set(key, value): every tier, and every other process's L1 drops its copy
    delete = remove  # delete(key): every tier, and a tombstone in L2 against older fills
    _store = store
    _entry = make_entry
    _encode = encode

    # ------------------------------------------------------------------ helpers

    def _put_l1(self, key: str, entry: Entry, stamp: int) -> None:
        """Keep ``entry`` in L1, unless ``key`` was evicted since ``stamp`` was taken.

        Without that check a read in flight could put back a value that an invalidation or a
        delete (by another process, heard on the bus, or by another thread of this one) has
        just removed. The check and the put are one locked step (see ``MemoryStore.put_if``).
        """
        if self.l1 is None or not self._l1_writable():
            return
        self.l1.put_if(key, self._l1_item(entry), stamp)

    def _l1_item(self, entry: Entry) -> L1Item:
        now = self.clock()
        l1_until = (
            min(now + self._l1_ttl, entry.fresh_until)
            if entry.fresh_until > now
            else entry.stale_until
        )
        return L1Item(
            entry.value,
            entry.fresh_until,
            entry.stale_until,
            l1_until,
            entry.version,
            self._early_from(entry),
            entry.delta,
            entry.tags,
        )

    def _early_from(self, entry: Entry) -> float:
        """When probabilistic early refresh may start for ``entry`` (inf: never)."""
        beta = self.opts.early_refresh
        if beta is None or entry.delta <= 0:
            return math.inf
        # XFetch refreshes when now + delta * beta * Exp(1) >= fresh_until; Exp(1) exceeds
        # EARLY_SPAN with probability e**-EARLY_SPAN, so before this instant it never fires.
        return entry.fresh_until - entry.delta * beta * EARLY_SPAN

    def _maybe_early(
        self,
        key: str,
        fresh_until: float,
        early_from: float,
        delta: float,
        version: bytes,
        now: float,
    ) -> None:
        """XFetch (Vattani et al.): refresh a hot fresh entry before it goes stale."""
        if now < early_from:
            return
        beta = self.opts.early_refresh or 0.0
        draw = now - delta * beta * math.log(1.0 - random.random())  # noqa: S311
        if (
            draw >= fresh_until
            and self.runtime is not None
            and self.runtime.dispatcher.submit(self, key, version, early=True)
        ):
            self.stats.incr("early_refreshes")

    def _l1_writable(self) -> bool:
        # L1 is coherent only while the bus is listening; with Redis wholly down nobody can
        # invalidate anything, so L1 serves (P1) bounded by its own ttl.
        runtime = self.runtime
        if runtime is None or runtime.bus is None or self.l2 is None:
            return True
        if runtime.flood.paused_until and runtime.flood.paused():
            return False  # a flood of invalidation messages: L1 is off for a moment (flood.py)
        return runtime.bus.healthy or self.l2.conn.breaker.is_open

    def _release(self, key: str, token: str) -> None:
        drive(self._release_steps(key, token), self.l2)

    def _release_steps(self, key: str, token: str) -> Step[None]:
        try:
            yield (L2, "release", (key, token))
        except L2Unavailable:
            self.stats.incr("l2_errors")
            self._defer_release(key, token)

    # Auto-recovery (P14): what L2 could not take is kept by the runtime's recovery queue.

    def _defer_release(self, key: str, token: str, lock: str = "l") -> None:
        """Release ``key``'s lock ``token`` once Redis answers (the request may have landed);
        ``lock`` names which of the key's locks (see ``Recovery.defer_release``)."""
        recovery = self.runtime.recovery if self.runtime is not None else None
        if recovery is not None:
            recovery.defer_release(self, key, token, lock)

    def _defer_write(self, key: str, entry: Entry, envelope: bytes, ttl: float) -> None:
        """A set (or a delete's tombstone) L2 could not take: replay it when it answers."""
        recovery = self.runtime.recovery if self.runtime is not None else None
        if recovery is not None:
            recovery.defer_write(self, key, entry, envelope, ttl)

    def _settled(self, key: str) -> None:
        """A write of ``key`` reached L2: an older deferred one must not be replayed."""
        recovery = self.runtime.recovery if self.runtime is not None else None
        if recovery is not None and recovery.pending:
            recovery.settled(self, key)

    def _message(self, op: str, keys: list[str]) -> bytes:
        origin = self.runtime.bus.origin if self.runtime and self.runtime.bus else "-"
        return encode_message(origin, self.name, op, keys)

    def _request_refresh(self, key: str, seen: bytes) -> bool:
        """Hand a refresh to the dispatcher; True if it was taken (not merged or throttled)."""
        if self.runtime is None:
            return False
        return self.runtime.dispatcher.submit(self, key, seen)

    def retry_after(self, key: str, seen: bytes, when: float) -> None:
        """This process's stale copy of ``key`` (version ``seen``) asks again at ``when``.

        ``when`` is ``time.monotonic()`` time: when the key's lock, held by whoever is
        refreshing it, expires. Asking before then only finds the lock taken; asking a whole
        ``lock_ttl`` after finding it taken would double the wait after a lost refresh.
        """
        item = self.l1.get(key) if self.l1 is not None else None
        if item is not None and item.version == seen:
            item.refresh_after = when

    # ------------------------------------------------------------------ bus and refresh

    def on_bus(self, op: str, keys: list[str], from_self: bool) -> None:
        """A bus message for this cache: drop the L1 copies another process made obsolete."""
        if from_self:
            return
        # Loads that began before the change are not joined by later readers.
        self.flights.forget(keys if op in ("evict", "fill") else None)
        if self.l1 is None:
            return
        # Each eviction moves the keys' L1 generation: reads in flight do not put them back.
        if op == "clear":
            self.l1.clear()
        elif op == "tag":
            from .invalidation import evict_tags_from_l1

            evict_tags_from_l1(self, keys)
        elif op == "pattern":
            from .invalidation import evict_patterns_from_l1

            evict_patterns_from_l1(self, keys)
        else:
            self.l1.evict_many(keys)

    def flush_l1(self) -> None:
        """Drop every L1 copy (the bus was lost or came back)."""
        self.flights.forget()
        if self.l1 is not None:
            self.l1.clear()
