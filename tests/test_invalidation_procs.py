"""Tag and pattern invalidation across processes (issue 4 item 1, DESIGN section 5, P5 and P7).

Every test runs real child processes (``tests/procs/inval_child.py``) on a real Redis: they
declare the same cache, hold entries in their own L1, and report what their L1 holds and when the
bus changed it. Instants are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process
on Linux), so a child's "dropped at" minus the parent's "published at" is the bus delay.
"""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

import oqron_cache
from oqron_cache.config import reset
from oqron_cache.core.entry import unpack
from oqron_cache.engine import registry
from tests.procs import ROOT, Child
from tests.procs.inval_child import control_key, declare, make_resolver
from tests.redis_server import RedisServer

PROCS = 3
N = 20  # affected entries per test (and as many unaffected ones)
DROP_DEADLINE = 2.0  # seconds a child may take to drop invalidated entries (measured: ~1 ms)


class InvalChild(Child):
    """A ``tests.procs.inval_child`` process (the line protocol of :class:`Child`)."""

    def __init__(self, args: list[str], log_path: Path) -> None:  # own Popen: no super()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.inval_child", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )

    def ask(self, reply: str, **command: Any) -> dict[str, Any]:
        """Send ``command`` and return its answer, which must be called ``reply``."""
        self.send(**command)
        return self.expect(reply)


Spawn = Callable[..., list[InvalChild]]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(n, url, ns, cache, **options)``: ``n`` ready children, killed at teardown."""
    started: list[InvalChild] = []

    def factory(n: int, url: str, ns: str, cache: str, *extra: str, **options: str) -> Any:
        args = ["--url", url, "--ns", ns, "--cache", cache, *extra]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", value]
        kids = []
        for _ in range(n):
            kid = InvalChild(args, tmp_path / f"child-{len(started)}.log")
            started.append(kid)
            kids.append(kid)
        for kid in kids:
            ready = kid.expect("ready", timeout=30)
            assert ready["bus_healthy"], ready
        return kids

    try:
        yield factory
    finally:
        for kid in started:
            kid.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def name() -> Iterator[str]:
    """A unique cache name; the cache declared under it is closed after the test."""
    cache_name = f"inv-{uuid.uuid4().hex[:8]}"
    yield cache_name
    if cache_name in registry.names():
        cast("oqron_cache.Cache[Any]", registry.lookup(cache_name)).close()


def publish_times(cache: oqron_cache.Cache[Any]) -> list[float]:
    """Instrument this process's L2 store: the instants (monotonic) it publishes a bus message."""
    l2 = cache.stack.l2
    assert l2 is not None
    published: list[float] = []
    original = l2.publish

    def publish(message: bytes) -> None:
        published.append(time.monotonic())
        original(message)

    l2.publish = publish  # type: ignore[method-assign]
    return published


def value(key: str, tags: list[str]) -> dict[str, Any]:
    """What the parent writes (``n`` 0: resolver runs number theirs from 1)."""
    return {"tags": tags, "key": key, "n": 0}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- 1. every process's L1 drops exactly the affected entries -------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tag", "pattern"])
