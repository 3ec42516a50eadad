"""The faults of the chaos soak: a seeded schedule, and what injecting each kind does.

:func:`schedule` draws the faults of a run from its seed: kinds come from a shuffled bag (every
kind once before any twice), durations and gaps from ranges, none in the warm-up or the tail of
the run. :class:`Injector` injects one fault and returns when it is over (the fault's window is
the time it took, recorded in the history as a ``fault`` event by the caller).

The kinds, all on the cache's private Redis unless said otherwise:

``redis_kill``      SIGKILL, then a new empty server on the same port after ``duration``
``redis_pause``     SIGSTOP for ``duration``, then SIGCONT
``redis_restart``   SIGTERM and an empty server on the same port at once
``redis_oom``       ``maxmemory 1`` with ``noeviction`` for ``duration`` (every write fails OOM)
``redis_readonly``  a replica of a port nobody listens on for ``duration`` (writes: READONLY)
``broker_down``     the broker's Redis stopped for ``duration``, restarted empty
``worker_kill``     SIGKILL one Celery worker (main process and pool), start a replacement
``bus_kill``        ``CLIENT KILL TYPE pubsub``: every process's bus connection is cut
``net_slow``        the proxy delays every chunk by 20-100 ms for ``duration``
``net_stall``       the proxy forwards nothing on all (or half) of the connections for ``duration``
``net_drop``        the proxy resets every connection
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.redis_server import RedisServer
from tests.worker_process import WorkerProcess

from .proxy import Proxy

KINDS = (
    "redis_kill",
    "redis_pause",
    "redis_restart",
    "redis_oom",
    "redis_readonly",
    "broker_down",
    "worker_kill",
    "bus_kill",
    "net_slow",
    "net_stall",
    "net_drop",
)
INSTANT = frozenset({"redis_restart", "worker_kill", "bus_kill", "net_drop"})


@dataclass(frozen=True)
class Fault:
    """One fault of the schedule: when (seconds after the start), what, for how long."""

    at: float
    kind: str
    duration: float
    level: float = 0.0  # net_slow: the latency; net_stall: the fraction of connections


def schedule(
    seed: int,
    seconds: float,
    *,
    warmup: float = 4.0,
    tail: float = 8.0,
    durations: tuple[float, float] = (1.0, 2.5),
    gaps: tuple[float, float] = (3.0, 5.0),
    kinds: Sequence[str] = KINDS,
) -> list[Fault]:
    """The faults of a run of ``seconds`` seconds, drawn from ``seed`` (none without kinds)."""
    if not kinds:
        return []
    rng = random.Random(seed)
    faults: list[Fault] = []
    bag: list[str] = []
    at = warmup
    while True:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        duration = 0.0 if kind in INSTANT else round(rng.uniform(*durations), 2)
        level = 0.0
        if kind == "net_slow":
            level = round(rng.uniform(0.02, 0.1), 3)
        elif kind == "net_stall":
            level = rng.choice((0.5, 1.0))
        if at + duration > seconds - tail:
            return faults
        faults.append(Fault(round(at, 2), kind, duration, level))
        at += duration + rng.uniform(*gaps)


@dataclass
class Workers:
    """The soak's Celery workers: ``celery -A workers worker`` subprocesses, replaceable."""

    log_dir: Path
    broker_url: str
    redis_url: str
    namespace: str
    modules: str
    concurrency: int = 2
    procs: list[WorkerProcess] = field(default_factory=list)
    killed: int = 0
    died: int = 0  # exited on their own (a broker restart can crash a Celery worker)
    replaced: int = 0
    failures: list[str] = field(default_factory=list)

    def start(self, count: int) -> None:
        """Start ``count`` workers and wait until each is ready."""
        started = [self._new() for _ in range(count)]
        for worker in started:
            worker.wait_ready()
        self.procs.extend(started)

    def _new(self) -> WorkerProcess:
        return WorkerProcess(
            self.log_dir,
            self.broker_url,
            self.redis_url,
            self.namespace,
            modules=self.modules,
            prefix="soak",
            concurrency=self.concurrency,
            extra_args=("--without-mingle", "--without-gossip"),
        )

    def kill_one(self, rng: random.Random) -> WorkerProcess:
        """SIGKILL one worker and start its replacement (readiness awaited in a thread)."""
        victim = rng.choice(self.procs)
        victim.kill()
        self.killed += 1
        self._replace(victim)
        return victim

    def revive(self) -> int:
        """Replace the workers that exited on their own; return how many did."""
        dead = [worker for worker in self.procs if worker.proc.poll() is not None]
        for worker in dead:
            self.died += 1
            self._replace(worker)
        return len(dead)

    def _replace(self, gone: WorkerProcess) -> None:
        self.procs.remove(gone)
        replacement = self._new()
        self.procs.append(replacement)

        def wait() -> None:
            try:
                replacement.wait_ready()
                self.replaced += 1
            except AssertionError as exc:
                self.failures.append(str(exc)[:300])

        threading.Thread(target=wait, name="soak-worker-ready", daemon=True).start()

    def alive(self) -> bool:
        return all(worker.proc.poll() is None for worker in self.procs)

    def pids(self) -> list[int]:
        return [worker.pid for worker in self.procs]

    def stop(self) -> None:
        for worker in self.procs:
            worker.kill()


