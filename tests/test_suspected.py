"""The suspected defects of issue 10, each confirmed (and fixed) or ruled out by a test.

* a forged flood of ``clear`` (or pattern) bus messages: confirmed (each one walked all of L1,
  unbounded); now rate-limited: past the rate, L1 is cleared once and off for a moment;
* an oversize refresh result dropped silently and not throttled: confirmed (the lock was
  released, so every stale read ran the resolver again); now it keeps the lock as a failure does;
* a drainer thread dying on ``RuntimeError`` in ``Dispatcher._prune`` above 10k throttles:
  confirmed (copying the map while another drainer writes it raises "dictionary changed size
  during iteration", and the drainer died); now writes and pruning share a lock, and a drainer
  survives any bookkeeping error;
* a failed write-through cache step never retried, and counters flushed twice after a fork:
  see tests/test_write_through.py and tests/test_fork.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.config import current_runtime
from oqron_cache.core.flood import BURST
from oqron_cache.core.keys import bus_channel
from oqron_cache.engine.refresh import Dispatcher, plan_refresh
from oqron_cache.redis.bus import encode_message
from tests.conftest import FakeClock


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.01)
    return result


def test_a_flood_of_forged_clear_messages_is_rate_limited_and_serves_nothing_stale(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    cache = make_cache(tiers=[MemoryTier(max_size=5000, ttl="60s"), RedisTier(ttl="60s")])
    for i in range(2000):
        cache.set(f"k{i}", i)
    stack = cache.stack
    clears = {"n": 0}
    real_on_bus, real_flush = stack.on_bus, stack.flush_l1

    def on_bus(op: str, keys: list[str], from_self: bool) -> None:
        clears["n"] += op == "clear"
        real_on_bus(op, keys, from_self)

    def flush_l1() -> None:
        clears["n"] += 1
        real_flush()

    stack.on_bus = on_bus
    stack.flush_l1 = flush_l1
    forged = encode_message("forger", cache.name, "clear", [])
    flood = 2000
    pipe = redis_client.pipeline(transaction=False)
    for _ in range(flood):
        pipe.publish(bus_channel(configured), forged)
    pipe.execute()
    wait_until(
        lambda: cache.get_stats(local=True)["bus_floods"] >= flood - BURST - 10,
        10,
        "the bus to take the flood",
    )
    assert clears["n"] <= BURST + 5, f"{clears['n']} full clears for {flood} messages"
    # While L1 is off, reads come from L2 (always right) and nothing is put in L1.
    cache.set("k0", "new")
    assert cache.get("k0") == "new"
    assert cache.get("k1") == 1
    # ... and once the flood is over, L1 works again.
    time.sleep(1.1)
    assert cache.get("k2") == 2
    assert stack.l1.get("k2") is not None


def test_an_oversize_refresh_keeps_the_lock_as_a_throttle(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    clock = FakeClock()
    sizes = {"n": 10}
    runs = {"n": 0}

    def resolver(key: str) -> str:
        runs["n"] += 1
        return "x" * sizes["n"]

    cache = make_cache(
        tiers=[MemoryTier(max_size=10, ttl="10s"), RedisTier(ttl="10s")],
        stale_ttl="1h",
        max_value_bytes=100,
        resolver=resolver,
        clock=clock,
        stampede=Stampede(lock_ttl="30s"),
    )
    stack = cache.stack
    cache.get("k")
    seen = stack._read_l2("k").seen
    clock.tick(11)
    sizes["n"] = 1000  # the refreshed value no longer fits
    assert plan_refresh(stack, "k", seen) == "oversize"
    assert plan_refresh(stack, "k", seen) == "locked"  # throttled, in every process
    assert runs["n"] == 2
    assert cache.get("k") == "x" * 10  # the stale value stays served
    assert cache.get_stats(local=True)["refresh_failures"] == 1


def test_drainers_survive_many_throttles_pruned_concurrently(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """Above ``max_queue`` throttles every drainer prunes the map while others write it."""
    cache = make_cache(ttl="60s")
    stack = cache.stack
    dispatcher = Dispatcher(max_queue=50, threads=4)
    dispatcher.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn(offset: int) -> None:
        n = offset
        while not stop.is_set():
            try:  # what each drainer does after a throttled outcome
                dispatcher.throttle((stack.name, f"x{n}"), time.monotonic() + (n % 3) - 1)
            except BaseException as exc:
                errors.append(exc)
                return
            n += 4

    threads = [threading.Thread(target=churn, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(5)
    try:
        assert errors == []
        assert len(dispatcher._throttle) <= dispatcher.max_queue + 8
        assert all(thread.is_alive() for thread in dispatcher._threads)
    finally:
        dispatcher.stop()
    assert current_runtime().dispatcher is not dispatcher
