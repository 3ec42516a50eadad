"""oqron-cache: a two-tier cache (in-process L1 + Redis L2) that ends cache stampedes.

Quick use::

    import oqron_cache
    from oqron_cache import cache, refreshing_cache, MemoryTier, RedisTier, Stampede

    oqron_cache.configure(redis_url="redis://127.0.0.1:6379/0", namespace="myapp")
    users = cache("users", tiers=[MemoryTier(max_size=1000, ttl="30s"), RedisTier(ttl="10m")],
                  stale_ttl="1h", resolver=load_user)
    users.get("u1")
"""

from __future__ import annotations

from . import compat
from . import fork as _fork  # noqa: F401 - registers the at-fork hook (P11)
from .celery.write_through import WriteHandle, WriteThroughError, current_write_version
from .config import configure, reset
from .core.errors import (
    ConfigurationError,
    DuplicateCacheError,
    InvalidKeyError,
    NotConfiguredError,
    OqronCacheError,
    SerializationError,
    UnknownCacheError,
)
from .core.options import MemoryTier, RedisTier, Stampede
from .decorator import CachedFunction, refreshing_cache
from .frontend import Cache, cache

compat.install()  # old import paths (oqron_cache.keys, oqron_cache.tiers.redis, ...) still work

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CachedFunction",
    "ConfigurationError",
    "DuplicateCacheError",
    "InvalidKeyError",
    "MemoryTier",
    "NotConfiguredError",
    "OqronCacheError",
    "RedisTier",
    "SerializationError",
    "Stampede",
    "UnknownCacheError",
    "WriteHandle",
    "WriteThroughError",
    "__version__",
    "cache",
    "configure",
    "current_write_version",
    "refreshing_cache",
    "reset",
]
