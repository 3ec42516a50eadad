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

import hashlib
import logging
import queue
import threading
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from . import registry
from .breaker import CircuitBreaker
from .config import check_celery_app
from .errors import OqronCacheError, UnknownCacheError
from .keys import printable

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


class TaskArgumentError(OqronCacheError, ValueError):
    """A task message carried arguments of the wrong type or size (it is dropped, logged)."""


def refresh_task_id(cache: str, key: str) -> str:
    """The readable, deterministic id of a key's refresh task: ``refresh:<cache>:<digest>``."""
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


def _guarded(task_name: str, body: Any, *args: Any) -> str:
    """Run a task body; bad messages are logged and dropped (acked), never retried."""
    try:
        outcome: str = body(*args)
    except (TaskArgumentError, UnknownCacheError) as exc:
        log.error("%s rejected: %s", task_name, exc)
        return "rejected"
    return outcome


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
    for key in checked:
        cache.delete(key)
    return f"deleted {len(checked)}"


def do_invalidate_pattern(cache_name: object, pattern: object) -> str:
    """Body of ``oqron_cache.invalidate_pattern`` (``"*"`` is refused, as in the API)."""
    cache = _lookup(cache_name)
    text = _text(pattern, "pattern", 1024)
    try:
        removed = cache.invalidate_pattern(text)
    except ValueError as exc:
        raise TaskArgumentError(str(exc)) from None
    return f"deleted {removed}"


def do_invalidate_by_tag(cache_name: object, tag: object) -> str:
    """Body of ``oqron_cache.invalidate_by_tag``."""
    cache = _lookup(cache_name)
    text = _text(tag, "tag", 256)
    try:
        removed = cache.invalidate_by_tag(text)
    except NotImplementedError as exc:
        raise TaskArgumentError(str(exc)) from None
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
    bodies = {
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

        def run(*args: Any, _name: str = name, _body: Any = body) -> str:
            return _guarded(_name, _body, *args)

        run.__name__ = run.__qualname__ = name.rsplit(".", 1)[1]
        tasks[name] = app.task(name=name, **options)(run)
    conf = app.conf
    default = conf.task_default_queue
    queues = list(conf.task_queues or [_queue(Exchange, Queue, default)])
    if not any(q.name == REFRESH_QUEUE for q in queues):
        queues.append(_queue(Exchange, Queue, REFRESH_QUEUE))
        conf.task_queues = queues
    route = {REFRESH_TASK: {"queue": REFRESH_QUEUE}}
    routes = conf.task_routes
    if routes is None:
        conf.task_routes = route
    elif isinstance(routes, dict):
        routes.setdefault(REFRESH_TASK, route[REFRESH_TASK])
    else:  # a list/tuple of routers: ours goes first
        conf.task_routes = (route, *routes)
    conf.worker_send_task_events = True
    conf.task_send_sent_event = True
    _connect_fork_hook()
    return tasks


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
    """Sends refresh tasks within a time budget; a broker that fails or hangs is skipped.

    Celery's ``apply_async`` can block for a long time when the broker is down (even with
    ``retry=False``), so publishing happens on one publisher thread and the caller waits for it
    at most ``budget`` seconds. A failure or a timeout opens a circuit breaker: until it closes,
    refreshes run in the dispatcher thread instead (counted as ``enqueue_failures``).
    """

    def __init__(self, app: Any, budget: float = 1.0) -> None:
        self.app = app
        self.budget = budget
        self.breaker = CircuitBreaker(cooldown=1.0, max_cooldown=30.0)
        self._jobs: queue.Queue[tuple[list[str], str, float, Future[None]]] = queue.Queue(100)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def enqueue(self, cache: str, key: str, token: str, seen: bytes, lock_ttl: float) -> bool:
        """Send ``oqron_cache.refresh`` for ``key``; False if the broker did not take it."""
        if not self.breaker.allow():
            return False
        future: Future[None] = Future()
        args = [cache, key, token, seen.hex()]
        try:
            self._jobs.put_nowait((args, refresh_task_id(cache, key), lock_ttl, future))
        except queue.Full:
            self.breaker.failure()
            return False
        self._ensure_thread()
        try:
            future.result(timeout=self.budget)
        except FutureTimeout:
            log.warning("broker did not take a refresh task within %.2fs", self.budget)
            self.breaker.failure()
            return False
        except Exception as exc:
            log.warning("broker refused a refresh task: %s: %s", type(exc).__name__, exc)
            self.breaker.failure()
            return False
        self.breaker.success()
        return True

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._publish_loop, name="oqron-enqueue", daemon=True
                )
                self._thread.start()

    def _publish_loop(self) -> None:
        task = self.app.tasks[REFRESH_TASK]
        while True:
            args, task_id, lock_ttl, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                task.apply_async(
                    args=args,
                    task_id=task_id,
                    expires=lock_ttl,  # a refresh that waited longer than its lock is moot
                    queue=REFRESH_QUEUE,
                    retry=False,
                    argsrepr=repr(
                        [args[0], args[1], "***", args[3]]
                    ),  # the token stays out of Flower
                )
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(None)
