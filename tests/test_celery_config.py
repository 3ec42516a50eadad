"""Celery settings the library checks when it is wired to an app (bad-inputs rows 16, 18, 19)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

import oqron_cache
from oqron_cache.celery.tasks import (
    REFRESH_QUEUE,
    REFRESH_TASK,
    install,
    refresh_task_id,
    refresh_task_prefix,
)
from oqron_cache.config import reset
from tests.redis_server import RedisServer


def _app(broker: str, **conf: Any) -> Celery:
    app = Celery("t", broker=broker)
    app.conf.update(task_serializer="json", accept_content=["json"], **conf)
    return app


@pytest.fixture
def wired(redis_url: str, namespace: str) -> Iterator[Callable[..., Celery]]:
    """configure() with a Celery app built from the given settings; reset afterwards."""

    def wire(broker: str = "memory://", **conf: Any) -> Celery:
        app = _app(broker, **conf)
        oqron_cache.configure(redis_url=redis_url, celery_app=app, namespace=namespace)
        return app

    try:
        yield wire
    finally:
        reset()


def test_install_registers_the_tasks_with_their_delivery_guarantees() -> None:
    app = _app("memory://")
    tasks = install(app)
    assert install(app).keys() == tasks.keys()  # idempotent
    refresh = app.tasks[REFRESH_TASK]
    assert refresh.acks_late is True
    assert refresh.reject_on_worker_lost is True
    assert app.amqp.router.route({}, REFRESH_TASK)["queue"].name == REFRESH_QUEUE
    for name in (
        "oqron_cache.invalidate",
        "oqron_cache.invalidate_pattern",
        "oqron_cache.invalidate_by_tag",
    ):
        assert app.tasks[name].acks_late is True
    queues = {q.name: q for q in app.conf.task_queues}
    assert set(queues) == {"celery", REFRESH_QUEUE, "oqron_cache.write"}
    assert queues[REFRESH_QUEUE].routing_key == REFRESH_QUEUE  # not the default queue's key
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is True


def test_refresh_task_id_is_readable_and_deterministic_per_key_and_lock() -> None:
    prefix = refresh_task_prefix("users", "u1")
    assert prefix == refresh_task_prefix("users", "u1")
    assert prefix.startswith("refresh:users:")
    assert prefix != refresh_task_prefix("users", "u2")
    token = "5f" * 16
    first = refresh_task_id("users", "u1", token)
    assert first == refresh_task_id("users", "u1", token)  # the same refresh: the same id
    assert re.fullmatch(re.escape(prefix) + r":[0-9a-f]{8}", first)
    assert token not in first and token[:8] not in first  # the lock token stays secret
    # The next lock hold, a new id: an expired message's id is revoked by the worker for
    # hours; a reused id would make every later refresh of the key be discarded.
    assert refresh_task_id("users", "u1", "a0" * 16) != first
    assert refresh_task_id("users", "u2", token) != first
    # No lock (a memory-only cache): nothing to derive it from, so a random suffix.
    assert refresh_task_id("users", "u1", "") != refresh_task_id("users", "u1", "")


def test_visibility_timeout_shorter_than_lock_ttl_warns(
    wired: Callable[..., Celery], make_cache: Callable[..., Any]
) -> None:
    wired("redis://127.0.0.1:6379/15", broker_transport_options={"visibility_timeout": 2})
    cache = make_cache(ttl="1m", stampede={"lock_ttl": "5s"}, resolver=str)
    with pytest.warns(UserWarning, match="visibility_timeout"):
        cache.get("k")


def test_task_time_limit_longer_than_lock_ttl_warns(
    wired: Callable[..., Celery], make_cache: Callable[..., Any]
) -> None:
    wired(task_time_limit=60)
    cache = make_cache(ttl="1m", stampede={"lock_ttl": "5s"}, resolver=str)
    with pytest.warns(UserWarning, match="task_time_limit"):
        cache.get("k")


def test_coherent_timings_do_not_warn(
    wired: Callable[..., Celery], make_cache: Callable[..., Any]
) -> None:
    wired(task_time_limit=3)
    cache = make_cache(ttl="1m", stampede={"lock_ttl": "5s"}, resolver=str)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("k") == "k"


def test_cache_redis_that_is_the_broker_with_allkeys_eviction_warns(
    private_redis: RedisServer,
) -> None:
    private_redis.client().config_set("maxmemory-policy", "allkeys-lru")
    app = _app(private_redis.url)
    try:
        with pytest.warns(UserWarning, match="allkeys-lru"):
            oqron_cache.configure(redis_url=private_redis.url, celery_app=app, namespace="t")
    finally:
        reset()


def test_separate_broker_or_safe_policy_does_not_warn(private_redis: RedisServer) -> None:
    private_redis.client().config_set("maxmemory-policy", "volatile-lru")
    app = _app(private_redis.url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            oqron_cache.configure(redis_url=private_redis.url, celery_app=app, namespace="t")
    finally:
        reset()
