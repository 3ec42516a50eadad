"""``oqron-cache demo``: many concurrent requests on one key, one resolver call, a real worker.

Three phases, each a burst of concurrent ``get()`` calls on one key from several threads in this
process and in helper processes (``python -m oqron_cache.demo --child``, driven over their
stdin/stdout with one JSON message a line):

1. a cold key (never cached): one caller runs the resolver, the callers in flight wait for it,
   later ones find it cached;
2. an expired key (cached, then past ``ttl + stale_ttl``): never served, loaded again once;
3. a stale key (past ``ttl``, within ``stale_ttl``): every caller gets the stale value at once;
   one process wins the key's lock and enqueues ``oqron_cache.refresh``; a Celery worker runs
   the resolver, writes L2 and announces the fill on the bus; the demo measures how long it took
   until the new value was read (refresh-to-visible latency).

The worker is real (see :mod:`oqron_cache.demo_celery`): ``celery -A workers worker`` in a
subprocess when Redis answers (its broker queues under the demo's namespace), a worker already
running with ``--external-worker`` (docker compose), and otherwise a Celery worker thread on an
in-memory broker, with the memory tier alone, in one process.

The resolver sleeps 50 ms and counts its calls in a Redis hash, so the count covers every
process and the worker. The demo's keys live in the namespace ``demo-<pid>`` and are deleted at
the end (SCAN + UNLINK), also after Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import __version__
from .config import configure, current_runtime, mask_url, reset
from .demo_table import Totals, format_table
from .errors import OqronCacheError
from .frontend import Cache, cache
from .keys import stats_key
from .metrics import Stats
from .options import MemoryTier, RedisTier
from .tasks import REFRESH_TASK

TTL = 1.0  # freshness of the demo's values, seconds
STALE_TTL = 30.0  # stale window of the stale-key phase's cache
RESOLVER_SECONDS = 0.05  # the "slow database query"
START_LEAD = 0.3  # time between announcing a phase and releasing its requests
READY_TIMEOUT = 30.0  # a helper process must start within this
REPLY_TIMEOUT = 60.0  # ... and finish a phase within this
WORKER_TIMEOUT = 30.0  # a worker we start must be ready within this
EXTERNAL_TIMEOUT = 180.0  # a worker started by someone else (compose installs first)
VISIBLE_TIMEOUT = 8.0  # the refreshed value must be read within this (lock_ttl is 5 s)
TIERS = ("memory", "redis", "resolver")
WIDTH = 92  # of the text around the table
CACHE_NAMES = {"main": "demo", "swr": "demo-swr"}


@dataclass(frozen=True)
class Phase:
    """One burst of requests on one key."""

    name: str
    label: str
    cache: str  # "main" (stale_ttl 0) or "swr" (stale_ttl 30 s)
    key: str


PHASES = (
    Phase("cold", "cold key", "main", "cold-key"),
    Phase("expired", "expired key", "main", "expiring-key"),
    Phase("stale", "stale key", "swr", "stale-key"),
)
_BY_NAME = {phase.name: phase for phase in PHASES}


@dataclass(frozen=True)
class DemoOptions:
    """What ``oqron-cache demo`` was asked to do (validated by the command line)."""

    redis_url: str
    requests: int = 1000
    processes: int = 4
    threads: int = 25
    external_worker: bool = False  # a worker is already running (docker compose's)
    namespace: str | None = None  # default demo-<pid>; the worker's with external_worker


class DemoError(Exception):
    """The demo itself could not go on (a helper process failed); shown as one line."""


# ---------------------------------------------------------------------------- the caches


def counter_key(namespace: str) -> str:
    """The Redis hash counting the resolver's calls (field: key; ``key@worker``: in a worker)."""
    return f"oqron:{namespace}:demo-calls"


def worker_field(key: str) -> str:
    """The counter of ``key``'s resolver calls made inside a Celery refresh task."""
    return f"{key}@worker"


