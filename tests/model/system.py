"""Process A's side of the model: the private Redis, process B, and the checks of the promises.

One :class:`System` lives for the whole test (a private ``redis-server``, one process B); each
Hypothesis example gets a fresh namespace, clock, origin and oracle (:meth:`System.begin`).
The checks that look at a whole process or at Redis live here; the checks of one read are
:meth:`tests.model.oracle.Oracle.check_read`.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import redis

import oqron_cache
from oqron_cache.config import current_runtime, reset
from oqron_cache.testing import FakeClock
from tests.model.gates import GatedCodec, GatedL1, Gates
from tests.model.oracle import (
    LOCK_TTL,
    OP_TIMEOUT,
    TAG_MEMBERS_PER_KEY,
    CoherenceBroken,
    Oracle,
    P1Refusal,
    P8Broken,
    P9Broken,
    P13TagSetGrows,
    P14Broken,
    breach,
    make_value,
    p7_error,
)
from tests.model.peer import Context, Peer
from tests.model.world import (
    FakeEnqueuer,
    Origin,
    OriginError,
    RedisView,
    Slot,
    bus_barrier,
    declare,
    l1_state,
    settle,
)
from tests.redis_server import RedisServer

START = 1_800_000_000.0
BARRIER_WAIT = 2.0  # seconds the bus may take to deliver (measured: about a millisecond)
HEALTHY_WAIT = 5.0  # seconds both buses may take to resubscribe after Redis came back


class System:
    """Everything process A drives; see the module docstring."""

    def __init__(self) -> None:
        self.server = RedisServer()
        self.admin = redis.Redis(
            host="127.0.0.1", port=self.server.port, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self.peer = Peer()
        self.gates = Gates()
        self.clock = FakeClock(START)
        self.origin = Origin()
        self.oracle = Oracle()
        self.enqueuer = FakeEnqueuer()
        self.failed: dict[Slot, float] = {}  # (cache, key) -> when a read of it last failed
        self.slow_slot: Slot | None = None  # the key a held slow call may hold a lock on
        # Keys whose held call ended while Redis was down: its lock's release could not be sent;
        # the lock expires by itself (P8), counted from when Redis is back.
        self.unreleased: set[Slot] = set()
        self.redis = "up"  # "up" | "kill" | "pause"
        self.view = RedisView(self.admin, "-")
        self.caches = declare(self._resolver_for)

    # -- lifecycle ----------------------------------------------------------------------------

    def begin(self) -> None:
        """A fresh example: empty Redis, new namespace, clock, origin and oracle."""
        self.restore_redis()
        self.server.flushall()  # a private server: only earlier examples' keys live there
        namespace = f"m-{uuid.uuid4().hex[:8]}"
        self.clock.now = START
        self.origin = Origin()
        self.oracle = Oracle()
        self.enqueuer = FakeEnqueuer()
        self.failed = {}
        self.slow_slot = None
        self.unreleased = set()
        self.peer.send("configure", self.server.url, namespace)  # B meanwhile
        oqron_cache.configure(
            redis_url=self.server.url, namespace=namespace, clock=self.clock, op_timeout=OP_TIMEOUT
        )
        current_runtime().enqueuer = self.enqueuer
        for cache in self.caches.values():
            stack = cache.stack
            stack.codec = GatedCodec(stack.codec, self.gates)
            assert stack.l1 is not None
            stack.l1 = GatedL1(stack.l1, self.gates)
        self.view = RedisView(self.admin, namespace)
        self.peer.receive("configure")

    def end(self) -> None:
        self.gates.disarm()
        self.restore_redis()
        self.peer.send("reset")
        reset()
        self.peer.receive("reset")

    def close(self) -> None:
        self.peer.close()
        for cache in self.caches.values():
            cache.close()
        self.admin.close()
        self.server.close()

    def restore_redis(self) -> None:
        if self.redis == "pause":
            self.server.resume()
        elif self.redis == "kill":
            self.server.restart()  # empty: no persistence
        self.redis = "up"
        for slot in self.unreleased:
            self.failed[slot] = time.monotonic()
        self.unreleased.clear()

    # -- the model origin ---------------------------------------------------------------------

    def _resolver_for(self, cache: str) -> Any:
        def resolve(key: str) -> Any:
            version = self.origin.versions.get((cache, key), 0)
            refuse = (cache, key) in self.origin.failing
            stamp = self.oracle.tick()
            now = self.clock()
            if threading.current_thread() is self.gates.thread:
                self.oracle.held_loads.add(stamp)
            self.gates.hold("resolver")
            if refuse:
                self.failed[(cache, key)] = time.monotonic()
                raise OriginError(f"origin refused {cache}/{key}")
            return make_value(cache, key, version, stamp, now, False)

        return resolve

    def ctx(self) -> Context:
        """The model context process B needs to run a resolver."""
        return (
            self.clock.now,
            self.oracle.seq,
            dict(self.origin.versions),
            set(self.origin.failing),
        )

    def absorb(self, reply: dict[str, Any]) -> None:
        """Take back the stamp counter and the failed reads from a reply of process B."""
        self.oracle.seq = max(self.oracle.seq, int(reply["seq"]))
        for cache, key in reply["failed"]:
            self.failed[(cache, key)] = time.monotonic()

    # -- the bus ------------------------------------------------------------------------------

    def barrier(self, proc: str) -> bool:
        """Wait for ``proc``'s bus to deliver what was published; then it has seen every op."""
        if self.redis != "up":
            return False
        ok = (
            bus_barrier(BARRIER_WAIT)
            if proc == "A"
            else bool(self.peer.call("barrier", BARRIER_WAIT))
        )
        if ok:
            self.oracle.delivered(proc)
        return ok

    def state(self, proc: str) -> dict[str, Any]:
        return l1_state(self.caches) if proc == "A" else dict(self.peer.call("state"))

    def settle(self, timeout: float = HEALTHY_WAIT) -> bool:
        """Both processes' breakers closed again (see :func:`tests.model.world.settle`)."""
        self.peer.send("settle", timeout)
        here = settle(timeout)
        return bool(self.peer.receive("settle", timeout + 5.0)) and here

    def wait_healthy(self, timeout: float = HEALTHY_WAIT) -> bool:
        """Wait until both processes' buses are subscribed again (after Redis or a bus drop)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state("A")["bus_healthy"] and self.state("B")["bus_healthy"]:
                return True
            time.sleep(0.02)
        return False

    def wait_resubscribed(self, before: dict[str, int], timeout: float = HEALTHY_WAIT) -> bool:
        """Wait until both buses noticed a lost connection (their reconnect count moved past
        ``before``) and are subscribed again. A bus still says healthy until it notices."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {proc: self.state(proc) for proc in before}
            if all(
                state["bus_healthy"] and state["bus_reconnects"] > before[proc]
                for proc, state in states.items()
            ):
                return True
            time.sleep(0.02)
        return False

    def wait_replayed(self, timeout: float = HEALTHY_WAIT) -> bool:
        """P14: what either process deferred while Redis was away is applied once it is back
        (then the bus delivers it like any write)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state("A")["deferred"] and not self.state("B")["deferred"]:
                # ... and the replays' bus messages reached both processes.
                return self.barrier("A") and self.barrier("B")
            time.sleep(0.02)
        return False

    # -- checks of a whole process, and of Redis ----------------------------------------------

    def check_l1(self, proc: str, state: dict[str, Any]) -> None:
        """P9 (L1 bounded) and P7 (no servable copy an invalidation it heard made obsolete)."""
        now = self.clock.now
        seen = self.oracle.snapshot(proc)
        for cache, copies in state["copies"].items():
            size, bound = state["sizes"][cache]
            if size > bound:
                breach(P9Broken(f"{proc}'s L1 of {cache} holds {size} entries > max_size {bound}"))
            for key, value, _fresh, stale, _version in copies:
                if now >= stale:
                    continue  # not servable any more
                op = self.oracle.obsoleted_by(value, seen)
                if op is not None:
                    breach(
                        p7_error(op)(
                            f"{proc}'s L1 of {cache} still holds {key}={value!r} (servable for "
                            f"{stale - now:.1f}s more) after {op} completed and was delivered"
                        )
                    )

    def check_coherence(self, states: dict[str, dict[str, Any]]) -> None:
        """Nothing in flight, both buses delivered: no servable L1 copy is behind L2.

        *Behind*: L2 holds a newer origin version. The message that announced L2's entry must
        have evicted the copy. (A copy *ahead* of L2 is no fault: a process that could not
        reach L2 loaded it.)
        """
        now = self.clock.now
        for proc, state in states.items():
            for cache, copies in state["copies"].items():
                for key, value, _fresh, stale, version in copies:
                    if now >= stale:
                        continue
                    live = self.view.entry(cache, key)
                    if live is None or live[1] is None:
                        continue  # gone or a tombstone: P7 judges the copy by the operations
                    if live[1]["v"] > value["v"]:
                        breach(
                            CoherenceBroken(
                                f"{proc}'s L1 of {cache} holds {key}={value!r} (version "
                                f"{version}) but L2 holds the newer {live[1]!r} (version {live[0]})"
                            )
                        )

    def check_locks(self) -> None:
        """P8 (every lock has a TTL) and P14 (every lock belongs to someone)."""
        now = time.monotonic()
        for slot, token, pttl in self.view.locks():
            if pttl < 0:
                breach(P8Broken(f"lock of {slot} (token {token[:8]}) has no TTL (PTTL {pttl})"))
            if token in self.enqueuer.tokens:
                continue  # a refresh task's (pending, run, dropped or failed: a throttle)
            if slot is not None and slot == self.slow_slot:
                continue  # the held call's own lock
            if slot is not None and now - self.failed.get(slot, -1e9) < LOCK_TTL + 1.0:
                continue  # a failed refresh keeps its lock as the key's throttle; or see above
            breach(
                P14Broken(
                    f"lock of {slot} (token {token[:8]}, {pttl} ms left) is held by nobody: no "
                    "task, no load in flight (a lock request that timed out ran later?)"
                )
            )

    def check_tag_sets(self) -> None:
        """P13: the tag index does not keep every version a key ever had."""
        for (tag_set, encoded), members in self.view.tag_members().items():
            if members > TAG_MEMBERS_PER_KEY:
                breach(
                    P13TagSetGrows(
                        f"tag set {tag_set} holds {members} members for key {encoded!r} "
                        f"(> {TAG_MEMBERS_PER_KEY}): old versions are never removed"
                    )
                )

    def check_refusal(
        self, proc: str, cache: str, key: str, l2_errors: int, seen: frozenset[int]
    ) -> None:
        """A resolver error reached the caller: P1 allows it only with nothing servable."""
        now = self.clock.now
        candidates = [
            (value, stale)
            for k, value, _fresh, stale, _version in self.state(proc)["copies"][cache]
            if k == key
        ]
        if self.redis == "up" and l2_errors == 0:
            live = self.view.entry(cache, key)
            if live is not None and live[1] is not None:
                candidates.append((live[1], live[2]))
        for value, stale in candidates:
            if now < stale and self.oracle.obsoleted_by(value, seen) is None:
                breach(
                    P1Refusal(
                        f"{proc} get({cache}, {key!r}) raised the resolver's error although "
                        f"{value!r} was servable (stale_until in {stale - now:.1f}s)"
                    )
                )
