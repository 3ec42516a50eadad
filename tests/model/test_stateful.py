"""The stateful model test (issue 10): random operations, faults and interleavings, checked
after every step against the promises of DESIGN section 8.

A Hypothesis :class:`RuleBasedStateMachine` drives two processes (this one, A, and a spawned
peer, B) sharing a private ``redis-server``, with an injected wall clock. Rules: ``get``,
``set`` (a new origin version), ``delete``, ``invalidate_pattern``, ``invalidate_by_tag`` in
either process; ``advance_time`` (the clock, and Redis's TTLs with it) across ``ttl`` and
``ttl + stale_ttl``; origin changes and origin failures; refresh tasks sent by A's dispatcher
run (in A or in B), dropped, run twice or out of order; Redis killed (restarted empty) or paused
and back; the bus connections killed; malformed bus messages; a key read steadily; a get or set
held at a gate in a thread of A while other steps run (:mod:`tests.model.gates`). After each
step: P7 and P9 in both processes' L1, P8 and P14 on every lock in Redis, P13 on the tag sets,
and, when nothing is in flight, that no L1 copy is behind L2. Each read is checked for P3 and
P5, each call for P1 and P2 (:mod:`tests.model.oracle`).

Seeded and bounded for CI; longer on demand::

    OQRON_MODEL_EXAMPLES=200 OQRON_MODEL_STEPS=40 OQRON_MODEL_SEED=7 pytest tests/model

``OQRON_MODEL_SHRINK=0`` reports the first failure unshrunk (``python -m tests.model.replay``
replays a step list). To look past a known defect that examples would hit first, leave rule
groups out with ``OQRON_MODEL_RULES=-outage,-slow`` (``peer``, ``tasks``, ``outage``, ``bus``,
``forged``, ``slow``, ``origin``, ``steady``) or skip a check with
``OQRON_MODEL_IGNORE=P13Broken,P3Broken`` (class names of :mod:`tests.model.oracle`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from oqron_cache.bus import encode_message
from oqron_cache.config import current_runtime
from oqron_cache.task_bodies import do_refresh
from tests.model.gates import WHERES, SlowCall
from tests.model.oracle import (
    CACHES,
    KEYS,
    MAX_CALL_SECONDS,
    PATTERNS,
    PROCS,
    TAGS,
    Op,
    P1Broken,
    P2Broken,
    P7Broken,
    P13BusDropped,
    breach,
    make_value,
)
from tests.model.system import System
from tests.model.world import OriginError

EXAMPLES = int(os.environ.get("OQRON_MODEL_EXAMPLES", "60"))
STEPS = int(os.environ.get("OQRON_MODEL_STEPS", "40"))
SEED = os.environ.get("OQRON_MODEL_SEED")
SHRINK = os.environ.get("OQRON_MODEL_SHRINK", "1") != "0"  # 0: report the first failure as found
GROUPS = {"peer", "tasks", "outage", "bus", "forged", "slow", "origin", "steady"} - {
    g.strip().lstrip("-") for g in os.environ.get("OQRON_MODEL_RULES", "").split(",") if g.strip()
}

procs = st.sampled_from(PROCS if "peer" in GROUPS else ("A",))
caches = st.sampled_from(CACHES)
keys = st.sampled_from(KEYS)
# Across L1's ttl (20), the ttl (30), the tombstone's life (10), ttl + stale_ttl (90) and the
# tag sets' (150); a small step keeps a value where it is.
steps = st.sampled_from([1.0, 9.0, 11.0, 16.0, 21.0, 31.0, 61.0, 91.0, 151.0])


@dataclass
class Held:
    """What the held call is: a get (what it had seen, when it began) or a set (its op)."""

    kind: str = ""
    cache: str = ""
    key: str = ""
    seen: frozenset[int] = frozenset()
    began: float = 0.0
    op: Op | None = None

    def is_get(self, cache: str, key: str) -> bool:
        return (self.kind, self.cache, self.key) == ("get", cache, key)


F = TypeVar("F", bound=Callable[..., Any])


def logged(fn: F) -> F:
    """Record the step (as Hypothesis prints it) and put the steps so far into any failure.

    Hypothesis replays a failing example to print it; when timing makes the replay differ, the
    steps that really failed are still in the message (``python -m tests.model.replay``).
    """

    @functools.wraps(fn)
    def step(self: CacheModel, **kwargs: Any) -> Any:
        top = self.depth == 0
        if top and fn.__name__ != "promises_hold":
            args = ", ".join(f"{name}={value!r}" for name, value in sorted(kwargs.items()))
            self.steps.append(f"state.{fn.__name__}({args})")
        self.depth += 1
        try:
            return fn(self, **kwargs)
        except AssertionError as exc:
            if top and not getattr(exc, "steps_noted", False):
                exc.args = (f"{exc}\n  steps of this run:\n    " + "\n    ".join(self.steps),)
                exc.steps_noted = True  # type: ignore[attr-defined]
            raise
        finally:
            self.depth -= 1

    return cast("F", step)


def check_duration(what: str, seconds: float) -> None:
    if seconds > MAX_CALL_SECONDS:
        breach(P2Broken(f"{what} took {seconds:.2f}s > {MAX_CALL_SECONDS:.2f}s"))


class CacheModel(RuleBasedStateMachine):
    """One example: a fresh namespace in the shared :class:`System`."""

    def __init__(self, system: System) -> None:
        super().__init__()
        self.sys = system
        self.slow: SlowCall | None = None
        self.held = Held()
        self.steps: list[str] = []
        self.depth = 0
        system.begin()

    def teardown(self) -> None:
        if self.slow is not None:
            self.slow.finish()
            self.slow = None
        self.sys.end()

    # -- reads ----------------------------------------------------------------------------

    @rule(proc=procs, cache=caches, key=keys)
    @logged
    def get(self, proc: str, cache: str, key: str) -> None:
        if self.slow is not None and proc == "A" and self.held.is_get(cache, key):
            self.slow_finish()  # a read of the same key would wait for the held one (single-flight)
        self.sys.barrier(proc)  # the bus delay: what was published before the read is delivered
        seen = self.sys.oracle.snapshot(proc)
        now = self.sys.clock.now
        if proc == "A":
            counts = self.sys.caches[cache].stats.counts
            errors = counts["l2_errors"]
            started = time.monotonic()
            try:
                value = self.sys.caches[cache].get(key)
            except OriginError:
                current_runtime().dispatcher.join(5.0)
                self.sys.check_refusal("A", cache, key, counts["l2_errors"] - errors, seen)
                return
            except Exception as exc:
                raise P1Broken(f"A get({cache}, {key!r}) raised {exc!r}") from exc
            elapsed = time.monotonic() - started
            current_runtime().dispatcher.join(5.0)
        else:
            reply = self.sys.peer.call("get", self.sys.ctx(), cache, key)
            self.sys.absorb(reply)
            if "error" in reply:
                raise P1Broken(f"B get({cache}, {key!r}) raised {reply['error']}")
            if "origin_error" in reply:
                self.sys.check_refusal("B", cache, key, int(reply["l2_errors"]), seen)
                return
            value, elapsed = reply["value"], float(reply["elapsed"])
        self.sys.oracle.check_read(proc, cache, key, value, now, seen)
        check_duration(f"{proc} get({cache}, {key!r})", elapsed)

    # -- writes and invalidations -------------------------------------------------------------

    def _write(self, proc: str, kind: str, cache: str, subject: str, value: Any = None) -> None:
        op = self.sys.oracle.begin(kind, proc, cache, subject, self.sys.redis != "up")
        if kind == "set":
            version = self.sys.origin.bump(cache, subject)  # the application writes its origin
            value = make_value(cache, subject, version, op.start, self.sys.clock.now, True)
        what = f"{proc} {kind}({cache}, {subject!r})"
        if proc == "A":
            target = self.sys.caches[cache]
            started = time.monotonic()
            try:
                if kind == "set":
                    target.set(subject, value)
                elif kind == "delete":
                    target.delete(subject)
                elif kind == "pattern":
                    target.invalidate_pattern(subject)
                else:
                    target.invalidate_by_tag(subject)
            except Exception as exc:
                raise P1Broken(f"{what} raised {exc!r}") from exc
            elapsed = time.monotonic() - started
        else:
            reply = self.sys.peer.call("write", self.sys.ctx(), kind, cache, subject, value)
            self.sys.absorb(reply)
            if "error" in reply:
                raise P1Broken(f"{what} raised {reply['error']}")
            elapsed = float(reply["elapsed"])
        self.sys.oracle.end(op)
        check_duration(what, elapsed)

    @rule(proc=procs, cache=caches, key=keys)
    @logged
    def set(self, proc: str, cache: str, key: str) -> None:
        self._write(proc, "set", cache, key)

    @rule(proc=procs, cache=caches, key=keys)
    @logged
    def delete(self, proc: str, cache: str, key: str) -> None:
        self._write(proc, "delete", cache, key)

    @rule(proc=procs, cache=caches, pattern=st.sampled_from(PATTERNS))
    @logged
    def invalidate_pattern(self, proc: str, cache: str, pattern: str) -> None:
        self._write(proc, "pattern", cache, pattern)

    @rule(proc=procs, cache=caches, tag=st.sampled_from(TAGS))
    @logged
    def invalidate_by_tag(self, proc: str, cache: str, tag: str) -> None:
        self._write(proc, "tag", cache, tag)

    @precondition(lambda self: "steady" in GROUPS)
    @rule(proc=procs, cache=caches, key=keys, rounds=st.sampled_from([4, 8, 12]))
    @logged
    def read_steadily(self, proc: str, cache: str, key: str, rounds: int) -> None:
        """A key read every 16 s (past L1's copy, within the ttl): sliding keeps it fresh."""
        for _ in range(rounds):
            self.advance_time(seconds=16.0)
            self.get(proc=proc, cache=cache, key=key)

    # -- time and the origin ------------------------------------------------------------------

    @rule(seconds=steps)
    @logged
    def advance_time(self, seconds: float) -> None:
        self.sys.clock.tick(seconds)
        if self.sys.redis == "up":
            self.sys.view.age(seconds)  # Redis's TTLs (entries, tombstones, locks) pass too

    @precondition(lambda self: "origin" in GROUPS)
    @rule(cache=caches, key=keys)
    @logged
    def origin_change(self, cache: str, key: str) -> None:
        self.sys.origin.bump(cache, key)  # someone else wrote the origin; the cache is not told

    @precondition(lambda self: "origin" in GROUPS)
    @rule(cache=caches, key=keys, failing=st.booleans())
    @logged
    def origin_fails(self, cache: str, key: str, failing: bool) -> None:
        if failing:
            self.sys.origin.failing.add((cache, key))
        else:
            self.sys.origin.failing.discard((cache, key))

    # -- refresh tasks (sent by A's dispatcher to the fake broker) ----------------------------

    # Preconditions depend on the model only (never on what the library did), so that Hypothesis
    # draws the same data when it replays an example; a rule with nothing to act on does nothing.

    @precondition(lambda self: "tasks" in GROUPS)
    @rule(index=st.integers(0, 7), where=procs, again=st.booleans())
    @logged
    def run_task(self, index: int, where: str, again: bool) -> None:
        """Run a queued refresh task (any one: out of order); ``again`` keeps it queued."""
        tasks = self.sys.enqueuer.tasks
        if not tasks:
            return
        task = tasks[index % len(tasks)]
        if not again:
            tasks.remove(task)
        if where == "A":
            try:
                do_refresh(task.cache, task.key, task.token, task.seen_hex)
            except Exception as exc:
                raise P1Broken(f"refresh task {task} raised {exc!r} in A") from exc
            current_runtime().dispatcher.join(5.0)
        else:
            reply = self.sys.peer.call(
                "refresh", self.sys.ctx(), task.cache, task.key, task.token, task.seen_hex
            )
            self.sys.absorb(reply)
            if "error" in reply:
                raise P1Broken(f"refresh task {task} raised in B: {reply['error']}")

    @precondition(lambda self: "tasks" in GROUPS)
    @rule(index=st.integers(0, 7))
    @logged
    def drop_task(self, index: int) -> None:
        """A lost task (broker or worker died): its lock stays until it expires."""
        tasks = self.sys.enqueuer.tasks
        if tasks:
            tasks.pop(index % len(tasks))

    # -- faults -------------------------------------------------------------------------------

    @precondition(lambda self: "outage" in GROUPS and self.sys.redis == "up")
    @rule(mode=st.sampled_from(["kill", "pause"]))
    @logged
    def redis_down(self, mode: str) -> None:
        if mode == "kill":
            self.sys.server.kill()
        else:
            self.sys.server.pause()
        self.sys.redis = mode

    @precondition(lambda self: self.sys.redis != "up")
    @rule()
    @logged
    def redis_up(self) -> None:
        paused = self.sys.redis == "pause"
        self.sys.restore_redis()
        if paused:
            self.sys.check_locks()  # at once: requests queued during the pause have just run
        if not self.sys.settle():
            raise P2Broken("a circuit breaker stayed open 5 s after Redis came back")
        if not self.sys.wait_healthy():
            raise P7Broken("a bus did not resubscribe within 5 s of Redis coming back")

    @precondition(lambda self: "bus" in GROUPS and self.sys.redis == "up")
    @rule(wait=st.booleans())
    @logged
    def bus_drop(self, wait: bool) -> None:
        """``CLIENT KILL TYPE pubsub``; ``wait``: until both buses are back (else go on)."""
        self.sys.view.kill_bus()
        if wait and not self.sys.wait_healthy():
            raise P7Broken("a bus did not resubscribe within 5 s of losing its connection")

    @precondition(lambda self: "forged" in GROUPS and self.sys.redis == "up")
    @rule(cache=caches, kind=st.sampled_from(["junk", "nested", "bad-pattern", "bad-keys"]))
    @logged
    def forged_message(self, cache: str, kind: str) -> None:
        """A malformed message on the bus (any service on this Redis can publish one)."""
        before = {proc: self.sys.state(proc)["bus_reconnects"] for proc in PROCS}
        data = {
            "junk": b"\xff not json",
            "nested": b"[" * 5000,
            "bad-pattern": encode_message("forged", cache, "pattern", ["k["]),
            "bad-keys": b'{"o":"forged","c":"%s","op":"evict","k":[1,2]}' % cache.encode(),
        }[kind]
        self.sys.view.publish(data)
        for proc in PROCS:
            self.sys.barrier(proc)
        for proc in PROCS:
            state = self.sys.state(proc)
            if state["bus_reconnects"] != before[proc] or not state["bus_healthy"]:
                breach(
                    P13BusDropped(
                        f"a malformed bus message ({kind}) made {proc} drop its bus "
                        f"(reconnects {before[proc]} -> {state['bus_reconnects']}, "
                        f"healthy={state['bus_healthy']})"
                    )
                )

    # -- a call held in a thread while other steps run ----------------------------------------

    @precondition(lambda self: "slow" in GROUPS)
    @rule(cache=caches, key=keys, where=st.sampled_from(WHERES))
    @logged
    def slow_get(self, cache: str, key: str, where: str) -> None:
        """A get held at ``where`` (it goes on at ``slow_finish``, or when the next one starts)."""
        self.slow_finish()
        self.sys.barrier("A")
        seen = self.sys.oracle.snapshot("A")
        target = self.sys.caches[cache]
        self.slow = SlowCall(self.sys.gates, where, lambda: target.get(key))
        self.held = Held("get", cache, key, seen, self.sys.clock.now)
        self.sys.slow_slot = (cache, key)
        if not self.slow.start():
            self.slow_finish()  # it returned without reaching its gate: an ordinary read

    @precondition(lambda self: "slow" in GROUPS)
    @rule(cache=caches, key=keys)
    @logged
    def slow_set(self, cache: str, key: str) -> None:
        """A set held between its L2 write and its L1 put."""
        self.slow_finish()
        op = self.sys.oracle.begin("set", "A", cache, key, self.sys.redis != "up")
        version = self.sys.origin.bump(cache, key)
        value = make_value(cache, key, version, op.start, self.sys.clock.now, True)
        target = self.sys.caches[cache]
        self.slow = SlowCall(self.sys.gates, "l1put", lambda: target.set(key, value))
        self.held = Held("set", cache, key, op=op)
        if not self.slow.start():
            self.slow_finish()

    @precondition(lambda self: "slow" in GROUPS)
    @rule()
    @logged
    def slow_finish(self) -> None:
        call, self.slow = self.slow, None
        if call is None:
            return
        kind, cache, key, op = self.held.kind, self.held.cache, self.held.key, self.held.op
        if not call.finish():
            raise P2Broken(f"held {kind}({cache}, {key!r}) did not return within 15 s of release")
        if self.sys.redis != "up" and self.sys.slow_slot is not None:
            self.sys.unreleased.add(self.sys.slow_slot)
        self.sys.slow_slot = None
        current_runtime().dispatcher.join(5.0)
        if op is not None:
            if call.error is not None:
                raise P1Broken(f"held set({cache}, {key!r}) raised {call.error!r}")
            self.sys.oracle.end(op)
            return
        if isinstance(call.error, OriginError):
            return  # what was servable when it began is not known any more
        if call.error is not None:
            raise P1Broken(f"held get({cache}, {key!r}) raised {call.error!r}")
        # P3 as of when it began (a load that takes long returns an old value by nature).
        self.sys.oracle.check_read(
            "A (held)", cache, key, call.result, self.held.began, self.held.seen
        )

    # -- after every step ---------------------------------------------------------------------

    @invariant()
    @logged
    def promises_hold(self) -> None:
        delivered = [self.sys.barrier(proc) for proc in PROCS]  # both, whatever the first says
        states = {proc: self.sys.state(proc) for proc in PROCS}
        for proc, state in states.items():
            self.sys.check_l1(proc, state)
        if self.sys.redis == "up":
            self.sys.check_locks()
            self.sys.check_tag_sets()
            if all(delivered) and self.slow is None:
                self.sys.check_coherence(states)


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    made = System()
    try:
        yield made
    finally:
        made.close()


@pytest.mark.timeout(120 + EXAMPLES * STEPS * 2)
def test_model(system: System) -> None:
    """The machine, seeded (derandomized unless ``OQRON_MODEL_SEED``), no example database."""

    class Model(CacheModel):
        def __init__(self) -> None:
            super().__init__(system)

    machine = Model if SEED is None else seed(int(SEED))(Model)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            derandomize=SEED is None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
            phases=[
                Phase.explicit,
                Phase.reuse,
                Phase.generate,
                *([Phase.shrink] if SHRINK else []),
            ],
        ),
    )
