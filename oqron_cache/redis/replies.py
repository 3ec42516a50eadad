"""Typed views of Redis replies, the same under every supported redis-py (5 to 8).

redis-py before 7 types most commands as returning ``Awaitable[Any] | Any``; redis-py 8 types
them precisely. A ``cast`` that one needs is redundant to the other, and ``mypy --strict``
rejects both, so replies go through these instead: they take ``object`` and convert (or
refuse) at run time, which also catches a reply of an unexpected shape where a cast would not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def as_int(reply: object) -> int:
    """An integer reply (``INCR``, ``UNLINK``, ``PTTL``...), also when it came as bytes."""
    if isinstance(reply, int | bytes | str):
        return int(reply)
    raise TypeError(f"expected an integer reply from Redis, got {type(reply).__name__}")


def as_dict(reply: object) -> dict[str, Any]:
    """A mapping reply (``INFO``, ``CONFIG GET``, ``HGETALL`` decoded by the client)."""
    if isinstance(reply, Mapping):
        return dict(reply)
    raise TypeError(f"expected a mapping reply from Redis, got {type(reply).__name__}")


def as_list(reply: object) -> list[Any]:
    """An array reply (``TIME``, ``LRANGE``, a pipeline's replies, ``SENTINEL`` lists)."""
    if isinstance(reply, list | tuple):
        return list(reply)
    raise TypeError(f"expected an array reply from Redis, got {type(reply).__name__}")


def as_bytes(reply: object) -> bytes | None:
    """A bulk-string reply (``GET``, ``HGET``): bytes, or None when there is none."""
    if reply is None or isinstance(reply, bytes):
        return reply
    if isinstance(reply, str):
        return reply.encode()
    raise TypeError(f"expected a string reply from Redis, got {type(reply).__name__}")
