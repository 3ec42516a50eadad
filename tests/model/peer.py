"""Process B: a second process of the same application, driven over a pipe by the test.

It declares the same caches (:func:`tests.model.world.declare`), configures the library on the
same Redis and namespace, and obeys one command at a time. Each command that may run a
resolver carries the model's context ``(now, seq, versions, failing)``: B's clock is set to the
test's injected time, its origin to the test's, and its stamps continue the test's counter; the
reply hands the counter back (``seq``) with the keys whose read failed (``failed``).

B has no enqueuer: a stale read's refresh runs in B's dispatcher thread, which each command
waits for (``Dispatcher.join``), so a command's effects are complete when it answers.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import oqron_cache
from oqron_cache.celery.bodies import do_refresh
from oqron_cache.config import current_runtime, reset
from oqron_cache.testing import FakeClock
from tests.model.oracle import OP_TIMEOUT, make_value
from tests.model.world import (
    Origin,
    OriginError,
    Slot,
    bus_barrier,
    declare,
    l1_state,
    settle,
)

Context = tuple[float, int, dict[Slot, int], set[Slot]]


class PeerSide:
    """The state and commands of process B."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.origin = Origin()
        self.seq = 0
        self.failed: list[Slot] = []
        self.caches = declare(self._resolver_for)

    def _resolver_for(self, cache: str) -> Any:
        def resolve(key: str) -> Any:
            self.seq += 1
            version = self.origin.versions.get((cache, key), 0)
            if (cache, key) in self.origin.failing:
                self.failed.append((cache, key))
                raise OriginError(f"origin refused {cache}/{key}")
            return make_value(cache, key, version, self.seq, self.clock(), False)

        return resolve

    def _enter(self, ctx: Context) -> None:
        now, seq, versions, failing = ctx
        self.clock.now = now
        self.seq = seq
        self.origin = Origin(versions, failing)
        self.failed = []

    def _leave(self, body: dict[str, Any], started: float) -> dict[str, Any]:
        body["elapsed"] = time.monotonic() - started
        current_runtime().dispatcher.join(5.0)  # the refreshes this command asked for ran
        return {**body, "seq": self.seq, "failed": self.failed}

    def cmd_configure(self, url: str, namespace: str) -> bool:
        reset()
        oqron_cache.configure(
            redis_url=url, namespace=namespace, clock=self.clock, op_timeout=OP_TIMEOUT
        )
        for cache in self.caches.values():
            _ = cache.stack  # bind now, as process A does
        return True

    def cmd_reset(self) -> bool:
        reset()
        return True

    def cmd_get(self, ctx: Context, cache: str, key: str) -> dict[str, Any]:
        self._enter(ctx)
        started = time.monotonic()
        counts = self.caches[cache].stats.counts
        errors = counts["l2_errors"]
        body: dict[str, Any]
        try:
            body = {"value": self.caches[cache].get(key)}
        except OriginError as exc:
            body = {"origin_error": str(exc)}
        except Exception as exc:
            body = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        body["l2_errors"] = counts["l2_errors"] - errors
        return self._leave(body, started)

    def cmd_write(
        self, ctx: Context, kind: str, cache: str, subject: str, value: Any
    ) -> dict[str, Any]:
        self._enter(ctx)
        started = time.monotonic()
        target = self.caches[cache]
        body: dict[str, Any] = {}
        try:
            if kind == "set":
                target.set(subject, value)
            elif kind == "delete":
                target.delete(subject)
            elif kind == "pattern":
                target.invalidate_pattern(subject)
            else:
                target.invalidate_by_tag(subject)
        except Exception as exc:
            body = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        return self._leave(body, started)

    def cmd_refresh(
        self, ctx: Context, cache: str, key: str, token: str, seen_hex: str
    ) -> dict[str, Any]:
        """Run a refresh task process A sent, as a worker in this process would."""
        self._enter(ctx)
        started = time.monotonic()
        try:
            body: dict[str, Any] = {"outcome": do_refresh(cache, key, token, seen_hex)}
        except Exception as exc:
            body = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        return self._leave(body, started)

    def cmd_barrier(self, timeout: float) -> bool:
        return bus_barrier(timeout)

    def cmd_settle(self, timeout: float) -> bool:
        return settle(timeout)

    def cmd_state(self) -> dict[str, Any]:
        return l1_state(self.caches)


def serve(conn: Connection) -> None:
    """Process B's main loop: ``(name, args)`` in, the command's reply out."""
    logging.getLogger("oqron_cache").setLevel(logging.CRITICAL)  # outages are expected here
    side = PeerSide()
    while True:
        try:
            number, name, args = conn.recv()
        except EOFError:
            return
        if name == "exit":
            reset()
            conn.send((number, True))
            return
        try:
            reply = getattr(side, f"cmd_{name}")(*args)
        except BaseException:
            reply = {"crash": traceback.format_exc()}
        conn.send((number, reply))


class Peer:
    """Process A's handle on process B (a ``spawn`` child: no state inherited by fork)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.proc = context.Process(target=serve, args=(child,), name="model-peer", daemon=True)
        self.proc.start()
        child.close()
        self.calls = 0

    def call(self, name: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run command ``name`` in B; its reply. Fails the test if B hangs or crashes.

        Commands are numbered: the late reply of a command that timed out is skipped.
        """
        self.send(name, *args)
        return self.receive(name, timeout)

    def send(self, name: str, *args: Any) -> None:
        """Send command ``name`` (then :meth:`receive` its reply, after other work)."""
        self.calls += 1
        self.conn.send((self.calls, name, args))

    def receive(self, name: str, timeout: float = 30.0) -> Any:
        """The reply to the command sent last."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"process B did not answer {name} within {timeout}s")
            number, reply = self.conn.recv()
            if number == self.calls:
                break
        if isinstance(reply, dict) and "crash" in reply:
            raise AssertionError(f"process B crashed in {name}:\n{reply['crash']}")
        return reply

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(AssertionError, OSError, EOFError):  # B may be gone
                self.call("exit", timeout=10.0)
            self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
        self.conn.close()
