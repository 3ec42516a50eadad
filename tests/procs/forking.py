"""Helpers of the fork tests (tests/test_fork.py) and of their WSGI app (fork_app.py).

* :class:`Origin`: a resolver that logs every run (pid and key) in Redis, so a test knows
  exactly where and how often values were computed, whatever process ran them.
* :class:`Forked`: a child made with a bare ``os.fork()`` that runs a function and talks to the
  parent in JSON lines over two pipes, every read bounded by a deadline; the child always ends
  in ``os._exit`` (it is a copy of pytest: it must never run the rest of the session).
* :class:`Gunicorn`: ``gunicorn --preload -w 2`` serving :mod:`tests.procs.fork_app` on a free
  port, stopped at the end (and killed with the test process if it dies first).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from oqron_cache.redis.replies import as_list
from tests.procs import ROOT
from tests.redis_server import free_port


class Origin:
    """A resolver: ``"<key>#<n>"`` with ``n`` counted in Redis, each run logged with its pid."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)  # pid-checked pool
        self.counter = f"oqron:{namespace}:test:origin"
        self.log = f"oqron:{namespace}:test:runs"

    def __call__(self, key: str) -> str:
        n = self.client.incr(self.counter)
        self.client.rpush(self.log, f"{os.getpid()} {key}")
        return f"{key}#{n}"

    def runs(self) -> list[tuple[int, str]]:
        """Every run so far, oldest first: ``(pid, key)``."""
        out = []
        for item in as_list(self.client.lrange(self.log, 0, -1)):
            pid, key = item.decode().split(" ", 1)
            out.append((int(pid), key))
        return out


class Channel:
    """JSON lines over a pair of pipe file descriptors, reads bounded by a deadline."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._buffer = b""

    def send(self, message: Any) -> None:
        """Write one message."""
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(self._write_fd, data) :]

    def recv(self, timeout: float = 30.0) -> Any:
        """The next message; AssertionError if none comes within ``timeout`` or on EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no message within {timeout}s")
            ready, _, _ = select.select([self._read_fd], [], [], remaining)
            if ready:
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    raise AssertionError("the other side closed its pipe")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        """Close both descriptors."""
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class Forked:
    """``body(channel)`` run in a child of a bare ``os.fork()``; its return value comes back.

    The child sends ``{"result": ...}`` or ``{"error": traceback}`` last and exits with
    ``os._exit`` whatever happens. :meth:`result` fails the test on an error or a deadline.
    """

    def __init__(self, body: Callable[[Channel], Any]) -> None:
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 70
            try:
                os.close(down_w)
                os.close(up_r)
                channel = Channel(down_r, up_w)
                try:
                    channel.send({"result": body(channel)})
                    code = 0
                except BaseException:
                    channel.send({"error": traceback.format_exc()})
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        self.pid = pid
        self.channel = Channel(up_r, down_w)

    def recv(self, timeout: float = 30.0) -> Any:
        """The child's next message (its own sends, before the result)."""
        message = self.channel.recv(timeout)
        if isinstance(message, dict) and "error" in message:
            raise AssertionError(f"child {self.pid} failed:\n{message['error']}")
        return message

    def send(self, message: Any) -> None:
        """Send ``message`` to the child."""
        self.channel.send(message)

    def result(self, timeout: float = 30.0) -> Any:
        """The child's return value; then the child is reaped."""
        try:
            message = self.recv(timeout)
            assert isinstance(message, dict) and "result" in message, message
            return message["result"]
        finally:
            self.close()

    def close(self) -> None:
        """Kill the child if it still runs, reap it, close the pipes."""
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        self.channel.close()


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded in the parent: no dlopen() between fork and exec
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Gunicorn:
    """``gunicorn --preload -w <workers>`` serving ``tests.procs.fork_app:app``."""

    def __init__(self, redis_url: str, namespace: str, workers: int = 2) -> None:
        self.port = free_port()
        self.workers = workers
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {
            **os.environ,
            "OQRON_REDIS_URL": redis_url,
            "OQRON_NAMESPACE": namespace,
            "PYTHONPATH": str(ROOT),
        }
        args = ["--preload", "-w", str(workers), "-b", f"127.0.0.1:{self.port}"]
        args += ["--graceful-timeout", "10", "--log-level", "warning"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *args, "tests.procs.fork_app:app"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, libc loaded before
        )
        self._wait_ready(30.0)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited ({self.proc.returncode})\n{self.log()}")
            with contextlib.suppress(OSError):
                self.call("/ping", timeout=2.0)
                return
            time.sleep(0.05)
        raise AssertionError(f"gunicorn did not answer within {timeout}s\n{self.log()}")

    def call(self, path: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        """GET ``path`` with ``params``; the JSON answer (a 409 gives ``{"status": 409}``)."""
        query = "&".join(f"{k}={v}" for k, v in params.items())
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                body: dict[str, Any] = json.loads(answer.read())
                return body
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                return {"status": 409}
            raise AssertionError(f"{url}: HTTP {exc.code}: {exc.read()!r}\n{self.log()}") from exc

    def each_worker(self, path: str, **params: Any) -> dict[int, dict[str, Any]]:
        """Call ``path`` once in every worker: the answers by worker pid.

        The calls go out together and each keeps its worker busy for ``hold`` seconds after
        its work, so a sync worker that took one cannot take another: each lands elsewhere.
        """
        params.setdefault("hold", 0.5)
        with ThreadPoolExecutor(self.workers) as pool:
            answers = list(pool.map(lambda _: self.call(path, **params), range(self.workers)))
        by_pid = {int(answer["pid"]): answer for answer in answers}
        assert len(by_pid) == self.workers, answers
        return by_pid

    def only(self, pid: int, path: str, **params: Any) -> dict[str, Any]:
        """Call ``path`` in worker ``pid`` (the others answer 409 without doing the work)."""
        params.update(only=pid, hold=0.5)
        answers = [a for a in self.each_worker_raw(path, **params) if a.get("status") != 409]
        assert answers and all(a["pid"] == pid for a in answers), answers
        return answers[0]

    def each_worker_raw(self, path: str, **params: Any) -> list[dict[str, Any]]:
        """Like :meth:`each_worker`, but the raw answers (409s included)."""
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda _: self.call(path, **params), range(self.workers)))

    def stop(self) -> int:
        """SIGTERM the master (workers exit cleanly, their atexit flushes run); its exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return self.proc.returncode
        finally:
            self._log.close()

    def log(self) -> str:
        """What gunicorn and the app printed so far."""
        with contextlib.suppress(ValueError):
            self._log.seek(0)
            return str(self._log.read().decode(errors="replace"))
        return ""
