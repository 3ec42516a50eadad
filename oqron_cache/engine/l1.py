"""L1: a per-process LRU on cachetools, keyed by the cache's ``str`` key.

Items hold the value and the instants that govern it. The hot path (a fresh hit) is one lookup
and a comparison against the clock: no key building, no I/O. ``cachetools`` caches are not
thread-safe, so every write and every method of this store holds ``_lock`` (as
``cachetools.cached(lock=...)`` does); the read path's hit alone goes without it, on the LRU's
own dict and ``move_to_end`` (see :meth:`MemoryStore.unlocked`), each a C call that is atomic
under the GIL.

Generations keep copies read from below from undoing an eviction. A reader takes the key's
:meth:`MemoryStore.stamp` before it reads L2 and puts what it read with :meth:`MemoryStore.put_if`,
which checks the stamp and puts in one locked step; every eviction (:meth:`~MemoryStore.evict`,
:meth:`~MemoryStore.evict_many`, :meth:`~MemoryStore.evict_matching`, :meth:`~MemoryStore.clear`)
moves the generation under the same lock. So a put either happens before the eviction (which then
drops it) or sees it (and does not happen). A write of this process brackets its L2 write with
:meth:`~MemoryStore.begin_write` and :meth:`~MemoryStore.end_write`: its copy is kept only if no
eviction and no other write of the key overlapped it, since the order in which two overlapping
writes reached L2 is not known here.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache


class L1Item:
    """One L1 copy: the value, its freshness instants (wall clock) and the copy's own bound."""

    __slots__ = (
        "delta",
        "early_from",
        "fresh_until",
        "l1_until",
        "refresh_after",
        "stale_until",
        "tags",
        "value",
        "version",
    )

    def __init__(
        self,
        value: Any,
        fresh_until: float,
        stale_until: float,
        l1_until: float,
        version: bytes,
        early_from: float = math.inf,
        delta: float = 0.0,
        tags: tuple[str, ...] = (),
    ) -> None:
        self.value = value
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.l1_until = l1_until
        self.version = version
        self.early_from = early_from  # probabilistic early refresh may start here (inf: never)
        self.delta = delta  # seconds the resolver took for this value
        self.tags = tags
        # Stale and this process already asked for its refresh: until then, serve it at once.
        self.refresh_after = 0.0


class _CountingLRU(LRUCache[str, L1Item]):
    """An LRUCache that counts capacity evictions: the ``popitem`` calls made to make room.

    cachetools before 6 empties a cache in ``clear()`` through ``popitem`` too (the mixin's
    generic clear); those are not evictions, so they are not counted.
    """

    evictions = 0
    on_evict: Callable[[], None] | None = None
    _clearing = False

    def popitem(self) -> tuple[str, L1Item]:
        if not self._clearing:
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict()
        return super().popitem()

    def clear(self) -> None:
        self._clearing = True  # callers hold the store's lock
        try:
            super().clear()
        finally:
            self._clearing = False


BUCKETS = 256  # generations are kept per bucket of keys (hash % BUCKETS), plus one for all keys
_MASK = BUCKETS - 1
CONTENDED = -1  # the ticket of a write that overlapped another write of its bucket


