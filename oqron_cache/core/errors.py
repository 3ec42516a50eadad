"""Exceptions raised by oqron-cache.

Every error the library raises on purpose derives from :class:`OqronCacheError`. Errors about a
bad argument also derive from the built-in ``TypeError``/``ValueError`` so that callers who catch
those keep working. Infrastructure failures (Redis down, broker down) are *not* raised to readers:
they are degraded around and counted (promise P1); these classes exist for configuration errors
and for the few places where the caller must know.
"""

from __future__ import annotations


class OqronCacheError(Exception):
    """Base class of every error raised by oqron-cache.

    ``cache`` is the name of the cache involved (if any); ``key`` is the key, already made safe to
    print (hashed or escaped) by the raiser.
    """

    def __init__(self, message: str, *, cache: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.cache = cache
        self.key = key


class ConfigurationError(OqronCacheError, ValueError):
    """A setting given to :func:`configure`, :func:`cache` or a tier is invalid or incoherent."""


class NotConfiguredError(OqronCacheError, RuntimeError):
    """A cache was used before :func:`oqron_cache.configure` wired Redis (and Celery)."""


class InvalidKeyError(OqronCacheError, TypeError):
    """A key, or an argument of a decorated function, has no stable cache-key encoding."""


class SerializationError(OqronCacheError, TypeError):
    """A value cannot be stored faithfully by the configured codec."""


class DuplicateCacheError(OqronCacheError, ValueError):
    """Two caches were declared with the same ``name`` (the registry key workers use)."""


class UnknownCacheError(OqronCacheError, LookupError):
    """A task or command named a cache that is not in this process's registry."""
