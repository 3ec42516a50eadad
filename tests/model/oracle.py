"""The model's side: what every value carries, which operations make a value obsolete, and when.

Every value the system can return is a dict stamped by whoever made it::

    {"c": cache, "k": key, "v": origin version, "r": stamp, "t": clock time, "w": from set()?}

``r`` comes from one logical counter (:meth:`Oracle.tick`) shared by both processes: a resolver
takes a stamp when it reads the origin, a ``set()`` / ``delete()`` / invalidation takes one when
it begins and another when it returns. The model's ``set()`` is what an application does: it
writes the origin (a new version) and then the cache, so its value is stamped when it begins.

When is a value *obsolete* after an operation X (that returned before a read began and, in the
other process, was delivered by the bus)?

* X is a ``set()``: the value's stamp precedes X's beginning (a load that read the origin
  before X wrote it, or an earlier set: the origin's order is the sets' order).
* X is a ``delete()`` or an invalidation: a loaded value read the origin before X began (DESIGN
  section 5: nothing loaded before the call began is served after it returns); a set's value
  is obsolete only if that set had returned before X began (an overlapping set may come after).

P5: no read returns an obsolete value that X covers (its key, its pattern, or its tag). P7: no
L1 holds one, servable, once the bus has delivered X.

Each promise that can break has its own exception type, so Hypothesis reports each separately.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

FIXED = "model-fixed"  # fixed ttl, tagged
SLIDING = "model-sliding"  # sliding ttl, tagged
CACHES = (FIXED, SLIDING)
KEYS = ("k0", "k1", "k2", "k3")
PATTERNS = ("k0", "k[12]", "k?", "*3", "k*")
TAGS = ("g:a", "g:b", "p:0", "p:1")
PROCS = ("A", "B")  # A: this process (the test's), B: the peer process

TTL = 30.0  # seconds of the injected clock
STALE_TTL = 60.0
L1_TTL = 20.0
L1_MAX = 3  # fewer than the keys: L1 evicts (P9)
LOCK_TTL = 1.0  # real seconds (Redis PX and the waiters' deadline)
OP_TIMEOUT = 0.1
BOUND = TTL + STALE_TTL  # P3
# P13: members one key may keep in one tag set (its entry, one being replaced, some slack); the
# tag index of a key written n times without an invalidation must not hold n members.
TAG_MEMBERS_PER_KEY = 4
# P2: a read may wait out one lock held by a lost refresh, plus a few Redis timeouts; the rest
# is slack for a loaded CI machine.
MAX_CALL_SECONDS = LOCK_TTL + 6 * OP_TIMEOUT + 3.0


class PromiseBroken(AssertionError):
    """A promise of DESIGN section 8 does not hold."""


# For looking past a known defect while exploring (never in CI): exception class names, e.g.
# OQRON_MODEL_IGNORE=P13Broken,P3Broken. A check whose class (or a base) is named is skipped.
IGNORED = frozenset(n.strip() for n in os.environ.get("OQRON_MODEL_IGNORE", "").split(",") if n)


def breach(error: PromiseBroken) -> None:
    """Raise ``error``, unless its promise is being ignored (see ``IGNORED``)."""
    if not IGNORED.intersection(cls.__name__ for cls in type(error).__mro__):
        raise error


class P1Broken(PromiseBroken):
    """An infrastructure error (or a resolver error with something servable) reached a caller."""


class P2Broken(PromiseBroken):
    """A call took longer than any lock or timeout explains."""


class P3Broken(PromiseBroken):
    """A value older than ttl + stale_ttl was served."""


class P3SlowLoad(P3Broken):
    """... a value whose load was held while the clock moved: its age counts from the origin
    read, the entry's ``created_at`` from when the resolver returned."""


class P5Broken(PromiseBroken):
    """A read returned a value older than a write or invalidation that completed before it."""


class P7Broken(PromiseBroken):
    """An L1 still holds a servable value that a delivered invalidation made obsolete."""


# One class per kind of operation that was lost, so Hypothesis reports each kind on its own
# (it tells failures apart by exception type and place).
class P5AfterSet(P5Broken):
    """... older than a completed set()."""


class P5AfterDelete(P5Broken):
    """... older than a completed delete()."""


class P5AfterPattern(P5Broken):
    """... older than a completed invalidate_pattern()."""


class P5AfterTag(P5Broken):
    """... older than a completed invalidate_by_tag()."""


class P5AfterOutage(P5Broken):
    """... older than a write or invalidation made while Redis was down (P14: replayed)."""


class P7AfterDelete(P7Broken):
    """... made obsolete by a set() or delete()."""


class P7AfterInvalidation(P7Broken):
    """... made obsolete by a pattern or tag invalidation."""


class P7AfterOutage(P7Broken):
    """... made obsolete by an operation made while Redis was down (P14: replayed)."""


def p5_error(op: Op) -> type[P5Broken]:
    if op.during_outage:
        return P5AfterOutage
    return {"set": P5AfterSet, "delete": P5AfterDelete, "pattern": P5AfterPattern}.get(
        op.kind, P5AfterTag
    )


def p7_error(op: Op) -> type[P7Broken]:
    if op.during_outage:
        return P7AfterOutage
    return P7AfterDelete if op.kind in ("set", "delete") else P7AfterInvalidation


class CoherenceBroken(PromiseBroken):
    """With nothing in flight and the bus delivered, an L1 holds another version than L2."""