def quiet_client(url: str, timeout: float) -> redis.Redis:
    """A client for the demo's own calls: short timeouts, no retries."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
    )


def _in_refresh_task() -> bool:
    try:
        from celery import current_task
    except ImportError:
        return False
    return getattr(current_task, "name", None) == REFRESH_TASK


class CountingResolver:
    """The demo's resolver: a 50 ms "query" that counts its calls here and in Redis.

    Calls made inside a Celery ``oqron_cache.refresh`` task are counted apart. The Redis counts
    (a hash in the configured namespace) cover every process, the worker's included; this
    process's own counts are what is left when Redis is absent or went away.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clients: dict[str, redis.Redis] = {}

    def __call__(self, key: str) -> dict[str, Any]:
        time.sleep(RESOLVER_SECONDS)
        fields = [key, worker_field(key)] if _in_refresh_task() else [key]
        with self._lock:
            self.calls.update(fields)
        runtime = current_runtime(create=False)
        url = runtime.settings.redis_url if runtime is not None else None
        if url is not None:
            # Best effort: if Redis went away, the table falls back to the local counts.
            with contextlib.suppress(redis.RedisError):
                pipe = self._client(url).pipeline(transaction=False)
                for name in fields:
                    pipe.hincrby(counter_key(runtime.settings.namespace), name, 1)
                pipe.execute()
        return {"key": key, "pid": os.getpid(), "computed_at": time.time()}

    def _client(self, url: str) -> redis.Redis:
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = quiet_client(url, 1.0)
            return client

    def close(self) -> None:
        """Close the Redis clients."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def declare_caches(resolver: Callable[[str], Any], *, shared: bool) -> dict[str, Cache]:
    """The demo's two caches: "demo" (``stale_ttl`` 0) and "demo-swr" (``stale_ttl`` 30 s).

    ``shared``: L1 + L2 (Redis); else the memory tier alone.
    """
    tiers: list[MemoryTier | RedisTier]
    if shared:
        tiers = [MemoryTier(max_size=100), RedisTier(ttl=TTL)]
    else:
        tiers = [MemoryTier(max_size=100, ttl=TTL)]
    caches: dict[str, Cache] = {}
    try:
        caches["main"] = cache(CACHE_NAMES["main"], tiers=tiers, resolver=resolver)
        caches["swr"] = cache(
            CACHE_NAMES["swr"], tiers=tiers, stale_ttl=STALE_TTL, resolver=resolver
        )
    except BaseException:
        for each in caches.values():
            each.close()
        raise
    return caches


# ---------------------------------------------------------------------------- one process


class RecordingStats(Stats):
    """The library's stats, also keeping every latency sample so percentiles can be shown."""

    def __init__(self) -> None:
        super().__init__()
        self._samples: dict[str, list[float]] = {tier: [] for tier in TIERS}

    def observe(self, tier: str, seconds: float) -> None:
        super().observe(tier, seconds)
        with self._lock:
            self._samples[tier].append(seconds)

    def take_samples(self) -> dict[str, list[float]]:
        """The samples recorded since the last call (seconds, by tier)."""
        with self._lock:
            taken, self._samples = self._samples, {tier: [] for tier in TIERS}
        return taken


