"""Write-through as a Celery chain: write the origin, then update the cache (DESIGN section 5).

``cache.set(key, value)`` on a cache declared with ``write_through=save`` sends the chain
``oqron_cache.write_origin -> oqron_cache.write_cache``. The cache link runs only after the
origin accepted the value (a rejected value never reaches the cache). Both links are
``acks_late`` with ``reject_on_worker_lost``: a worker killed mid-chain gives the message back
and another worker redoes the link. Each write carries a version; the origin link records
"origin written" for it before the chain goes on, so a redelivered link does not write the origin
again, and the cache link writes only if no newer write is there (idempotent).

Outcomes are kept in Redis per entry (``...:w``, field = version), so ``set()`` can wait for its
write without a Celery result backend: it returns when the cache link ran (read-your-writes) or
raises :class:`WriteThroughError` when the origin refused the value after its retries.
``set(..., wait=False)`` returns a :class:`WriteHandle` to wait on later.

Without a Celery app the same happens inline: origin first, then the cache.
"""

from __future__ import annotations

import base64
import contextvars
import logging
import secrets
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

from ..core.entry import Entry, new_version, pack
from ..core.errors import OqronCacheError
from ..engine.recovery import WRITE_LOCK
from ..engine.writes import entry_tags
from ..redis.store import L2Unavailable
from .enqueue import BrokerUnavailable, Enqueuer

if TYPE_CHECKING:
    from ..engine.stack import CacheStack

log = logging.getLogger("oqron_cache.write_through")

WRITE_ORIGIN_TASK = "oqron_cache.write_origin"
WRITE_CACHE_TASK = "oqron_cache.write_cache"
WRITE_QUEUE = "oqron_cache.write"
MAX_RETRIES = 5
OUTCOME_TTL_MS = 3600 * 1000
ORIGIN_LOCK_MS = 30_000  # an origin write holds the key's write lock at most this long
ORIGIN_LOCK_WAIT = 30.0
SENT = "sent"  # a write's outcome field from set() until its origin link ran
RELOADED = "ok:reloaded"  # done, but the cache link dropped the key instead of writing it
PENDING = frozenset({None, SENT.encode(), b"origin", b"origin-lost"})
_version: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "oqron_write_version", default=None
)


