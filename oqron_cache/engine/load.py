"""Cold misses: one load per key across processes (DESIGN section 2, step 3).

The thread that leads a key's load in this process (see :class:`~oqron_cache.flight.Flights`)
takes the key's lock in Redis and re-reads the entry in one round trip. The winner runs the
resolver and writes the value, which announces the fill on the bus; the others wait for that
announcement, not by polling, then read L2. Liveness beats deduplication: a waiter still waiting
after ``lock_ttl`` computes the value itself. These are functions of the
:class:`~oqron_cache.stack.CacheStack` whose key they load.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from ..core.entry import NO_VERSION
from ..core.keys import printable
from ..redis.store import L2Unavailable
from .steps import EVENT, L2, RUN, SLEEP, WAIT, Step, drive
from .writes import Basis, store_steps

if TYPE_CHECKING:
    from .stack import CacheStack, Found, Resolver

log = logging.getLogger("oqron_cache")

MISSING: Any = object()  # "no fallback": nothing servable if the resolver fails
WAIT_SLICE = 0.2  # a lost pub/sub message costs a waiter at most this long (safety net, not a poll)


def load_as_leader(
    stack: CacheStack, key: str, resolver: Resolver, fallback: Any, first: Found | None = None
) -> Any:
    """:func:`load_as_leader_steps` on this thread."""
    return drive(load_as_leader_steps(stack, key, resolver, fallback, first), stack.l2)


def load_as_leader_steps(
    stack: CacheStack, key: str, resolver: Resolver, fallback: Any, first: Found | None = None
) -> Step[Any]:
    """Across processes: take the key's lock and load, or wait for the holder's fill.

    ``first`` is the L2 read the caller just made (saves one round trip).
    """
    if stack.l1 is not None:  # a flight that just ended may have filled L1: check again
        item = stack.l1.get(key)
        if item is not None and stack.clock() < item.fresh_until:
            return item.value
    if stack.l2 is None or not stack.opts.stampede.enabled:
        stamp, began, wall = stack.start(key)
        found = yield from stack._read_l2_steps(key, recheck=True)
        basis = found.basis() if found is not None else Basis(NO_VERSION, stamp, began, wall=wall)
        return (yield from compute_steps(stack, key, resolver, basis, fallback))
    lock_ttl = stack.opts.stampede.lock_ttl
    deadline = time.monotonic() + lock_ttl
    waiters = stack.runtime.bus.waiters if stack.runtime and stack.runtime.bus else None
    # Registered before anything is checked, so a fill landing between our check and our
    # wait still wakes us (no lost wake-up, no extra read).
    event = None
    if waiters is not None:
        event = yield (EVENT,)
        waiters.register(stack.name, key, event)
    found = first
    waited = False
    redis_now: int | None = None
    try:
        while True:
            if found is None:  # L2 unavailable: nobody to coordinate with
                stamp, began, wall = stack.start(key)
                basis = Basis(NO_VERSION, stamp, began, wall=wall)
                return (yield from compute_steps(stack, key, resolver, basis, fallback))
            if found.entry is not None and stack.clock() < found.entry.fresh_until:
                if waited:
                    stack.stats.incr("stampede_prevented")
                stack._put_l1(key, found.entry, found.stamp)
                return found.entry.value
            # One round trip: try the lock and read the entry again (a holder may have
            # filled it since our read; if so we must not load it a second time).
            token = secrets.token_hex(16)
            stamp, began, wall = stack.start(key)
            try:
                # A cold load: a lock held by a queued or failed refresh (nobody computing) is
                # taken over rather than waited for, unless a worker must compute it anyway.
                take_over = stack.opts.miss != "worker"
                won, raw, redis_now, _ = yield (
                    L2,
                    "acquire_or_read",
                    (key, token, lock_ttl, "r", take_over),
                )
            except BaseException as exc:
                if not isinstance(exc, L2Unavailable):
                    # Cancelled while asking: the lock may be ours, with nobody to compute.
                    yield from stack._release_steps(key, token)
                    raise
                stack.stats.incr("l2_errors")
                # The request may still reach Redis (a paused server runs it when it wakes):
                # that lock must not stay behind with nobody to release it (P14). Our fill
                # releases it if Redis answers by then; the recovery queue does otherwise.
                stack._defer_release(key, token)
                basis = found.basis(token)
                return (yield from compute_steps(stack, key, resolver, basis, fallback))
            found = stack._parse(key, raw, True, stamp, began, wall)
            if won:
                if found.entry is not None and stack.clock() < found.entry.fresh_until:
                    yield from stack._release_steps(key, token)
                    stack._put_l1(key, found.entry, found.stamp)
                    return found.entry.value
                if not (yield from load_in_worker_steps(stack, key, resolver, token, found.seen)):
                    basis = found.basis(token, redis_now)
                    return (yield from compute_steps(stack, key, resolver, basis, fallback))
                # miss="worker": a worker loads it; wait for its fill like any waiter.
            if found.entry is not None and stack.clock() < found.entry.fresh_until:
                continue  # filled meanwhile: served at the top of the loop
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Liveness beats dedup: the holder is slow or dead; compute it ourselves.
                stack.stats.incr("lock_timeouts")
                basis = found.basis("", redis_now)
                return (yield from compute_steps(stack, key, resolver, basis, fallback))
            waited = True
            if event is not None:
                yield (WAIT, event, min(remaining, WAIT_SLICE))
                event.clear()
            else:
                yield (SLEEP, min(remaining, WAIT_SLICE / 4))
            found = yield from stack._read_l2_steps(key, recheck=True)
            redis_now = None
    finally:
        if event is not None and waiters is not None:
            waiters.unregister(stack.name, key, event)


def load_in_worker_steps(
    stack: CacheStack, key: str, resolver: Resolver, token: str, seen: bytes
) -> Step[bool]:
    """miss="worker": hand a cold miss to a worker; False to load it here instead."""
    enqueuer = stack.runtime.enqueuer if stack.runtime is not None else None
    if stack.opts.miss != "worker" or enqueuer is None or resolver is not stack.opts.resolver:
        return False
    lock_ttl = stack.opts.stampede.lock_ttl
    # Publishing may wait for the broker (up to the enqueue budget): not on an event loop.
    sent = yield (RUN, lambda _key: enqueuer.enqueue(stack.name, key, token, seen, lock_ttl), key)
    if sent:
        return True
    stack.stats.incr("enqueue_failures")
    return False


def compute_steps(
    stack: CacheStack, key: str, resolver: Resolver, basis: Basis, fallback: Any
) -> Step[Any]:
    """Run the resolver, store the value (compare-and-set on ``basis.seen``), return it."""
    started = time.perf_counter()
    try:
        value = yield (RUN, resolver, key)
    except Exception:
        stack.stats.incr("resolver_errors")
        if basis.token:
            yield from stack._release_steps(key, basis.token)
        if fallback is not MISSING:
            stack.stats.incr("stale_served")
            log.warning(
                "cache %s: resolver failed for %s; serving the stale value",
                stack.name,
                printable(key),
                exc_info=True,
            )
            return fallback
        raise
    except BaseException:  # cancelled: nobody computes under our lock any more
        if basis.token:
            yield from stack._release_steps(key, basis.token)
        raise
    elapsed = time.perf_counter() - started
    stack.stats.incr("resolver_calls")
    stack.stats.observe("resolver", elapsed)
    yield from store_steps(stack, key, value, basis, elapsed)
    return value
