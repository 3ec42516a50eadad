"""A web process for the multi-process invalidation tests: ``python -m tests.procs.inval_child``.

It declares the test's cache (``tags=lambda key, value: value["tags"]``, a long-lived L1, and the
shared resolver of :func:`make_resolver`) and then obeys one JSON command per line on stdin,
answering with one JSON event per line on stdout (the protocol of :class:`tests.procs.Child`):

``{"cmd": "read", "keys": [...]}``
    ``cache.get`` of each key, in order. Answers ``read`` with ``values`` (one per key), the
    growth of this process's ``l2_hits``/``misses``/``resolver_calls`` during the reads, and
    ``held``: for each key, the value L1 held *before* the read (``null`` if none; values are
    dicts, so ``null`` never means a cached ``None``).
``{"cmd": "arm", "gone": [...], "kept": [...]}``
    Starts watching: every bus message for the cache is timestamped (``time.monotonic()``:
    CLOCK_MONOTONIC, one clock for every process on Linux) right after this process applied it,
    and the first instant at which L1 holds none of ``gone`` is recorded. Answers ``armed``.
``{"cmd": "collect", "deadline": s}``
    Waits (up to ``s`` seconds) until L1 holds none of ``gone``; answers ``dropped`` with ``ok``,
    ``t_dropped`` (the instant recorded by the bus thread, or the instant the wait noticed it),
    ``bus`` (``[t, op]`` of each message since ``arm``) and ``kept_held`` (how many of ``kept``
    L1 still holds).
``{"cmd": "get_bg", "key": k}``
    ``cache.get(k)`` in a thread (its resolver may block); answers ``got`` with the value when
    it returns. Meanwhile other commands are served.
``{"cmd": "wait_bus", "n": n, "deadline": s}``
    Waits until ``n`` bus messages were applied since ``arm``; answers ``bus`` with their count.
``{"cmd": "join"}``
    Waits for this process's background refreshes; answers ``joined`` with its local stats.
``{"cmd": "exit"}``
    Exits.

With ``--hold-decode``, decoding a value read from L2 waits while the ``decode`` flag key says
``block`` (after printing ``{"event": "decoding"}``): a test can hold an L2 read between its GET
and its write to L1.

The resolver, shared with the parent through :func:`make_resolver`, numbers its runs across all
processes (an INCR in the test namespace); when the flag key says ``block`` it prints
``{"event": "resolving", "key", "n"}`` and blocks until the flag changes.

``--ping`` runs :func:`ping_loop` instead (a Redis latency probe).

Every process exits by itself when stdin reaches EOF (the parent died) or after ``--lifetime``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import redis

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, Stampede
from oqron_cache.redis.replies import as_int

BLOCK_LIMIT = 30.0  # a blocked resolver gives up after this long (a test that forgot the flag)

_emit_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Write one event line to the parent (from any thread)."""
    with _emit_lock:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def control_key(namespace: str, cache: str, part: str) -> str:
    """A test-control key in the test namespace (deleted with it): ``gen``, ``flag``, ``decode``."""
    return f"oqron:{namespace}:test:{cache}:{part}"


def make_resolver(
    raw: redis.Redis,
    namespace: str,
    cache: str,
    on_start: Callable[[str, int], None] | None = None,
) -> Callable[[str], dict[str, Any]]:
    """The resolver every process of a test uses: ``{"tags": ["g"], "key": k, "n": <run no.>}``.

    ``n`` counts runs across every process (INCR). If the flag key holds ``block`` the run calls
    ``on_start`` and waits until it does not, so a test can hold a load in flight.
    """
    gen_key = control_key(namespace, cache, "gen")
    flag_key = control_key(namespace, cache, "flag")

    def resolver(key: str) -> dict[str, Any]:
        n = as_int(raw.incr(gen_key))
        if raw.get(flag_key) == b"block":
            if on_start is not None:
                on_start(key, n)
            deadline = time.monotonic() + BLOCK_LIMIT
            while raw.get(flag_key) == b"block" and time.monotonic() < deadline:
                time.sleep(0.002)
        return {"tags": ["g"], "key": key, "n": n}

    return resolver


