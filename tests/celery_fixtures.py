"""Helpers for the in-process Celery tests (tests/test_refresh_celery.py).

The fixtures themselves are the classic ones of ``celery.contrib.pytest`` (``celery_app``,
``celery_worker``), loaded by ``-p celery.contrib.pytest`` in pyproject's addopts: pytest-celery
1.x auto-loads a plugin named "celery" whose ``celery_worker`` is Docker-based, so addopts also
says ``-p no:celery``. What is here is what those tests share besides fixtures: a recorder of
task messages and outcomes (Celery signals), and polling with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.signals import before_task_publish, task_postrun, task_prerun


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Published:
    """One task message as the publisher sent it (``before_task_publish``)."""

    task: str
    id: str
    args: list[Any]
    kwargs: dict[str, Any]
    headers: dict[str, Any]
    exchange: str
    routing_key: str
    at: float  # time.monotonic() when it was published
    wall: float  # time.time() then


@dataclass
class Ran:
    """One task run in the worker (``task_prerun`` .. ``task_postrun``)."""

    task: str
    id: str
    args: list[Any]
    delivery_info: dict[str, Any]
    outcome: Any = None  # the task's return value ("refreshed", "rejected", ...)
    state: str | None = None  # SUCCESS / FAILURE
    done: bool = False
    at: float = 0.0  # time.monotonic() when it started


@dataclass
class TaskLog:
    """Records every message published and every task run while connected (thread-safe)."""

    published: list[Published] = field(default_factory=list)
    runs: list[Ran] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self) -> None:
        before_task_publish.connect(self._on_publish, weak=False)
        task_prerun.connect(self._on_prerun, weak=False)
        task_postrun.connect(self._on_postrun, weak=False)

    def disconnect(self) -> None:
        before_task_publish.disconnect(self._on_publish)
        task_prerun.disconnect(self._on_prerun)
        task_postrun.disconnect(self._on_postrun)

    # -- signal receivers (run in the publisher thread and in the worker's pool threads)

    def _on_publish(
        self,
        sender: str,
        body: Any,
        headers: dict[str, Any],
        exchange: str = "",
        routing_key: str = "",
        **_: Any,
    ) -> None:
        args, kwargs = (body[0], body[1]) if isinstance(body, list | tuple) else ([], {})
        sent = Published(
            sender,
            headers["id"],
            list(args),
            kwargs,
            headers,
            exchange,
            routing_key,
            time.monotonic(),
            time.time(),
        )
        with self.lock:
            self.published.append(sent)

    def _on_prerun(self, task_id: str, task: Any, args: Any, **_: Any) -> None:
        delivery = dict(task.request.delivery_info or {})
        with self.lock:
            self.runs.append(Ran(task.name, task_id, list(args), delivery, at=time.monotonic()))

    def _on_postrun(
        self, task_id: str, task: Any, retval: Any = None, state: str | None = None, **_: Any
    ) -> None:
        with self.lock:
            for ran in self.runs:
                if ran.id == task_id and not ran.done:
                    ran.outcome, ran.state, ran.done = retval, state, True
                    break

    # -- queries

    def sent(self, task: str) -> list[Published]:
        with self.lock:
            return [p for p in self.published if p.task == task]

    def finished(self, task: str) -> list[Ran]:
        with self.lock:
            return [r for r in self.runs if r.task == task and r.done]

    def started(self, task: str) -> list[Ran]:
        with self.lock:
            return [r for r in self.runs if r.task == task]

    def outcomes(self, task: str) -> list[Any]:
        return [r.outcome for r in self.finished(task)]

    def wait_finished(self, task: str, count: int, timeout: float = 10.0) -> list[Ran]:
        """Wait until ``count`` runs of ``task`` have finished; return them."""
        wait_for(
            lambda: len(self.finished(task)) >= count,
            timeout,
            what=f"{count} finished run(s) of {task} (have {self.outcomes(task)})",
        )
        return self.finished(task)
