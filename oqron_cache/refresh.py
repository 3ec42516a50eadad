"""The refresh dispatcher: a bounded queue of stale keys, drained by background threads.

A reader that finds a stale value returns it at once and calls :meth:`Dispatcher.submit`, which
never blocks and never touches Redis or the broker. Requests for a key already pending in this
process are merged; when the queue is full the oldest request is dropped (and counted): a dropped
request is harmless, the next stale read asks again. A key whose refresh failed is not retried by
this process until its throttle passes.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .keys import printable
from .tiers.redis import L2Unavailable

if TYPE_CHECKING:
    from .stack import CacheStack, Found

log = logging.getLogger("oqron_cache.refresh")


_THROTTLED = frozenset({"enqueued", "locked", "failed", "error"})


class Dispatcher:
    """Per-process refresh queue with ``threads`` drainers (started on first use)."""

    def __init__(self, max_queue: int = 10_000, threads: int = 2) -> None:
        self._queue: deque[tuple[CacheStack, str, bytes, bool]] = deque()
        self._max = max_queue
        self._threads_wanted = threads
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._pending: set[tuple[str, str]] = set()
        self._throttle: dict[tuple[str, str], float] = {}
        self._stopped = False
        self._busy = 0

    def submit(self, stack: CacheStack, key: str, seen: bytes, early: bool = False) -> bool:
        """Ask for a background refresh of ``key``; False if merged with a pending one.

        ``early`` asks to refresh an entry that is still fresh (probabilistic early refresh).
        """
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
                old_stack, old_key, _, _ = self._queue.popleft()
                self._pending.discard((old_stack.name, old_key))
                old_stack.stats.incr("refreshes_dropped")
            self._pending.add(ident)
            self._queue.append((stack, key, seen, early))
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
                stack, key, seen, early = self._queue.popleft()
                self._busy += 1
            outcome = "error"
            try:
                outcome = plan_refresh(stack, key, seen, early)
            except Exception:
                log.exception("cache %s: refresh crashed", stack.name)
            finally:
                with self._cond:
                    ident = (stack.name, key)
                    self._pending.discard(ident)
                    if outcome in _THROTTLED:
                        # Someone holds the key's lock (a worker refreshing it, or a failed
                        # refresh's throttle): asking again before it expires only costs
                        # Redis round trips. A fill message evicts the stale copy sooner.
                        self._throttle[ident] = time.monotonic() + stack.opts.stampede.lock_ttl
                        if len(self._throttle) > self._max:
                            self._prune()
                    self._busy -= 1
                    self._cond.notify_all()

    def _prune(self) -> None:
        """Forget expired throttles (called with the lock held; bounds the map's size)."""
        now = time.monotonic()
        for ident in [i for i, until in self._throttle.items() if until <= now]:
            del self._throttle[ident]
        while len(self._throttle) > self._max:  # all live: drop the oldest
            del self._throttle[next(iter(self._throttle))]

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


# ---------------------------------------------------------------------------------------------
# What a refresh does. The dispatcher side (plan_refresh) decides and takes the lock; the runner
# side (run_refresh) recomputes and writes. With a Celery app the runner is the
# ``oqron_cache.refresh`` task in a worker; without one, or when the broker cannot take the task
# within its budget, the dispatcher thread runs it itself (same lock, same version check).


def _refreshed(stack: CacheStack, found: Found, seen: bytes, early: bool) -> bool:
    """Has someone refreshed the entry already? (An early refresh targets a fresh entry.)"""
    entry = found.entry
    if entry is None or stack.clock() >= entry.fresh_until:
        return False
    return not early or found.seen != seen


def _in_process_worker(stack: CacheStack) -> bool:
    """Is the configured Celery app's worker necessarily in this process (memory broker)?"""
    runtime = stack.runtime
    if runtime is None or runtime.enqueuer is None:
        return False
    return str(runtime.enqueuer.app.conf.broker_url or "").startswith("memory://")


def plan_refresh(stack: CacheStack, key: str, seen: bytes, early: bool = False) -> str:
    """Refresh ``key`` unless someone else is or did; return the outcome (for tests and logs)."""
    if stack.opts.resolver is None:
        return "no-resolver"
    found = stack._read_l2(key)
    if found is not None and found.entry is not None and _refreshed(stack, found, seen, early):
        stack._put_l1(key, found.entry, found.epoch)  # another process already refreshed it
        stack.stats.incr("refreshes_deduplicated")
        return "already-fresh"
    if found is None or stack.l2 is None:
        # No L2 (memory-only, or Redis unavailable): nothing to coordinate with; this
        # process's own dispatcher deduplicates its requests.
        stack.stats.incr("refreshes_enqueued")
        if stack.l2 is None and _in_process_worker(stack):
            # A memory-only cache with an in-memory broker (its worker shares this process and
            # so this L1): the resolver runs in the worker, as with any Celery app.
            enqueuer = stack.runtime.enqueuer  # type: ignore[union-attr]
            if enqueuer is not None and enqueuer.enqueue(
                stack.name, key, "", seen, stack.opts.stampede.lock_ttl
            ):
                return "enqueued"
        return run_refresh(stack, key, "", seen, checked=True)
    token = secrets.token_hex(16)
    epoch = stack.epoch
    try:
        won, raw, redis_now = stack.l2.acquire_or_read(key, token, stack.opts.stampede.lock_ttl)
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        stack.stats.incr("refreshes_enqueued")
        return run_refresh(stack, key, "", seen, checked=True)
    if not won:
        stack.stats.incr("refreshes_deduplicated")
        return "locked"
    found = stack._parse(key, raw, True, epoch)
    if found.entry is not None and _refreshed(stack, found, seen, early):
        stack._release(key, token)
        stack._put_l1(key, found.entry, found.epoch)
        stack.stats.incr("refreshes_deduplicated")
        return "already-fresh"
    stack.stats.incr("refreshes_enqueued")
    enqueuer = stack.runtime.enqueuer if stack.runtime is not None else None
    if enqueuer is not None:
        if enqueuer.enqueue(stack.name, key, token, found.seen, stack.opts.stampede.lock_ttl):
            return "enqueued"
        stack.stats.incr("enqueue_failures")  # broker down or slow: refresh here instead
    return run_refresh(stack, key, token, found.seen, checked=True, started_us=redis_now)


def run_refresh(
    stack: CacheStack,
    key: str,
    token: str,
    seen: bytes,
    *,
    checked: bool = False,
    started_us: int | None = None,
) -> str:
    """Recompute ``key`` and write it if the entry is still at version ``seen``.

    ``token`` is the lock the requester took ("" for none); the write releases it. A resolver
    error keeps the stale value served and keeps the lock until it expires, which throttles
    further refreshes of the key across every process. ``checked`` skips the re-read of L2 when
    the caller has just made it.
    """
    resolver = stack.opts.resolver
    if resolver is None:
        return "no-resolver"
    if started_us is None:
        started_us = stack._redis_now()
    if not checked:
        found = stack._read_l2(key)
        if found is not None and found.seen != seen:
            # Refreshed, written or invalidated since the request: nothing to do (P4, P5).
            if token:
                stack._release(key, token)
            if found.entry is not None and stack.clock() < found.entry.fresh_until:
                stack._put_l1(key, found.entry, found.epoch)
            stack.stats.incr("refreshes_deduplicated")
            return "superseded"
    started = time.perf_counter()
    try:
        value = resolver(key)
    except Exception:
        stack.stats.incr("refresh_failures")
        log.warning(
            "cache %s: refresh of %s failed; the stale value stays served",
            stack.name,
            printable(key),
            exc_info=True,
        )
        if token and stack.l2 is not None:
            try:
                stack.l2.hold(key, token, stack.opts.stampede.lock_ttl)
            except L2Unavailable:
                stack.stats.incr("l2_errors")
        return "failed"
    elapsed = time.perf_counter() - started
    stack.stats.incr("resolver_calls")
    stack.stats.observe("resolver", elapsed)
    if not stack._store(key, value, seen, token, elapsed, started_us):
        return "conflict"
    stack.stats.incr("refreshes_succeeded")
    return "refreshed"
