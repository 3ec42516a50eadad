"""Checks of a Redis URL before anything connects, and telling a TLS failure from the rest."""

from __future__ import annotations

import ssl
import warnings
from urllib.parse import parse_qs, urlsplit

from ..core.errors import ConfigurationError
from ..core.settings import mask_url
from .urls import check_url

_SCHEMES = ("redis", "rediss", "unix")


def validate_redis_url(url: object) -> str:
    """Return ``url`` if it is a usable Redis URL; raise :class:`ConfigurationError` otherwise."""
    if not isinstance(url, str):
        raise TypeError(f"redis_url must be a str; got {type(url).__name__}")
    parts = urlsplit(url)
    # Every form named below has "://"; without it a URL has no scheme, whatever urlsplit
    # says (Python 3.10 takes "127.0.0.1:6379" for scheme "127.0.0.1", 3.11 for a path).
    if not parts.scheme or "://" not in url:
        raise ConfigurationError(
            f"redis_url {mask_url(url)!r} has no scheme; "
            "use redis://host:port/db or rediss:// for TLS"
        )
    if parts.scheme in ("redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster"):
        check_url(url)
        return url
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"redis_url scheme {parts.scheme!r} is not a Redis scheme; "
            "use redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
        )
    if parts.scheme == "rediss":
        reqs = parse_qs(parts.query).get("ssl_cert_reqs", [""])[0].lower()
        if reqs in ("none", "cert_none"):
            warnings.warn(
                f"redis_url {mask_url(url)!r} turns TLS certificate verification off "
                "(ssl_cert_reqs=none): anyone on the path can impersonate Redis",
                stacklevel=3,
            )
    return url


def is_tls_failure(exc: BaseException) -> bool:
    """True if ``exc`` (or its cause chain) is a TLS certificate/handshake failure."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen) or "certificate" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
