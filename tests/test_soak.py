"""The chaos soak (bench/soak.py): its parts, and a 60-second run whose zero columns must be 0.

The 60 s run starts its own servers (cache, broker and origin Redis), two ``celery -A workers
worker`` subprocesses and four web processes, injects faults on the schedule of seed 1 and
checks the recorded history (bench/history_check.py). The proxy and the schedule are tested on
their own first, so a failing soak is not a broken instrument.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from bench.proxy import Proxy
from bench.soak import parse_faults
from bench.soak_faults import KINDS, Fault, schedule
from tests.redis_server import RedisServer, no_retry

ROOT = Path(__file__).resolve().parent.parent
SOAK_SECONDS = 60
SOAK_SEED = 1


def test_the_proxy_forwards_and_injects_latency_stalls_and_resets(
    private_redis: RedisServer,
) -> None:
    proxy = Proxy(private_redis.port).start()
    client = redis.Redis(port=proxy.port, socket_timeout=0.5, retry=no_retry())
    try:
        assert client.ping()
        proxy.slow(0.1)
        started = time.monotonic()
        client.ping()
        assert time.monotonic() - started >= 0.2  # 0.1 s each way
        proxy.heal()
        proxy.stall()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        proxy.heal()
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started < 0.2
        assert proxy.drop() == 1
        pubsub = client.pubsub()
        pubsub.subscribe("ch")
        assert pubsub.get_message(timeout=1.0) is not None  # subscribed, through the proxy
        assert proxy.drop() >= 1
        with pytest.raises(redis.ConnectionError):
            pubsub.get_message(timeout=1.0)
        pubsub.close()
        private_redis.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        private_redis.restart()
        assert client.ping()
    finally:
        client.close()
        proxy.close()


def test_a_stall_of_half_the_connections_leaves_the_others_alone(
    private_redis: RedisServer,
) -> None:
    proxy = Proxy(private_redis.port).start()
    clients = [redis.Redis(port=proxy.port, socket_timeout=0.3, retry=no_retry()) for _ in range(8)]
    try:
        for client in clients:
            client.ping()
        stalled = proxy.stall(0.5, random.Random(4))
        assert 0 < stalled < 8
        answered = 0
        for client in clients:
            try:
                client.ping()
                answered += 1
            except redis.TimeoutError:
                pass
        assert answered == 8 - stalled
    finally:
        proxy.heal()
        for client in clients:
            client.close()
        proxy.close()


def test_the_schedule_is_seeded_and_covers_the_kinds() -> None:
    one = schedule(SOAK_SEED, SOAK_SECONDS)
    assert one == schedule(SOAK_SEED, SOAK_SECONDS)
    assert one != schedule(SOAK_SEED + 1, SOAK_SECONDS)
    assert len(one) >= 6 and len({f.kind for f in one}) >= 5
    assert all(f.at >= 4.0 and f.at + f.duration <= SOAK_SECONDS - 8.0 for f in one)
    ten_minutes = schedule(SOAK_SEED, 600)
    assert len(ten_minutes) >= 30
    assert {f.kind for f in ten_minutes} == set(KINDS)
    assert schedule(SOAK_SEED, 600, kinds=()) == []


def test_an_explicit_schedule_is_parsed_in_order() -> None:
    assert parse_faults("bus_kill@9, redis_pause@5:1.5,net_slow@12:2:0.08") == [
        Fault(5.0, "redis_pause", 1.5, 1.0),
        Fault(9.0, "bus_kill", 0.0, 1.0),
        Fault(12.0, "net_slow", 2.0, 0.08),
    ]
    assert parse_faults("") == []
    for bad in ("nope@1", "redis_pause", "redis_pause@1:2:3:4"):
        with pytest.raises(ValueError, match="bad fault"):
            parse_faults(bad)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_60_second_soak_serves_through_every_fault_and_breaks_no_promise(
    tmp_path: Path,
) -> None:
    summary_path = tmp_path / "summary.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench.soak",
            "--seconds", str(SOAK_SECONDS), "--seed", str(SOAK_SEED),
            "--json", str(summary_path), "--out", str(tmp_path / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert summary_path.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    table = run.stdout[-6000:]
    injected = sum(row["injected"] for row in summary["kinds"].values())
    assert injected >= 6 and len(summary["kinds"]) >= 5, table
    assert summary["web_exit_codes"] == [0, 0, 0, 0], table
    assert summary["calls"] > 5000 and summary["served"] > 0.99 * summary["calls"], table
    assert summary["zero"] == {
        "infra_errors": 0,
        "stale_overwrites": 0,
        "stale_reads": 0,
        "past_staleness_bound": 0,
        "lost_writes": 0,
        "stalled_reads": 0,
    }, table
