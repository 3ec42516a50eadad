"""The public cache object: ``cache(...)`` declares one, its methods are the API of DESIGN §1."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from .celery.write_through import WriteHandle
from .celery.write_through import start as start_write
from .config import current_runtime
from .core.codecs import get_codec
from .core.durations import Duration, parse_duration, positive_int
from .core.errors import ConfigurationError, InvalidKeyError
from .core.keys import Glob, matches_everything, validate_cache_name
from .core.metrics import Stats
from .core.options import (
    CacheOptions,
    MemoryTier,
    MissPolicy,
    RedisTier,
    Stampede,
    Strategy,
    TagsFunc,
    resolve_tiers,
    stampede_from_dict,
)
from .core.typed import check_value_type
from .engine import registry
from .engine.invalidation import (
    invalidate_pattern,
    invalidate_pattern_steps,
    invalidate_tag,
    invalidate_tag_steps,
)
from .engine.stack import MAX_TAG_BYTES, CacheStack
from .engine.steps import adrive, drive
from .engine.writes import remove_many_steps, remove_steps, write_many_steps, write_steps
from .redis.store import L2Unavailable

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("oqron_cache")

V = TypeVar("V")  # the cache's values (value_type=), Any when not declared
D = TypeVar("D")

SCAN_COUNT = 500
UNLINK_BATCH = 500


def _bad_key(key: object) -> Exception:
    if type(key) is not str:
        return InvalidKeyError(f"cache keys must be str; got {type(key).__name__}")
    return ConfigurationError("cache keys must not be empty")


def _check_keys(keys: Iterable[str], method: str) -> list[str]:
    if isinstance(keys, str | bytes):
        raise TypeError(f"{method}() takes a list of keys, not one {type(keys).__name__}")
    out = list(keys)
    for key in out:
        if type(key) is not str or not key:
            raise _bad_key(key)
    return out


def _factory_resolver(factory: Callable[[], Any], method: str) -> Callable[[str], Any]:
    """A resolver calling ``factory()``: an ``async def`` factory gives an ``async def``."""
    if not callable(factory):
        raise TypeError(f"{method} factory must be callable; got {type(factory).__name__}")
    if inspect.iscoroutinefunction(factory):

        async def resolve_async(_key: str) -> Any:
            return await factory()

        return resolve_async
    return lambda _key: factory()


def _bounded(value: int, name: str, limit: int) -> int:
    if value > limit:
        raise ConfigurationError(f"{name} must be <= {limit}; got {value}")
    return value


class Cache(Generic[V]):
    """A two-tier cache. Create it with :func:`cache`; its name is unique in the process.

    ``Cache[User]`` (from ``cache(..., value_type=User)``) tells type checkers what it holds:
    ``get()`` returns ``User | None``.
    """

    def __init__(self, options: CacheOptions, clock: Callable[[], float] | None = None) -> None:
        self.options = options
        self.name = options.name
        self.clock = clock
        self.stats = Stats()
        self._stack: CacheStack | None = None
        registry.register(self)

    def __repr__(self) -> str:
        return f"<oqron_cache.Cache {self.name!r} ttl={self.options.ttl}s>"

    @property
    def stack(self) -> CacheStack:
        """The engine of this cache, bound to the current configuration."""
        return self._stack or self._bind()

    def _bind(self) -> CacheStack:
        stack: CacheStack = current_runtime().bind(self)
        self._stack = stack
        return stack

    def unbind(self) -> None:
        """Forget the engine (``configure()`` calls this so the next use rebinds)."""
        self._stack = None

    @overload
    def get(self, key: str) -> V | None: ...
    @overload
    def get(self, key: str, default: D) -> V | D: ...
    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of ``key``: from L1, else L2, else the resolver (if any).

        A stale value (past ``ttl``, within ``stale_ttl``) is returned at once and refreshed in
        the background. Without a resolver a miss returns ``default``; a cached ``None`` is a
        value, not a miss. Raises only the resolver's own error when nothing servable exists.
        """
        if type(key) is not str or not key:
            raise _bad_key(key)
        return (self._stack or self._bind()).get(key, self.options.resolver, default)

    def get_or_set(self, key: str, factory: Callable[[], V]) -> V:
        """Return the value of ``key``, calling ``factory()`` (once across processes) on a miss."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        return cast("V", self.stack.get(key, _factory_resolver(factory, "get_or_set")))

    def set(
        self, key: str, value: V, *, wait: bool = True, timeout: float = 30.0
    ) -> WriteHandle | None:
        """Store ``value`` in every tier; other processes drop their L1 copy.

        With ``write_through``, the origin is written first and the cache only after it accepted
        the value: through a Celery chain (retried, durable) when a Celery app is configured,
        inline otherwise. ``set()`` then waits for the chain (read-your-writes) up to
        ``timeout`` seconds and raises :class:`~oqron_cache.write_through.WriteThroughError` if
        the origin refused; ``wait=False`` returns the :class:`WriteHandle` at once.
        Raises :class:`~oqron_cache.errors.SerializationError` if the codec cannot store the
        value faithfully. Redis being down is not an error (L1 is updated, the error counted).
        """
        if type(key) is not str or not key:
            raise _bad_key(key)
        if self.options.write_through is None:
            self.stack.set(key, value)
            return None
        handle = start_write(self.stack, key, value)
        if wait:
            handle.wait(timeout)
        return handle

    def delete(self, key: str) -> None:
        """Remove ``key`` from every tier and from every process's L1."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        self.stack.delete(key)

    def invalidate_pattern(self, pattern: str, *, allow_all: bool = False) -> int:
        """Delete every key of this cache matching the glob ``pattern``; return how many.

        Only ``*``, ``?`` and ``[abc]`` are special (``\\*`` is a literal star); the match is
        confined to this cache in this namespace. ``"*"`` needs ``allow_all=True``. Uses SCAN,
        never KEYS. Keys longer than ``max_key_bytes`` are stored hashed and are not matched.
        """
        return invalidate_pattern(
            self.stack, self._pattern(pattern, allow_all), SCAN_COUNT, UNLINK_BATCH
        )

    def _pattern(self, pattern: str, allow_all: bool) -> Glob:
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str; got {type(pattern).__name__}")
        if not pattern or (matches_everything(pattern) and not allow_all):
            raise ConfigurationError(
                f"invalidate_pattern({pattern!r}) would drop the whole cache {self.name!r}; "
                "pass allow_all=True if that is what you mean"
            )
        return Glob(pattern)

    def invalidate_by_tag(self, tag: str) -> int:
        """Delete every entry of this cache carrying ``tag``; return how many were in L2.

        Tags come from ``tags=lambda key, value: [...]`` at fill time. The tag is literal (glob
        characters in it mean themselves). Entries are dropped page by page (SSCAN), so a tag
        of 100,000 entries does not block Redis; every process's L1 drops them through the bus.
        A load of a tagged entry that was in flight when this was called cannot bring it back.
        """
        self._check_tag(tag)
        return invalidate_tag(self.stack, tag)

    @staticmethod
    def _check_tag(tag: str) -> None:
        if not isinstance(tag, str):
            raise TypeError(f"tag must be a str; got {type(tag).__name__}")
        if not tag or len(tag.encode("utf-8", "surrogatepass")) > MAX_TAG_BYTES:
            raise ConfigurationError(
                f"tag must hold 1..{MAX_TAG_BYTES} bytes; got {len(tag)} chars"
            )

    # -- many keys at once

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        """The values of ``keys`` as a dict, each as :meth:`get` would return it; keys with no
        value are left out. L1 first; the rest is read from L2 in one pipelined round trip
        (with a resolver, what is still missing is loaded key by key, deduplicated as usual).
        """
        return self.stack.get_many(_check_keys(keys, "get_many"), self.options.resolver)

    def set_many(self, values: Mapping[str, V]) -> None:
        """:meth:`set` each ``key: value``, the L2 writes pipelined in one round trip.

        Not for write-through caches (each write goes through the origin: use :meth:`set`).
        """
        items = self._check_values(values, "set_many")
        drive(write_many_steps(self.stack, items), self.stack.l2)

    def delete_many(self, keys: Iterable[str]) -> None:
        """:meth:`delete` each of ``keys``, the tombstones pipelined in one round trip."""
        checked = list(dict.fromkeys(_check_keys(keys, "delete_many")))
        drive(remove_many_steps(self.stack, checked), self.stack.l2)

    def _check_values(self, values: Mapping[str, V], method: str) -> dict[str, Any]:
        if not isinstance(values, Mapping):
            raise TypeError(f"{method}() takes a mapping of key: value")
        if self.options.write_through is not None:
            raise ConfigurationError(
                f"{method}() on the write-through cache {self.name!r}: every write goes "
                "through the origin; use set() for each"
            )
        _check_keys(values.keys(), method)
        return dict(values)

    # -- the async front (DESIGN section 10): the same steps, driven on the running loop

    @overload
    async def aget(self, key: str) -> V | None: ...
    @overload
    async def aget(self, key: str, default: D) -> V | D: ...
    async def aget(self, key: str, default: Any = None) -> Any:
        """:meth:`get` for asyncio code. An L1 hit does no I/O and never yields to the loop;
        L2 is read through ``redis.asyncio`` on the running loop; an ``async def`` resolver
        is awaited, a sync one runs in a worker thread."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        return await (self._stack or self._bind()).aget(key, self.options.resolver, default)

    async def aget_or_set(
        self, key: str, factory: Callable[[], V] | Callable[[], Awaitable[V]]
    ) -> V:
        """:meth:`get_or_set` for asyncio code; ``factory`` may be sync or ``async def``."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        return cast("V", await self.stack.aget(key, _factory_resolver(factory, "aget_or_set")))

    async def aset(
        self, key: str, value: V, *, wait: bool = True, timeout: float = 30.0
    ) -> WriteHandle | None:
        """:meth:`set` for asyncio code. A write-through set (a Celery chain, or the origin
        called inline) runs in a worker thread: the loop never waits on the broker."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        if self.options.write_through is not None:
            return await asyncio.to_thread(self.set, key, value, wait=wait, timeout=timeout)
        stack = self.stack
        await adrive(write_steps(stack, key, value), stack.async_l2())
        return None

    async def adelete(self, key: str) -> None:
        """:meth:`delete` for asyncio code."""
        if type(key) is not str or not key:
            raise _bad_key(key)
        stack = self.stack
        await adrive(remove_steps(stack, key), stack.async_l2())

    async def aget_many(self, keys: Iterable[str]) -> dict[str, V]:
        """:meth:`get_many` for asyncio code."""
        return await self.stack.aget_many(_check_keys(keys, "aget_many"), self.options.resolver)

    async def aset_many(self, values: Mapping[str, V]) -> None:
        """:meth:`set_many` for asyncio code."""
        items = self._check_values(values, "aset_many")
        stack = self.stack
        await adrive(write_many_steps(stack, items), stack.async_l2())

    async def adelete_many(self, keys: Iterable[str]) -> None:
        """:meth:`delete_many` for asyncio code."""
        checked = list(dict.fromkeys(_check_keys(keys, "adelete_many")))
        stack = self.stack
        await adrive(remove_many_steps(stack, checked), stack.async_l2())

    async def ainvalidate_pattern(self, pattern: str, *, allow_all: bool = False) -> int:
        """:meth:`invalidate_pattern` for asyncio code: SCAN page by page on the loop (on a
        Redis Cluster, whose scan walks every node, in a worker thread)."""
        glob = self._pattern(pattern, allow_all)
        stack = self.stack
        if stack.l2 is not None and stack.l2.conn.cluster:
            return await asyncio.to_thread(self.invalidate_pattern, pattern, allow_all=allow_all)
        steps = invalidate_pattern_steps(stack, glob, SCAN_COUNT, UNLINK_BATCH)
        return await adrive(steps, stack.async_l2())

    async def ainvalidate_by_tag(self, tag: str) -> int:
        """:meth:`invalidate_by_tag` for asyncio code: the tag's index page by page, on the
        loop."""
        self._check_tag(tag)
        stack = self.stack
        return await adrive(invalidate_tag_steps(stack, tag), stack.async_l2())

    async def aget_stats(self, local: bool = False) -> dict[str, Any]:
        """:meth:`get_stats` for asyncio code."""
        if local or self._stack is None or self._stack.l2 is None:
            return self.get_stats(local=local)  # no I/O
        return await asyncio.to_thread(self.get_stats, local)

    def get_stats(self, local: bool = False) -> dict[str, Any]:
        """This cache's counters (DESIGN section 6), summed over every process and worker.

        The sum is kept in Redis (each process flushes at least once a second, and this call
        flushes this process first). ``local=True`` gives this process's counters only; so does
        a cache without Redis, or Redis being unreachable (then ``"scope"`` says ``"local"``).
        """
        stack = self._stack
        # The stack's parts are the Runtime that bound it (the engine names them by protocol).
        runtime = cast("Runtime | None", stack.runtime if stack is not None else None)
        recovery = runtime.recovery if runtime is not None else None
        pending = {"writes_pending": recovery.count(self.name) if recovery is not None else 0}
        if not local and stack is not None and stack.l2 is not None:
            sync = runtime.stats_sync if runtime is not None else None
            if sync is not None:
                try:
                    return {**sync.read(stack), **pending, "scope": "cluster"}
                except L2Unavailable:
                    pass
        return {**self.stats.snapshot(), **pending, "scope": "local"}

    def close(self) -> None:
        """Unregister this cache (its name can be declared again)."""
        registry.unregister(self.name)
        runtime = current_runtime(create=False)
        if runtime is not None:
            runtime.unbind(self.name)
        self._stack = None


@overload
def cache(
    name: str,
    *,
    value_type: type[V],
    tiers: Iterable[MemoryTier | RedisTier | Mapping[str, Any]] | None = None,
    ttl: Duration | None = None,
    stale_ttl: Duration = 0,
    stampede: Stampede | Mapping[str, Any] | None = None,
    strategy: Strategy = "fixed",
    resolver: Callable[[str], Any] | None = None,
    tags: TagsFunc | None = None,
    write_through: Callable[[str, Any], None] | None = None,
    miss: MissPolicy = "inline",
    codec: str = "json",
    max_size: int = 1000,
    max_value_bytes: int = 1 << 20,
    max_key_bytes: int = 200,
    max_tags: int = 32,
    early_refresh: float | None = None,
    clock: Callable[[], float] | None = None,
) -> Cache[V]: ...
@overload
def cache(
    name: str,
    *,
    tiers: Iterable[MemoryTier | RedisTier | Mapping[str, Any]] | None = None,
    ttl: Duration | None = None,
    stale_ttl: Duration = 0,
    stampede: Stampede | Mapping[str, Any] | None = None,
    strategy: Strategy = "fixed",
    resolver: Callable[[str], Any] | None = None,
    tags: TagsFunc | None = None,
    write_through: Callable[[str, Any], None] | None = None,
    miss: MissPolicy = "inline",
    codec: str = "json",
    max_size: int = 1000,
    max_value_bytes: int = 1 << 20,
    max_key_bytes: int = 200,
    max_tags: int = 32,
    early_refresh: float | None = None,
    clock: Callable[[], float] | None = None,
    value_type: None = None,
) -> Cache[Any]: ...
@overload
def cache(
    name: str,
    *,
    tiers: Iterable[MemoryTier | RedisTier | Mapping[str, Any]] | None = None,
    ttl: Duration | None = None,
    stale_ttl: Duration = 0,
    stampede: Stampede | Mapping[str, Any] | None = None,
    strategy: Strategy = "fixed",
    resolver: Callable[[str], Any] | None = None,
    tags: TagsFunc | None = None,
    write_through: Callable[[str, Any], None] | None = None,
    miss: MissPolicy = "inline",
    codec: str = "json",
    max_size: int = 1000,
    max_value_bytes: int = 1 << 20,
    max_key_bytes: int = 200,
    max_tags: int = 32,
    early_refresh: float | None = None,
    clock: Callable[[], float] | None = None,
    value_type: Any,
) -> Cache[Any]: ...
def cache(
    name: str,
    *,
    tiers: Iterable[MemoryTier | RedisTier | Mapping[str, Any]] | None = None,
    ttl: Duration | None = None,
    stale_ttl: Duration = 0,
    stampede: Stampede | Mapping[str, Any] | None = None,
    strategy: Strategy = "fixed",
    resolver: Callable[[str], Any] | None = None,
    tags: TagsFunc | None = None,
    write_through: Callable[[str, Any], None] | None = None,
    miss: MissPolicy = "inline",
    codec: str = "json",
    max_size: int = 1000,
    max_value_bytes: int = 1 << 20,
    max_key_bytes: int = 200,
    max_tags: int = 32,
    early_refresh: float | None = None,
    clock: Callable[[], float] | None = None,
    value_type: Any = None,
) -> Cache[Any]:
    """Declare a cache. Connects nothing: Redis is wired by :func:`oqron_cache.configure`.

    ``name`` is unique (workers find the cache by it). ``tiers`` is ``[MemoryTier, RedisTier]``
    (or one of them, or their dict forms); with ``tiers=None``, ``ttl`` builds both tiers. The
    freshness of a value is the last tier's ``ttl``; ``stale_ttl`` is how long past it a stale
    value may still be served while it is refreshed (physical expiry in Redis: ``ttl +
    stale_ttl``). ``strategy="sliding"`` resets freshness on each read. ``resolver(key)`` computes
    a missing value. ``tags(key, value)`` returns the entry's tags. ``codec`` is "json" (strict)
    or "msgpack". Values whose encoding exceeds ``max_value_bytes`` are returned, not cached.
    ``miss="worker"`` hands cold misses to a Celery worker and waits for its fill (for services
    that cannot compute values themselves; without a Celery app they load inline).
    ``early_refresh=beta`` (e.g. 1.0) turns on probabilistic early refresh (XFetch): hot keys
    are refreshed shortly before they go stale, more eagerly for slow resolvers and larger beta.
    ``clock`` (wall clock, seconds) is for tests. ``value_type=User`` stores and returns
    ``User`` objects (dataclasses, msgspec Structs, TypedDicts, NamedTuples, datetimes, UUIDs,
    Decimals, Enums, sets, containers of these, pydantic models; see ``core/typed.py``), each
    checked on the way in; the cache is then a ``Cache[User]`` for type checkers.
    """
    validate_cache_name(name)
    if strategy not in ("fixed", "sliding"):
        raise ConfigurationError(f"strategy must be 'fixed' or 'sliding'; got {strategy!r}")
    if miss not in ("inline", "worker"):
        raise ConfigurationError(f"miss must be 'inline' or 'worker'; got {miss!r}")
    if miss == "worker" and resolver is None:
        raise ConfigurationError("miss='worker' needs a resolver (the worker runs it)")
    beta = None
    if early_refresh is not None:
        if isinstance(early_refresh, bool) or not isinstance(early_refresh, int | float):
            raise TypeError(f"early_refresh must be a number (XFetch beta); got {early_refresh!r}")
        if math.isnan(early_refresh) or not 0 < early_refresh <= 100:
            raise ConfigurationError(f"early_refresh must be in (0, 100]; got {early_refresh!r}")
        beta = float(early_refresh)
    for label, fn in (
        ("resolver", resolver),
        ("tags", tags),
        ("write_through", write_through),
        ("clock", clock),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"{label} must be callable; got {type(fn).__name__}")
    l1, l2, fresh = resolve_tiers(tiers, ttl, positive_int(max_size, "max_size"))
    if stampede is None:
        stampede_opts = Stampede()
    elif isinstance(stampede, Stampede):
        stampede_opts = stampede
    elif isinstance(stampede, Mapping):
        stampede_opts = stampede_from_dict(stampede)
    else:
        raise TypeError(f"stampede must be a Stampede or a dict; got {type(stampede).__name__}")
    get_codec(codec)  # fail at declaration for an unknown codec or pickle
    check_value_type(value_type, f"cache {name!r}")
    options = CacheOptions(
        name=name,
        ttl=fresh,
        stale_ttl=parse_duration(stale_ttl, "stale_ttl", allow_zero=True),
        l1=l1,
        l2=l2,
        stampede=stampede_opts,
        strategy=strategy,
        resolver=resolver,
        tags=tags,
        write_through=write_through,
        miss=miss,
        codec=codec,
        max_value_bytes=positive_int(max_value_bytes, "max_value_bytes"),
        max_key_bytes=positive_int(max_key_bytes, "max_key_bytes", minimum=16),
        max_tags=_bounded(positive_int(max_tags, "max_tags"), "max_tags", 200),
        early_refresh=beta,
        value_type=value_type,
    )
    return Cache(options, clock)
