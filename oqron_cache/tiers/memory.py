"""L1: a per-process LRU on cachetools, keyed by the cache's ``str`` key.

Items hold the value and the instants that govern it. The hot path (a fresh hit) is one locked
``LRUCache`` lookup and a comparison against the clock: no key building, no I/O. ``cachetools``
caches are not thread-safe, so every access holds ``_lock`` (as ``cachetools.cached(lock=...)``
does); the lock is held only around the dictionary operation.
"""

from __future__ import annotations

import math
import threading
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


class MemoryStore:
    """L1 store of one cache. Thread-safe; bounded by ``max_size`` entries (promise P9)."""

    __slots__ = ("_data", "_lock", "data", "lock", "max_size")

    def __init__(self, max_size: int, on_evict: Callable[[], None] | None = None) -> None:
        self.max_size = max_size
        self._data = _CountingLRU(maxsize=max_size)
        self._data.on_evict = on_evict
        self._lock = threading.Lock()
        # Exposed for the read path's inlined hit lookup (CacheStack.get); hold ``lock``.
        self.data = self._data
        self.lock = self._lock

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
        """Drop every entry; return how many there were."""
        with self._lock:
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
