"""Sending the library's tasks: their stable names, refresh task ids and the enqueuer.

The task and queue names are the contract with workers and with other services that send the
tasks by name (``app.send_task``); :mod:`.tasks` registers the tasks under them. A refresh's task
id is a function of its key and of the lock hold that owns it (:func:`refresh_task_id`).
:class:`Enqueuer` publishes within a time budget, so a broker that is down or hangs costs a caller
at most that budget, and a circuit breaker then skips it for a while.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ..core.breaker import CircuitBreaker
from ..core.errors import OqronCacheError

# The logger keeps the name it had when this code lived in tasks.py, so logging configurations
# that select "oqron_cache.tasks" still see the enqueuer's warnings.
log = logging.getLogger("oqron_cache.tasks")

REFRESH_TASK = "oqron_cache.refresh"
INVALIDATE_TASK = "oqron_cache.invalidate"
INVALIDATE_PATTERN_TASK = "oqron_cache.invalidate_pattern"
INVALIDATE_TAG_TASK = "oqron_cache.invalidate_by_tag"
REFRESH_QUEUE = "oqron_cache.refresh"


class BrokerUnavailable(OqronCacheError, ConnectionError):
    """The broker did not take a task within the enqueue budget (or its breaker is open).

    ``pending`` is the publish still under way when the budget ran out (it could not be
    cancelled: the publisher thread had started it, so the task may still be sent when the
    broker answers); ``None`` when the task was certainly not sent.
    """

    def __init__(self, message: str, *, pending: Future[None] | None = None) -> None:
        super().__init__(message)
        self.pending = pending


def refresh_task_id(cache: str, key: str, token: str) -> str:
    """The readable id of a refresh: ``refresh:<cache>:<key digest>:<lock digest>``.

    Deterministic: a function of the key and of the lock hold that owns the refresh (``token``,
    whose first 8 hex digits of SHA-256 are all that shows; the token itself never leaves the
    message's arguments). The same refresh sent twice has the same id; the next refresh of the
    key, under a new lock, has a new one. The key's part, ``refresh:<cache>:<key digest>``,
    finds all of a key's refreshes in Flower. The id cannot be the key's alone: a worker that
    receives an expired message adds its id to its revoked set for hours (and mingle shares
    that set), so one expired refresh would discard every later refresh of the key.
    """
    lock = hashlib.sha256(token.encode()).hexdigest()[:8] if token else secrets.token_hex(4)
    return f"{refresh_task_prefix(cache, key)}:{lock}"


def refresh_task_prefix(cache: str, key: str) -> str:
    """The deterministic part of a key's refresh task ids: ``refresh:<cache>:<key digest>``."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"refresh:{cache}:{digest}"


class Enqueuer:
    """Sends tasks within a time budget; a broker that fails or hangs is skipped.

    Celery's ``apply_async`` can block for a long time when the broker is down (even with
    ``retry=False``), so publishing happens on one publisher thread and the caller waits for it
    at most ``budget`` seconds. A failure or a timeout opens a circuit breaker: until it closes,
    refreshes run in the dispatcher thread instead (counted as ``enqueue_failures``).
    """

    def __init__(self, app: Any, budget: float = 1.0) -> None:
        self.app = app
        self.budget = budget
        self.breaker = CircuitBreaker(cooldown=1.0, max_cooldown=30.0)
        self._jobs: queue.Queue[tuple[Callable[[], object], Future[None]] | None] = queue.Queue(100)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def in_process(self) -> bool:
        """Is the worker necessarily in this process (an in-memory broker)?"""
        return str(self.app.conf.broker_url or "").startswith("memory://")

    def enqueue(self, cache: str, key: str, token: str, seen: bytes, lock_ttl: float) -> bool:
        """Send ``oqron_cache.refresh`` for ``key``; False if the broker did not take it."""
        task = self.app.tasks[REFRESH_TASK]
        args = [cache, key, token, seen.hex()]

        def send() -> object:
            return task.apply_async(
                args=args,
                task_id=refresh_task_id(cache, key, token),
                expires=lock_ttl,  # a refresh that waited longer than its lock is moot
                queue=REFRESH_QUEUE,
                retry=False,
                argsrepr=repr([cache, key, "***", args[3]]),  # the token stays out of Flower
            )

        try:
            self.publish(send)
        except BrokerUnavailable:
            return False
        return True

    def publish(self, send: Callable[[], object]) -> None:
        """Run ``send`` (a Celery publish) on the publisher thread within the budget.

        Raises :class:`BrokerUnavailable` if it fails, times out, or the breaker is open.
        """
        if not self.breaker.allow():
            raise BrokerUnavailable("broker circuit open")
        future: Future[None] = Future()
        try:
            self._jobs.put_nowait((send, future))
        except queue.Full:
            self.breaker.failure()
            raise BrokerUnavailable("publish queue full") from None
        self._ensure_thread()
        try:
            future.result(timeout=self.budget)
        except FutureTimeout:
            log.warning("broker did not take a task within %.2fs", self.budget)
            self.breaker.failure()
            if future.cancel():  # still queued behind a stuck publish: it will never be sent
                raise BrokerUnavailable(
                    f"broker did not answer within {self.budget}s; the task was not sent"
                ) from None
            raise BrokerUnavailable(
                f"broker did not answer within {self.budget}s; the task may still be sent",
                pending=future,
            ) from None
        except Exception as exc:
            log.warning("broker refused a task: %s: %s", type(exc).__name__, exc)
            self.breaker.failure()
            raise BrokerUnavailable(f"broker refused: {type(exc).__name__}") from exc
        self.breaker.success()

    def close(self) -> None:
        """Stop the publisher thread (configure() again, reset(), shutdown)."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(queue.Full):
                self._jobs.put_nowait(None)
            thread.join(timeout=1.0)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("enqueuer closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._publish_loop, name="oqron-enqueue", daemon=True
                )
                self._thread.start()

    def _publish_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            send, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                send()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)
