"""In-process single-flight: one thread per key does the work, the others wait for its result."""

from __future__ import annotations

import threading
from typing import Any


class Flight:
    """One in-progress load of a key in this process."""

    __slots__ = ("done", "error", "followers", "loaded", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.followers = 0
        self.loaded = False  # the leader ran (or waited for) a resolver, rather than hit L2

    def wait(self) -> Any:
        """Block until the leader finishes; return its value or raise its error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


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
        flight.value = value
        flight.error = error
        flight.done.set()
