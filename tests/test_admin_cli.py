"""The admin commands (``stats``, ``invalidate``, ``inspect``) against the real Redis.

Most tests call :func:`oqron_cache.admin.main` in this process (the command builds its own Redis
client and never touches this process's configuration, so a cache configured here plays the
application). A few run ``python -m oqron_cache.admin`` as a user would: Ctrl-C on ``--watch``,
and the one-line message when Redis is unreachable. ``--via-celery`` sends to a private
redis-server used as the broker; the queued messages are read back from it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

import oqron_cache
from oqron_cache.admin import commands as admin
from oqron_cache.celery import tasks
from oqron_cache.config import current_runtime
from oqron_cache.core.entry import Entry, pack, unpack
from oqron_cache.core.keys import KeySpace, stats_key
from tests.redis_server import RedisServer, delete_namespace

ROOT = Path(__file__).resolve().parent.parent
DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1
L1_NOTE = "L1: per process (not visible from here)"

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``run(*argv)`` -> (exit code, stdout, stderr) of ``admin.main`` in this process."""
    for name in ("OQRON_REDIS_URL", "OQRON_NAMESPACE", "OQRON_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)

    def call(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = admin.main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return call


def run_module(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m oqron_cache.admin ARGV`` with no OQRON_* environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    return subprocess.run(
        [sys.executable, "-m", "oqron_cache.admin", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def conn(redis_url: str, namespace: str) -> list[str]:
    return ["--redis-url", redis_url, "--namespace", namespace]


def in_l2(client: redis.Redis, namespace: str, cache: Any, key: str) -> bool:
    """Does L2 hold a (non-tombstone) entry of ``key``?"""
    raw = cast(
        "bytes | None",
        client.get(KeySpace(namespace, cache.name, cache.options.max_key_bytes).value(key)),
    )
    return raw is not None and not unpack(raw)[0].tombstone


def in_l1(cache: Any, key: str) -> bool:
    return cache.stack.l1.get(key) is not None


@pytest.fixture
def other_namespace(redis_client: redis.Redis) -> Iterator[str]:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    yield ns
    delete_namespace(redis_client, ns)


@pytest.fixture(scope="module")
def broker() -> Iterator[RedisServer]:
    """A private redis-server as the Celery broker (never the shared Redis)."""
    with RedisServer() as server:
        yield server


# ------------------------------------------------------------------ help and usage


def test_help_of_every_command_documents_options_and_exit_codes(run: Run) -> None:
    code, out, _ = run("--help")
    assert code == 0
    for command in ("stats", "invalidate", "inspect"):
        assert command in out
    for command, options in {
        "stats": ["--json", "--watch", "--redis-url", "--namespace", "$OQRON_REDIS_URL"],
        "invalidate": ["--key", "--pattern", "--tag", "--all", "--via-celery", "--broker"],
        "inspect": ["--value", "--json", "--max-key-bytes", "freshness"],
    }.items():
        code, out, _ = run(command, "--help")
        assert code == 0
        for option in options:
            assert option in out, (command, option)
        assert "exit codes:" in out
        for exit_code in ("0  done", "1  ", "2  usage error", "3  "):
            assert exit_code in out
        assert "--iterations" not in out  # test-only options stay hidden
        assert "--interval" not in out


def test_add_commands_plugs_into_another_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="oqron-cache")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("version")
    admin.add_commands(commands)
    args = parser.parse_args(["stats", "--redis-url", DEAD])
    assert args.func(args) == 3
    assert capsys.readouterr().err.startswith("oqron-cache stats: Redis at redis://127.0.0.1:1/0")
    assert parser.parse_args(["version"]).command == "version"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nope"],
        ["stats", "--timeout", "0"],
        ["stats", "bad name!"],
        ["stats", "--namespace", "bad ns"],
        ["stats", "--redis-url", "http://127.0.0.1:6379"],
        ["stats", "--redis-url", "127.0.0.1:6379"],
        ["invalidate", "c"],  # no --key/--pattern/--tag
        ["invalidate", "c", "--key", "k", "--tag", "t"],
        ["invalidate", "c", "--key", ""],
        ["invalidate", "c", "--pattern", ""],
        ["invalidate", "c", "--pattern", "[ab"],
        ["invalidate", "c", "--pattern", "*"],  # the whole cache needs --all
        ["invalidate", "c", "--pattern", "**"],
        ["invalidate", "c", "--pattern", "*", "--all", "--via-celery"],
        ["invalidate", "c", "--tag", ""],
        ["invalidate", "c", "--tag", "t" * 257],
        ["invalidate", "c", "--key", "k", "--max-key-bytes", "8"],
        ["invalidate", "c", "--key", "k", "--via-celery", "--broker", "nosuchtransport://x"],
        ["inspect", "c"],
        ["inspect", "c", ""],
        ["inspect", "bad/name", "k"],
    ],
)
def test_usage_errors_exit_2_with_a_message_and_no_redis_call(run: Run, argv: list[str]) -> None:
    # DEAD: a usage error must be found before connecting (else this would be exit 3).
    extra = (
        ["--redis-url", DEAD] if argv and argv[0] != "nope" and "--redis-url" not in argv else []
    )
    code, out, err = run(*argv, *extra)
    assert code == 2, (argv, out, err)
    assert "error:" in err
    assert "unreachable" not in err


def test_pattern_usage_errors_name_the_fix(run: Run) -> None:
    _, _, err = run("invalidate", "c", "--pattern", "*", "--redis-url", DEAD)
    assert "--all" in err and "whole cache 'c'" in err
    _, _, err = run("invalidate", "c", "--pattern", "*", "--all", "--via-celery")
    assert "drop --via-celery" in err


# ------------------------------------------------------------------ Redis unreachable


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["stats", "c", "--json"],
        ["stats", "--watch", "--iterations", "2"],
        ["invalidate", "c", "--key", "k"],
        ["invalidate", "c", "--pattern", "k*"],
        ["invalidate", "c", "--tag", "t"],
        ["inspect", "c", "k"],
        ["invalidate", "c", "--tag", "t", "--via-celery"],  # broker = --redis-url
    ],
)
def test_unreachable_redis_is_exit_3_and_one_line(run: Run, argv: list[str]) -> None:
    url = "redis://admin:s3cret@127.0.0.1:1/0"
    code, out, err = run(*argv, "--redis-url", url)
    assert code == 3, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "unreachable" in err
    assert "127.0.0.1:1" in err
    assert "s3cret" not in err  # the password is masked


