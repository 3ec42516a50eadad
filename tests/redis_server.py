"""Private ``redis-server`` processes for tests that break things.

Tests that kill, pause, fill up or demote Redis must never do it to the shared
server at 127.0.0.1:6379.  :class:`RedisServer` starts a throw-away server on a
free port inside its own temporary directory and offers the faults as methods::

    with RedisServer() as server:
        client = server.client()
        server.kill()
        server.restart()          # same port, empty dataset
        with server.paused():     # SIGSTOP ... SIGCONT
            ...

This module deliberately imports nothing from pytest or from the library.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from oqron_cache.redis.replies import as_dict, as_int

__all__ = ["RedisServer", "delete_namespace", "free_port", "namespace_pattern", "no_retry"]

REDIS_SERVER_BIN = os.environ.get("OQRON_TEST_REDIS_SERVER", "redis-server")
HOST = "127.0.0.1"

_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def no_retry() -> Retry:
    """A redis-py retry policy that does not retry.

    redis-py 6 retries ConnectionError/TimeoutError 3 times with exponential
    backoff (base 1 s) by default, which turns a 0.2 s socket timeout into
    several seconds.  Fault-injection tests want the first failure.
    """
    return Retry(NoBackoff(), 0)


def namespace_pattern(ns: str) -> str:
    """SCAN MATCH pattern for every key of namespace *ns* (``oqron:<ns>:*``)."""
    if not _NAMESPACE_RE.fullmatch(ns):
        raise ValueError(f"invalid namespace {ns!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    return f"oqron:{ns}:*"  # the allowed characters include no glob metacharacters


def delete_namespace(client: redis.Redis, ns: str, *, batch: int = 1000) -> int:
    """Delete every key matching ``oqron:<ns>:*`` with SCAN + UNLINK; return how many.

    Safe on a shared server: never KEYS, never FLUSHALL/FLUSHDB.
    """
    pattern = namespace_pattern(ns)
    deleted = 0
    pending: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        pending.append(key)
        if len(pending) >= batch:
            deleted += as_int(client.unlink(*pending))
            pending.clear()
    if pending:
        deleted += as_int(client.unlink(*pending))
    return deleted


def _load_libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


# Loaded here, in the parent: dlopen() between fork and exec may deadlock in a threaded parent.
_LIBC = _load_libc()


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM redis-server if the test process dies without cleanup."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1:<free port> in a temporary directory.

    The server is started by the constructor (``start=False`` to defer).  ``stop()``
    ends the process but keeps the directory so ``restart()`` can reuse the port;
    ``close()`` (also called by ``__exit__`` and at interpreter exit) stops it and
    removes the directory.

    ``extra_args`` are appended to the redis-server command line, e.g.
    ``["--requirepass", "s3cret"]``; pass ``password=``/``username=`` so that
    ``client()`` and the admin helpers can authenticate.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        username: str | None = None,
        password: str | None = None,
        startup_timeout: float = 10.0,
        start: bool = True,
    ) -> None:
        if shutil.which(REDIS_SERVER_BIN) is None:
            raise RuntimeError(
                f"{REDIS_SERVER_BIN!r} not found on PATH; install redis-server "
                "(apt-get install redis-server) or set OQRON_TEST_REDIS_SERVER"
            )
        self._fixed_port = port is not None
        self.port: int = port if port is not None else free_port()
        self.extra_args: list[str] = list(extra_args)
        self.username = username
        self.password = password
        self.startup_timeout = startup_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="oqron-redis-"))
        self.log_path = self.dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._blackhole: socket.socket | None = None
        self._closed = False
        self._clients: list[redis.Redis] = []
        atexit.register(self.close)
        if start:
            try:
                self.start()
            except BaseException:
                self.close()
                raise

    # -- properties -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- clients --------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` on this server with 2 s timeouts and no retries.

        Keyword arguments override the defaults.  Clients are closed by ``close()``.
        """
        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "db": 0,
            "username": self.username,
            "password": self.password,
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "retry": no_retry(),
        }
        options.update(kwargs)
        client = redis.Redis(**options)
        self._clients.append(client)
        return client

    def _admin(self) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            username=self.username,
            password=self.password,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            retry=no_retry(),
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        if self._closed:
            raise RuntimeError("RedisServer is closed")
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if self._spawn_and_wait(retry_bind_for=0.0):
                return
            # Someone took our "free" port between free_port() and bind(): pick another.
            if attempt + 1 < attempts:
                self.port = free_port()
        raise RuntimeError(f"could not bind redis-server to port {self.port}\n{self.log_tail()}")

    def restart(self, *, retry_bind_for: float = 3.0) -> None:
        """Stop (if running) and start again on the SAME port, with an empty dataset."""
        self.stop()
        if not self._spawn_and_wait(retry_bind_for=retry_bind_for):
            raise RuntimeError(
                f"redis-server could not re-bind port {self.port} within {retry_bind_for}s\n"
                f"{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server and wait for it (SIGKILL after *timeout*). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process never handles SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._after_exit()

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown, clients see a reset) and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._after_exit()

    def close(self) -> None:
        """Stop the server, close clients handed out, delete the directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    client.close()
            self._clients.clear()
            shutil.rmtree(self.dir, ignore_errors=True)
            atexit.unregister(self.close)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {self.url} pid={self.pid} {state}>"

    # -- faults ---------------------------------------------------------------------------

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing is answered."""
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        self._paused = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        try:
            yield
        finally:
            if self.running:
                self.resume()

    def set_maxmemory(self, nbytes: int, policy: str = "noeviction") -> None:
        """CONFIG SET maxmemory/maxmemory-policy; ``set_maxmemory(0)`` removes the limit.

        Note: an idle Redis 7 already uses ~1 MB, so with ``noeviction`` a small limit
        makes every write fail with ``OOM command not allowed``.
        """
        with self._admin() as admin:
            admin.config_set("maxmemory-policy", policy)
            admin.config_set("maxmemory", str(nbytes))

    def make_readonly(self) -> None:
        """Make the server a replica of a port nobody listens on: writes fail with READONLY.

        The fake master's port is kept bound (but not listening) by this object, so
        the replica's connection attempts are refused and nobody can take the port.
        Reads keep working (``replica-serve-stale-data yes``) and data is kept, since
        no sync ever succeeds.
        """
        if self._blackhole is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            self._blackhole = sock
        master_port = self._blackhole.getsockname()[1]
        with self._admin() as admin:
            admin.replicaof(HOST, master_port)

    def make_writable(self) -> None:
        """REPLICAOF NO ONE: back to a writable master (the dataset is kept)."""
        with self._admin() as admin:
            admin.replicaof("NO", "ONE")
        self._close_blackhole()

    def flushall(self) -> None:
        """FLUSHALL on this private server (never use FLUSHALL on the shared one)."""
        with self._admin() as admin:
            admin.flushall()

    # -- diagnostics ----------------------------------------------------------------------

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no redis-server log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------------

    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        return proc

    def _after_exit(self) -> None:
        self._paused = False
        self._close_blackhole()

    def _close_blackhole(self) -> None:
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None

    def _argv(self) -> list[str]:
        return [
            REDIS_SERVER_BIN,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.dir),
            *self.extra_args,
        ]  # fmt: skip

    def _spawn_and_wait(self, *, retry_bind_for: float) -> bool:
        """Start redis-server; True once it answers, False if its port was in use.

        While the port is in use, keep re-spawning for up to *retry_bind_for* seconds.
        Any other failure raises RuntimeError with the log tail.
        """
        bind_deadline = time.monotonic() + retry_bind_for
        while True:
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self._argv(),
                    cwd=self.dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_set_pdeathsig if _LIBC is not None else None,  # noqa: PLW1509
                )
            outcome = self._wait_ready(self._proc, log_offset)
            if outcome == "ready":
                return True
            if outcome == "in-use" and time.monotonic() < bind_deadline:
                time.sleep(0.1)
                continue
            if outcome == "in-use":
                return False
            self.stop()
            raise RuntimeError(
                f"redis-server on port {self.port} did not become ready ({outcome}); "
                f"argv={self._argv()!r}\n--- {self.log_path} ---\n{self.log_tail()}"
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_offset: int) -> str:
        """Return 'ready', 'in-use' (bind failed: port taken), 'exited' or 'timeout'."""
        deadline = time.monotonic() + self.startup_timeout
        probe = redis.Redis(
            host=HOST,
            port=self.port,
            username=self.username,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=no_retry(),
        )
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    proc.wait()
                    with self.log_path.open("rb") as log:
                        log.seek(log_offset)
                        this_run = log.read().decode(errors="replace")
                    return "in-use" if "Address already in use" in this_run else "exited"
                try:
                    probe.ping()
                    # Make sure it is OUR process answering, not a stranger on the port.
                    info = as_dict(probe.info("server"))
                    if int(info["process_id"]) == proc.pid:
                        return "ready"
                except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
                    # Started with --requirepass/--aclfile but no credentials given here:
                    # it answered, which is all we need.
                    if proc.poll() is None:
                        return "ready"
                except redis.ResponseError as exc:
                    if "NOAUTH" in str(exc) and proc.poll() is None:
                        return "ready"
                    if "LOADING" not in str(exc):
                        raise
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.02)
            return "timeout"
        finally:
            probe.close()


