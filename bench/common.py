"""Shared helpers of the benchmarks: timing, tables, Redis namespaces and bench/RESULTS.md.

Timing follows one rule: a *repetition* times a loop of ``inner`` operations with
``time.perf_counter_ns`` (garbage collection off, as ``timeit`` does) and divides by ``inner``;
a benchmark runs many repetitions of every case, interleaved round-robin so that noise from other
processes lands on all cases alike, and reports the median and the p99 of the per-op figures.
"""

from __future__ import annotations

import datetime as dt
import gc
import math
import os
import platform
import random
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import redis

from oqron_cache.redis.replies import as_dict, as_int

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
LIBRARIES = ("oqron-cache", "cachetools", "dogpile.cache", "cashews", "redis", "hiredis")

Loop = Callable[[int], object]  # runs the measured operation n times


def redis_url() -> str:
    """The Redis the benchmarks use: ``$BENCH_REDIS_URL``, ``$OQRON_REDIS_URL`` or the default."""
    return (
        os.environ.get("BENCH_REDIS_URL") or os.environ.get("OQRON_REDIS_URL") or DEFAULT_REDIS_URL
    )


def new_namespace() -> str:
    """A fresh namespace ``bench-<8 hex>``; every key a benchmark writes contains it."""
    return f"bench-{secrets.token_hex(4)}"


def delete_namespace(client: redis.Redis, namespace: str) -> int:
    """UNLINK every key containing ``namespace`` (SCAN, never KEYS or FLUSH*); return how many."""
    if not re.fullmatch(r"bench-[0-9a-f]{8}", namespace):
        raise ValueError(f"refusing to delete keys of a non-bench namespace {namespace!r}")
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += as_int(client.unlink(*batch))
            batch.clear()
    if batch:
        removed += as_int(client.unlink(*batch))
    return removed


@contextmanager
def bench_namespace(url: str) -> Iterator[tuple[redis.Redis, str]]:
    """A Redis client and a fresh namespace whose keys are deleted on exit."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    client.ping()
    namespace = new_namespace()
    try:
        yield client, namespace
    finally:
        delete_namespace(client, namespace)
        client.close()


# ---------------------------------------------------------------------------------- timing


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (mean of the middle two for an even count)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Timing:
    """Per-op nanoseconds of every repetition of one case."""

    name: str
    per_op_ns: list[float] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return median(self.per_op_ns)

    @property
    def p99_ns(self) -> float:
        return percentile(self.per_op_ns, 0.99)


def time_once(loop: Loop, inner: int) -> float:
    """Run ``loop(inner)`` once with the garbage collector off; return ns per op."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        loop(inner)
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_on:
            gc.enable()
    return elapsed / inner


def measure(cases: Mapping[str, Loop], *, inner: int, reps: int, warmup: int) -> dict[str, Timing]:
    """Time every case ``reps`` times (after ``warmup`` untimed repetitions), interleaved."""
    for _ in range(warmup):
        for loop in cases.values():
            loop(inner)
    timings = {name: Timing(name) for name in cases}
    for _ in range(reps):
        for name, loop in cases.items():
            timings[name].per_op_ns.append(time_once(loop, inner))
    return timings


OneRep = Callable[[], float]  # one repetition of a case: prepares (untimed), times, returns ns/op


def timed_loop(prepare: Callable[[], Callable[[], object]], inner: int) -> OneRep:
    """A case whose repetition times one loop of ``inner`` calls.

    ``prepare()`` (untimed) does what must happen before the loop (pick fresh keys, wait for
    background work) and returns the loop to time.
    """
    clock = time.perf_counter_ns

    def one() -> float:
        loop = prepare()
        start = clock()
        loop()
        return (clock() - start) / inner

    return one