def test_invalidation_reaches_the_l1_of_every_process(
    configured: str, redis_url: str, raw: redis.Redis, name: str, spawn: Spawn, how: str
) -> None:
    ns = configured
    cache = declare(name, ttl="60s", stale_ttl=0, resolver=make_resolver(raw, ns, name))
    acme = [f"acme:{i}" for i in range(N)]
    beta = [f"beta:{i}" for i in range(N)]
    for key in acme:
        cache.set(key, value(key, ["tenant:acme"]))
    for key in beta:
        cache.set(key, value(key, ["tenant:beta"]))
    kids = spawn(PROCS, redis_url, ns, name)

    for kid in kids:
        first = kid.ask("read", cmd="read", keys=acme + beta)
        assert first["values"] == [value(k, ["tenant:acme"]) for k in acme] + [
            value(k, ["tenant:beta"]) for k in beta
        ]
        assert (first["l2_hits"], first["misses"]) == (2 * N, 0)
        again = kid.ask("read", cmd="read", keys=acme + beta)
        assert again["values"] == first["values"]
        assert (again["l2_hits"], again["misses"]) == (0, 0)  # all L1 hits
        assert again["held"] == first["values"]
        kid.ask("armed", cmd="arm", gone=acme, kept=beta)

    published = publish_times(cache)
    started = time.monotonic()
    if how == "tag":
        removed = cache.invalidate_by_tag("tenant:acme")
    else:
        removed = cache.invalidate_pattern("acme:*")
    returned = time.monotonic()
    assert removed == N
    assert len(published) == 1  # one bus message for the whole invalidation
    l1 = cache.stack.l1
    assert l1 is not None
    assert [k for k in acme if l1.get(k) is not None] == []  # this process's L1 too
    assert len([k for k in beta if l1.get(k) is not None]) == N

    reports = [kid.ask("dropped", cmd="collect", deadline=DROP_DEADLINE) for kid in kids]
    for report in reports:
        assert report["ok"], report
        assert len(report["bus"]) == 1, report["bus"]
        assert started <= report["t_dropped"] <= returned + DROP_DEADLINE
    # Unaffected entries stay in every L1.
    assert [r["kept_held"] for r in reports] == [N] * PROCS
    for kid in kids:
        kept = kid.ask("read", cmd="read", keys=beta)
        assert (kept["l2_hits"], kept["misses"]) == (0, 0)

    # The invalidated keys load again, once across all processes, and never the old value.
    for kid in kids:
        kid.send(cmd="read", keys=acme)
    reads = [kid.expect("read") for kid in kids]
    assert int(cast("bytes | None", raw.get(control_key(ns, name, "gen"))) or 0) == N
    assert sum(r["resolver_calls"] for r in reads) == N
    for r in reads:
        assert r["held"] == [None] * N
        assert all(v["n"] >= 1 and v["tags"] == ["g"] for v in r["values"]), r["values"]
    assert reads[0]["values"] == reads[1]["values"] == reads[2]["values"]  # one load per key
    assert [cache.get(k) for k in acme] == reads[0]["values"]

    delays = [r["t_dropped"] - published[0] for r in reports]
    print(
        f"\n[{how} invalidation, {N} of {2 * N} entries, {PROCS} processes] call "
        f"{ms(returned - started)}; bus delay (publish -> L1 dropped): "
        + ", ".join(ms(d) for d in delays)
    )


def test_pattern_invalidation_spares_unaffected_l1_entries_of_other_processes(
    configured: str, redis_url: str, raw: redis.Redis, name: str, spawn: Spawn
) -> None:
    ns = configured
    cache = declare(name, ttl="60s", stale_ttl=0, resolver=make_resolver(raw, ns, name))
    acme = [f"acme:{i}" for i in range(N)]
    beta = [f"beta:{i}" for i in range(N)]
    for key in acme + beta:
        cache.set(key, value(key, []))
    (kid,) = spawn(1, redis_url, ns, name)
    kid.ask("read", cmd="read", keys=acme + beta)
    kid.ask("armed", cmd="arm", gone=acme, kept=beta)
    assert cache.invalidate_pattern("acme:*") == N
    report = kid.ask("dropped", cmd="collect", deadline=DROP_DEADLINE)
    assert report["ok"]
    assert report["kept_held"] == N  # fails: 0, the whole L1 was cleared
    kept = kid.ask("read", cmd="read", keys=beta)
    assert kept["l2_hits"] == 0


# -- 2. an invalidation racing a load or a refresh in another process ----------------------


def invalidate(cache: oqron_cache.Cache[Any], how: str) -> int:
    return cache.invalidate_by_tag("g") if how == "tag" else cache.invalidate_pattern("acct:*")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tag", "pattern"])
