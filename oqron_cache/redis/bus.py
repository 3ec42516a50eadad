"""The bus: L1 coherence and fill notifications over one Redis pub/sub channel per namespace.

One listener thread per process. Messages are small JSON objects carrying only the origin id, the
cache name, an operation and keys (never values)::

    {"o": "<origin id>", "c": "<cache>", "op": "fill" | "evict" | "clear", "k": ["key", ...]}

``fill`` and ``evict`` make every other process drop its L1 copy of the keys and wake the threads
waiting for those keys to be filled. Pub/sub delivers at most once, so when the listener loses its
connection (or stops hearing the server answer its pings) the process flushes its L1 and keeps L1
off until the subscription is back; it flushes again on resubscribe, since messages may have been
missed in between (promise P7).

A message that does not parse (a ``pattern`` message whose patterns do not parse included) or
that the handler fails on is dropped and counted in ``dropped_messages``, and logged at most once
per ``LOG_DROPS_EVERY`` seconds: it costs that message, never the subscription (taken for a lost
connection, one bad message made every process of the namespace flush its L1 and resubscribe).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ..core.errors import ConfigurationError
from ..core.glob_match import parse
from ..core.keys import printable
from .cluster import refresh_layout

log = logging.getLogger("oqron_cache.bus")

MAX_MESSAGE_BYTES = 1 << 20
MAX_KEYS_PER_MESSAGE = 10_000
LOG_DROPS_EVERY = 5.0  # seconds: at most one log line about dropped messages per window

Handler = Callable[[str, str, list[str], bool], None]  # (cache, op, keys, from_self)


def encode_message(origin: str, cache: str, op: str, keys: list[str]) -> bytes:
    """The wire form of a bus message."""
    return json.dumps(
        {"o": origin, "c": cache, "op": op, "k": keys}, separators=(",", ":")
    ).encode()


def decode_message(data: bytes) -> tuple[str, str, str, list[str]] | None:
    """Parse a bus message; ``None`` for anything malformed (logged by the caller)."""
    if len(data) > MAX_MESSAGE_BYTES:
        return None
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested beyond the stack
        return None
    if not isinstance(msg, dict):
        return None
    origin, cache, op, keys = msg.get("o"), msg.get("c"), msg.get("op"), msg.get("k")
    if not (
        isinstance(origin, str)
        and isinstance(cache, str)
        and op in ("fill", "evict", "clear", "tag", "pattern")
        and isinstance(keys, list)
        and len(keys) <= MAX_KEYS_PER_MESSAGE
        and all(isinstance(k, str) for k in keys)
    ):
        return None
    if op == "pattern":  # a pattern that does not parse is refused here, not by every handler
        try:
            for pattern in keys:
                parse(pattern)
        except ConfigurationError:
            return None
    return origin, cache, str(op), keys


class Waiters:
    """Threads waiting for a key of a cache to be filled, woken by ``fill``/``evict`` messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[tuple[str, str], list[Any]] = {}

    def register(self, cache: str, key: str, event: Any = None) -> Any:
        """Register interest in ``key`` *before* re-checking L2 (no lost wake-up).

        ``event`` is anything with ``set()`` that may be called from the listener's thread (a
        ``threading.Event`` by default; the async front's waits on the loop); it is returned.
        """
        if event is None:
            event = threading.Event()
        with self._lock:
            self._events.setdefault((cache, key), []).append(event)
        return event

    def unregister(self, cache: str, key: str, event: Any) -> None:
        """Forget ``event`` (after it fired or timed out)."""
        with self._lock:
            events = self._events.get((cache, key))
            if events is not None:
                if event in events:
                    events.remove(event)
                if not events:
                    del self._events[(cache, key)]

    def wake(self, cache: str, keys: list[str]) -> None:
        """Wake every thread waiting for one of ``keys``."""
        with self._lock:
            for key in keys:
                for event in self._events.get((cache, key), ()):
                    event.set()

    def wake_all(self) -> None:
        """Wake every waiter (the bus was lost: they should look at L2 themselves)."""
        with self._lock:
            for events in self._events.values():
                for event in events:
                    event.set()