class P8Broken(PromiseBroken):
    """A lock key without a TTL."""


class P9Broken(PromiseBroken):
    """An L1 holds more than max_size entries."""


class P14Broken(PromiseBroken):
    """A lock nobody holds (a lock request that timed out ran later)."""


class P13Broken(PromiseBroken):
    """Bounded cost for any input (DESIGN section 13)."""


class P13BusDropped(P13Broken):
    """A malformed bus message was taken for a lost connection."""


class P13TagSetGrows(P13Broken):
    """A tag set keeps a member for every version a key ever had."""


class P1Refusal(P1Broken):
    """The resolver's error reached a caller although a servable value existed."""


class WrongValue(PromiseBroken):
    """A read returned something that is not the value of the key it asked for."""


def group(key: str) -> str:
    return "a" if key in ("k0", "k1") else "b"


def tags_of(key: str, value: Any) -> list[str]:
    """The tags function of both caches: the key's group and the version's parity."""
    return [f"g:{group(key)}", f"p:{int(value['v']) % 2}"]


def make_value(cache: str, key: str, version: int, stamp: int, now: float, written: bool) -> Any:
    return {"c": cache, "k": key, "v": version, "r": stamp, "t": now, "w": written}


@dataclass
class Op:
    """A set, delete or invalidation: what it covers and when it began and returned."""

    ident: int
    kind: str  # "set" | "delete" | "pattern" | "tag"
    proc: str
    cache: str
    subject: str  # the key, the pattern or the tag
    start: int
    end: int | None = None
    during_outage: bool = False

    def covers(self, value: Any) -> bool:
        if value["c"] != self.cache:
            return False
        if self.kind in ("set", "delete"):
            return bool(value["k"] == self.subject)
        if self.kind == "pattern":
            return fnmatchcase(value["k"], self.subject)
        return self.subject in tags_of(value["k"], value)

    def __str__(self) -> str:
        where = " (Redis down)" if self.during_outage else ""
        return f"{self.proc}.{self.kind}({self.cache}, {self.subject!r})@{self.start}{where}"


@dataclass
class Oracle:
    """The bookkeeping of one example: stamps, operations, and what each process has seen."""

    seq: int = 0
    ops: list[Op] = field(default_factory=list)
    visible: dict[str, set[int]] = field(default_factory=lambda: {p: set() for p in PROCS})
    set_done: dict[int, int] = field(default_factory=dict)  # a set's start stamp -> end stamp
    last_served: dict[tuple[str, str, int], float] = field(default_factory=dict)
    held_loads: set[int] = field(default_factory=set)  # stamps of origin reads by a held call

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def begin(self, kind: str, proc: str, cache: str, subject: str, outage: bool) -> Op:
        op = Op(len(self.ops), kind, proc, cache, subject, self.tick(), during_outage=outage)
        self.ops.append(op)
        return op

    def end(self, op: Op) -> None:
        op.end = self.tick()
        self.visible[op.proc].add(op.ident)
        if op.kind == "set":
            self.set_done[op.start] = op.end

    def delivered(self, proc: str) -> None:
        """The bus delivered to ``proc`` everything published so far: all completed ops count."""
        self.visible[proc].update(op.ident for op in self.ops if op.end is not None)

    def snapshot(self, proc: str) -> frozenset[int]:
        return frozenset(self.visible[proc])

    def obsoleted_by(self, value: Any, seen: frozenset[int]) -> Op | None:
        """The first operation in ``seen`` that makes ``value`` obsolete, if any."""
        stamp = int(value["r"])
        # For a delete or an invalidation: when the value was in the cache for sure.
        settled = self.set_done.get(stamp, math.inf) if value["w"] else stamp
        for ident in sorted(seen):
            op = self.ops[ident]
            before = stamp < op.start if op.kind == "set" else settled < op.start
            if before and op.covers(value):
                return op
        return None

    def age_origin(self, cache: str, value: Any) -> float:
        """The instant P3 counts the value's age from (sliding: its last read)."""
        t = float(value["t"])
        if cache == SLIDING:
            t = max(t, self.last_served.get((cache, value["k"], int(value["r"])), t))
        return t

    def check_read(
        self, who: str, cache: str, key: str, value: Any, now: float, seen: frozenset[int]
    ) -> None:
        """P3 and P5 (and the value's identity) for one read that returned ``value``."""
        if not (isinstance(value, dict) and value.get("c") == cache and value.get("k") == key):
            raise WrongValue(f"{who} get({cache}, {key!r}) returned {value!r}")
        born = self.age_origin(cache, value)
        if now >= born + BOUND:
            late = P3SlowLoad if int(value["r"]) in self.held_loads else P3Broken
            breach(
                late(
                    f"{who} get({cache}, {key!r}) at t={now:.1f} returned {value!r}, "
                    f"{now - born:.1f}s old > ttl + stale_ttl = {BOUND}"
                )
            )
        op = self.obsoleted_by(value, seen)
        if op is not None:
            breach(
                p5_error(op)(
                    f"{who} get({cache}, {key!r}) returned {value!r} (stamp {value['r']}), "
                    f"older than {op}, which completed (and was delivered) before the read began"
                )
            )
        slot = (cache, key, int(value["r"]))
        self.last_served[slot] = max(self.last_served.get(slot, now), now)

    def describe(self) -> str:
        return "; ".join(str(op) for op in self.ops[-8:])
