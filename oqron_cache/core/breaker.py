"""A circuit breaker for L2: after one connection failure or timeout, stop paying for more.

States: *closed* (calls go through), *open* (calls fail at once, for ``cooldown`` seconds),
*half-open* (one probe call goes through; success closes, failure re-opens with a longer
cooldown, capped at ``max_cooldown``). Promise P2: a Redis that stops answering costs at most one
timeout per cooldown, not one per call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    """Thread-safe breaker; ``clock`` is a monotonic clock (injectable for tests)."""

    def __init__(
        self,
        cooldown: float = 0.5,
        max_cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = cooldown
        self._max = max_cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._cooldown = cooldown
        self._reopen_at = 0.0
        self.trips = 0
        self.on_close: Callable[[], None] | None = None  # called when Redis answers again

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``."""
        return self._state

    @property
    def is_open(self) -> bool:
        """True while calls are being refused (open and not yet due for a probe)."""
        return self._state != CLOSED

    def allow(self) -> bool:
        """May a call go to Redis now? In half-open only the one probe is allowed."""
        if self._state == CLOSED:
            return True
        with self._lock:
            if self._state == OPEN and self._clock() >= self._reopen_at:
                self._state = HALF_OPEN
                return True  # this caller is the probe
            return False

    def success(self) -> None:
        """Record a call that reached Redis and got an answer."""
        if self._state != CLOSED:
            with self._lock:
                self._state = CLOSED
                self._cooldown = self._base
            if self.on_close is not None:
                self.on_close()

    def failure(self) -> None:
        """Record a connection failure or timeout: open (again) for the cooldown."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._cooldown = min(self._cooldown * 2, self._max)
            elif self._state == CLOSED:
                self._cooldown = self._base
            self._state = OPEN
            self._reopen_at = self._clock() + self._cooldown
            self.trips += 1
