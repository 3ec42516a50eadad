"""Redis Cluster (DESIGN section 7): the same library code on a real three-primary cluster.

The module starts its own cluster (three private ``redis-server`` processes joined with
``redis-cli --cluster create``); the shared Redis is not touched. Keys are spread over the three
primaries by their hash tag, and the tests check that they really are.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from redis.cluster import RedisCluster

import oqron_cache
from oqron_cache import testing
from oqron_cache.config import mask_url, reset, validate_redis_url
from oqron_cache.core.entry import unpack
from oqron_cache.core.errors import ConfigurationError
from oqron_cache.core.keys import glob_literal
from oqron_cache.redis.clients import celery_broker, connect, parse_cluster_url
from oqron_cache.redis.replies import as_dict
from tests.procs import ROOT
from tests.redis_server import RedisServer, free_port
from tests.worker_process import WorkerProcess, web_app

NODES = 3


def _cluster_args(i: int) -> list[str]:
    # The bus port defaults to port + 10000, which may be above 65535 for a free port: pick one.
    return [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        f"nodes-{i}.conf",
        "--cluster-node-timeout",
        "2000",
        "--cluster-port",
        str(free_port()),
    ]


def _settled(client: Any) -> bool:
    """The node sees the cluster ``ok``, and, a replica, is in sync with its primary."""
    if cast("dict[str, Any]", client.cluster("INFO"))["cluster_state"] != "ok":
        return False
    replication = cast("dict[str, Any]", client.info("replication"))
    return replication["role"] == "master" or replication.get("master_link_status") == "up"


def _wait_replicated(primary: RedisServer, timeout: float = 10.0) -> None:
    """Until the primary's replica has acknowledged everything the primary has written."""
    client = primary.client()
    deadline = time.monotonic() + timeout
    while True:
        info = as_dict(client.info("replication"))
        replica = info.get("slave0")
        if isinstance(replica, dict) and int(replica["offset"]) >= int(info["master_repl_offset"]):
            return
        assert time.monotonic() < deadline, f"the replica lags: {info}"
        time.sleep(0.02)


