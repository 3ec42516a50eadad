"""Redis Sentinel: ``redis+sentinel://`` URLs, and a cache that follows a failover.

The servers are private (tests/redis_server.py): a master, a replica of it, and one sentinel
(quorum 1) watching them. The failover test kills the master, as a crash would: the cache must
keep answering (P1) and then write to the promoted replica.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier
from oqron_cache.config import current_runtime, mask_url, validate_redis_url
from oqron_cache.core.errors import ConfigurationError
from oqron_cache.redis.clients import SentinelTarget, celery_broker, parse_sentinel_url
from oqron_cache.redis.replies import as_dict
from tests.redis_server import RedisServer, SentinelServer
from tests.worker_process import WorkerProcess, web_app

ROOT = Path(__file__).resolve().parent.parent

# -- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+sentinel://10.0.0.1/mymaster",
            SentinelTarget((("10.0.0.1", 26379),), "mymaster"),
        ),
        (
            "redis+sentinel://u:p%40ss@a:1,b,[::1]:3/svc/4?sentinel_password=sp",
            SentinelTarget((("a", 1), ("b", 26379), ("::1", 3)), "svc", 4, "u", "p@ss", None, "sp"),
        ),
        (
            "redis+sentinel://:pw@h:5/m/0?sentinel_username=su&sentinel_password=",
            SentinelTarget((("h", 5),), "m", 0, None, "pw", "su", ""),
        ),
    ],
)
def test_sentinel_urls_name_sentinels_service_db_and_credentials(
    url: str, expected: SentinelTarget
) -> None:
    assert parse_sentinel_url(url) == expected
    assert validate_redis_url(url) == url


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+sentinel:///mymaster", "no sentinel host"),
        ("redis+sentinel://h:1", "no service name"),
        ("redis+sentinel://h:1/", "no service name"),
        ("redis+sentinel://h:99999/m", "not a port number"),
        ("redis+sentinel://h:x/m", "not a port number"),
        ("redis+sentinel://:1/m", "has no host"),
        ("redis+sentinel://h/m/x", "db 'x' is not a number"),
        ("redis+sentinel://h/m/0/extra", "more than /service/db"),
        ("redis+sentinel://h/m?master_name=n", "unknown query parameter 'master_name'"),
        ("rediss+sentinel://h/m", "not supported yet"),
    ],
)
def test_malformed_sentinel_urls_are_refused_naming_redis_url(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match="redis_url") as info:
        oqron_cache.configure(redis_url=url, namespace="sentinel-bad")
    assert complaint in str(info.value)


def test_sentinel_url_passwords_are_masked() -> None:
    url = "redis+sentinel://user:s3cret@a:1,b:2/m/0?sentinel_password=t0p&x=1"
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert "t0p" not in masked
    assert masked == "redis+sentinel://user:***@a:1,b:2/m/0?sentinel_password=***&x=1"
    assert "s3cret" not in repr(parse_sentinel_url(url.replace("&x=1", "")))


# -- a real master, replica and sentinel --------------------------------------------------------


class Sentinelled:
    """A master, its replica (in sync) and a sentinel that knows both."""

    def __init__(self) -> None:
        no_delay = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(extra_args=no_delay)
        self.replica = RedisServer(
            extra_args=[*no_delay, "--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinel = SentinelServer(master_port=self.master.port)
        self.url = f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.sentinel.service}/0"
        replica = self.replica.client()
        _wait(lambda: _role(replica)["master_link_status"] == "up", "replica sync")
        admin = self.sentinel.client()
        _wait(
            lambda: len(admin.execute_command("SENTINEL", "REPLICAS", self.sentinel.service)) == 1,
            "the sentinel to find the replica",
        )

    def close(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            server.close()


def _role(client: redis.Redis) -> dict[str, Any]:
    return as_dict(client.info("replication"))


def _wait(done: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def sentinelled() -> Iterator[Sentinelled]:
    servers = Sentinelled()
    try:
        yield servers
    finally:
        oqron_cache.reset()
        servers.close()


def _cache(calls: list[str]) -> Any:
    def resolve(key: str) -> dict[str, Any]:
        calls.append(key)
        return {"key": key, "n": len(calls)}

    return oqron_cache.cache(
        f"sentinel-{len(calls)}-{time.monotonic_ns()}",
        tiers=[MemoryTier(max_size=100, ttl=60), RedisTier(ttl=60)],
        resolver=resolve,
    )


def test_a_cache_on_a_sentinel_url_uses_the_master_it_names(sentinelled: Sentinelled) -> None:
    oqron_cache.configure(redis_url=sentinelled.url, namespace="sentinel")
    calls: list[str] = []
    cache = _cache(calls)
    assert cache.get("a") == {"key": "a", "n": 1}
    cache.set("b", {"key": "b", "n": 0})
    master = sentinelled.master.client()
    for key in ("a", "b"):
        assert master.exists(cache.stack.l2.keys.value(key)) == 1
    cache.stack.l1.clear()
    assert cache.get("b") == {"key": "b", "n": 0}  # from L2, through the sentinel's master
    assert calls == ["a"]
    runtime = current_runtime()
    assert runtime.bus is not None
    _wait(lambda: runtime.bus.healthy, "the bus")


@pytest.mark.asyncio
async def test_the_async_front_on_a_sentinel_url_reads_and_writes_the_master(
    sentinelled: Sentinelled,
) -> None:
    oqron_cache.configure(redis_url=sentinelled.url, namespace="sentinel-async")
    calls: list[str] = []
    cache = _cache(calls)
    master = sentinelled.master.client()
    assert await cache.aget("a") == {"key": "a", "n": 1}
    await cache.aset("b", {"key": "b", "n": 0})
    for key in ("a", "b"):
        assert master.exists(cache.stack.l2.keys.value(key)) == 1
    cache.stack.l1.clear()
    assert await cache.aget_many(["a", "b"]) == {
        "a": {"key": "a", "n": 1},
        "b": {"key": "b", "n": 0},
    }  # from L2, through redis.asyncio's sentinel client
    await cache.adelete("a")
    assert await cache.aget("a") == {"key": "a", "n": 2}  # deleted on the master: reloaded
    assert calls == ["a", "a"]
    assert cache.get_stats(local=True)["l2_errors"] == 0


def test_master_killed_the_cache_keeps_answering_and_follows_the_promoted_replica(
    sentinelled: Sentinelled,
) -> None:
    oqron_cache.configure(
        redis_url=sentinelled.url, namespace="sentinel", op_timeout="200ms", connect_timeout="200ms"
    )
    calls: list[str] = []
    cache = _cache(calls)
    cache.set("k", {"key": "k", "n": 0})
    new_master = ("127.0.0.1", sentinelled.replica.port)

    sentinelled.master.kill()
    promoted_at = None
    deadline = time.monotonic() + 30
    reads = 0
    # Until one second after the sentinel promoted the replica: every call answers (P1), from
    # L2, or from the resolver while L2 is away (the bus's loss flushed L1).
    while promoted_at is None or time.monotonic() < promoted_at + 1.0:
        assert time.monotonic() < deadline, "no failover within 30 s"
        assert cache.get("k")["key"] == "k"
        cache.set("w", {"key": "w", "n": reads})
        reads += 1
        if promoted_at is None and sentinelled.sentinel.master() == new_master:
            promoted_at = time.monotonic()
        time.sleep(0.01)
    assert cache.get_stats(local=True)["l2_errors"] > 0  # the outage was seen, and absorbed

    cache.set("after", {"key": "after", "n": -1})
    promoted = sentinelled.replica.client()
    assert _role(promoted)["role"] == "master"
    assert promoted.exists(cache.stack.l2.keys.value("after")) == 1
    cache.stack.l1.clear()
    assert cache.get("after") == {"key": "after", "n": -1}
    runtime = current_runtime()
    assert runtime.bus is not None
    _wait(lambda: runtime.bus.healthy, "the bus to resubscribe on the new master")


# -- the worker's broker ------------------------------------------------------------------------


def test_celery_broker_turns_a_sentinel_url_into_kombus_form() -> None:
    assert celery_broker("redis://h:1/2") == ("redis://h:1/2", {})
    url, options = celery_broker("redis+sentinel://u:p%40ss@a:1,[::1]:3/svc/4?sentinel_password=sp")
    assert url == "sentinel://u:p%40ss@a:1/4;sentinel://u:p%40ss@[::1]:3/4"
    assert options == {"master_name": "svc", "sentinel_kwargs": {"password": "sp"}}
    assert celery_broker("redis+sentinel://h/m") == ("sentinel://h:26379/0", {"master_name": "m"})


def test_the_translated_broker_reaches_the_master_through_kombu(sentinelled: Sentinelled) -> None:
    from kombu.connection import Connection

    url, options = celery_broker(sentinelled.url)
    name = f"oqron-sentinel-{time.monotonic_ns()}"
    with Connection(url, transport_options=options, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
        queue = conn.SimpleQueue(name)
        queue.put({"hello": "master"}, serializer="json")
        assert sentinelled.master.client().llen(name) == 1  # kombu's list, on the master
        message = queue.get(timeout=5)
        message.ack()
        assert message.payload == {"hello": "master"}
        queue.close()


@pytest.mark.parametrize("variable", ["OQRON_REDIS_URL", "OQRON_BROKER_URL"])
def test_the_standalone_worker_app_takes_a_sentinel_url_as_its_broker(variable: str) -> None:
    """From the cache's URL (no broker given), or given as the broker itself."""
    env = {
        **os.environ,
        "OQRON_REDIS_URL": "redis://127.0.0.1:9/0",
        variable: "redis+sentinel://127.0.0.1:1,127.0.0.1:2/svc/3",
        "OQRON_VISIBILITY_TIMEOUT": "7",
        "PYTHONPATH": str(ROOT),
    }
    if variable != "OQRON_BROKER_URL":
        env.pop("OQRON_BROKER_URL", None)
    script = (
        "import json, workers; c = workers.app.conf; "
        "print(json.dumps([c.broker_url, c.broker_transport_options]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    broker, options = json.loads(out.stdout.strip().splitlines()[-1])
    assert broker == "sentinel://127.0.0.1:1/3;sentinel://127.0.0.1:2/3"
    assert options == {"master_name": "svc", "visibility_timeout": 7.0}


def test_a_standalone_worker_on_a_sentinel_url_refreshes_through_its_default_broker(
    sentinelled: Sentinelled, tmp_path: Path
) -> None:
    """``celery -A workers worker`` given only ``OQRON_REDIS_URL=redis+sentinel://...``: its
    broker is the same master, through kombu's sentinel transport; a stale read in this
    process is refreshed there, once."""

    from tests.procs import refresh_caches as rc
    from tests.test_workers import OLD, Control, seed_stale

    namespace = f"t-sentw-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(tmp_path, None, sentinelled.url, namespace, modules=rc.__name__)
    try:
        worker.wait_ready()
        broker, options = celery_broker(sentinelled.url)
        app = web_app("sentinel-web", broker, options)
        oqron_cache.configure(redis_url=sentinelled.url, celery_app=app, namespace=namespace)
        master = sentinelled.master.client()
        seed_stale(master, namespace, rc.SWR, "k")

        assert rc.swr_cache.get("k") == OLD  # stale, served at once; the worker refreshes it
        worker.wait_for(re.escape(f"refresh {rc.SWR} k: refreshed"))
        # The fill on the bus (subscribed through the sentinel's master) evicts this process's
        # stale copy: the next reads find the new value in L2.
        _wait(lambda: rc.swr_cache.get("k") == {"gen": "new", "n": 1}, "the new value", 5.0)
        assert Control(master, namespace, rc.SWR, "k").calls == 1
        assert master.llen("oqron_cache.refresh") == 0  # the broker's queue, on the master
    finally:
        worker.kill()


def _calls(client: redis.Redis, command: str) -> int:
    stats = as_dict(client.info("commandstats"))
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_the_demo_on_a_sentinel_url_queues_its_refresh_on_the_master(
    sentinelled: Sentinelled,
) -> None:
    """The demo's worker and processes reach the broker through the sentinel: its queue is on
    the master (kombu given the raw redis+sentinel:// URL would quietly use localhost:6379)."""
    from tests.test_demo_cli import ints, run_cli, table

    master = sentinelled.master.client()
    before = _calls(master, "lpush"), _calls(master, "brpop")
    result = run_cli("demo", "--quick", "--redis-url", sentinelled.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "notice:" not in result.stdout, result.stdout
    rows = table(result.stdout)
    assert ints(rows["in the Celery worker"]) == [0, 0, 1], result.stdout
    assert _calls(master, "lpush") > before[0]  # the refresh task was queued there
    assert _calls(master, "brpop") > before[1]  # and the worker took it from there


@pytest.mark.parametrize("broker", ["redis+sentinel://h/m", "redis+cluster://h:1"])
def test_a_celery_app_given_this_librarys_url_form_as_its_broker_is_refused(broker: str) -> None:
    from celery import Celery

    app = Celery("sentinel-misconfigured", broker=broker)
    app.conf.update(accept_content=["json"], task_serializer="json")
    with pytest.raises(ConfigurationError, match="celery_broker"):
        oqron_cache.configure(celery_app=app, namespace="sentinel-broker")
    assert oqron_cache.config.current_runtime(create=False) is None