class WriteThroughError(OqronCacheError):
    """The origin refused a write (after its retries), or its outcome did not arrive in time."""


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1`` of the origin link: 0.2, 0.4, ... <= 5."""
    return float(min(0.2 * 2**retries, 5.0))


class WriteHandle:
    """The handle of one write-through ``set()``: wait for it, or ask how it went."""

    def __init__(
        self,
        stack: CacheStack,
        key: str,
        version: bytes,
        done: bool = False,
        publish: Future[None] | None = None,
    ) -> None:
        self.stack = stack
        self.key = key
        self.version = version.hex()
        self._outcome: str | None = "ok" if done else None
        self._publish = publish  # a publish that outlived the enqueue budget, if any

    def status(self) -> str:
        """``"pending"``, ``"ok"`` or ``"failed: <reason>"``."""
        if self._outcome is None and self._publish is not None and self._publish.done():
            error = self._publish.exception()
            self._publish = None
            if error is not None:
                self._outcome = f"err:not sent: the broker refused it: {type(error).__name__}"
        if self._outcome is None:
            self._outcome = self._read()
        if self._outcome is None:
            return "pending"
        if self._outcome.startswith("ok"):
            return "ok"
        return f"failed: {self._outcome[4:]}"

    def done(self) -> bool:
        """True once the chain finished (either way)."""
        return self.status() != "pending"

    def wait(self, timeout: float = 30.0) -> None:
        """Block until the cache link ran; raise :class:`WriteThroughError` on failure/timeout.

        Woken by the cache link's bus message; looks at the recorded outcome every 0.2 s in
        case that message was lost.
        """
        stack = self.stack
        runtime = stack.runtime
        waiters = runtime.bus.waiters if runtime is not None and runtime.bus is not None else None
        event = waiters.register(stack.name, self.key) if waiters is not None else None
        deadline = time.monotonic() + timeout
        try:
            while (status := self.status()) == "pending":
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WriteThroughError(
                        f"write-through of {stack.name!r} did not finish within {timeout}s; it "
                        "may still land (the chain is durable)",
                        cache=stack.name,
                    )
                if event is not None:
                    event.wait(min(remaining, 0.2))
                    event.clear()
                else:
                    time.sleep(min(remaining, 0.05))
        finally:
            if event is not None and waiters is not None:
                waiters.unregister(stack.name, self.key, event)
        if status != "ok":
            raise WriteThroughError(f"write-through of {stack.name!r} {status}", cache=stack.name)
        if stack.l1 is not None:
            # Read-your-writes even if the bus message has not been handled yet.
            stack.l1.evict(self.key)

    def _read(self) -> str | None:
        l2 = self.stack.l2
        if l2 is None:
            return None
        try:
            raw = l2.conn.run(l2.conn.client.hget, l2.keys.writes(self.key), self.version)
        except L2Unavailable:
            return None
        value = cast("bytes | None", raw)
        if value in PENDING:
            return None
        assert value is not None
        return value.decode("utf-8", "replace")


def start(stack: CacheStack, key: str, value: Any) -> WriteHandle:
    """Begin a write-through ``set()``: inline without Celery, else send the chain."""
    write = stack.opts.write_through
    if write is None:
        raise OqronCacheError(f"cache {stack.name!r} has no write_through", cache=stack.name)
    version = new_version()
    payload = stack.codec.encode(value, stack.name)  # SerializationError before anything runs
    runtime = stack.runtime
    # The runtime's enqueuer is this package's (the engine knows it by a protocol only).
    enqueuer = cast("Enqueuer | None", runtime.enqueuer if runtime is not None else None)
    if enqueuer is None or stack.l2 is None:
        marker = _version.set(version.hex())
        try:
            write(key, value)  # the origin first; an error leaves the cache untouched
        finally:
            _version.reset(marker)
        stack.set(key, value)
        return WriteHandle(stack, key, version, done=True)
    from celery import chain

    app = enqueuer.app
    args = [stack.name, key, base64.b64encode(payload).decode(), version.hex(), stack.clock()]
    flow = chain(
        app.signature(WRITE_ORIGIN_TASK, args=args, queue=WRITE_QUEUE),
        app.signature(WRITE_CACHE_TASK, queue=WRITE_QUEUE),
    )
    _record_sent(stack, key, version.hex())
    try:
        enqueuer.publish(lambda: flow.apply_async(retry=False))
    except BrokerUnavailable as exc:
        if exc.pending is None:
            raise WriteThroughError(
                f"write-through of {stack.name!r} was not sent: {exc}", cache=stack.name
            ) from exc
        # The publish is under way and cannot be taken back: the write may still happen, so
        # the handle waits for its outcome like any other (and says so if it is not sent).
        log.warning("write-through of %s: %s", stack.name, exc)
        stack.stats.incr("sets")
        return WriteHandle(stack, key, version, publish=exc.pending)
    stack.stats.incr("sets")
    return WriteHandle(stack, key, version)


def _record_sent(stack: CacheStack, key: str, version_hex: str) -> None:
    """Record the write as "sent" before its chain is: its links know from this record that
    Redis kept what orders the key's writes (the high-water mark lives in the same hash) from
    this set() to their run. Without it (Redis restarted empty, evicted the hash, or did not
    answer now) the chain still writes the origin, and its cache link drops the key."""
    l2 = _l2(stack)
    outcomes = l2.keys.writes(key)
    pipe = l2.conn.client.pipeline(transaction=False)
    pipe.hset(outcomes, version_hex, SENT)
    pipe.pexpire(outcomes, OUTCOME_TTL_MS)
    try:
        l2.conn.run(pipe.execute)
    except L2Unavailable as exc:
        log.info("write-through of %s: %s not recorded (%s)", stack.name, version_hex, exc)


# --------------------------------------------------------------------------- the two links


def _l2(stack: CacheStack) -> Any:
    if stack.l2 is None:
        raise OqronCacheError(
            f"write-through of {stack.name!r} needs Redis in the worker (configure redis_url)",
            cache=stack.name,
        )
    return stack.l2


def origin_link(
    task: Any, stack: CacheStack, key: str, payload_b64: str, version_hex: str, created_at: float
) -> list[Any] | None:
    """Write the origin once per version, in write order; retry with backoff.

    Origin writes of one key are serialised by a lock and skipped when a newer write already
    reached the origin, so the origin and the cache end with the same (newest) value. The origin
    function can read :func:`current_write_version` to deduplicate: a worker killed after the
    origin accepted a write but before that was recorded makes the next worker write it again
    (at-least-once at that one boundary).
    """
    l2 = _l2(stack)
    outcomes = l2.keys.writes(key)
    forward: list[Any] = [stack.name, key, payload_b64, version_hex, created_at]
    token = secrets.token_hex(16)
    lock_keys = [outcomes, l2.keys.write_lock(key)]
    deadline = time.monotonic() + ORIGIN_LOCK_WAIT
    pause = 0.01
    while True:
        try:
            state = l2.conn.run(
                l2.conn.origin_begin_script,
                keys=lock_keys,
                args=[token, ORIGIN_LOCK_MS, version_hex, repr(created_at), OUTCOME_TTL_MS],
            )
        except L2Unavailable:
            # The request may still run when Redis answers (a paused server does): its lock
            # must not then stall every later write of the key (P14). The task is retried.
            stack._defer_release(key, token, WRITE_LOCK)
            raise
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state == "done":  # a redelivered link: the origin already has this write
            at = l2.conn.run(l2.conn.client.hget, outcomes, f"t{version_hex}")
            return [*forward, float(at) if at is not None else created_at]
        if state == "superseded":
            _announce(stack, key)
            return None  # a newer write is in the origin (and will be in the cache)
        if state == "go" or time.monotonic() > deadline:
            break  # past the deadline the holder is presumed dead (its lock expires too)
        time.sleep(pause)
        pause = min(pause * 2, 0.25)
    value = stack.codec.decode(base64.b64decode(payload_b64))
    write = stack.opts.write_through
    if write is None:
        raise OqronCacheError(f"cache {stack.name!r} has no write_through", cache=stack.name)
    marker = _version.set(version_hex)
    try:
        write(key, value)
    except Exception as exc:
        try:
            l2.conn.run(l2.conn.release_script, keys=[l2.keys.write_lock(key)], args=[token])
        except L2Unavailable:
            stack._defer_release(key, token, WRITE_LOCK)
        retries = int(task.request.retries or 0)
        if retries < MAX_RETRIES:
            raise task.retry(exc=exc, countdown=backoff(retries)) from exc
        reason = f"err:origin refused: {type(exc).__name__}: {str(exc)[:200]}"
        log.warning(
            "write-through %s: origin refused %s after %d tries: %s",
            stack.name,
            version_hex,
            retries + 1,
            exc,
        )
        pipe = l2.conn.client.pipeline(transaction=False)
        pipe.hset(outcomes, version_hex, reason)
        pipe.pexpire(outcomes, OUTCOME_TTL_MS)
        l2.conn.run(pipe.execute)
        _announce(stack, key)
        return None
    finally:
        _version.reset(marker)
    origin_at = stack.clock()
    try:
        l2.conn.run(
            l2.conn.origin_done_script,
            keys=lock_keys,
            args=[token, version_hex, repr(created_at), OUTCOME_TTL_MS, repr(origin_at)],
        )
    except L2Unavailable:
        stack._defer_release(key, token, WRITE_LOCK)  # retried: the origin deduplicates
        raise
    return [*forward, origin_at]


def _announce(stack: CacheStack, key: str) -> None:
    """Wake the set() waiting for this key (its outcome is recorded)."""
    l2 = _l2(stack)
    l2.conn.run(l2.conn.client.publish, l2.channel, stack._message("evict", [key]))


def current_write_version() -> str | None:
    """Inside a ``write_through`` function: the hex version of the write being applied.

    Use it to make the origin write idempotent (e.g. ``INSERT ... ON CONFLICT DO NOTHING`` on
    the version): a link redelivered after a crash may call the function again.
    """
    return _version.get()


def cache_link(
    stack: CacheStack,
    key: str,
    payload_b64: str,
    version_hex: str,
    created_at: float,
    origin_at: float | None = None,
    *,
    retried: bool = False,
) -> str:
    """Write the cache unless a newer write is there; record "ok"; announce.

    The value is fresh for ``ttl`` from ``origin_at``, when the origin accepted it (a link
    redelivered or retried late must not make an old value look new, P3), and is not written
    at all once past ``stale_until``: the next read loads the origin instead.

    A link cannot order its write against others whenever Redis may have lost what orders
    them (the newer writes' entries, the high-water mark): when the write's record, kept in
    the same hash since set() sent the chain, is gone (Redis restarted empty or evicted it),
    or when the link is ``retried`` (its first attempt failed on Redis). It then drops the
    key instead, with a tombstone against older fills, and the next read loads the origin,
    which holds the newest write (P5); the set() is recorded as done (its value is in the
    origin).
    """
    from ..engine.invalidation import after_fill

    l2 = _l2(stack)
    payload = base64.b64decode(payload_b64)
    value = stack.codec.decode(payload)
    now = stack.clock()
    at = created_at if origin_at is None else origin_at
    entry = Entry(
        value,
        created_at,
        at + stack.opts.ttl,
        at + stack.opts.ttl + stack.opts.stale_ttl,
        bytes.fromhex(version_hex),
        entry_tags(stack, key, value),
        written=True,
    )
    left = entry.stale_until - now
    keys = [l2.keys.value(key), l2.keys.writes(key)]
    if retried:
        return _drop(stack, key, version_hex)
    if left <= 0:
        stack.stats.incr("writes_expired")
        pipe = l2.conn.client.pipeline(transaction=False)
        pipe.hset(keys[1], version_hex, "ok")  # the origin has it: set() succeeded
        pipe.pexpire(keys[1], OUTCOME_TTL_MS)
        pipe.publish(l2.channel, stack._message("evict", [key]))
        l2.conn.run(pipe.execute)
        if stack.l1 is not None:
            stack.l1.evict(key)
        return "expired"
    envelope = pack(entry, stack.codec.codec_id, payload)
    args = [
        envelope,
        max(1, int(left * 1000)),
        repr(created_at),
        l2.channel,
        stack._message("evict", [key]),
        entry.version,
        version_hex,
        OUTCOME_TTL_MS,
        repr(at),
        new_version(),  # a newer delete's tombstone is re-versioned with it (see PUT_IF_NEWER)
    ]
    written = l2.conn.run(l2.conn.put_if_newer_script, keys=keys, args=args)
    if written == 2:  # the write's record is gone: Redis forgot what orders it
        return _drop(stack, key, version_hex)
    if stack.l1 is not None:
        stack.l1.evict(key)  # the bus message is ours, so our own L1 would not hear it
    if written and entry.tags:
        from ..engine.writes import NEVER

        after_fill(stack, key, entry, NEVER)
    return "written" if written else "superseded"


def _drop(stack: CacheStack, key: str, version_hex: str) -> str:
    """Drop the key (a tombstone) instead of writing a value that cannot be ordered (P5).

    The origin has this write or a newer one, so the next read loads what it holds. The
    set() is recorded as done ("ok:reloaded"): its value reached the origin.
    """
    l2 = _l2(stack)
    now = stack.clock()
    outcomes = l2.keys.writes(key)
    tomb = Entry(None, now, now, now, new_version(), tombstone=True)
    message = stack._message("evict", [key])
    pipe = l2.conn.client.pipeline(transaction=False)
    pipe.hset(outcomes, version_hex, RELOADED)
    pipe.pexpire(outcomes, OUTCOME_TTL_MS)
    l2.conn.run(pipe.execute)
    l2.tombstone(key, pack(tomb, stack.codec.codec_id, b""), stack._tombstone_ttl, message)
    if stack.l1 is not None:
        stack.l1.evict(key)
    stack.stats.incr("links_reloaded")
    return "reloaded"
