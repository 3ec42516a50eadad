"""The ``oqron-cache`` command line and its demo, run as a user runs them (subprocesses).

The demo runs against the real shared Redis; the memory-only fallback against a port where
nothing listens. The README's Python examples are compiled, so they stay valid Python.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

import oqron_cache
import oqron_cache.config
from oqron_cache.cli import main
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
DEAD_REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m oqron_cache ARGS`` from the repository root, with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OQRON_")}
    return subprocess.run(
        [sys.executable, "-m", "oqron_cache", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table(stdout: str) -> dict[str, list[str]]:
    """The demo's table as {row label: cells}; cells are separated by 3+ spaces."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{3,}", line.strip())
        if len(parts) == 4:  # a label and one cell per phase
            rows[parts[0]] = parts[1:]
    return rows


def ints(cells: list[str]) -> list[int]:
    return [int(cell) for cell in cells]


def test_demo_quick_on_redis_runs_the_resolver_once_per_phase(
    redis_url: str, redis_client: redis.Redis
) -> None:
    result = run_cli("demo", "--quick", "--redis-url", redis_url)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert "notice:" not in result.stdout  # Redis answered: no memory-only fallback
    rows = table(result.stdout)
    assert rows["phase"] == ["cold key", "expired key", "stale key"], result.stdout
    assert ints(rows["requests"]) == [200, 200, 200]
    # One resolver run across 2 processes x 10 threads, counted by INCR in Redis (P4).
    assert ints(rows["resolver calls"]) == [1, 1, 1], result.stdout
    assert ints(rows["errors"]) == [0, 0, 0]
    cold, expired, stale = ints(rows["stampedes prevented"])
    assert cold >= 1 and expired >= 1 and stale == 0, result.stdout
    assert ints(rows["stale served"])[:2] == [0, 0]  # an expired value is never served (P3)
    assert ints(rows["stale served"])[2] >= 1
    # Every request is accounted for: it ran the resolver, waited, got it stale or from cache.
    for phase in range(3):
        parts = ("stampedes prevented", "stale served", "fresh from cache")
        accounted = sum(int(rows[label][phase]) for label in parts)
        inline = 0 if phase == 2 else 1  # the stale phase's resolver call is in the background
        assert accounted + inline == 200, result.stdout
    assert "caller (one get())" in rows
    # Its keys are gone from the shared Redis (SCAN + UNLINK at the end).
    match = re.search(r"namespace (demo-\d+)", result.stdout)
    assert match is not None, result.stdout
    assert "removed the demo's" in result.stdout
    assert list(redis_client.scan_iter(match=f"oqron:{match.group(1)}:*", count=1000)) == []


def test_demo_without_redis_runs_on_memory_alone() -> None:
    result = run_cli("demo", "--quick", "--redis-url", DEAD_REDIS_URL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1, result.stdout
    assert "redis://127.0.0.1:1/0" in notices[0]
    assert "memory tier (L1) alone" in notices[0]
    rows = table(result.stdout)
    # No shared tier: each of the 2 processes computes once, and the table says why.
    assert ints(rows["resolver calls"]) == [2, 2, 2], result.stdout
    assert ints(rows["errors"]) == [0, 0, 0]
    assert "memory only" in result.stdout
    assert rows["redis tier (L2)"] == ["-", "-", "-"]


def test_demo_hides_the_password_of_an_unreachable_redis() -> None:
    result = run_cli(
        "demo", "--quick", "--processes", "1", "--redis-url", "redis://u:hunter2@127.0.0.1:1/0"
    )
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "redis://u:***@127.0.0.1:1/0" in result.stdout


def test_help_exits_0() -> None:
    result = run_cli("--help", timeout=30)
    assert result.returncode == 0
    assert "demo" in result.stdout and "version" in result.stdout
    demo_help = run_cli("demo", "--help", timeout=30)
    assert demo_help.returncode == 0
    for option in ("--redis-url", "--requests", "--threads", "--processes", "--quick"):
        assert option in demo_help.stdout


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["demo", "--requests", "0"],
        ["demo", "--requests", "many"],
        ["demo", "--threads", "1000"],
        ["demo", "--processes", "-1"],
        ["demo", "--unknown"],
        ["demo", "--redis-url", "http://127.0.0.1:6379"],
        ["demo", "--redis-url", "127.0.0.1:6379"],
        ["version", "extra"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err


def test_usage_error_exit_code_through_python_m() -> None:
    result = run_cli("demo", "--requests", "0", timeout=30)
    assert result.returncode == 2
    assert "--requests" in result.stderr and "Traceback" not in result.stderr


def test_version_prints_the_version() -> None:
    expected = f"oqron-cache {oqron_cache.__version__}"
    result = run_cli("version", timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == expected
    assert run_cli("--version", timeout=30).stdout.strip() == expected


def test_console_script_is_installed() -> None:
    script = shutil.which("oqron-cache", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install -e . should have installed the oqron-cache script"
    result = subprocess.run([script, "version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"oqron-cache {oqron_cache.__version__}"


# -- README ---------------------------------------------------------------------------------


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """The README's fenced code blocks in ``language``, with the line each starts on."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    blocks: list[tuple[int, str]] = []
    current: list[str] | None = None
    start = 0
    for number, line in enumerate(lines, 1):
        if current is None:
            if line.strip() == f"```{language}":
                current, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    assert current is None, "README.md has an unclosed code block"
    return blocks


def test_readme_python_examples_compile() -> None:
    blocks = readme_blocks("python")
    assert len(blocks) >= 3
    for start, source in blocks:
        compile(source, f"README.md:{start}", "exec")


def test_readme_quick_start_is_the_two_dev_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [
        line.split("#")[0].strip()
        for _, block in readme_blocks("bash")
        if block in quick
        for line in block.splitlines()
        if line.strip()
    ]
    assert commands == ["./dev demo", "./dev test"], commands


# -- library bugs found while checking the README against the code --------------------------


def test_invalidate_pattern_with_redis_down_does_not_raise(private_redis: RedisServer) -> None:
    oqron_cache.configure(redis_url=private_redis.url, namespace="t-invpat")
    try:
        users = oqron_cache.cache("invpat-users", ttl="10s")
        try:
            users.set("u1", {"id": "u1"})
            private_redis.kill()
            assert users.invalidate_pattern("u*") == 0  # nothing could be removed from L2
            assert users.get("u1") is None  # but this process's L1 copy is gone
        finally:
            users.close()
    finally:
        oqron_cache.config.reset()


def test_memory_only_cache_does_not_cache_oversize_values() -> None:
    # Found while checking the README: memory-only caches did not encode values, so P9's
    # max_value_bytes was not enforced there (the README's "Traps" now says it is).
    calls: list[str] = []

    def resolver(key: str) -> str:
        calls.append(key)
        return "x" * 1000

    big = oqron_cache.cache(
        "oversize-memory-only",
        tiers=[oqron_cache.MemoryTier(max_size=10, ttl="1m")],
        max_value_bytes=100,
        resolver=resolver,
    )
    try:
        assert big.get("k") == "x" * 1000  # returned ...
        assert big.get("k") == "x" * 1000
        assert calls == ["k", "k"]  # ... but not cached
        assert big.get_stats()["oversize"] == 2
    finally:
        big.close()