def start_cluster(password: str | None = None, replicas: int = 0) -> list[RedisServer]:
    """Three private primaries holding every slot (and ``replicas`` replicas of each, in sync
    and free to take over at once), once the cluster says ``ok``."""
    auth = ["--requirepass", password, "--masterauth", password] if password else []
    # A replica that has not finished its first sync refuses to fail over (its data is "too
    # old"): sync at once, and let any replica take over whatever the age of its data.
    sync = ["--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"]
    extra = auth + (sync if replicas else [])
    servers = [
        RedisServer(extra_args=_cluster_args(i) + extra, password=password)
        for i in range(NODES * (1 + replicas))
    ]
    try:
        subprocess.run(
            ["redis-cli", *(["-a", password, "--no-auth-warning"] if password else [])]
            + ["--cluster", "create"]
            + [f"127.0.0.1:{s.port}" for s in servers]
            + ["--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        deadline = time.monotonic() + 20
        for server in servers:
            client = server.client()
            while not _settled(client):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster not ok on {server.url}")
                time.sleep(0.05)
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def cluster_url(servers: list[RedisServer], seeds: int = NODES) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers[:seeds])


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    servers = start_cluster()
    try:
        yield servers
    finally:
        for server in servers:
            server.close()


@pytest.fixture(scope="module")
def url(cluster: list[RedisServer]) -> str:
    return cluster_url(cluster, seeds=1)  # one seed is enough: it tells the layout


@pytest.fixture
def raw(cluster: list[RedisServer]) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def ns(url: str) -> Iterator[str]:
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    oqron_cache.configure(redis_url=url, namespace=namespace)
    try:
        yield namespace
    finally:
        reset()


@pytest.fixture
def make_cache(ns: str) -> Iterator[Callable[..., Any]]:
    made: list[Any] = []

    def factory(**kwargs: Any) -> Any:
        kwargs.setdefault("name", f"c-{uuid.uuid4().hex[:8]}")
        made.append(oqron_cache.cache(**kwargs))
        return made[-1]

    try:
        yield factory
    finally:
        for created in made:
            created.close()


def node_of(raw: RedisCluster, key: str) -> str:
    return cast(str, raw.get_node_from_key(key).name)


def on_nodes(raw: RedisCluster, cache: Any, keys: list[str]) -> dict[str, int]:
    """How many of ``keys`` each node really holds (entries, not tombstones), asking each."""
    space = cache.stack.l2.keys
    wanted = {space.value(k).encode() for k in keys}
    held: dict[str, int] = {}
    for node in raw.get_primaries():
        client = raw.get_redis_connection(node)  # this node only: no redirection
        found = set(client.scan_iter(match=glob_literal(space.prefix) + "*", count=1000))
        here = sum(
            1 for key in wanted & found if not unpack(cast(bytes, client.get(key)))[0].tombstone
        )
        if here:
            held[node.name] = here
    return held


def spread_keys(raw: RedisCluster, cache: Any, prefix: str, n: int) -> list[str]:
    """``n`` keys ``<prefix><i>`` whose entries fall on every node."""
    keys = [f"{prefix}{i}" for i in range(n)]
    nodes = {node_of(raw, cache.stack.l2.keys.value(k)) for k in keys}
    assert len(nodes) == NODES, nodes
    return keys


# -- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "nodes", "tls", "user", "password"),
    [
        ("redis+cluster://h:7000", (("h", 7000),), False, None, None),
        ("redis+cluster://h", (("h", 6379),), False, None, None),
        ("redis+cluster://a:1,b:2,[::1]:3/0", (("a", 1), ("b", 2), ("::1", 3)), False, None, None),
        ("rediss+cluster://u:p%40ss@a:1,b:2/", (("a", 1), ("b", 2)), True, "u", "p@ss"),
        ("redis+cluster://:s3cret@a:1", (("a", 1),), False, None, "s3cret"),
    ],
)
def test_cluster_urls_are_parsed(
    url: str, nodes: tuple[Any, ...], tls: bool, user: str | None, password: str | None
) -> None:
    target = parse_cluster_url(url)
    assert (target.nodes, target.tls, target.username, target.password) == (
        nodes,
        tls,
        user,
        password,
    )
    assert validate_redis_url(url) == url
    assert "s3cret" not in repr(target)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis+cluster://", "no cluster node"),
        ("redis+cluster://:s3cret@", "no cluster node"),
        ("redis+cluster://:s3cret@h:99999", "not a port number"),
        ("redis+cluster://:s3cret@h:x", "not a port number"),
        ("redis+cluster://:s3cret@:1", "has no host"),
        ("redis+cluster://:s3cret@h:1/1", "only db 0"),
        ("redis+cluster://:s3cret@h:1/0/x", "only db 0"),
        ("redis+cluster://:s3cret@h:1?password=x", "query parameters are not supported"),
    ],
)
def test_malformed_cluster_urls_are_refused_naming_redis_url(url: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match="redis_url") as info:
        oqron_cache.configure(redis_url=url, namespace="cluster-bad")
    assert complaint in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "redis+cluster://" in str(info.value)  # the expected form


