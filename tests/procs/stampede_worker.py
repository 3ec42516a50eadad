"""A separate process for the multi-process tests: ``python -m tests.procs.stampede_worker``.

It talks to the parent test with one JSON object per line: events on stdout, commands on stdin.
Modes:

``stampede``
    Declares the cache with a resolver that INCRs ``--counter`` (a key inside the test namespace)
    and sleeps ``--sleep`` seconds (once the ``--started`` counter shows that all ``--processes``
    have begun calling), starts ``--threads`` threads, prints ``{"event": "ready"}``,
    waits for the start signal (a BLPOP on ``--go``: the parent pushes one token per process),
    then every thread calls ``get(--key)`` once (the last one to get going INCRs ``--started``).
    Prints ``{"event": "result", "values", "errors", "latencies", "stats"}``.
``hold``
    Declares the cache with a resolver that prints ``{"event": "holding"}`` and then blocks
    forever, and calls ``get(--key)``: this process takes the key's lock and never releases it
    (the parent SIGKILLs it).
``watch``
    Declares the cache without a resolver (a long-lived L1), reads ``--key`` into L1 and prints
    ``{"event": "ready", "value"}``. Then obeys commands: ``{"cmd": "expect", "value": X,
    "deadline": s}`` prints ``{"event": "polling"}`` and polls ``get(--key)`` until it returns X,
    then prints ``{"event": "seen", "ok", "t", "value", "reads", "l2_hits"}`` where ``t`` is
    ``time.monotonic()`` (CLOCK_MONOTONIC: comparable across processes on Linux);
    ``{"cmd": "exit"}`` ends it.

Every mode exits by itself when stdin reaches EOF (the parent died) or after ``--lifetime``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, cast

import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.redis.replies import as_int


def emit(event: str, **fields: Any) -> None:
    """Write one event line to the parent."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _watchdog(lifetime: float, watch_stdin: bool) -> None:
    """Exit when the parent goes away (stdin EOF) or the process lived too long."""

    def die_later() -> None:
        time.sleep(lifetime)
        os._exit(3)

    threading.Thread(target=die_later, daemon=True).start()
    if watch_stdin:

        def die_on_eof() -> None:
            while sys.stdin.readline():
                pass
            os._exit(4)

        threading.Thread(target=die_on_eof, daemon=True).start()


def _stampede(args: argparse.Namespace, raw: redis.Redis) -> None:
    def resolver(key: str) -> dict[str, Any]:
        n = as_int(raw.incr(args.counter))
        # Hold the load until every process has started calling, so they really contend.
        deadline = time.monotonic() + 10
        while (
            int(cast("bytes | None", raw.get(args.started)) or 0) < args.processes
            and time.monotonic() < deadline
        ):
            time.sleep(0.001)
        time.sleep(args.sleep)
        return {"key": key, "n": n}

    cache = oqron_cache.cache(
        args.cache,
        tiers=[MemoryTier(max_size=1000), RedisTier(ttl=args.ttl)],
        stampede=Stampede(lock_ttl=args.lock_ttl),
        resolver=resolver,
    )
    go = threading.Event()
    values: list[Any] = [None] * args.threads
    errors: list[str] = []
    latencies: list[float] = [0.0] * args.threads
    errors_lock = threading.Lock()

    entered = [0]

    def call(index: int) -> None:
        go.wait()
        with errors_lock:
            entered[0] += 1
            last = entered[0] == args.threads
        if last:  # every thread of this process is about to call get()
            raw.incr(args.started)
        started = time.perf_counter()
        try:
            values[index] = cache.get(args.key)
        except Exception as exc:
            with errors_lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        latencies[index] = time.perf_counter() - started

    threads = [threading.Thread(target=call, args=(i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    cache.stack  # noqa: B018 - bind the engine before the start signal, not inside the race
    emit("ready", bus_healthy=bool(oqron_cache.config.current_runtime().bus.healthy))
    if raw.blpop([args.go], timeout=30) is None:
        emit("error", error="no start signal within 30 s")
        os._exit(5)
    go.set()
    for thread in threads:
        thread.join()
    emit(
        "result",
        values=values,
        errors=errors,
        latencies=latencies,
        stats=cache.get_stats(local=True),
    )


def _hold(args: argparse.Namespace) -> None:
    forever = threading.Event()

    def resolver(key: str) -> Any:
        emit("holding", key=key)
        forever.wait()
        return None  # pragma: no cover - never reached: the parent SIGKILLs this process

    cache = oqron_cache.cache(
        args.cache,
        tiers=[MemoryTier(max_size=1000), RedisTier(ttl=args.ttl)],
        stampede=Stampede(lock_ttl=args.lock_ttl),
        resolver=resolver,
    )
    cache.get(args.key)


def _watch(args: argparse.Namespace) -> None:
    cache = oqron_cache.cache(
        args.cache, tiers=[MemoryTier(max_size=1000, ttl="60s"), RedisTier(ttl="60s")]
    )
    bus = oqron_cache.config.current_runtime().bus
    deadline = time.monotonic() + 10
    while not bus.healthy and time.monotonic() < deadline:  # L1 is written only while subscribed
        time.sleep(0.005)
    emit("ready", value=cache.get(args.key), bus_healthy=bus.healthy)
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "exit":
            return
        expected = command["value"]
        deadline = time.monotonic() + float(command["deadline"])
        hits_before = cache.get_stats(local=True)["l2_hits"]
        reads = 0
        emit("polling")
        while True:
            value = cache.get(args.key)
            reads += 1
            now = time.monotonic()
            if value == expected or now >= deadline:
                break
            time.sleep(0.001)
        emit(
            "seen",
            ok=value == expected,
            t=now,
            value=value,
            reads=reads,
            l2_hits=cache.get_stats(local=True)["l2_hits"] - hits_before,
        )
    os._exit(4)  # stdin closed: the parent is gone


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stampede_worker")
    parser.add_argument("--mode", choices=("stampede", "hold", "watch"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ns", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ttl", default="60s")
    parser.add_argument("--lock-ttl", default="5s")
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--counter", default="")
    parser.add_argument("--go", default="")
    parser.add_argument("--started", default="")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args(argv)

    _watchdog(args.lifetime, watch_stdin=args.mode != "watch")
    raw = redis.Redis.from_url(args.url, socket_timeout=35, socket_connect_timeout=5)
    try:
        oqron_cache.configure(redis_url=args.url, namespace=args.ns)
        if args.mode == "stampede":
            _stampede(args, raw)
        elif args.mode == "hold":
            _hold(args)
        else:
            _watch(args)
    except Exception:
        emit("error", error=traceback.format_exc())
        sys.stdout.flush()
        os._exit(2)
    finally:
        raw.close()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the bus thread may be mid-read


if __name__ == "__main__":
    main()
