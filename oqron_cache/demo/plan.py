"""How a demo run is wired with what this machine has, and where its Celery worker runs.

:func:`plan_run` turns the command line's :class:`DemoOptions` into a :class:`Plan`: Redis (L1 +
L2, several processes) or, when Redis does not answer, the memory tier alone in one process;
and a worker that is a ``celery worker`` subprocess, one already running (``--external-worker``),
a worker thread in this process, or none (no Celery). Each fallback is explained in a one-line
notice. :func:`start_worker` and :func:`worker_ready` start that worker and wait for it,
falling back from a failed worker process to a worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import mask_url
from ..redis.urls import is_cluster_url
from .console import Printer
from .participant import Participant
from .resolver import quiet_client

WORKER_TIMEOUT = 30.0  # a worker we start must be ready within this
EXTERNAL_TIMEOUT = 180.0  # a worker started by someone else (compose installs first)


@dataclass(frozen=True)
class DemoOptions:
    """What ``oqron-cache demo`` was asked to do (validated by the command line)."""

    redis_url: str
    requests: int = 1000
    processes: int = 4
    threads: int = 25
    external_worker: bool = False  # a worker is already running (docker compose's)
    namespace: str | None = None  # default demo-<pid>; the worker's with external_worker


def redis_problem(url: str, timeout: float = 0.5) -> str | None:
    """``None`` if Redis at ``url`` answers PING within ``timeout``, else a short reason."""
    try:
        client = quiet_client(url, timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure at all means "not usable for the demo"
        text = " ".join(str(exc).split()) or "no answer"
        return f"{type(exc).__name__}: {text[:120]}"
    return None


@dataclass
class Plan:
    """How this run is wired: Redis or not, and where the Celery worker runs."""

    url: str | None  # None: memory tier alone
    namespace: str
    broker: str | None = None  # None: no Celery
    prefix: str | None = None  # the broker's key prefix (a worker we start)
    worker_mode: str = "none"  # "process", "embedded", "external" or "none"
    own_namespace: bool = True  # demo-<pid>: all of it is deleted at the end
    notices: list[str] = field(default_factory=list)


def plan_run(options: DemoOptions) -> tuple[Plan, DemoOptions]:
    """Decide (and explain in notices) how the demo runs with what this machine has."""
    from .worker import celery_missing

    problem = redis_problem(options.redis_url)
    no_celery = celery_missing()
    if problem is not None:
        namespace = options.namespace or f"demo-{os.getpid()}"
        plan = Plan(None, namespace)
        how = "one process"
        if no_celery is None:
            plan.broker, plan.worker_mode = "memory://", "embedded"
            how += ", with a Celery worker thread on an in-memory broker"
        else:
            how += f"; {no_celery}"
        plan.notices.append(
            f"notice: Redis at {mask_url(options.redis_url)} is not available ({problem}); "
            f"running on the memory tier (L1) alone, in {how}."
        )  # one line on purpose: easy to spot and to grep
        return plan, replace(options, processes=1)
    if no_celery is None and is_cluster_url(options.redis_url):
        if not os.environ.get("OQRON_BROKER_URL"):  # kombu cannot queue on a Redis Cluster
            no_celery = "a Redis Cluster cannot be the Celery broker and OQRON_BROKER_URL is unset"
        elif not options.external_worker:
            no_celery = "the demo starts its worker on the cache's Redis, here a Redis Cluster"
    if options.external_worker:
        namespace = options.namespace or os.environ.get("OQRON_NAMESPACE") or "oqron"
        plan = Plan(options.redis_url, namespace, own_namespace=False)
        plan.broker = os.environ.get("OQRON_BROKER_URL") or options.redis_url
        plan.worker_mode = "external" if no_celery is None else "none"
    else:
        namespace = options.namespace or f"demo-{os.getpid()}"
        plan = Plan(options.redis_url, namespace)
        if no_celery is None:
            plan.broker, plan.worker_mode = options.redis_url, "process"
            plan.prefix = f"oqron:{namespace}:broker:"
    if no_celery is not None:
        plan.notices.append(
            f"notice: {no_celery}; stale values are refreshed by each process's background "
            "thread instead of a worker."
        )
    return plan, options


def start_worker(plan: Plan, participant: Participant | None, say: Printer) -> Any:
    """Start (or find) the worker of ``plan``; returns an object with wait_ready() and stop()."""
    from . import worker as demo_celery

    broker = mask_url(plan.broker or "")
    if plan.worker_mode == "process":
        try:
            worker = demo_celery.WorkerProcess(
                plan.url or "", plan.broker or "", plan.namespace, plan.prefix or "", say
            )
        except (demo_celery.WorkerUnavailable, OSError) as exc:
            say(f"notice: cannot start a worker process ({exc}); using a worker thread instead")
            plan.worker_mode = "embedded"
            return None  # started once the participant has wired the app
        say(f"  worker: started `{worker.command}` (pid {worker.pid})")
        say(f"  worker: broker {broker}, its keys under {plan.prefix}")
        return worker
    if participant is None:  # the others need the app the participant wired
        return None
    if plan.worker_mode == "embedded":
        say(f"  worker: a Celery worker thread in this process (pool solo), broker {broker}")
        return demo_celery.EmbeddedWorker(participant.app, say)
    if plan.worker_mode == "external":
        say(f"  worker: waiting for a running worker on {broker} ...")
        return demo_celery.ExternalWorker(participant.app, plan.broker or "")
    return None


def worker_ready(worker: Any, plan: Plan, participant: Participant, say: Printer) -> Any:
    """Wait for ``worker``; a worker process that failed is replaced by a worker thread."""
    from .worker import WorkerUnavailable

    timeout = EXTERNAL_TIMEOUT if plan.worker_mode == "external" else WORKER_TIMEOUT
    try:
        took = worker.wait_ready(timeout)
    except WorkerUnavailable as exc:
        if plan.worker_mode != "process":
            raise
        worker.stop()
        say(f"notice: {exc}; using a Celery worker thread in this process instead")
        plan.worker_mode = "embedded"
        worker = start_worker(plan, participant, say)
        took = worker.wait_ready(WORKER_TIMEOUT)
    how = "answered after" if plan.worker_mode == "external" else "ready, started in"
    say(f"  worker: {worker.node} {how} {took:.1f} s")
    return worker
