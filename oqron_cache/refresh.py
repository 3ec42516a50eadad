"""The refresh dispatcher: a bounded queue of stale keys, drained by background threads.

A reader that finds a stale value returns it at once and calls :meth:`Dispatcher.submit`, which
never blocks and never touches Redis or the broker. Requests for a key already pending in this
process are merged; when the queue is full the oldest request is dropped (and counted): a dropped
request is harmless, the next stale read asks again. A key whose refresh failed is not retried by
this process until its throttle passes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stack import CacheStack

log = logging.getLogger("oqron_cache.refresh")


class Dispatcher:
    """Per-process refresh queue with ``threads`` drainers (started on first use)."""

    def __init__(self, max_queue: int = 10_000, threads: int = 2) -> None:
        self._queue: deque[tuple[CacheStack, str, bytes]] = deque()
        self._max = max_queue
        self._threads_wanted = threads
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._pending: set[tuple[str, str]] = set()
        self._throttle: dict[tuple[str, str], float] = {}
        self._stopped = False
        self._busy = 0

    def submit(self, stack: CacheStack, key: str, seen: bytes) -> bool:
        """Ask for a background refresh of ``key``; False if merged with a pending one."""
        ident = (stack.name, key)
        with self._cond:
            if ident in self._pending or self._stopped:
                stack.stats.incr("refreshes_deduplicated")
                return False
            until = self._throttle.get(ident)
            if until is not None:
                if time.monotonic() < until:
                    stack.stats.incr("refreshes_deduplicated")
                    return False
                del self._throttle[ident]
            if len(self._queue) >= self._max:
                old_stack, old_key, _ = self._queue.popleft()
                self._pending.discard((old_stack.name, old_key))
                old_stack.stats.incr("refreshes_dropped")
            self._pending.add(ident)
            self._queue.append((stack, key, seen))
            if not self._threads:
                self._start()
            self._cond.notify()
        return True

    def _start(self) -> None:
        for index in range(self._threads_wanted):
            thread = threading.Thread(
                target=self._drain, name=f"oqron-refresh-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                stack, key, seen = self._queue.popleft()
                self._busy += 1
            outcome = "error"
            try:
                outcome = stack.refresh_now(key, seen)
            except Exception:
                log.exception("cache %s: refresh crashed", stack.name)
            finally:
                with self._cond:
                    ident = (stack.name, key)
                    self._pending.discard(ident)
                    if outcome in ("failed", "error"):
                        self._throttle[ident] = time.monotonic() + stack.opts.stampede.lock_ttl
                    self._busy -= 1
                    self._cond.notify_all()

    def join(self, timeout: float = 5.0) -> bool:
        """Wait until the queue is empty and no refresh runs (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def stop(self) -> None:
        """Stop the drainer threads; pending requests are dropped."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._pending.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()
