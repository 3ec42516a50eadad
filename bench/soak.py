"""The chaos soak (issue 10): web processes, Celery workers, faults on a schedule, one table.

    python -m bench.soak --seconds 60 --seed 1 [--json summary.json] [--out DIR] [--kinds a,b]

Everything runs on private servers started here (``tests/redis_server.py``): the cache's Redis
(behind :class:`bench.proxy.Proxy`, so the network can fail too), the broker's Redis, and the
origin's Redis (never faulted). ``--web`` spawned web processes (:mod:`tests.procs.soak_web`)
run ``--threads`` threads each of a Zipf mix of gets, sets, deletes and invalidations on two
caches, one of them write-through through a Celery chain; ``--workers`` ``celery -A workers
worker`` subprocesses refresh stale values and run the chains. Faults are injected on a seeded
schedule (:mod:`bench.soak_faults`); every operation, resolver run, task message and fault is
recorded and the history is checked afterwards (:mod:`bench.history_check`).

The table counts per fault kind the faults injected and survived (every web process served
again after it, and no violation was seen from its start until the next fault), then the run's
figures. The columns that must be zero are in ``summary["zero"]``; the exit status is 1 if one
is not. The run's directory (history, worker logs) is kept when something was found.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from tests.procs.soak_caches import Params
from tests.procs.soak_web import Plan
from tests.procs.soak_web import run as run_web
from tests.redis_server import RedisServer

from .history import Recorder, load
from .history_check import Bounds, Report, check
from .proxy import Proxy
from .soak_faults import KINDS, Fault, Injector, Workers, schedule
from .soak_report import Outcome, RssMonitor, drain, summarize, table

NAMESPACE = "soak"
VISIBILITY = 6.0  # broker visibility timeout: a killed worker's task comes back after this long


@dataclass(frozen=True)
class Config:
    """One soak run."""

    seconds: float = 60.0
    seed: int = 1
    web: int = 4
    threads: int = 4
    workers: int = 2
    concurrency: int = 2
    keys: int = 16
    ttl: float = 4.0  # long enough that a dropped write stays visible past the recovery allowance
    stale_ttl: float = 4.0
    lock_ttl: float = 2.0
    op_timeout: float = 0.25
    resolver_sleep: float = 0.02
    error_rate: float = 0.01
    think: float = 0.02
    startup: float = 8.0
    settle: float = 1.5
    kinds: tuple[str, ...] = KINDS
    faults: tuple[Fault, ...] = field(default=(), compare=False)

    def bounds(self) -> Bounds:
        return Bounds(
            ttl=self.ttl,
            stale_ttl=self.stale_ttl,
            op_timeout=self.op_timeout,
            stall_slack=0.75,  # two shared cores: GIL and scheduler delays on top of timeouts
            allowed={
                "get": frozenset({"InjectedResolverError"}),
                # set() on a write-through cache tells the truth when its chain could not be
                # sent or did not finish in time: the write was not acknowledged.
                "set:soak_wt": frozenset({"WriteThroughError"}),
            },
        )


def _drive(
    faults: Sequence[Fault],
    injector: Injector,
    start_at: float,
    end_at: float,
    progress: Any,
    recorder: Recorder,
) -> list[Outcome]:
    """Inject the faults on time; note after each whether every web process served again."""
    outcomes: list[Outcome] = []
    for fault in faults:
        time.sleep(max(0.0, start_at + fault.at - time.time()))
        if outcomes:
            _settle(outcomes[-1], progress, injector)
        t0, m0 = time.time(), time.monotonic()
        error = ""
        details: dict[str, Any] = {}
        try:
            details = injector.inject(fault)
        except Exception as exc:  # an injection that failed is reported, the soak goes on
            error = f"{type(exc).__name__}: {exc}"[:300]
        t1, m1 = time.time(), time.monotonic()
        recorder.write(
            {
                "op": "fault",
                "k": fault.kind,
                "t0": t0,
                "t1": t1,
                "m0": m0,
                "m1": m1,
                "out": "ok" if not error else "InjectionFailed",
                "x": {**details, "planned": fault.duration, "error": error},
            }
        )
        outcomes.append(Outcome(fault, t0, t1, error, list(progress)))
    if outcomes:
        time.sleep(max(0.0, min(outcomes[-1].t1 + 5.0, end_at) - time.time()))
        _settle(outcomes[-1], progress, injector)
    return outcomes


def _settle(outcome: Outcome, progress: Any, injector: Injector) -> None:
    """After a fault: did every web process serve again, did a worker die (then replace it)?"""
    outcome.workers_died = injector.workers.revive()
    served = all(now > before for now, before in zip(progress, outcome.progress, strict=True))
    outcome.resumed = served and not outcome.workers_died


def run(config: Config, out_dir: Path) -> tuple[dict[str, Any], Report]:
    """Run the soak with its directory ``out_dir``; return the summary and the checker's report."""
    faults = list(config.faults) or schedule(config.seed, config.seconds, kinds=config.kinds)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in asdict(config).items() if k != "faults"}
    (out_dir / "config.json").write_text(json.dumps(saved, indent=2))
    history = out_dir / "history"
    recorder = Recorder(history)
    with contextlib.ExitStack() as stack:
        cache = stack.enter_context(RedisServer())
        broker = stack.enter_context(RedisServer())
        origin = stack.enter_context(RedisServer())
        params = Params(
            origin_url=origin.url,
            origin_ns=NAMESPACE,
            history_dir=str(history),
            ttl=config.ttl,
            stale_ttl=config.stale_ttl,
            lock_ttl=config.lock_ttl,
            resolver_sleep=config.resolver_sleep,
            error_rate=config.error_rate,
            seed=config.seed,
        )
        proxy = Proxy(cache.port).start()
        stack.callback(proxy.close)
        os.environ.update(params.env())
        os.environ["OQRON_VISIBILITY_TIMEOUT"] = str(VISIBILITY)
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        workers = Workers(
            out_dir / "logs",
            broker.url,
            cache.url,
            NAMESPACE,
            "tests.procs.soak_caches",
            concurrency=config.concurrency,
        )
        stack.callback(workers.stop)
        workers.start(config.workers)
        ctx = mp.get_context("spawn")
        progress = ctx.Array("l", config.web, lock=False)
        start_at = time.time() + config.startup
        end_at = start_at + config.seconds
        procs = []
        for index in range(config.web):
            plan = Plan(
                index=index,
                redis_url=proxy.url,
                namespace=NAMESPACE,
                params=params,
                seed=config.seed * 1000 + index,
                start_at=start_at,
                end_at=end_at,
                threads=config.threads,
                keys=config.keys,
                think=config.think,
                broker_url=broker.url,
                op_timeout=config.op_timeout,
                settle=config.settle,
                progress=progress,
                log_path=str(out_dir / "logs" / f"web-{index}.log"),
            )
            proc = ctx.Process(target=run_web, args=(plan,), name=f"soak-web-{index}")
            proc.start()
            procs.append(proc)
        stack.callback(_kill_all, procs)
        monitor = RssMonitor([p.pid for p in procs if p.pid], workers)
        monitor.start()
        stack.callback(monitor.stop)
        injector = Injector(cache, broker, proxy, workers, random.Random(config.seed))
        outcomes = _drive(faults, injector, start_at, end_at, progress, recorder)
        for proc in procs:
            proc.join(max(1.0, end_at + config.settle + 60 - time.time()))
        exit_codes = [proc.exitcode for proc in procs]
        drained = drain(broker, timeout=VISIBILITY + 4.0)
        monitor.stop()
        report = check(load(history), config.bounds())
        summary = summarize(config, outcomes, report, monitor, workers, exit_codes, drained)
    return summary, report


