"""A real ``celery -A workers worker`` subprocess for the multi-process tests.

:class:`WorkerProcess` starts the standalone worker deployment (prefork, 2 children by default)
in its own process group, configured through the environment as a user would
(``OQRON_REDIS_URL``, ``OQRON_BROKER_URL``, ``OQRON_NAMESPACE``, ``OQRON_CACHE_MODULES``), with
its log in a file the test can read and wait on. If pytest dies without its teardown, the
worker's main process gets SIGKILL (its pool children then see their pipe close and exit).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER_READY = 40.0  # seconds a worker may take to print "ready." on a loaded 2-core machine

# Loaded in the parent: dlopen() between fork and exec may deadlock in a threaded parent.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setsid()  # its own process group: killpg reaches the pool children
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WorkerProcess:
    """``celery -A workers worker -l info -c <concurrency> --pool prefork`` serving ``modules``.

    ``broker`` ``None`` leaves ``OQRON_BROKER_URL`` unset: the worker derives its broker from
    the Redis URL. ``prefix`` starts the worker's node name (``<prefix><6 hex>@host``);
    ``extra_args`` are appended to the command line (``--without-mingle`` saves a 1 s
    neighbour search per start). ``app`` and ``cwd``: the Celery app module and the directory
    it runs in (``oqron_cache.celery.worker`` from anywhere: the app an installed wheel has).
    """

    def __init__(
        self,
        log_dir: Path,
        broker: str | None,
        redis_url: str,
        namespace: str,
        *,
        modules: str,
        prefix: str = "w",
        concurrency: int = 2,
        extra_args: Sequence[str] = ("--without-mingle",),
        app: str = "workers",
        cwd: Path = ROOT,
    ) -> None:
        self.name = f"{prefix}{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.name}.log"
        env = {
            **os.environ,
            "OQRON_REDIS_URL": redis_url,
            "OQRON_BROKER_URL": broker or "",
            "OQRON_NAMESPACE": namespace,
            "OQRON_CACHE_MODULES": modules,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        if broker is None:
            del env["OQRON_BROKER_URL"]
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that started the child exits, not the
            # process: a worker started from asyncio.to_thread dies with the executor thread
            # at the end of the test's loop, and every later test finds no worker.
            raise RuntimeError("start WorkerProcess from the main thread (PR_SET_PDEATHSIG)")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "celery", "-A", app, "worker", "-l", "info",
                    "-c", str(concurrency), "--pool", "prefork", "-n", f"{self.name}@%h",
                    *extra_args,
                ],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - setsid + prctl only
            )  # fmt: skip
        self.pid = self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> str:
        """Wait until ``pattern`` (a regex) occurs ``count`` times in the log; return the log."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            if len(re.findall(pattern, text)) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited (rc={self.proc.returncode}):\n{text[-4000:]}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{pattern!r} x{count} not in the worker log:\n{text[-4000:]}")
            time.sleep(0.02)

    def wait_ready(self) -> None:
        self.wait_for(rf"{re.escape(self.name)}@\S+ ready\.", timeout=WORKER_READY)

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children) and reap the main."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def web_app(name: str, broker: str, transport_options: dict[str, Any] | None = None) -> Any:
    """A Celery app for the test process's side of a worker test: JSON only, no results."""
    from celery import Celery

    app = Celery(name, broker=broker)
    app.conf.update(
        broker_transport_options=transport_options or {},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
    )
    return app
