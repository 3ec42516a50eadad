"""``python -m oqron_cache.admin``: the admin commands alone (``stats``, ``invalidate``,
``inspect``), as ``oqron-cache`` offers them."""

from __future__ import annotations

from .commands import main

raise SystemExit(main())