def recheck(run_dir: Path, summary_path: Path | None = None) -> tuple[dict[str, Any], Report]:
    """Check a kept run's history again (with this checker) and rebuild its summary."""
    saved = json.loads((summary_path or run_dir / "summary.json").read_text())
    config = Config(**{**saved["config"], "kinds": tuple(saved["config"]["kinds"])})
    report = check(load(run_dir / "history"), config.bounds())
    outcomes = [
        Outcome(
            Fault(f["at"], f["kind"], f["duration"], f["level"]),
            f["window"][0],
            f["window"][1],
            f["error"],
            [],
            f["resumed"],
            f.get("workers_died", 0),
        )
        for f in saved["faults"]
    ]
    monitor = SimpleNamespace(peak_kb={k: v * 1024 for k, v in saved["peak_rss_mb"].items()})
    workers = SimpleNamespace(**{"failures": [], "died": 0, **saved["workers"]})
    summary = summarize(
        config,
        outcomes,
        report,
        cast(RssMonitor, monitor),
        cast(Workers, workers),
        saved["web_exit_codes"],
        saved["drained"],
    )
    return summary, report


def _kill_all(procs: Sequence[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def parse_faults(text: str) -> list[Fault]:
    """``"redis_pause@5:1.5,bus_kill@9"`` -> the faults (kind, at, duration, level)."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, when = item.partition("@")
        numbers = [float(x) for x in when.split(":") if x] if when else []
        if kind not in KINDS or not 1 <= len(numbers) <= 3:
            raise ValueError(f"bad fault {item!r}: kind@at[:duration[:level]], kinds {KINDS}")
        at, duration, level = [*numbers, 0.0, 0.0][:3]
        faults.append(Fault(at, kind, duration, level or (0.05 if kind == "net_slow" else 1.0)))
    return sorted(faults, key=lambda f: f.at)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: run, print the table (and the violations), write ``--json``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--web", type=int, default=4, help="web processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per web process")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers")
    parser.add_argument("--kinds", default=",".join(KINDS), help="fault kinds, comma-separated")
    parser.add_argument(
        "--faults",
        default="",
        help="an explicit schedule instead of the seeded one: kind@at[:duration[:level]],...",
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--out", type=Path, help="the run's directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument(
        "--check",
        type=Path,
        help="check a kept run DIR again (its summary.json, or --json, holds the faults' outcomes)",
    )
    args = parser.parse_args(argv)
    if args.check:
        summary, report = recheck(args.check, args.json)
        print(table(summary))
        print(report.render(limit=20))
        return 1 if any(summary["zero"].values()) else 0
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        parser.error(str(exc))
    config = Config(
        seconds=args.seconds,
        seed=args.seed,
        web=args.web,
        threads=args.threads,
        workers=args.workers,
        kinds=tuple(sorted({f.kind for f in faults})) if faults else kinds,
        faults=tuple(faults),
    )
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="oqron-soak-"))
    summary, report = run(config, out_dir)
    print(table(summary))
    if report.violations:
        print(report.render(limit=8))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    failed = any(summary["zero"].values())
    if failed or args.keep or args.out:
        print(f"history and worker logs: {out_dir}")
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
