"""The read and write paths of one cache: L1, then L2, then the resolver (DESIGN section 2).

``CacheStack`` is built from parts (an L1 store, an L2 store, the process's bus and refresh
dispatcher, the stats) when a cache is first used after :func:`oqron_cache.configure`. The
decision of what to do with what a tier holds is :func:`oqron_cache.entry.decide`; this module
only does the I/O around it.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .bus import encode_message
from .entry import NO_VERSION, Action, Corrupt, Entry, decide, new_version, pack, unpack
from .errors import ConfigurationError
from .flight import Flights
from .invalidation import after_fill
from .keys import printable
from .metrics import LATENCY_SAMPLE, Stats
from .options import CacheOptions
from .serializers import Codec
from .tiers.memory import L1Item, MemoryStore
from .tiers.redis import L2Unavailable, RedisStore

if TYPE_CHECKING:
    from .refresh import Job
    from .runtime import Runtime

log = logging.getLogger("oqron_cache")

Resolver = Callable[[str], Any]
_MISSING: Any = object()
MAX_TAG_BYTES = 256  # with max_tags <= 200 the tag block always fits the envelope's 16-bit length
NEVER = 1 << 62  # "the load began at the end of time": no invalidation can postdate it
EARLY_SPAN = 10.0  # see CacheStack._early_from
WAIT_SLICE = 0.2  # a lost pub/sub message costs a waiter at most this long (safety net, not a poll)


class Found:
    """What a read of L2 found: the entry (if any usable), and the version a writer must see."""

    __slots__ = ("entry", "epoch", "seen")

    def __init__(self, entry: Entry | None, seen: bytes, epoch: int = -1) -> None:
        self.entry = entry
        self.seen = seen
        self.epoch = epoch  # the stack's L1 epoch before the read (see CacheStack._put_l1)


class CacheStack:
    """The engine of one cache in one process."""

    def __init__(
        self,
        opts: CacheOptions,
        codec: Codec,
        l1: MemoryStore | None,
        l2: RedisStore | None,
        runtime: Runtime | None,
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
        self._l1_data = l1.data if l1 is not None else None
        self._l1_lock = l1.lock if l1 is not None else None
        self.owner: Any = None  # the Cache this stack serves (set by Runtime.bind)
        self.epoch = 0  # bumped by every L1 eviction from outside; see _put_l1
        self._swr = opts.stampede.stale_while_revalidate
        self._sliding = opts.strategy == "sliding"
        l1_ttl = opts.l1_ttl
        # Sliding caches come back to L2 at least twice per ttl, so L2 slides too.
        self._l1_ttl = min(l1_ttl, opts.ttl / 2) if self._sliding and l2 is not None else l1_ttl
        self._tombstone_ttl = max(2 * opts.stampede.lock_ttl, 10.0)

    # ------------------------------------------------------------------ reads

    def get(self, key: str, resolver: Resolver | None, default: Any = None) -> Any:
        """Return the value for ``key`` (L1 -> L2 -> ``resolver``); ``default`` if none."""
        # The hot path (a fresh L1 hit): one counter, one locked dict lookup, one clock read.
        # The lookup is MemoryStore.get inlined (a call costs as much as the rest).
        sample = not (next(self._gets) % LATENCY_SAMPLE)
        started = time.perf_counter() if sample else 0.0
        item = None
        if self._l1_data is not None:
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
        return self._read_below(key, item, resolver, default)

    def _read_below(
        self, key: str, item: L1Item | None, resolver: Resolver | None, default: Any
    ) -> Any:
        now = self.clock()
        fallback: Any = _MISSING  # a value we may still serve if everything below fails
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
            return self._below_l1(key, now, None, default, fallback, l1_fresh)[0]
        # Single-flight from here on: one thread per key and process goes to L2 (and maybe the
        # resolver); the others wait for it. Reading L2 before joining would send every
        # thread's GET to Redis and queue the leader behind them.
        flight, leader = self.flights.join(key)
        if not leader:
            try:
                return flight.wait()
            finally:
                if flight.loaded:  # the leader loaded (or failed to): one load served us all
                    self.stats.incr("misses")
                    self.stats.incr("stampede_prevented")
        try:
            value, loaded = self._below_l1(key, now, resolver, default, fallback, l1_fresh)
        except BaseException as exc:
            flight.loaded = True
            self.flights.finish(key, flight, error=exc)
            raise
        flight.loaded = loaded
        self.flights.finish(key, flight, value)
        return value

    def _below_l1(
        self,
        key: str,
        now: float,
        resolver: Resolver | None,
        default: Any,
        fallback: Any,
        l1_fresh: bool,
    ) -> tuple[Any, bool]:
        """L2, then the resolver. Returns the value and whether it had to be loaded."""
        found = self._read_l2(key)
        if found is not None and found.entry is not None:
            entry = found.entry
            action = decide(entry.fresh_until, entry.stale_until, now, self._can_swr(resolver))
            if action is Action.SERVE:
                self.stats.incr("l2_hits")
                if self.opts.early_refresh is not None:
                    early_from = self._early_from(entry)
                    self._maybe_early(
                        key, entry.fresh_until, early_from, entry.delta, entry.version, now
                    )
                if self._sliding:
                    entry = self._slide(key, entry, now)
                self._put_l1(key, entry, found.epoch)
                return entry.value, False
            if action is Action.SERVE_AND_REFRESH:
                self.stats.incr("stale_served")
                self._put_l1(key, entry, found.epoch)
                self._request_refresh(key, entry.version)
                return entry.value, False
            if now < entry.stale_until:
                fallback = entry.value
        elif found is None and l1_fresh:
            return fallback, False  # L2 unavailable and L1 still holds a fresh copy: serve it (P1)
        self.stats.incr("misses")
        if resolver is None:
            return default, False
        return self._load_as_leader(key, resolver, fallback, found), True

    def _can_swr(self, resolver: Resolver | None) -> bool:
        # A stale value can only be refreshed in the background by the cache's own resolver.
        return self._swr and self.opts.resolver is not None and resolver is self.opts.resolver

    def _read_l2(self, key: str, recheck: bool = False) -> Found | None:
        """Read ``key`` from L2. ``None`` if L2 is absent or unavailable.

        ``recheck`` marks a second read of the same key in one get (not counted as corrupt
        again).
        """
        if self.l2 is None:
            return None
        started = time.perf_counter()
        epoch = self.epoch
        try:
            raw = self.l2.read(key)
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return None
        found = self._parse(key, raw, recheck, epoch)
        self.stats.observe("redis", time.perf_counter() - started)
        return found

    def _read_l2_at(self, key: str) -> tuple[Found | None, int | None]:
        """:meth:`_read_l2` and Redis's clock before the read (µs), in one round trip.

        For a refresh: the clock is the instant its load begins (see ``after_fill``).
        """
        if self.l2 is None:
            return None, None
        epoch = self.epoch
        try:
            raw, now_us = self.l2.read_at(key)
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return None, None
        return self._parse(key, raw, False, epoch), now_us

    def _parse(self, key: str, raw: bytes | None, recheck: bool, epoch: int) -> Found:
        """Decode an envelope read from L2 (``None``: absent). Corrupt data is a miss.

        ``epoch`` is the L1 epoch taken before the read.
        """
        if raw is None:
            return Found(None, NO_VERSION, epoch)
        try:
            entry, codec_id, payload = unpack(raw)
            if entry.tombstone:
                return Found(None, entry.version, epoch)
            if codec_id != self.codec.codec_id:
                raise Corrupt(f"codec id {codec_id}")
            entry.value = self.codec.decode(payload)
        except (Corrupt, ValueError, TypeError) as exc:
            if recheck:
                return Found(None, raw[2:10], epoch)
            self.stats.incr("corrupt")
            log.warning(
                "cache %s: unreadable L2 entry for %s treated as a miss (%s)",
                self.name,
                printable(key),
                exc,
            )
            return Found(None, raw[2:10], epoch)
        return Found(entry, entry.version, epoch)

    def _slide(self, key: str, entry: Entry, now: float) -> Entry:
        """Sliding strategy: push the entry's freshness forward in L2 (best effort)."""
        entry.fresh_until = now + self.opts.ttl
        entry.stale_until = entry.fresh_until + self.opts.stale_ttl
        if self.l2 is None:
            return entry
        try:
            self.l2.touch(
                key,
                entry.version,
                entry.fresh_until,
                entry.stale_until,
                self.opts.ttl + self.opts.stale_ttl,
            )
        except L2Unavailable:
            self.stats.incr("l2_errors")
        return entry

    # ------------------------------------------------------------------ cold misses

    def _load_as_leader(
        self, key: str, resolver: Resolver, fallback: Any, first: Found | None = None
    ) -> Any:
        """Across processes: take the key's lock and load, or wait for the holder's fill.

        ``first`` is the L2 read the caller just made (saves one round trip).
        """
        if self.l1 is not None:  # a flight that just ended may have filled L1: check again
            item = self.l1.get(key)
            if item is not None and self.clock() < item.fresh_until:
                return item.value
        if self.l2 is None or not self.opts.stampede.enabled:
            started_us = self._redis_now()
            found = self._read_l2(key, recheck=True)
            seen = found.seen if found else NO_VERSION
            return self._compute(key, resolver, seen, "", fallback, started_us)
        lock_ttl = self.opts.stampede.lock_ttl
        deadline = time.monotonic() + lock_ttl
        waiters = self.runtime.bus.waiters if self.runtime and self.runtime.bus else None
        # Registered before anything is checked, so a fill landing between our check and our
        # wait still wakes us (no lost wake-up, no extra read).
        event = waiters.register(self.name, key) if waiters is not None else None
        found = first
        waited = False
        redis_now: int | None = None
        try:
            while True:
                if found is None:  # L2 unavailable: nobody to coordinate with
                    return self._compute(key, resolver, NO_VERSION, "", fallback)
                if found.entry is not None and self.clock() < found.entry.fresh_until:
                    if waited:
                        self.stats.incr("stampede_prevented")
                    self._put_l1(key, found.entry, found.epoch)
                    return found.entry.value
                # One round trip: try the lock and read the entry again (a holder may have
                # filled it since our read; if so we must not load it a second time).
                token = secrets.token_hex(16)
                epoch = self.epoch
                try:
                    won, raw, redis_now, _ = self.l2.acquire_or_read(key, token, lock_ttl)
                except L2Unavailable:
                    self.stats.incr("l2_errors")
                    return self._compute(key, resolver, NO_VERSION, "", fallback)
                found = self._parse(key, raw, True, epoch)
                if won:
                    if found.entry is not None and self.clock() < found.entry.fresh_until:
                        self._release(key, token)
                        self._put_l1(key, found.entry, found.epoch)
                        return found.entry.value
                    if not self._load_in_worker(key, resolver, token, found.seen):
                        return self._compute(key, resolver, found.seen, token, fallback, redis_now)
                    # miss="worker": a worker loads it; wait for its fill like any waiter.
                if found.entry is not None and self.clock() < found.entry.fresh_until:
                    continue  # filled meanwhile: served at the top of the loop
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # Liveness beats dedup: the holder is slow or dead; compute it ourselves.
                    self.stats.incr("lock_timeouts")
                    return self._compute(key, resolver, found.seen, "", fallback, redis_now)
                waited = True
                if event is not None:
                    event.wait(min(remaining, WAIT_SLICE))
                    event.clear()
                else:
                    time.sleep(min(remaining, WAIT_SLICE / 4))
                found = self._read_l2(key, recheck=True)
        finally:
            if event is not None and waiters is not None:
                waiters.unregister(self.name, key, event)

    def _load_in_worker(self, key: str, resolver: Resolver, token: str, seen: bytes) -> bool:
        """miss="worker": hand a cold miss to a worker; False to load it here instead."""
        enqueuer = self.runtime.enqueuer if self.runtime is not None else None
        if self.opts.miss != "worker" or enqueuer is None or resolver is not self.opts.resolver:
            return False
        if enqueuer.enqueue(self.name, key, token, seen, self.opts.stampede.lock_ttl):
            return True
        self.stats.incr("enqueue_failures")
        return False

    def _redis_now(self) -> int | None:
        """Redis's clock in µs (when a load begins), or None without L2."""
        if self.l2 is None:
            return None
        try:
            return self.l2.now_us()
        except L2Unavailable:
            self.stats.incr("l2_errors")
            return None

    def _compute(
        self,
        key: str,
        resolver: Resolver,
        seen: bytes,
        token: str,
        fallback: Any,
        started_us: int | None = None,
    ) -> Any:
        """Run the resolver, store the value (compare-and-set on ``seen``), return it.

        ``started_us`` (Redis time in µs when the load began) lets the store see invalidations that
        raced the load.
        """
        started = time.perf_counter()
        try:
            value = resolver(key)
        except Exception:
            self.stats.incr("resolver_errors")
            if token:
                self._release(key, token)
            if fallback is not _MISSING:
                self.stats.incr("stale_served")
                log.warning(
                    "cache %s: resolver failed for %s; serving the stale value",
                    self.name,
                    printable(key),
                    exc_info=True,
                )
                return fallback
            raise
        elapsed = time.perf_counter() - started
        self.stats.incr("resolver_calls")
        self.stats.observe("resolver", elapsed)
        self._store(key, value, seen, token, elapsed, started_us)
        return value

    # ------------------------------------------------------------------ writes

    def _entry(self, key: str, value: Any, delta: float) -> Entry:
        now = self.clock()
        fresh_until = now + self.opts.ttl
        return Entry(
            value,
            now,
            fresh_until,
            fresh_until + self.opts.stale_ttl,
            new_version(),
            self._tags(key, value),
            delta,
        )

    def _tags(self, key: str, value: Any) -> tuple[str, ...]:
        if self.opts.tags is None:
            return ()
        tags = self.opts.tags(key, value)
        if isinstance(tags, str) or not isinstance(tags, Iterable):
            raise TypeError(f"tags function of cache {self.name!r} must return a list of str")
        out = tuple(tags)
        if not all(type(t) is str and t for t in out):
            raise TypeError(f"tags of cache {self.name!r} must be non-empty str")
        too_long = [t for t in out if len(t.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES]
        if too_long:
            raise ConfigurationError(
                f"cache {self.name!r}: a tag of {len(too_long[0])} chars is longer than "
                f"{MAX_TAG_BYTES} bytes"
            )
        if len(out) > self.opts.max_tags:
            raise ConfigurationError(
                f"cache {self.name!r}: {len(out)} tags on one entry, "
                f"more than max_tags={self.opts.max_tags}"
            )
        return out

    def _encode(self, key: str, entry: Entry) -> bytes | None:
        """The envelope of ``entry``, or ``None`` if its value is too large to cache (P9)."""
        payload = self.codec.encode(entry.value, self.name)
        if len(payload) > self.opts.max_value_bytes:
            self.stats.incr("oversize")
            log.warning(
                "cache %s: value for %s is %d bytes > max_value_bytes=%d; returned, not cached",
                self.name,
                printable(key),
                len(payload),
                self.opts.max_value_bytes,
            )
            return None
        return pack(entry, self.codec.codec_id, payload)

    def _store(
        self,
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
            entry = self._entry(key, value, delta)
            # Encoded even without L2: the same values are cacheable whatever the tiers, and
            # max_value_bytes bounds L1 too (P9).
            envelope = self._encode(key, entry)
        except BaseException:
            if token:
                self._release(key, token)
            raise
        if envelope is None:
            if token:
                self._release(key, token)
            return False
        epoch = self.epoch
        if self.l2 is not None:
            message = self._message("fill", [key])
            try:
                written = self.l2.fill(
                    key, seen, envelope, self.opts.ttl + self.opts.stale_ttl, token, message
                )
            except L2Unavailable:
                self.stats.incr("l2_errors")
            else:
                if not written:
                    # A newer set or an invalidation landed while we computed: it wins (P5).
                    self.stats.incr("l2_write_conflicts")
                    return False
                if started_us is not None and not after_fill(self, key, entry, started_us):
                    return False  # a pattern/tag invalidation raced the load: withdrawn
        self._put_l1(key, entry, epoch)
        return True

    def set(self, key: str, value: Any) -> None:
        """Write ``value`` to every tier and tell other processes to drop their copy."""
        self.stats.incr("sets")
        entry = self._entry(key, value, 0.0)
        envelope = self._encode(key, entry)
        if envelope is None:  # too large to cache: at least stop serving the old value
            self.delete(key)
            return
        if self.l2 is not None:
            try:
                self.l2.put(
                    key,
                    envelope,
                    self.opts.ttl + self.opts.stale_ttl,
                    self._message("evict", [key]),
                )
            except L2Unavailable:
                self.stats.incr("l2_errors")
            else:
                if entry.tags:  # a written value is new data: index it, nothing to withdraw
                    after_fill(self, key, entry, NEVER)
        self._put_l1(key, entry)

    def delete(self, key: str) -> None:
        """Remove ``key`` from every tier and every process's L1.

        L2 keeps a short-lived tombstone with a new version, so a load or refresh that began
        before the delete cannot write its older value back (compare-and-set fails).
        """
        self.stats.incr("deletes")
        if self.l1 is not None:
            self.l1.discard(key)
        if self.l2 is None:
            return
        now = self.clock()
        tomb = Entry(None, now, now, now, new_version(), tombstone=True)
        try:
            self.l2.tombstone(
                key,
                pack(tomb, self.codec.codec_id, b""),
                self._tombstone_ttl,
                self._message("evict", [key]),
            )
        except L2Unavailable:
            self.stats.incr("l2_errors")

    # ------------------------------------------------------------------ helpers

    def _put_l1(self, key: str, entry: Entry, epoch: int | None = None) -> None:
        """Keep ``entry`` in L1, unless an eviction arrived since ``epoch`` was taken.

        Without that check a read in flight could put back a value that an invalidation
        (handled while the read was waiting for Redis) has just removed.
        """
        if self.l1 is None or not self._l1_writable():
            return
        if epoch is not None and epoch != self.epoch:
            return
        now = self.clock()
        l1_until = (
            min(now + self._l1_ttl, entry.fresh_until)
            if entry.fresh_until > now
            else entry.stale_until
        )
        self.l1.put(
            key,
            L1Item(
                entry.value,
                entry.fresh_until,
                entry.stale_until,
                l1_until,
                entry.version,
                self._early_from(entry),
                entry.delta,
                entry.tags,
            ),
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
        return runtime.bus.healthy or self.l2.conn.breaker.is_open

    def _release(self, key: str, token: str) -> None:
        try:
            self.l2.release(key, token)  # type: ignore[union-attr]
        except L2Unavailable:
            self.stats.incr("l2_errors")

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
        if self.l1 is None or from_self:
            return
        self.epoch += 1  # reads in flight must not put back what this message removes
        if op == "clear":
            self.l1.clear()
        elif op == "tag":
            from .invalidation import evict_tags_from_l1

            evict_tags_from_l1(self, keys)
        elif op == "pattern":
            from .invalidation import evict_patterns_from_l1

            evict_patterns_from_l1(self, keys)
        else:
            self.l1.discard_many(keys)

    def flush_l1(self) -> None:
        """Drop every L1 copy (the bus was lost or came back)."""
        self.epoch += 1
        if self.l1 is not None:
            self.l1.clear()
