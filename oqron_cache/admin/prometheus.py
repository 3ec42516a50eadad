"""Optional Prometheus exporter (``pip install 'oqron-cache[prometheus]'``).

::

    from prometheus_client import start_http_server
    from oqron_cache.prometheus import register

    register()              # adds the collector to prometheus_client's default registry
    start_http_server(9100)

Metrics are this process's (Prometheus sums across processes itself) and are labelled by cache
name, tier and outcome only, never by key or tag (unbounded cardinality, personal data):

* ``oqron_cache_reads_total{cache, outcome}``: outcome ``hit`` or ``miss``.
* ``oqron_cache_events_total{cache, event}``: the other counters of ``get_stats()``
  (``stale_served``, ``refreshes_enqueued``, ``l2_errors``, ...).
* ``oqron_cache_latency_seconds{cache, tier}``: a histogram per tier (memory, redis, resolver);
  one L1 hit in 16 is timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..core.metrics import COUNTERS, TIERS
from ..engine import registry as caches

try:
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "oqron_cache.prometheus needs prometheus_client: pip install 'oqron-cache[prometheus]'"
    ) from exc

_EVENTS = tuple(name for name in COUNTERS if name != "misses")


class CacheCollector:
    """A prometheus_client collector over every cache registered in this process."""

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (called by prometheus_client on each scrape)."""
        reads = CounterMetricFamily(
            "oqron_cache_reads", "Cache reads by outcome", labels=["cache", "outcome"]
        )
        events = CounterMetricFamily(
            "oqron_cache_events", "Cache events (see get_stats())", labels=["cache", "event"]
        )
        latency = HistogramMetricFamily(
            "oqron_cache_latency_seconds", "Latency per tier", labels=["cache", "tier"]
        )
        for cache in caches.all_caches():
            stats = cache.stats.snapshot()
            reads.add_metric([cache.name, "hit"], stats["hits"])
            reads.add_metric([cache.name, "miss"], stats["misses"])
            for event in _EVENTS:
                events.add_metric([cache.name, event], stats.get(event, 0))
            for tier in TIERS:
                buckets, total = cache.stats.histogram(tier)
                latency.add_metric([cache.name, tier], buckets, total)
        yield reads
        yield events
        yield latency


_registered: CacheCollector | None = None


def register(registry: Any = None) -> CacheCollector:
    """Add the collector to ``registry`` (default: prometheus_client's); idempotent."""
    global _registered  # noqa: PLW0603 - one collector per process
    if _registered is None:
        _registered = CacheCollector()
        (registry or REGISTRY).register(_registered)
    return _registered
