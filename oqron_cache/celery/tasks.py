"""Celery integration: the library's tasks, registered on the user's own app.

Tasks have stable names, so other services can send them by name (``app.send_task``) without
importing this package's caches. They take JSON arguments only, look caches up in the registry
(never import a dotted path from a message), and are thin: the work is in library code.

* ``oqron_cache.refresh(cache, key, token, seen_version)``: recompute a stale entry.
* ``oqron_cache.invalidate(cache, keys)``, ``oqron_cache.invalidate_pattern(cache, pattern)``,
  ``oqron_cache.invalidate_by_tag(cache, tag)``: drop entries everywhere.

Refresh tasks go to their own queue (:data:`REFRESH_QUEUE`), which :func:`install` adds to the
app's ``task_queues`` so a plain ``celery -A app worker`` consumes it. They are ``acks_late`` with
``reject_on_worker_lost``: a worker killed mid-refresh gives the message back to the broker.

The tasks' bodies and the checks of their arguments are in :mod:`.task_bodies`; the task and
queue names, refresh task ids and the :class:`Enqueuer` that sends tasks are in :mod:`.enqueue`.
Their names are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable
from typing import Any

from ..redis.store import L2Unavailable
from .bodies import (
    MAX_KEY_CHARS,
    MAX_KEYS_PER_TASK,
    InvalidationIncomplete,
    TaskArgumentError,
    do_invalidate,
    do_invalidate_by_tag,
    do_invalidate_pattern,
    do_refresh,
    guarded,
    lookup_cache,
    number_arg,
    text_arg,
)
from .checks import check_celery_app
from .enqueue import (
    INVALIDATE_PATTERN_TASK,
    INVALIDATE_TAG_TASK,
    INVALIDATE_TASK,
    REFRESH_QUEUE,
    REFRESH_TASK,
    BrokerUnavailable,
    Enqueuer,
    refresh_task_id,
    refresh_task_prefix,
)
from .write_through import (
    MAX_RETRIES,
    WRITE_CACHE_TASK,
    WRITE_ORIGIN_TASK,
    WRITE_QUEUE,
    cache_link,
    origin_link,
)

__all__ = [
    "INVALIDATE_PATTERN_TASK",
    "INVALIDATE_TAG_TASK",
    "INVALIDATE_TASK",
    "MAX_KEYS_PER_TASK",
    "MAX_KEY_CHARS",
    "REFRESH_QUEUE",
    "REFRESH_TASK",
    "BrokerUnavailable",
    "Enqueuer",
    "InvalidationIncomplete",
    "TaskArgumentError",
    "check_timings",
    "do_invalidate",
    "do_invalidate_by_tag",
    "do_invalidate_pattern",
    "do_refresh",
    "install",
    "refresh_task_id",
    "refresh_task_prefix",
]

log = logging.getLogger("oqron_cache.tasks")

_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "ignore_result": True,
    "serializer": "json",
}


def install(app: Any) -> dict[str, Any]:
    """Register the library's tasks on ``app`` (idempotent) and make its worker see them.

    Adds :data:`REFRESH_QUEUE` to ``task_queues`` (keeping the default queue), turns task events
    on (so Flower shows refreshes). A prefork child gets its own connections on first use (the
    at-fork hook, :mod:`oqron_cache.fork`). Returns the tasks by name.
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
        return guarded(name, body, *args)

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
            cache = lookup_cache(cache_name)
            if cache.options.write_through is None:
                raise TaskArgumentError(f"cache {cache.name!r} has no write_through")
            return origin_link(
                self,
                cache.stack,
                text_arg(key, "key", MAX_KEY_CHARS),
                text_arg(payload_b64, "payload", 64 << 20),
                text_arg(version_hex, "version", 16),
                number_arg(created_at),
            )

        return guarded(WRITE_ORIGIN_TASK, body)

    def write_cache(self: Any, previous: object) -> str:
        retried = bool(self.request.retries)  # the first attempt failed on Redis

        def body() -> str:
            if previous is None:
                return "skipped: the origin refused the write"
            # Five items from links sent before 0.2, six since (with the origin's time).
            if not isinstance(previous, list) or len(previous) not in (5, 6):
                raise TaskArgumentError("write_cache expects the origin link's result")
            cache_name, key, payload_b64, version_hex, created_at = previous[:5]
            origin_at = number_arg(previous[5]) if len(previous) == 6 else None
            cache = lookup_cache(cache_name)
            return cache_link(
                cache.stack,
                text_arg(key, "key", MAX_KEY_CHARS),
                text_arg(payload_b64, "payload", 64 << 20),
                text_arg(version_hex, "version", 16),
                number_arg(created_at),
                origin_at,
                retried=retried,
            )

        return str(guarded(WRITE_CACHE_TASK, body))

    options = dict(_TASK_OPTIONS)
    tasks[WRITE_ORIGIN_TASK] = app.task(
        name=WRITE_ORIGIN_TASK,
        bind=True,
        max_retries=MAX_RETRIES,
        # Redis failing around the origin write (recording it): retried, never acked as done.
        autoretry_for=(L2Unavailable,),
        retry_backoff=True,
        retry_backoff_max=30,
        **options,
    )(write_origin)
    # The cache step of an acknowledged origin write must land (P6): a Redis failure here is
    # retried with backoff (about 10 minutes in all), not dropped.
    tasks[WRITE_CACHE_TASK] = app.task(
        name=WRITE_CACHE_TASK,
        bind=True,
        autoretry_for=(L2Unavailable,),
        retry_backoff=True,
        retry_backoff_max=60,
        max_retries=20,
        **options,
    )(write_cache)


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
