"""What the admin commands share: exit codes, :class:`AdminError`, and the Redis client.

Every command (:mod:`~oqron_cache.admin_stats`, :mod:`~oqron_cache.admin_invalidate`,
:mod:`~oqron_cache.admin_inspect`) checks its namespace and cache name here and connects with
:func:`redis_client`, which turns Redis failures into an :class:`AdminError` with exit code 3.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import redis

from ..config import mask_url, validate_redis_url
from ..core.errors import ConfigurationError
from ..core.keys import validate_cache_name
from ..core.keys import validate_namespace as _validate_namespace
from ..redis.clients import connect

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class AdminError(Exception):
    """A command failed: ``code`` is its exit code, the message is one line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def usage_error(what: str, exc: Exception) -> AdminError:
    return AdminError(EXIT_USAGE, f"{what}: {exc}")


def namespace_arg(args: argparse.Namespace) -> str:
    try:
        return _validate_namespace(args.namespace)
    except (ConfigurationError, TypeError) as exc:
        raise usage_error("--namespace", exc) from None


def cache_name_arg(name: str) -> str:
    try:
        return validate_cache_name(name)
    except (ConfigurationError, TypeError) as exc:
        raise usage_error("CACHE", exc) from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def redis_failure(url: str, exc: BaseException) -> AdminError:
    where = f"Redis at {mask_url(url)}"
    if isinstance(exc, redis.AuthenticationError) or any(
        word in str(exc) for word in ("NOAUTH", "WRONGPASS", "NOPERM")
    ):
        return AdminError(EXIT_UNREACHABLE, f"{where} refused access ({one_line(exc)})")
    if isinstance(exc, redis.TimeoutError):
        return AdminError(EXIT_UNREACHABLE, f"{where} did not answer in time ({one_line(exc)})")
    if isinstance(exc, redis.ResponseError):
        return AdminError(EXIT_UNREACHABLE, f"{where} refused the command ({one_line(exc)})")
    return AdminError(EXIT_UNREACHABLE, f"{where} is unreachable ({one_line(exc)})")


@contextlib.contextmanager
def redis_client(args: argparse.Namespace) -> Iterator[redis.Redis]:
    """A client of ``--redis-url`` that answered PING; Redis failures inside become exit 3."""
    url = args.redis_url
    try:
        validate_redis_url(url)
        client = connect(
            url,
            socket_timeout=args.timeout,
            connect_timeout=args.timeout,
            client_name="oqron-cache-admin",
        )
    except (ConfigurationError, TypeError, ValueError) as exc:
        raise usage_error("--redis-url", exc) from None
    try:
        client.ping()
        yield client
    except BrokenPipeError:  # our stdout's reader left (see admin._run), not Redis
        raise
    except (redis.RedisError, OSError) as exc:
        raise redis_failure(url, exc) from None
    finally:
        client.close()
