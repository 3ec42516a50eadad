"""Helpers for testing code that uses oqron-cache, and conformance suites for its tiers.

Nothing here imports pytest: the module can be imported anywhere. What it offers:

* :class:`FakeClock`: a wall clock that moves only when told. Pass it as ``clock=`` to
  :func:`oqron_cache.cache` (or ``configure()``) to make a value stale or expired without
  sleeping: ``clock.tick(61)``.
* :func:`wait_for_refreshes`: wait until the background refreshes requested so far have
  finished, so a test can assert on the refreshed value right after a stale read.
* :class:`L1StoreContract` and :class:`L2StoreContract`: the promises the library relies on
  from a store of each tier (:class:`oqron_cache.tiers.base.L1Store`,
  :class:`oqron_cache.tiers.base.L2Store`), as pytest tests. Subclass one in a test module as
  ``class TestMyStore(L2StoreContract)`` and give the class a fixture named ``store`` that
  returns a fresh, empty store; every ``test_*`` method then runs against it::

      import pytest
      from oqron_cache.testing import L1StoreContract
      from oqron_cache.tiers.memory import MemoryStore


      class TestMemoryStore(L1StoreContract):
          @pytest.fixture
          def store(self) -> MemoryStore:
              return MemoryStore(max_size=self.capacity)

  The shipped stores pass them (``tests/test_conformance.py``). They live in
  :mod:`oqron_cache.conformance` and are re-exported here.
"""

from __future__ import annotations

from ..config import current_runtime
from .conformance import L1StoreContract, L2StoreContract

__all__ = ["FakeClock", "L1StoreContract", "L2StoreContract", "wait_for_refreshes"]


class FakeClock:
    """A wall clock that only moves when told to (``tick``).

    ``clock()`` returns :attr:`now` (seconds since the epoch, a float); ``tick(seconds)``
    moves it forward. The library reads it wherever it would read ``time.time()``.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


def wait_for_refreshes(timeout: float = 5.0) -> bool:
    """Wait until every background refresh requested so far in this process has finished.

    True when they have (also when nothing was ever requested); False if ``timeout`` seconds
    passed first. With a Celery app configured, a refresh handed to Celery counts as finished
    once it was sent: the worker runs it on its own time.
    """
    runtime = current_runtime(create=False)
    if runtime is None:
        return True
    return bool(runtime.dispatcher.join(timeout))
