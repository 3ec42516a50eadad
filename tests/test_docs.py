"""The documentation runs: every Python block of README.md and docs/*.md is executed.

A page's blocks run in order in one fresh interpreter (a later block may use what an earlier
one defined, as a reader would type them), against a private redis-server: the URLs the pages
show (``redis://127.0.0.1:6379/0`` for the cache, ``/1`` for a Celery broker) are pointed at
it, so the examples never touch the shared Redis. What a page imports from "your project"
(``myapp.caches``, ``myapp.stores``) is a small stub package made here. Functions the blocks
define whose names start with ``test_`` (the testing page's example test) are called too.
``mkdocs build --strict`` (CI) checks the pages' links.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

STUBS = {
    "myapp/__init__.py": "",
    "myapp/caches.py": '"""Where a project declares its caches (a stub for the docs)."""\n',
    "myapp/stores.py": (
        "from oqron_cache.engine.l1 import MemoryStore\n\n\n"
        "class TracingMemoryStore(MemoryStore):\n"
        '    """A stub of "your L1Store" for the testing page."""\n'
    ),
}

RUNNER = """
import json, sys
blocks = json.loads(sys.stdin.read())
scope = {"__name__": "__docs__"}
for start, source in blocks:
    exec(compile(source, f"{sys.argv[1]}:{start}", "exec"), scope)
for name, fn in list(scope.items()):
    if name.startswith("test_") and callable(fn):
        fn()
import oqron_cache
oqron_cache.reset()
print("ran", len(blocks))
"""


def code_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """The page's fenced blocks in ``language``, with the line each starts on."""
    blocks: list[tuple[int, str]] = []
    current: list[str] | None = None
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if current is None:
            if line.strip() == f"```{language}":
                current, start = [], number + 1
        elif line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        else:
            current.append(line)
    assert current is None, f"{path.name} has an unclosed code block"
    return blocks


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return code_blocks(path, "python")


@pytest.fixture(scope="module")
def server() -> object:
    with RedisServer() as redis_server:
        yield redis_server


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("docs-stubs")
    for name, text in STUBS.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    return where


def test_every_page_with_python_is_covered() -> None:
    with_code = [p.name for p in PAGES if python_blocks(p)]
    assert {"README.md", "usage.md", "async.md", "celery.md", "testing.md"} <= set(with_code)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_the_python_blocks_of_a_page_run(page: Path, server: RedisServer, stubs: Path) -> None:
    url = server.url
    base = url.rsplit("/", 1)[0]
    blocks = [
        (
            start,
            source.replace("redis://127.0.0.1:6379/0", url).replace(
                "redis://127.0.0.1:6379/1", f"{base}/1"
            ),
        )
        for start, source in python_blocks(page)
    ]
    env = {
        **os.environ,
        "OQRON_REDIS_URL": url,
        "PYTHONPATH": os.pathsep.join([str(stubs), str(ROOT)]),
    }
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, str(page.relative_to(ROOT))],
        input=json.dumps(blocks),
        capture_output=True,
        text=True,
        env=env,
        cwd=stubs,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().endswith(f"ran {len(blocks)}"), done.stdout
