"""A backtracking pattern freezes nothing (issue 10 defect 1), end to end on a real Redis.

Every path that matches a user glob against keys is driven with ``"*a"*10 + "*z"`` while the
cache holds keys like ``"a"*3000``: the caller's SCAN filter and L1 sweep (``invalidate_pattern``
and the ``oqron_cache.invalidate_pattern`` task body), a later fill's check of the invalidation
log (``after_fill``), and the bus listener of another process. The old regex took time of degree
~10 in the key's length there, holding the GIL. In this process a SIGALRM deadline interrupts a
match that hangs; the bus listener is watched in a child process, since a thread that holds the
GIL forever would freeze the test itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from oqron_cache import MemoryTier, RedisTier
from oqron_cache.celery.bodies import do_invalidate_pattern
from oqron_cache.core.keys import bus_channel
from oqron_cache.redis.bus import encode_message
from tests.procs import ROOT, Child
from tests.procs.inval_child import declare, make_resolver
from tests.test_glob import deadline

EVIL = "*a" * 10 + "*z"  # matches no key below: every 'z'-less key is a full backtrack
LONG_KEYS = ["a" * 3000, "a" * 2999 + "b", "b" + "a" * 3000]
PROMPT = 2.0  # seconds within which a delete must still reach the other process's L1


def long_lived(**kwargs: Any) -> dict[str, Any]:
    """L1 and L2 for a minute, keys stored unhashed up to 8 kB (so SCAN's filter sees them)."""
    return {
        "tiers": [MemoryTier(max_size=100, ttl="60s"), RedisTier(ttl="60s")],
        "max_key_bytes": 8192,
        **kwargs,
    }


def test_invalidate_pattern_returns_at_once_and_removes_only_matches(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    cache = make_cache(**long_lived())
    for key in LONG_KEYS:
        cache.set(key, len(key))

    with deadline(10.0, f"invalidate_pattern({EVIL!r})"):
        assert cache.invalidate_pattern(EVIL) == 0

    l2 = cache.stack.l2
    for key in LONG_KEYS:
        assert cache.stack.l1.get(key) is not None
        assert redis_client.exists(l2.keys.value(key)) == 1
    with deadline(10.0, "a matching pattern of the same shape"):
        assert cache.invalidate_pattern("*a" * 10 + "*b") == 1  # only "a"*2999 + "b"
    assert cache.stack.l1.get(LONG_KEYS[1]) is None
    assert cache.get(LONG_KEYS[0]) == 3000


def test_the_task_body_returns_at_once(configured: str, make_cache: Callable[..., Any]) -> None:
    cache = make_cache(**long_lived())
    for key in LONG_KEYS:
        cache.set(key, len(key))

    with deadline(10.0, "the oqron_cache.invalidate_pattern task body"):
        assert do_invalidate_pattern(cache.name, EVIL) == "deleted 0"
    assert all(cache.stack.l1.get(key) is not None for key in LONG_KEYS)


def test_a_fill_racing_the_pattern_is_not_frozen_by_the_invalidation_log(
    configured: str, make_cache: Callable[..., Any], redis_client: redis.Redis
) -> None:
    # A fill checks its key against the patterns invalidated since its load began; here the
    # resolver itself invalidates (on a cache that holds nothing yet, so that part is quick).
    made: list[Any] = []

    def resolver(key: str) -> int:
        assert made[0].invalidate_pattern(EVIL) == 0
        return len(key)

    cache = make_cache(**long_lived(resolver=resolver))
    made.append(cache)

    with deadline(10.0, "a fill checking the invalidation log"):
        assert cache.get(LONG_KEYS[0]) == 3000
    assert cache.stats.counts["invalidated_in_flight"] == 0  # no match: not withdrawn
    assert redis_client.exists(cache.stack.l2.keys.value(LONG_KEYS[0])) == 1


# -- the bus listener of another process ---------------------------------------------------


class Victim(Child):
    """A ``tests.procs.inval_child`` process holding ``LONG_KEYS`` and ``"b"`` in its L1."""

    def __init__(self, args: list[str], log_path: Path) -> None:  # own Popen: no super()
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.inval_child", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )


@pytest.fixture
def victim(
    configured: str, redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[tuple[Victim, Any]]:
    """A child process whose L1 holds the long keys, and this process's copy of its cache."""
    name = f"c-glob-{time.monotonic_ns() % 10**8}"
    cache = declare(
        name, ttl="60s", stale_ttl=0, resolver=make_resolver(redis_client, configured, name)
    )
    child = Victim(
        ["--url", redis_url, "--ns", configured, "--cache", name], tmp_path / "victim.log"
    )
    try:
        assert child.expect("ready", timeout=30)["bus_healthy"]
        child.send(cmd="read", keys=[*LONG_KEYS, "b"])
        assert child.expect("read", timeout=30)["misses"] == len(LONG_KEYS) + 1
        child.send(cmd="arm", gone=["b"], kept=LONG_KEYS)
        child.expect("armed")
        yield child, cache
    finally:
        child.close()
        cache.close()


def _delete_is_still_seen(child: Victim, cache: Any) -> list[str]:
    """Delete ``"b"`` here; the child's bus must drop it from its L1 promptly. Returns its ops."""
    published = time.monotonic()
    cache.delete("b")
    child.send(cmd="collect", deadline=3 * PROMPT)
    # A frozen bus thread holds the child's GIL: no answer at all, and this fails after 15 s.
    dropped = child.expect("dropped", timeout=15)
    assert dropped["ok"], dropped
    assert dropped["t_dropped"] - published < PROMPT, dropped
    assert dropped["kept_held"] == len(LONG_KEYS), dropped  # the pattern matched none of them
    return [op for _, op in dropped["bus"]]


def test_a_forged_pattern_message_does_not_freeze_another_process(
    victim: tuple[Victim, Any], redis_client: redis.Redis, configured: str
) -> None:
    child, cache = victim
    message = encode_message("another-process", cache.name, "pattern", [EVIL])
    assert redis_client.publish(bus_channel(configured), message) == 2  # the child and us

    ops = _delete_is_still_seen(child, cache)
    assert "pattern" in ops and "evict" in ops


@pytest.mark.parametrize("via", ["api", "task body"])
def test_a_pattern_invalidation_here_does_not_freeze_another_process(
    victim: tuple[Victim, Any], via: str
) -> None:
    child, cache = victim
    with deadline(10.0, f"invalidate_pattern({EVIL!r}) via the {via}"):
        if via == "api":
            assert cache.invalidate_pattern(EVIL) == 0
        else:
            assert do_invalidate_pattern(cache.name, EVIL) == "deleted 0"

    ops = _delete_is_still_seen(child, cache)
    assert "pattern" in ops and "evict" in ops