@contextlib.contextmanager
def _without_env_redis() -> Iterator[None]:
    # configure(redis_url=None) falls back to $OQRON_REDIS_URL; without Redis we mean none.
    saved = os.environ.pop("OQRON_REDIS_URL", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["OQRON_REDIS_URL"] = saved


class Participant:
    """One process's part: the demo's two caches, a counting resolver, bursts of requests."""

    def __init__(
        self, redis_url: str | None, namespace: str, threads: int, app: Any = None
    ) -> None:
        self.namespace = namespace
        self.threads = threads
        self.app = app
        self.resolver = CountingResolver()
        self.counter: redis.Redis | None = None
        self.caches: dict[str, Cache] = {}
        self.configured = redis_url is not None or app is not None
        try:
            if self.configured:
                env = _without_env_redis() if redis_url is None else contextlib.nullcontext()
                with env, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    configure(redis_url=redis_url, namespace=namespace, celery_app=app)
                for warning in caught:  # one line each, e.g. the broker eviction policy
                    print(f"warning: {warning.message}", file=sys.stderr)
            if redis_url is not None:
                self.counter = quiet_client(redis_url, 1.0)
            self.caches = declare_caches(self.resolver, shared=redis_url is not None)
        except BaseException:
            self.close()
            raise
        self.recorders: dict[str, RecordingStats] = {}
        for label, each in self.caches.items():
            # Before first use: the cache's engine binds to its stats object then.
            each.stats = self.recorders[label] = RecordingStats()

    def prime(self, write: bool) -> float:
        """Cache the keys of the expired and stale phases (``write``) and copy them into L1."""
        for phase in PHASES[1:]:
            target = self.caches[phase.cache]
            if write:
                target.set(phase.key, {"key": phase.key, "pid": os.getpid(), "primed": True})
            target.get(phase.key)
        return time.time()

    def run_phase(self, name: str, requests: int, start_at: float) -> dict[str, Any]:
        """Send ``requests`` concurrent ``get()`` calls at ``start_at``; report what happened.

        In the stale phase, also when this process first read a stale value and when it first
        read the refreshed one (waiting for it, up to :data:`VISIBLE_TIMEOUT`, after the burst).
        """
        phase = _BY_NAME[name]
        target = self.caches[phase.cache]
        recorder = self.recorders[phase.cache]
        stale_phase = phase.name == "stale"
        before = target.get_stats(local=True)
        calls_before = self.resolver.calls[phase.key]
        recorder.take_samples()  # drop samples of earlier work
        latencies: list[float] = []
        failures: list[int] = []
        stale_reads: list[float] = []  # wall clock of each thread's first stale read
        new_reads: list[float] = []  # ... and of its first read of the refreshed value
        go = threading.Event()

        def caller(count: int) -> None:
            go.wait()
            mine: list[float] = []
            failed = 0
            first_stale = first_new = None
            for _ in range(count):
                at = time.time()
                started = time.perf_counter()
                try:
                    value = target.get(phase.key)
                except Exception:
                    failed += 1
                    value = None
                mine.append(time.perf_counter() - started)
                if stale_phase and isinstance(value, dict):
                    if value.get("primed"):
                        first_stale = at if first_stale is None else first_stale
                    elif first_new is None:
                        first_new = time.time()
            latencies.extend(mine)  # one atomic extend per thread
            failures.append(failed)
            if first_stale is not None:
                stale_reads.append(first_stale)
            if first_new is not None:
                new_reads.append(first_new)

        callers = [
            threading.Thread(target=caller, args=(count,), name=f"demo-{index}", daemon=True)
            for index, count in enumerate(split(requests, self.threads))
            if count
        ]
        for thread in callers:
            thread.start()
        time.sleep(max(0.0, start_at - time.time()))
        go.set()
        for thread in callers:
            thread.join()
        burst_end = time.time()
        if stale_phase:  # this process's refresh request: handed to the worker (or run here)
            current_runtime().dispatcher.join(timeout=10.0)
        after = target.get_stats(local=True)
        delta = {
            counter: after[counter] - before[counter]
            for counter in (
                "stampede_prevented",
                "stale_served",
                "l2_errors",
                "resolver_errors",
                "resolver_calls",
                "refreshes_enqueued",
                "refreshes_deduplicated",
                "refreshes_succeeded",
                "enqueue_failures",
            )
        }
        report: dict[str, Any] = {
            "phase": name,
            "requests": requests,
            "errors": sum(failures),
            "calls": self.resolver.calls[phase.key] - calls_before,
            "stats": delta,
            "latency": latencies,
            "tiers": recorder.take_samples(),
            "burst_end": burst_end,
        }
        if stale_phase:
            report["first_stale"] = min(stale_reads, default=None)
            report["visible_at"] = min(new_reads, default=None) or self._wait_for_new(target, phase)
        return report

    @staticmethod
    def _wait_for_new(target: Cache, phase: Phase) -> float | None:
        """Read ``phase.key`` until the refreshed value shows; when it did (``None``: never)."""
        deadline = time.monotonic() + VISIBLE_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                value = target.get(phase.key)
                if isinstance(value, dict) and not value.get("primed"):
                    return time.time()
            time.sleep(0.001)
        return None

    def close(self) -> None:
        """Close the caches and stop the library's threads."""
        for each in self.caches.values():
            each.close()
        self.caches.clear()
        self.resolver.close()
        if self.counter is not None:
            self.counter.close()
        if self.configured:
            reset()


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over ``parts`` as evenly as possible."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def child_main() -> int:
    """A helper process: config on the first stdin line, then one command a line."""
    with _quiet_logging(sys.stderr):
        participant: Participant | None = None
        try:
            config = json.loads(sys.stdin.readline() or "{}")
            app = None
            if config.get("celery"):
                from .demo_celery import make_app

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


class _OncePerMessage(logging.Filter):
    """Let each distinct log message through once, without its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[object] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # The message template and its first argument: "L2 %s: ..." once per kind of failure.
        first = record.args[0] if isinstance(record.args, tuple) and record.args else None
        ident = (record.msg, str(first))
        if ident in self.seen:
            return False
        self.seen.add(ident)
        record.exc_info = None
        record.exc_text = None
        return True


@contextlib.contextmanager
def _quiet_logging(stream: IO[str]) -> Iterator[None]:
    """Show the library's warnings as single lines, each once, for the length of the demo."""
    logger = logging.getLogger("oqron_cache")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.addFilter(_OncePerMessage())
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


# ---------------------------------------------------------------------------- helper processes


class Helper:
    """A helper process (``python -m oqron_cache.demo --child``) and the line protocol to it."""

    def __init__(self, index: int, config: dict[str, Any]) -> None:
        self.index = index
        # Open for the process's lifetime; stop() closes it.
        self.stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8")  # noqa: SIM115
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)  # importable even when not installed
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


