"""The history checker (bench/history_check.py) on small hand-made histories.

A checker that cannot fail is worthless: every rule gets a history that breaks it and a
near-identical one that does not (concurrency, the bus delay, a fault window). The recorder
(bench/history.py) is tested end to end, fork included.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.history import Event, Recorder, load, make_value, parse_value
from bench.history_check import Bounds, Window, check, percentile

B = Bounds(ttl=1.0, stale_ttl=10.0, slack=0.5, bus_delay=0.5, recovery_base=1.0, op_timeout=0.25)


def ev(op: str, t0: float, t1: float, **fields: Any) -> Event:
    fields.setdefault("p", 1)
    fields.setdefault("th", "t")
    fields.setdefault("c", "c")
    if op not in ("pattern", "tag", "fault"):
        fields.setdefault("k", "k")
    return Event(op=op, t0=t0, t1=t1, m0=t0, m1=t1, **fields)


def get(t0: float, v: int, vt: float, w: str = "r:9", t1: float | None = None, **kw: Any) -> Event:
    return ev("get", t0, t0 + 0.001 if t1 is None else t1, v=v, vt=vt, w=w, **kw)


def put(t0: float, t1: float, v: int, p: int = 2, th: str = "w") -> Event:
    return ev("set", t0, t1, v=v, vt=t0, w=f"s:{p}:{th}", p=p, th=th)


def sget(t0: float, v: int, at: float, p: int = 2, th: str = "w", **kw: Any) -> Event:
    """A get returning the value of the set ``put(at, ..., v, p, th)``."""
    return get(t0, v, at, w=f"s:{p}:{th}", **kw)


def rules(*events: Event, bounds: Bounds = B, windows: tuple[Window, ...] = ()) -> dict[str, int]:
    return dict(check(list(events), bounds, windows).rules())


# -- P1: errors reaching callers --------------------------------------------------------------


def test_an_infrastructure_error_reaching_a_caller_is_a_violation() -> None:
    assert rules(ev("get", 1, 2, out="TimeoutError")) == {"infra_error": 1}
    assert rules(ev("delete", 1, 2, out="ConnectionError")) == {"infra_error": 1}


def test_the_resolvers_injected_error_is_allowed_on_a_get_only() -> None:
    assert rules(ev("get", 1, 2, out="InjectedResolverError")) == {}
    assert rules(ev("set", 1, 2, out="InjectedResolverError", v=1)) == {"infra_error": 1}


def test_errors_can_be_allowed_for_one_cache() -> None:
    bounds = Bounds(ttl=1, stale_ttl=2, allowed={"set:wt": frozenset({"WriteThroughError"})})
    assert rules(ev("set", 1, 2, c="wt", v=1, out="WriteThroughError"), bounds=bounds) == {}
    assert rules(ev("set", 1, 2, c="plain", v=1, out="WriteThroughError"), bounds=bounds) == {
        "infra_error": 1
    }


def test_failures_are_counted_by_op_and_type() -> None:
    report = check([ev("get", 1, 2, out="InjectedResolverError"), get(3, 1, 3)], B)
    assert report.failures == {"get:InjectedResolverError": 1}
    assert (report.calls, report.served) == (2, 1)


# -- P3: staleness ----------------------------------------------------------------------------


def test_a_value_older_than_ttl_plus_stale_ttl_plus_slack_is_a_violation() -> None:
    assert rules(get(20.0, 1, 20.0 - 11.6)) == {"staleness": 1}
    assert rules(get(20.0, 1, 20.0 - 11.4)) == {}
    assert check([get(10.0, 1, 7.0)], B).max_staleness == pytest.approx(3.0)


def test_a_write_through_value_is_as_old_as_its_origin_write() -> None:
    # Set at 10 (version taken), origin written at 12 by a delayed chain: 11.4 s old at 23.4.
    written = ev("origin_write", 11.9, 12.0, v=1)
    assert rules(written, sget(23.4, v=1, at=10.0, t1=23.401)) == {}
    assert rules(written, sget(23.6, v=1, at=10.0, t1=23.601)) == {"staleness": 1}
    assert rules(sget(23.4, v=1, at=10.0, t1=23.401)) == {"staleness": 1}
    # A resolver that read that version from the origin later dates it from its read.
    assert rules(written, get(23.6, v=1, vt=20.0)) == {}


def test_a_get_without_a_versioned_value_is_reported() -> None:
    assert rules(ev("get", 1, 2)) == {"bad_value": 1}


# -- P5: nothing older than a completed write or invalidation ---------------------------------


def test_a_fill_that_read_the_origin_before_a_completed_set_is_a_stale_overwrite() -> None:
    write = put(1.0, 1.1, v=2)
    assert rules(write, get(2.0, v=1, vt=0.9)) == {"stale_overwrite": 1, "lost_write": 1}
    report = check([write, get(2.0, v=1, vt=0.9)], B)
    [overwrite] = [v for v in report.violations if v.rule == "stale_overwrite"]
    assert overwrite.cause is write


def test_a_get_within_the_bus_delay_may_still_see_the_old_value() -> None:
    assert rules(put(1.0, 1.1, v=2), get(1.5, v=1, vt=0.9)) == {}


def test_a_fill_that_read_the_origin_before_the_set_took_its_version_loses_to_it() -> None:
    # Defect 4's race: the fill read v1 while the set ran; it must not be served once the set
    # completed. A fill that read the set's version (or a newer one) is fine.
    assert rules(put(1.0, 1.1, v=2), get(2.0, v=1, vt=1.05)) == {
        "stale_overwrite": 1,
        "lost_write": 1,
    }
    assert rules(put(1.0, 1.1, v=2), get(2.0, v=2, vt=1.05)) == {}


def test_an_older_set_visible_after_a_newer_completed_set_is_a_stale_read() -> None:
    older, newer = put(1.0, 1.1, v=1), put(2.0, 2.1, v=2)
    assert rules(older, newer, sget(3.0, v=1, at=1.0)) == {"stale_read": 1, "lost_write": 1}
    assert rules(older, newer, sget(3.0, v=2, at=2.0)) == {}


def test_overlapping_sets_may_end_in_either_order() -> None:
    # v1's set completed after v2's began: "v2 then v1" is a valid order.
    assert rules(put(1.0, 2.0, v=1), put(1.5, 1.6, v=2), sget(3.0, v=1, at=1.0)) == {}


def test_a_set_of_another_key_or_cache_does_not_matter() -> None:
    other_key = ev("set", 1.0, 1.1, k="other", v=2, vt=1.0, w="s:2:w", p=2, th="w")
    other_cache = ev("set", 1.0, 1.1, c="other", v=2, vt=1.0, w="s:2:w", p=2, th="w")
    assert rules(other_key, other_cache, get(2.0, v=1, vt=0.9)) == {}


def test_a_value_loaded_before_a_completed_delete_began_is_a_violation() -> None:
    delete = ev("delete", 2.0, 2.1)
    assert rules(put(1.0, 1.1, v=1), delete, sget(3.0, v=1, at=1.0)) == {"stale_read": 1}
    assert rules(delete, get(3.0, v=1, vt=1.5)) == {"stale_overwrite": 1}
    assert rules(delete, get(3.0, v=1, vt=2.05)) == {}  # read while the delete ran
    assert rules(delete, get(2.3, v=1, vt=1.5)) == {}  # within the bus delay


def test_pattern_and_tag_invalidations_cover_the_keys_they_name() -> None:
    pattern = ev("pattern", 2.0, 2.1, k="k*", ks=("k", "k2"))
    tag = ev("tag", 2.0, 2.1, k="g1", ks=("k",))
    elsewhere = ev("tag", 2.0, 2.1, k="g2", ks=("k3",))
    assert rules(pattern, get(3.0, v=1, vt=1.5)) == {"stale_overwrite": 1}
    assert rules(tag, get(3.0, v=1, vt=1.5)) == {"stale_overwrite": 1}
    assert rules(elsewhere, get(3.0, v=1, vt=1.5)) == {}


def test_a_failed_write_or_invalidation_promises_nothing() -> None:
    failed = ev("set", 1.0, 1.1, v=2, vt=1.0, w="s:2:w", out="WriteThroughError")
    failed_delete = ev("delete", 1.0, 1.1, out="TimeoutError")
    assert rules(failed, failed_delete, get(3.0, v=1, vt=0.5)) == {"infra_error": 2}


def test_a_write_in_a_fault_window_is_due_after_the_window_and_the_recovery() -> None:
    write = put(5.0, 5.1, v=2)
    window = (Window(4.0, 7.0),)  # due: 7 + recovery 1 + min(3, cap 5) + bus 0.5 = 11.5
    assert rules(write, get(11.4, v=1, vt=4.9), windows=window) == {}
    assert rules(write, get(11.6, v=1, vt=4.9), windows=window) == {
        "stale_overwrite": 1,
        "lost_write": 1,
    }


def test_a_write_after_the_window_but_before_it_healed_is_due_when_it_heals() -> None:
    # The writer's breaker may still be open after the fault: its write is replayed later.
    window = (Window(4.0, 5.0),)  # heals at 5 + 1 + 1 + 0.5 = 7.5
    assert rules(put(6.0, 6.1, v=2), get(7.4, v=1, vt=3.0), windows=window) == {}
    assert rules(put(6.0, 6.1, v=2), get(7.6, v=1, vt=3.0), windows=window) == {
        "stale_overwrite": 1,
        "lost_write": 1,
    }
    assert rules(put(7.5, 7.6, v=2), get(8.2, v=1, vt=3.0), windows=window) == {
        "stale_overwrite": 1,
        "lost_write": 1,
    }


def test_fault_events_in_the_history_are_windows() -> None:
    fault = ev("fault", 4.0, 7.0, k="redis_kill", c=None)
    assert rules(fault, put(5.0, 5.1, v=2), get(10.9, v=1, vt=4.9)) == {}
    assert check([fault], B).windows == [Window(4.0, 7.0, "redis_kill")]


def test_a_write_just_before_a_window_whose_bus_message_was_lost_is_due_after_it() -> None:
    # Completed at 3.8; its bus delay reaches into the window that begins at 4.0.
    assert rules(put(3.7, 3.8, v=2), get(5.0, v=1, vt=3.0), windows=(Window(4.0, 7.0),)) == {}


def test_windows_chain_when_the_extended_deadline_reaches_the_next() -> None:
    windows = (Window(4.0, 5.0), Window(6.5, 7.0))  # due 5 + 1 + 1 + .5 -> 7 + 1 + .5 + .5 = 9
    assert rules(put(4.5, 4.6, v=2), get(8.9, v=1, vt=4.0), windows=windows) == {}
    assert rules(put(4.5, 4.6, v=2), get(9.1, v=1, vt=4.0), windows=windows) == {
        "stale_overwrite": 1,
        "lost_write": 1,
    }


# -- lost acknowledged writes -----------------------------------------------------------------


def test_an_acknowledged_set_no_later_get_saw_is_a_lost_write() -> None:
    history = [put(1.0, 1.1, v=1), put(2.0, 2.1, v=2), sget(3.0, v=1, at=1.0)]
    assert rules(*history, sget(4.0, v=1, at=1.0)) == {"stale_read": 2, "lost_write": 1}
    assert rules(*history, sget(4.0, v=2, at=2.0)) == {"stale_read": 1}


def test_a_set_overtaken_before_anyone_looked_is_not_lost() -> None:
    assert rules(put(1.0, 1.1, v=1), put(1.3, 1.4, v=2), sget(3.0, v=2, at=1.3)) == {}


def test_a_newer_version_from_the_origin_counts_as_seen() -> None:
    # Deleted later; the resolver read v3 from the origin (a newer write elsewhere).
    assert rules(put(1.0, 1.1, v=2), get(3.0, v=3, vt=2.9)) == {}


# -- stalls ----------------------------------------------------------------------------------


def test_a_get_that_waits_past_the_limit_is_a_stall() -> None:
    report = check([get(1.0, v=1, vt=1.0, t1=3.0)], B)
    assert report.stall_limit == pytest.approx(3 * 0.25 + 0.5)
    assert dict(report.rules()) == {"stall": 1}
    assert "first resolver run: none" in report.violations[0].detail


def test_a_gets_own_resolver_time_is_not_a_stall() -> None:
    run = ev("origin_read", 1.5, 2.5, v=1, p=1, th="t")
    assert rules(run, get(1.0, v=1, vt=2.0, t1=4.0)) == {}  # waited 2.0 < 1.25 + 1.0
    late = ev("origin_read", 3.8, 3.9, v=1, p=7, th="x")  # the lock expired; someone computed
    report = check([late, get(1.0, v=1, vt=3.85, t1=4.0)], B)
    assert dict(report.rules()) == {"stall": 1}  # 3.0 > 1.25 + 0.1: a lock nobody held
    assert "first resolver run: 2.800s after it began" in report.violations[0].detail


def test_waiting_for_a_holder_that_computes_the_key_is_not_a_stall() -> None:
    holder = ev("origin_read", 1.5, 2.5, v=1, p=7, th="x")  # a slow resolver elsewhere
    report = check([holder, get(1.0, v=1, vt=2.0, t1=4.0)], B)  # waited 3.0 > 2.25
    assert (dict(report.rules()), report.held_stalls) == ({}, 1)


def test_a_failed_resolver_run_is_no_holder() -> None:
    # A refresh that failed keeps the key's lock as a throttle: a reader with nothing to serve
    # then waits for a lock that nobody will fill.
    failed = ev("origin_read", 0.9, 0.95, p=7, th="x", out="InjectedResolverError")
    late = ev("origin_read", 2.9, 2.95, v=1, p=1, th="t")  # the reader's own, at lock expiry
    assert rules(failed, late, get(1.0, v=1, vt=2.92, t1=3.0)) == {"stall": 1}


# -- duplicate resolver runs ------------------------------------------------------------------


def test_overlapping_resolver_runs_of_one_key_are_duplicates() -> None:
    runs = [
        ev("origin_read", 1.0, 1.2, v=1, p=1),
        ev("origin_read", 1.1, 1.3, v=1, p=2),
        ev("origin_read", 1.25, 1.4, v=1, p=3),
        ev("origin_read", 2.0, 2.1, v=1, p=1),
        ev("origin_read", 1.1, 1.2, k="other", v=1, p=4),
    ]
    report = check(runs, B)
    assert (report.resolver_runs, report.duplicates) == (5, 2)
    assert dict(report.rules()) == {}
    strict = Bounds(ttl=1, stale_ttl=2, dedup=True)
    assert dict(check(runs, strict).rules()) == {"duplicate_run": 2}


def test_a_run_that_begins_after_a_change_landed_during_an_older_run_is_not_a_duplicate() -> None:
    strict = Bounds(ttl=1, stale_ttl=2, dedup=True)
    older = ev("origin_read", 1.0, 1.5, v=1, p=1)
    newer = ev("origin_read", 1.3, 1.6, v=2, p=2)
    for change in (ev("delete", 1.1, 1.2), put(1.1, 1.2, 5), ev("pattern", 1.1, 1.2, ks=("k",))):
        assert dict(check([older, change, newer], strict).rules()) == {}, change.op
    # near misses: the change ended before the older run began, began after the newer one did,
    # or changed another key
    for change in (ev("delete", 0.5, 0.9), ev("delete", 1.35, 1.4), ev("delete", 1.1, 1.2, k="j")):
        assert dict(check([older, change, newer], strict).rules()) == {"duplicate_run": 1}
    # the older load took its lock when its get began, the delete dropped it, then the older
    # resolver started: the newer run is excused, but not if nothing marks the get's start
    lock_first = ev("origin_read", 1.25, 1.5, v=1, p=1)
    change = ev("delete", 1.1, 1.2)
    caller = get(1.0, v=1, vt=1.3, w="r:1", t1=1.55)
    assert dict(check([caller, lock_first, change, newer], strict).rules()) == {}
    assert dict(check([lock_first, change, newer], strict).rules()) == {"duplicate_run": 1}
    # the later origin read is the older load: its get took the lock, a delete dropped it,
    # another load took it and reached the origin first (seen in the stress test)
    first_lock = get(1.0, v=1, vt=1.3, w="r:1", t1=1.6)
    late_start = ev("origin_read", 1.3, 1.55, v=1, p=1)
    other = ev("origin_read", 1.2, 1.4, v=1, p=2)
    delete = ev("delete", 1.05, 1.1)
    assert dict(check([first_lock, late_start, other, delete], strict).rules()) == {}
    assert dict(check([first_lock, late_start, other], strict).rules()) == {"duplicate_run": 1}
    # a change during the older run does not excuse a third run that overlaps the second
    third = ev("origin_read", 1.4, 1.7, v=2, p=3)
    report = check([older, ev("delete", 1.1, 1.2), newer, third], strict)
    assert dict(report.rules()) == {"duplicate_run": 1}


# -- tasks, latency --------------------------------------------------------------------------


def test_tasks_published_and_never_started_are_lost() -> None:
    history = [
        ev("task_pub", 1, 1, x={"id": "a"}),
        ev("task_run", 2, 2, x={"id": "a"}),
        ev("task_pub", 1, 1, x={"id": "b"}),
        ev("task_pub", 1, 1, x={"id": "c"}),
        ev("task_revoked", 2, 2, x={"id": "c"}),
        ev("task_pub", 3, 3, x={"id": "a"}),  # the same id published again, never run again
    ]
    report = check(history, B)
    assert report.tasks == {"published": 4, "started": 1, "revoked": 1, "lost": 2}
    assert report.task_wait == (1.0, 1.0, 1.0)


def test_latency_percentiles() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    report = check([get(float(i), 1, float(i), t1=i + 0.01 * i) for i in range(1, 101)], B)
    p50, p99, most = report.latency["get"]
    assert (p50, p99, most) == pytest.approx((0.5, 0.99, 1.0))


# -- the recorder -----------------------------------------------------------------------------


def test_values_round_trip() -> None:
    assert parse_value(make_value(3, 1.5, "r:1")) == (3, 1.5, "r:1")
    assert parse_value({"v": "3", "t": 1.0, "w": "r"}) is None
    assert parse_value(None) is None


def test_recorder_writes_one_file_per_process_and_load_merges_them(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    with recorder.op("set", "c", "k") as rec:
        rec["v"] = 1
    with pytest.raises(KeyError), recorder.op("get", "c", "k"):
        raise KeyError("x")
    thread = threading.Thread(target=lambda: recorder.event("fault", k="redis_pause"), name="f")
    thread.start()
    thread.join()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            with recorder.op("get", "c", "k") as rec:
                rec["v"] = 2
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    recorder.close()
    with open(tmp_path / f"h-{os.getpid()}.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"op": "get", "t0": 1')  # a torn last line (a killed process)
    events = load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"h-{os.getpid()}.jsonl", f"h-{pid}.jsonl"]
    )
    by_op = [(e.op, e.out, e.p) for e in events]
    assert by_op == [
        ("set", "ok", os.getpid()),
        ("get", "KeyError", os.getpid()),
        ("fault", "ok", os.getpid()),
        ("get", "ok", pid),
    ]
    assert events[0].v == 1 and events[0].duration >= 0
    assert events[2].th == "f" and events[2].k == "redis_pause"
    first = json.loads((tmp_path / f"h-{os.getpid()}.jsonl").read_text().splitlines()[0])
    assert set(first) == {"op", "c", "k", "v", "t0", "m0", "m1", "t1", "out", "p", "th"}
