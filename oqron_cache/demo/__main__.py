"""``python -m oqron_cache.demo``: the demo (as ``oqron-cache demo``), or, with ``--child``, one of
its participant processes."""

from __future__ import annotations

import sys

from ..admin.cli import main
from .run import child_main

if sys.argv[1:] == ["--child"]:
    raise SystemExit(child_main())
raise SystemExit(main(["demo", *sys.argv[1:]]))
