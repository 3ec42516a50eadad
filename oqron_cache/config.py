"""``configure()``: wire Redis (and, later, Celery) once at start-up.

Two-phase configuration: ``cache(...)`` and ``@refreshing_cache`` run at import time and only
record options; ``configure()`` connects. A cache with a Redis tier used before ``configure()``
raises :class:`NotConfiguredError`; memory-only caches work without it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from .celery.checks import check_celery_app
from .core.durations import Duration, parse_duration
from .core.keys import validate_namespace
from .core.settings import Settings, mask_url
from .redis.checks import is_tls_failure, validate_redis_url

__all__ = [  # mask_url, Settings and the checks live lower down; importable from here too
    "Settings",
    "check_celery_app",
    "configure",
    "current_runtime",
    "forget_after_fork",
    "inherited",
    "is_tls_failure",
    "mask_url",
    "reset",
    "validate_redis_url",
]

log = logging.getLogger("oqron_cache")

_lock = threading.Lock()
_runtime: Any = None  # the current Runtime (set by configure)
# The settings of a Runtime dropped in a forked child: the child builds its own on first use.
_inherited: Settings | None = None


def configure(
    redis_url: str | None = None,
    celery_app: Any = None,
    namespace: str | None = None,
    *,
    op_timeout: Duration = "250ms",
    connect_timeout: Duration | None = None,
    enqueue_budget: Duration = "1s",
    clock: Callable[[], float] | None = None,
) -> Settings:
    """Connect the library: Redis for L2, locks and the bus; optionally the user's Celery app.

    ``redis_url`` defaults to ``$OQRON_REDIS_URL`` (no Redis if neither is set: caches with a
    Redis tier then refuse to run). ``namespace`` (default ``$OQRON_NAMESPACE`` or ``"oqron"``)
    prefixes every Redis key: ``oqron:<namespace>:``. ``op_timeout`` bounds every Redis call;
    ``connect_timeout`` defaults to it. ``celery_app`` is your own Celery app: the library's
    tasks are registered on it (``oqron_cache.refresh`` and the invalidations) and stale values
    are then refreshed by its workers; call ``configure()`` in the worker processes too.
    ``enqueue_budget`` bounds how long the background dispatcher waits for the broker to take a
    refresh task before refreshing in-process instead. ``clock`` (wall clock, seconds) is for
    tests.

    Calling it again replaces the previous configuration: caches rebind on their next use. A
    Redis that cannot be reached now is not an error (the caches degrade and reconnect); wrong
    credentials, a refused TLS certificate or a Celery app that accepts pickle are.
    """
    from .runtime import Runtime

    global _runtime, _inherited  # noqa: PLW0603 - the process's one configuration
    # redis_url="" means "no Redis" even when $OQRON_REDIS_URL is set.
    url = redis_url if redis_url is not None else os.environ.get("OQRON_REDIS_URL") or None
    url = url or None
    if url is not None:
        validate_redis_url(url)
    ns = validate_namespace(
        namespace if namespace is not None else os.environ.get("OQRON_NAMESPACE", "oqron")
    )
    timeout = parse_duration(op_timeout, "op_timeout")
    connect = (
        timeout if connect_timeout is None else parse_duration(connect_timeout, "connect_timeout")
    )
    if celery_app is not None:
        check_celery_app(celery_app)
    budget = parse_duration(enqueue_budget, "enqueue_budget")
    settings = Settings(url, ns, celery_app, timeout, connect, clock, budget)
    new = Runtime(settings)
    try:
        new.start()  # fails fast on bad credentials or TLS: the old configuration stays
    except BaseException:
        new.close()
        raise
    with _lock:
        old, _runtime = _runtime, new
        _inherited = None
    _unbind_all()
    if old is not None:
        old.close()
    return settings


def inherited() -> Settings | None:
    """In a forked child before its first use: the parent's settings the child will run on."""
    return _inherited


def forget_after_fork() -> Any:
    """In a forked child: drop the inherited Runtime, keep its settings; return it.

    Part of :func:`oqron_cache.fork.after_fork_in_child`: no I/O, no lock taken (a parent
    thread may have held ``_lock`` at the fork; the child gets a new one). The next
    :func:`current_runtime` builds and starts the child's own Runtime from the same settings.
    """
    global _lock, _runtime, _inherited  # noqa: PLW0603 - see configure()
    _lock = threading.Lock()
    old, _runtime = _runtime, None
    if old is not None and not old.implicit:
        _inherited = old.settings
    return old


def _unbind_all() -> None:
    from .engine import registry

    for cache in registry.all_caches():
        cache.unbind()


def current_runtime(create: bool = True) -> Any:
    """The current Runtime; with ``create``, a Redis-less one if ``configure()`` never ran.

    In a forked child the first call builds and starts the child's own Runtime from the
    parent's settings (it waits, up to a second, for the bus subscription).
    """
    global _runtime, _inherited  # noqa: PLW0603 - see configure()
    if _runtime is None and create:
        from .runtime import Runtime

        with _lock:
            if _runtime is None:
                if _inherited is None:
                    _runtime = Runtime(
                        Settings(None, "oqron", None, 0.25, 0.25, None), implicit=True
                    )
                else:
                    new = Runtime(_inherited)
                    try:
                        new.start(check_policy=False)  # the parent has warned already
                    except BaseException:
                        new.close()
                        raise
                    _runtime, _inherited = new, None
    return _runtime


def reset() -> None:
    """Forget the configuration and stop its threads (tests, and clean shutdown)."""
    global _runtime, _inherited  # noqa: PLW0603 - see configure()
    with _lock:
        old, _runtime = _runtime, None
        _inherited = None
    _unbind_all()
    if old is not None:
        old.close()
