"""The demo's helper processes: both ends of the line protocol between the demo and a helper.

A helper is ``python -m oqron_cache.demo --child``: it runs :func:`child_main`, which reads its
config as the first line of stdin (a Redis password must not show in ``ps``), then one JSON
command a line ("prime", "phase", "exit"), and answers each with one JSON message on stdout,
from a :class:`~oqron_cache.demo_participant.Participant` of its own. :class:`Helper` is the
demo's side: it starts the process, sends commands and waits for the replies, and turns a
helper that failed or hung into a :class:`DemoError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, cast

from .console import quiet_logging
from .participant import Participant


class DemoError(Exception):
    """The demo itself could not go on (a helper process failed); shown as one line."""


def child_main() -> int:
    """A helper process: config on the first stdin line, then one command a line."""
    with quiet_logging(sys.stderr):
        participant: Participant | None = None
        try:
            config = json.loads(sys.stdin.readline() or "{}")
            app = None
            if config.get("celery"):
                from .worker import make_app

                app = make_app(config["celery"]["broker"], config["celery"]["prefix"])
            participant = Participant(
                config["redis_url"], config["namespace"], config["threads"], app
            )
            _say({"ready": True})
            for line in sys.stdin:
                command = json.loads(line)
                if command["cmd"] == "prime":
                    _say({"primed_at": participant.prime(command["write"])})
                elif command["cmd"] == "phase":
                    _say(
                        participant.run_phase(
                            command["phase"], command["requests"], command["start_at"]
                        )
                    )
                else:
                    break
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # reported to the parent as one line, never a traceback
            _say({"error": f"{type(exc).__name__}: {exc}"})
            return 1
        finally:
            if participant is not None:
                participant.close()
    return 0


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Helper:
    """A helper process (``python -m oqron_cache.demo --child``) and the line protocol to it."""

    def __init__(self, index: int, config: dict[str, Any]) -> None:
        self.index = index
        # Open for the process's lifetime; stop() closes it.
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # importable even when not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(  # our own interpreter and module, a fixed argv
            [sys.executable, "-m", "oqron_cache.demo", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            encoding="utf-8",
            env=env,
        )
        self.replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"demo-helper-{index}", daemon=True).start()
        self.send(config)  # on stdin, not argv: a Redis password must not show in `ps`

    def _read(self) -> None:
        stream = cast(IO[str], self.proc.stdout)
        for line in stream:
            with contextlib.suppress(ValueError):  # not a message of ours: ignore it
                message = json.loads(line)
                if isinstance(message, dict):
                    self.replies.put(message)
        with contextlib.suppress(OSError):
            stream.close()
        self.replies.put(None)

    def send(self, message: dict[str, Any]) -> None:
        """Send one message; :class:`DemoError` if the process is gone."""
        stdin = cast(IO[str], self.proc.stdin)
        try:
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()
        except OSError:
            raise DemoError(f"helper process {self.index} {self._last_words()}") from None

    def reply(self, timeout: float) -> dict[str, Any]:
        """The next message from the process; :class:`DemoError` if it failed or hung."""
        try:
            message = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise DemoError(
                f"helper process {self.index} did not answer within {timeout:.0f} s"
            ) from None
        if message is None:
            raise DemoError(f"helper process {self.index} {self._last_words()}")
        if "error" in message:
            raise DemoError(f"helper process {self.index} failed: {message['error']}")
        return message

    def _last_words(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=2)
        lines = self.warnings()
        said = f": {lines[-1]}" if lines else ""
        return f"stopped (exit code {self.proc.returncode}){said}"

    def warnings(self) -> list[str]:
        """Distinct non-empty lines the process wrote to stderr, in order."""
        self.stderr.seek(0)
        lines = [line.strip() for line in self.stderr.read().splitlines() if line.strip()]
        return list(dict.fromkeys(lines))

    def stop(self) -> list[str]:
        """Ask the process to exit (kill it if it does not soon); return its :meth:`warnings`."""
        with contextlib.suppress(OSError, DemoError):
            self.send({"cmd": "exit"})
        with contextlib.suppress(OSError):
            cast(IO[str], self.proc.stdin).close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        lines = self.warnings()
        self.stderr.close()
        return lines
