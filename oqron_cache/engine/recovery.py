"""Auto-recovery (promise P14): what L2 could not take is kept and applied when it answers.

A ``set()`` or ``delete()`` whose L2 write failed (Redis down, paused, out of memory, read-only),
a pattern or tag invalidation that failed part way, and the release of a lock whose request
timed out (a paused Redis runs it when it wakes, and nobody would release that lock) are kept in
one bounded queue per process, in the order they happened. The newest operation on a key (a
pattern, a tag) replaces an older one, and one that later reached L2 directly settles it. A
thread replays the queue in order as soon as Redis answers again:

* a write lands unless a newer write (or delete) is there already; like any write it replaces a
  fill (:data:`~oqron_cache.tiers.scripts.WRITE_IF_NEWER`); a value whose ``stale_until`` passed
  meanwhile is not replayed (it could not be served any more: counted ``writes_expired``);
* an invalidation runs again (it may drop a value filled since: a miss, never a stale read);
* a lock is released by compare-and-delete on its token (a no-op if it was never taken).

Counted per cache: ``writes_deferred``, ``writes_replayed``, ``writes_dropped`` (the queue was
full: the oldest is dropped, and logged), ``writes_expired``, ``releases_deferred`` and
``releases_replayed``; ``Cache.get_stats()`` also shows ``writes_pending``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.entry import Entry
from ..core.keys import Glob, printable
from ..redis.store import L2Unavailable

if TYPE_CHECKING:
    from .stack import CacheStack

log = logging.getLogger("oqron_cache.recovery")

MAX_PENDING = 10_000
RETRY_MIN = 0.05  # seconds between replay attempts while Redis does not answer ...
RETRY_MAX = 1.0  # ... doubling up to this
SCAN_COUNT = 500
UNLINK_BATCH = 500
LOG_EVERY = 10.0

WRITE_LOCK = "wl"  # the lock serialising a key's origin writes (write-through), not its fill lock
Ident = tuple[str, str, str]  # (kind letter, cache, key / pattern / tag / token)


@dataclass(slots=True)
class Op:
    """One deferred operation."""

    stack: CacheStack
    kind: str  # "write" (a set or a delete's tombstone), "release", "pattern" or "tag"
    subject: str  # the key, the pattern or the tag
    entry: Entry | None = None
    envelope: bytes = b""
    ttl: float = 0.0
    token: str = ""
    lock: str = "l"  # which of the key's locks a release is for ("l" or WRITE_LOCK)


class Recovery:
    """The deferred operations of one process (one per :class:`~oqron_cache.runtime.Runtime`)."""

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._ops: OrderedDict[Ident, Op] = OrderedDict()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._quiet_until = 0.0
        self.pending = 0  # how many are queued (read without the lock: a hint)

    # -- deferring

    def defer_write(
        self, stack: CacheStack, key: str, entry: Entry, envelope: bytes, ttl: float
    ) -> None:
        """A set (or, with a tombstone ``entry``, a delete) of ``key`` that L2 did not take."""
        self._add(("k", stack.name, key), Op(stack, "write", key, entry, envelope, ttl))

    def defer_invalidation(self, stack: CacheStack, kind: str, subject: str) -> None:
        """A ``"pattern"`` or ``"tag"`` invalidation that L2 did not complete."""
        self._add((kind[0], stack.name, subject), Op(stack, kind, subject))

    def defer_release(self, stack: CacheStack, key: str, token: str, lock: str = "l") -> None:
        """Release ``key``'s lock ``token`` once Redis answers (its request timed out).

        ``lock`` is the fill/refresh lock (``"l"``) or the origin-write lock (WRITE_LOCK).
        """
        op = Op(stack, "release", key, token=token, lock=lock)
        self._add(("l", stack.name, token), op)

    def settled(self, stack: CacheStack, subject: str, kind: str = "write") -> None:
        """A later write of key ``subject`` (or the same invalidation) reached L2 directly."""
        ident = (kind[0] if kind != "write" else "k", stack.name, subject)
        with self._lock:
            if ident in self._ops:
                del self._ops[ident]
                self.pending = len(self._ops)

    def count(self, cache: str) -> int:
        """How many writes and invalidations of ``cache`` wait for Redis."""
        with self._lock:
            return sum(1 for (kind, name, _) in self._ops if name == cache and kind != "l")

    def _add(self, ident: Ident, op: Op) -> None:
        dropped: Op | None = None
        with self._lock:
            first = not self._ops
            self._ops.pop(ident, None)  # the newest of a key replaces the older one
            self._ops[ident] = op
            if len(self._ops) > self.limit:
                _, dropped = self._ops.popitem(last=False)
            self.pending = len(self._ops)
        op.stack.stats.incr("releases_deferred" if op.kind == "release" else "writes_deferred")
        if dropped is not None:
            self._dropped(dropped, "the recovery queue is full")
        self._ensure_thread()
        if first:
            self._wake.set()

    def _dropped(self, op: Op, why: str) -> None:
        if op.kind != "release":
            op.stack.stats.incr("writes_dropped")
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + LOG_EVERY
            log.warning(
                "cache %s: a deferred %s of %s was dropped: %s",
                op.stack.name,
                op.kind,
                printable(op.subject),
                why,
            )

    # -- replaying

    def wake(self) -> None:
        """Redis answers again (its breaker closed): replay now, not at the next retry."""
        if self.pending:
            self._wake.set()

    def start(self) -> None:
        """Start the replay thread now, so that the first deferral does not (a thread start
        waits for the new thread to run: not on an event loop, P12)."""
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stop.is_set():
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="oqron-recovery", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        delay = RETRY_MIN
        while not self._stop.is_set():
            self._wake.wait(delay if self.pending else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self.pending:
                continue
            delay = RETRY_MIN if self.replay() else min(delay * 2, RETRY_MAX)

    def replay(self) -> bool:
        """Apply what is queued, in order; True if the queue is empty afterwards.

        Stops at the first operation Redis does not take (it is still down): the rest wait.
        """
        with self._lock:
            queued = list(self._ops.items())
        for ident, op in queued:
            try:
                done = self._apply(op)
            except L2Unavailable:
                return False
            except Exception:  # a bug or a value that cannot be replayed: not worth a loop
                log.exception("cache %s: a deferred %s failed", op.stack.name, op.kind)
                done = "dropped"
            with self._lock:
                if self._ops.get(ident) is op:
                    del self._ops[ident]
                self.pending = len(self._ops)
            if done == "dropped":
                self._dropped(op, "it could not be replayed")
            else:
                op.stack.stats.incr(done)
        return not self.pending

    def _apply(self, op: Op) -> str:
        """Apply ``op``; the counter to count it under. Raises L2Unavailable if Redis fails."""
        stack = op.stack
        l2 = stack.l2
        if l2 is None:
            return "dropped"
        if op.kind == "release":
            lock = l2.keys.write_lock(op.subject) if op.lock == WRITE_LOCK else None
            if lock is None:
                l2.release(op.subject, op.token)  # raises L2Unavailable through RedisConn.run
            else:
                l2.conn.run(l2.conn.release_script, keys=[lock], args=[op.token])
            return "releases_replayed"
        if op.kind == "pattern":
            from .invalidation import invalidate_pattern_in_l2

            invalidate_pattern_in_l2(stack, Glob(op.subject), SCAN_COUNT, UNLINK_BATCH)
            return "writes_replayed"
        if op.kind == "tag":
            from .invalidation import invalidate_tag_in_l2

            invalidate_tag_in_l2(stack, op.subject)
            return "writes_replayed"
        entry = op.entry
        assert entry is not None
        ttl = op.ttl
        if not entry.tombstone:
            left = entry.stale_until - stack.clock()
            if left <= 0:
                return "writes_expired"  # it could not be served any more: nothing to restore
            ttl = min(ttl, left)
        args = [
            op.envelope,
            max(1, int(ttl * 1000)),
            repr(entry.created_at),
            l2.channel,
            stack._message("evict", [op.subject]),
        ]
        script, keys = l2.conn.write_if_newer_script, [l2.keys.value(op.subject)]
        written = l2.conn.run(script, keys=keys, args=args)
        if written and entry.tags and not entry.tombstone:
            from .invalidation import after_fill
            from .writes import NEVER

            after_fill(stack, op.subject, entry, NEVER)
        return "writes_replayed"

    def abandon(self) -> None:
        """In a forked child: forget the parent's queue and never start a thread (no lock
        taken: a parent thread may have held it at the fork)."""
        self._stop.set()
        self._lock = threading.Lock()
        self._ops = OrderedDict()
        self.pending = 0
        self._thread = None

    def close(self) -> None:
        """Stop the thread after one last attempt; what is left is dropped (and counted)."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2)
        if self.pending:
            try:
                self.replay()
            except Exception:  # closing is best effort
                log.debug("last replay failed", exc_info=True)
        with self._lock:
            left = list(self._ops.values())
            self._ops.clear()
            self.pending = 0
        for op in left:
            self._dropped(op, "the configuration was closed before Redis answered")
