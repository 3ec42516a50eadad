"""The floor of a refresh through Celery, in one web process: what any Celery-based
stale-while-revalidate must do at the least, with no library in between.

* A read returns the process's copy; the first read of a key hands the key to one sender thread
  (a queue put), which takes a cross-process lock (``SET NX PX``, one round trip) and, if it won,
  sends the task ``bench.bare_refresh`` by name (:func:`bench.refresh_caches.bare_refresh`) on
  the same app, queue and broker as oqron's refreshes.
* The worker runs the same resolver, then stores the value and publishes it, value included, in
  one round trip.
* A listener thread per process takes the value from the message into the process's copy: no
  re-read, no envelope, no version check.

oqron does more on that path (the L2 re-read with the lock, the re-check in the worker, the
compare-and-set, the L1 eviction and L2 re-read by every process); the difference is what it
costs. Used by :mod:`bench.refresh_visible` through :class:`bench.refresh_web.Web`.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import redis

from .refresh_caches import BARE_TASK, bare_names, make_value

LOCK_MS = 5000  # as oqron's lock_ttl in bench.refresh_caches


class BareRefresh:
    """One process's copies of the floor's keys, its sender thread and its listener thread."""

    def __init__(self, app: Any, url: str, namespace: str, queue_name: str) -> None:
        self.app = app
        self.namespace = namespace
        self.queue_name = queue_name
        self.client = redis.Redis.from_url(url)
        self.copies: dict[str, Any] = {}
        self._asked: set[str] = set()
        self._keys: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(bare_names(namespace, "")[2])
        self._pubsub.get_message(timeout=5.0)  # the subscription is confirmed before any round
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, name="bare-sender", daemon=True),
            threading.Thread(target=self._listen, name="bare-listener", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def read(self, key: str) -> Any:
        """The process's copy of ``key``; the first read of a key asks for its refresh."""
        value = self.copies[key]
        if key not in self._asked:
            self._asked.add(key)
            self._keys.put(key)
        return value

    def prefill(self, keys: list[str]) -> dict[str, int]:
        """Store generation 0 of ``keys`` in Redis; return their gens."""
        for key in keys:
            self.client.set(bare_names(self.namespace, key)[0], json.dumps(make_value(key, 0)))
        return dict.fromkeys(keys, 0)

    def warm(self, keys: list[str], gens: dict[str, int]) -> int:
        """Load ``keys`` from Redis into this process's copies; return how many were wrong."""
        wrong = 0
        for key in keys:
            raw = self.client.get(bare_names(self.namespace, key)[0])
            value = json.loads(raw) if isinstance(raw, bytes) else None
            self.copies[key] = value
            wrong += value != make_value(key, gens[key])
        return wrong

    def _send(self) -> None:
        while (key := self._keys.get()) is not None:
            lock_key = bare_names(self.namespace, key)[1]
            if self.client.set(lock_key, "1", nx=True, px=LOCK_MS):
                self.app.send_task(
                    BARE_TASK, args=[key], queue=self.queue_name, expires=LOCK_MS / 1000
                )

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is not None and message.get("type") == "message":
                body = json.loads(message["data"])
                self.copies[body["k"]] = json.loads(body["v"])

    def close(self) -> None:
        self._stop.set()
        self._keys.put(None)
        deadline = time.monotonic() + 2.0
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._pubsub.close()
        self.client.close()
