"""The demo's Celery side: a real worker, as a subprocess or as a thread of this process.

* :class:`WorkerProcess` runs ``celery -A workers worker -l info`` (the repository's standalone
  worker app) with ``OQRON_CACHE_MODULES=oqron_cache.demo.caches``, in its own session, and relays
  its refresh lines live. It runs through ``python -m oqron_cache.demo.worker``, which only adds a
  watchdog (the worker stops when the demo's end of its stdin closes, even if the demo was
  killed) and then hands over to Celery's own command line.
* :class:`EmbeddedWorker` runs a Celery worker (pool ``solo``) in a thread of this process: with
  an in-memory broker when there is no Redis, or when the ``workers`` package is not at hand.
* :class:`ExternalWorker` waits for a worker that is already running (docker compose's).

The demo's broker queues live under its own key prefix (``global_keyprefix``), so a demo run on
a Redis that is also somebody's broker never consumes their tasks, and its queues are deleted
with the demo's namespace.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from ..celery.tasks import REFRESH_TASK
from ..config import mask_url
from ..redis.clients import celery_broker

DEMO_CACHE_MODULE = "oqron_cache.demo.caches"
ROOT = Path(__file__).resolve().parents[2]  # a source checkout: workers/ lives here
STOP_TIMEOUT = 10.0

Report = Callable[[str], None]

_READY = re.compile(r"\b(\S+@\S+) ready\.")
_RECEIVED = re.compile(r"Task oqron_cache\.refresh\[(?P<id>[^\]]+)\] received")
_OUTCOME = re.compile(r"\] refresh (?P<cache>\S+) (?P<key>.+): (?P<outcome>[\w-]+)$")
_PROBLEM = re.compile(r": (ERROR|CRITICAL)/|Error:|Unable to load")


class WorkerUnavailable(Exception):
    """No worker could be started or found; the message is one line, for the user."""


def celery_missing() -> str | None:
    """``None`` if Celery can be imported, else a one-line reason."""
    try:
        import celery  # noqa: F401
    except ImportError as exc:
        return f"Celery is not installed ({exc}); pip install 'oqron-cache[celery]'"
    return None


def make_app(broker_url: str, prefix: str | None = None) -> Any:
    """The demo's Celery app (json only): the processes send refresh tasks through it.

    ``prefix`` puts every broker key of a Redis broker under it (kombu's ``global_keyprefix``).
    """
    from celery import Celery

    broker, options = celery_broker(broker_url)  # a redis+sentinel:// URL in kombu's form
    app = Celery("oqron-demo", broker=broker, set_as_current=False)
    if prefix:
        options["global_keyprefix"] = prefix
    if broker_url.startswith("memory://"):
        options["polling_interval"] = 0.01  # the in-memory transport polls (1 s by default)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=options,
        worker_hijack_root_logger=False,
        # Said explicitly: Celery 5.3 warns (CPendingDeprecationWarning) when it is left to
        # broker_connection_retry, and a process that treats warnings as errors then loses
        # its embedded worker.
        broker_connection_retry_on_startup=True,
    )
    return app


def worker_env(redis_url: str, broker_url: str, namespace: str) -> dict[str, str]:
    """The environment of ``celery -A workers worker`` for the demo (others' OQRON_* dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    env.update(
        OQRON_REDIS_URL=redis_url,
        OQRON_BROKER_URL=broker_url,
        OQRON_NAMESPACE=namespace,
        OQRON_CACHE_MODULES=DEMO_CACHE_MODULE,
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
    )
    return env


class _Outcomes:
    """The outcomes of the refresh tasks a worker ran, as they are reported."""

    def __init__(self) -> None:
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition()

    def _count(self, outcome: str) -> None:
        with self._changed:
            self.outcomes[outcome] += 1
            self._changed.notify_all()

    def wait_outcomes(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` refresh outcomes were reported (the log line comes last)."""
        with self._changed:
            return self._changed.wait_for(lambda: sum(self.outcomes.values()) >= count, timeout)


class WorkerProcess(_Outcomes):
    """``celery -A workers worker -l info`` in a subprocess; :meth:`stop` ends it (and its pool).

    The Redis password travels in the environment, never on the command line (``ps`` shows
    that). Lines about refresh tasks are passed to ``report`` as they arrive.
    """

    def __init__(
        self, redis_url: str, broker_url: str, namespace: str, prefix: str, report: Report
    ) -> None:
        if not (ROOT / "workers" / "__init__.py").is_file():
            raise WorkerUnavailable(f"the workers/ package is not in {ROOT} (a source checkout)")
        super().__init__()
        self.report = report
        self.ready = threading.Event()
        self.ready_after = 0.0
        self.node = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.problems: list[str] = []
        # On the command line, this replaces the worker's own transport options: keep the
        # sentinel's master name (workers/ derives it from the same URL) next to the prefix.
        transport = json.dumps({**celery_broker(broker_url)[1], "global_keyprefix": prefix})
        self.command = "celery -A workers worker -l info"
        argv = [
            sys.executable,
            "-m",
            "oqron_cache.demo.worker",
            *("-A", "workers", "worker", "-l", "info", "--concurrency", "2"),
            *("-n", f"oqron-demo-{os.getpid()}@%h", "--without-gossip", "--without-mingle"),
            "--",
            f"broker.transport_options=(json){transport}",
        ]
        self.started = time.monotonic()
        # Our interpreter and module with a fixed argv (S603); secrets travel in env only.
        self.proc = subprocess.Popen(  # noqa: S603
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            cwd=ROOT,
            env=worker_env(redis_url, broker_url, namespace),
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle; stop() ends it
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._read, name="demo-worker-log", daemon=True).start()

    def _read(self) -> None:
        stream = cast(IO[str], self.proc.stdout)
        try:
            self._follow(stream)
        finally:
            self.ready.set()  # the process ended: nobody waits for it any longer
            with contextlib.suppress(OSError):
                stream.close()

    def _follow(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip()
            if not line:
                continue
            self.tail.append(line)
            ready = _READY.search(line)
            if ready and not self.ready.is_set():
                self.node = ready.group(1)
                self.ready_after = time.monotonic() - self.started
                self.ready.set()
                continue
            received = _RECEIVED.search(line)
            if received:
                self.report(f"  [worker pid {self.pid}] received {REFRESH_TASK}[{received['id']}]")
                continue
            outcome = _OUTCOME.search(line)
            if outcome:
                self._count(outcome["outcome"])
                self.report(
                    f"  [worker pid {self.pid}] refresh {outcome['cache']} {outcome['key']}: "
                    f"{outcome['outcome']}"
                )
                continue
            if _PROBLEM.search(line):
                self.problems.append(line)

    def wait_ready(self, timeout: float) -> float:
        """Wait for the worker's "ready" line; return how long it took to start.

        Raises :class:`WorkerUnavailable` if it exited or did not get ready within ``timeout``.
        """
        self.ready.wait(timeout)
        if self.proc.poll() is not None or not self.node:
            said = self.problems[-1] if self.problems else (self.tail[-1] if self.tail else "")
            if self.proc.poll() is None:
                raise WorkerUnavailable(f"the worker was not ready within {timeout:.0f} s")
            raise WorkerUnavailable(
                f"the worker exited (code {self.proc.returncode})"
                + (f": {said.strip()[:160]}" if said else "")
            )
        return self.ready_after

    def stop(self) -> None:
        """Warm shutdown (SIGTERM to its process group), then SIGKILL if it lingers."""
        with contextlib.suppress(OSError):
            cast(IO[str], self.proc.stdin).close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_TIMEOUT)
        # The pool's children are in the same group: make sure none outlives the demo.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)


class EmbeddedWorker(_Outcomes):
    """A Celery worker (pool ``solo``) in a daemon thread of this process."""

    def __init__(self, app: Any, report: Report) -> None:
        from celery.signals import task_postrun, task_prerun

        super().__init__()
        self.app = app
        self.report = report
        self._ready = threading.Event()
        self.ready_after = 0.0
        self._signals = ((task_prerun, self._on_prerun), (task_postrun, self._on_postrun))
        for signal_, handler in self._signals:
            signal_.connect(handler, weak=False)
        self.worker = app.WorkController(
            app=app,
            concurrency=1,
            pool="solo",
            hostname=f"oqron-demo-{os.getpid()}@embedded",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=self._on_ready,
        )
        self.node = self.worker.hostname
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.worker.start, name="demo-worker", daemon=True)
        self.thread.start()

    def _on_ready(self, *_: Any) -> None:
        self.ready_after = time.monotonic() - self.started
        self._ready.set()

    def _ours(self, task: Any) -> bool:
        # Our worker's thread (the task object may be bound to Celery's default app).
        return (
            getattr(task, "name", None) == REFRESH_TASK
            and threading.current_thread() is self.thread
        )

    def _on_prerun(self, task_id: str = "", task: Any = None, **_: Any) -> None:
        if self._ours(task):
            self.report(f"  [worker thread] received {REFRESH_TASK}[{task_id}]")

    def _on_postrun(self, task: Any = None, args: Any = (), retval: Any = None, **_: Any) -> None:
        if self._ours(task) and isinstance(args, list | tuple) and len(args) >= 2:
            outcome = str(retval)
            self._count(outcome)
            self.report(f"  [worker thread] refresh {args[0]} {args[1]}: {outcome}")  # no token

    def wait_ready(self, timeout: float) -> float:
        """Wait until the worker consumes; return how long it took."""
        if not self._ready.wait(timeout) or not self.thread.is_alive():
            raise WorkerUnavailable(f"the embedded worker did not start within {timeout:.0f} s")
        return self.ready_after

    def stop(self) -> None:
        """Ask the worker loop to end (as celery.contrib.testing does) and wait for it."""
        from celery.worker import state

        state.should_terminate = 0
        try:
            self.thread.join(STOP_TIMEOUT)
        finally:
            state.should_terminate = None
            for signal_, handler in self._signals:
                signal_.disconnect(handler)


class ExternalWorker(_Outcomes):
    """A worker started by someone else (docker compose's ``worker``): only waited for."""

    def __init__(self, app: Any, broker_url: str) -> None:
        super().__init__()
        self.app = app
        self.broker_url = broker_url
        self.node = ""

    def wait_ready(self, timeout: float) -> float:
        """Ping until a worker answers; raise :class:`WorkerUnavailable` after ``timeout``."""
        started = time.monotonic()
        deadline = started + timeout
        last = "no worker answered"
        while time.monotonic() < deadline:
            try:
                replies = self.app.control.ping(timeout=1.0) or []
            except Exception as exc:  # the broker is not there (yet)
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.5)
                continue
            if replies:
                self.node = ", ".join(sorted(name for reply in replies for name in reply))
                return time.monotonic() - started
        raise WorkerUnavailable(
            f"no worker answered on {mask_url(self.broker_url)} within {timeout:.0f} s ({last})"
        )

    def wait_outcomes(self, count: int, timeout: float) -> bool:
        """Its log is not ours to read: nothing to wait for."""
        return False

    def stop(self) -> None:
        """Nothing to stop: the worker is not ours."""


def _stop_on_eof() -> None:
    """The watchdog of a worker subprocess: stdin closed (the demo ended or died) -> stop.

    It reads the file descriptor, not ``sys.stdin``: a thread blocked in ``sys.stdin.read()``
    holds the buffer's lock, and the prefork pool's children (forked meanwhile) deadlock when
    they close their copy of ``sys.stdin``.
    """
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown


def worker_main(args: list[str]) -> int:
    """``python -m oqron_cache.demo.worker ARGS``: ``celery ARGS`` with the stdin watchdog."""
    from celery.bin.celery import main

    threading.Thread(target=_stop_on_eof, name="demo-watchdog", daemon=True).start()
    sys.argv = ["celery", *args]
    result: int = main()
    return result


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
