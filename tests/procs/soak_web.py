"""A web process of the history-checked runs: threads doing a seeded random mix, all recorded.

:func:`run` (the target of a ``multiprocessing`` "spawn" process) configures the library,
declares the caches of :mod:`tests.procs.soak_caches`, uses every key once, then forks
``Plan.forks`` children (multiprocessing "fork", as gunicorn ``--preload`` or uWSGI would after
first use) and runs ``Plan.threads`` threads of the mix until ``Plan.end_at``, each child too.
At ``end_at + settle`` every process reads every key once more (late reads that must see the
last writes). Every operation goes to the run's history; ``Plan.progress[slot]`` counts the
operations that returned, so a supervisor sees each process make progress.
"""

from __future__ import annotations

import fnmatch
import itertools
import logging
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import oqron_cache
from bench.history import parse_value
from tests.procs.soak_caches import SWR, WT, Params, declare, group, key_name, origin, recorder

PATTERNS = ("k0*", "k1*", "k?3", "k1[02]")
DEFAULT_MIX: tuple[tuple[str, float], ...] = (
    ("get", 0.58),
    ("wt_get", 0.22),
    ("set", 0.06),
    ("wt_set", 0.04),
    ("delete", 0.03),
    ("wt_delete", 0.01),
    ("pattern", 0.03),
    ("tag", 0.03),
)
JOIN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Plan:
    """What one web process does. Times are wall-clock (``time.time()``)."""

    index: int
    redis_url: str
    namespace: str
    params: Params
    seed: int
    start_at: float
    end_at: float
    threads: int = 4
    keys: int = 16
    zipf: float = 1.1
    think: float = 0.01
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX
    broker_url: str | None = None
    op_timeout: float = 0.25
    enqueue_budget: float = 0.3
    set_timeout: float = 5.0
    settle: float = 1.0
    forks: tuple[int, ...] = ()  # the slots (indexes) of the children forked after first use
    progress: Any = None  # a multiprocessing Array of ints, one slot per process
    log_path: str | None = None  # the library's log (default: stderr)

    @property
    def key_names(self) -> list[str]:
        return [key_name(i) for i in range(self.keys)]


def celery_app(broker_url: str, name: str = "soak_web") -> Any:
    """The web side's Celery app: JSON only, no results, a broker that fails fast."""
    from celery import Celery

    app = Celery(name, broker=broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,
        broker_connection_timeout=1.0,
        broker_connection_retry=False,
    )
    return app


class Mix:
    """One thread's operations on the caches, each recorded."""

    def __init__(self, plan: Plan, caches: dict[str, oqron_cache.Cache[Any]], rng: random.Random):
        self.plan = plan
        self.caches = caches
        self.rng = rng
        self.keys = plan.key_names
        weights = [1.0 / (i + 1) ** plan.zipf for i in range(plan.keys)]
        self.key_weights = list(itertools.accumulate(weights))
        self.ops = [name for name, _ in plan.mix]
        self.op_weights = list(itertools.accumulate(weight for _, weight in plan.mix))
        self.actions: dict[str, Callable[[str], None]] = {
            "get": lambda key: self.get(SWR, key),
            "wt_get": lambda key: self.get(WT, key),
            "set": lambda key: self.set(SWR, key),
            "wt_set": lambda key: self.set(WT, key),
            "delete": lambda key: self.delete(SWR, key),
            "wt_delete": lambda key: self.delete(WT, key),
            "pattern": lambda _key: self.pattern(),
            "tag": lambda _key: self.tag(),
        }

    def step(self) -> None:
        """One operation chosen by the mix, on a key chosen by the Zipf law."""
        op = self.rng.choices(self.ops, cum_weights=self.op_weights)[0]
        key = self.rng.choices(self.keys, cum_weights=self.key_weights)[0]
        self.actions[op](key)

    def get(self, cache: str, key: str) -> None:
        with recorder().op("get", cache, key) as rec:
            value = parse_value(self.caches[cache].get(key))
            if value is not None:
                rec["v"], rec["vt"], rec["w"] = value

    def set(self, cache: str, key: str) -> None:
        writer = f"s:{os.getpid()}:{threading.current_thread().name}"
        with recorder().op("set", cache, key, w=writer) as rec:
            at = time.time()
            rec["vt"] = at
            version = origin().bump(cache, key) if cache == SWR else origin().next_seq(cache, key)
            rec["v"] = version
            value = {"v": version, "t": at, "w": writer}
            if cache == WT:
                self.caches[cache].set(key, value, timeout=self.plan.set_timeout)
            else:
                self.caches[cache].set(key, value)

    def delete(self, cache: str, key: str) -> None:
        with recorder().op("delete", cache, key):
            self.caches[cache].delete(key)

    def pattern(self) -> None:
        pattern = self.rng.choice(PATTERNS)
        covered = [k for k in self.keys if fnmatch.fnmatchcase(k, pattern)]
        with recorder().op("pattern", SWR, pattern, ks=covered):
            self.caches[SWR].invalidate_pattern(pattern)

    def tag(self) -> None:
        number = self.rng.randrange(3)
        covered = [k for k in self.keys if group(k) == number]
        with recorder().op("tag", SWR, f"g{number}", ks=covered):
            self.caches[SWR].invalidate_by_tag(f"g{number}")


