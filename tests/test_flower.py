"""Refresh tasks in Flower (issue 3, item 7): readable names and arguments, the token masked.

A real ``celery -A workers worker`` and a real ``celery -A workers flower`` run as subprocesses
against a private redis-server (the cache's Redis and the broker: never the shared Redis). A
stale read in this process makes the library enqueue ``oqron_cache.refresh``; the test then
finds that task through Flower's HTTP API (``/api/tasks``), as an operator would.

Flower 2.x serves its API only to authenticated users (or with FLOWER_UNAUTHENTICATED_API set),
so Flower runs here as the README says to run it: behind basic auth.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from celery import Celery
from celery.signals import before_task_publish

import oqron_cache
from oqron_cache.celery.tasks import REFRESH_QUEUE, REFRESH_TASK, refresh_task_prefix
from oqron_cache.config import current_runtime, reset
from tests.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
CACHE = "flower-profiles"
KEY = "user 42:profile"  # a space and a colon: readable as written, in Flower too
MODULE = "flower_caches"
STARTUP = 30.0  # seconds for the worker and Flower to come up
SETTLE = 30.0  # ... and for a task's events to reach Flower

CACHE_MODULE = f'''\
"""Caches of the Flower test, imported by the worker (OQRON_CACHE_MODULES={MODULE})."""

import time

from oqron_cache import MemoryTier, RedisTier, cache


def load(key: str) -> dict:
    time.sleep(0.02)
    return {{"key": key, "refreshed": True}}


profiles = cache(
    "{CACHE}",
    tiers=[MemoryTier(max_size=10), RedisTier(ttl=1.0)],
    stale_ttl="1m",
    resolver=load,
)
'''


class Proc:
    """A subprocess in its own process group, its output in a file (shown when a test fails)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return f"--- {self.name} (exit {self.proc.poll()}):\n" + "\n".join(
            text.splitlines()[-lines:]
        )

    def stop(self) -> None:
        """SIGTERM the group (warm shutdown), SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a prefork child left behind
        self.proc.wait(timeout=10)
        self._out.close()


class Flower:
    """Flower's HTTP API with basic auth."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.auth = {"Authorization": f"Basic {token}"}

    def get(self, path: str, auth: bool = True) -> tuple[int, str]:
        """``(status, body)``; status 0 when nothing answers yet."""
        # S310: the URL is our own http://127.0.0.1:<port>, never user input.
        request = urllib.request.Request(self.base + path, headers=self.auth if auth else {})  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                return response.status, response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except OSError:
            return 0, ""

    def tasks(self, name: str) -> dict[str, Any]:
        """Flower's tasks named ``name`` (``{}`` until Flower answers)."""
        status, body = self.get(f"/api/tasks?taskname={name}")
        return json.loads(body) if status == 200 else {}


def wait_for(what: str, check: Callable[[], Any], timeout: float, *procs: Proc) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the processes' output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for proc in procs:
            if proc.proc.poll() is not None:
                pytest.fail(f"{proc.name} exited while waiting for {what}\n{proc.output()}")
        time.sleep(0.1)
    details = "\n".join(proc.output() for proc in procs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details}")


@pytest.fixture
def stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Celery, Flower, list[Proc], list[list[Any]]]]:
    """A private Redis, a worker and Flower on it, and this process configured as a web app.

    Yields ``(cache, app, flower, procs, published)``; ``published`` collects the arguments of
    every refresh task this process sends (the real token included).
    """
    (tmp_path / f"{MODULE}.py").write_text(textwrap.dedent(CACHE_MODULE), encoding="utf-8")
    namespace = f"t-flower-{secrets.token_hex(4)}"
    user, password = "oqron", secrets.token_urlsafe(12)
    port = free_port()
    procs: list[Proc] = []
    published: list[list[Any]] = []

    def record(sender: Any = None, body: Any = None, **_: Any) -> None:
        if sender == REFRESH_TASK and isinstance(body, tuple | list) and body:
            published.append(list(body[0]))

    server = RedisServer()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OQRON_", "FLOWER_"))}
        env.update(
            OQRON_REDIS_URL=server.url,
            OQRON_NAMESPACE=namespace,
            OQRON_CACHE_MODULES=MODULE,
            PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        )
        celery = [sys.executable, "-m", "celery", "-A", "workers"]
        node = f"flower-test-{os.getpid()}@%h"
        worker = [*celery, "worker", "-l", "info", "--concurrency", "1", "-n", node]
        procs.append(
            Proc(
                "worker", [*worker, "--without-gossip", "--without-mingle"], env, tmp_path / "w.log"
            )
        )
        flower = [*celery, "flower", f"--port={port}", "--address=127.0.0.1"]
        procs.append(
            Proc("flower", [*flower, f"--basic-auth={user}:{password}"], env, tmp_path / "f.log")
        )
        app = Celery("flower-test", broker=server.url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True)
        oqron_cache.configure(redis_url=server.url, celery_app=app, namespace=namespace)
        monkeypatch.syspath_prepend(str(tmp_path))
        module = importlib.import_module(MODULE)
        before_task_publish.connect(record, weak=False)
        try:
            yield module.profiles, app, Flower(port, user, password), procs, published
        finally:
            before_task_publish.disconnect(record)
            module.profiles.close()
            sys.modules.pop(MODULE, None)
    finally:
        reset()
        for proc in procs:
            proc.stop()
        server.close()


