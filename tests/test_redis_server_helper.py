"""The private-Redis helper and the namespace cleanup do what fault tests rely on."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest
import redis

from tests.redis_server import RedisServer, delete_namespace, free_port, no_retry

MB = 1024 * 1024


def test_start_ping_stop() -> None:
    server = RedisServer()
    try:
        assert server.pid is not None
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = server.client()
        assert client.ping() is True
        assert client.set("k", b"v")
        assert client.get("k") == b"v"
        pid = server.pid
        server.stop()
        assert not server.running
        server.stop()  # idempotent
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert server.pid == pid
    finally:
        server.close()
    assert not server.dir.exists()
    server.close()  # idempotent


def test_kill_then_restart_on_same_port_loses_data(private_redis: RedisServer) -> None:
    client = private_redis.client()
    client.set("survivor", b"1")
    port, old_pid = private_redis.port, private_redis.pid

    private_redis.kill()
    assert not private_redis.running
    with pytest.raises(redis.ConnectionError):
        client.ping()

    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.pid != old_pid
    assert client.ping() is True  # same client object reconnects to the same port
    assert client.get("survivor") is None  # --save "": nothing persisted


def test_restart_of_running_server(private_redis: RedisServer) -> None:
    port = private_redis.port
    private_redis.restart()
    assert private_redis.port == port
    assert private_redis.client().ping() is True


def test_pause_times_out_and_resume_recovers(private_redis: RedisServer) -> None:
    client = private_redis.client(socket_timeout=0.2, socket_connect_timeout=0.2)
    assert client.ping() is True

    with private_redis.paused():
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.get("x")
        assert time.monotonic() - started < 2.0  # no retries/backoff hidden in the client

    assert client.ping() is True
    assert client.set("after", b"ok")


def test_default_client_retries_are_disabled(private_redis: RedisServer) -> None:
    # redis-py 6 defaults to 3 retries with exponential backoff; our clients fail fast.
    client = private_redis.client()
    retry: Any = client.get_retry()
    assert retry is not None  # get_retries() is redis-py 5.1's; 5.0 keeps _retries
    assert (retry.get_retries() if hasattr(retry, "get_retries") else retry._retries) == 0


def test_maxmemory_makes_writes_fail_with_oom(private_redis: RedisServer) -> None:
    client = private_redis.client()
    private_redis.set_maxmemory(1 * MB)
    # redis-py maps the "OOM ..." reply to OutOfMemoryError (a ResponseError) and strips
    # the "OOM" code from the message: match on the type, not on the text.
    with pytest.raises(redis.ResponseError) as excinfo:
        client.set("big", b"x" * (2 * MB))
    assert isinstance(excinfo.value, redis.exceptions.OutOfMemoryError)
    assert "maxmemory" in str(excinfo.value)
    private_redis.set_maxmemory(0)
    assert client.set("big", b"x" * (2 * MB))


def test_readonly_replica_rejects_writes_then_writable_again(private_redis: RedisServer) -> None:
    client = private_redis.client()
    client.set("kept", b"1")

    private_redis.make_readonly()
    with pytest.raises(redis.exceptions.ReadOnlyError):
        client.set("k", b"v")
    assert client.get("kept") == b"1"  # stale reads are still served

    private_redis.make_writable()
    assert client.set("k", b"v")
    assert client.get("kept") == b"1"


def test_requirepass_via_extra_args() -> None:
    secret = uuid.uuid4().hex
    with RedisServer(extra_args=["--requirepass", secret], password=secret) as server:
        assert server.client().ping() is True
        anonymous = redis.Redis(port=server.port, socket_timeout=2, retry=no_retry())
        try:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        finally:
            anonymous.close()
        server.set_maxmemory(0)  # admin helpers authenticate too


def test_bad_arguments_fail_with_the_log() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)did not become ready.*no-such-option"):
        RedisServer(extra_args=["--no-such-option", "1"])


def test_fixed_port_in_use_fails_fast(private_redis: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="could not bind"):
        RedisServer(port=private_redis.port, startup_timeout=5)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535


def test_namespace_fixture_format(namespace: str) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", namespace)
    assert namespace.startswith("t-")


def test_delete_namespace_removes_exactly_the_namespace(redis_client: redis.Redis) -> None:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    inside = [f"oqron:{ns}:k{i}" for i in range(2500)]  # more than one SCAN/UNLINK batch
    siblings = [
        f"oqron:{ns}x:k",  # namespace whose name starts with ours
        f"oqron:{ns}",  # no trailing colon
        f"other:{ns}:k",
    ]
    try:
        with redis_client.pipeline(transaction=False) as pipe:
            for key in inside + siblings:
                pipe.set(key, b"1", ex=300)
            pipe.execute()

        assert delete_namespace(redis_client, ns) == len(inside)

        assert list(redis_client.scan_iter(match=f"oqron:{ns}:*", count=1000)) == []
        assert redis_client.exists(*siblings) == len(siblings)
        assert delete_namespace(redis_client, ns) == 0
    finally:
        redis_client.unlink(*siblings, *inside)


def test_delete_namespace_rejects_glob_patterns(redis_client: redis.Redis) -> None:
    for bad in ["*", "a*", "a?b", "[ab]", "", "x" * 65, "a:b"]:
        with pytest.raises(ValueError, match="invalid namespace"):
            delete_namespace(redis_client, bad)
