"""Cluster-wide stats: every process adds its counters to one Redis hash per cache.

A background thread flushes each cache's counter deltas at least once a second (and once more
at exit) with ``HINCRBY``/``HINCRBYFLOAT`` into ``oqron:<namespace>:stats:<cache>``; a worker's
resolver runs are counted where they happen. ``Cache.get_stats()`` flushes this process, then
reads the hash; ``get_stats(local=True)`` is this process's view alone. A delta that cannot be
written (Redis down) is kept and sent with the next flush, so nothing is double counted or lost.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..core.keys import stats_key
from ..core.metrics import view
from ..redis.store import L2Unavailable

if TYPE_CHECKING:
    from ..redis.store import RedisConn
    from .stack import CacheStack

log = logging.getLogger("oqron_cache.stats")
STATS_TTL = 30 * 86400  # a cache nobody runs any more lets its stats expire


class StatsSync:
    """The flusher of one Runtime: the stacks ``stacks()`` returns, into ``namespace``."""

    def __init__(
        self,
        conn: RedisConn,
        namespace: str,
        stacks: Callable[[], list[CacheStack]],
        interval: float = 1.0,
    ) -> None:
        self.conn = conn
        self.namespace = namespace
        self.stacks = stacks
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one flush at a time: deltas must not be sent twice
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()  # a forked child must not flush through its parent's flusher

    def start(self) -> None:
        """Start the flusher thread and the flush at interpreter exit."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oqron-stats", daemon=True)
            self._thread.start()
            atexit.register(self.flush_all)

    def stop(self) -> None:
        """Flush once more and stop the thread."""
        self._stop.set()
        self.flush_all()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        atexit.unregister(self.flush_all)

    def abandon(self) -> None:
        """In a forked child: this flusher is the parent's; never run it here, even at exit.

        The child's own Runtime has its own flusher, which sends only what the child counts.
        """
        atexit.unregister(self.flush_all)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush_all()

    def flush_all(self) -> None:
        """Flush every bound cache (best effort)."""
        for stack in self.stacks():
            try:
                self.flush(stack)
            except L2Unavailable:
                return  # Redis is down: try again next time, keeping the deltas
            except Exception:
                log.debug("stats flush failed for %s", stack.name, exc_info=True)

    def flush(self, stack: CacheStack) -> None:
        """Send ``stack``'s counter deltas to Redis; raises L2Unavailable if it cannot."""
        conn = self.conn
        if os.getpid() != self._pid:
            return
        key = stats_key(self.namespace, stack.name)
        with self._lock:
            current, delta = stack.stats.pending()
            if not delta:
                return
            pipe = conn.client.pipeline(transaction=False)
            for field, amount in delta.items():
                if isinstance(amount, float) and not amount.is_integer():
                    pipe.hincrbyfloat(key, field, amount)
                else:
                    pipe.hincrby(key, field, int(amount))
            pipe.expire(key, STATS_TTL)
            conn.run(pipe.execute)
            stack.stats.flushed(current)

    def read(self, stack: CacheStack) -> dict[str, Any]:
        """The stats of ``stack`` summed over every process (after flushing this one)."""
        conn = self.conn
        self.flush(stack)
        key = stats_key(self.namespace, stack.name)
        raw = cast("dict[bytes, bytes]", conn.run(conn.client.hgetall, key))
        return view({k.decode(): float(v) for k, v in raw.items()})