class Injector:
    """Injects one :class:`Fault` at a time into the soak's servers, proxy and workers."""

    def __init__(
        self,
        cache: RedisServer,
        broker: RedisServer,
        proxy: Proxy,
        workers: Workers,
        rng: random.Random,
    ) -> None:
        self.cache = cache
        self.broker = broker
        self.proxy = proxy
        self.workers = workers
        self.rng = rng

    def inject(self, fault: Fault) -> dict[str, Any]:
        """Inject ``fault``; return when it is over, with what was done."""
        method = getattr(self, f"_{fault.kind}")
        details: dict[str, Any] = method(fault) or {}
        return details

    def _hold(self, fault: Fault) -> None:
        time.sleep(fault.duration)

    def _redis_kill(self, fault: Fault) -> None:
        self.cache.kill()
        self._hold(fault)
        self.cache.restart()

    def _redis_pause(self, fault: Fault) -> None:
        self.cache.pause()
        try:
            self._hold(fault)
        finally:
            self.cache.resume()

    def _redis_restart(self, fault: Fault) -> None:
        self.cache.restart()

    def _redis_oom(self, fault: Fault) -> None:
        self.cache.set_maxmemory(1)
        try:
            self._hold(fault)
        finally:
            self.cache.set_maxmemory(0)

    def _redis_readonly(self, fault: Fault) -> None:
        self.cache.make_readonly()
        try:
            self._hold(fault)
        finally:
            self.cache.make_writable()

    def _broker_down(self, fault: Fault) -> None:
        self.broker.stop()
        self._hold(fault)
        self.broker.restart()

    def _worker_kill(self, fault: Fault) -> dict[str, Any]:
        victim = self.workers.kill_one(self.rng)
        return {"worker": victim.pid}

    def _bus_kill(self, fault: Fault) -> dict[str, Any]:
        with self.cache.client() as admin:
            killed = admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        return {"connections": int(killed)}

    def _net_slow(self, fault: Fault) -> dict[str, Any]:
        links = self.proxy.slow(fault.level)
        try:
            self._hold(fault)
        finally:
            self.proxy.heal()
        return {"latency": fault.level, "connections": links}

    def _net_stall(self, fault: Fault) -> dict[str, Any]:
        links = self.proxy.stall(fault.level, self.rng)
        try:
            self._hold(fault)
        finally:
            self.proxy.heal()
        return {"fraction": fault.level, "connections": links}

    def _net_drop(self, fault: Fault) -> dict[str, Any]:
        return {"connections": self.proxy.drop()}
