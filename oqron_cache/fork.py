"""Fork safety (DESIGN section 13, P11): what a forked child does before ``fork()`` returns.

Threads do not survive ``fork()``. In a child the parent's bus listener, refresh drainers,
stats flusher and broker publisher are gone, though their objects still say they run; the
parent's sockets are shared with it; a lock that another parent thread held at that instant
stays held forever; and the counters not yet flushed are the parent's to flush. So importing
the library registers :func:`after_fork_in_child` with ``os.register_at_fork``. In the child
(gunicorn ``--preload``, uWSGI without lazy-apps, a multiprocessing "fork" pool, a Celery
prefork worker, a bare ``os.fork()``) it:

* drops the inherited Runtime without closing or sending anything: redis-py's pools see the new
  pid and open the child's own connections; the parent's stay the parent's;
* unbinds every cache, so its next use builds the child's own Runtime from the same settings
  (connections, bus subscription, dispatcher, flusher) and a new stack: an empty L1, since the
  child missed the bus while it was forked, and new single-flight tables. L1 stays unwritable
  until the child's own subscription is confirmed;
* gives the locks the child goes on using (the configuration's, the registry's, each cache's
  counters') new ones, and restarts each cache's counters from zero: the parent flushes what
  it counted, the child only what it counts from now on;
* forgets the Celery app's broker connection pools, as Celery and kombu do in their own pool
  children (their hooks run only there), so the child publishes on its own connections.

No I/O, no logging, no lock taken. The parent is not touched.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from . import config
from .engine import registry

__all__ = ["after_fork_in_child", "reinit_after_fork"]


def after_fork_in_child() -> None:
    """Make this freshly forked process independent of its parent (see the module docstring).

    Called by ``os.register_at_fork`` in every child of ``os.fork()``, and by
    :func:`reinit_after_fork` in a child forked without Python's hooks.
    """
    old = config.forget_after_fork()
    settings = old.settings if old is not None else config.inherited()
    if old is not None:
        old.abandon()
    if settings is not None and settings.celery_app is not None:
        _forget_broker_pools(settings.celery_app)
    for cache in registry.after_fork():
        cache.unbind()
        cache.stats.restart()


def _forget_broker_pools(app: Any) -> None:
    # What Celery's app._after_fork and kombu's pool groups do after a fork, minus the signal:
    # drop the pools, close nothing (closing would end the parent's AMQP connection too).
    app._pool = None
    amqp = vars(app).get("amqp")
    if amqp is not None:
        amqp._producer_pool = None
    pools: Any = sys.modules.get("kombu.pools")
    if pools is not None:
        pools.connections.clear()
        pools.producers.clear()


def reinit_after_fork() -> None:
    """Give a forked child its own connections and threads now, rather than on first use.

    Optional: a Celery prefork child, or any child of ``os.fork()``, gets its own runtime on
    first use anyway. In such a child the at-fork hook has already dropped the parent's
    runtime; this builds the child's own (same settings) and waits for its bus subscription.
    Calling it again changes nothing. In a child forked without Python's at-fork hooks (uWSGI
    without ``py-call-uwsgi-fork-hooks``), it first does what the hook would have done: best
    effort, since such a child also missed CPython's own after-fork repairs.
    """
    runtime = config.current_runtime(create=False)
    if runtime is not None and runtime.pid != os.getpid():
        after_fork_in_child()  # forked from C: no at-fork hook ran
    if config.inherited() is not None:
        config.current_runtime()


_registered = False


def register() -> None:
    """Register :func:`after_fork_in_child` with ``os.register_at_fork`` (once per process)."""
    global _registered  # noqa: PLW0603 - one registration per process
    if not _registered and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=after_fork_in_child)
        _registered = True


register()
