"""The ``oqron-cache`` command line (``stats``, ``invalidate``, ``inspect``, ``demo``) and the
Prometheus exporter. The names of the old ``oqron_cache.admin`` module are re-exported here.
"""

from __future__ import annotations

from .commands import (
    ADMIN_LOCK_TTL,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    L1_NOTE,
    AdminError,
    add_commands,
    build_parser,
    human_seconds,
    main,
    render_detail,
    render_table,
    stand_in,
)

__all__ = [
    "ADMIN_LOCK_TTL",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "L1_NOTE",
    "AdminError",
    "add_commands",
    "build_parser",
    "human_seconds",
    "main",
    "render_detail",
    "render_table",
    "stand_in",
]
