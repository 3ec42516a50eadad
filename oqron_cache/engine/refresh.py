"""The refresh dispatcher: a bounded queue of stale keys, drained by background threads.

A reader that finds a stale value returns it at once and hands the key over without blocking
and without touching Redis or the broker. A stale L1 copy does it from the hit path with a bare
``SimpleQueue.put`` (at most once per ``lock_ttl`` per copy; the drainer merges keys already
pending); every other caller uses :meth:`Dispatcher.submit`, which merges at once and honours
the key's throttle. When the queue is full the request is dropped (and counted): a dropped
request is harmless, the next stale read asks again. A key whose refresh is under way
elsewhere, or failed, is not asked for again by this process until its throttle passes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.errors import SerializationError
from ..core.keys import printable
from ..redis.store import COMPUTING, FAILED, QUEUED, L2Unavailable
from .steps import call_sync
from .writes import OVERSIZE, STORED, Basis, store

if TYPE_CHECKING:
    from .stack import CacheStack, Found

log = logging.getLogger("oqron_cache.refresh")


_THROTTLED = frozenset({"enqueued", "locked", "failed", "oversize", "error"})
Job = tuple["CacheStack", str, bytes, bool, bool]  # stack, key, seen, early, checked


class Dispatcher:
    """Per-process refresh queue with ``threads`` drainers.

    Two ways in: :meth:`submit` (merges a key already pending, honours the key's throttle) and
    the hot path's bare queue put (see :meth:`start`), which a stale L1 copy makes at most once
    per ``lock_ttl``; the drainer merges those.
    """

    def __init__(self, max_queue: int = 10_000, threads: int = 2) -> None:
        self._queue: queue.SimpleQueue[Job | threading.Barrier | None] = queue.SimpleQueue()
        self.max_queue = max_queue
        self._threads_wanted = threads
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._admit_lock = threading.Lock()
        self._join_lock = threading.Lock()
        self._pending: dict[tuple[str, str], bool] = {}
        self._throttle: dict[tuple[str, str], float] = {}
        self._throttle_lock = threading.Lock()
        self._stopped = False

    def submit(self, stack: CacheStack, key: str, seen: bytes, early: bool = False) -> bool:
        """Ask for a background refresh of ``key``; False if merged, throttled or dropped.

        ``early`` asks to refresh an entry that is still fresh (probabilistic early refresh).
        """
        ident = (stack.name, key)
        until = self._throttle.get(ident)
        if until is not None and time.monotonic() < until:
            stack.stats.incr("refreshes_deduplicated")
            return False
        # Check-then-set, not atomic: two threads may both pass, and then the key's Redis lock
        # deduplicates them (one refresh). A lock here would cost every stale read.
        if self._stopped or ident in self._pending:
            stack.stats.incr("refreshes_deduplicated")
            return False
        self._pending[ident] = True
        if self._queue.qsize() >= self.max_queue:
            self._pending.pop(ident, None)
            stack.stats.incr("refreshes_dropped")
            return False
        self._queue.put((stack, key, seen, early, True))
        if not self._threads:
            self.start()
        return True

    def start(self) -> tuple[Callable[[Job], None], Callable[[], int]]:
        """Start the drainers (once); return the queue's ``put`` and ``qsize`` for the hot path.

        A stale L1 read hands its key over with ``put((stack, key, seen, False, False))`` when
        ``qsize() < max_queue``, and nothing else: no call into this object, no lock, no
        counter. A function call would cost as much as the whole rest of the read.
        """
        with self._start_lock:
            if not self._threads and not self._stopped:
                for index in range(self._threads_wanted):
                    thread = threading.Thread(
                        target=self._drain, name=f"oqron-refresh-{index}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
        return self._queue.put, self._queue.qsize

    def _admit(self, stack: CacheStack, ident: tuple[str, str]) -> bool:
        """A posted job: is it due (not already pending)? Marks it pending if so.

        No throttle check: posts are already limited to one per ``lock_ttl`` per L1 copy, and
        a throttle started after the post would push the next attempt to twice ``lock_ttl``.
        """
        with self._admit_lock:
            if ident in self._pending:
                stack.stats.incr("refreshes_deduplicated")
                return False
            self._pending[ident] = True
        return True

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stopped:
                return
            if isinstance(job, threading.Barrier):  # join(): every earlier job is done
                with contextlib.suppress(threading.BrokenBarrierError):
                    job.wait()
                continue
            stack, key, seen, early, checked = job
            if not checked and not self._admit(stack, (stack.name, key)):
                continue
            outcome, held = "error", stack.opts.stampede.lock_ttl
            try:
                outcome, held = _plan(stack, key, seen, early)
            except Exception:
                log.exception("cache %s: refresh crashed", stack.name)
            ident = (stack.name, key)
            try:
                if outcome in _THROTTLED:
                    # Someone holds the key's lock (a worker refreshing it, or a failed
                    # refresh's throttle) for ``held`` more seconds: asking again before it
                    # expires only costs Redis round trips; asking later delays the refresh.
                    # A fill message evicts the stale copy sooner.
                    until = time.monotonic() + held
                    self.throttle(ident, until)
                    stack.retry_after(key, seen, until)
            except Exception:  # a drainer must outlive any bookkeeping error
                log.exception("cache %s: refresh bookkeeping failed", stack.name)
            finally:
                self._pending.pop(ident, None)

    def throttle(self, ident: tuple[str, str], until: float) -> None:
        """Ask no refresh of ``ident`` before ``until``; forget expired throttles past
        ``max_queue`` of them (bounds the map). Drainers call it concurrently: copying the map
        while another thread writes it raises ``RuntimeError`` (dict changed size), so writes
        and the pruning share a lock; readers (:meth:`submit`) need none."""
        with self._throttle_lock:
            self._throttle[ident] = until
            if len(self._throttle) <= self.max_queue:
                return
            now = time.monotonic()
            for old, when in list(self._throttle.items()):
                if when <= now:
                    del self._throttle[old]
            while len(self._throttle) > self.max_queue:  # all live: drop the oldest
                del self._throttle[next(iter(self._throttle))]

    def join(self, timeout: float = 5.0) -> bool:
        """Wait until every refresh requested before this call has finished (tests, shutdown).

        Puts one barrier per drainer at the back of the queue: a drainer that takes one has
        finished its earlier jobs and waits there, so when every drainer holds one, everything
        queued before them is done. Joins are serialised (two would each hold half the drainers).
        """
        deadline = time.monotonic() + timeout
        if not self._join_lock.acquire(timeout=timeout):
            return False
        try:
            with self._start_lock:
                drainers = len(self._threads)
            if self._stopped:
                return True  # nothing more runs
            if drainers == 0:
                return self._queue.empty()
            barrier = threading.Barrier(drainers + 1)
            for _ in range(drainers):
                self._queue.put(barrier)
            try:
                barrier.wait(max(0.0, deadline - time.monotonic()))
            except threading.BrokenBarrierError:  # timed out: the drainers go on
                return False
            return True
        finally:
            self._join_lock.release()

    def stop(self) -> None:
        """Stop the drainer threads; pending requests are dropped."""
        self._stopped = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()
        self._pending.clear()


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
    return runtime is not None and runtime.enqueuer is not None and runtime.enqueuer.in_process


def plan_refresh(stack: CacheStack, key: str, seen: bytes, early: bool = False) -> str:
    """Refresh ``key`` unless someone else is or did; return the outcome (for tests and logs)."""
    return _plan(stack, key, seen, early)[0]


def _plan(stack: CacheStack, key: str, seen: bytes, early: bool) -> tuple[str, float]:
    """:func:`plan_refresh`, and for how long from now the key's lock is held (seconds)."""
    lock_ttl = stack.opts.stampede.lock_ttl
    if stack.opts.resolver is None:
        return "no-resolver", lock_ttl
    if stack.l2 is None:
        # No L2 (memory-only): nothing to coordinate with; this process's own dispatcher
        # deduplicates its requests.
        stack.stats.incr("refreshes_enqueued")
        if _in_process_worker(stack):
            # A memory-only cache with an in-memory broker (its worker shares this process and
            # so this L1): the resolver runs in the worker, as with any Celery app.
            enqueuer = stack.runtime.enqueuer  # type: ignore[union-attr]
            if enqueuer is not None and enqueuer.enqueue(stack.name, key, "", seen, lock_ttl):
                return "enqueued", lock_ttl
        stamp, began, wall = stack.start(key)
        basis = Basis(seen, stamp, began, wall=wall)
        return run_refresh(stack, key, "", seen, basis=basis), lock_ttl
    # One round trip: take the key's lock and read the entry (someone may have refreshed it).
    token = secrets.token_hex(16)
    stamp, began, wall = stack.start(key)
    enqueuer = stack.runtime.enqueuer if stack.runtime is not None else None
    # Taken as "queued" when a worker will run it: a cold load takes it over rather than wait
    # for a task that may be lost (see the lock phases in oqron_cache.redis.scripts).
    phase = QUEUED if enqueuer is not None else COMPUTING
    try:
        won, raw, redis_now, held = stack.l2.acquire_or_read(key, token, lock_ttl, phase)
    except L2Unavailable:
        stack.stats.incr("l2_errors")
        stack._defer_release(key, token)  # the request may still reach Redis (P14)
        stack.stats.incr("refreshes_enqueued")
        basis = Basis(seen, stamp, began, None, token, wall)
        return run_refresh(stack, key, token, seen, basis=basis), lock_ttl
    found = stack._parse(key, raw, True, stamp, began, wall)
    if found.entry is not None and _refreshed(stack, found, seen, early):
        if won:
            stack._release(key, token)
        stack._put_l1(key, found.entry, found.stamp)  # another process already refreshed it
        stack.stats.incr("refreshes_deduplicated")
        return "already-fresh", lock_ttl
    if not won:
        stack.stats.incr("refreshes_deduplicated")
        return "locked", held
    stack.stats.incr("refreshes_enqueued")
    if enqueuer is not None:
        if enqueuer.enqueue(stack.name, key, token, found.seen, lock_ttl):
            return "enqueued", lock_ttl
        stack.stats.incr("enqueue_failures")  # broker down or slow: refresh here instead
        _mark(stack, key, token, lock_ttl, COMPUTING)  # cold loads wait for this one now
    basis = found.basis(token, redis_now)
    return run_refresh(stack, key, token, found.seen, basis=basis), lock_ttl


def run_refresh(
    stack: CacheStack, key: str, token: str, seen: bytes, *, basis: Basis | None = None
) -> str:
    """Recompute ``key`` and write it if the entry is still at version ``seen``.

    ``token`` is the lock the requester took ("" for none); the write releases it. A resolver
    error, or a value too large to cache, keeps the stale value served and keeps the lock until
    it expires, which throttles further refreshes of the key across every process. ``basis``
    is the read of L2 the caller just made; without it (a worker's task) L2 is read again
    first, and a refresh whose entry changed since it was requested is dropped.
    """
    resolver = stack.opts.resolver
    if resolver is None:
        return "no-resolver"
    if basis is None:
        # The clock, the entry and the claim of the task's lock, in one round trip.
        found, read_at, claim = stack._read_l2_at(key, token)
        if claim < 0:
            # A cold load took the lock over while this task waited in the queue: it
            # computes the value; running the resolver here too would only do it twice.
            stack.stats.incr("refreshes_deduplicated")
            return "taken-over"
        if found is not None and found.seen != seen:
            # Refreshed, written or invalidated since the request: nothing to do (P4, P5).
            if token:
                stack._release(key, token)
            if found.entry is not None and stack.clock() < found.entry.fresh_until:
                stack._put_l1(key, found.entry, found.stamp)
            stack.stats.incr("refreshes_deduplicated")
            return "superseded"
        if found is not None:
            basis = found.basis(token, read_at)
        else:
            stamp, began, wall = stack.start(key)
            basis = Basis(seen, stamp, began, None, token, wall)
    started = time.perf_counter()
    try:
        value = call_sync(resolver, key)  # an async resolver runs on this thread's loop
    except Exception:
        return _failed(stack, key, token, "failed", "failed")
    elapsed = time.perf_counter() - started
    stack.stats.incr("resolver_calls")
    stack.stats.observe("resolver", elapsed)
    try:
        outcome = store(stack, key, value, basis, elapsed, keep_lock=True)
    except SerializationError:
        # The resolver returned what the codec (or value_type) refuses: nothing is stored.
        return _failed(stack, key, token, "returned a value that cannot be stored", "refused")
    if outcome == OVERSIZE:
        # Not cacheable: refreshing again at once would only run the resolver again.
        stack.stats.incr("refresh_failures")
        _throttle(stack, key, token)
        return "oversize"
    if outcome != STORED:
        return "conflict"
    stack.stats.incr("refreshes_succeeded")
    return "refreshed"


def _failed(stack: CacheStack, key: str, token: str, what: str, outcome: str) -> str:
    """A refresh that produced nothing to store: counted, logged with its traceback, and
    throttled by the lock; the stale value stays served."""
    stack.stats.incr("refresh_failures")
    log.warning(
        "cache %s: refresh of %s %s; the stale value stays served",
        stack.name,
        printable(key),
        what,
        exc_info=True,
    )
    _throttle(stack, key, token)
    return outcome


def _throttle(stack: CacheStack, key: str, token: str) -> None:
    """Keep the key's lock for a whole ``lock_ttl`` as a throttle (phase "f"): no process
    refreshes it before then, and a cold load does not wait for it."""
    _mark(stack, key, token, stack.opts.stampede.lock_ttl, FAILED)


def _mark(stack: CacheStack, key: str, token: str, ttl: float, phase: str) -> None:
    if token and stack.l2 is not None:
        try:
            stack.l2.hold(key, token, ttl, phase)
        except L2Unavailable:
            stack.stats.incr("l2_errors")
