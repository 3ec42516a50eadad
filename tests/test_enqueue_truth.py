"""A write-through set() against a broker that hangs (issue 10, defect 11): errors tell the truth.

The broker is the real RabbitMQ behind :class:`~tests.stall_proxy.StallProxy`, which holds new
connections. A publish that outlives the enqueue budget is either still queued behind a stuck
one (then it is cancelled and ``set()`` says "not sent", and it never is) or already under way
(then it may still be sent: ``set()`` returns a handle that waits for its outcome and says
"pending" until then, never "not sent"). Promise P6: no acknowledged write is lost, and no
write reported lost lands later.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.connection import Connection

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, WriteThroughError
from oqron_cache.celery.write_through import WRITE_QUEUE
from oqron_cache.config import reset
from tests.stall_proxy import StallProxy

RABBIT = ("127.0.0.1", 5672)
BUDGET = 0.3


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def vhost() -> Iterator[str]:
    name = f"oqron-truth-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture
def hung_broker(
    vhost: str, redis_url: str, namespace: str
) -> Iterator[tuple[StallProxy, Celery]]:
    proxy = StallProxy(RABBIT)
    app = Celery("truth", broker=f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        broker_connection_timeout=10,
    )
    oqron_cache.configure(
        redis_url=redis_url, celery_app=app, namespace=namespace, enqueue_budget=BUDGET
    )
    try:
        yield proxy, app
    finally:
        proxy.release()
        reset()
        app.close()
        proxy.close()


def queued(vhost: str) -> int:
    """Messages waiting in the write-through queue of ``vhost`` (straight to RabbitMQ)."""
    with Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        try:
            return int(channel.queue_declare(queue=WRITE_QUEUE, passive=True).message_count)
        except Exception:  # no such queue: nothing was ever published
            return 0


def test_a_set_whose_publish_is_under_way_is_pending_and_lands(
    hung_broker: tuple[StallProxy, Celery],
    vhost: str,
    make_cache: Callable[..., Any],
) -> None:
    proxy, _ = hung_broker
    cache = make_cache(
        tiers=[MemoryTier(max_size=10, ttl="60s"), RedisTier(ttl="60s")],
        write_through=lambda key, value: None,
    )
    outcomes: dict[str, Any] = {}

    def write(key: str) -> None:
        try:
            outcomes[key] = cache.set(key, {"k": key}, wait=False)
        except WriteThroughError as exc:
            outcomes[key] = exc

    # Two sets at once: the first publish is stuck on the broker, the second waits behind it.
    first = threading.Thread(target=write, args=("first",))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=write, args=("second",))
    second.start()
    first.join(5)
    second.join(5)
    handle = outcomes["first"]
    assert not isinstance(handle, Exception), handle  # fails: "was not sent"
    assert handle.status() == "pending"
    error = outcomes["second"]
    assert isinstance(error, WriteThroughError) and "not sent" in str(error)
    proxy.release()  # the broker answers: the publish under way completes ...
    deadline = time.monotonic() + 15
    while queued(vhost) < 1:
        assert time.monotonic() < deadline, "the pending write-through never reached the broker"
        time.sleep(0.1)
    time.sleep(0.5)
    assert queued(vhost) == 1  # ... and the one reported "not sent" was indeed not sent
    assert handle.status() == "pending"  # no worker here: sent, not yet applied


def test_a_publish_that_fails_after_the_budget_reports_not_sent(
    hung_broker: tuple[StallProxy, Celery], make_cache: Callable[..., Any]
) -> None:
    proxy, _ = hung_broker
    cache = make_cache(
        tiers=[MemoryTier(max_size=10, ttl="60s"), RedisTier(ttl="60s")],
        write_through=lambda key, value: None,
    )
    handle = cache.set("k", {"n": 1}, wait=False)
    assert handle is not None and handle.status() == "pending"
    proxy.cut()  # the broker connection dies: the publish fails
    deadline = time.monotonic() + 15
    while handle.status() == "pending":
        assert time.monotonic() < deadline, "the failed publish was never reported"
        time.sleep(0.05)
    assert handle.status().startswith("failed: not sent")
    with pytest.raises(WriteThroughError, match="not sent"):
        handle.wait(1)
