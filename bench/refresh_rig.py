"""The set-up the multi-process refresh benchmarks share (expired_stampede, refresh_visible).

:func:`refresh_rig` starts a fresh namespace, one Celery worker (:class:`bench.procs.CeleryWorker`)
and ``processes`` web processes (:class:`bench.refresh_web.Web`), then gets every library's keys
to the moment a benchmark starts from: written once, read by every process while fresh (oqron:
into each L1), counted, and stale. Then each process refreshes one key of its own: a process's
first refresh opens its broker connection (tens of ms), which a service does once in its life,
not per refresh.

Keys are ``<library>-<label>``, one per label (a run or a round, ``"w"`` for the warm-up) plus
``<library>-p<i>`` for process ``i``'s own refresh.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from oqron_cache.redis.replies import as_bytes

from .common import bench_namespace
from .procs import CeleryWorker, Pool
from .refresh_caches import TTL, counter_key
from .refresh_web import Web

NO_STORE = ("floor",)  # libraries with nothing to write: a dict in each process


@dataclass
class Rig:
    """What a benchmark's rounds use: the processes and the state of the keys before them."""

    client: Any  # a redis.Redis on the cache's Redis
    namespace: str
    worker: CeleryWorker
    pool: Pool
    gens: dict[str, dict[str, int]]  # library -> key -> the generation every process holds
    baseline: dict[str, int]  # key -> resolver calls counted before the rounds

    @staticmethod
    def key(library: str, label: str) -> str:
        return f"{library}-{label}"

    def calls(self, key: str) -> int:
        """Resolver calls of ``key`` since the rounds began."""
        count = int(self.client.get(counter_key(self.namespace, key)) or 0)
        return count - self.baseline[key]


@contextlib.contextmanager
def refresh_rig(
    url: str,
    *,
    libraries: Sequence[str],
    labels: Sequence[str],
    processes: int,
    sleep: float,
    worker_pool: str | None,
    watch_timeout: float,
    threads: int = 0,
) -> Iterator[Rig]:
    """The worker and web processes, every key written, warmed and stale (see the module)."""
    with (
        bench_namespace(url) as (client, namespace),
        CeleryWorker(
            url,
            namespace,
            resolver_sleep=sleep,
            extra_args=("--pool", worker_pool) if worker_pool else (),
        ) as worker,
    ):
        pool = Pool(
            Web,
            processes,
            url=url,
            namespace=namespace,
            broker_url=worker.broker_url,
            threads=threads,
            resolver_sleep=sleep,
        )
        try:
            own = [f"p{i}" for i in range(processes)]
            keys = {lib: [Rig.key(lib, x) for x in [*labels, *own]] for lib in libraries}
            gens = {
                lib: (
                    dict.fromkeys(keys[lib], 0)
                    if lib in NO_STORE
                    else pool.call_one(0, "prefill", lib, keys[lib])
                )
                for lib in libraries
            }
            written = time.monotonic()
            for lib in libraries:
                if any(pool.call("warm", lib, keys[lib], gens[lib])):
                    raise AssertionError(f"{lib}: a process read a wrong value while warming")
            baseline = {
                key: int(as_bytes(client.get(counter_key(namespace, key))) or 0)
                for lib in libraries
                for key in keys[lib]
            }
            time.sleep(max(0.0, written + TTL + 0.2 - time.monotonic()))  # all stale now
            for lib in libraries:
                for i in range(0 if lib in NO_STORE else processes):
                    key = Rig.key(lib, own[i])
                    pool.call_one(i, "watch", lib, key, gens[lib][key], watch_timeout)
            yield Rig(client, namespace, worker, pool, gens, baseline)
        finally:
            pool.close()
