"""A web process for the worker tests: ``python -m tests.procs.web --url --broker --ns``.

It imports :mod:`tests.procs.refresh_caches` (the caches the worker serves), builds a Celery app
on ``--broker`` (JSON only) and calls ``oqron_cache.configure(..., celery_app=app)``: stale reads
here are refreshed by ``celery -A workers worker``. It prints ``{"event": "ready", "pid"}`` once
its bus listens, then obeys one JSON command per stdin line (events on stdout, one per line; the
parent reads them with :class:`tests.procs.Child`'s protocol):

``{"cmd": "burst", "cache", "key", "threads", "go", "until", "deadline"}``
    Starts ``threads`` threads, prints ``armed``, waits for a token on the Redis list ``go``
    (BLPOP), then every thread calls ``get(key)`` once. Then polls like ``poll`` (without its
    events) and prints ``result``: ``values``, ``latencies`` (s), ``errors``, ``t_go``
    (``time.monotonic()`` when the start signal arrived) and the poll's fields.
``{"cmd": "poll", "cache", "key", "until", "deadline"}``
    Prints ``polling``, then reads ``key`` every millisecond until the value matches ``until``
    (a dict: every item must be in the value; ``null``: the value is ``None``), and prints
    ``seen``: ``ok``, ``t`` (monotonic, when it matched), ``t_first`` (first read), ``reads``,
    ``max_ms``/``p99_ms`` of the reads, ``others`` (the distinct values read before), ``errors``.
``{"cmd": "read_for", "cache", "key", "seconds", "threads"}``
    ``threads`` threads read ``key`` back to back (1 ms apart) for ``seconds``; prints ``done``
    with ``reads``, ``p50_ms``/``p99_ms``/``max_ms``, ``values`` (distinct, with counts),
    ``errors``, ``t_first``.
``{"cmd": "read", "cache", "key"}`` -> ``value`` (``value``, ``ms``);
``{"cmd": "set", "cache", "key", "value"}`` -> ``ok``;
``{"cmd": "stats", "cache"}`` -> ``stats`` (this process's counters);
``{"cmd": "exit"}``.

It exits when stdin closes (the parent died) or after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections import Counter
from typing import Any

import redis
from celery import Celery

import oqron_cache
from tests.procs.stampede_worker import emit


def _lifetime(seconds: float) -> None:
    def die_later() -> None:
        time.sleep(seconds)
        os._exit(3)

    threading.Thread(target=die_later, daemon=True).start()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _matches(value: Any, until: dict[str, Any] | None) -> bool:
    if until is None:
        return value is None
    return isinstance(value, dict) and all(value.get(k) == v for k, v in until.items())


def _poll(cache: Any, key: str, until: dict[str, Any] | None, deadline: float) -> dict[str, Any]:
    end = time.monotonic() + deadline
    latencies: list[float] = []
    others: set[str] = set()
    errors: list[str] = []
    t_first = time.monotonic()
    value: Any = None
    ok = False
    while True:
        started = time.monotonic()
        failed = False
        try:
            value = cache.get(key)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            failed = True
        now = time.monotonic()
        latencies.append(now - started)
        if not failed:
            if _matches(value, until):
                ok = True
                break
            others.add(json.dumps(value, sort_keys=True))
        if now >= end:
            break
        time.sleep(0.001)
    return {
        "ok": ok,
        "t": now,
        "t_first": t_first,
        "value": value,
        "reads": len(latencies),
        "max_ms": max(latencies) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
        "others": sorted(others),
        "errors": errors[:20],
        "n_errors": len(errors),
    }


def _burst(cache: Any, raw: redis.Redis, command: dict[str, Any]) -> None:
    key = command["key"]
    threads = int(command["threads"])
    go = threading.Event()
    values: list[Any] = [None] * threads
    latencies: list[float] = [0.0] * threads
    errors: list[str] = []
    lock = threading.Lock()

    def call(index: int) -> None:
        go.wait()
        started = time.monotonic()
        try:
            values[index] = cache.get(key)
        except Exception as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        latencies[index] = time.monotonic() - started

    workers = [threading.Thread(target=call, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    emit("armed")
    if raw.blpop([command["go"]], timeout=30) is None:
        emit("error", error="no start signal within 30 s")
        os._exit(5)
    t_go = time.monotonic()
    go.set()
    for thread in workers:
        thread.join()
    polled = _poll(cache, key, command.get("until"), float(command.get("deadline", 10)))
    emit(
        "result",
        values=values,
        latencies=latencies,
        errors=errors,
        t_go=t_go,
        stats=cache.get_stats(local=True),
        **{f"poll_{k}": v for k, v in polled.items()},
    )


def _read_for(cache: Any, command: dict[str, Any]) -> None:
    key = command["key"]
    end = time.monotonic() + float(command["seconds"])
    lock = threading.Lock()
    latencies: list[float] = []
    values: Counter[str] = Counter()
    errors: list[str] = []
    t_first = time.monotonic()

    def reader() -> None:
        mine: list[float] = []
        seen: Counter[str] = Counter()
        failed: list[str] = []
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                seen[json.dumps(cache.get(key), sort_keys=True)] += 1
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
            mine.append(time.monotonic() - started)
            time.sleep(0.001)
        with lock:
            latencies.extend(mine)
            values.update(seen)
            errors.extend(failed)

    readers = [threading.Thread(target=reader) for _ in range(int(command.get("threads", 1)))]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    emit(
        "done",
        reads=len(latencies),
        p50_ms=_percentile(latencies, 0.5) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        max_ms=max(latencies, default=0.0) * 1000,
        values=dict(values),
        errors=errors[:20],
        n_errors=len(errors),
        t_first=t_first,
    )


def _serve(caches: dict[str, Any], raw: redis.Redis) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        name = command["cmd"]
        if name == "exit":
            return
        cache = caches[command["cache"]]
        if name == "burst":
            _burst(cache, raw, command)
        elif name == "poll":
            emit("polling")
            polled = _poll(cache, command["key"], command.get("until"), float(command["deadline"]))
            emit("seen", **polled)
        elif name == "read_for":
            _read_for(cache, command)
        elif name == "read":
            started = time.monotonic()
            value = cache.get(command["key"])
            emit("value", value=value, ms=(time.monotonic() - started) * 1000)
        elif name == "set":
            cache.set(command["key"], command["value"])
            emit("ok")
        elif name == "stats":
            emit("stats", stats=cache.get_stats(local=True))
        else:
            raise ValueError(f"unknown command {name!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="web")
    parser.add_argument("--url", required=True)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--ns", required=True)
    parser.add_argument("--lifetime", type=float, default=120.0)
    args = parser.parse_args(argv)
    _lifetime(args.lifetime)
    raw = redis.Redis.from_url(args.url, socket_timeout=35, socket_connect_timeout=5)
    try:
        from tests.procs import refresh_caches

        app = Celery("oqron_web", broker=args.broker)
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            result_serializer="json",
            result_accept_content=["json"],
            task_ignore_result=True,
        )
        oqron_cache.configure(redis_url=args.url, celery_app=app, namespace=args.ns)
        bus = oqron_cache.config.current_runtime().bus
        deadline = time.monotonic() + 10
        while (
            not bus.healthy and time.monotonic() < deadline
        ):  # L1 is written only while subscribed
            time.sleep(0.005)
        for cache in refresh_caches.CACHES.values():
            cache.stack  # noqa: B018 - bind every engine now, not inside a timed read
        emit("ready", pid=os.getpid(), bus_healthy=bool(bus.healthy))
        _serve(refresh_caches.CACHES, raw)
    except Exception:
        emit("error", error=traceback.format_exc())
        sys.stdout.flush()
        os._exit(2)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the bus and publisher threads may be mid-call


if __name__ == "__main__":
    main()
