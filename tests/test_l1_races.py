"""Races between threads of one process over one key's L1 copy (issue 10, defects 5, 10, 12).

Each test pins one interleaving with a gate: a thread is stopped at a chosen point of its
read or write (after the real Redis call returned, or inside the L1 put), another thread runs
a whole operation, and the first goes on. Promises P5 (no stale overwrite) and P7 (L1 agrees
with what the process itself wrote or deleted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from oqron_cache import MemoryTier, RedisTier
from tests.conftest import FakeClock

STEP = 5.0  # seconds a gated thread may take before the test fails


class Gate:
    """Stops the thread that trips it until :meth:`open` (``tripped`` tells it arrived)."""

    def __init__(self) -> None:
        self.tripped = threading.Event()
        self._open = threading.Event()
        self.armed_for: int | None = None  # thread ident; None: not armed

    def arm(self, ident: int | None = None) -> None:
        self.armed_for = ident if ident is not None else -1

    def trip(self) -> None:
        armed = self.armed_for
        if armed is None or (armed != -1 and armed != threading.get_ident()):
            return
        self.armed_for = None
        self.tripped.set()
        if not self._open.wait(STEP):
            raise AssertionError("gate was never opened")

    def open(self) -> None:
        self._open.set()


def run(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def body() -> None:
        out.append(fn())

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open()


def two_tier() -> dict[str, Any]:
    return {"tiers": [MemoryTier(max_size=100, ttl="60s"), RedisTier(ttl="60s")]}


def test_delete_during_a_threads_l2_read_is_not_undone_in_l1(
    configured: str, make_cache: Callable[..., Any], gate: Gate
) -> None:
    """Defect 5: thread A reads the old value from L2; thread B deletes; A must not put it back."""
    cache = make_cache(**two_tier())
    cache.set("k", "old")
    stack = cache.stack
    stack.l1.discard("k")  # A's read must go to L2
    l2 = stack.l2
    real_read = l2.read

    def read(key: str) -> bytes | None:
        raw: bytes | None = real_read(key)
        gate.trip()  # the old envelope is in hand; the delete happens now
        return raw

    l2.read = read
    gate.arm()
    reader, got = run(lambda: cache.get("k"))
    assert gate.tripped.wait(STEP)
    cache.delete("k")
    gate.open()
    reader.join(STEP)
    assert got == ["old"]  # A's read began before the delete: it may return the old value
    assert stack.l1.get("k") is None, "the deleted value was put back into L1"
    assert cache.get("k") is None


def test_concurrent_sets_leave_l1_agreeing_with_l2(
    configured: str, make_cache: Callable[..., Any], gate: Gate
) -> None:
    """Defect 10: A's L2 write lands first, B's second; A's late L1 put must not win."""
    cache = make_cache(**two_tier())
    stack = cache.stack
    l2 = stack.l2
    real_put = l2.put

    def put(key: str, envelope: bytes, ttl: float, message: bytes) -> bytes:
        replaced: bytes = real_put(key, envelope, ttl, message)
        gate.trip()  # A has written L2 and not yet L1
        return replaced

    l2.put = put
    gate.arm()
    writer, _ = run(lambda: cache.set("k", "A"))
    assert gate.tripped.wait(STEP)
    cache.set("k", "B")  # B: L2 then L1, while A waits
    gate.open()
    writer.join(STEP)
    in_l2 = stack._read_l2("k")
    assert in_l2 is not None and in_l2.entry is not None and in_l2.entry.value == "B"
    assert cache.get("k") == "B", "L1 holds A's value while L2 holds B's"


def test_an_eviction_between_the_epoch_check_and_the_l1_put_wins(
    configured: str, make_cache: Callable[..., Any], gate: Gate
) -> None:
    """Defect 12: the check of the L1 epoch and the put must be one step.

    The injected clock is read inside the put: the gate stops the reader there, after the
    check, while another thread deletes the key.
    """
    inner = FakeClock()
    reader_ident: list[int] = []

    def clock() -> float:
        if reader_ident and threading.get_ident() == reader_ident[0]:
            gate.trip()
        return inner()

    cache = make_cache(clock=clock, **two_tier())
    cache.set("k", "old")
    stack = cache.stack
    stack.l1.discard("k")
    found = stack._read_l2("k")
    assert found is not None and found.entry is not None

    def put_back() -> None:
        reader_ident.append(threading.get_ident())
        gate.arm(reader_ident[0])
        stack._put_l1("k", found.entry, found.stamp)

    putter, _ = run(put_back)
    assert gate.tripped.wait(STEP)
    reader_ident.clear()
    # Another process deletes the key: this process hears it on the bus.
    stack.on_bus("evict", ["k"], False)
    gate.open()
    putter.join(STEP)
    assert stack.l1.get("k") is None, "an L1 put that passed its check before the eviction won"


def test_a_read_after_a_delete_does_not_join_a_load_that_began_before_it(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """Found by the model test (P5): in-process single-flight merged a read that began after
    a delete into a load that began before it, so it got the deleted value."""
    entered, release = threading.Event(), threading.Event()
    calls = {"n": 0}

    def resolver(key: str) -> int:
        calls["n"] += 1
        n = calls["n"]
        if n == 1:
            entered.set()
            assert release.wait(STEP)
        return n

    cache = make_cache(resolver=resolver, **two_tier())
    first, out1 = run(lambda: cache.get("k"))
    assert entered.wait(STEP)
    cache.delete("k")  # completes while the first load (which began before it) still runs
    second, out2 = run(lambda: cache.get("k"))
    second.join(STEP)  # it does not wait for the first load either: that one can't fill now
    release.set()
    first.join(STEP)
    assert out1 == [1]  # began before the delete: it may return what it loaded
    assert out2 == [2], "a read that began after the delete got the value loaded before it"


def test_an_l1_hit_marks_the_key_used_so_eviction_takes_the_least_recently_read(
    make_cache: Any,
) -> None:
    """P9 with LRU order: the lock-free hit path (MemoryStore.unlocked) still marks use."""
    cache = make_cache(tiers=[MemoryTier(max_size=2, ttl="1m")])
    cache.set("a", 1)
    cache.set("b", 2)
    assert cache.stack.l1.unlocked() is not None  # the fast path is the one under test
    assert cache.get("a") == 1  # a hit: "a" is now the most recently used
    cache.set("c", 3)  # evicts the least recently used: "b"
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    assert cache.get_stats(local=True)["evictions"] == 1