# ---------------------------------------------------------------------------- the demo


def redis_problem(url: str, timeout: float = 0.5) -> str | None:
    """``None`` if Redis at ``url`` answers PING within ``timeout``, else a short reason."""
    try:
        client = quiet_client(url, timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure at all means "not usable for the demo"
        text = " ".join(str(exc).split()) or "no answer"
        return f"{type(exc).__name__}: {text[:120]}"
    return None


class _Printer:
    """Lines to the demo's output from several threads (worker lines arrive live)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock, contextlib.suppress(ValueError):  # ValueError: the stream was closed
            print(text, file=self.out, flush=True)


@dataclass
class Plan:
    """How this run is wired: Redis or not, and where the Celery worker runs."""

    url: str | None  # None: memory tier alone
    namespace: str
    broker: str | None = None  # None: no Celery
    prefix: str | None = None  # the broker's key prefix (a worker we start)
    worker_mode: str = "none"  # "process", "embedded", "external" or "none"
    own_namespace: bool = True  # demo-<pid>: all of it is deleted at the end
    notices: list[str] = field(default_factory=list)


def plan_run(options: DemoOptions) -> tuple[Plan, DemoOptions]:
    """Decide (and explain in notices) how the demo runs with what this machine has."""
    from .demo_celery import celery_missing

    problem = redis_problem(options.redis_url)
    no_celery = celery_missing()
    if problem is not None:
        namespace = options.namespace or f"demo-{os.getpid()}"
        plan = Plan(None, namespace)
        how = "one process"
        if no_celery is None:
            plan.broker, plan.worker_mode = "memory://", "embedded"
            how += ", with a Celery worker thread on an in-memory broker"
        else:
            how += f"; {no_celery}"
        plan.notices.append(
            f"notice: Redis at {mask_url(options.redis_url)} is not available ({problem}); "
            f"running on the memory tier (L1) alone, in {how}."
        )  # one line on purpose: easy to spot and to grep
        return plan, replace(options, processes=1)
    if options.external_worker:
        namespace = options.namespace or os.environ.get("OQRON_NAMESPACE") or "oqron"
        plan = Plan(options.redis_url, namespace, own_namespace=False)
        plan.broker = os.environ.get("OQRON_BROKER_URL") or options.redis_url
        plan.worker_mode = "external" if no_celery is None else "none"
    else:
        namespace = options.namespace or f"demo-{os.getpid()}"
        plan = Plan(options.redis_url, namespace)
        if no_celery is None:
            plan.broker, plan.worker_mode = options.redis_url, "process"
            plan.prefix = f"oqron:{namespace}:broker:"
    if no_celery is not None:
        plan.notices.append(
            f"notice: {no_celery}; stale values are refreshed by each process's background "
            "thread instead of a worker."
        )
    return plan, options


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo and print its progress and table to ``out`` (stdout). Returns the exit code."""
    stream = out if out is not None else sys.stdout
    say = _Printer(stream)
    plan, options = plan_run(options)
    for notice in plan.notices:
        say(notice)
    removed: int | None = None
    with _quiet_logging(sys.stderr):
        try:
            results, worker = _run(options, plan, say)
        except (DemoError, OqronCacheError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if plan.url is not None:
                removed = _delete_keys(plan.url, _demo_patterns(plan))
    if removed is not None:
        say(f"removed the demo's {removed} keys from Redis (namespace {plan.namespace})")
    say("")
    say(format_table(results, shared=plan.url is not None, worker=worker))
    return 0


def _demo_patterns(plan: Plan) -> list[str]:
    """What to delete at the end: the whole namespace if it is the demo's own, else its keys."""
    ns = plan.namespace
    if plan.own_namespace and plan.namespace.startswith("demo-"):
        return [f"oqron:{ns}:*"]  # demo-<pid>: the entries, counters, stats, broker queues
    patterns = [counter_key(ns)]
    for name in CACHE_NAMES.values():
        patterns += [f"oqron:{ns}:{{{name}:*", f"oqron:{ns}:{{{name}}}:*", stats_key(ns, name)]
    return patterns


def _start_worker(plan: Plan, participant: Participant | None, say: _Printer) -> Any:
    """Start (or find) the worker of ``plan``; returns an object with wait_ready() and stop()."""
    from . import demo_celery

    broker = mask_url(plan.broker or "")
    if plan.worker_mode == "process":
        try:
            worker = demo_celery.WorkerProcess(
                plan.url or "", plan.broker or "", plan.namespace, plan.prefix or "", say
            )
        except (demo_celery.WorkerUnavailable, OSError) as exc:
            say(f"notice: cannot start a worker process ({exc}); using a worker thread instead")
            plan.worker_mode = "embedded"
            return None  # started once the participant has wired the app
        say(f"  worker: started `{worker.command}` (pid {worker.pid})")
        say(f"  worker: broker {broker}, its keys under {plan.prefix}")
        return worker
    if participant is None:  # the others need the app the participant wired
        return None
    if plan.worker_mode == "embedded":
        say(f"  worker: a Celery worker thread in this process (pool solo), broker {broker}")
        return demo_celery.EmbeddedWorker(participant.app, say)
    if plan.worker_mode == "external":
        say(f"  worker: waiting for a running worker on {broker} ...")
        return demo_celery.ExternalWorker(participant.app, plan.broker or "")
    return None


def _run(options: DemoOptions, plan: Plan, say: _Printer) -> tuple[list[Totals], dict[str, Any]]:
    from .demo_celery import WorkerUnavailable, make_app

    url = plan.url
    where = (
        f"L1 memory in each process + L2 Redis at {mask_url(url)} (namespace {plan.namespace})"
        if url
        else "L1 memory only, no L2"
    )
    shares = split(options.requests, options.processes)
    callers = sum(min(share, options.threads) for share in shares)
    processes = f"{options.processes} process" + ("es" if options.processes > 1 else "")
    header = (
        f"oqron-cache {__version__} demo: {where}. "
        f"Each phase: {options.requests} requests on one key from {callers} callers "
        f"({processes} x {options.threads} threads) started at the same "
        "instant, each sending its share one after the other. The resolver sleeps "
        f"{RESOLVER_SECONDS * 1000:.0f} ms"
        + (" and counts its calls in Redis." if url else ".")
        + (" Stale values are refreshed by a Celery worker." if plan.broker and url else "")
    )
    say(textwrap.fill(header, WIDTH))
    celery = {"broker": plan.broker, "prefix": plan.prefix} if plan.broker and url else None
    config = {"redis_url": url, "namespace": plan.namespace, "threads": options.threads}
    helpers: list[Helper] = []
    participant: Participant | None = None
    worker: Any = None
    info: dict[str, Any] = {"mode": plan.worker_mode, "node": "", "pid": None, "outcomes": {}}
    try:
        if plan.worker_mode == "process":  # first: it starts while the others do
            worker = _start_worker(plan, None, say)
        helpers = [
            Helper(index, {**config, "celery": celery}) for index in range(1, options.processes)
        ]
        app = make_app(plan.broker, plan.prefix) if plan.broker else None
        participant = Participant(url, plan.namespace, options.threads, app)
        if worker is None and plan.worker_mode in ("embedded", "external"):
            worker = _start_worker(plan, participant, say)
        for helper in helpers:
            helper.reply(READY_TIMEOUT)
        # The expired and stale phases' keys: cached now, expired or stale when their turn comes.
        primed = [participant.prime(write=True)]
        for helper in helpers:
            helper.send({"cmd": "prime", "write": url is None})
        primed += [helper.reply(REPLY_TIMEOUT)["primed_at"] for helper in helpers]
        due = {"cold": 0.0, "expired": max(primed) + TTL + 0.05, "stale": max(primed) + TTL}
        results = []
        for phase in PHASES:
            if phase.name == "stale" and worker is not None:
                worker = _worker_ready(worker, plan, participant, say)
                info.update(node=worker.node, pid=getattr(worker, "pid", None))
            results.append(_phase(phase, due[phase.name], shares, participant, helpers, say))
        if worker is not None:
            # The worker logs a refresh's outcome after its fill, which the readers saw already.
            worker.wait_outcomes(results[-1].in_worker, timeout=2.0)
            info["outcomes"] = dict(worker.outcomes)
        info["mode"] = plan.worker_mode
        return results, info
    except WorkerUnavailable as exc:
        raise DemoError(str(exc)) from None
    finally:
        if worker is not None:
            worker.stop()
        said: dict[str, list[str]] = {}  # a warning -> the helpers that gave it
        for helper in helpers:
            for line in helper.stop():
                if line.startswith("warning: "):
                    said.setdefault(line, []).append(str(helper.index))
        for line, who in said.items():
            print(f"[helper {','.join(who)}] {line}", file=sys.stderr)
        if participant is not None:
            participant.close()


def _worker_ready(worker: Any, plan: Plan, participant: Participant, say: _Printer) -> Any:
    """Wait for ``worker``; a worker process that failed is replaced by a worker thread."""
    from .demo_celery import WorkerUnavailable

    timeout = EXTERNAL_TIMEOUT if plan.worker_mode == "external" else WORKER_TIMEOUT
    try:
        took = worker.wait_ready(timeout)
    except WorkerUnavailable as exc:
        if plan.worker_mode != "process":
            raise
        worker.stop()
        say(f"notice: {exc}; using a Celery worker thread in this process instead")
        plan.worker_mode = "embedded"
        worker = _start_worker(plan, participant, say)
        took = worker.wait_ready(WORKER_TIMEOUT)
    how = "answered after" if plan.worker_mode == "external" else "ready, started in"
    say(f"  worker: {worker.node} {how} {took:.1f} s")
    return worker


def _phase(
    phase: Phase,
    due: float,
    shares: list[int],
    participant: Participant,
    helpers: list[Helper],
    say: _Printer,
) -> Totals:
    counted_before = _redis_counts(participant, phase.key)
    start_at = max(time.time() + START_LEAD, due)
    for helper, share in zip(helpers, shares[1:], strict=True):
        helper.send({"cmd": "phase", "phase": phase.name, "requests": share, "start_at": start_at})
    totals = Totals(phase.label, stale=phase.name == "stale")
    totals.add(participant.run_phase(phase.name, shares[0], start_at))
    for helper in helpers:
        totals.add(helper.reply(REPLY_TIMEOUT))
    if phase.name == "stale":
        totals.in_worker = participant.resolver.calls[worker_field(phase.key)]
        # The refresh may finish after the callers reported: its call counts all the same.
        totals.calls = max(totals.calls, totals.in_worker)
    counted_after = _redis_counts(participant, phase.key)
    if counted_before is not None and counted_after is not None:
        # The counts Redis saw, across processes and the worker, unless Redis lost increments
        # (it went away): then the processes' own counts, summed.
        totals.calls = max(totals.calls, counted_after[0] - counted_before[0])
        totals.in_worker = max(totals.in_worker, counted_after[1] - counted_before[1])
    took = totals.burst_end - start_at
    line = f"  {phase.label}: {totals.requests} requests done in {took:.2f} s"
    if totals.stale:
        line += f", {totals.stats['stale_served']} of them served a stale value at once"
    say(line)
    if totals.stale and not totals.first_stale:
        say(f"  {phase.label}: no stale value was served (the entry was gone): nothing to refresh")
    elif totals.stale:
        first, every = totals.visible_ms()
        if first is None:
            say(f"  {phase.label}: the refreshed value was not read within {VISIBLE_TIMEOUT:.0f} s")
        else:
            say(
                f"  {phase.label}: the refreshed value was read {first:.0f} ms after the first "
                "stale read" + (f" (in every process: {every:.0f} ms)" if every is not None else "")
            )
    return totals


def _redis_counts(participant: Participant, key: str) -> tuple[int, int] | None:
    """(resolver calls for ``key``, of which in a worker), as counted in Redis."""
    if participant.counter is None:
        return None
    try:
        raw = participant.counter.hmget(
            counter_key(participant.namespace), [key, worker_field(key)]
        )
    except redis.RedisError:
        return None
    calls, in_worker = (int(value or 0) for value in cast("list[bytes | None]", raw))
    return calls, in_worker


def _delete_keys(url: str, patterns: list[str]) -> int | None:
    """Delete the keys matching ``patterns`` with SCAN + UNLINK; never FLUSHALL.

    Returns how many were deleted, or ``None`` (after a warning) if Redis would not let us.
    """
    removed = 0
    try:
        client = quiet_client(url, 2.0)
        try:
            for pattern in patterns:
                batch: list[bytes] = []
                for key in client.scan_iter(match=pattern, count=500):
                    batch.append(key)
                    if len(batch) >= 500:
                        removed += int(client.unlink(*batch))  # type: ignore[arg-type]
                        batch.clear()
                if batch:
                    removed += int(client.unlink(*batch))  # type: ignore[arg-type]
        finally:
            client.close()
    except redis.RedisError as exc:
        print(
            f"warning: could not delete the demo's keys ({patterns[0]}): {type(exc).__name__}",
            file=sys.stderr,
        )
        return None
    return removed


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        raise SystemExit(child_main())
    from .cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
