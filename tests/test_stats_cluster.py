"""Cluster-wide stats: counters from several processes add up in Redis (DESIGN section 6)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

from oqron_cache.config import current_runtime
from tests.redis_server import RedisServer

CHILD = textwrap.dedent(
    """
    import json, sys
    import oqron_cache
    url, ns, name, reads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    oqron_cache.configure(redis_url=url, namespace=ns)
    c = oqron_cache.cache(name, ttl="1m", resolver=lambda k: k.upper())
    for i in range(reads):
        c.get(f"k{i % 3}")
    print(json.dumps(c.get_stats(local=True)))
    oqron_cache.reset()  # flushes the last counters, as interpreter exit would
    """
)


def run_child(redis_url: str, namespace: str, name: str, reads: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, redis_url, namespace, name, str(reads)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/work/main",
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_three_processes_and_this_one_add_up(
    configured: str, redis_url: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(ttl="1m", resolver=lambda k: k.upper())
    children = [run_child(redis_url, configured, cache.name, reads) for reads in (10, 20, 30)]
    for i in range(5):
        cache.get(f"k{i % 3}")
    local = cache.get_stats(local=True)
    total = cache.get_stats()
    assert total["scope"] == "cluster" and local["scope"] == "local"
    assert total["gets"] == 10 + 20 + 30 + 5
    for field in ("gets", "misses", "hits", "resolver_calls", "l2_hits", "stampede_prevented"):
        assert total[field] == local[field] + sum(c[field] for c in children), field
    # the first process resolved k0..k2 once; everyone else found them in L2 or L1
    assert total["resolver_calls"] == 3
    assert total["hit_rate"] == total["hits"] / total["gets"]
    assert total["avg_latency_ms"]["redis"] > 0


def test_flusher_sends_counters_within_a_second(
    configured: str, make_cache: Callable[..., Any], redis_client: Any
) -> None:
    cache = make_cache(ttl="1m", resolver=str)
    cache.get("a")
    sync = current_runtime().stats_sync
    assert sync is not None
    sync.flush_all()
    key = f"oqron:{configured}:stats:{cache.name}"
    assert int(redis_client.hget(key, "gets")) == 1
    assert 0 < redis_client.ttl(key) <= 30 * 86400
    sync.flush_all()  # nothing new: nothing is counted twice
    assert int(redis_client.hget(key, "gets")) == 1


def test_redis_down_gives_local_stats_and_keeps_unsent_counts(
    private_redis: RedisServer, make_cache: Callable[..., Any]
) -> None:
    import oqron_cache

    oqron_cache.configure(redis_url=private_redis.url, namespace="s", op_timeout="100ms")
    try:
        cache = make_cache(ttl="1m", resolver=str)
        cache.get("a")
        current_runtime().stats_sync.flush_all()
        private_redis.kill()  # ... and the stats hash with it
        cache.get("b")
        stats = cache.get_stats()
        assert stats["scope"] == "local"
        assert stats["gets"] == 2
        private_redis.restart()
        deadline = time.monotonic() + 5
        while (stats := cache.get_stats())["scope"] != "cluster":
            assert time.monotonic() < deadline, "stats never reached the restarted Redis"
            time.sleep(0.05)  # the circuit breaker's cooldown
        # The restarted Redis is empty: it holds exactly the count made while it was down,
        # which was kept and sent late (not lost, not sent twice).
        assert stats["gets"] == 1
    finally:
        oqron_cache.reset()