class SentinelServer(RedisServer):
    """A private Redis Sentinel (``redis-server <conf> --sentinel``) monitoring one master.

    ``SentinelServer(master_port=m.port)`` watches the master at 127.0.0.1:<m.port> under the
    name ``service`` (quorum 1, so this one sentinel can fail it over). Its configuration file
    lives in the server's temporary directory, where Sentinel rewrites it.
    """

    def __init__(self, *, master_port: int, service: str = "mymaster", **kwargs: Any) -> None:
        self.master_port = master_port
        self.service = service
        super().__init__(**kwargs)

    def _argv(self) -> list[str]:
        conf = self.dir / "sentinel.conf"
        if not conf.exists():  # Sentinel rewrites it; a restart keeps what it learned
            conf.write_text(
                f"sentinel monitor {self.service} {HOST} {self.master_port} 1\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 10000\n"
                "sentinel resolve-hostnames no\n"
            )
        return [
            REDIS_SERVER_BIN, str(conf), "--sentinel",
            "--port", str(self.port),
            "--bind", HOST,
            "--daemonize", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip

    def master(self) -> tuple[str, int]:
        """The master's address as this sentinel sees it now."""
        with self._admin() as admin:
            host, port = admin.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return str(host.decode() if isinstance(host, bytes) else host), int(port)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica now (no agreement needed)."""
        with self._admin() as admin:
            admin.execute_command("SENTINEL", "FAILOVER", self.service)
