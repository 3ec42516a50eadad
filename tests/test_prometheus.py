"""The Prometheus exporter: counters and latency histograms by cache, tier and outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from oqron_cache.admin.prometheus import CacheCollector


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_reads_events_and_latency_are_exported_without_keys(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(ttl="1m", resolver=lambda k: {"v": k})
    for _ in range(3):
        cache.get("secret-user-key")
    registry = CollectorRegistry()
    registry.register(CacheCollector())
    text = scrape(registry)
    name = cache.name
    assert f'oqron_cache_reads_total{{cache="{name}",outcome="hit"}} 2.0' in text
    assert f'oqron_cache_reads_total{{cache="{name}",outcome="miss"}} 1.0' in text
    assert f'oqron_cache_events_total{{cache="{name}",event="resolver_calls"}} 1.0' in text
    assert f'oqron_cache_latency_seconds_count{{cache="{name}",tier="resolver"}} 1.0' in text
    assert f'oqron_cache_latency_seconds_bucket{{cache="{name}",le="+Inf",tier="redis"}}' in text
    assert "secret-user-key" not in text  # never a key as a label (cardinality, privacy)


def test_histogram_buckets_are_cumulative(configured: str, make_cache: Callable[..., Any]) -> None:
    cache = make_cache(ttl="1m")
    for seconds in (0.0005, 0.003, 0.2, 20.0):
        cache.stats.observe("resolver", seconds)
    buckets, total = cache.stats.histogram("resolver")
    counts = dict(buckets)
    assert counts["0.001"] == 1
    assert counts["0.005"] == 2
    assert counts["0.25"] == 3
    assert counts["10.0"] == 3
    assert counts["+Inf"] == 4
    assert total == 0.0005 + 0.003 + 0.2 + 20.0