def test_unreachable_redis_from_a_real_process_prints_one_line(redis_url: str) -> None:
    result = run_module("inspect", "products", "sku-1", "--redis-url", DEAD)
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "oqron-cache inspect: Redis at redis://127.0.0.1:1/0 is unreachable"
    )


def test_unreachable_broker_is_exit_3(run: Run, redis_url: str) -> None:
    code, out, err = run(
        "invalidate", "c", "--key", "k", "--via-celery", "--broker", DEAD, "--redis-url", redis_url
    )
    assert code == 3
    assert out == ""
    assert err.strip() == err.strip().splitlines()[0]
    assert "broker at redis://127.0.0.1:1/0 is unreachable" in err


# ------------------------------------------------------------------ stats


def test_stats_of_one_cache_match_what_the_cache_did(
    run: Run, configured: str, redis_url: str, make_cache: Callable[..., Any]
) -> None:
    calls: list[str] = []

    def resolver(key: str) -> str:
        calls.append(key)
        return key.upper()

    products = make_cache(ttl="30s", resolver=resolver)
    for key in ("a", "b", "c"):
        assert products.get(key) == key.upper()  # 3 misses, 3 resolver calls
    for _ in range(4):
        products.get("a")  # 4 L1 hits
    products.set("d", "D")
    products.delete("b")
    current_runtime().stats_sync.flush_all()
    local = products.get_stats(local=True)

    code, out, err = run("stats", products.name, "--json", *conn(redis_url, configured))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["namespace"] == configured
    assert doc["cache"] == products.name
    stats = doc["stats"]
    assert stats["scope"] == "cluster"
    expected = {"gets": 7, "hits": 4, "misses": 3, "resolver_calls": 3, "sets": 1, "deletes": 1}
    assert {field: stats[field] for field in expected} == expected
    assert stats["hit_rate"] == pytest.approx(4 / 7)
    assert len(calls) == 3
    for field, value in local.items():  # one process: the cluster view is this process's
        if field not in ("scope", "avg_latency_ms", "writes_pending"):  # a process's gauge
            assert stats[field] == value, field
    assert stats["avg_latency_ms"]["resolver"] > 0

    code, out, _ = run("stats", products.name, *conn(redis_url, configured))
    assert code == 0
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert lines["gets"] == "7"
    assert lines["hits"] == "4"
    assert lines["misses"] == "3"
    assert lines["hit_rate"] == "57.1%"
    assert lines["resolver_calls"] == "3"
    assert "avg_latency_ms.resolver" in lines