def declare(
    name: str,
    *,
    ttl: str,
    stale_ttl: str | int,
    resolver: Callable[[str], Any] | None,
    max_size: int = 5000,
) -> oqron_cache.Cache[Any]:
    """The cache every process of a test declares (same name, same options)."""
    return oqron_cache.cache(
        name,
        tiers=[MemoryTier(max_size=max_size, ttl=ttl), RedisTier(ttl=ttl)],
        stale_ttl=stale_ttl,
        stampede=Stampede(lock_ttl="10s"),
        tags=lambda key, value: value["tags"],
        resolver=resolver,
    )


class Watch:
    """Timestamps the bus messages this process applies and when L1 lost the watched keys."""

    def __init__(self, cache: oqron_cache.Cache[Any]) -> None:
        self.stack = cache.stack
        self.lock = threading.Lock()
        self.gone: list[str] = []
        self.kept: list[str] = []
        self.bus: list[tuple[float, str]] = []
        self.dropped_at: float | None = None
        original = self.stack.on_bus

        def on_bus(op: str, keys: list[str], from_self: bool) -> None:
            original(op, keys, from_self)
            now = time.monotonic()
            with self.lock:
                self.bus.append((now, op))
                if self.dropped_at is None and self.gone and not self._any_held():
                    self.dropped_at = now

        self.stack.on_bus = on_bus  # type: ignore[method-assign]

    def _any_held(self) -> bool:
        l1 = self.stack.l1
        assert l1 is not None
        return any(l1.get(key) is not None for key in self.gone)

    def arm(self, gone: list[str], kept: list[str]) -> None:
        with self.lock:
            self.gone, self.kept = gone, kept
            self.bus = []
            self.dropped_at = None

    def wait_bus(self, n: int, deadline: float) -> int:
        until = time.monotonic() + deadline
        while True:
            with self.lock:
                count = len(self.bus)
            if count >= n or time.monotonic() >= until:
                return count
            time.sleep(0.001)

    def collect(self, deadline: float) -> dict[str, Any]:
        until = time.monotonic() + deadline
        while True:
            with self.lock:
                if self.dropped_at is None and not self._any_held():
                    self.dropped_at = time.monotonic()  # dropped by something else than a message
                if self.dropped_at is not None or time.monotonic() >= until:
                    l1 = self.stack.l1
                    assert l1 is not None
                    return {
                        "ok": self.dropped_at is not None,
                        "t_dropped": self.dropped_at,
                        "bus": self.bus,
                        "kept_held": sum(l1.get(key) is not None for key in self.kept),
                    }
            time.sleep(0.001)


class HeldDecode:
    """A codec that waits while the ``decode`` flag says ``block`` (widens an L2 read's window)."""

    def __init__(self, codec: Any, raw: redis.Redis, flag_key: str) -> None:
        self.codec = codec
        self.name = codec.name
        self.codec_id = codec.codec_id
        self.raw = raw
        self.flag_key = flag_key

    def encode(self, value: Any, origin: str) -> bytes:
        return bytes(self.codec.encode(value, origin))

    def decode(self, data: bytes | memoryview) -> Any:
        if self.raw.get(self.flag_key) == b"block":
            emit("decoding")
            deadline = time.monotonic() + BLOCK_LIMIT
            while self.raw.get(self.flag_key) == b"block" and time.monotonic() < deadline:
                time.sleep(0.002)
        return self.codec.decode(data)

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        if codec_id != self.codec_id:
            raise ValueError(f"codec id {codec_id}")
        return self.decode(data)


def _held(cache: oqron_cache.Cache[Any], keys: list[str]) -> list[Any]:
    l1 = cache.stack.l1
    assert l1 is not None
    out = []
    for key in keys:
        item = l1.get(key)
        out.append(None if item is None else item.value)
    return out


