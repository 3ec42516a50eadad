"""Hold one thread at one point of the read or write path, so other steps run meanwhile.

A *slow call* is a ``get`` or ``set`` run in a thread of its own that stops at a gate:

* ``resolver``: inside the resolver, right after it read the origin (a slow load);
* ``decode``: decoding what the first L2 read returned (between Redis's answer and the L1 put);
* ``l1put``: the L1 put itself (after the epoch check of a read, after the L2 write of a set).

The gates sit in the resolver of :mod:`.world`, in :class:`GatedCodec` (wrapping the stack's
codec) and in :class:`GatedL1` (wrapping the stack's L1 store): only the slow call's own thread
is ever held, once. The library is not changed; the wrappers sit where the library already
takes a codec and an L1 store as parts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from oqron_cache.core.codecs import Codec
from oqron_cache.engine.l1 import L1Item
from oqron_cache.engine.tiers import L1Store

GATE_LIMIT = 30.0  # a held thread gives up after this long (a test that never released it)
WHERES = ("resolver", "decode", "l1put")


class Gates:
    """The one gate armed at a time (or none)."""

    def __init__(self) -> None:
        self.where = ""
        self.thread: threading.Thread | None = None
        self.reached = threading.Event()
        self.release = threading.Event()

    def arm(self, where: str, thread: threading.Thread) -> None:
        self.where, self.thread = where, thread
        self.reached.clear()
        self.release.clear()

    def disarm(self) -> None:
        self.release.set()
        self.where, self.thread = "", None

    def hold(self, where: str) -> None:
        """Called at each gate point: stops the armed thread at its gate, once."""
        if where != self.where or threading.current_thread() is not self.thread:
            return
        self.where = ""  # once
        self.reached.set()
        self.release.wait(GATE_LIMIT)


class GatedCodec:
    """The stack's codec, with the ``decode`` gate in front of ``decode``."""

    def __init__(self, codec: Codec, gates: Gates) -> None:
        self.inner = codec
        self.name = codec.name
        self.codec_id = codec.codec_id
        self.gates = gates

    def encode(self, value: Any, origin: str) -> bytes:
        return self.inner.encode(value, origin)

    def decode(self, data: bytes | memoryview) -> Any:
        self.gates.hold("decode")
        return self.inner.decode(data)

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        self.gates.hold("decode")
        return self.inner.read(codec_id, data)


class GatedL1:
    """The stack's L1 store, with the ``l1put`` gate in front of ``put``."""

    def __init__(self, store: L1Store, gates: Gates) -> None:
        self.inner = store
        self.gates = gates

    @property
    def data(self) -> Mapping[str, L1Item]:
        return self.inner.data

    @property
    def lock(self) -> AbstractContextManager[Any]:
        return self.inner.lock

    def get(self, key: str) -> L1Item | None:
        return self.inner.get(key)

    def put(self, key: str, item: L1Item) -> None:
        self.gates.hold("l1put")
        self.inner.put(key, item)

    def put_if_newer(self, key: str, item: L1Item) -> None:
        self.gates.hold("l1put")
        self.inner.put_if_newer(key, item)

    def stamp(self, key: str) -> int:
        return self.inner.stamp(key)

    def put_if(self, key: str, item: L1Item, stamp: int) -> bool:
        self.gates.hold("l1put")  # before the (atomic) check of the stamp and the put
        return self.inner.put_if(key, item, stamp)

    def begin_write(self, key: str) -> int:
        return self.inner.begin_write(key)

    def end_write(self, key: str, item: L1Item | None, ticket: int) -> bool:
        self.gates.hold("l1put")
        return self.inner.end_write(key, item, ticket)

    def evict(self, key: str) -> None:
        self.inner.evict(key)

    def evict_many(self, keys: list[str]) -> None:
        self.inner.evict_many(keys)

    def evict_matching(self, match: Callable[[str, L1Item], bool]) -> int:
        return self.inner.evict_matching(match)

    def discard(self, key: str, version: bytes | None = None) -> None:
        self.inner.discard(key, version)

    def discard_many(self, keys: list[str]) -> None:
        self.inner.discard_many(keys)

    def clear(self) -> int:
        return self.inner.clear()

    def items(self) -> list[tuple[str, L1Item]]:
        return self.inner.items()

    def keys(self) -> list[str]:
        return self.inner.keys()

    @property
    def evictions(self) -> int:
        return self.inner.evictions

    def __len__(self) -> int:
        return len(self.inner)


class SlowCall:
    """``fn()`` in a thread held at ``where``; :meth:`finish` lets it go on and returns."""

    def __init__(self, gates: Gates, where: str, fn: Callable[[], Any]) -> None:
        self.gates = gates
        self.where = where
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = 0.0
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, name="model-slow-call", daemon=True)

    def _run(self) -> None:
        self.started = time.monotonic()
        try:
            self.result = self.fn()
        except BaseException as exc:
            self.error = exc
        finally:
            self.elapsed = time.monotonic() - self.started

    def start(self, timeout: float = 10.0) -> bool:
        """Start it; True if it is held at its gate, False if it finished without reaching it."""
        self.gates.arm(self.where, self.thread)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gates.reached.wait(0.005):
                return True
            if not self.thread.is_alive():
                self.gates.disarm()
                return False
        raise AssertionError(f"slow call neither reached its {self.where} gate nor returned")

    def finish(self, timeout: float = 15.0) -> bool:
        """Release it and wait for it to return; False if it is still running after ``timeout``."""
        self.gates.disarm()
        self.thread.join(timeout)
        return not self.thread.is_alive()
