"""Real ``celery -A workers worker`` processes refreshing what real web processes read (issue 3).

Every test starts its workers as subprocesses (``python -m celery -A workers worker``, prefork,
2 children) in their own process group, on a broker of its own: a private ``redis-server``
(:class:`tests.redis_server.RedisServer`) or a private virtual host on the RabbitMQ at
127.0.0.1:5672 (made with ``rabbitmqctl`` and deleted afterwards). The cache's Redis is the shared
one, in the test's namespace. Web processes are ``python -m tests.procs.web`` (a Celery app on the
same broker, ``configure(celery_app=...)``); the caches both sides serve are declared in
:mod:`tests.procs.refresh_caches`, whose resolvers count their calls in Redis and can be told to
sleep, block or raise.

Stale entries are seeded by writing the library's envelope straight to L2 with ``fresh_until`` one
second in the past, so no test waits for a ttl to pass.

The timings a test measured are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
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
import redis

from oqron_cache.celery.tasks import refresh_task_prefix
from oqron_cache.core.codecs import get_codec
from oqron_cache.core.entry import Entry, new_version, pack, unpack
from oqron_cache.core.keys import KeySpace
from oqron_cache.core.metrics import view
from tests.procs import ROOT, Child
from tests.procs import refresh_caches as rc
from tests.redis_server import RedisServer
from tests.worker_process import WORKER_READY, WorkerProcess

KOMBU = tuple(int(part) for part in importlib.metadata.version("kombu").split(".")[:2])

OLD = {"gen": "old"}
RABBIT = "amqp://guest:guest@127.0.0.1:5672"
# A stale read must not wait for the broker, a lock or a resolver (all >= 500 ms here); reads
# are L1 hits of well under 1 ms, so this only leaves room for a loaded 2-core machine.
READ_MAX_MS = 200


# -- processes ----------------------------------------------------------------------------------


class Worker(WorkerProcess):
    """A worker serving :mod:`tests.procs.refresh_caches` (see :class:`WorkerProcess`)."""

    def __init__(self, log_dir: Path, broker: str, redis_url: str, namespace: str) -> None:
        super().__init__(
            log_dir, broker, redis_url, namespace, modules="tests.procs.refresh_caches"
        )


class Web(Child):
    """``python -m tests.procs.web``, spoken to with :class:`tests.procs.Child`'s protocol."""

    def __init__(self, log_dir: Path, broker: str, redis_url: str, namespace: str) -> None:
        self.log_path = log_dir / f"web-{uuid.uuid4().hex[:6]}.log"
        self._log = self.log_path.open("wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.procs.web",
                "--url",
                redis_url,
                "--broker",
                broker,
                "--ns",
                namespace,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )
        self.pid = self.proc.pid

    def ask(self, reply: str, timeout: float = 20.0, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.expect(reply, timeout)


class Cluster:
    """The processes of one test: workers and web processes on one broker and namespace."""

    def __init__(self, tmp_path: Path, broker: str, redis_url: str, namespace: str) -> None:
        self.dir = tmp_path
        self.broker = broker
        self.redis_url = redis_url
        self.namespace = namespace
        self.workers: list[Worker] = []
        self.webs: list[Web] = []

    def start(self, workers: int = 1, webs: int = 1) -> None:
        """Start them all at once, then wait until every one is ready."""
        new_workers = [self.worker(wait=False) for _ in range(workers)]
        new_webs = [Web(self.dir, self.broker, self.redis_url, self.namespace) for _ in range(webs)]
        self.webs += new_webs
        for worker in new_workers:
            worker.wait_ready()
        for web in new_webs:
            ready = web.expect("ready", timeout=WORKER_READY)
            assert ready["bus_healthy"], ready

    def worker(self, wait: bool = True) -> Worker:
        worker = Worker(self.dir, self.broker, self.redis_url, self.namespace)
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        for web in self.webs:
            with contextlib.suppress(Exception):
                web.close()


# -- fixtures -----------------------------------------------------------------------------------


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def _rabbit_vhost() -> Iterator[str]:
    vhost = f"oqron-wt-{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{RABBIT}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest) -> Iterator[str]:
    """A broker of the test's own: a private redis-server, or a RabbitMQ virtual host."""
    if request.param == "redis":
        with RedisServer() as server:
            yield server.url
    else:
        with _rabbit_vhost() as url:
            yield url


@pytest.fixture
def redis_broker() -> Iterator[RedisServer]:
    """A private redis-server as the broker (tests that stop it)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def make_cluster(
    tmp_path: Path, redis_url: str, namespace: str
) -> Iterator[Callable[[str], Cluster]]:
    clusters: list[Cluster] = []

    def make(broker_url: str) -> Cluster:
        cluster = Cluster(tmp_path, broker_url, redis_url, namespace)
        clusters.append(cluster)
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.close()


# -- helpers ------------------------------------------------------------------------------------


def _key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _space(namespace: str, cache: str) -> KeySpace:
    return KeySpace(namespace, cache, rc.CACHES[cache].options.max_key_bytes)


def seed_stale(
    client: redis.Redis, namespace: str, cache: str, key: str, value: Any = OLD
) -> bytes:
    """Write ``value`` to L2 as an entry that went stale 1 s ago (stale for ``STALE_TTL`` more).

    Returns its version.
    """
    now = time.time()
    fresh_until = now - 1.0
    stale_until = fresh_until + rc.STALE_TTL
    entry = Entry(value, fresh_until - rc.TTL, fresh_until, stale_until, new_version())
    codec = get_codec("json")
    envelope = pack(entry, codec.codec_id, codec.encode(value, cache))
    rkey = _space(namespace, cache).value(key)
    client.set(rkey, envelope, px=int((stale_until - now) * 1000))
    return entry.version


def l2_entry(client: redis.Redis, namespace: str, cache: str, key: str) -> Entry | None:
    """The entry of ``key`` in L2 (value decoded), or None if absent or a tombstone."""
    raw = cast("bytes | None", client.get(_space(namespace, cache).value(key)))
    if raw is None:
        return None
    entry, _, payload = unpack(raw)
    if entry.tombstone:
        return None
    entry.value = get_codec("json").decode(payload)
    return entry


def l2_value(client: redis.Redis, namespace: str, cache: str, key: str) -> Any:
    """The decoded value of ``key`` in L2; the entry must exist (and not be a tombstone)."""
    entry = l2_entry(client, namespace, cache, key)
    assert entry is not None, f"no L2 entry for {key!r}"
    return entry.value


class Control:
    """The test side of :mod:`tests.procs.refresh_caches`' counters and flags for one key."""

    def __init__(self, client: redis.Redis, namespace: str, cache: str, key: str) -> None:
        self.client = client
        self.namespace = namespace
        self.cache = cache
        self.key = key

    def _k(self, part: str) -> str:
        return rc.control_key(self.namespace, self.cache, self.key, part)

    def flag(self, value: str | None) -> None:
        if value is None:
            self.client.delete(self._k("flag"))
        else:
            self.client.set(self._k("flag"), value)

    @property
    def calls(self) -> int:
        return int(cast("bytes | None", self.client.get(self._k("calls"))) or 0)

    def runs(self) -> list[dict[str, Any]]:
        return [
            json.loads(r) for r in cast("list[bytes]", self.client.lrange(self._k("runs"), 0, -1))
        ]

    def where(self) -> dict[str, Any] | None:
        raw = cast("bytes | None", self.client.get(self._k("where")))
        return json.loads(raw) if raw else None

    def wait_calls(self, n: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.calls < n:
            assert time.monotonic() < deadline, (
                f"resolver calls {self.calls} < {n} after {timeout}s"
            )
            time.sleep(0.005)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _task_received(cache: str, key: str) -> str:
    prefix = re.escape(f"Task oqron_cache.refresh[{refresh_task_prefix(cache, key)}")
    return prefix + r":[0-9a-f]{8}\] received"


def _outcome(cache: str, key: str, outcome: str) -> str:
    """A regex for the worker's log line of a refresh; ``outcome`` is a regex itself."""
    return re.escape(f"refresh {cache} {key}: ") + outcome


def _scheme(broker: str) -> str:
    return broker.partition(":")[0]


def _report(line: str) -> None:
    print(f"\n[test_workers] {line}", flush=True)


# -- 1. the headline ------------------------------------------------------------------------


PROCESSES = 4
THREADS = 64
CALLER_P99 = 0.100
CALLER_MAX = 0.250  # half the resolver's sleep
SWR_SLEEP = 0.5


def test_expired_key_four_processes_one_refresh_in_the_worker(
    broker: str, make_cluster: Callable[[str], Cluster], redis_client: redis.Redis, namespace: str
) -> None:
    key = _key("hot")
    seed_stale(redis_client, namespace, rc.SWR, key)
    ctl = Control(redis_client, namespace, rc.SWR, key)
    ctl.flag(f"sleep:{SWR_SLEEP}")  # the refresh outlasts the burst: every caller reads stale
    cluster = make_cluster(broker)
    cluster.start(workers=1, webs=PROCESSES)
    (worker,) = cluster.workers
    go = rc.control_key(namespace, rc.SWR, key, "go")
    for web in cluster.webs:
        web.send(
            cmd="burst", cache=rc.SWR, key=key, threads=THREADS, go=go, until={"gen": "new"},
            deadline=20,
        )  # fmt: skip
    for web in cluster.webs:
        web.expect("armed")
    redis_client.rpush(go, *["go"] * PROCESSES)
    results = [web.expect("result", timeout=40) for web in cluster.webs]

    # Every caller got the stale value at once, none raised.
    assert [r["errors"] for r in results] == [[]] * PROCESSES
    values = [v for r in results for v in r["values"]]
    assert values == [OLD] * (PROCESSES * THREADS)
    latencies = [lat for r in results for lat in r["latencies"]]
    p99 = _pct(latencies, 0.99)
    # "At once": nobody waited for the refresh (the resolver sleeps SWR_SLEEP) or the broker.
    # The bounds leave room for 256 threads sharing 2 cores with other work (GIL switch
    # interval 5 ms): p99 is typically 10-25 ms on an idle machine, 65 ms seen under load.
    assert p99 < CALLER_P99, f"caller p99 {p99 * 1000:.1f} ms"
    assert max(latencies) < CALLER_MAX, f"caller max {max(latencies) * 1000:.1f} ms"

    # Exactly one refresh ran, in the worker (a prefork child of it), once.
    worker.wait_for(_outcome(rc.SWR, key, "refreshed"))
    assert ctl.calls == 1
    (run,) = ctl.runs()
    assert run["ppid"] == worker.pid
    assert worker.count(_task_received(rc.SWR, key)) == 1
    assert worker.count(_outcome(rc.SWR, key, r"\w+")) == 1
    stats = [r["stats"] for r in results]
    assert sum(s["refreshes_enqueued"] for s in stats) == 1
    assert sum(s["enqueue_failures"] for s in stats) == 0
    assert sum(s["resolver_calls"] for s in stats) == 0  # no web process ran the resolver

    # Afterwards every process sees the new value (its L1 copy was evicted by the fill).
    for r in results:
        assert r["poll_ok"], r
        assert r["poll_value"] == {"gen": "new", "n": 1}
        assert r["poll_errors"] == []
    assert l2_value(redis_client, namespace, rc.SWR, key) == {"gen": "new", "n": 1}

    # Cluster-wide stats (DESIGN section 6): the web processes' counters and the worker's add
    # up in Redis. The resolver ran only in the worker, and is counted there.
    web_gets = sum(r["stats"]["gets"] for r in results)
    stats_key = f"oqron:{namespace}:stats:{rc.SWR}"
    deadline = time.monotonic() + 5  # every process flushes at least once a second
    while True:
        raw = {
            k.decode(): float(v)
            for k, v in cast("dict[bytes, bytes]", redis_client.hgetall(stats_key)).items()
        }
        total = view(raw)
        if total["refreshes_succeeded"] == 1 and total["gets"] >= web_gets:
            break
        assert time.monotonic() < deadline, f"cluster stats never added up: {total}"
        time.sleep(0.05)
    assert total["resolver_calls"] == 1  # counted in the worker process
    assert total["refreshes_enqueued"] == 1
    assert total["stale_served"] >= PROCESSES * THREADS
    assert total["avg_latency_ms"]["resolver"] >= SWR_SLEEP * 1000  # timed in the worker

    t_first = min(r["t_go"] for r in results)
    visible = [r["poll_t"] for r in results]
    fill_to_visible = sorted(t - run["ended"] for t in visible)
    pickup = run["started"] - t_first
    resolver = run["ended"] - run["started"]
    _report(
        f"{_scheme(broker)}: {PROCESSES}x{THREADS} callers p50 "
        f"{_pct(latencies, 0.5) * 1000:.2f} ms p99 {p99 * 1000:.2f} ms max "
        f"{max(latencies) * 1000:.1f} ms; first stale read -> resolver start "
        f"{pickup * 1000:.1f} ms; resolver {resolver * 1000:.0f} ms; resolver end -> visible "
        f"p50 {_pct(fill_to_visible, 0.5) * 1000:.1f} ms max {fill_to_visible[-1] * 1000:.1f} ms; "
        f"first stale read -> visible in all {(max(visible) - t_first) * 1000:.0f} ms"
    )


def test_a_set_racing_a_refresh_in_the_worker_wins(
    broker: str, make_cluster: Callable[[str], Cluster], redis_client: redis.Redis, namespace: str
) -> None:
    """P5 across processes: a ``set()`` that lands while the worker's resolver runs is not
    overwritten by the refresh's older result, in L2 or in any process's L1."""
    key = _key("race")
    seed_stale(redis_client, namespace, rc.SWR, key)
    ctl = Control(redis_client, namespace, rc.SWR, key)
    ctl.flag("block")
    cluster = make_cluster(broker)
    cluster.start(workers=1, webs=2)
    (worker,) = cluster.workers
    writer, reader = cluster.webs
    assert writer.ask("value", cmd="read", cache=rc.SWR, key=key)["value"] == OLD
    ctl.wait_calls(1)  # the worker's resolver has started (and blocks)
    assert reader.ask("value", cmd="read", cache=rc.SWR, key=key)["value"] == OLD  # now in L1
    written = {"gen": "set"}
    writer.ask("ok", cmd="set", cache=rc.SWR, key=key, value=written)
    ctl.flag(None)  # the resolver returns {"gen": "new"}, computed before the set
    worker.wait_for(_outcome(rc.SWR, key, "conflict"))
    assert ctl.calls == 1
    assert l2_value(redis_client, namespace, rc.SWR, key) == written
    for seen in _poll_all([writer, reader], rc.SWR, key, until=written, deadline=2):
        assert seen["ok"], seen  # (allowing the bus its delay)
        assert seen["errors"] == []


# -- 2. a worker killed mid-refresh ------------------------------------------------------------


CRASH_LOCK_TTL = 2.0  # rc.crash_cache's lock_ttl
QUICK_LOCK_TTL = 1.0  # rc.quick_cache's lock_ttl
KILL_MARGIN = 0.75  # enqueue + pick-up + resolver + bus on a loaded machine


@pytest.mark.parametrize("takeover", ["spare", "fresh"])
def test_worker_killed_mid_refresh_delays_it_by_at_most_lock_ttl(
    broker: str,
    takeover: str,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """P8: a worker SIGKILLed (its whole process group) while its resolver runs.

    ``spare``: a second worker runs beside the one killed. ``fresh``: a new worker is started
    after the kill; the bound is then lock_ttl or its start-up time, whichever is longer. (That
    variant uses a 5 s lock: a refresh message that expires before a worker takes it poisons its
    key, see test_an_expired_refresh_message_does_not_block_later_refreshes_of_its_key, so the
    lock must outlast a worker's start-up on a loaded machine.)

    With RabbitMQ the killed worker's unacknowledged message goes back to the queue when its
    connection drops, so the refresh is redelivered at once. With a Redis broker it stays
    unacknowledged for the visibility timeout (1 h by default), so the refresh happens when the
    lock expires and the reader's next stale read enqueues it again.
    """
    cache, lock_ttl = (rc.CRASH, CRASH_LOCK_TTL) if takeover == "spare" else (rc.SWR, 5.0)
    key = _key("crash")
    seed_stale(redis_client, namespace, cache, key)
    ctl = Control(redis_client, namespace, cache, key)
    ctl.flag("block")  # the first run hangs inside the worker until we kill it
    cluster = make_cluster(broker)
    cluster.start(workers=2 if takeover == "spare" else 1, webs=1)
    (web,) = cluster.webs
    web.ask("polling", cmd="poll", cache=cache, key=key, until={"gen": "new"}, deadline=20)
    deadline = time.monotonic() + 15
    while (where := ctl.where()) is None:
        assert time.monotonic() < deadline, "no worker started the refresh"
        time.sleep(0.005)
    holder = next(w for w in cluster.workers if w.pid == where["ppid"])
    t_kill = time.monotonic()
    holder.kill()
    ctl.flag(None)  # whoever runs it next finishes at once
    if takeover == "spare":
        (successor,) = [w for w in cluster.workers if w is not holder]
        startup = 0.0
    else:
        successor = cluster.worker()
        startup = time.monotonic() - t_kill

    seen = web.expect("seen", timeout=30)
    delay = seen["t"] - t_kill
    assert seen["ok"], seen
    assert seen["value"] == {"gen": "new", "n": 2}
    # The reader kept getting the stale value, at once, until the new one arrived.
    assert seen["errors"] == []
    assert seen["others"] == [json.dumps(OLD)]
    assert seen["max_ms"] < READ_MAX_MS, seen
    # The library's promise (P8): a crashed holder delays the refresh by at most lock_ttl.
    bound = max(lock_ttl, startup) + KILL_MARGIN
    assert delay <= bound, f"refreshed {delay:.2f}s after the kill (bound {bound:.2f}s)"
    assert ctl.calls == 2
    (run,) = ctl.runs()
    assert run["ppid"] == successor.pid
    successor.wait_for(_outcome(cache, key, "refreshed"))
    stats = web.ask("stats", cmd="stats", cache=cache)["stats"]
    assert stats["enqueue_failures"] == 0
    assert stats["resolver_calls"] == 0
    if takeover == "spare":
        if broker.startswith("amqp"):
            assert stats["refreshes_enqueued"] == 1  # the same message, redelivered
            assert delay < lock_ttl / 2
        else:
            assert stats["refreshes_enqueued"] == 2  # enqueued again once the lock expired
    _report(
        f"{_scheme(broker)}/{takeover}: worker SIGKILLed mid-refresh; refreshed "
        f"{delay * 1000:.0f} ms after the kill (lock_ttl {lock_ttl:.0f} s, successor ready "
        f"after {startup * 1000:.0f} ms); reader max {seen['max_ms']:.1f} ms over "
        f"{seen['reads']} reads; web enqueued {stats['refreshes_enqueued']}"
    )


def test_an_expired_refresh_message_does_not_block_later_refreshes_of_its_key(
    redis_broker: RedisServer,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """The queue was backed up longer than lock_ttl once (here: no worker yet). The lock
    expires, the next stale read enqueues the refresh again, and a worker must run it."""
    key = _key("late")
    seed_stale(redis_client, namespace, rc.QUICK, key)
    ctl = Control(redis_client, namespace, rc.QUICK, key)
    cluster = make_cluster(redis_broker.url)
    cluster.start(workers=0, webs=1)
    (web,) = cluster.webs
    web.ask("polling", cmd="poll", cache=rc.QUICK, key=key, until={"gen": "new"}, deadline=8)
    time.sleep(QUICK_LOCK_TTL + 0.3)  # the first refresh message expires in the queue
    worker = cluster.worker()
    seen = web.expect("seen", timeout=20)
    discarded = worker.count(
        re.escape(
            f"Discarding revoked task: oqron_cache.refresh[{refresh_task_prefix(rc.QUICK, key)}"
        )
    )
    assert seen["ok"], f"never refreshed; the worker discarded {discarded} refreshes as revoked"
    assert ctl.runs()[0]["ppid"] == worker.pid


# -- 3. the broker down -------------------------------------------------------------------------


_NEW = {"gen": "new"}


def _poll_all(
    webs: list[Web],
    cache: str,
    key: str,
    until: dict[str, Any] | None = _NEW,
    deadline: float = 20,
) -> list[dict[str, Any]]:
    """Every web process reads ``key`` until it matches ``until``; their ``seen`` events."""
    for web in webs:
        web.ask("polling", cmd="poll", cache=cache, key=key, until=until, deadline=deadline)
    return [web.expect("seen", timeout=deadline + 10) for web in webs]


def _stats(webs: list[Web], cache: str) -> list[dict[str, Any]]:
    return [web.ask("stats", cmd="stats", cache=cache)["stats"] for web in webs]


ENQUEUE_BUDGET = 1.0  # configure()'s default enqueue_budget


def test_broker_down_reads_stay_instant_and_refresh_in_process(
    redis_broker: RedisServer,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    cluster = make_cluster(redis_broker.url)
    cluster.start(workers=1, webs=2)
    (worker,) = cluster.workers
    webs = cluster.webs
    web_pids = {web.pid for web in webs}

    def refresh(phase: str) -> tuple[Control, list[dict[str, Any]]]:
        key = _key(phase)
        seed_stale(redis_client, namespace, rc.SWR, key)
        ctl = Control(redis_client, namespace, rc.SWR, key)
        seen = _poll_all(webs, rc.SWR, key)
        for s in seen:
            assert s["ok"], s
            assert s["errors"] == []  # never raised
            assert s["others"] in ([], [json.dumps(OLD)])  # stale until the new value came
            assert s["max_ms"] < READ_MAX_MS, s  # never waited for the broker
        assert ctl.calls == 1, phase  # still one refresh across both processes
        return ctl, seen

    # The broker up: the worker refreshes.
    ctl, seen = refresh("up")
    (run,) = ctl.runs()
    assert run["ppid"] == worker.pid
    first = min(s["t_first"] for s in seen)
    _report(
        f"redis broker up, idle worker: first stale read -> resolver start "
        f"{(run['started'] - first) * 1000:.1f} ms; resolver end -> visible in both "
        f"{(max(s['t'] for s in seen) - run['ended']) * 1000:.1f} ms"
    )

    # The broker gone: the enqueue fails (or times out), the dispatcher refreshes in-process.
    # First let the worker ack that task: kombu 5.7's Redis transport crashes the worker
    # ("Unrecoverable error: AttributeError ... 'hostname'") when the broker vanishes while a
    # message is unacknowledged (see test_worker_survives_broker_loss_with_unacked_message).
    admin = redis_broker.client()
    deadline = time.monotonic() + 10
    while admin.hlen("unacked"):
        assert time.monotonic() < deadline, "the worker never acked the refresh"
        time.sleep(0.01)
    redis_broker.kill()
    down_at = time.monotonic()
    for phase in ("down1", "down2"):
        ctl, seen = refresh(phase)
        assert ctl.runs()[0]["pid"] in web_pids
        # Bounded: the broker gets enqueue_budget (1 s) to take the task, then the fallback runs.
        took = max(s["t"] for s in seen) - min(s["t_first"] for s in seen)
        assert took < ENQUEUE_BUDGET + 0.5, f"refreshed {took:.2f}s after the first stale read"
        _report(
            f"broker down ({phase}): refreshed in a web process {took * 1000:.0f} ms after "
            f"the first stale read; reads max {max(s['max_ms'] for s in seen):.1f} ms"
        )
    stats = _stats(webs, rc.SWR)
    assert sum(s["enqueue_failures"] for s in stats) == 2
    assert sum(s["resolver_calls"] for s in stats) == 2

    # The broker back: the worker reconnects, and refreshes reach it again.
    redis_broker.restart()
    worker.wait_for(r"Connected to redis://", count=2, timeout=30)
    deadline = time.monotonic() + 30
    attempts = 0
    while True:
        attempts += 1
        ctl, _ = refresh(f"back{attempts}")
        if ctl.runs()[0]["ppid"] == worker.pid:
            break
        assert time.monotonic() < deadline, "refreshes never reached the worker again"
        time.sleep(0.2)
    _report(
        f"broker back: refreshes reach the worker again {time.monotonic() - down_at:.1f} s after "
        f"the broker died ({attempts} stale keys refreshed after its restart)"
    )


def test_broker_hanging_bounds_the_enqueue_and_a_late_message_is_harmless(
    redis_broker: RedisServer,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """A broker that accepts connections but answers nothing (SIGSTOP): the enqueue waits
    enqueue_budget, then the web process refreshes the key itself. The publish it gave up on
    goes out when the broker answers again; the worker then finds the entry refreshed already
    (version check) and leaves it alone (P5)."""
    cluster = make_cluster(redis_broker.url)
    cluster.start(workers=1, webs=1)
    (worker,) = cluster.workers
    (web,) = cluster.webs
    warm = _key("warm")  # the web process's publisher connects while the broker answers
    seed_stale(redis_client, namespace, rc.SWR, warm)
    (seen,) = _poll_all([web], rc.SWR, warm)
    assert seen["ok"], seen
    worker.wait_for(_outcome(rc.SWR, warm, "refreshed"))
    key = _key("hung")
    seed_stale(redis_client, namespace, rc.SWR, key)
    ctl = Control(redis_client, namespace, rc.SWR, key)
    with redis_broker.paused():
        (seen,) = _poll_all([web], rc.SWR, key)
        assert seen["ok"], seen
        assert seen["errors"] == []
        assert seen["max_ms"] < READ_MAX_MS, seen
        took = seen["t"] - seen["t_first"]
        assert ENQUEUE_BUDGET - 0.1 < took < ENQUEUE_BUDGET + 0.5, took
        (run,) = ctl.runs()
        assert run["pid"] == web.pid
        (stats,) = _stats([web], rc.SWR)
        assert stats["enqueue_failures"] == 1
    # The late message reaches the worker, which must not refresh (or overwrite) the key again.
    worker.wait_for(_outcome(rc.SWR, key, "superseded"), timeout=20)
    assert ctl.calls == 1
    assert l2_value(redis_client, namespace, rc.SWR, key) == {"gen": "new", "n": 1}
    _report(
        f"broker hanging: refreshed in the web process {took * 1000:.0f} ms after the first "
        "stale read; the late task was superseded in the worker"
    )


@pytest.mark.xfail(
    KOMBU >= (5, 7),  # seen with 5.7.0; 5.3.5 (the lowest bound) keeps its worker
    strict=True,
    reason="UPSTREAM (kombu 5.7.0 Redis transport): when the broker connection drops while a "
    "message is unacknowledged, Channel.close -> QoS.restore_unacked_once -> "
    "Channel._connparams reads self.connection.client.hostname after the connection was "
    "released (client is None); the AttributeError escapes kombu.common.ignore_errors and "
    "celery's consumer reports 'Unrecoverable error' and the worker exits",
)
def test_worker_survives_broker_loss_with_unacked_message(
    redis_broker: RedisServer,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    """A Redis broker restart while a refresh runs (acks_late: its message is unacknowledged)
    must not end the worker: it should reconnect and go on refreshing."""
    key = _key("inflight")
    seed_stale(redis_client, namespace, rc.SWR, key)
    ctl = Control(redis_client, namespace, rc.SWR, key)
    ctl.flag("block")
    cluster = make_cluster(redis_broker.url)
    cluster.start(workers=1, webs=1)
    (worker,) = cluster.workers
    (web,) = cluster.webs
    assert web.ask("value", cmd="read", cache=rc.SWR, key=key)["value"] == OLD
    ctl.wait_calls(1)  # the refresh runs in the worker; its message is not acked yet
    redis_broker.kill()
    ctl.flag(None)
    redis_broker.restart()
    worker.wait_for(r"Connected to redis://", count=2, timeout=30)  # fails at once if it exited
    key2 = _key("after")
    seed_stale(redis_client, namespace, rc.SWR, key2)
    (seen,) = _poll_all(cluster.webs, rc.SWR, key2)
    assert seen["ok"], seen
    assert Control(redis_client, namespace, rc.SWR, key2).runs()[0]["ppid"] == worker.pid


# -- 4. invalidation by task name ---------------------------------------------------------------


def _send_by_name(broker: str, calls: list[tuple[str, list[Any]]]) -> list[str]:
    """Run tests/procs/send_by_name.py (imports celery only); return the task ids."""
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "procs" / "send_by_name.py"),
            broker,
            json.dumps(calls),
        ],
        cwd=ROOT / "tests" / "procs",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = json.loads(done.stdout)
    assert out["imported"] == []  # a service that knows only the task names
    ids: list[str] = out["ids"]
    return ids


def _succeeded(task: str, task_id: str, result: str) -> str:
    return re.escape(f"Task {task}[{task_id}] succeeded in ") + r"[\d.e-]+s: " + re.escape(result)


def test_invalidation_tasks_sent_by_name_reach_l2_and_every_l1(
    broker: str, make_cluster: Callable[[str], Cluster], redis_client: redis.Redis, namespace: str
) -> None:
    cluster = make_cluster(broker)
    cluster.start(workers=1, webs=1)
    (worker,) = cluster.workers
    (web,) = cluster.webs
    run = uuid.uuid4().hex[:8]
    tag = f"t-{run}"
    keys = {
        "one": f"one-{run}",
        "pat1": f"pat-{run}-1",
        "pat2": f"pat-{run}-2",
        "tag1": f"tagged-{run}-1",
        "tag2": f"tagged-{run}-2",
        "keep": f"keep-{run}",
    }
    for name, key in keys.items():
        value = {"v": name, "tags": [tag] if name.startswith("tag") else []}
        web.ask("ok", cmd="set", cache=rc.PLAIN, key=key, value=value)
        assert web.ask("value", cmd="read", cache=rc.PLAIN, key=key)["value"] == value  # in L1
        assert l2_entry(redis_client, namespace, rc.PLAIN, key) is not None

    good: list[tuple[str, list[Any]]] = [
        ("oqron_cache.invalidate", [rc.PLAIN, [keys["one"]]]),
        ("oqron_cache.invalidate_pattern", [rc.PLAIN, f"pat-{run}-*"]),
        ("oqron_cache.invalidate_by_tag", [rc.PLAIN, tag]),
    ]
    # Logged and dropped (acked, not retried); the worker goes on.
    bad: list[tuple[str, list[Any]]] = [
        ("oqron_cache.invalidate_by_tag", [rc.PLAIN, 123]),
        ("oqron_cache.invalidate_pattern", [rc.PLAIN, "*"]),
        ("oqron_cache.invalidate", ["no_such_cache", ["x"]]),
        ("oqron_cache.invalidate", [rc.PLAIN, {"not": "a list"}]),
    ]
    ids = _send_by_name(broker, bad + good)
    results = ["'rejected'"] * len(bad) + ["'deleted 1'", "'deleted 2'", "'deleted 2'"]
    for (task, _), task_id, result in zip(bad + good, ids, results, strict=True):
        worker.wait_for(_succeeded(task, task_id, result))
    assert worker.count(r"oqron_cache\.invalidate\w* rejected: ") == len(bad)
    assert worker.proc.poll() is None

    for name, key in keys.items():
        if name == "keep":
            continue
        assert l2_entry(redis_client, namespace, rc.PLAIN, key) is None, name
        (seen,) = _poll_all([web], rc.PLAIN, key, until=None, deadline=5)
        assert seen["ok"], (name, seen)  # the web process's L1 copy is gone: a miss
    assert l2_value(redis_client, namespace, rc.PLAIN, keys["keep"])["v"] == "keep"
    assert web.ask("value", cmd="read", cache=rc.PLAIN, key=keys["keep"])["value"]["v"] == "keep"


def test_the_installed_worker_app_runs_from_outside_a_checkout(
    redis_client: redis.Redis, redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """``celery -A oqron_cache.celery.worker worker``: the wheel's app, run where there is no
    ``workers/`` package, serves tasks sent by name like the checkout's."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with RedisServer() as broker:
        worker = WorkerProcess(
            tmp_path, broker.url, redis_url, namespace, modules="tests.procs.refresh_caches",
            app="oqron_cache.celery.worker", cwd=elsewhere,
        )  # fmt: skip
        try:
            worker.wait_ready()
            assert "oqron_cache.refresh" in worker.log()  # the library's tasks are registered
            space = _space(namespace, rc.PLAIN)
            redis_client.set(space.value("gone"), b"x")
            call = ("oqron_cache.invalidate", [rc.PLAIN, ["gone"]])
            (task_id,) = _send_by_name(broker.url, [call])
            worker.wait_for(_succeeded("oqron_cache.invalidate", task_id, "'deleted "))
        finally:
            worker.kill()
    assert redis_client.get(space.value("gone")) != b"x"


# -- 5. a resolver raising in the worker --------------------------------------------------------


FAIL_LOCK_TTL = 1.0  # rc.fail_cache's lock_ttl
FAIL_WINDOW = 2.0


def test_resolver_raising_in_the_worker_serves_stale_without_a_retry_storm(
    redis_broker: RedisServer,
    make_cluster: Callable[[str], Cluster],
    redis_client: redis.Redis,
    namespace: str,
) -> None:
    key = _key("failing")
    seed_stale(redis_client, namespace, rc.FAIL, key)
    ctl = Control(redis_client, namespace, rc.FAIL, key)
    ctl.flag("raise")
    cluster = make_cluster(redis_broker.url)
    cluster.start(workers=1, webs=2)
    (worker,) = cluster.workers
    for web in cluster.webs:
        web.send(cmd="read_for", cache=rc.FAIL, key=key, seconds=FAIL_WINDOW, threads=4)
    done = [web.expect("done", timeout=FAIL_WINDOW + 20) for web in cluster.webs]
    calls = ctl.calls

    # Every read got the stale value at once; none raised.
    for d in done:
        assert d["errors"] == [], d
        assert d["values"] == {json.dumps(OLD): d["reads"]}
        assert d["p99_ms"] < 20, d
        assert d["max_ms"] < READ_MAX_MS, d
    reads = sum(d["reads"] for d in done)
    # The failed refresh keeps the key's lock for lock_ttl: one try per lock_ttl across the
    # cluster, not one per read (8 threads read about every millisecond).
    assert 1 <= calls <= FAIL_WINDOW / FAIL_LOCK_TTL + 1, f"{calls} resolver calls"
    worker.wait_for(_outcome(rc.FAIL, key, "failed"), count=calls)
    time.sleep(0.2)  # anything still in flight lands in the log now
    assert ctl.calls == worker.count(_outcome(rc.FAIL, key, "failed"))
    assert worker.count(_outcome(rc.FAIL, key, r"(?!failed)\w+")) == 0
    assert worker.proc.poll() is None
    assert l2_value(redis_client, namespace, rc.FAIL, key) == OLD  # never overwritten
    stats = _stats(cluster.webs, rc.FAIL)
    assert sum(s["resolver_calls"] for s in stats) == 0  # only the worker tried
    assert sum(s["enqueue_failures"] for s in stats) == 0

    # The resolver recovers: the next try after the throttle refreshes the key.
    ctl.flag(None)
    failed_calls = ctl.calls
    seen = _poll_all(cluster.webs, rc.FAIL, key, deadline=2 * FAIL_LOCK_TTL + 5)
    assert all(s["ok"] for s in seen), seen
    assert ctl.calls == failed_calls + 1
    _report(
        f"resolver raising: {failed_calls} worker calls for {reads} stale reads over "
        f"{FAIL_WINDOW:.0f} s (lock_ttl {FAIL_LOCK_TTL:.0f} s); reads p99 "
        f"{max(d['p99_ms'] for d in done):.2f} ms; recovered "
        f"{(max(s['t'] for s in seen) - min(s['t_first'] for s in seen)) * 1000:.0f} ms after "
        f"the flag was cleared"
    )
