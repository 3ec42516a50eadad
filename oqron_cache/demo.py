"""``oqron-cache demo``: many concurrent requests on one key, and the resolver runs once.

Three phases, each a burst of concurrent ``get()`` calls on one key from several threads in this
process and in helper processes (``python -m oqron_cache.demo --child``, driven over their
stdin/stdout with one JSON message a line):

1. a cold key (never cached): one caller runs the resolver, the callers in flight wait for it,
   later ones find it cached;
2. an expired key (cached, then past ``ttl + stale_ttl``): never served, loaded again once;
3. a stale key (past ``ttl``, within ``stale_ttl``): every caller gets the stale value at once
   and one background refresh runs.

The resolver sleeps 50 ms and counts its calls with ``INCR`` in Redis, so the count covers every
process. If Redis does not answer, the demo says so in one line and runs on the memory tier alone:
each process then has its own L1 and computes each value once, which the table says. The demo's
keys live in the namespace ``demo-<pid>`` and are deleted at the end (SCAN + UNLINK).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import __version__
from .config import configure, current_runtime, mask_url, reset
from .errors import OqronCacheError
from .frontend import Cache, cache
from .metrics import Stats
from .options import MemoryTier, RedisTier

TTL = 1.0  # freshness of the demo's values, seconds
STALE_TTL = 30.0  # stale window of the stale-key phase's cache
RESOLVER_SECONDS = 0.05  # the "slow database query"
START_LEAD = 0.3  # time between announcing a phase and releasing its requests
READY_TIMEOUT = 30.0  # a helper process must start within this
REPLY_TIMEOUT = 60.0  # ... and finish a phase within this
TIERS = ("memory", "redis", "resolver")
WIDTH = 92  # of the text around the table


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


class DemoError(Exception):
    """The demo itself could not go on (a helper process failed); shown as one line."""


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


def quiet_client(url: str, timeout: float) -> redis.Redis:
    """A client for the demo's own calls: short timeouts, no retries."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
    )


def counter_key(namespace: str, key: str) -> str:
    """The Redis counter of the resolver's calls for ``key`` (inside the demo's namespace)."""
    return f"oqron:{namespace}:demo-calls:{key}"