def test_refresh_task_shows_in_flower_readable_and_masked(
    stack: tuple[Any, Celery, Flower, list[Proc], list[list[Any]]],
) -> None:
    profiles, app, flower, procs, published = stack

    # Flower answers, and only to its users.
    wait_for("Flower's API", lambda: flower.get("/api/workers")[0] == 200, STARTUP, *procs)
    assert flower.get("/api/tasks", auth=False)[0] == 401

    # Task events flow from the worker to Flower: a harmless invalidation (of a key that does
    # not exist) shows up. Sent again until one does: Flower sees only events sent after it
    # subscribed, and the worker may still be starting.
    def probe_seen() -> bool:
        if any(t["state"] == "SUCCESS" for t in flower.tasks("oqron_cache.invalidate").values()):
            return True
        app.send_task("oqron_cache.invalidate", args=[CACHE, ["no-such-key"]])
        time.sleep(0.4)
        return False

    wait_for("an invalidate task in Flower", probe_seen, STARTUP, *procs)

    # A stale read in this process: served at once, one refresh task enqueued.
    profiles.set(KEY, {"key": KEY, "refreshed": False})
    written = time.time()
    time.sleep(max(0.0, written + 1.0 - time.time()) + 0.05)  # ttl is 1 s: now stale
    assert profiles.get(KEY) == {"key": KEY, "refreshed": False}
    assert current_runtime().dispatcher.join(timeout=10)
    assert len(published) == 1, published
    cache_name, key, token, seen = published[0]
    assert (cache_name, key) == (CACHE, KEY)
    assert re.fullmatch(r"[0-9a-f]{32}", token)

    # The worker refreshed it; every process will read the new value.
    def refreshed() -> bool:
        return bool(profiles.get(KEY)["refreshed"])

    wait_for("the refreshed value", refreshed, SETTLE, *procs)

    prefix = refresh_task_prefix(CACHE, KEY)

    def refresh_in_flower() -> dict[str, Any] | None:
        for task_id, task in flower.tasks(REFRESH_TASK).items():
            if task_id.startswith(prefix + ":") and task["state"] == "SUCCESS":
                return dict(task, uuid=task_id)
        return None

    task = wait_for("the refresh task in Flower", refresh_in_flower, SETTLE, *procs)
    assert task["name"] == REFRESH_TASK
    task_id = task["uuid"]
    assert task_id.startswith(f"refresh:{CACHE}:")
    # The arguments as Flower shows them: cache name and key readable, the token masked.
    assert task["args"] == repr([CACHE, KEY, "***", seen]), task["args"]
    assert task["kwargs"] == "{}"
    assert task["result"] == "'refreshed'"
    assert task["routing_key"] == REFRESH_QUEUE
    assert task["sent"] is not None  # task_send_sent_event: the publisher's event arrived too
    assert task["worker"].startswith("flower-test-")
    # The token is nowhere in what Flower knows about the task.
    status, info = flower.get(f"/api/task/info/{task_id}")
    assert status == 200
    status, listing = flower.get("/api/tasks")
    assert status == 200
    for text in (info, listing):
        assert token not in text
    assert json.loads(info)["args"] == task["args"]
    assert len(flower.tasks(REFRESH_TASK)) == 1  # one stale read, one refresh
