"""Fork safety under a real server: ``gunicorn --preload -w 2`` (DESIGN section 13, P11).

``tests/procs/fork_app.py`` configures oqron_cache and reads ``warm`` at import, in the master,
before gunicorn forks its two workers. Requests reach a chosen worker, or every worker, with
:meth:`Gunicorn.only` and :meth:`Gunicorn.each_worker` (a request held busy keeps its sync
worker from taking the next). Resolver runs are logged in Redis with their pid.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from oqron_cache.core.keys import stats_key
from oqron_cache.core.metrics import COUNTERS, view
from tests.procs.forking import Gunicorn, Origin
from tests.test_fork import wait_until

COUNTED = ("gets", *COUNTERS)


@pytest.fixture
def server(redis_url: str, namespace: str) -> Iterator[Gunicorn]:
    """gunicorn --preload -w 2 on a free port, in a fresh namespace; stopped afterwards."""
    started = Gunicorn(redis_url, namespace)
    try:
        yield started
    finally:
        started.stop()


def cluster_stats(client: redis.Redis, namespace: str) -> dict[str, Any]:
    """The counters every process flushed to Redis (what ``get_stats()`` reads)."""
    raw: dict[bytes, bytes] = client.hgetall(stats_key(namespace, "fork"))  # type: ignore[assignment]
    return view({k.decode(): float(v) for k, v in raw.items()})


def test_delete_in_one_worker_reaches_the_other(
    server: Gunicorn, redis_url: str, namespace: str
) -> None:
    origin = Origin(redis_url, namespace)
    master = server.proc.pid
    assert origin.runs() == [(master, "warm")]
    first = server.each_worker("/get", key="warm")
    again = server.each_worker("/get", key="warm")
    assert master not in first and set(again) == set(first)
    assert {a["value"] for a in (*first.values(), *again.values())} == {"warm#1"}
    deleter = server.call("/delete", key="warm")["pid"]
    assert deleter in first

    def all_changed() -> dict[int, Any] | None:
        values = {pid: a["value"] for pid, a in server.each_worker("/get", key="warm").items()}
        return values if "warm#1" not in values.values() else None

    values = wait_until(all_changed, 15.0, "the delete reaching every worker")
    assert set(values.values()) == {"warm#2"}, values
    runs = origin.runs()
    assert len(runs) == 2 and runs[1][0] in first, runs  # reloaded once, in a worker
    for pid in first:  # the first read came from L2 (L1 started empty), the second from L1
        assert (first[pid]["local"]["gets"], first[pid]["local"]["l2_hits"]) == (1, 1), first
        assert (again[pid]["local"]["gets"], again[pid]["local"]["l2_hits"]) == (2, 1), again


def test_stale_key_is_refreshed_in_each_worker(
    server: Gunicorn, redis_url: str, namespace: str
) -> None:
    origin = Origin(redis_url, namespace)
    master = server.proc.pid
    workers = sorted(server.each_worker("/ping"))
    for n, pid in enumerate(workers, start=1):
        server.call("/tick", seconds=20)  # every process's clock: "warm" is stale everywhere
        answer = server.only(pid, "/get", key="warm")
        assert answer["value"] == f"warm#{n}"  # served stale at once
        wait_until(lambda n=n: len(origin.runs()) == n + 1, 15.0, "the refresh")  # type: ignore[misc]
        assert origin.runs()[-1] == (pid, "warm")  # refreshed in that worker

        def everyone_fresh(n: int = n) -> bool:
            answers = server.each_worker("/get", key="warm").values()
            return all(a["value"] == f"warm#{n + 1}" for a in answers)

        wait_until(everyone_fresh, 15.0, "every worker reading the refreshed value")
    assert origin.runs() == [(master, "warm"), *((pid, "warm") for pid in workers)]


def test_counters_add_up_exactly(
    server: Gunicorn, redis_client: redis.Redis, namespace: str
) -> None:
    served: dict[int, int] = {}
    for key in ("warm", "warm", "a", "a", "b"):
        for pid in server.each_worker("/get", key=key):
            served[pid] = served.get(pid, 0) + 1
    server.call("/delete", key="a")
    for pid in server.each_worker("/get", key="a"):
        served[pid] = served.get(pid, 0) + 1
    final = server.each_worker("/stats")  # flushes both workers
    for pid, answer in final.items():
        assert answer["local"]["gets"] == served[pid], (pid, answer["local"])
    expected = 1 + sum(served.values())  # the master's one read at import
    wait_until(
        lambda: cluster_stats(redis_client, namespace)["gets"] >= expected,
        10.0,
        "the master's flush",
    )
    total = cluster_stats(redis_client, namespace)
    master = {"gets": 1, "misses": 1, "resolver_calls": 1}
    for field in COUNTED:
        parts = sum(answer["local"][field] for answer in final.values())
        assert total[field] == parts + master.get(field, 0), field
    assert server.stop() == 0  # workers exit (their atexit flushes run), then the master
    assert cluster_stats(redis_client, namespace) == total  # nothing flushed twice on exit
