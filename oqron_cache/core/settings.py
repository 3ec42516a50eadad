"""What ``configure()`` was given, validated (:class:`Settings`), and how to show a URL without
its password (:func:`mask_url`: for logs, errors, ``repr`` and metrics)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and ``repr``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if parts.password is not None:
        # Keep the host part exactly as written (IPv6 brackets, port).
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = re.sub(r"(?i)((?:^|&)(?:sentinel_)?password=)[^&]*", r"\1***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True)
class Settings:
    """What ``configure()`` was given, validated."""

    redis_url: str | None
    namespace: str
    celery_app: Any
    op_timeout: float
    connect_timeout: float
    clock: Callable[[], float] | None
    enqueue_budget: float = 1.0

    def __repr__(self) -> str:
        url = mask_url(self.redis_url) if self.redis_url else None
        return f"Settings(redis_url={url!r}, namespace={self.namespace!r})"