def test_cluster_url_password_is_masked() -> None:
    assert mask_url("redis+cluster://u:s3cret@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"


def test_a_cluster_cannot_be_the_celery_broker() -> None:
    with pytest.raises(ConfigurationError, match="OQRON_BROKER_URL") as info:
        celery_broker("redis+cluster://:s3cret@a:1")
    assert "s3cret" not in str(info.value)


def test_standalone_worker_needs_a_broker_url_with_a_cluster() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    env["OQRON_REDIS_URL"] = "redis+cluster://:s3cret@127.0.0.1:1"
    result = subprocess.run(
        [sys.executable, "-c", "import workers"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "OQRON_BROKER_URL" in result.stderr
    assert "s3cret" not in result.stderr


def test_an_unreachable_cluster_degrades_instead_of_failing_configure() -> None:
    oqron_cache.configure(redis_url=f"redis+cluster://127.0.0.1:{free_port()}", namespace="t-x")
    try:
        cache = oqron_cache.cache(f"c-{uuid.uuid4().hex[:8]}", ttl="1m", resolver=str.upper)
        assert cache.get("abc") == "ABC"  # the resolver, then L1
        cache.set("k", 1)
        cache.delete("k")
        assert cache.invalidate_pattern("*", allow_all=True) == 0
        assert cache.get_stats(local=True)["l2_errors"] >= 1
        cache.close()
    finally:
        reset()


# -- a real cluster -----------------------------------------------------------------------


def test_connect_makes_a_cluster_client_with_explicit_timeouts(url: str) -> None:
    made: Any = connect(url, socket_timeout=0.3, connect_timeout=0.2, client_name="oqron-t")
    client = cast(RedisCluster, made)
    try:
        assert isinstance(made, RedisCluster)
        assert client.ping()
        retry: Any = client.retry  # get_retries() is redis-py 5.1's; 5.0 keeps _retries
        assert (retry.get_retries() if hasattr(retry, "get_retries") else retry._retries) == 1
        node = client.get_primaries()[0]
        kwargs = client.get_redis_connection(node).connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.3, 0.2)
        assert kwargs["client_name"] == "oqron-t"
    finally:
        client.close()


def test_get_set_delete_get_or_set_on_every_node(
    make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    cache = make_cache(ttl="1m")
    keys = spread_keys(raw, cache, "k", 30)
    for i, key in enumerate(keys):
        cache.set(key, {"i": i})
    assert sum(on_nodes(raw, cache, keys).values()) == 30
    assert len(on_nodes(raw, cache, keys)) == NODES
    cache.stack.flush_l1()
    assert [cache.get(k) for k in keys] == [{"i": i} for i in range(30)]  # from L2
    for key in keys[:15]:
        cache.delete(key)
    assert [cache.get(k) for k in keys[:15]] == [None] * 15
    calls: list[str] = []

    def factory(key: str) -> Callable[[], Any]:
        def make() -> str:
            calls.append(key)
            return key.upper()

        return make

    assert [cache.get_or_set(k, factory(k)) for k in keys[:15]] == [k.upper() for k in keys[:15]]
    assert [cache.get_or_set(k, factory(k)) for k in keys[:15]] == [k.upper() for k in keys[:15]]
    assert calls == keys[:15]  # each factory ran once
    stats = cache.get_stats(local=True)
    assert stats["l2_errors"] == 0


@pytest.mark.asyncio
async def test_the_async_front_on_every_node(
    make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    cache = make_cache(ttl="1m")
    keys = spread_keys(raw, cache, "a", 30)
    await cache.aset_many({key: {"i": i} for i, key in enumerate(keys)})
    assert len(on_nodes(raw, cache, keys)) == NODES
    cache.stack.flush_l1()
    assert [await cache.aget(k) for k in keys[:10]] == [{"i": i} for i in range(10)]
    cache.stack.flush_l1()
    assert await cache.aget_many(keys) == {k: {"i": i} for i, k in enumerate(keys)}
    await cache.adelete_many(keys[:15])
    await cache.adelete(keys[15])
    assert await cache.aget_many(keys[:16]) == {}
    assert await cache.aget_or_set(keys[0], lambda: "made") == "made"
    assert cache.get_stats(local=True)["l2_errors"] == 0


def test_stale_while_revalidate_refreshes_in_the_dispatcher(make_cache: Callable[..., Any]) -> None:
    clock = testing.FakeClock()
    runs: list[str] = []

    def resolver(key: str) -> str:
        runs.append(key)
        return f"{key}-{len(runs)}"

    cache = make_cache(ttl="10s", stale_ttl="1m", resolver=resolver, clock=clock)
    assert cache.get("a") == "a-1"
    clock.tick(11)  # stale now
    assert cache.get("a") == "a-1"  # served stale, refresh requested
    assert testing.wait_for_refreshes(5)
    assert cache.get("a") == "a-2"
    cache.stack.flush_l1()
    assert cache.get("a") == "a-2"  # the refresh wrote L2
    stats = cache.get_stats(local=True)
    assert stats["stale_served"] >= 1
    assert stats["l2_errors"] == 0


def test_invalidate_pattern_deletes_on_every_node(
    make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    cache = make_cache(ttl="1m")
    users = spread_keys(raw, cache, "user:", 40)
    others = spread_keys(raw, cache, "order:", 20)
    for key in users + others:
        cache.set(key, key)
    cache.delete(users[0])  # a tombstone is not an entry
    assert cache.invalidate_pattern("user:*") == 39
    assert on_nodes(raw, cache, users) == {}
    assert sum(on_nodes(raw, cache, others).values()) == 20
    assert [cache.get(k) for k in users] == [None] * 40
    assert [cache.get(k) for k in others] == others
    assert cache.invalidate_pattern("user:*") == 0
    assert cache.get_stats(local=True)["l2_errors"] == 0


def test_invalidate_by_tag_on_every_node(make_cache: Callable[..., Any], raw: RedisCluster) -> None:
    cache = make_cache(ttl="1m", tags=lambda key, value: value["tags"])
    keys = spread_keys(raw, cache, "p", 60)
    for i, key in enumerate(keys):
        cache.set(key, {"tags": ["even" if i % 2 == 0 else "odd"]})
    cache.set(keys[2], {"tags": []})  # rewritten without the tag: spared
    assert cache.invalidate_by_tag("even") == 29
    assert sum(on_nodes(raw, cache, keys).values()) == 31
    assert cache.get(keys[2]) == {"tags": []}
    assert cache.get(keys[0]) is None and cache.get(keys[1]) == {"tags": ["odd"]}
    assert raw.exists(cache.stack.l2.keys.tag_set("even")) == 0
    assert cache.invalidate_by_tag("odd") == 30
    assert cache.get_stats(local=True)["l2_errors"] == 0


def test_write_through_inline_on_every_node(
    make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    saved: list[tuple[str, Any]] = []
    cache = make_cache(ttl="1m", write_through=lambda key, value: saved.append((key, value)))
    keys = spread_keys(raw, cache, "w", 12)
    for i, key in enumerate(keys):
        handle = cache.set(key, {"n": i})
        assert handle is not None and handle.status() == "ok"
    assert saved == [(key, {"n": i}) for i, key in enumerate(keys)]
    cache.stack.flush_l1()
    assert [cache.get(k) for k in keys] == [{"n": i} for i in range(12)]
    assert cache.get_stats(local=True)["l2_errors"] == 0


class ClusterChild:
    """``tests.procs.cluster_child``: another process with the same cache."""

    def __init__(self, url: str, ns: str, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.cluster_child", url, ns, name],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == {"ready": True}

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the child exited"
        return json.loads(line)

    def ask(self, *words: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        """Ask the child to exit (its counters are flushed at exit); kill it if it does not."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def test_a_delete_evicts_the_l1_copy_of_another_process(
    url: str, ns: str, make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    cache = make_cache(ttl="10m")
    keys = spread_keys(raw, cache, "x", 12)
    for key in keys:
        cache.set(key, key)
    child = ClusterChild(url, ns, cache.name)
    try:
        assert child.ask("get", *keys) == keys
        assert child.ask("held", *keys) == [True] * 12
        for key in keys[:6]:
            cache.delete(key)  # on all three nodes
        cache.invalidate_pattern("x1*")  # x1, x10, x11
        gone = [*keys[:6], "x10", "x11"]
        deadline = time.monotonic() + 5
        while child.ask("held", *gone) != [False] * len(gone):
            assert time.monotonic() < deadline, "the other process kept its L1 copies"
            time.sleep(0.02)
        assert child.ask("held", *keys[6:10]) == [True] * 4  # untouched keys stay
        assert child.ask("get", *gone) == [None] * len(gone)
    finally:
        child.close()


def test_get_stats_adds_up_every_process(url: str, ns: str, make_cache: Callable[..., Any]) -> None:
    cache = make_cache(ttl="1m")
    cache.set("a", 1)
    child = ClusterChild(url, ns, cache.name)
    try:
        assert child.ask("get", "a", "b", "a") == [1, None, 1]
    finally:
        child.close()
    cache.get("a")
    deadline = time.monotonic() + 5
    stats = cache.get_stats()
    while stats["gets"] < 4 and time.monotonic() < deadline:  # the child flushes each second
        time.sleep(0.1)
        stats = cache.get_stats()
    assert stats["gets"] == 4  # 3 in the child, 1 here
    assert stats["sets"] == 1


def run_admin(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    return subprocess.run(
        [sys.executable, "-m", "oqron_cache", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_admin_cli_stats_and_invalidate(
    url: str, ns: str, make_cache: Callable[..., Any], raw: RedisCluster
) -> None:
    cache = make_cache(ttl="1m", tags=lambda key, value: value["tags"])
    keys = spread_keys(raw, cache, "u", 30)
    for key in keys:
        cache.set(key, {"tags": ["t"] if key.startswith("u1") else []})
    cache.get(keys[0])
    cache.get_stats()  # flushed to the cluster
    common = ["--redis-url", url, "--namespace", ns]
    result = run_admin("stats", cache.name, "--json", *common)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["cache"], doc["stats"]["sets"], doc["stats"]["gets"]) == (cache.name, 30, 1)
    result = run_admin("stats", "--json", *common)  # every cache: a scan of every node
    assert result.returncode == 0, result.stderr
    assert cache.name in result.stdout
    result = run_admin("invalidate", cache.name, "--tag", "t", *common)
    assert result.returncode == 0, result.stderr
    assert "11 entries" in result.stdout  # u1, u10..u19
    result = run_admin("invalidate", cache.name, "--pattern", "u2*", *common)
    assert result.returncode == 0, result.stderr
    assert "11 entries" in result.stdout  # u2, u20..u29
    result = run_admin("invalidate", cache.name, "--key", "u3", "--key", "u4", *common)
    assert result.returncode == 0, result.stderr
    assert "deleted 2 of 2 keys" in result.stdout
    assert sum(on_nodes(raw, cache, keys).values()) == 30 - 11 - 11 - 2
    result = run_admin("inspect", cache.name, "u5", "--json", *common)
    assert result.returncode == 0, result.stderr


def test_admin_cli_reports_an_unreachable_cluster() -> None:
    result = run_admin(
        "stats", "--redis-url", f"redis+cluster://:s3cret@127.0.0.1:{free_port()}", "--json"
    )
    assert result.returncode == 3, result.stderr
    assert "s3cret" not in result.stderr


def test_a_password_protected_cluster_and_wrong_credentials() -> None:
    servers = start_cluster(password="s3cret")  # noqa: S106 - a throw-away test cluster
    try:
        good = cluster_url(servers, seeds=1).replace("://", "://:s3cret@")
        oqron_cache.configure(redis_url=good, namespace=f"t-{uuid.uuid4().hex[:8]}")
        cache = oqron_cache.cache(f"c-{uuid.uuid4().hex[:8]}", ttl="1m")
        cache.set("a", 1)
        cache.stack.flush_l1()
        assert cache.get("a") == 1
        assert cache.get_stats(local=True)["l2_errors"] == 0
        cache.close()
        reset()
        bad = good.replace("s3cret", "wrong-pw")
        with pytest.raises(ConfigurationError, match="refused the credentials") as info:
            oqron_cache.configure(redis_url=bad, namespace="t-x")
        assert "wrong-pw" not in str(info.value)
        result = run_admin("stats", "--redis-url", bad, "--json")
        assert result.returncode == 3, result.stderr
        assert "refused access" in result.stderr
        assert "wrong-pw" not in result.stderr
    finally:
        reset()
        for server in servers:
            server.close()


def test_a_killed_node_does_not_raise_to_callers() -> None:
    servers = start_cluster()
    try:
        namespace = f"t-{uuid.uuid4().hex[:8]}"
        oqron_cache.configure(redis_url=cluster_url(servers), namespace=namespace)
        runs: list[str] = []

        def resolver(key: str) -> str:
            runs.append(key)
            return key.upper()

        cache = oqron_cache.cache(f"c-{uuid.uuid4().hex[:8]}", ttl="1m", resolver=resolver)
        raw = RedisCluster(host="127.0.0.1", port=servers[0].port, socket_timeout=5)
        keys = spread_keys(raw, cache, "k", 30)
        victim = node_of(raw, cache.stack.l2.keys.value(keys[0]))  # type: ignore[union-attr]
        raw.close()
        assert [cache.get(k) for k in keys] == [k.upper() for k in keys]
        assert len(runs) == 30
        next(s for s in servers if victim.endswith(f":{s.port}")).kill()
        started = time.monotonic()
        assert [cache.get(k) for k in keys] == [k.upper() for k in keys]  # L1
        cache.stack.flush_l1()  # as if L1 had expired: L2, or the resolver where L2 is gone
        assert [cache.get(k) for k in keys] == [k.upper() for k in keys]
        cache.set(keys[0], "new")
        cache.delete(keys[1])
        cache.invalidate_pattern("k2*")
        assert time.monotonic() - started < 30
        assert cache.get_stats(local=True)["l2_errors"] >= 1
        cache.close()
    finally:
        reset()
        for server in servers:
            server.close()


def test_a_standalone_worker_refreshes_on_the_cluster(
    url: str, raw: RedisCluster, tmp_path: Path
) -> None:
    """``celery -A workers worker`` with ``OQRON_REDIS_URL`` a cluster URL and a plain Redis
    broker: a stale read here is refreshed in the worker, once, its fill written on the entry's
    node and announced on the cluster's bus."""

    from tests.procs import refresh_caches as rc
    from tests.test_workers import OLD, Control, seed_stale

    namespace = f"t-clw-{uuid.uuid4().hex[:6]}"
    with RedisServer() as broker:
        worker = WorkerProcess(tmp_path, broker.url, url, namespace, modules=rc.__name__)
        try:
            worker.wait_ready()
            app = web_app("cluster-web", broker.url)
            oqron_cache.configure(redis_url=url, celery_app=app, namespace=namespace)
            keys = [f"k{i}" for i in range(6)]
            for key in keys:
                seed_stale(cast("Any", raw), namespace, rc.SWR, key)
            l2 = rc.swr_cache.stack.l2
            assert l2 is not None
            assert len({node_of(raw, l2.keys.value(k)) for k in keys}) > 1  # several nodes

            assert [rc.swr_cache.get(k) for k in keys] == [OLD] * len(keys)  # stale, at once
            for key in keys:
                worker.wait_for(re.escape(f"refresh {rc.SWR} {key}: refreshed"))
            # The fills on the bus evict this process's stale copies.
            for key in keys:
                deadline = time.monotonic() + 5
                while rc.swr_cache.get(key) != {"gen": "new", "n": 1}:
                    assert time.monotonic() < deadline, f"{key}: {rc.swr_cache.get(key)!r}"
                    time.sleep(0.01)
                assert Control(cast("Any", raw), namespace, rc.SWR, key).calls == 1
        finally:  # the cluster is this module's own: its keys go with it
            worker.kill()
            reset()


def test_the_demo_on_a_cluster_url_says_why_it_runs_without_a_worker(url: str) -> None:
    from tests.test_demo_cli import ints, run_cli, table

    result = run_cli("demo", "--quick", "--redis-url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "a Redis Cluster cannot be the Celery broker" in result.stdout
    rows = table(result.stdout)
    assert ints(rows["resolver calls"]) == [1, 1, 1], result.stdout
    assert ints(rows["errors"]) == [0, 0, 0]
    assert "removed the demo's" in result.stdout


def test_the_bus_follows_a_failover_and_carries_evictions_again(tmp_path: Path) -> None:
    """The primary serving the bus's channel dies; its replica takes over. This process's bus
    resubscribes (L1 is off meanwhile, P7), and then hears another process's delete."""
    servers = start_cluster(replicas=1)
    try:
        url = cluster_url(servers, seeds=NODES * 2)
        namespace = f"t-{uuid.uuid4().hex[:8]}"
        oqron_cache.configure(redis_url=url, namespace=namespace)
        runtime = oqron_cache.config.current_runtime()
        bus = runtime.bus
        assert bus is not None and bus.healthy
        cache = oqron_cache.cache(f"c-{uuid.uuid4().hex[:8]}", ttl="10m")
        with RedisCluster(host="127.0.0.1", port=servers[0].port, socket_timeout=5) as raw:
            port = raw.get_node_from_key(bus.channel).port
        victim = next(server for server in servers if server.port == port)
        written = [f"p{i}" for i in range(30)]  # on every primary, the victim's included
        for key in written:
            cache.set(key, key)
        _wait_replicated(victim)  # replication is asynchronous: all there before the kill
        victim.kill()
        deadline = time.monotonic() + 30
        while bus.healthy:  # noticed at once (the connection resets)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while not bus.healthy:  # the replica is promoted: back on it
            assert time.monotonic() < deadline, "the bus never came back after the failover"
            time.sleep(0.05)
        assert bus.reconnects >= 1

        # First thing after the failover: a pattern invalidation. It scans each primary with
        # that node's own client, which no redirect refreshes: the first one may find the dead
        # node (an L2 error); then the invalidation is deferred and replayed (P14), and that
        # replay, or a second call, must scan the promoted replica.
        removed = cache.invalidate_pattern("p*")
        if removed < len(written):
            while cache.get_stats(local=True)["writes_pending"]:
                assert time.monotonic() < deadline, "the deferred invalidation never ran"
                time.sleep(0.05)
            removed += cache.invalidate_pattern("p*")
        l2 = cache.stack.l2
        assert l2 is not None
        assert [key for key in written if l2.read(key) is not None] == []

        cache.set("k", "v")
        assert cache.get("k") == "v"
        l1 = cache.stack.l1
        assert l1 is not None and l1.get("k") is not None
        child = ClusterChild(url, namespace, cache.name)
        try:
            assert child.ask("delete", "k") is None
            while l1.get("k") is not None:  # the delete's bus message evicts our copy
                assert time.monotonic() < deadline, "the eviction never arrived"
                time.sleep(0.01)
        finally:
            child.close()
        cache.close()
    finally:
        reset()
        for server in servers:
            server.close()
