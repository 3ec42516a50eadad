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
import logging
import time
from typing import TYPE_CHECKING, Any, cast

from .entry import Entry, new_version, pack
from .errors import OqronCacheError
from .tiers.redis import L2Unavailable

if TYPE_CHECKING:
    from .stack import CacheStack

log = logging.getLogger("oqron_cache.write_through")

WRITE_ORIGIN_TASK = "oqron_cache.write_origin"
WRITE_CACHE_TASK = "oqron_cache.write_cache"
WRITE_QUEUE = "oqron_cache.write"
MAX_RETRIES = 5
OUTCOME_TTL_MS = 3600 * 1000


class WriteThroughError(OqronCacheError):
    """The origin refused a write (after its retries), or its outcome did not arrive in time."""


def backoff(retries: int) -> float:
    """Seconds before retry number ``retries + 1`` of the origin link: 0.2, 0.4, ... <= 5."""
    return float(min(0.2 * 2**retries, 5.0))


class WriteHandle:
    """The handle of one write-through ``set()``: wait for it, or ask how it went."""

    def __init__(self, stack: CacheStack, key: str, version: bytes, done: bool = False) -> None:
        self.stack = stack
        self.key = key
        self.version = version.hex()
        self._outcome: str | None = "ok" if done else None

    def status(self) -> str:
        """``"pending"``, ``"ok"`` or ``"failed: <reason>"``."""
        if self._outcome is None:
            self._outcome = self._read()
        if self._outcome is None:
            return "pending"
        return "ok" if self._outcome == "ok" else f"failed: {self._outcome[4:]}"

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

    def _read(self) -> str | None:
        l2 = self.stack.l2
        if l2 is None:
            return None
        try:
            raw = l2.conn.run(l2.conn.client.hget, l2.keys.writes(self.key), self.version)
        except L2Unavailable:
            return None
        value = cast("bytes | None", raw)
        if value is None or value == b"origin":
            return None
        return value.decode("utf-8", "replace")


def start(stack: CacheStack, key: str, value: Any) -> WriteHandle:
    """Begin a write-through ``set()``: inline without Celery, else send the chain."""
    write = stack.opts.write_through
    if write is None:
        raise OqronCacheError(f"cache {stack.name!r} has no write_through", cache=stack.name)
    version = new_version()
    payload = stack.codec.encode(value, stack.name)  # SerializationError before anything runs
    runtime = stack.runtime
    enqueuer = runtime.enqueuer if runtime is not None else None
    if enqueuer is None or stack.l2 is None:
        write(key, value)  # the origin first; an error leaves the cache untouched
        stack.set(key, value)
        return WriteHandle(stack, key, version, done=True)
    from celery import chain

    app = enqueuer.app
    args = [stack.name, key, base64.b64encode(payload).decode(), version.hex(), stack.clock()]
    flow = chain(
        app.signature(WRITE_ORIGIN_TASK, args=args, queue=WRITE_QUEUE),
        app.signature(WRITE_CACHE_TASK, queue=WRITE_QUEUE),
    )
    from .tasks import BrokerUnavailable

    try:
        enqueuer.publish(lambda: flow.apply_async(retry=False))
    except BrokerUnavailable as exc:
        raise WriteThroughError(
            f"write-through of {stack.name!r} was not sent: {exc}", cache=stack.name
        ) from exc
    stack.stats.incr("sets")
    return WriteHandle(stack, key, version)


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
    """Write the origin once per version; retry with backoff; record a final refusal."""
    l2 = _l2(stack)
    outcomes = l2.keys.writes(key)
    done = cast("bytes | None", l2.conn.run(l2.conn.client.hget, outcomes, version_hex))
    forward = [stack.name, key, payload_b64, version_hex, created_at]
    if done in (b"origin", b"ok"):
        return forward  # a redelivered link: the origin already has this write
    value = stack.codec.decode(base64.b64decode(payload_b64))
    write = stack.opts.write_through
    if write is None:
        raise OqronCacheError(f"cache {stack.name!r} has no write_through", cache=stack.name)
    try:
        write(key, value)
    except Exception as exc:
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
        pipe.publish(l2.channel, stack._message("evict", [key]))
        l2.conn.run(pipe.execute)
        return None
    pipe = l2.conn.client.pipeline(transaction=False)
    pipe.hset(outcomes, version_hex, "origin")
    pipe.pexpire(outcomes, OUTCOME_TTL_MS)
    l2.conn.run(pipe.execute)
    return forward


def cache_link(
    stack: CacheStack, key: str, payload_b64: str, version_hex: str, created_at: float
) -> str:
    """Write the cache unless a newer write is there; record "ok"; announce."""
    from .invalidation import after_fill

    l2 = _l2(stack)
    payload = base64.b64decode(payload_b64)
    value = stack.codec.decode(payload)
    now = stack.clock()
    entry = Entry(
        value,
        created_at,
        now + stack.opts.ttl,
        now + stack.opts.ttl + stack.opts.stale_ttl,
        bytes.fromhex(version_hex),
        stack._tags(key, value),
    )
    envelope = pack(entry, stack.codec.codec_id, payload)
    keys = [l2.keys.value(key), l2.keys.writes(key)]
    args = [
        envelope,
        int((stack.opts.ttl + stack.opts.stale_ttl) * 1000),
        repr(created_at),
        l2.channel,
        stack._message("evict", [key]),
        entry.version,
        version_hex,
        OUTCOME_TTL_MS,
    ]
    written = l2.conn.run(l2.conn.put_if_newer_script, keys=keys, args=args)
    if written and entry.tags:
        from .stack import NEVER

        after_fill(stack, key, entry, NEVER)
    return "written" if written else "superseded"
