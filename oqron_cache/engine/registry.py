"""The registry of caches by name: how workers and bus messages find a cache.

A message names a cache; code is looked up here, never imported from a dotted path in a message.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from ..core.errors import DuplicateCacheError, UnknownCacheError

if TYPE_CHECKING:
    from ..core.metrics import Stats
    from ..core.options import CacheOptions
    from .stack import CacheStack


class Cache(Protocol):
    """What the layers below the API use of a registered cache (:class:`oqron_cache.Cache`)."""

    name: str
    options: CacheOptions
    stats: Stats

    @property
    def stack(self) -> CacheStack:
        """The cache's engine in this process."""
        ...

    def unbind(self) -> None:
        """Forget the engine (the next use builds it again)."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` everywhere."""
        ...

    def invalidate_pattern(self, pattern: str, *, allow_all: bool = False) -> int:
        """Remove every key matching ``pattern``."""
        ...

    def invalidate_by_tag(self, tag: str) -> int:
        """Remove every entry tagged ``tag``."""
        ...

_lock = threading.Lock()
_caches: dict[str, Cache] = {}


def register(cache: Cache) -> None:
    """Add ``cache``; a second cache with the same name is an error."""
    with _lock:
        if cache.name in _caches:
            raise DuplicateCacheError(
                f"a cache named {cache.name!r} already exists; cache names are the keys "
                "workers use, so they must be unique (close() the old one first)",
                cache=cache.name,
            )
        _caches[cache.name] = cache


def unregister(name: str) -> None:
    """Remove the cache called ``name`` (no error if absent)."""
    with _lock:
        _caches.pop(name, None)


def lookup(name: str) -> Cache:
    """The cache called ``name``; :class:`UnknownCacheError` if none is registered."""
    try:
        return _caches[name]
    except KeyError:
        raise UnknownCacheError(
            f"no cache named {name!r} is registered in this process", cache=name
        ) from None


def names() -> list[str]:
    """The names of all registered caches, sorted."""
    with _lock:
        return sorted(_caches)


def all_caches() -> list[Cache]:
    """Every registered cache."""
    with _lock:
        return list(_caches.values())


def after_fork() -> list[Cache]:
    """In a forked child: a new lock (a parent thread may have held this one); every cache.

    Reads the table without a lock: only the forking thread runs in the child.
    """
    global _lock  # noqa: PLW0603 - the old one may be held forever
    _lock = threading.Lock()
    return list(_caches.values())
