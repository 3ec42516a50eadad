"""Child processes for multi-process tests, and the parent's side of their line protocol.

:class:`Child` runs ``python -m tests.procs.stampede_worker`` (see that module for the modes)
with the test's own interpreter, in the repository root, and reads its JSON event lines with a
deadline, so a child that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class Child:
    """One worker process; ``stderr`` goes to ``log_path`` (shown when an event is late)."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.procs.stampede_worker", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            bufsize=0,
        )

    def event(self, timeout: float = 20.0) -> dict[str, Any]:
        """The next event line, parsed; AssertionError if none arrives within ``timeout``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no event from child within {timeout}s\n{self.log()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise AssertionError(
                        f"child exited (rc={self.proc.poll()}) before an event\n{self.log()}"
                    )
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        if event.get("event") == "error":
            raise AssertionError(f"child failed:\n{event.get('error')}\n{self.log()}")
        return event

    def expect(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next event, which must be called ``name``."""
        event = self.event(timeout)
        assert event["event"] == name, event
        return event

    def send(self, **command: Any) -> None:
        """Write one command line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the child and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def log(self) -> str:
        """The child's stderr so far (last 4 kB)."""
        self._log.flush()
        try:
            return self.log_path.read_bytes()[-4096:].decode(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the child if it still runs, close the pipes."""
        try:
            self.kill()
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()
            self._log.close()


def worker_args(
    mode: str, url: str, namespace: str, cache: str, key: str, **extra: Any
) -> list[str]:
    """The command line of a worker: ``--mode`` and friends, ``extra`` as ``--name value``."""
    args = ["--mode", mode, "--url", url, "--ns", namespace, "--cache", cache, "--key", key]
    for name, value in extra.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args