def test_invalidation_racing_a_cold_load_in_another_process(
    configured: str, redis_url: str, raw: redis.Redis, name: str, spawn: Spawn, how: str
) -> None:
    ns = configured
    key = "acct:1"
    flag = control_key(ns, name, "flag")
    cache = declare(name, ttl="60s", stale_ttl=0, resolver=make_resolver(raw, ns, name))
    loader, *others = spawn(PROCS, redis_url, ns, name)

    raw.set(flag, "block")
    loader.send(cmd="get_bg", key=key)
    assert loader.expect("resolving") == {"event": "resolving", "key": key, "n": 1}
    assert invalidate(cache, how) == 0  # nothing was cached yet: only the log knows
    raw.delete(flag)
    got = loader.expect("got")
    assert got["value"]["n"] == 1  # the caller whose read began before still gets it
    stats = loader.ask("joined", cmd="join")["stats"]
    assert stats["invalidated_in_flight"] == 1  # ... but the fill was withdrawn

    assert (cache.get(key) or {})["n"] == 2  # loaded again here, not the value 1
    for kid in (loader, *others):
        read = kid.ask("read", cmd="read", keys=[key])
        assert read["held"] == [None]  # value 1 never stayed in any L1
        assert read["values"][0]["n"] == 2
        assert (read["l2_hits"], read["resolver_calls"]) == (1, 0)
    assert int(cast("bytes | None", raw.get(control_key(ns, name, "gen"))) or 0) == 2


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tag", "pattern"])
def test_invalidation_racing_a_background_refresh_in_another_process(
    configured: str, redis_url: str, raw: redis.Redis, name: str, spawn: Spawn, how: str
) -> None:
    """A child's dispatcher is refreshing a stale entry when the parent invalidates it."""
    ns = configured
    key = "acct:1"
    flag = control_key(ns, name, "flag")
    options: dict[str, Any] = {"ttl": "1s", "stale_ttl": "1m"}
    cache = declare(name, resolver=make_resolver(raw, ns, name), **options)
    refresher, *others = spawn(PROCS, redis_url, ns, name, **options)

    assert (cache.get(key) or {})["n"] == 1
    filled = time.monotonic()  # the entry's fresh_until is at most 1 s after this
    for kid in (refresher, *others):
        read = kid.ask("read", cmd="read", keys=[key])
        assert read["values"][0]["n"] == 1 and read["l2_hits"] == 1
        kid.ask("armed", cmd="arm", gone=[key])
    time.sleep(max(0.0, filled + 1.1 - time.monotonic()))  # n=1 is now stale everywhere

    raw.set(flag, "block")
    refresher.send(cmd="read", keys=[key])
    events = {e["event"]: e for e in (refresher.event(), refresher.event())}
    assert events["read"]["values"][0]["n"] == 1  # served stale, refresh requested
    assert events["resolving"]["n"] == 2  # the refresh is now loading value 2
    assert invalidate(cache, how) == 1
    for kid in (refresher, *others):
        assert kid.ask("dropped", cmd="collect", deadline=DROP_DEADLINE)["ok"]
    raw.delete(flag)
    joined = refresher.ask("joined", cmd="join")
    assert joined["ok"]
    stats = joined["stats"]
    assert stats["l2_write_conflicts"] + stats["invalidated_in_flight"] == 1
    assert stats["refreshes_succeeded"] == 0

    assert (cache.get(key) or {})["n"] == 3  # never value 2, loaded before the invalidation
    for kid in (refresher, *others):
        kid.send(cmd="read", keys=[key])
    for kid in (refresher, *others):
        read = kid.expect("read")
        assert read["held"] == [None]
        assert read["values"][0]["n"] == 3
    assert int(cast("bytes | None", raw.get(control_key(ns, name, "gen"))) or 0) == 3


@pytest.mark.parametrize("how", ["tag"])
def test_invalidation_racing_an_l2_read_in_another_process(
    configured: str, redis_url: str, raw: redis.Redis, name: str, spawn: Spawn, how: str
) -> None:
    ns = configured
    key = "acct:1"
    decode_flag = control_key(ns, name, "decode")
    cache = declare(name, ttl="60s", stale_ttl=0, resolver=make_resolver(raw, ns, name))
    cache.set(key, value(key, ["g"]))
    (reader,) = spawn(1, redis_url, ns, name, "--hold-decode")
    reader.ask("armed", cmd="arm", gone=[key])

    raw.set(decode_flag, "block")
    reader.send(cmd="get_bg", key=key)
    reader.expect("decoding")  # the reader has GOT the envelope; it is not in its L1 yet
    assert invalidate(cache, how) == 1
    assert reader.ask("bus", cmd="wait_bus", n=1, deadline=DROP_DEADLINE)["count"] == 1
    raw.delete(decode_flag)
    assert reader.expect("got")["value"]["n"] == 0  # its read began before: fine to return
    # After the call returned (and the bus delay), no process may serve the old value.
    read = reader.ask("read", cmd="read", keys=[key])
    assert read["held"] == [None]  # fails: the old value sits in the reader's L1
    assert read["values"][0]["n"] >= 1


# -- 3. large invalidations ----------------------------------------------------------------


def bulk_fill(
    cache: oqron_cache.Cache[Any], client: redis.Redis, items: Iterable[tuple[str, Any]]
) -> int:
    """Write entries the way fills do (envelope + tag index member), pipelined; return how many."""
    stack = cache.stack
    l2 = stack.l2
    assert l2 is not None
    ttl_ms = int((stack.opts.ttl + stack.opts.stale_ttl) * 1000)
    tags: set[str] = set()
    pipe = client.pipeline(transaction=False)
    count = 0
    for key, item in items:
        entry = stack._entry(key, item, 0.0)
        envelope = stack._encode(key, entry)
        assert envelope is not None
        pipe.set(l2.keys.value(key), envelope, px=ttl_ms)
        for tag in entry.tags:
            pipe.zadd(l2.keys.tag_set(tag), {l2.keys.encoded(key): int(time.time() * 1e6)})
            tags.add(tag)
        count += 1
        if count % 2000 == 0:
            pipe.execute()
    for tag in tags:
        pipe.pexpire(l2.keys.tag_set(tag), ttl_ms + 60_000)
    pipe.execute()
    return count


