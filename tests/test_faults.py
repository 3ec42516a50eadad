"""Fault injection on a private Redis: killed, paused, out of memory, read-only; forged payloads;
an ACL user; TLS. Promises P1 (no infrastructure error reaches a caller), P2 (bounded latency),
P3 (bounded staleness) and P10 (secure by default)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import pickle
import struct
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import oqron_cache
from oqron_cache import ConfigurationError, MemoryTier, RedisTier, Stampede
from oqron_cache.config import current_runtime, reset
from oqron_cache.core.entry import FORMAT
from oqron_cache.redis.replies import as_list
from tests.redis_server import RedisServer, free_port

OP_TIMEOUT = 0.1


class ResolverBoom(Exception):
    """The resolver's own error."""


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every 5 ms; return how long it took; fail after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic() - started


def two_tier(ttl: float = 60.0, **kwargs: Any) -> dict[str, Any]:
    return {"tiers": [MemoryTier(max_size=1000, ttl=ttl), RedisTier(ttl=ttl)], **kwargs}


class Resolver:
    """``value:<key>``, counting calls per key."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.before: Callable[[str], None] | None = None

    def __call__(self, key: str) -> str:
        with self.lock:
            self.calls[key] += 1
        if self.before is not None:
            self.before(key)
        return f"value:{key}"


@pytest.fixture
def faulty(private_redis: RedisServer) -> Iterator[str]:
    """``configure()`` on the private Redis with ``op_timeout="100ms"``; reset afterwards."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    oqron_cache.configure(redis_url=private_redis.url, namespace=ns, op_timeout="100ms")
    try:
        yield ns
    finally:
        reset()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def l2_has(private_redis: RedisServer, cache: Any, key: str) -> bool:
    return bool(private_redis.client().exists(cache.stack.l2.keys.value(key)))


# -- Redis killed --------------------------------------------------------------------------


