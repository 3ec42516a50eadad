"""Fail unless the environment holds exactly the releases a constraints file names.

    python .ci/check_lowest.py .ci/lowest.txt

pip treats constraints as upper and lower limits at once, but a later resolver change (or a
typo in the file) would silently test something else; this says what was installed.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path


def main(path: str) -> int:
    wanted = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            wanted[name.strip()] = pinned.strip()
    wrong = {name: (pinned, version(name)) for name, pinned in wanted.items()
             if version(name) != pinned}  # fmt: skip
    for name, pinned in wanted.items():
        print(f"{name} {version(name)}" + ("" if name not in wrong else f" (wanted {pinned})"))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
