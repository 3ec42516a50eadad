"""``python -m oqron_cache``: the ``oqron-cache`` command line (see :mod:`oqron_cache.cli`)."""

from __future__ import annotations

from .admin.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
