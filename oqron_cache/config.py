"""``configure()``: wire Redis (and, later, Celery) once at start-up.

Two-phase configuration: ``cache(...)`` and ``@refreshing_cache`` run at import time and only
record options; ``configure()`` connects. A cache with a Redis tier used before ``configure()``
raises :class:`NotConfiguredError`; memory-only caches work without it.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from .durations import Duration, parse_duration
from .errors import ConfigurationError
from .keys import validate_namespace
from .redis_urls import check_url

log = logging.getLogger("oqron_cache")

_SCHEMES = ("redis", "rediss", "unix")


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and ``repr``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if parts.password is not None:
        # Keep the host part exactly as written (IPv6 brackets, port).
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(?i)((?:^|&)(?:sentinel_)?password=)[^&]*", r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def validate_redis_url(url: object) -> str:
    """Return ``url`` if it is a usable Redis URL; raise :class:`ConfigurationError` otherwise."""
    if not isinstance(url, str):
        raise TypeError(f"redis_url must be a str; got {type(url).__name__}")
    parts = urlsplit(url)
    if not parts.scheme:
        raise ConfigurationError(
            f"redis_url {mask_url(url)!r} has no scheme; "
            "use redis://host:port/db or rediss:// for TLS"
        )
    if parts.scheme in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        check_url(url)
        return url
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"redis_url scheme {parts.scheme!r} is not a Redis scheme; "
            "use redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
        )
    if parts.scheme == "rediss":
        reqs = parse_qs(parts.query).get("ssl_cert_reqs", [""])[0].lower()
        if reqs in ("none", "cert_none"):
            warnings.warn(
                f"redis_url {mask_url(url)!r} turns TLS certificate verification off "
                "(ssl_cert_reqs=none): anyone on the path can impersonate Redis",
                stacklevel=3,
            )
    return url


@dataclass(frozen=True)
class Settings:
    """What ``configure()`` was given, validated."""

    redis_url: str | None
    namespace: str
    celery_app: Any
    op_timeout: float
    connect_timeout: float
    clock: Callable[[], float] | None
    enqueue_budget: float = 1.0

    def __repr__(self) -> str:
        url = mask_url(self.redis_url) if self.redis_url else None
        return f"Settings(redis_url={url!r}, namespace={self.namespace!r})"


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


def reinit_after_fork() -> None:
    """Give a forked child its own connections and threads now, rather than on first use.

    Called from Celery's ``worker_process_init`` (connected by the library). In a child of
    ``os.fork()`` the at-fork hook (:mod:`oqron_cache.fork`) has already dropped the parent's
    runtime; this builds the child's own (same settings) and waits for its bus subscription.
    Calling it again changes nothing. In a child forked without Python's at-fork hooks (uWSGI
    without ``py-call-uwsgi-fork-hooks``), it first does what the hook would have done: best
    effort, since such a child also missed CPython's own after-fork repairs.
    """
    from .fork import after_fork_in_child

    runtime = _runtime
    if runtime is not None and runtime.pid != os.getpid():
        after_fork_in_child()  # forked from C: no at-fork hook ran
    if _inherited is not None:
        current_runtime()


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
    from . import registry

    for cache in registry.all_caches():
        cache.unbind()


def check_celery_app(app: Any) -> None:
    """Refuse a Celery app that would accept or send pickle (remote code execution)."""
    conf = getattr(app, "conf", None)
    if conf is None:
        raise TypeError(f"celery_app must be a celery.Celery; got {type(app).__name__}")
    for setting in ("task_serializer", "result_serializer"):
        if _is_pickle(conf.get(setting, "json")):
            raise ConfigurationError(f"pickle is not allowed; use json (celery {setting})")
    for setting in ("accept_content", "result_accept_content"):
        accepted = conf.get(setting) or []
        if any(_is_pickle(item) for item in accepted):
            raise ConfigurationError(f"pickle is not allowed; use json (celery {setting})")
    broker = str(conf.get("broker_url") or "")
    scheme = broker.partition("://")[0] if "://" in broker else ""
    if scheme in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        # kombu reads "redis+x://..." as transport "redis" with no host: localhost:6379.
        raise ConfigurationError(
            f"celery broker_url {scheme}:// is this library's URL form, not kombu's: kombu "
            "would queue on localhost:6379; give Celery oqron_cache.clients.celery_broker(url) "
            "(a sentinel:// URL and its broker_transport_options)"
        )


def _is_pickle(content_type: object) -> bool:
    # kombu registers pickle both as "pickle" and as its content type.
    text = str(content_type).lower()
    return "pickle" in text or "x-python-serialize" in text


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


def is_tls_failure(exc: BaseException) -> bool:
    """True if ``exc`` (or its cause chain) is a TLS certificate/handshake failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen) or "certificate" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