def test_stats_table_lists_the_caches_of_its_namespace_only(
    run: Run,
    configured: str,
    other_namespace: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    first = make_cache(name=f"a-{uuid.uuid4().hex[:6]}", ttl="30s", resolver=str.upper)
    second = make_cache(name=f"b-{uuid.uuid4().hex[:6]}", ttl="30s", resolver=str.upper)
    first.get("x")
    first.get("x")
    for key in "pqrs":
        second.get(key)
    current_runtime().stats_sync.flush_all()
    # A cache of another namespace (an application the command was not pointed at).
    redis_client.hset(stats_key(other_namespace, "elsewhere"), mapping={"gets": 9, "misses": 1})

    code, out, err = run("stats", *conn(redis_url, configured))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    header, body = rows[0], rows[1:]
    assert header[:3] == ["cache", "gets", "hit"]
    assert [row[0] for row in body] == [first.name, second.name]  # sorted by name
    assert body[0][1:4] == ["2", "50.0%", "1"]  # gets, hit rate, misses
    assert body[1][1:4] == ["4", "0.0%", "4"]

    code, out, _ = run("stats", "--json", *conn(redis_url, configured))
    assert code == 0
    doc = json.loads(out)
    assert sorted(doc["caches"]) == [first.name, second.name]
    assert doc["caches"][first.name]["hits"] == 1

    code, out, _ = run("stats", "--json", *conn(redis_url, other_namespace))
    assert code == 0
    assert json.loads(out)["caches"]["elsewhere"]["gets"] == 9


def test_stats_found_nothing_is_exit_1(run: Run, redis_url: str, namespace: str) -> None:
    code, out, err = run("stats", *conn(redis_url, namespace))
    assert code == 1
    assert out == ""
    assert f"no stats for any cache in namespace {namespace!r}" in err
    code, out, err = run("stats", "ghost", "--json", *conn(redis_url, namespace))
    assert code == 1
    assert json.loads(out) == {"namespace": namespace, "cache": "ghost", "stats": None}
    assert "no stats for cache 'ghost'" in err


def test_stats_watch_redraws_until_its_iterations(
    run: Run, configured: str, redis_url: str, make_cache: Callable[..., Any]
) -> None:
    products = make_cache(ttl="30s", resolver=str.upper)
    products.get("x")
    current_runtime().stats_sync.flush_all()
    base = ["stats", "--watch", "--interval", "0.05", *conn(redis_url, configured)]

    code, out, err = run(*base, "--iterations", "3")
    assert code == 0, err
    frames = out.split("Ctrl-C to stop\n")[1:]
    assert len(frames) == 3
    assert "gets/s" in frames[0]
    first_row = next(line for line in frames[0].splitlines() if line.startswith(products.name))
    assert first_row.split()[1:3] == ["1", "-"]  # no rate before a second frame
    later_row = next(line for line in frames[2].splitlines() if line.startswith(products.name))
    assert later_row.split()[1:3] == ["1", "0.0"]

    code, out, _ = run(*base, "--iterations", "2", "--json")
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert len(docs) == 2
    assert all(doc["caches"][products.name]["gets"] == 1 for doc in docs)

    code, out, _ = run(*base, products.name, "--iterations", "1")
    assert code == 0
    assert f"cache {products.name} (namespace {configured})" in out


def test_stats_watch_ends_on_ctrl_c_with_exit_0(redis_url: str, namespace: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oqron_cache.admin",
            "stats",
            "--watch",
            *conn(redis_url, namespace),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # the first frame is drawn: the loop is running
        assert "Ctrl-C to stop" in first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err == ""
    assert "Traceback" not in out


# ------------------------------------------------------------------ invalidate (Redis)


def test_invalidate_key_drops_l2_and_every_l1(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    users = make_cache(ttl="1m")
    neighbour = make_cache(ttl="1m")  # same keys, another cache: untouched
    for key in ("u1", "u2", "u3"):
        users.set(key, key)
        neighbour.set(key, key)
    assert in_l1(users, "u1")

    code, out, err = run("invalidate", users.name, "--key", "u1", *conn(redis_url, configured))
    assert code == 0, err
    assert out.strip() == (
        f"cache {users.name}: deleted key 'u1' from L2; every process's L1 was told to drop them"
    )
    assert not in_l2(redis_client, configured, users, "u1")
    wait_until(lambda: not in_l1(users, "u1"), what="this process's L1 to drop u1 (bus)")
    assert users.get("u1") is None
    assert users.get("u2") == "u2"
    assert in_l2(redis_client, configured, users, "u3")
    assert all(neighbour.get(key) == key for key in ("u1", "u2", "u3"))
    assert all(in_l2(redis_client, configured, neighbour, key) for key in ("u1", "u2", "u3"))

    code, out, err = run("invalidate", users.name, "--key", "u1", *conn(redis_url, configured))
    assert code == 1
    assert out == ""
    assert "no entry had key 'u1'" in err

    code, out, err = run(
        "invalidate", users.name, "--key", "u2", "--key", "gone", *conn(redis_url, configured)
    )
    assert code == 0, err
    assert "deleted 1 of 2 keys" in out
    assert not in_l2(redis_client, configured, users, "u2")
    assert in_l2(redis_client, configured, users, "u3")


def test_invalidate_long_key_needs_the_apps_max_key_bytes(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    short = make_cache(ttl="1m", max_key_bytes=32)
    key = "k" * 40  # stored hashed: longer than 32
    short.set(key, 1)
    code, _, _ = run("invalidate", short.name, "--key", key, *conn(redis_url, configured))
    assert code == 1  # looked for the escaped form (the default max_key_bytes, 200)
    assert in_l2(redis_client, configured, short, key)
    code, _, err = run(
        "invalidate",
        short.name,
        "--key",
        key,
        "--max-key-bytes",
        "32",
        *conn(redis_url, configured),
    )
    assert code == 0, err
    assert not in_l2(redis_client, configured, short, key)


def test_invalidate_pattern_removes_exactly_the_matches(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    items = make_cache(ttl="1m")
    neighbour = make_cache(ttl="1m")
    keys = ["user:1", "user:2", "user:10", "item:1", "user*x", "user?"]
    for key in keys:
        items.set(key, key)
        neighbour.set(key, key)
    args = conn(redis_url, configured)

    code, out, err = run("invalidate", items.name, "--pattern", "user:?", *args)
    assert code == 0, err
    assert "deleted 2 entries matching 'user:?'" in out
    left = {k for k in keys if in_l2(redis_client, configured, items, k)}
    assert left == {"user:10", "item:1", "user*x", "user?"}
    wait_until(lambda: not in_l1(items, "user:1") and not in_l1(items, "user:2"), what="L1 drop")

    code, out, err = run("invalidate", items.name, "--pattern", r"user\*x", *args)  # literal star
    assert code == 0, err
    assert "deleted 1 entry" in out
    assert {k for k in keys if in_l2(redis_client, configured, items, k)} == {
        "user:10",
        "item:1",
        "user?",
    }

    code, _, err = run("invalidate", items.name, "--pattern", "nomatch*", *args)
    assert code == 1
    assert "no entry matched 'nomatch*'" in err

    code, _, _ = run("invalidate", items.name, "--pattern", "*", *args)
    assert code == 2  # refused without --all: nothing was touched
    assert {k for k in keys if in_l2(redis_client, configured, items, k)} == {
        "user:10",
        "item:1",
        "user?",
    }
    code, out, err = run("invalidate", items.name, "--pattern", "*", "--all", *args)
    assert code == 0, err
    assert "deleted 3 entries" in out
    assert not any(in_l2(redis_client, configured, items, k) for k in keys)
    assert all(in_l2(redis_client, configured, neighbour, k) for k in keys)  # confined


def test_invalidate_tag_removes_exactly_the_tagged_entries(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    tenants = {"a": "acme", "b": "acme", "c": "globex", "d": "acme*"}
    products = make_cache(
        ttl="1m", resolver=lambda key: key * 2, tags=lambda key, value: [f"tenant:{tenants[key]}"]
    )
    for key in tenants:
        products.get(key)
    args = conn(redis_url, configured)

    code, out, err = run("invalidate", products.name, "--tag", "tenant:acme", *args)
    assert code == 0, err
    assert "deleted 2 entries tagged 'tenant:acme'" in out
    assert {k for k in tenants if in_l2(redis_client, configured, products, k)} == {"c", "d"}
    wait_until(lambda: not in_l1(products, "a") and not in_l1(products, "b"), what="L1 drop")
    assert in_l1(products, "c")

    code, _, err = run("invalidate", products.name, "--tag", "tenant:acme", *args)
    assert code == 1
    assert "no entry carried tag 'tenant:acme'" in err
    code, _, _ = run("invalidate", products.name, "--tag", "tenant:*", *args)
    assert code == 1  # a tag is literal, never a pattern
    code, out, _ = run("invalidate", products.name, "--tag", "tenant:acme*", *args)
    assert code == 0
    assert "deleted 1 entry tagged" in out
    assert {k for k in tenants if in_l2(redis_client, configured, products, k)} == {"c"}


def test_invalidate_pattern_matching_only_deleted_keys_matched_nothing(
    run: Run, configured: str, redis_url: str, make_cache: Callable[..., Any]
) -> None:
    users = make_cache(ttl="1m")
    users.set("k1", 1)
    users.delete("k1")  # leaves a tombstone under the value key
    code, _, err = run("invalidate", users.name, "--pattern", "k*", *conn(redis_url, configured))
    assert code == 1, err


@pytest.mark.parametrize("target", [["--key", "k"], ["--pattern", "k*"], ["--tag", "t"]])
def test_invalidate_refused_by_a_read_only_redis_is_exit_3_and_one_line(
    run: Run, private_redis: RedisServer, target: list[str]
) -> None:
    private_redis.make_readonly()  # PING and reads work; every write fails with READONLY
    code, out, err = run("invalidate", "c", *target, "--redis-url", private_redis.url)
    assert code == 3
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert "failed during the invalidation (refused: ReadOnlyError: You can't write" in err
    assert "it may be partial" in err


def test_invalidate_does_not_touch_this_process_configuration(
    run: Run, configured: str, redis_url: str, make_cache: Callable[..., Any]
) -> None:
    users = make_cache(ttl="1m")
    users.set("k", 1)
    runtime = current_runtime()
    code, _, _ = run("invalidate", users.name, "--key", "k", *conn(redis_url, configured))
    assert code == 0
    assert current_runtime() is runtime
    registered: Any = oqron_cache.engine.registry.lookup(users.name)
    assert registered is users  # the stand-in never registers
    users.set("k", 2)
    assert users.get("k") == 2


# ------------------------------------------------------------------ invalidate --via-celery


def queued(broker: RedisServer, queue: str = "celery") -> list[dict[str, Any]]:
    """The task messages waiting in ``queue`` (oldest first), decoded."""
    client = broker.client()
    try:
        raw = cast("list[bytes]", client.lrange(queue, 0, -1))
    finally:
        client.close()
    out = []
    for item in reversed(raw):  # kombu LPUSHes; consumers BRPOP the oldest
        message = json.loads(item)
        body = json.loads(base64.b64decode(message["body"]))
        out.append({"task": message["headers"]["task"], "args": body[0], "message": message})
    return out


def test_via_celery_sends_each_task_by_name_to_the_broker(
    run: Run,
    broker: RedisServer,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    broker.flushall()
    products = make_cache(ttl="1m", resolver=str.upper, tags=lambda key, value: [f"t:{key[0]}"])
    for key in ("a1", "a2", "b1", "c1", "c2"):
        products.get(key)
    via = ["--via-celery", "--broker", broker.url, *conn(DEAD, configured)]  # no Redis needed

    code, out, err = run("invalidate", products.name, "--key", "a1", "--key", "b1", *via)
    assert code == 0, err
    assert out.startswith("sent oqron_cache.invalidate ")
    assert "queue celery" in out
    code, _, err = run("invalidate", products.name, "--pattern", "c*", *via)
    assert code == 0, err
    code, _, err = run("invalidate", products.name, "--tag", "t:a", *via)
    assert code == 0, err

    messages = queued(broker)
    assert [(m["task"], m["args"]) for m in messages] == [
        (tasks.INVALIDATE_TASK, [products.name, ["a1", "b1"]]),
        (tasks.INVALIDATE_PATTERN_TASK, [products.name, "c*"]),
        (tasks.INVALIDATE_TAG_TASK, [products.name, "t:a"]),
    ]
    for message in messages:
        assert message["message"]["content-type"] == "application/json"
        assert message["message"]["properties"]["delivery_info"]["routing_key"] == "celery"
    assert str(messages[0]["message"]["headers"]["id"]) in out

    # What a worker would run with those arguments drops exactly those entries.
    for message in messages:
        body = {
            tasks.INVALIDATE_TASK: tasks.do_invalidate,
            tasks.INVALIDATE_PATTERN_TASK: tasks.do_invalidate_pattern,
            tasks.INVALIDATE_TAG_TASK: tasks.do_invalidate_by_tag,
        }[message["task"]]
        body(*message["args"])
    assert not any(in_l2(redis_client, configured, products, k) for k in ("a1", "a2", "b1", "c1"))
    assert not in_l2(redis_client, configured, products, "c2")
    broker.flushall()


def test_via_celery_broker_from_env_then_redis_url_and_queue_option(
    run: Run, broker: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.flushall()
    code, _, err = run("invalidate", "c", "--tag", "t", "--via-celery", "--redis-url", broker.url)
    assert code == 0, err  # no --broker, no $OQRON_BROKER_URL: the Redis URL is the broker
    monkeypatch.setenv("OQRON_BROKER_URL", broker.url)
    code, _, err = run(
        "invalidate", "c", "--key", "k", "--via-celery", "--redis-url", DEAD, "--queue", "ops"
    )
    assert code == 0, err
    assert [m["task"] for m in queued(broker)] == [tasks.INVALIDATE_TAG_TASK]
    assert [m["args"] for m in queued(broker, "ops")] == [["c", ["k"]]]
    broker.flushall()


# ------------------------------------------------------------------ inspect


def stored(client: redis.Redis, namespace: str, cache: Any, key: str) -> bytes:
    raw = cast(
        "bytes | None",
        client.get(KeySpace(namespace, cache.name, cache.options.max_key_bytes).value(key)),
    )
    assert raw is not None
    return raw


def test_inspect_fresh_entry(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    products = make_cache(
        ttl="30s",
        stale_ttl="1h",
        resolver=lambda key: {"sku": key, "price": 12.5},
        tags=lambda key, value: ["tenant:acme", f"sku:{key}"],
    )
    products.get("sku-1")
    raw = stored(redis_client, configured, products, "sku-1")
    entry, _, payload = unpack(raw)
    args = ["inspect", products.name, "sku-1", *conn(redis_url, configured)]

    code, out, err = run(*args, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["found"] is True
    assert doc["state"] == "fresh"
    assert doc["version"] == entry.version.hex()
    assert doc["tags"] == ["tenant:acme", "sku:sku-1"]
    assert doc["size_bytes"] == len(raw)
    assert doc["value_bytes"] == len(payload)
    assert doc["codec"] == "json"
    assert doc["fresh_until"] == entry.fresh_until
    assert doc["stale_until"] == entry.stale_until
    assert 0 <= doc["age_s"] < 10
    assert 3590 < doc["redis_ttl_s"] <= 3630  # physical expiry: ttl + stale_ttl
    assert doc["tiers"] == {"l2": True, "l1": "per process (not visible from here)"}
    assert doc["lock_ttl_s"] is None
    assert "value" not in doc  # not decoded unless asked
    assert doc["redis_key"] == f"oqron:{configured}:{{{products.name}:sku-1}}:v"

    code, out, _ = run(*args, "--value")
    assert code == 0
    fields = text_fields(out)
    assert fields["freshness"] == "fresh"
    assert fields["version"] == entry.version.hex()
    assert fields["tags"] == "tenant:acme, sku:sku-1"
    assert fields["codec"] == "json (id 1)"
    assert fields["tiers"] == f"L2: yes; {L1_NOTE}"
    assert "(in " in fields["fresh_until"] and "(in " in fields["stale_until"]
    assert "ago)" in fields["created"]
    assert json.loads(fields["value"]) == {"sku": "sku-1", "price": 12.5}

    code, out, _ = run(*args, "--json", "--value")
    assert json.loads(out)["value"] == {"sku": "sku-1", "price": 12.5}


def text_fields(out: str) -> dict[str, str]:
    """``inspect``'s text output as {label: text}."""
    return {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in out.splitlines()}


def test_inspect_stale_and_expired_entries(
    run: Run, configured: str, redis_url: str, make_cache: Callable[..., Any], clock: Any
) -> None:
    # The entries' clock runs behind the command's: they were written "in the past".
    clock.now = time.time() - 100.5  # half a second of slack for the relative times below
    products = make_cache(ttl="30s", stale_ttl="1h", clock=clock)
    products.set("stale", 1)
    short = make_cache(ttl="10s", stale_ttl="20s", clock=clock)
    short.set("expired", 2)  # stale_until = 70 s ago; Redis keeps it 30 s from now
    args = conn(redis_url, configured)

    code, out, _ = run("inspect", products.name, "stale", "--json", *args)
    assert code == 0
    doc = json.loads(out)
    assert doc["state"] == "stale"
    assert 99 < doc["age_s"] < 110
    code, out, _ = run("inspect", products.name, "stale", *args)
    fields = text_fields(out)
    assert fields["freshness"] == "stale"
    assert fields["fresh_until"].endswith("(1m10s ago)")
    assert fields["stale_until"].endswith("(in 58m49s)")

    code, out, _ = run("inspect", short.name, "expired", "--json", *args)
    assert code == 0  # it is still in Redis: shown, but never served again
    assert json.loads(out)["state"] == "expired"
    code, out, _ = run("inspect", short.name, "expired", *args)
    assert text_fields(out)["freshness"].startswith("expired (never served again")


def test_inspect_missing_deleted_and_corrupt_entries_are_exit_1(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    users = make_cache(ttl="1m")
    args = conn(redis_url, configured)

    code, out, err = run("inspect", users.name, "nobody", *args)
    assert code == 1
    assert out == ""
    assert "key 'nobody' is not in L2" in err
    code, out, _ = run("inspect", users.name, "nobody", "--json", *args)
    assert code == 1
    doc = json.loads(out)
    assert (doc["found"], doc["state"], doc["tiers"]["l2"]) == (False, "absent", False)

    users.set("gone", 1)
    users.delete("gone")
    code, out, err = run("inspect", users.name, "gone", "--json", *args)
    assert code == 1
    assert json.loads(out)["state"] == "deleted"
    assert "was deleted" in err

    redis_client.set(KeySpace(configured, users.name, 200).value("junk"), b"\x80not ours")
    code, out, err = run("inspect", users.name, "junk", "--json", *args)
    assert code == 1
    assert json.loads(out)["state"] == "corrupt"
    assert "not an oqron envelope" in err


def test_inspect_value_that_does_not_decode_is_exit_1(
    run: Run, configured: str, redis_url: str, redis_client: redis.Redis
) -> None:
    keyspace = KeySpace(configured, "raw", 200)
    now = time.time()
    entry = Entry(None, now, now + 60, now + 60, b"\x01" * 8, ("t",))
    redis_client.set(keyspace.value("bad-json"), pack(entry, 1, b"{not json"), px=60_000)
    redis_client.set(keyspace.value("codec-9"), pack(entry, 9, b"?"), px=60_000)
    args = conn(redis_url, configured)

    code, out, _ = run("inspect", "raw", "bad-json", *args)
    assert code == 0  # the envelope is fine; the value is only decoded when asked
    assert text_fields(out)["version"] == "01" * 8
    code, out, _ = run("inspect", "raw", "bad-json", "--value", "--json", *args)
    assert code == 1
    doc = json.loads(out)
    assert doc["state"] == "corrupt"
    assert doc["value_error"].startswith("cannot decode with json: JSONDecodeError")
    code, out, _ = run("inspect", "raw", "codec-9", "--value", *args)
    assert code == 1
    fields = text_fields(out)
    assert fields["codec"] == "unknown (id 9)"
    assert fields["value"] == "cannot decode: codec id 9 is not known here"


def test_inspect_msgpack_value_hashed_key_and_held_lock(
    run: Run,
    configured: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_cache: Callable[..., Any],
) -> None:
    blobs = make_cache(ttl="1m", codec="msgpack", max_key_bytes=32)
    key = "blob-" + "x" * 40  # longer than max_key_bytes: stored under its SHA-256
    blobs.set(key, {"data": b"\x00\xff", 7: "seven"})
    keyspace = KeySpace(configured, blobs.name, 32)
    redis_client.set(keyspace.lock(key), "token", px=5000)
    args = conn(redis_url, configured)

    code, _, _ = run("inspect", blobs.name, key, *args)
    assert code == 1  # the default max_key_bytes (200) looks for the escaped form
    code, out, err = run(
        "inspect", blobs.name, key, "--max-key-bytes", "32", "--json", "--value", *args
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["hashed_key"] is True
    assert doc["redis_key"] == keyspace.value(key)
    assert doc["codec"] == "msgpack"
    assert 0 < doc["lock_ttl_s"] <= 5
    assert doc["value"] == {"data": repr(b"\x00\xff"), "7": "seven"}  # JSON has no bytes
    code, out, _ = run("inspect", blobs.name, key, "--max-key-bytes", "32", "--value", *args)
    fields = text_fields(out)
    assert fields["value"] == "{'data': b'\\x00\\xff', 7: 'seven'}"
    assert fields["lock"].startswith("held, ")
    assert fields["redis key"].endswith("(hashed: longer than --max-key-bytes)")