class Bus:
    """The process's pub/sub listener for one namespace's channel."""

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        handler: Handler,
        on_lost: Callable[[], None],
        *,
        ping_interval: float = 0.5,
        dead_after: float = 1.5,
    ) -> None:
        self.client = client
        self.channel = channel
        self.origin = secrets.token_hex(8)
        self.waiters = Waiters()
        self._handler = handler
        self._on_lost = on_lost
        self._ping_interval = ping_interval
        self._dead_after = dead_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self.healthy = False
        self.reconnects = 0
        self.dropped_messages = 0
        self._next_drop_log = 0.0  # time.monotonic() before which drops are counted, not logged

    def start(self, wait: float = 1.0) -> bool:
        """Start the listener thread; wait up to ``wait`` seconds for the subscription."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="oqron-bus", daemon=True)
            self._thread.start()
        return self._subscribed.wait(wait)

    def stop(self) -> None:
        """Stop the listener (used at shutdown and by tests)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self.client.pubsub()
                pubsub.subscribe(self.channel)
                self._listen(pubsub)
                backoff = 0.05
            except Exception as exc:
                log.debug("bus connection lost: %s", exc)
                refresh_layout(self.client)  # a cluster: the node may have failed over
            finally:
                self._lost()
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # closing a dead connection
                        pubsub.reset()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)

    def _listen(self, pubsub: Any) -> None:
        last_heard = last_ping = time.monotonic()
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=0.1)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                kind = message.get("type")
                if kind == "subscribe":
                    self._up()
                elif kind == "message":
                    self._dispatch(message.get("data"))
            if now - last_ping >= self._ping_interval:
                pubsub.ping()
                last_ping = now
            if now - last_heard > self._dead_after:
                raise ConnectionError("no answer from redis on the bus connection")

    def _up(self) -> None:
        # Any confirmation after the first is a resubscription: messages may have been missed
        # while we were away (even if the client reconnected on its own), so flush again.
        if self._subscribed.is_set():
            self.reconnects += 1
            self._on_lost()
            self.waiters.wake_all()
        self.healthy = True
        self._subscribed.set()

    def _lost(self) -> None:
        if self._stop.is_set():
            self.healthy = False  # deliberate shutdown: nothing was lost
            return
        if self.healthy:
            self.healthy = False
            log.warning(
                "bus lost its subscription to %s; L1 flushed until it is back", self.channel
            )
            self._on_lost()
            self.waiters.wake_all()

    def _dispatch(self, data: object) -> None:
        if not isinstance(data, bytes):
            if self._count_drop():
                log.warning("bus: dropped a message that is not bytes%s", self._total())
            return
        parsed = decode_message(data)
        if parsed is None:
            if self._count_drop():
                log.warning("bus: dropped a malformed message (%d B)%s", len(data), self._total())
            return
        origin, cache, op, keys = parsed
        try:
            self._handler(cache, op, keys, origin == self.origin)
        except Exception as exc:
            # A message this process cannot apply costs that message, not the subscription:
            # taken for a lost connection, it made every process flush its L1 and resubscribe.
            if self._count_drop():
                log.warning(
                    "bus: dropped a %r message for cache %s: %s: %s%s",
                    op,
                    printable(cache),
                    type(exc).__name__,
                    printable(str(exc), 200),
                    self._total(),
                )
        finally:
            if op in ("fill", "evict"):
                self.waiters.wake(cache, keys)

    def _count_drop(self) -> bool:
        """Count a dropped message; True if it should be logged (once per window)."""
        self.dropped_messages += 1
        now = time.monotonic()
        if now < self._next_drop_log:
            return False
        self._next_drop_log = now + LOG_DROPS_EVERY
        return True

    def _total(self) -> str:
        return (
            f" ({self.dropped_messages} dropped since start; at most one such line "
            f"per {LOG_DROPS_EVERY:g} s)"
        )
