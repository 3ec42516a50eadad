"""Tag and pattern invalidation across tiers, and their races with in-flight loads (DESIGN §5)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from oqron_cache.config import current_runtime


def tagged(make_cache: Callable[..., Any], **kwargs: Any) -> Any:
    return make_cache(ttl="1m", tags=lambda key, value: value["tags"], **kwargs)


def test_invalidate_by_tag_drops_only_the_tagged_entries(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = tagged(make_cache)
    cache.set("a", {"tags": ["tenant:acme", "*"]})
    cache.set("b", {"tags": ["tenant:acme"]})
    cache.set("c", {"tags": ["tenant:other"]})
    assert cache.invalidate_by_tag("tenant:acme") == 2
    assert cache.get("a") is None and cache.get("b") is None
    assert cache.get("c") == {"tags": ["tenant:other"]}
    # glob characters in tags are literal: "*" only names the tag "*"
    cache.set("d", {"tags": ["x"]})
    assert cache.invalidate_by_tag("*") == 0  # "a" carried it, but "a" is already gone
    assert cache.get("d") == {"tags": ["x"]}


def test_tag_invalidation_spares_a_newer_write_of_the_same_key(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = tagged(make_cache)
    cache.set("k", {"tags": ["t"], "v": 1})
    cache.set("k", {"tags": [], "v": 2})  # rewritten without the tag
    assert cache.invalidate_by_tag("t") == 0
    assert cache.get("k") == {"tags": [], "v": 2}


def test_tag_invalidation_pages_through_many_entries(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    cache = tagged(make_cache)
    for i in range(1200):  # more than two SSCAN pages
        cache.set(f"k{i}", {"tags": ["bulk"]})
    assert cache.invalidate_by_tag("bulk") == 1200
    assert redis_client.exists(cache.stack.l2.keys.tag_set("bulk")) == 0
    assert cache.get("k7") is None


def test_tags_reach_other_processes_l1_through_the_bus(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = tagged(make_cache)
    cache.set("a", {"tags": ["t"]})
    cache.get("a")
    assert len(cache.stack.l1) == 1
    # what another process does when it receives the bus message
    cache.stack.on_bus("tag", ["t"], from_self=False)
    assert len(cache.stack.l1) == 0


def test_invalidation_racing_an_in_flight_cold_load_wins(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    """A load that began before invalidate_by_tag/_pattern must not leave its value behind."""
    started = threading.Event()
    release = threading.Event()
    calls = 0

    def resolver(key: str) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            assert release.wait(10)
        return {"tags": ["tenant:acme"], "n": calls}

    cache = tagged(make_cache, resolver=resolver)
    result: list[Any] = []
    loader = threading.Thread(target=lambda: result.append(cache.get("user:1")))
    loader.start()
    assert started.wait(10)
    assert cache.invalidate_by_tag("tenant:acme") == 0  # nothing was cached yet
    release.set()
    loader.join(10)
    assert result == [{"tags": ["tenant:acme"], "n": 1}]  # its own caller still gets it
    assert cache.get_stats(local=True)["invalidated_in_flight"] == 1
    assert cache.get("user:1") == {"tags": ["tenant:acme"], "n": 2}  # reloaded, not the old one


@pytest.mark.parametrize("how", ["pattern", "tag"])
def test_a_withdrawn_fill_read_by_another_thread_does_not_stay_in_l1(
    configured: str, make_cache: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """P5: between a fill and its check for racing invalidations (one round trip), another
    thread of the process may read the entry from L2 and keep it in L1; the withdrawal must
    drop that copy too (the bus does it in other processes, but not in the filler's own)."""
    from oqron_cache.engine import invalidation

    started = threading.Event()
    release = threading.Event()

    def slow(key: str) -> Any:
        started.set()
        assert release.wait(10)
        return {"tags": ["g"], "n": 1}

    cache = tagged(make_cache, resolver=slow)

    real_index = invalidation._index_steps

    def index_after_a_read(stack: Any, key: str, entry: Any, started_us: int) -> Any:
        if started_us < 1 << 62:  # the check after a fill (not a slide's re-index)
            reader = threading.Thread(target=lambda: cache.get(key))
            reader.start()  # reads the just-filled entry from L2, puts it in L1
            reader.join(10)
        return (yield from real_index(stack, key, entry, started_us))

    monkeypatch.setattr(invalidation, "_index_steps", index_after_a_read)
    loader = threading.Thread(target=lambda: cache.get("acct:1"))
    loader.start()
    assert started.wait(10)
    if how == "pattern":
        cache.invalidate_pattern("acct:*")
    else:
        cache.invalidate_by_tag("g")
    release.set()
    loader.join(10)
    assert cache.get_stats(local=True)["invalidated_in_flight"] == 1
    assert cache.stack.l1.get("acct:1") is None  # the withdrawn value is nowhere


@pytest.mark.parametrize("how", ["pattern", "tag"])
def test_invalidation_racing_an_in_flight_refresh_wins(
    configured: str, make_cache: Callable[..., Any], clock: Any, how: str
) -> None:
    """The refresh of a stale entry was already running when the invalidation landed."""
    started = threading.Event()
    release = threading.Event()
    generation = 0

    def resolver(key: str) -> dict[str, Any]:
        nonlocal generation
        generation += 1
        if generation == 2:  # the background refresh
            started.set()
            assert release.wait(10)
        return {"tags": ["g"], "n": generation}

    cache = make_cache(
        ttl="10s", stale_ttl="1m", tags=lambda k, v: v["tags"], resolver=resolver, clock=clock
    )
    assert cache.get("acct:1")["n"] == 1
    clock.tick(11)
    assert cache.get("acct:1")["n"] == 1  # stale: served, refresh requested
    assert started.wait(10)
    if how == "pattern":
        cache.invalidate_pattern("acct:*")
    else:
        cache.invalidate_by_tag("g")
    release.set()
    assert current_runtime().dispatcher.join(10)
    stats = cache.get_stats(local=True)
    assert stats["l2_write_conflicts"] + stats["invalidated_in_flight"] == 1
    assert cache.get("acct:1")["n"] == 3  # never the refreshed-before-invalidation value 2


def test_delete_racing_an_in_flight_load_wins(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    started = threading.Event()
    release = threading.Event()
    calls = 0

    def resolver(key: str) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            started.set()
            assert release.wait(10)
        return calls

    cache = make_cache(ttl="1m", resolver=resolver)
    loader = threading.Thread(target=cache.get, args=("k",))
    loader.start()
    assert started.wait(10)
    cache.delete("k")
    release.set()
    loader.join(10)
    assert cache.get("k") == 2


def test_bad_tags_are_refused(configured: str, make_cache: Callable[..., Any]) -> None:
    cache = make_cache(ttl="1m")
    with pytest.raises(TypeError, match="tag"):
        cache.invalidate_by_tag(5)
    with pytest.raises(ValueError, match="tag"):
        cache.invalidate_by_tag("")
    with pytest.raises(ValueError, match="tag"):
        cache.invalidate_by_tag("x" * 300)
