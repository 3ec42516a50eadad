"""Celery integration: the library's tasks, registered on the user's own app, and the enqueuer.

Tasks have stable names, so other services can send them by name (``app.send_task``) without
importing this package's caches. They take JSON arguments only, look caches up in the registry
(never import a dotted path from a message), and are thin: the work is in library code.

* ``oqron_cache.refresh(cache, key, token, seen_version)``: recompute a stale entry.
* ``oqron_cache.invalidate(cache, keys)``, ``oqron_cache.invalidate_pattern(cache, pattern)``,
  ``oqron_cache.invalidate_by_tag(cache, tag)``: drop entries everywhere.

Refresh tasks go to their own queue (:data:`REFRESH_QUEUE`), which :func:`install` adds to the
app's ``task_queues`` so a plain ``celery -A app worker`` consumes it. They are ``acks_late`` with
``reject_on_worker_lost``: a worker killed mid-refresh gives the message back to the broker.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import queue
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from . import registry
from .breaker import CircuitBreaker
from .config import check_celery_app
from .errors import OqronCacheError, UnknownCacheError
from .keys import printable
from .write_through import (
    MAX_RETRIES,
    WRITE_CACHE_TASK,
    WRITE_ORIGIN_TASK,
    WRITE_QUEUE,
    cache_link,
    origin_link,
)

log = logging.getLogger("oqron_cache.tasks")

REFRESH_TASK = "oqron_cache.refresh"
INVALIDATE_TASK = "oqron_cache.invalidate"
INVALIDATE_PATTERN_TASK = "oqron_cache.invalidate_pattern"
INVALIDATE_TAG_TASK = "oqron_cache.invalidate_by_tag"
REFRESH_QUEUE = "oqron_cache.refresh"

MAX_KEY_CHARS = 64 * 1024
MAX_KEYS_PER_TASK = 10_000
_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    "serializer": "json",
}


class BrokerUnavailable(OqronCacheError, ConnectionError):
    """The broker did not take a task within the enqueue budget (or its breaker is open)."""


class InvalidationIncomplete(OqronCacheError, ConnectionError):
    """Redis failed during an invalidation task: it is retried (the message is not lost)."""


class TaskArgumentError(OqronCacheError, ValueError):
    """A task message carried arguments of the wrong type or size (it is dropped, logged)."""


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


def _text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        raise TaskArgumentError(f"{name} must be a str; got {type(value).__name__}")
    if not value or len(value) > limit:
        raise TaskArgumentError(f"{name} must hold 1..{limit} characters; got {len(value)}")
    return value


def _lookup(cache_name: object) -> Any:
    return registry.lookup(_text(cache_name, "cache", 200))


def _guarded(task_name: str, body: Any, *args: Any) -> Any:
    """Run a task body; bad messages are logged and dropped (acked), never retried."""
    try:
        outcome = body(*args)
    except (TaskArgumentError, UnknownCacheError) as exc:
        log.error("%s rejected: %s", task_name, exc)
        return "rejected"
    return outcome


@contextlib.contextmanager
def _complete(cache: Any) -> Iterator[None]:
    """Raise :class:`InvalidationIncomplete` if Redis failed during the block (so the task is
    retried rather than acknowledged as done)."""
    before = cache.stats.counts["l2_errors"]
    yield
    if cache.stats.counts["l2_errors"] != before:
        raise InvalidationIncomplete(
            f"Redis failed while invalidating in cache {cache.name!r}; retrying", cache=cache.name
        )


def do_refresh(cache_name: object, key: object, token: object, seen_version: object) -> str:
    """Body of ``oqron_cache.refresh``."""
    from .refresh import run_refresh

    cache = _lookup(cache_name)
    key_text = _text(key, "key", MAX_KEY_CHARS)
    if not isinstance(token, str) or len(token) > 64:
        raise TaskArgumentError("token must be a str of at most 64 characters")
    if not isinstance(seen_version, str) or len(seen_version) > 16:
        raise TaskArgumentError("seen_version must be a hex str of at most 16 characters")
    try:
        seen = bytes.fromhex(seen_version)
    except ValueError:
        raise TaskArgumentError("seen_version must be hex") from None
    outcome = run_refresh(cache.stack, key_text, token, seen)
    log.info("refresh %s %s: %s", cache.name, printable(key_text), outcome)
    return outcome


def do_invalidate(cache_name: object, keys: object) -> str:
    """Body of ``oqron_cache.invalidate``: delete each key everywhere."""
    cache = _lookup(cache_name)
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_TASK:
        raise TaskArgumentError(f"keys must be a list of at most {MAX_KEYS_PER_TASK} str")
    checked = [_text(k, "key", MAX_KEY_CHARS) for k in keys]
    with _complete(cache):
        for key in checked:
            cache.delete(key)
    return f"deleted {len(checked)}"


def do_invalidate_pattern(cache_name: object, pattern: object) -> str:
    """Body of ``oqron_cache.invalidate_pattern`` (``"*"`` is refused, as in the API)."""
    cache = _lookup(cache_name)
    text = _text(pattern, "pattern", 1024)
    try:
        with _complete(cache):
            removed = cache.invalidate_pattern(text)
    except ValueError as exc:
        raise TaskArgumentError(str(exc)) from None
    return f"deleted {removed}"


def do_invalidate_by_tag(cache_name: object, tag: object) -> str:
    """Body of ``oqron_cache.invalidate_by_tag``."""
    cache = _lookup(cache_name)
    text = _text(tag, "tag", 256)
    with _complete(cache):
        removed = cache.invalidate_by_tag(text)
    return f"deleted {removed}"


def install(app: Any) -> dict[str, Any]:
    """Register the library's tasks on ``app`` (idempotent) and make its worker see them.

    Adds :data:`REFRESH_QUEUE` to ``task_queues`` (keeping the default queue), turns task events
    on (so Flower shows refreshes) and re-creates this process's connections after a prefork
    worker forks. Returns the tasks by name.
    """
    from kombu.entity import Exchange, Queue

    check_celery_app(app)
    tasks: dict[str, Any] = {}
    bodies: dict[str, Callable[..., Any]] = {
        REFRESH_TASK: do_refresh,
        INVALIDATE_TASK: do_invalidate,
        INVALIDATE_PATTERN_TASK: do_invalidate_pattern,
        INVALIDATE_TAG_TASK: do_invalidate_by_tag,
    }
    for name, body in bodies.items():
        if name in app.tasks:
            tasks[name] = app.tasks[name]
            continue
        options = dict(_TASK_OPTIONS)
        if name != REFRESH_TASK:  # an invalidation must not be lost to a Redis outage
            options.update(
                autoretry_for=(InvalidationIncomplete,),
                retry_backoff=True,
                retry_backoff_max=60,
                max_retries=20,
            )

        tasks[name] = app.task(name=name, **options)(_task_function(name, body))
    _install_write_through(app, tasks)
    conf = app.conf
    default = conf.task_default_queue
    queues = list(conf.task_queues or [_queue(Exchange, Queue, default)])
    for name in (REFRESH_QUEUE, WRITE_QUEUE):
        if not any(q.name == name for q in queues):
            queues.append(_queue(Exchange, Queue, name))
    conf.task_queues = queues
    route = {
        REFRESH_TASK: {"queue": REFRESH_QUEUE},
        WRITE_ORIGIN_TASK: {"queue": WRITE_QUEUE},
        WRITE_CACHE_TASK: {"queue": WRITE_QUEUE},
    }
    routes = conf.task_routes
    if routes is None:
        conf.task_routes = route
    elif isinstance(routes, dict):
        for name, target in route.items():
            routes.setdefault(name, target)
    else:  # a list/tuple of routers: ours goes first
        conf.task_routes = (route, *routes)
    conf.worker_send_task_events = True
    conf.task_send_sent_event = True
    _connect_fork_hook()
    return tasks


def _task_function(name: str, body: Callable[..., Any]) -> Callable[..., Any]:
    """A task function for ``body``: positional JSON arguments only (no keyword can reach the
    library's own parameters); a wrong number of arguments is rejected and logged."""

    def run(*args: Any) -> Any:
        try:
            inspect.signature(body).bind(*args)
        except TypeError as exc:
            log.error("%s rejected: %s", name, exc)
            return "rejected"
        return _guarded(name, body, *args)

    run.__name__ = run.__qualname__ = name.rsplit(".", 1)[1]
    return run


def _install_write_through(app: Any, tasks: dict[str, Any]) -> None:
    """Register the two links of the write-through chain (see :mod:`.write_through`)."""
    if WRITE_ORIGIN_TASK in app.tasks:
        tasks[WRITE_ORIGIN_TASK] = app.tasks[WRITE_ORIGIN_TASK]
        tasks[WRITE_CACHE_TASK] = app.tasks[WRITE_CACHE_TASK]
        return

    def write_origin(
        self: Any,
        cache_name: object,
        key: object,
        payload_b64: object,
        version_hex: object,
        created_at: object,
    ) -> Any:
        def body() -> Any:
            cache = _lookup(cache_name)
            if cache.options.write_through is None:
                raise TaskArgumentError(f"cache {cache.name!r} has no write_through")
            return origin_link(
                self,
                cache.stack,
                _text(key, "key", MAX_KEY_CHARS),
                _text(payload_b64, "payload", 64 << 20),
                _text(version_hex, "version", 16),
                _number(created_at),
            )

        return _guarded(WRITE_ORIGIN_TASK, body)

    def write_cache(previous: object) -> str:
        def body() -> str:
            if previous is None:
                return "skipped: the origin refused the write"
            if not isinstance(previous, list) or len(previous) != 5:
                raise TaskArgumentError("write_cache expects the origin link's result")
            cache_name, key, payload_b64, version_hex, created_at = previous
            cache = _lookup(cache_name)
            return cache_link(
                cache.stack,
                _text(key, "key", MAX_KEY_CHARS),
                _text(payload_b64, "payload", 64 << 20),
                _text(version_hex, "version", 16),
                _number(created_at),
            )

        return str(_guarded(WRITE_CACHE_TASK, body))

    options = dict(_TASK_OPTIONS)
    tasks[WRITE_ORIGIN_TASK] = app.task(
        name=WRITE_ORIGIN_TASK, bind=True, max_retries=MAX_RETRIES, **options
    )(write_origin)
    tasks[WRITE_CACHE_TASK] = app.task(name=WRITE_CACHE_TASK, **options)(write_cache)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskArgumentError(f"created_at must be a number; got {type(value).__name__}")
    return float(value)


def _queue(exchange_cls: Any, queue_cls: Any, name: str) -> Any:
    # Its own direct exchange and routing key: a refresh is delivered to its queue only.
    return queue_cls(name, exchange_cls(name, type="direct"), routing_key=name)


def check_timings(app: Any, cache: str, lock_ttl: float) -> None:
    """Warn about Celery settings that defeat a cache's lock (bad-inputs row 16)."""
    conf = app.conf
    options = conf.broker_transport_options or {}
    broker = str(conf.broker_url or "")
    visibility = options.get("visibility_timeout")
    if (
        broker.startswith(("redis", "rediss", "sentinel"))
        and visibility is not None
        and float(visibility) < lock_ttl
    ):
        warnings.warn(
            f"cache {cache!r}: broker visibility_timeout ({visibility}s) is shorter than lock_ttl "
            f"({lock_ttl}s): the broker redelivers refresh tasks that are still running",
            stacklevel=3,
        )
    limit = conf.task_time_limit
    if limit is not None and float(limit) > lock_ttl:
        warnings.warn(
            f"cache {cache!r}: task_time_limit ({limit}s) is longer than lock_ttl ({lock_ttl}s): "
            "a refresh may outlive its lock, so another may start beside it (the version check "
            "keeps the result correct, but the work is done twice)",
            stacklevel=3,
        )


_hooked = False


def _connect_fork_hook() -> None:
    """After a prefork worker child starts, give it its own connections and threads."""
    global _hooked  # noqa: PLW0603 - one signal connection per process
    if _hooked:
        return
    from celery.signals import worker_process_init

    from .config import reinit_after_fork

    worker_process_init.connect(lambda **_: reinit_after_fork(), weak=False)
    _hooked = True


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
            raise BrokerUnavailable(f"broker did not answer within {self.budget}s") from None
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