class Participant:
    """One process's part: the demo's two caches, a counting resolver, bursts of requests."""

    def __init__(self, redis_url: str | None, namespace: str, threads: int) -> None:
        self.namespace = namespace
        self.threads = threads
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.counter: redis.Redis | None = None
        tiers: list[MemoryTier | RedisTier]
        if redis_url is not None:
            configure(redis_url=redis_url, namespace=namespace)
            self.counter = quiet_client(redis_url, 1.0)
            tiers = [MemoryTier(max_size=100), RedisTier(ttl=TTL)]
        else:
            tiers = [MemoryTier(max_size=100, ttl=TTL)]
        self.caches: dict[str, Cache] = {}
        try:
            self.caches["main"] = cache("demo", tiers=tiers, resolver=self.resolve)
            self.caches["swr"] = cache(
                "demo-swr", tiers=tiers, stale_ttl=STALE_TTL, resolver=self.resolve
            )
        except BaseException:
            self.close()
            raise
        self.recorders: dict[str, RecordingStats] = {}
        for label, each in self.caches.items():
            # Before first use: the cache's engine binds to its stats object then.
            each.stats = self.recorders[label] = RecordingStats()

    def resolve(self, key: str) -> dict[str, Any]:
        """The demo's resolver: a 50 ms "query", counted here and in Redis."""
        time.sleep(RESOLVER_SECONDS)
        with self._lock:
            self.calls[key] += 1
        if self.counter is not None:
            # Best effort: if Redis went away, the table falls back to the local counts.
            with contextlib.suppress(redis.RedisError):
                self.counter.incr(counter_key(self.namespace, key))
        return {"key": key, "pid": os.getpid(), "computed_at": time.time()}

    def prime(self, write: bool) -> float:
        """Cache the keys of the expired and stale phases (``write``) and copy them into L1."""
        for phase in PHASES[1:]:
            target = self.caches[phase.cache]
            if write:
                target.set(phase.key, {"key": phase.key, "pid": os.getpid(), "primed": True})
            target.get(phase.key)
        return time.time()

    def run_phase(self, name: str, requests: int, start_at: float) -> dict[str, Any]:
        """Send ``requests`` concurrent ``get()`` calls at ``start_at``; report what happened."""
        phase = _BY_NAME[name]
        target = self.caches[phase.cache]
        recorder = self.recorders[phase.cache]
        before = target.get_stats()
        calls_before = self.calls[phase.key]
        recorder.take_samples()  # drop samples of earlier work
        latencies: list[float] = []
        failures: list[int] = []
        go = threading.Event()

        def caller(count: int) -> None:
            go.wait()
            mine: list[float] = []
            failed = 0
            for _ in range(count):
                started = time.perf_counter()
                try:
                    target.get(phase.key)
                except Exception:
                    failed += 1
                mine.append(time.perf_counter() - started)
            latencies.extend(mine)  # one atomic extend per thread
            failures.append(failed)

        workers = [
            threading.Thread(target=caller, args=(count,), name=f"demo-{index}", daemon=True)
            for index, count in enumerate(split(requests, self.threads))
            if count
        ]
        for worker in workers:
            worker.start()
        time.sleep(max(0.0, start_at - time.time()))
        go.set()
        for worker in workers:
            worker.join()
        if phase.name == "stale":  # let this process's background refresh finish
            current_runtime().dispatcher.join(timeout=10.0)
        after = target.get_stats()
        delta = {
            counter: after[counter] - before[counter]
            for counter in (
                "stampede_prevented",
                "stale_served",
                "l2_errors",
                "resolver_errors",
                "resolver_calls",
                "refreshes_succeeded",
            )
        }
        return {
            "phase": name,
            "requests": requests,
            "errors": sum(failures),
            "calls": self.calls[phase.key] - calls_before,
            "stats": delta,
            "latency": latencies,
            "tiers": recorder.take_samples(),
        }

    def close(self) -> None:
        """Close the caches and stop the library's threads."""
        for each in self.caches.values():
            each.close()
        self.caches.clear()
        if self.counter is not None:
            self.counter.close()
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
            participant = Participant(config["redis_url"], config["namespace"], config["threads"])
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
        for line in cast(IO[str], self.proc.stdout):
            with contextlib.suppress(ValueError):  # not a message of ours: ignore it
                message = json.loads(line)
                if isinstance(message, dict):
                    self.replies.put(message)
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