def measure_each(
    cases: Mapping[str, OneRep], *, reps: int, warmup: int, collect_every: int = 20
) -> dict[str, Timing]:
    """Run every case ``reps`` times (after ``warmup``), interleaved; each case times itself.

    For cases that need an untimed step before each repetition (new keys, an idle background
    thread): see :func:`timed_loop`. Each repetition runs the cases in a new random order
    (seeded: the same from run to run), so no case always follows the same one. The garbage
    collector is off for the whole measurement and run between repetitions every
    ``collect_every`` (untimed).
    """
    timings = {name: Timing(name) for name in cases}
    order = list(cases.items())
    shuffler = random.Random(0)
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for rep in range(warmup + reps):
            if rep % collect_every == 0:
                gc.collect()
            shuffler.shuffle(order)
            for name, one in order:
                ns = one()
                if rep >= warmup:
                    timings[name].per_op_ns.append(ns)
    finally:
        if gc_was_on:
            gc.enable()
    return timings


# ---------------------------------------------------------------------------------- tables


_NUMERIC = re.compile(r"^[-+]?[\d.,\s]+(x|%| ?[mun]?s)?( \(.*\))?$")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; columns of numbers right-aligned, the others left-aligned."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(_NUMERIC.match(row[i]) for row in cells[1:]) for i in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        parts = [
            row[i].rjust(widths[i]) if numeric[i] else row[i].ljust(widths[i])
            for i in range(len(row))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` as a table under ``title`` (what a benchmark shows on the terminal)."""
    print(f"\n{title}\n")
    print(markdown_table(headers, rows))
    print()


# ---------------------------------------------------------------------------------- reports


@dataclass
class Check:
    """One target of the issue: what was measured against what was asked."""

    target: str
    measured: str
    passed: bool


@dataclass
class Report:
    """What one benchmark found: a markdown body (tables, notes) and its targets."""

    key: str  # section id in RESULTS.md: "l1_hit", "l2_hit", "stampede"
    title: str
    body: str
    checks: list[Check] = field(default_factory=list)


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """``git rev-parse --short HEAD``, with ``+local changes`` if the library's files differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "oqron_cache"],
            cwd=REPO_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} + uncommitted changes to oqron_cache/" if dirty else head


def library_versions() -> dict[str, str]:
    """Installed versions of oqron-cache and the peers."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine_info(url: str | None = None) -> dict[str, str]:
    """CPU, cores, load, Python, library and Redis versions: the context of a measurement."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    info = {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "load average (1/5/15 min)": load,
        "python": f"{platform.python_implementation()} {sys.version.split()[0]} on {sys.platform}",
        "libraries": ", ".join(f"{k} {v}" for k, v in library_versions().items()),
    }
    if url is not None:
        try:
            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            server = as_dict(client.info("server"))
            client.close()
            info["redis server"] = f"{server.get('redis_version')} at {redis_url_host(url)}"
        except redis.RedisError as exc:
            info["redis server"] = f"unreachable ({type(exc).__name__})"
    return info


def redis_url_host(url: str) -> str:
    """``url`` without credentials (host, port and db only)."""
    return re.sub(r"//[^@/]*@", "//", url)


def now_utc() -> str:
    """The current date and time, UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_checks(checks: Sequence[Check]) -> str:
    """The targets of a report as a table."""
    rows = [(c.target, c.measured, "PASS" if c.passed else "FAIL") for c in checks]
    return markdown_table(["target", "measured", "result"], rows)


def render_section(report: Report, info: Mapping[str, str], stamp: str) -> str:
    """The markdown of one benchmark's section of RESULTS.md, between its markers."""
    lines = [
        f"<!-- bench:{report.key} -->",
        f"## {report.title}",
        "",
        f"Measured {stamp}.",
        "",
        *([f"- {k}: {v}" for k, v in info.items()] + [""] if info else []),
        report.body.strip(),
        "",
    ]
    if report.checks:
        lines += ["Targets:", "", render_checks(report.checks), ""]
    lines.append(f"<!-- /bench:{report.key} -->")
    return "\n".join(lines)


RESULTS_PREAMBLE = """# Benchmark results

Written by `bench/` (see bench/README.md): `.venv/bin/python -m bench.run` rewrites this whole
file; running one benchmark (`.venv/bin/python -m bench.l1_hit`) replaces only its section and
its rows in the summary of targets (marked "run alone").
"""


def update_section(report: Report, url: str | None = None, path: Path = RESULTS) -> None:
    """Write ``report`` into its section of ``path`` (replacing it, or appending it)."""
    stamp = f"{now_utc()} at commit {git_commit()}"
    section = render_section(report, machine_info(url), stamp)
    text = path.read_text() if path.exists() else RESULTS_PREAMBLE
    pattern = re.compile(
        rf"<!-- bench:{re.escape(report.key)} -->.*?<!-- /bench:{re.escape(report.key)} -->",
        re.DOTALL,
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(_retarget(text, report, stamp))
    print(f"updated section {report.key!r} of {path}")


_TARGETS = re.compile(r"^## Targets \((?P<scope>[^)]*)\): \d+ of \d+ pass\n\n((?:\|.*\n)+)", re.M)


def _retarget(text: str, report: Report, stamp: str) -> str:
    """Replace ``report``'s rows in the summary of targets at the top (a full run's table), so
    it never contradicts the section a single run just rewrote; those rows say when they ran."""
    found = _TARGETS.search(text)
    if found is None or not report.checks:
        return text
    lines = found.group(2).splitlines()[2:]  # below the header and the rule
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    mine = [
        (
            report.title,
            c.target,
            f"{c.measured} (run alone, {stamp})",
            "PASS" if c.passed else "FAIL",
        )
        for c in report.checks
    ]
    at = next((i for i, row in enumerate(rows) if row[0] == report.title), len(rows))
    rows = [row for row in rows if row[0] != report.title]
    rows[at:at] = [list(row) for row in mine]
    passed = sum(row[3] == "PASS" for row in rows)
    table = markdown_table(["benchmark", "target", "measured", "result"], rows)
    head = f"## Targets ({found.group('scope')}): {passed} of {len(rows)} pass\n\n"
    return text[: found.start()] + head + table + "\n" + text[found.end() :]


def write_results(
    reports: Sequence[Report],
    url: str,
    note: str | None = None,
    info: Mapping[str, str] | None = None,
    path: Path = RESULTS,
) -> None:
    """Rewrite ``path``: a header (commit, date, machine), every target, then every section.

    ``info`` is :func:`machine_info` taken before the runs (so the load average is the
    machine's, not the benchmarks' own); taken now if not given. Sections of benchmarks that
    were not part of this run are kept as they were, after this run's, with their own date.
    """
    kept = _other_sections(path, {r.key for r in reports})
    commit = git_commit()
    stamp = now_utc()
    info = info if info is not None else machine_info(url)
    checks = [(r.title, c) for r in reports for c in r.checks]
    passed = sum(c.passed for _, c in checks)
    lines = [
        RESULTS_PREAMBLE.rstrip(),
        "",
        f"Commit: `{commit}`  ",
        f"Date: {stamp}",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        "",
    ]
    if note:
        lines += [f"> {note}", ""]
    lines += [
        f"## Targets (issues 2 and 3): {passed} of {len(checks)} pass",
        "",
        markdown_table(
            ["benchmark", "target", "measured", "result"],
            [(t, c.target, c.measured, "PASS" if c.passed else "FAIL") for t, c in checks],
        ),
        "",
    ]
    for report in reports:  # the machine is described once, in the header
        lines += [render_section(report, {}, f"{stamp} at commit {commit}"), ""]
    if kept:
        lines += [
            "## Earlier runs",
            "",
            "Benchmarks not part of the run above, as their last run left them (each section "
            "gives its own date, commit and machine).",
            "",
        ]
        lines += [section + "\n" for section in kept]
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


_SECTION = re.compile(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", re.DOTALL)


def _other_sections(path: Path, keys: set[str]) -> list[str]:
    """The sections of ``path`` whose benchmark is not in ``keys`` (verbatim, in order)."""
    if not path.exists():
        return []
    return [m.group(0) for m in _SECTION.finditer(path.read_text()) if m.group(1) not in keys]


def sample_value(user_id: str = "u1") -> dict[str, object]:
    """The value every benchmark caches: a user profile, about 200 bytes of JSON."""
    return {
        "id": user_id,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "tenant_id": "acme",
        "roles": ["admin", "editor"],
        "created_at": "2024-01-01T00:00:00Z",
        "score": 42,
        "active": True,
        "prefs": {"lang": "en", "tz": "UTC"},
    }