BIG = 20_000


@pytest.mark.slow
def test_invalidating_a_tag_of_20000_entries_does_not_block_redis(
    private_redis: RedisServer, name: str, tmp_path: Path
) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    oqron_cache.configure(redis_url=private_redis.url, namespace=ns)
    admin = private_redis.client(socket_timeout=5)
    try:
        cache = declare(name, ttl="10m", stale_ttl=0, resolver=None)
        items = ((f"item:{i}", {"tags": ["big"], "i": i}) for i in range(BIG))
        assert bulk_fill(cache, admin, items) == BIG
        cache.set("other", {"tags": ["small"], "i": -1})
        l2 = cache.stack.l2
        assert l2 is not None
        tag_set = l2.keys.tag_set("big")
        assert admin.zcard(tag_set) == BIG

        admin.config_set("latency-monitor-threshold", 1)  # ms; a private server only
        # redis-py leaves execute_command unannotated.
        admin.execute_command("LATENCY", "RESET")
        pinger = InvalChild(["--url", private_redis.url, "--ping"], tmp_path / "ping.log")
        try:
            pinger.expect("ready", timeout=30)
            time.sleep(0.05)  # a few pings before, as a baseline
            tracemalloc.start()
            started = time.perf_counter()
            try:
                removed = cache.invalidate_by_tag("big")
                took = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            pings = pinger.ask("pinged", cmd="stop")
        finally:
            pinger.close()
        # redis-py leaves execute_command unannotated.
        latest = admin.execute_command("LATENCY", "LATEST")
        worst_command_ms = max((int(event[3]) for event in latest), default=0)

        assert removed == BIG
        assert admin.exists(tag_set) == 0
        # every entry is gone (a tombstone at most), the untagged one is untouched
        live = 0
        pipe = admin.pipeline(transaction=False)
        for i in range(BIG):
            pipe.get(l2.keys.value(f"item:{i}"))
            if i % 2000 == 1999 or i == BIG - 1:
                live += sum(1 for raw in pipe.execute() if raw and not unpack(raw)[0].tombstone)
        assert live == 0
        assert cache.get("item:7") is None
        assert cache.get("other") == {"tags": ["small"], "i": -1}
        # Redis was never blocked: the slowest PING and the slowest command stayed small ...
        assert pings["pings"] >= 20
        assert pings["worst"] < 0.050, f"a PING took {ms(pings['worst'])} during it"
        assert worst_command_ms < 50, latest
        # ... and the members were never all in this process's memory at once (20,000 of them
        # in one list of bytes would alone be over 1.5 MB).
        assert peak < 1_000_000, f"peak traced memory {peak} bytes"
        print(
            f"\n[tag of {BIG}] invalidate_by_tag {took:.2f} s; PING (another process) slowest "
            f"{ms(pings['worst'])}, p99 {ms(pings['p99'])} of {pings['pings']}; slowest Redis "
            f"command {worst_command_ms} ms (LATENCY LATEST {latest}); peak traced memory "
            f"{peak / 1e6:.2f} MB"
        )
    finally:
        reset()


def test_pattern_invalidation_counts_a_key_scan_repeats_once(configured: str, name: str) -> None:
    """SCAN may return a key more than once; the count must not.

    On a real server this shows with 20,000 entries and ``hz 500`` in most runs (and in about
    a third at the default hz): Redis shrinks its key table while the keys are being unlinked,
    and SCAN then repeats keys. Here SCAN's pages are replayed, which makes it certain.
    """
    cache = declare(name, ttl="1m", stale_ttl=0, resolver=None)
    for i in range(N):
        cache.set(f"item:{i}", {"tags": [], "i": i})
    l2 = cache.stack.l2
    assert l2 is not None
    scan = l2.scan

    def scan_twice(match: str, count: int) -> Iterator[bytes]:
        keys = list(scan(match, count))
        yield from keys + keys  # what a shrinking table may make SCAN do

    l2.scan = scan_twice  # type: ignore[method-assign]
    assert cache.invalidate_pattern("item:*") == N  # fails: 2 * N