@dataclass
class Totals:
    """One phase summed over every process."""

    phase: Phase
    requests: int = 0
    calls: int = 0
    errors: int = 0
    stats: Counter[str] = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)
    tiers: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TIERS})

    def add(self, report: dict[str, Any]) -> None:
        """Add one process's report of this phase."""
        self.requests += report["requests"]
        self.calls += report["calls"]
        self.errors += report["errors"]
        self.stats.update(report["stats"])
        self.latency.extend(report["latency"])
        for tier in TIERS:
            self.tiers[tier].extend(report["tiers"][tier])


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo and print its table to ``out`` (stdout). Returns the exit code."""
    stream = out if out is not None else sys.stdout
    namespace = f"demo-{os.getpid()}"
    problem = redis_problem(options.redis_url)
    url = options.redis_url if problem is None else None
    if problem is not None:
        print(
            f"notice: Redis at {mask_url(options.redis_url)} is not available ({problem}); "
            "running on the memory tier (L1) alone.",
            file=stream,
            flush=True,
        )  # one line on purpose: easy to spot and to grep
    with _quiet_logging(sys.stderr):
        try:
            results = _run(options, url, namespace, stream)
        except (DemoError, OqronCacheError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            removed = _delete_namespace(url, namespace) if url is not None else None
    if removed is not None:
        print(f"removed the demo's {removed} keys from Redis (namespace {namespace})", file=stream)
    print(file=stream)
    print(format_table(results, options, shared=url is not None), file=stream, flush=True)
    return 0


def _run(options: DemoOptions, url: str | None, namespace: str, out: IO[str]) -> list[Totals]:
    where = f"+ L2 Redis at {mask_url(url)} (namespace {namespace})" if url else "only, no L2"
    shares = split(options.requests, options.processes)
    callers = sum(min(share, options.threads) for share in shares)
    header = (
        f"oqron-cache {__version__} demo: L1 memory in each process {where}. "
        f"Each phase: {options.requests} requests on one key from {callers} callers "
        f"({options.processes} processes x {options.threads} threads) started at the same "
        "instant, each sending its share one after the other. The resolver sleeps "
        f"{RESOLVER_SECONDS * 1000:.0f} ms"
        + (" and counts its calls in Redis (INCR)." if url else ".")
    )
    print(textwrap.fill(header, WIDTH), file=out, flush=True)
    config = {"redis_url": url, "namespace": namespace, "threads": options.threads}
    helpers: list[Helper] = []
    participant: Participant | None = None
    try:
        helpers = [Helper(index, config) for index in range(1, options.processes)]
        participant = Participant(url, namespace, options.threads)
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
            results.append(_phase(phase, due[phase.name], shares, participant, helpers, out))
        return results
    finally:
        said: dict[str, list[str]] = {}  # a warning -> the helpers that gave it
        for helper in helpers:
            for line in helper.stop():
                if line.startswith("warning: "):
                    said.setdefault(line, []).append(str(helper.index))
        for line, who in said.items():
            print(f"[helper {','.join(who)}] {line}", file=sys.stderr)
        if participant is not None:
            participant.close()


def _phase(
    phase: Phase,
    due: float,
    shares: list[int],
    participant: Participant,
    helpers: list[Helper],
    out: IO[str],
) -> Totals:
    counted_before = _redis_count(participant, phase.key)
    start_at = max(time.time() + START_LEAD, due)
    for helper, share in zip(helpers, shares[1:], strict=True):
        helper.send({"cmd": "phase", "phase": phase.name, "requests": share, "start_at": start_at})
    totals = Totals(phase)
    totals.add(participant.run_phase(phase.name, shares[0], start_at))
    for helper in helpers:
        totals.add(helper.reply(REPLY_TIMEOUT))
    counted_after = _redis_count(participant, phase.key)
    if counted_before is not None and counted_after is not None:
        # The count Redis saw, across processes, unless Redis lost increments (it went away):
        # then the processes' own counts, summed.
        totals.calls = max(totals.calls, counted_after - counted_before)
    took = time.time() - start_at
    print(f"  {phase.label}: {totals.requests} requests done in {took:.2f} s", file=out, flush=True)
    return totals


def _redis_count(participant: Participant, key: str) -> int | None:
    if participant.counter is None:
        return None
    try:
        raw = participant.counter.get(counter_key(participant.namespace, key))
    except redis.RedisError:
        return None
    return int(raw or 0)  # type: ignore[arg-type]


def _delete_namespace(url: str, namespace: str) -> int | None:
    """Delete the demo's keys (``oqron:<namespace>:*``) with SCAN + UNLINK; never FLUSHALL.

    Returns how many were deleted, or ``None`` (after a warning) if Redis would not let us.
    """
    removed = 0
    try:
        client = quiet_client(url, 2.0)
        try:
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"oqron:{namespace}:*", count=500):
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
            f"warning: could not delete the demo's keys (oqron:{namespace}:*): "
            f"{type(exc).__name__}",
            file=sys.stderr,
        )
        return None
    return removed


# ---------------------------------------------------------------------------- the table


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``samples`` (not empty)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _ms(samples: list[float]) -> str:
    if not samples:
        return "-"
    cells = []
    for fraction in (0.5, 0.99):
        value = percentile(samples, fraction) * 1000
        cells.append(f"{value:.3f}" if value < 1 else f"{value:.1f}")
    return " / ".join(cells)


def format_table(results: list[Totals], options: DemoOptions, *, shared: bool) -> str:
    """The plain-text table the demo ends with, and the notes that read it."""
    rows: list[tuple[str, list[str]]] = [
        ("phase", [t.phase.label for t in results]),
        ("requests", [str(t.requests) for t in results]),
        ("resolver calls", [str(t.calls) for t in results]),
        ("stampedes prevented", [str(t.stats["stampede_prevented"]) for t in results]),
        ("stale served", [str(t.stats["stale_served"]) for t in results]),
        ("fresh from cache", [str(_fresh_from_cache(t)) for t in results]),
        ("errors", [str(t.errors) for t in results]),
        ("latency ms, p50 / p99", [""] * len(results)),
        ("  caller (one get())", [_ms(t.latency) for t in results]),
        ("  memory tier (L1)", [_ms(t.tiers["memory"]) for t in results]),
        ("  redis tier (L2)", [_ms(t.tiers["redis"]) for t in results]),
        ("  resolver", [_ms(t.tiers["resolver"]) for t in results]),
    ]
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(results))]
    lines = []
    for label, cells in rows:
        line = label.ljust(label_width) + "".join(
            "   " + cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
        )
        lines.append(line.rstrip())
        if label == "phase":
            lines.append("-" * len(line))
    notes = [
        textwrap.fill(note, WIDTH, subsequent_indent=" " * 13)
        for note in _notes(results, options, shared=shared)
    ]
    return "\n".join([*lines, "", *notes])


def _fresh_from_cache(totals: Totals) -> int:
    # Requests that neither ran the resolver, nor waited for another's load, nor got a stale
    # value: they came after the value was back in L1 or L2.
    inline = totals.stats["resolver_calls"] - totals.stats["refreshes_succeeded"]
    rest = totals.requests - totals.errors - inline - totals.stats["stampede_prevented"]
    return max(0, rest - totals.stats["stale_served"])


def _notes(results: list[Totals], options: DemoOptions, *, shared: bool) -> list[str]:
    refreshes = results[-1].stats["refreshes_succeeded"]
    notes = [
        "cold key     never cached: one caller ran the resolver; callers that arrived while it "
        "ran waited for its value (stampedes prevented), later ones found it cached.",
        f"expired key  cached, then past ttl + stale_ttl ({TTL:.0f} s + 0 s): never served, "
        "loaded once more.",
        f"stale key    past ttl ({TTL:.0f} s), within stale_ttl ({STALE_TTL:.0f} s): every "
        f"caller got the stale value at once; the resolver call is the background refresh "
        f"({refreshes} succeeded).",
        "latency      caller: one get() as its caller timed it (threads share the CPUs); tiers: "
        "the library's own timings (1 fresh L1 hit in 16 is timed; stale hits are not).",
    ]
    if not shared:
        notes.append(
            f"memory only  without Redis each of the {options.processes} processes has its own "
            "L1 and no shared lock, so each process computes a value once (resolver calls = "
            "processes); the threads of one process still share one call."
        )
    l2_errors = sum(t.stats["l2_errors"] for t in results)
    if l2_errors:
        notes.append(
            f"L2 errors    {l2_errors} Redis calls failed (Redis went away during the run). No "
            "request failed, but without the shared tier (and with L1 flushed when the bus "
            "was lost) each process loaded the values by itself."
        )
    return notes


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        raise SystemExit(child_main())
    from .cli import main

    raise SystemExit(main(["demo", *sys.argv[1:]]))
