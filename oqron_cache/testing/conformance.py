"""Conformance suites of the two tier protocols, as pytest test classes (no pytest import).

:class:`L1StoreContract` and :class:`L2StoreContract` hold the promises the library relies on
from a store of each tier (:class:`oqron_cache.tiers.base.L1Store`,
:class:`oqron_cache.tiers.base.L2Store`). Subclass one in a test module and give the class a
fixture named ``store``; see :mod:`oqron_cache.testing`, which re-exports both.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, cast

import redis
from redis.client import PubSub

from ..core.codecs import get_codec
from ..core.entry import NO_VERSION, Entry, new_version, pack, unpack
from ..engine.l1 import L1Item
from ..engine.tiers import L1Store, L2Store
from ..redis.replies import as_int

__all__ = ["L1StoreContract", "L2StoreContract"]


# ---------------------------------------------------------------------------------------------
# The L1 contract


def _item(value: Any = "value", fresh_until: float | None = None) -> L1Item:
    """An L1 copy fresh for a minute (or until ``fresh_until``), with a new version."""
    fresh = time.time() + 60 if fresh_until is None else fresh_until
    return L1Item(value, fresh, fresh + 60, fresh, new_version())


class L1StoreContract:
    """The conformance suite of an :class:`~oqron_cache.tiers.base.L1Store`.

    A subclass provides a pytest fixture named ``store`` returning a fresh, empty store that
    holds at most :attr:`capacity` entries (override :attr:`capacity` to test another bound;
    it must be at least 3).
    """

    capacity = 4

    def test_get_of_an_absent_key_is_none(self, store: L1Store) -> None:
        assert store.get("absent") is None
        assert len(store) == 0

    def test_put_then_get_returns_the_item(self, store: L1Store) -> None:
        item = _item()
        store.put("k", item)
        assert store.get("k") is item
        replacement = _item("replacement")
        store.put("k", replacement)
        assert store.get("k") is replacement
        assert len(store) == 1

    def test_data_under_lock_answers_like_get(self, store: L1Store) -> None:
        item = _item()
        store.put("k", item)
        with store.lock:
            found = store.data["k"]
            try:
                store.data["absent"]
            except KeyError:
                missing = True
            else:
                missing = False
        assert found is item
        assert missing

    def test_discard_drops_the_key_and_honours_a_version(self, store: L1Store) -> None:
        item = _item()
        store.put("k", item)
        store.discard("k", new_version())  # another version: the copy stays
        assert store.get("k") is item
        store.discard("k", item.version)
        assert store.get("k") is None
        store.put("k", item)
        store.discard("k")  # no version: dropped whatever it is
        assert store.get("k") is None
        store.discard("k")  # absent: not an error
        store.discard("k", item.version)

    def test_discard_many_drops_only_the_keys_given(self, store: L1Store) -> None:
        for key in ("a", "b", "c"):
            store.put(key, _item(key))
        store.discard_many(["a", "c", "absent"])
        assert store.keys() == ["b"]

    def test_clear_drops_everything_and_returns_the_count(self, store: L1Store) -> None:
        for key in ("a", "b", "c"):
            store.put(key, _item(key))
        assert store.clear() == 3
        assert len(store) == 0
        assert store.get("a") is None
        assert store.clear() == 0

    def test_a_full_store_evicts_the_least_recently_used_and_counts_it(
        self, store: L1Store
    ) -> None:
        for index in range(self.capacity):
            store.put(f"k{index}", _item(index))
        assert store.evictions == 0
        assert store.get("k0") is not None  # now the most recently used: k1 is the least
        with store.lock:
            store.data["k1"]  # indexing counts as a use too: k2 is the least
        store.put("new", _item("new"))
        assert len(store) == self.capacity
        assert store.get("k2") is None
        assert {"k0", "k1", "new"} <= set(store.keys())
        assert store.evictions == 1
        store.discard("new")
        store.clear()
        assert store.evictions == 1  # discards and clears are not evictions

    def test_put_if_newer_keeps_the_copy_fresh_for_longer(self, store: L1Store) -> None:
        now = time.time()
        first = _item("first", fresh_until=now + 10)
        store.put_if_newer("k", first)  # absent: stored
        assert store.get("k") is first
        store.put_if_newer("k", _item("older", fresh_until=now + 5))
        assert store.get("k") is first
        tie = _item("tie", fresh_until=now + 10)
        store.put_if_newer("k", tie)  # not fresh for longer than the new one: replaced
        assert store.get("k") is tie
        newer = _item("newer", fresh_until=now + 20)
        store.put_if_newer("k", newer)
        assert store.get("k") is newer

    def test_items_and_keys_are_snapshots(self, store: L1Store) -> None:
        a, b = _item("a"), _item("b")
        store.put("a", a)
        store.put("b", b)
        keys, items = store.keys(), store.items()
        store.put("c", _item("c"))
        store.discard("a")
        assert sorted(keys) == ["a", "b"]
        assert sorted(items, key=lambda pair: pair[0]) == [("a", a), ("b", b)]
        assert sorted(store.keys()) == ["b", "c"]
        assert len(store) == 2


# ---------------------------------------------------------------------------------------------
# The L2 contract


def _entry(version: bytes | None = None, tombstone: bool = False) -> Entry:
    """An entry made now, fresh for a minute and stale for one more."""
    now = time.time()
    return Entry(
        None,
        now,
        now + 60,
        now + 120,
        new_version() if version is None else version,
        tombstone=tombstone,
    )


def _pack(entry: Entry, value: Any = None) -> bytes:
    """The envelope of ``entry`` holding ``value`` (JSON), as the library writes it."""
    codec = get_codec("json")
    payload = b"" if entry.tombstone else codec.encode(value, "oqron_cache.testing")
    return pack(entry, codec.codec_id, payload)


def _envelope(value: Any = "value", version: bytes | None = None) -> bytes:
    return _pack(_entry(version), value)


def _tombstone() -> bytes:
    return _pack(_entry(tombstone=True))


def _version(raw: bytes | None) -> bytes:
    assert raw is not None
    return unpack(raw)[0].version


def _subscribed(pubsub: PubSub, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "subscribe":
            return True
    return False


def _messages(pubsub: PubSub, prefix: bytes, last: bytes, timeout: float = 5.0) -> list[bytes]:
    """The messages starting with ``prefix`` heard up to ``last`` (or the timeout)."""
    heard: list[bytes] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and last not in heard:
        message = pubsub.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            data = cast(bytes, message["data"])
            if data.startswith(prefix):
                heard.append(data)
    return heard


class L2StoreContract:
    """The conformance suite of an :class:`~oqron_cache.tiers.base.L2Store`.

    A subclass provides a pytest fixture named ``store`` returning a store whose cache holds
    no entries and no locks (a fresh namespace or cache name), and removes its keys afterwards.
    The tests write envelopes made with :mod:`oqron_cache.entry` (JSON payloads) under keys
    such as ``"k"`` and take locks with tokens of their own.

    Three tests also talk to the server directly, to hear the bus and read physical TTLs:
    they use :meth:`client_for`, which by default returns ``store.conn.client``. Override it
    if the store's own client cannot subscribe (it must return ``bytes``: no
    ``decode_responses``).
    """

    def client_for(self, store: L2Store) -> redis.Redis:
        """A client of the Redis that ``store`` writes to (subscribes; reads TTLs)."""
        return store.conn.client

    def _pttl(self, store: L2Store, key: str) -> int:
        return as_int(self.client_for(store).pttl(store.keys.value(key)))

    def _lock_left(self, store: L2Store, key: str) -> float:
        """Seconds left on ``key``'s lock, as a loser of :meth:`L2Store.acquire_or_read` sees."""
        won, _, _, held = store.acquire_or_read(key, "probe", 0.5)
        assert not won, "the lock was not held"
        return held

    def test_read_of_an_absent_key_is_none(self, store: L2Store) -> None:
        assert store.read("absent") is None
        assert store.read_at("absent")[0] is None

    def test_put_then_read_returns_the_same_bytes(self, store: L2Store) -> None:
        for key in ("k", "a key with spaces, {braces}, * and é"):
            envelope = _envelope({"key": key, "list": [1, 2.5, None]})
            store.put(key, envelope, 60, b"m")
            assert store.read(key) == envelope
            assert 55_000 < self._pttl(store, key) <= 60_000
        newer = _envelope("newer")
        store.put("k", newer, 60, b"m")  # unconditional: replaces whatever is there
        assert store.read("k") == newer

    def test_fill_is_a_compare_and_set_on_the_version(self, store: L2Store) -> None:
        first = _envelope("first")
        # Absent, as the loader saw it:
        assert store.fill("k", NO_VERSION, first, 60, "", b"m")[0] == 1
        assert store.read("k") == first
        assert store.fill("k", NO_VERSION, _envelope("late"), 60, "", b"m")[0] == 0
        assert store.read("k") == first
        second = _envelope("second")
        assert store.fill("k", _version(first), second, 60, "", b"m")[0] == 1
        assert store.read("k") == second
        assert store.fill("k", _version(first), _envelope("again"), 60, "", b"m")[0] == 0
        assert store.read("k") == second

    def test_fill_loses_to_a_put_made_during_the_load(self, store: L2Store) -> None:
        old = _envelope("old")
        store.put("k", old, 60, b"m")
        newer = _envelope("set meanwhile")
        store.put("k", newer, 60, b"m")
        assert store.fill("k", _version(old), _envelope("loaded"), 60, "", b"m")[0] == 0
        assert store.read("k") == newer

    def test_tombstone_makes_an_older_fill_fail(self, store: L2Store) -> None:
        old = _envelope("old")
        store.put("k", old, 60, b"m")
        tombstone = _tombstone()
        store.tombstone("k", tombstone, 10, b"m")
        assert store.read("k") == tombstone
        assert 0 < self._pttl(store, "k") <= 10_000
        assert store.fill("k", _version(old), _envelope("loaded before"), 60, "", b"m")[0] == 0
        assert store.fill("k", NO_VERSION, _envelope("loaded before"), 60, "", b"m")[0] == 0
        assert store.read("k") == tombstone
        after = _envelope("loaded after the delete")
        assert store.fill("k", _version(tombstone), after, 60, "", b"m")[0] == 1
        assert store.read("k") == after

    def test_fill_releases_only_the_fillers_lock_even_when_it_loses(self, store: L2Store) -> None:
        store.put("k", _envelope("set meanwhile"), 60, b"m")
        assert store.acquire("k", "filler", 30)
        assert store.fill("k", NO_VERSION, _envelope("loaded"), 60, "filler", b"m")[0] == 0
        assert store.acquire("k", "next", 30)  # the losing fill released its lock
        current = _version(store.read("k"))
        assert store.fill("k", current, _envelope("filled"), 60, "filler", b"m")[0] == 1
        assert not store.acquire("k", "third", 30)  # "next" still holds it

    def test_acquire_is_exclusive_and_only_the_token_releases(self, store: L2Store) -> None:
        assert store.acquire("k", "a", 30)
        assert not store.acquire("k", "b", 30)
        assert not store.acquire("k", "a", 30)  # not reentrant
        assert not store.release("k", "b")
        assert not store.acquire("k", "b", 30)  # b's release did nothing
        assert store.release("k", "a")
        assert not store.release("k", "a")
        assert store.acquire("k", "b", 30)
        assert store.acquire("other", "a", 30)  # one lock per key

    def test_a_lock_expires_after_its_ttl(self, store: L2Store) -> None:
        assert store.acquire("k", "crashed", 0.05)
        time.sleep(0.15)
        assert store.acquire("k", "next", 30)
        assert not store.release("k", "crashed")

    def test_hold_extends_only_the_holders_lock(self, store: L2Store) -> None:
        assert store.acquire("k", "holder", 1.0)
        assert not store.hold("k", "other", 60)
        assert self._lock_left(store, "k") <= 1.0
        assert store.hold("k", "holder", 60)
        assert 50 < self._lock_left(store, "k") <= 60
        assert not store.hold("free", "holder", 60)  # nothing held: nothing taken either
        assert store.acquire("free", "other", 30)

    def test_acquire_or_read_answers_the_winner_and_a_loser(self, store: L2Store) -> None:
        envelope = _envelope()
        store.put("k", envelope, 60, b"m")
        before = store.now_us()
        won, raw, now_us, held = store.acquire_or_read("k", "winner", 5.0)
        assert (won, raw, held) == (True, envelope, 5.0)
        assert before <= now_us <= store.now_us()
        won, raw, later_us, held = store.acquire_or_read("k", "loser", 30.0)
        assert (won, raw) == (False, envelope)
        assert later_us >= now_us
        assert 0 < held <= 5.0  # what is left of the winner's lock, not the loser's ttl
        assert not store.release("k", "loser")
        assert store.release("k", "winner")
        won, raw, _, _ = store.acquire_or_read("absent", "winner", 5.0)
        assert (won, raw) == (True, None)

    def test_a_cold_load_takes_over_only_a_lock_nobody_computes_under(
        self, store: L2Store
    ) -> None:
        assert store.acquire_or_read("q", "queued", 30.0, "q")[0]  # a refresh task is queued
        assert not store.acquire_or_read("q", "refresh", 30.0, "q")[0]  # no other refresh
        assert store.acquire_or_read("q", "cold", 30.0, take_over=True)[0]  # a cold load
        assert not store.acquire_or_read("q", "cold2", 30.0, take_over=True)[0]  # computing
        assert not store.release("q", "queued")
        assert store.release("q", "cold")
        assert store.acquire("f", "failed", 30.0)
        assert store.hold("f", "failed", 30.0, "f")  # a failed refresh's throttle
        assert not store.acquire_or_read("f", "refresh", 30.0, "q")[0]  # throttled
        assert store.acquire_or_read("f", "cold", 30.0, take_over=True)[0]

    def test_claim_read_claims_only_the_tasks_own_lock(self, store: L2Store) -> None:
        envelope = _envelope()
        store.put("k", envelope, 60, b"m")
        assert store.acquire_or_read("k", "task", 0.5, "q")[0]
        raw, now_us, claim = store.claim_read("k", "task", 30.0)
        assert (raw, claim) == (envelope, 1)
        assert abs(now_us / 1e6 - time.time()) < 60
        assert 25 < self._lock_left(store, "k") <= 30  # claimed for a new lock_ttl
        assert not store.acquire_or_read("k", "cold", 30.0, take_over=True)[0]  # it computes
        assert store.claim_read("k", "another", 30.0)[2] == -1
        assert store.release("k", "task")
        assert store.claim_read("k", "task", 30.0)[2] == 0  # gone: no lock is taken either
        assert store.acquire("k", "next", 30.0)

    def test_read_at_returns_the_entry_and_the_servers_clock_in_us(self, store: L2Store) -> None:
        envelope = _envelope()
        store.put("k", envelope, 60, b"m")
        before = store.now_us()
        raw, at_us = store.read_at("k")
        assert raw == envelope
        assert before <= at_us <= store.now_us()
        assert abs(at_us / 1e6 - time.time()) < 60  # µs since the epoch, not ms or s

    def test_writes_are_announced_on_the_channel(self, store: L2Store) -> None:
        pubsub = self.client_for(store).pubsub()
        try:
            pubsub.subscribe(store.channel)
            assert _subscribed(pubsub)
            mark = uuid.uuid4().hex.encode() + b" "
            old = _envelope("old")
            store.publish(mark + b"publish")
            store.put("k", old, 60, mark + b"put")
            assert store.fill("k", NO_VERSION, _envelope(), 60, "", mark + b"lost fill")[0] == 0
            assert store.fill("k", _version(old), _envelope(), 60, "", mark + b"fill")[0] == 1
            store.tombstone("k", _tombstone(), 10, mark + b"tombstone")
            store.publish(mark + b"end")
            heard = _messages(pubsub, mark, mark + b"end")
        finally:
            pubsub.close()
        expected = [b"publish", b"put", b"fill", b"tombstone", b"end"]
        assert heard == [mark + name for name in expected]  # in order; no lost fill

    def test_scan_yields_only_keys_matching_its_pattern(self, store: L2Store) -> None:
        for key in ("user:1", "user:2", "order:1"):
            store.put(key, _envelope(key), 60, b"m")
        assert store.acquire("user:3", "token", 30)  # a lock, not a value
        found = set(store.scan(store.keys.match_values("user:*"), 100))
        assert found == {store.keys.value(k).encode() for k in ("user:1", "user:2")}

    def test_unlink_removes_the_keys_and_counts_them(self, store: L2Store) -> None:
        for key in ("a", "b", "c"):
            store.put(key, _envelope(key), 60, b"m")
        keys = [store.keys.value(k).encode() for k in ("a", "b", "absent")]
        assert store.unlink(keys) == 2
        assert store.read("a") is None
        assert store.read("b") is None
        assert store.read("c") is not None

    def test_touch_moves_freshness_only_of_the_same_version(self, store: L2Store) -> None:
        entry = _entry()
        store.put("k", _pack(entry, "v"), 60, b"m")
        later = entry.fresh_until + 600
        assert store.touch("k", entry.version, later, later + 30, 900)
        moved = dataclasses.replace(entry, fresh_until=later, stale_until=later + 30)
        assert store.read("k") == _pack(moved, "v")  # only the two instants changed
        assert 850_000 < self._pttl(store, "k") <= 900_000
        assert not store.touch("k", new_version(), later + 1, later + 2, 60)
        assert store.read("k") == _pack(moved, "v")
        assert not store.touch("absent", entry.version, later, later + 30, 900)
        assert store.read("absent") is None