def _thread(plan: Plan, caches: dict[str, oqron_cache.Cache[Any]], number: int) -> None:
    rng = random.Random(f"{plan.seed}:{plan.index}:{number}")
    mix = Mix(plan, caches, rng)
    while time.time() < plan.end_at:
        try:
            mix.step()
        except Exception:  # noqa: S112 - recorded in the history; the mix goes on
            continue
        if plan.progress is not None:
            plan.progress[plan.index] += 1
        if plan.think:
            time.sleep(rng.expovariate(1.0 / plan.think))


def _work(plan: Plan, caches: dict[str, oqron_cache.Cache[Any]]) -> None:
    """The threads of the mix, then the late reads."""
    time.sleep(max(0.0, plan.start_at - time.time()))
    threads = [
        threading.Thread(target=_thread, args=(plan, caches, n), name=f"mix-{plan.index}.{n}")
        for n in range(plan.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(max(0.0, plan.end_at + plan.settle - time.time()))
    mix = Mix(plan, caches, random.Random(plan.seed))
    for key in plan.key_names:
        for cache in (SWR, WT):
            try:
                mix.get(cache, key)
            except Exception:  # noqa: S112 - recorded
                continue


def _child(plan: Plan) -> None:
    """A child forked after first use: it inherits the parent's configured caches."""
    from tests.procs import soak_caches

    _work(plan, soak_caches._state["caches"])


def run(plan: Plan) -> None:
    """The whole life of one web process (and of the children it forks)."""
    if plan.log_path:
        logging.basicConfig(
            filename=plan.log_path,
            level=logging.WARNING,
            format=f"%(asctime)s web-{plan.index} %(process)d %(levelname)s %(name)s %(message)s",
        )
    app = celery_app(plan.broker_url) if plan.broker_url else None
    oqron_cache.configure(
        redis_url=plan.redis_url,
        celery_app=app,
        namespace=plan.namespace,
        op_timeout=plan.op_timeout,
        enqueue_budget=plan.enqueue_budget,
    )
    caches = declare(plan.params)
    mix = Mix(plan, caches, random.Random(plan.seed))
    for key in plan.key_names:  # first use: connections, bus and dispatcher exist before a fork
        for cache in (SWR, WT):
            try:
                mix.get(cache, key)
            except Exception:  # noqa: S112 - recorded
                continue
    fork = mp.get_context("fork")
    children = []
    for slot in plan.forks:
        child_plan = replace(plan, index=slot, forks=())
        child = fork.Process(target=_child, args=(child_plan,), name=f"soak-web-{slot}")
        child.start()
        recorder().event("fork", x={"child": child.pid, "slot": slot})
        children.append(child)
    _work(plan, caches)
    failed = []
    for child in children:
        child.join(JOIN_TIMEOUT)
        if child.exitcode != 0:
            failed.append((child.pid, child.exitcode))
            if child.exitcode is None:
                child.kill()
    oqron_cache.reset()
    if failed:
        raise RuntimeError(f"forked web processes failed (pid, exit code): {failed}")
