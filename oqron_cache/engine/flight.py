"""In-process single-flight: one thread per key does the work, the others wait for its result."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class HandedOn(Exception):
    """The leader of a flight was cancelled: its followers start a load of their own."""


class Flight:
    """One in-progress load of a key in this process, led by a thread or a task; followers
    are threads (:meth:`wait`) or tasks (:meth:`add_future`, see ``steps.join_async``)."""

    __slots__ = ("_futures", "done", "error", "followers", "loaded", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.followers = 0
        self.loaded = False  # the leader ran (or waited for) a resolver, rather than hit L2
        # Tasks waiting, per event loop: woken in batches on their own loop (see _wake).
        self._futures: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}

    def wait(self) -> Any:
        """Block until the leader finishes; return its value or raise its error."""
        self.done.wait()
        return self.result()

    def result(self) -> Any:
        """The leader's value, or its error raised (:class:`HandedOn` if it was cancelled)."""
        if self.error is not None:
            raise self.error
        return self.value

    def add_future(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> bool:
        """Resolve ``future`` on ``loop`` when the flight ends; False if it has ended."""
        with _callbacks_lock:
            if self.done.is_set():
                return False
            self._futures.setdefault(loop, []).append(future)
            return True

    def _finish(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error
        with _callbacks_lock:
            self.done.set()
            futures, self._futures = self._futures, {}
        for loop, waiting in futures.items():
            waiting.reverse()  # woken first come, first served (popped from the end)
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, loop, waiting)


WAKE_BATCH = 64  # tasks woken per turn of their loop: 10,000 waiters never stall it at once


def _wake(loop: asyncio.AbstractEventLoop, waiting: list[asyncio.Future[None]]) -> None:
    """On ``loop``: resolve up to WAKE_BATCH of ``waiting``, and the rest on later turns (the
    woken tasks run in between, and so do the loop's timers)."""
    for _ in range(min(WAKE_BATCH, len(waiting))):
        future = waiting.pop()
        if not future.done():  # a cancelled waiter is gone already
            future.set_result(None)
    if waiting:
        loop.call_soon(_wake, loop, waiting)


_callbacks_lock = threading.Lock()


class Flights:
    """The table of loads in progress, per key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}

    def join(self, key: str) -> tuple[Flight, bool]:
        """Return ``(flight, True)`` to the thread that must lead, ``(flight, False)`` to others."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.followers += 1
                return flight, False
            flight = self._flights[key] = Flight()
            return flight, True

    def forget(self, keys: list[str] | None = None) -> None:
        """``keys`` (None: every key) changed: readers from now on start a new load rather
        than join one that began before the change (P5). Those already waiting still get its
        result: their reads began before the change too."""
        with self._lock:
            if keys is None:
                self._flights.clear()
            else:
                for key in keys:
                    self._flights.pop(key, None)

    def finish(
        self, key: str, flight: Flight, value: Any = None, error: BaseException | None = None
    ) -> None:
        """Publish the leader's outcome and retire the flight (new readers start a new one)."""
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight._finish(value, error)

    def hand_on(self, key: str, flight: Flight) -> None:
        """The leader was cancelled: its followers load the key themselves (one of them leads)."""
        self.finish(key, flight, error=HandedOn())
