"""A rate limit for bus messages that walk the whole L1: ``clear``, ``pattern`` and ``tag``.

Anyone who can publish on the bus channel can send these (DESIGN section 13: floods are
rate-limited). Each costs this process a pass over every L1 entry, so a flood of them could
keep a core busy. Past :data:`RATE` per second (after a burst of :data:`BURST`), the process
clears its L1 once and keeps it off for :data:`PAUSE` seconds, ignoring further such messages
meanwhile: reads go to L2, which is always right, so nothing stale is served; only the speed of
L1 is lost while the flood lasts. Counted as ``bus_floods``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RATE = 50.0  # heavy messages per second, sustained
BURST = 50.0
PAUSE = 1.0  # seconds L1 stays off once the rate is exceeded

ADMIT, PAUSE_NOW, PAUSED = "admit", "pause-now", "paused"


class FloodGuard:
    """A token bucket, used by the bus listener thread only (no lock needed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = BURST
        self._last = clock()
        self.paused_until = 0.0  # read by other threads: L1 is off until then

    def admit(self) -> str:
        """One heavy message arrives: :data:`ADMIT` it, or :data:`PAUSE_NOW` (the rate was
        just exceeded: clear L1 now) or :data:`PAUSED` (ignore it: L1 is off already)."""
        now = self._clock()
        if now < self.paused_until:
            return PAUSED
        self._tokens = min(BURST, self._tokens + (now - self._last) * RATE)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return ADMIT
        self.paused_until = now + PAUSE
        return PAUSE_NOW

    def paused(self) -> bool:
        """Is L1 off because of a flood?"""
        return self._clock() < self.paused_until