def _serve(cache: oqron_cache.Cache[Any]) -> None:
    watch = Watch(cache)
    runtime = oqron_cache.config.current_runtime()
    deadline = time.monotonic() + 10
    while not runtime.bus.healthy and time.monotonic() < deadline:  # L1 is kept only then
        time.sleep(0.005)
    emit("ready", bus_healthy=runtime.bus.healthy, pid=os.getpid())
    for line in sys.stdin:
        command = json.loads(line)
        cmd = command["cmd"]
        if cmd == "exit":
            return
        if cmd == "read":
            keys = command["keys"]
            held = _held(cache, keys)
            before = cache.get_stats(local=True)
            values = [cache.get(key) for key in keys]
            after = cache.get_stats(local=True)
            emit(
                "read",
                values=values,
                held=held,
                **{f: after[f] - before[f] for f in ("l2_hits", "misses", "resolver_calls")},
            )
        elif cmd == "arm":
            watch.arm(command["gone"], command.get("kept", []))
            emit("armed")
        elif cmd == "wait_bus":
            emit("bus", count=watch.wait_bus(int(command["n"]), float(command["deadline"])))
        elif cmd == "collect":
            emit("dropped", **watch.collect(float(command["deadline"])))
        elif cmd == "get_bg":
            key = command["key"]

            def get(key: str = key) -> None:
                try:
                    emit("got", key=key, value=cache.get(key))
                except Exception:
                    emit("error", error=traceback.format_exc())

            threading.Thread(target=get, daemon=True).start()
        elif cmd == "join":
            joined = runtime.dispatcher.join(15)
            emit("joined", ok=joined, stats=cache.get_stats(local=True))
        else:
            emit("error", error=f"unknown command {cmd!r}")


def ping_loop(url: str) -> None:
    """``--ping``: PING Redis every millisecond until a line (or EOF) arrives on stdin.

    Answers ``ready`` once connected, then ``pinged`` with ``pings``, ``worst`` and ``p99``
    (seconds). A process of its own, so the latency is Redis's, not the parent's GIL.
    """
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    client.ping()
    stop = threading.Event()

    def stop_on_line() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=stop_on_line, daemon=True).start()
    emit("ready")
    latencies: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        client.ping()
        latencies.append(time.perf_counter() - started)
        time.sleep(0.001)
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
    emit("pinged", pings=len(latencies), worst=max(latencies, default=0.0), p99=p99)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="inval_child")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ns")
    parser.add_argument("--cache")
    parser.add_argument("--ping", action="store_true", help="only PING --url (see ping_loop)")
    parser.add_argument("--ttl", default="60s")
    parser.add_argument("--stale-ttl", default="0")
    parser.add_argument("--hold-decode", action="store_true")
    parser.add_argument("--lifetime", type=float, default=60.0)
    args = parser.parse_args(argv)

    def die_later() -> None:
        time.sleep(args.lifetime)
        os._exit(3)

    threading.Thread(target=die_later, daemon=True).start()
    if args.ping:
        ping_loop(args.url)
        sys.stdout.flush()
        os._exit(0)
    raw = redis.Redis.from_url(args.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        oqron_cache.configure(redis_url=args.url, namespace=args.ns)
        resolver = make_resolver(
            raw, args.ns, args.cache, lambda key, n: emit("resolving", key=key, n=n)
        )
        stale_ttl = 0 if args.stale_ttl == "0" else args.stale_ttl
        cache = declare(args.cache, ttl=args.ttl, stale_ttl=stale_ttl, resolver=resolver)
        if args.hold_decode:
            stack = cache.stack
            flag = control_key(args.ns, args.cache, "decode")
            stack.codec = HeldDecode(stack.codec, raw, flag)
        _serve(cache)
    except Exception:
        emit("error", error=traceback.format_exc())
        os._exit(2)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: the bus thread may be mid-read


if __name__ == "__main__":
    main()