def test_redis_killed_mid_load_values_still_come_back_then_service_resumes(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    bus = current_runtime().bus
    resolver = Resolver()
    cache = make_cache(**two_tier(resolver=resolver))
    assert cache.get("a") == "value:a"
    assert l2_has(private_redis, cache, "a")

    resolver.before = lambda key: private_redis.kill() if key == "b" else None
    value, took = timed(lambda: cache.get("b"))  # Redis dies while "b" is being computed
    resolver.before = None
    assert value == "value:b"
    assert took < 1.0
    assert cache.get_stats()["l2_errors"] >= 1

    # The bus notices, and flushes L1 (nobody can tell us about invalidations any more).
    wait_until(lambda: not bus.healthy, 3.0, "the bus to notice the dead server")
    l1 = cache.stack.l1
    assert l1.get("a") is None
    # "b" was put in L1 after the failed fill (the breaker is open: with Redis wholly down L1
    # serves, bounded by its ttl); whether the bus's flush came before or after that is a race.
    b_kept = l1.get("b") is not None
    for key in ("a", "b", "c"):  # from L1 if fresh, else the resolver: fast, no exception
        value, took = timed(functools.partial(cache.get, key))
        assert value == f"value:{key}"
        assert took < 0.5
    expected = {"a": 2, "b": 1 if b_kept else 2, "c": 1}
    assert resolver.calls == expected
    for key in ("a", "b", "c"):  # fresh copies in L1 now: no resolver
        assert cache.get(key) == f"value:{key}"
    assert resolver.calls == expected

    private_redis.restart()
    attempt = 0

    def l2_written_again() -> bool:
        nonlocal attempt
        attempt += 1
        key = f"after-{attempt}"
        assert cache.get(key) == f"value:{key}"
        return l2_has(private_redis, cache, key)

    resumed = wait_until(l2_written_again, 10.0, "L2 to be written again after the restart")
    wait_until(lambda: bus.healthy, 5.0, "the bus to resubscribe")
    assert current_runtime().conn.breaker.state == "closed"
    print(f"\n[killed] L2 written again {resumed * 1000:.0f} ms after the restart")


# -- Redis paused --------------------------------------------------------------------------


def test_paused_redis_costs_one_timeout_then_the_breaker_answers_fast(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    resolver = Resolver()
    cache = make_cache(**two_tier(resolver=resolver))
    assert cache.get("warm") == "value:warm"  # connections open, scripts loaded
    breaker = current_runtime().conn.breaker
    assert breaker.state == "closed"

    trips = breaker.trips
    with private_redis.paused():
        value, first = timed(lambda: cache.get("k0"))  # L1 empty: asks Redis, times out
        assert value == "value:k0"
        assert breaker.state == "open"
        others = []
        for i in range(1, 20):  # other keys: L1 misses, but the open breaker answers at once
            value, took = timed(functools.partial(cache.get, f"k{i}"))
            assert value == f"value:k{i}"
            others.append(took)
        assert breaker.state == "open"  # still within the 0.5 s cooldown ...
        assert breaker.trips == trips + 1  # ... so no probe, no second timeout
    assert OP_TIMEOUT * 0.9 <= first < OP_TIMEOUT * 4, first
    # None of the 19 paid a timeout (each well under op_timeout); typically ~0.1 ms each.
    assert max(others) < OP_TIMEOUT / 2, others
    assert sorted(others)[len(others) // 2] < 0.005, others
    assert resolver.calls == Counter({"warm": 1, **{f"k{i}": 1 for i in range(20)}})

    attempt = 0

    def l2_used_again() -> bool:
        nonlocal attempt
        attempt += 1
        key = f"after-{attempt}"
        assert cache.get(key) == f"value:{key}"
        time.sleep(0.02)
        return l2_has(private_redis, cache, key)

    resumed = wait_until(l2_used_again, 3.0, "L2 to be used again after SIGCONT")
    assert breaker.state == "closed"
    print(
        f"\n[paused] first call {first * 1000:.1f} ms; calls 2..20 max "
        f"{max(others) * 1000:.2f} ms; L2 used again {resumed * 1000:.0f} ms after resume"
    )


# -- Redis refusing writes -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["oom", "readonly"])
def test_refused_writes_readers_still_get_values_without_exceptions(
    fault: str, faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    resolver = Resolver()
    cache = make_cache(**two_tier(resolver=resolver))
    assert cache.get("before") == "value:before"
    errors = cache.get_stats()["l2_errors"]
    if fault == "oom":
        private_redis.set_maxmemory(1)  # noeviction: every write is refused with OOM
    else:
        private_redis.make_readonly()  # a replica: every write is refused with READONLY
    try:
        for i in range(5):
            assert cache.get(f"k{i}") == f"value:k{i}"
            assert cache.get(f"k{i}") == f"value:k{i}"  # L1: the bus is fine, so L1 is trusted
        assert resolver.calls == Counter({"before": 1, **{f"k{i}": 1 for i in range(5)}})
        assert not any(l2_has(private_redis, cache, f"k{i}") for i in range(5))
        cache.set("s", "S")  # refused below, kept in L1, no exception
        assert cache.get("s") == "S"
        cache.delete("s")
        assert cache.get("before") == "value:before"  # reads of L2 still work
        stats = cache.get_stats()
        assert stats["l2_errors"] > errors
        assert stats["resolver_errors"] == 0
        # The server answered: an error reply is not an outage, the breaker stays closed.
        assert current_runtime().conn.breaker.state == "closed"
        assert current_runtime().bus.healthy
    finally:
        if fault == "oom":
            private_redis.set_maxmemory(0)
        else:
            private_redis.make_writable()
    assert cache.get("k-after") == "value:k-after"
    assert l2_has(private_redis, cache, "k-after")


def test_delete_under_oom_still_removes_the_value(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    resolver = Resolver()
    cache = make_cache(**two_tier(resolver=resolver))
    assert cache.get("k") == "value:k"
    private_redis.set_maxmemory(1)
    try:
        cache.delete("k")
        assert cache.get("k") == "value:k"
        assert resolver.calls["k"] == 2  # recomputed, not the value from before the delete
    finally:
        private_redis.set_maxmemory(0)


# -- P3: bounded staleness even with Redis down --------------------------------------------


def test_entry_past_stale_ttl_is_never_served_even_with_redis_down(
    faulty: str,
    private_redis: RedisServer,
    make_cache: Callable[..., Any],
    clock: Any,
) -> None:
    ttl, stale_ttl = 10.0, 5.0
    state = {"fail": False, "n": 0}

    def resolver(key: str) -> str:
        if state["fail"]:
            raise ResolverBoom(key)
        state["n"] += 1
        return f"v{state['n']}"

    cache = make_cache(
        **two_tier(ttl, resolver=resolver, stale_ttl=stale_ttl),
        clock=clock,
        stampede=Stampede(stale_while_revalidate=False),
    )
    bus = current_runtime().bus
    private_redis.kill()
    wait_until(lambda: not bus.healthy, 3.0, "the bus to notice the dead server")

    assert cache.get("k") == "v1"  # resolved with Redis down; kept in L1 (breaker open)
    assert cache.get("k") == "v1"
    assert state["n"] == 1
    state["fail"] = True
    clock.tick(ttl + 1)  # stale: a failing load may fall back to it (P3 allows it)
    assert cache.get("k") == "v1"
    for past in (ttl + stale_ttl - (ttl + 1), 0.5):  # exactly at stale_until, then beyond it
        clock.tick(past)
        with pytest.raises(ResolverBoom):
            cache.get("k")
    state["fail"] = False
    assert cache.get("k") == "v2"  # never v1 again


def test_stale_l1_copy_without_swr_is_reloaded_when_redis_is_down(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any], clock: Any
) -> None:
    n = 0

    def resolver(key: str) -> str:
        nonlocal n
        n += 1
        return f"v{n}"

    cache = make_cache(
        **two_tier(10, resolver=resolver, stale_ttl=5),
        clock=clock,
        stampede=Stampede(stale_while_revalidate=False),
    )
    bus = current_runtime().bus
    private_redis.kill()
    wait_until(lambda: not bus.healthy, 3.0, "the bus to notice the dead server")
    assert cache.get("k") == "v1"
    clock.tick(11)  # stale: past ttl, within stale_ttl
    # A stale copy (no stale-while-revalidate) is only a fallback: the working resolver is
    # asked even though L2 is unavailable.
    assert cache.get("k") == "v2"


# -- P10: pickle canaries ------------------------------------------------------------------


class Canary:
    """Unpickling this runs code: it creates the file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def envelope(codec_id: int, payload: bytes) -> bytes:
    """A well-formed envelope header (fresh for an hour) around ``payload``."""
    now = time.time()
    header = struct.pack(
        ">BB8sddddH", FORMAT, codec_id << 4, os.urandom(8), now, now + 3600, now + 7200, 0.0, 0
    )
    return header + payload


def test_pickle_canary_in_l2_and_on_the_bus_is_never_unpickled(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any], tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    payload = pickle.dumps(Canary(canary))
    resolver = Resolver()
    cache = make_cache(**two_tier(resolver=resolver))
    admin = private_redis.client()
    planted = {
        "raw-pickle": payload,
        "json-codec-pickle-body": envelope(1, payload),
        "msgpack-codec-pickle-body": envelope(2, payload),
        "unknown-codec-pickle-body": envelope(15, payload),
    }
    corrupt_per_read: list[int] = []
    for key, raw in planted.items():
        admin.set(cache.stack.l2.keys.value(key), raw, px=60_000)
        before = cache.get_stats()["corrupt"]
        assert cache.get(key) == f"value:{key}"  # a miss: the resolver's value
        corrupt_per_read.append(cache.get_stats()["corrupt"] - before)
        assert not canary.exists()
        # ... and the planted bytes were replaced by a real envelope.
        assert cache.get(key) == f"value:{key}"
        assert resolver.calls[key] == 1
    assert all(n >= 1 for n in corrupt_per_read), corrupt_per_read

    bus = current_runtime().bus
    dropped = bus.dropped_messages
    assert admin.publish(bus.channel, payload) == 1
    wait_until(lambda: bus.dropped_messages == dropped + 1, 2.0, "the pickle to be dropped")
    assert bus.healthy
    assert not canary.exists()
    print(f"\n[canary] corrupt counted per get() of a planted key: {corrupt_per_read}")


def test_one_read_of_a_corrupt_entry_counts_corrupt_once(
    faulty: str, private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(**two_tier(resolver=Resolver()))
    private_redis.client().set(cache.stack.l2.keys.value("k"), b"\x80\x04garbage", px=60_000)
    assert cache.get("k") == "value:k"
    assert cache.get_stats()["corrupt"] == 1


# -- an ACL user ---------------------------------------------------------------------------

ACL_PASSWORD = "Corr3ct-Horse-Battery"  # noqa: S105 - a throw-away user of a private server
WRONG_PASSWORD = "Wr0ng-Staple-Secret"  # noqa: S105


def make_acl_user(private_redis: RedisServer) -> None:
    # redis-py leaves execute_command unannotated.
    private_redis.client().execute_command(
        "ACL", "SETUSER", "oq", "reset", "on", f">{ACL_PASSWORD}",
        "~oqron:*", "&oqron:*",
        "+@read", "+@write", "+@scripting", "+@pubsub", "+ping", "+client", "+time",
        "-@dangerous",
    )  # fmt: skip


def test_acl_user_runs_the_full_cycle(
    private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    make_acl_user(private_redis)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    url = f"redis://oq:{ACL_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    oqron_cache.configure(redis_url=url, namespace=ns, op_timeout="250ms")
    try:
        runtime = current_runtime()
        assert runtime.bus.healthy
        users = {
            c["user"]
            for c in as_list(private_redis.client().client_list())
            if c["name"] == "oqron-cache"
        }
        assert users == {"oq"}
        calls = Counter[str]()
        calls_lock = threading.Lock()

        def resolver(key: str) -> str:
            with calls_lock:
                calls[key] += 1
            time.sleep(0.05)
            return f"value:{key}"

        cache = make_cache(**two_tier(resolver=resolver))
        assert cache.get("a") == "value:a"
        cache.set("b", "B")
        assert cache.get("b") == "B"
        cache.delete("a")
        assert cache.get("a") == "value:a"
        assert calls["a"] == 2

        results: list[Any] = []
        barrier = threading.Barrier(16)

        def call() -> None:
            barrier.wait()
            results.append(cache.get("hot"))

        threads = [threading.Thread(target=call) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert results == ["value:hot"] * 16
        assert calls["hot"] == 1

        cache.set("x1", 1)
        cache.set("x2", 2)
        assert cache.invalidate_pattern("x*") == 2  # SCAN + UNLINK + PUBLISH
        stats = cache.get_stats()
        assert stats["l2_errors"] == 0
        assert runtime.bus.healthy
        assert private_redis.client().exists(cache.stack.l2.keys.value("hot")) == 1
    finally:
        reset()


@pytest.mark.asyncio
async def test_acl_user_runs_the_full_cycle_on_the_async_front(
    private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    """P10 on the async front: the per-loop pool logs in as the same restricted ACL user
    (keys and channels under oqron:*, no dangerous commands), and reads, writes, deletes,
    a single-flight load, a pattern and a tag invalidation all work, with no L2 error."""
    make_acl_user(private_redis)
    ns = f"t-{uuid.uuid4().hex[:8]}"
    url = f"redis://oq:{ACL_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    oqron_cache.configure(redis_url=url, namespace=ns, op_timeout="250ms")
    try:
        calls = Counter[str]()

        async def resolver(key: str) -> str:
            calls[key] += 1
            await asyncio.sleep(0.05)
            return f"value:{key}"

        cache = make_cache(**two_tier(resolver=resolver, tags=lambda key, value: ["t"]))
        assert await cache.aget("a") == "value:a"
        await cache.aset("b", "B")
        assert await cache.aget("b") == "B"
        await cache.adelete("a")
        assert await cache.aget("a") == "value:a"
        assert calls["a"] == 2
        assert await asyncio.gather(*(cache.aget("hot") for _ in range(16))) == ["value:hot"] * 16
        assert calls["hot"] == 1
        await cache.aset_many({"x1": 1, "x2": 2})
        assert await cache.ainvalidate_pattern("x*") == 2
        assert await cache.ainvalidate_by_tag("t") >= 1
        clients = as_list(private_redis.client().client_list())
        assert {c["user"] for c in clients if c["name"] == "oqron-cache-aio"} == {"oq"}
        assert {c["user"] for c in clients if c["name"].startswith("oqron-cache")} == {"oq"}
        assert cache.get_stats(local=True)["l2_errors"] == 0
    finally:
        reset()


def test_acl_wrong_password_fails_configure_without_leaking_it(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    make_acl_user(private_redis)
    url = f"redis://oq:{WRONG_PASSWORD}@127.0.0.1:{private_redis.port}/0"
    caplog.set_level(logging.DEBUG)
    try:
        with pytest.raises(ConfigurationError) as info:
            oqron_cache.configure(redis_url=url, namespace="t-acl")
    finally:
        reset()
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for item in chain:
        assert WRONG_PASSWORD not in str(item)
        assert WRONG_PASSWORD not in repr(item)
    assert "***" in str(info.value)  # the URL is shown masked
    assert WRONG_PASSWORD not in caplog.text


def test_failed_configure_does_not_leave_the_refused_credentials_in_place(
    private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    make_acl_user(private_redis)
    good_ns = f"t-{uuid.uuid4().hex[:8]}"
    oqron_cache.configure(redis_url=private_redis.url, namespace=good_ns)
    try:
        with pytest.raises(ConfigurationError):
            oqron_cache.configure(
                redis_url=f"redis://oq:{WRONG_PASSWORD}@127.0.0.1:{private_redis.port}/0",
                namespace="t-refused",
            )
        cache = make_cache(**two_tier(resolver=Resolver()))
        assert cache.get("k") == "value:k"
        assert cache.get_stats()["l2_errors"] == 0
    finally:
        reset()


# -- TLS -----------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        # What Python 3.13's default VERIFY_X509_STRICT demands of a CA certificate.
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return key, cert


def make_server_cert(directory: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "authorityKeyIdentifier=keyid\n"  # Python 3.13's strict verification wants it too
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1",
        cwd=directory,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        cwd=directory,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path, Path]]:
    """A private Redis with TLS on its own port: (server, tls_port, good CA, unrelated CA)."""
    ca_key, ca_cert = make_ca(tmp_path, "oqron-test-ca")
    _, other_ca = make_ca(tmp_path, "unrelated-ca")
    key, cert = make_server_cert(tmp_path, ca_key, ca_cert)
    tls_port = free_port()
    with RedisServer(
        extra_args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca_cert),
            "--tls-auth-clients", "no",
        ]
    ) as server:  # fmt: skip
        yield server, tls_port, ca_cert, other_ca


def test_rediss_round_trip_and_wrong_ca_is_refused(
    tls_redis: tuple[RedisServer, int, Path, Path], make_cache: Callable[..., Any]
) -> None:
    server, tls_port, ca_cert, other_ca = tls_redis
    ns = f"t-{uuid.uuid4().hex[:8]}"
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={quote(str(ca_cert))}"
    oqron_cache.configure(redis_url=url, namespace=ns)
    try:
        runtime = current_runtime()
        assert runtime.bus.healthy
        resolver = Resolver()
        cache = make_cache(**two_tier(resolver=resolver))
        assert cache.get("a") == "value:a"
        cache.set("b", "B")
        assert cache.get("b") == "B"
        assert cache.get_stats()["l2_errors"] == 0
        # Really stored, seen through the plain-text admin port of the same server.
        assert server.client().exists(cache.stack.l2.keys.value("a")) == 1
        assert server.client().exists(cache.stack.l2.keys.value("b")) == 1
    finally:
        reset()

    wrong = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={quote(str(other_ca))}"
    try:
        with pytest.raises(ConfigurationError, match="TLS"):
            oqron_cache.configure(redis_url=wrong, namespace=ns)
    finally:
        reset()