class MemoryStore:
    """L1 store of one cache. Thread-safe; bounded by ``max_size`` entries (promise P9)."""

    __slots__ = ("_all", "_data", "_gen", "_lock", "_writing", "data", "lock", "max_size")

    def __init__(self, max_size: int, on_evict: Callable[[], None] | None = None) -> None:
        self.max_size = max_size
        self._data = _CountingLRU(maxsize=max_size)
        self._data.on_evict = on_evict
        self._lock = threading.Lock()
        # Exposed for the read path's inlined hit lookup (CacheStack.get); hold ``lock``.
        self.data = self._data
        self.lock = self._lock
        # Generations: both only grow, so their sum changes whenever either does.
        self._all = 0
        self._gen = [0] * BUCKETS
        self._writing = [0] * BUCKETS  # writes of this process in flight, per bucket

    def unlocked(self) -> tuple[dict[str, L1Item], Callable[[str], None]] | None:
        """The read path's lock-free hit: the LRU's own dict and its "mark as used" call.

        Both are C-level operations (a ``dict.get`` and ``OrderedDict.move_to_end``), each
        atomic under the GIL, so a hit needs neither this store's lock nor cachetools' Python
        methods: a concurrent put or eviction makes the lookup see the copy before or after
        it, and ``move_to_end`` of a key evicted meanwhile raises ``KeyError`` (ignored). Every
        write still holds the lock. ``None`` if cachetools' internals are not the ones known
        here (then hits take the locked path).
        """
        raw = getattr(self._data, "_Cache__data", None)
        order = getattr(self._data, "_LRUCache__order", None)
        if type(raw) is not dict or not isinstance(order, OrderedDict):
            return None
        return raw, order.move_to_end

    # -- guarded puts (see the module docstring)

    def stamp(self, key: str) -> int:
        """``key``'s generation now: take it before reading below, give it to :meth:`put_if`."""
        with self._lock:
            return self._all + self._gen[hash(key) & _MASK]

    def put_if(self, key: str, item: L1Item, stamp: int) -> bool:
        """Hold ``item`` if no eviction of ``key`` happened since ``stamp`` was taken."""
        bucket = hash(key) & _MASK
        with self._lock:
            if self._all + self._gen[bucket] != stamp:
                return False
            self._data[key] = item
            return True

    def begin_write(self, key: str) -> int:
        """A write of ``key`` by this process starts; returns its ticket for :meth:`end_write`."""
        bucket = hash(key) & _MASK
        with self._lock:
            self._gen[bucket] += 1
            self._writing[bucket] += 1
            if self._writing[bucket] > 1:
                return CONTENDED
            return self._all + self._gen[bucket]

    def end_write(self, key: str, item: L1Item | None, ticket: int) -> bool:
        """The write ended: hold ``item`` if nothing overlapped it, else drop ``key``.

        ``item`` ``None`` (nothing to keep) drops ``key`` too. Returns whether it was held.
        """
        bucket = hash(key) & _MASK
        with self._lock:
            self._writing[bucket] -= 1
            if item is not None and ticket == self._all + self._gen[bucket]:
                self._data[key] = item
                return True
            self._gen[bucket] += 1  # and a read that put a copy meanwhile loses it
            self._data.pop(key, None)
            return False

    def evict(self, key: str) -> None:
        """Drop ``key`` because it changed: puts of copies read before now will not happen."""
        bucket = hash(key) & _MASK
        with self._lock:
            self._gen[bucket] += 1
            self._data.pop(key, None)

    def evict_many(self, keys: list[str]) -> None:
        """:meth:`evict` each of ``keys``."""
        with self._lock:
            for key in keys:
                self._gen[hash(key) & _MASK] += 1
                self._data.pop(key, None)

    def evict_matching(self, match: Callable[[str, L1Item], bool]) -> int:
        """Drop every entry for which ``match(key, item)`` holds; puts of copies read before
        now will not happen for any key. Returns how many were dropped.

        ``match`` runs outside the lock (a pattern may take a while over many keys).
        """
        with self._lock:
            self._all += 1
            snapshot = list(self._data.items())
        doomed = [(key, item) for key, item in snapshot if match(key, item)]
        with self._lock:
            for key, item in doomed:
                if self._data.get(key) is item:
                    del self._data[key]
        return len(doomed)

    def get(self, key: str) -> L1Item | None:
        """The item for ``key`` (marking it recently used), or ``None``."""
        # LRUCache.get() costs an extra __contains__; indexing is the cheaper hit.
        with self._lock:
            try:
                return self._data[key]
            except KeyError:
                return None

    def put(self, key: str, item: L1Item) -> None:
        """Store ``item`` under ``key``, evicting the least recently used entry when full."""
        with self._lock:
            self._data[key] = item

    def put_if_newer(self, key: str, item: L1Item) -> None:
        """Store ``item`` unless L1 already holds a copy that is fresh for longer."""
        with self._lock:
            current = self._data.get(key)
            if current is None or current.fresh_until <= item.fresh_until:
                self._data[key] = item

    def discard(self, key: str, version: bytes | None = None) -> None:
        """Drop ``key``; with ``version``, only if the held copy has that version."""
        with self._lock:
            current = self._data.get(key)
            if current is not None and (version is None or current.version == version):
                del self._data[key]

    def discard_many(self, keys: list[str]) -> None:
        """Drop each of ``keys`` that is present."""
        with self._lock:
            for key in keys:
                self._data.pop(key, None)

    def clear(self) -> int:
        """Drop every entry (an eviction of all keys); return how many there were."""
        with self._lock:
            self._all += 1
            count = len(self._data)
            self._data.clear()
            return count

    def items(self) -> list[tuple[str, L1Item]]:
        """A snapshot of the entries held (for tag eviction)."""
        with self._lock:
            return list(self._data.items())

    def keys(self) -> list[str]:
        """A snapshot of the keys held (for pattern and tag eviction)."""
        with self._lock:
            return list(self._data.keys())

    @property
    def evictions(self) -> int:
        """How many entries were evicted because L1 was full."""
        return self._data.evictions

    def __len__(self) -> int:
        return len(self._data)
