"""What the library calls on its tiers: the protocols :class:`L1Store` and :class:`L2Store`.

:class:`~oqron_cache.stack.CacheStack` and the modules around it (load, store, refresh,
invalidation, write-through) are typed against these protocols, not against the shipped
implementations (:class:`~oqron_cache.tiers.memory.MemoryStore` and
:class:`~oqron_cache.tiers.redis.RedisStore`). A store that satisfies a protocol type-checks in
their place; :mod:`oqron_cache.testing` has the conformance suites that check it behaves as the
library relies on.

Keys are the cache's own ``str`` keys (an L2 store names its Redis keys with
:attr:`L2Store.keys`). L2 values are envelopes (:func:`oqron_cache.entry.pack`): bytes whose
``[2:10]`` slice is the entry's 8-byte version, which every compare-and-set below compares. An
absent entry's version is :data:`oqron_cache.entry.NO_VERSION` (``b""``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from ..core.keys import KeySpace
from ..redis.store import RedisConn
from .l1 import L1Item

__all__ = ["L1Store", "L2Store"]


class L1Store(Protocol):
    """The in-process tier of one cache: a bounded map of ``str`` keys to :class:`L1Item`.

    Every method is thread-safe (the read path, the bus listener and refresh threads share the
    store). The store is bounded: past its capacity, putting a new key evicts the least
    recently used one (reading with :meth:`get` counts as a use).
    """

    @property
    def data(self) -> Mapping[str, L1Item]:
        """The map itself, for the read path's inlined :meth:`get` (a call costs as much).

        The hot path indexes it while holding :attr:`lock`, so ``data[key]`` must do what
        :meth:`get` does: return the item and mark it recently used, or raise ``KeyError``.
        (A store may also offer ``unlocked()``, returning a plain ``dict`` and a "mark used"
        callable that are safe without the lock, as :class:`~.l1.MemoryStore` does; the read
        path then takes its hits from those.)
        """
        ...

    @property
    def lock(self) -> AbstractContextManager[Any]:
        """The lock that guards :attr:`data` (the one the store's own methods hold)."""
        ...

    def get(self, key: str) -> L1Item | None:
        """The item held for ``key`` (marked recently used), or ``None``."""
        ...

    def put(self, key: str, item: L1Item) -> None:
        """Hold ``item`` under ``key``, replacing any copy; evict the LRU entry when full."""
        ...

    def put_if_newer(self, key: str, item: L1Item) -> None:
        """Hold ``item`` unless the copy held already has a later ``fresh_until``.

        An equal ``fresh_until`` is replaced. (Not called by the library at present; kept for
        callers that race to put copies of one key.)
        """
        ...

    def discard(self, key: str, version: bytes | None = None) -> None:
        """Drop ``key``; given a ``version``, only if the copy held has that version.

        Absent keys are not an error. Not an eviction: an expired copy leaves this way.
        """
        ...

    # Guarded puts. A copy read from L2 must never undo an eviction (a delete, an
    # invalidation, a bus message) that happened while it was being read: the reader takes a
    # stamp before the read and puts with it; every eviction moves the stamps of its keys.

    def stamp(self, key: str) -> int:
        """``key``'s generation now; it changes with every eviction of ``key`` (or of all)."""
        ...

    def put_if(self, key: str, item: L1Item, stamp: int) -> bool:
        """Hold ``item`` if ``key``'s generation is still ``stamp``, in one atomic step."""
        ...

    def begin_write(self, key: str) -> int:
        """This process starts writing ``key`` (moves its generation); the ticket to end it."""
        ...

    def end_write(self, key: str, item: L1Item | None, ticket: int) -> bool:
        """The write ended: hold ``item`` only if no eviction and no other write of ``key``
        overlapped it (their order in L2 is unknown here); else drop ``key``."""
        ...

    def evict(self, key: str) -> None:
        """Drop ``key`` because it changed (moves its generation)."""
        ...

    def evict_many(self, keys: list[str]) -> None:
        """:meth:`evict` each of ``keys``."""
        ...

    def evict_matching(self, match: Callable[[str, L1Item], bool]) -> int:
        """Drop every entry ``match(key, item)`` selects (moves every generation)."""
        ...

    def discard_many(self, keys: list[str]) -> None:
        """Drop each of ``keys`` that is held (bus ``fill``/``evict`` messages)."""
        ...

    def clear(self) -> int:
        """Drop every entry; return how many there were."""
        ...

    def items(self) -> list[tuple[str, L1Item]]:
        """A snapshot (a new list) of the entries held; used by tag eviction."""
        ...

    def keys(self) -> list[str]:
        """A snapshot (a new list) of the keys held; used by pattern eviction."""
        ...

    @property
    def evictions(self) -> int:
        """How many entries were evicted because the store was full (not discards or clears)."""
        ...

    def __len__(self) -> int:
        """How many entries are held."""
        ...


class L2Store(Protocol):
    """The shared tier of one cache: versioned envelopes, per-key locks and the bus, in Redis.

    Every method raises :class:`~oqron_cache.tiers.redis.L2Unavailable` when the tier cannot
    do what was asked (down, slow, refused, circuit open); the library degrades on that
    exception, and only on that one (promise P1). ``ttl`` arguments are seconds; values get a
    physical TTL, locks expire after theirs.

    Each entry has a lock (a token string with a TTL) beside its value. The lock decides which
    process loads or refreshes the key; it is taken by :meth:`acquire` or
    :meth:`acquire_or_read`, and only the token that took it can :meth:`release`,
    :meth:`hold` or (through :meth:`fill`) release it.

    Writes announce themselves: :meth:`put`, a :meth:`fill` that lands and :meth:`tombstone`
    publish their ``message`` on :attr:`channel` in the same atomic step as the write, so a
    process that hears the message and reads again sees the write.

    Tag and pattern invalidation, write-through and the read path's bus-health check need more
    than one entry's keys and run their own scripts on Redis: for them a store exposes
    :attr:`keys` and :attr:`conn`. A store therefore has to live on a Redis (or a server that
    speaks its protocol and Lua), though it may store entries its own way.
    """

    @property
    def keys(self) -> KeySpace:
        """The Redis key names of this cache in its namespace.

        Invalidation builds tag-set, invalidation-log and value-key names from it (and turns
        scanned keys back into cache keys), write-through its outcome and lock keys; the
        entries this store reads and writes must live under ``keys.value(key)`` and
        ``keys.lock(key)``.
        """
        ...

    @property
    def channel(self) -> str:
        """The bus channel of the namespace, where this store's writes are announced.

        Invalidation and write-through publish on it themselves from their scripts.
        """
        ...

    @property
    def conn(self) -> RedisConn:
        """The Redis connection (client, circuit breaker, registered scripts) under the store.

        Not an entry operation: tag and pattern invalidation and write-through run their
        multi-key scripts through ``conn.run``, the read path reads ``conn.breaker.is_open``
        to keep L1 on while Redis is wholly down, and ``oqron-cache invalidate`` reads the
        failures of its own ``RedisConn`` subclass. Calls through ``conn.run`` go through
        the same breaker and raise the same ``L2Unavailable`` as the store's methods.
        """
        ...

    def read(self, key: str) -> bytes | None:
        """The envelope stored for ``key`` (a tombstone included), or ``None`` if absent."""
        ...

    def read_at(self, key: str) -> tuple[bytes | None, int]:
        """The envelope of ``key`` (or ``None``), and the server's clock in µs, read together.

        The clock is read first, in the same round trip: a refresh uses it as the instant its
        load began, comparable with the instants invalidations are logged at.
        """
        ...

    def acquire(self, key: str, token: str, ttl: float) -> bool:
        """Take ``key``'s lock for ``token`` for ``ttl`` seconds if nobody holds it.

        True if ``token`` now holds it; False (and the holder keeps it) otherwise, also when
        ``token`` already holds it.
        """
        ...

    def acquire_or_read(
        self,
        key: str,
        token: str,
        ttl: float,
        phase: str = "r",
        take_over: bool = False,
    ) -> tuple[bool, bytes | None, int, float]:
        """:meth:`acquire` and :meth:`read` in one atomic step: ``(won, raw, now_us, held)``.

        The lock is taken in ``phase`` (``"r"`` computing, ``"q"`` a refresh task queued);
        ``take_over`` (a cold load) also takes a lock held in phase ``"q"`` or ``"f"`` (a
        failed refresh's throttle), since nothing computes under those.

        ``won``: ``token`` took the lock. ``raw``: the envelope (or ``None``) at that moment,
        so a winner can see the key was filled meanwhile and a loser can serve the fill.
        ``now_us``: the server's clock in µs (the instant a load that follows begins).
        ``held``: seconds the lock is held for from now: ``ttl`` for the winner, what is left
        of the holder's TTL for a loser (``ttl`` if the lock has none), which tells a loser
        when asking again is worth it.
        """
        ...

    def now_us(self) -> int:
        """The server's clock, in µs since the epoch (the clock invalidations are logged at)."""
        ...

    def release(self, key: str, token: str) -> bool:
        """Release ``key``'s lock if ``token`` holds it; True if it did.

        A compare-and-delete: a token whose lock expired cannot release the next holder's.
        """
        ...

    def hold(self, key: str, token: str, ttl: float, phase: str = "") -> bool:
        """Reset the TTL of ``key``'s lock to ``ttl`` seconds if ``token`` holds it, and its
        phase if given.

        True if it did; another holder's lock is left as it is. A failed refresh keeps its
        lock this way (phase ``"f"``), so the lock throttles further refreshes of the key in
        every process without making cold loads wait for it.
        """
        ...

    def claim_read(self, key: str, token: str, ttl: float) -> tuple[bytes | None, int, int]:
        """A refresh task starts: claim its lock ``token`` (phase ``"r"``, ``ttl``) and read
        the entry and the clock: ``(raw, now_us, claim)``, ``claim`` 1 claimed, 0 no lock
        any more, -1 another holder has it."""
        ...

    def fill(
        self,
        key: str,
        seen_version: bytes,
        envelope: bytes,
        ttl: float,
        token: str,
        message: bytes,
        age: float = 0.0,
        horizon: float = float("inf"),
    ) -> tuple[int, int]:
        """Write a loaded value: a compare-and-set on the entry's version, atomically.

        Writes ``envelope`` (physical TTL ``ttl``) and publishes ``message`` only if the
        version stored for ``key`` is still ``seen_version``, the one the loader saw when it
        began (``NO_VERSION`` for an absent key); a :meth:`put`, a :meth:`tombstone` or
        another fill since then changed it, and that newer write wins (promise P5). A load
        that saw no entry ``age`` seconds ago, more than ``horizon`` (a tombstone's lifetime),
        is refused as well: a delete meanwhile may have left a tombstone that is gone now.
        Either way, releases ``key``'s lock if ``token`` (``""``: none) still holds it.
        Returns ``(outcome, now_us)``: 1 written, 0 refused for the version, 2 refused as too
        old; and the server's clock in µs.
        """
        ...

    def read_many(self, keys: list[str]) -> list[bytes | None]:
        """:meth:`read` of each of ``keys``, in order, in one round trip (pipelined)."""
        ...

    def put_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        """:meth:`put` of each ``(key, envelope, ttl, message)``, pipelined.

        Raises ``L2Unavailable`` if the round trip failed (some may have landed: the caller
        treats them all as not written, and replaying a newer version is harmless)."""
        ...

    def tombstone_many(self, items: list[tuple[str, bytes, float, bytes]]) -> None:
        """:meth:`tombstone` of each ``(key, envelope, ttl, message)``, pipelined."""
        ...

    def put(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """Write ``envelope`` (physical TTL ``ttl``) unconditionally, and publish ``message``.

        A ``set()``: the envelope has a new version, so fills that began before it fail.
        """
        ...

    def scan(self, match: str, count: int) -> Iterator[bytes]:
        """The Redis keys matching the SCAN MATCH pattern ``match`` (``count``: page hint).

        Lazily, page by page; a key may be yielded twice (SCAN's guarantee), keys that do not
        match never.
        """
        ...

    def unlink(self, keys: list[bytes]) -> int:
        """Remove the Redis keys ``keys`` (as :meth:`scan` yields them); how many existed."""
        ...

    def publish(self, message: bytes) -> None:
        """Publish ``message`` on :attr:`channel`."""
        ...

    def tombstone(self, key: str, envelope: bytes, ttl: float, message: bytes) -> None:
        """A ``delete()``: remove ``key``'s value, publish ``message``, leave ``envelope``.

        ``envelope`` is a tombstone (an entry with a new version and no value) kept for
        ``ttl`` seconds, so a fill that began before the delete fails its compare-and-set
        instead of writing the old value back. The value is removed even if the tombstone
        cannot be written (a server out of memory still deletes).
        """
        ...

    def touch(
        self, key: str, version: bytes, fresh_until: float, stale_until: float, ttl: float
    ) -> bool:
        """Sliding strategy: move an entry's freshness forward, if it is still ``version``.

        Rewrites the envelope's ``fresh_until`` and ``stale_until`` in place (value, version
        and the rest unchanged) and resets its physical TTL to ``ttl``, atomically, only if
        the version stored is ``version``. True if it did.
        """
        ...
