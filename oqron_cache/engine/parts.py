"""What a cache's engine needs from the process it runs in, as protocols.

:class:`~oqron_cache.engine.stack.CacheStack` is given its process's live parts (the bus, the
refresh dispatcher, the recovery queue, the flood guard and, with a Celery app, an enqueuer) by
the :class:`~oqron_cache.runtime.Runtime` that builds it. The engine sits below Celery and
below the runtime, so it names them by these protocols rather than by their classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..core.flood import FloodGuard
    from ..redis.aio import AsyncRedisStore
    from ..redis.bus import Bus
    from .recovery import Recovery
    from .refresh import Dispatcher


class Enqueuer(Protocol):
    """Sends refresh tasks to workers (:class:`oqron_cache.celery.enqueue.Enqueuer`)."""

    @property
    def in_process(self) -> bool:
        """Is the worker necessarily in this process (an in-memory broker)?"""
        ...

    def enqueue(self, cache: str, key: str, token: str, seen: bytes, lock_ttl: float) -> bool:
        """Send ``oqron_cache.refresh`` for ``key``; False if the broker did not take it."""
        ...


class Parts(Protocol):
    """The process's parts every cache shares (:class:`oqron_cache.runtime.Runtime`)."""

    @property
    def bus(self) -> Bus | None:
        """The pub/sub listener (None without Redis)."""
        ...

    @property
    def dispatcher(self) -> Dispatcher:
        """The background refresh queue."""
        ...

    @property
    def enqueuer(self) -> Enqueuer | None:
        """Sends tasks to workers (None without a Celery app)."""
        ...

    @property
    def recovery(self) -> Recovery | None:
        """Deferred writes, replayed when Redis answers (None without Redis)."""
        ...

    @property
    def flood(self) -> FloodGuard:
        """The rate limit of heavy bus messages."""
        ...

    def async_store(self, stack: Any) -> AsyncRedisStore:
        """``stack``'s L2 store on the running event loop (one pool per loop)."""
        ...
