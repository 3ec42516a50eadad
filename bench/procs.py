"""Processes of the multi-process benchmarks: a pool of web processes, and a Celery worker.

* :class:`Pool` spawns ``n`` processes, each hosting one object built from a class and keyword
  arguments, and calls its methods by name: on every process at once (:meth:`Pool.call`, the
  requests are written back to back, so the processes start within microseconds of each other)
  or on one (:meth:`Pool.call_one`).
* :class:`CeleryWorker` starts a private ``redis-server`` as the broker (``tests/redis_server.py``)
  and ``celery -A workers worker -l info`` against it, waits for ``ready.`` in its log, and
  stops the worker's whole process group on exit. Nothing goes to the shared Redis's broker
  keys: the cache's Redis (``OQRON_REDIS_URL``) only holds the benchmark's namespace.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .common import REPO_DIR

STEP_TIMEOUT = 60.0  # seconds a process may take to answer one call
_LOG_TIME = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ")
WORKER_START_TIMEOUT = 60.0


class RemoteError(RuntimeError):
    """A method raised in a pool process (the message carries its traceback)."""


def _host(conn: Connection, cls: type, kwargs: dict[str, Any], index: int) -> None:
    """Entry point of a pool process: build the object, then serve calls until "stop"."""
    try:
        obj = cls(index=index, **kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        conn.close()
        return
    conn.send(("ok", os.getpid()))
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, method, args = message
            try:
                result = getattr(obj, method)(*args)
            except Exception:
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("ok", result))
    finally:
        with contextlib.suppress(Exception):  # closing is best effort
            obj.close()
        conn.close()


class Pool:
    """``processes`` spawned processes (no state inherited from the parent), one object each."""

    def __init__(self, cls: type, processes: int, **kwargs: Any) -> None:
        ctx = mp.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        try:
            for index in range(processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_host, args=(child, cls, kwargs, index), daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
            self.pids = [self._answer(conn, "start") for conn in self.conns]
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.conns)

    def _answer(self, conn: Connection, what: str) -> Any:
        if not conn.poll(STEP_TIMEOUT):
            raise TimeoutError(f"a benchmark process did not answer {what!r} in {STEP_TIMEOUT} s")
        status, payload = conn.recv()
        if status == "error":
            raise RemoteError(f"{what} failed in a benchmark process:\n{payload}")
        return payload

    def call(self, method: str, *args: Any) -> list[Any]:
        """Call ``method(*args)`` on every process at once; return their results in order."""
        for conn in self.conns:
            conn.send(("call", method, args))
        return [self._answer(conn, method) for conn in self.conns]

    def call_one(self, index: int, method: str, *args: Any) -> Any:
        """Call ``method(*args)`` on process ``index`` only."""
        self.conns[index].send(("call", method, args))
        return self._answer(self.conns[index], method)

    def close(self) -> None:
        """Stop every process (terminate, by its handle, one that does not stop in 10 s)."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # a process that died already
                conn.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns, self.procs = [], []


class CeleryWorker:
    """A private broker and ``celery -A workers worker`` serving ``bench.refresh_caches``.

    ``with CeleryWorker(url, namespace) as worker:`` -- ``worker.broker_url`` is the broker the
    web processes must publish to; ``worker.log()`` is what the worker wrote so far.
    """

    COMMAND = ("-m", "celery", "-A", "workers", "worker", "-l", "info")

    def __init__(
        self,
        redis_url: str,
        namespace: str,
        *,
        resolver_sleep: float = 0.05,
        modules: str = "bench.refresh_caches",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.redis_url = redis_url
        self.namespace = namespace
        self.resolver_sleep = resolver_sleep
        self.modules = modules
        self.extra_args = extra_args
        self.broker: Any = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="oqron-bench-worker-"))
        self.log_path = self._log_dir / "worker.log"
        self.started_in = 0.0

    @property
    def broker_url(self) -> str:
        return str(self.broker.url)

    @property
    def command(self) -> str:
        """The worker's command line, as shown in the results."""
        args = ["celery", *self.COMMAND[2:], "-n", f"{self.namespace}@%h", *self.extra_args]
        return " ".join(args)

    def __enter__(self) -> CeleryWorker:
        sys.path.insert(0, str(REPO_DIR))  # tests/ is not installed; it is in the repository
        from tests.redis_server import RedisServer

        self.broker = RedisServer()
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        env = dict(os.environ)
        env.update(
            OQRON_REDIS_URL=self.redis_url,
            OQRON_BROKER_URL=self.broker_url,
            OQRON_NAMESPACE=self.namespace,
            OQRON_CACHE_MODULES=self.modules,
            BENCH_RESOLVER_SLEEP=str(self.resolver_sleep),
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH")) if p),
        )
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(  # our interpreter, a fixed argv
                [
                    sys.executable,
                    *self.COMMAND,
                    "-n",
                    f"{self.namespace}@%h",
                    *self.extra_args,
                ],
                cwd=REPO_DIR,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped as a whole
            )
        deadline = started + WORKER_START_TIMEOUT
        while not re.search(r"\bready\.", self.log()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Celery worker exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Celery worker was not ready:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        self.started_in = time.monotonic() - started

    def log(self) -> str:
        """Everything the worker wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def outcomes(self, key: str) -> list[str]:
        """The outcomes the worker logged for refreshes of ``key`` ("refreshed", ...)."""
        pattern = re.compile(rf"refresh \S+ {re.escape(key)}: (\S+)")
        return pattern.findall(self.log())

    def wait_outcomes(self, key: str, timeout: float = 3.0) -> list[str]:
        """:meth:`outcomes`, waiting up to ``timeout`` s for the first one to be logged.

        The worker logs a refresh's outcome after publishing its fill, so a reader can see
        the new value before the line is in the log.
        """
        deadline = time.monotonic() + timeout
        while not (found := self.outcomes(key)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return found

    def timeline(self, cache: str, key: str) -> dict[str, float]:
        """When (wall clock, s; the log's ms resolution) the worker received the refresh task
        of ``key`` and when it logged the refresh's outcome (after the fill was published).
        Only the first of each; missing ones are absent."""
        from oqron_cache.celery.tasks import refresh_task_prefix

        task = re.escape(refresh_task_prefix(cache, key))  # ids are "<prefix>:<lock digest>"
        marks = {
            "received": rf"\] Task oqron_cache\.refresh\[{task}(?::[0-9a-f]+)?\] received",
            "refreshed": rf"\] refresh {re.escape(cache)} {re.escape(key)}: ",
        }
        found: dict[str, float] = {}
        for line in self.log().splitlines():
            for mark, pattern in marks.items():
                if mark not in found and re.search(pattern, line):
                    stamp = _LOG_TIME.match(line)
                    if stamp:  # the worker logs local time, as datetime.timestamp() reads it
                        found[mark] = dt.datetime.strptime(
                            stamp.group(1), "%Y-%m-%d %H:%M:%S,%f"
                        ).timestamp()
        return found

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # our worker's own group (its pool children)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # Pool children may outlive the main process by a moment: make sure the group is gone.
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.broker is not None:
            self.broker.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
            self._log_dir.rmdir()
