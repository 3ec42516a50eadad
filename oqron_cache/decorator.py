"""``@refreshing_cache``: cache a function's results by its arguments.

The decorator runs at import time and only records options; the cache connects on first call
after :func:`oqron_cache.configure`. The key of a call is the typed encoding of its arguments
(:func:`oqron_cache.keys.encode_call`), so the resolver can be rebuilt from the key alone and a
worker (or the background refresher) can recompute any entry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar

from .durations import Duration, parse_duration
from .frontend import Cache, cache
from .keys import decode_call, encode_call
from .options import MemoryTier, RedisTier, Stampede, Strategy, TagsFunc

P = ParamSpec("P")
R = TypeVar("R")


class CachedFunction(Generic[P, R]):
    """A function whose results are cached; call it like the original."""

    def __init__(
        self,
        func: Callable[P, R],
        cache_obj: Cache,
        key: Callable[..., str] | None,
        vary_on: Callable[[], Any] | None,
    ) -> None:
        self.__wrapped__ = func
        self.original = func
        self.cache = cache_obj
        self._key_func = key
        self._vary_on = vary_on
        self._qualname = f"{func.__module__}.{func.__qualname__}"
        sig = inspect.signature(func)
        self._params = tuple(
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        functools.update_wrapper(self, func)

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of a call with these arguments."""
        if self._key_func is not None:
            key = self._key_func(*args, **kwargs)
            if not isinstance(key, str) or not key:
                raise TypeError(f"key= function of {self._qualname} must return a non-empty str")
            return "k" + key
        if self._vary_on is not None:
            varied: dict[str, Any] = {**kwargs, "__vary_on__": self._vary_on()}
            return encode_call(self._qualname, self._params, args, varied)
        return encode_call(self._qualname, self._params, args, kwargs) or "-"

    def _call(self, *args: Any, **kwargs: Any) -> R:
        result = self.original(*args, **kwargs)
        if inspect.isawaitable(result) or inspect.isgenerator(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"{self._qualname} returned a {type(result).__name__}; "
                "refreshing_cache caches plain values only"
            )
        return result

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self.key_for(*args, **kwargs)
        value: R = (
            self.cache.get_or_set(key, lambda: self._call(*args, **kwargs))
            if self._key_func is not None or self._vary_on is not None
            else self.cache.get(key)
        )
        return value

    def _resolve(self, key: str) -> Any:
        """Recompute the value of ``key`` from the key alone (background refresh, workers)."""
        args, kwargs = decode_call("" if key == "-" else key)
        return self._call(*args, **kwargs)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached result of this call from every tier and every process."""
        self.cache.delete(self.key_for(*args, **kwargs))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Recompute this call now, store the result everywhere and return it."""
        value = self._call(*args, **kwargs)
        self.cache.set(self.key_for(*args, **kwargs), value)
        return value

    def get_stats(self, local: bool = True) -> dict[str, Any]:
        """The cache's stats (see :meth:`Cache.get_stats`)."""
        return self.cache.get_stats(local=local)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        return functools.partial(self, instance)


def refreshing_cache(
    ttl: Duration | None = None,
    stale_ttl: Duration | None = None,
    max_size: int = 1000,
    *,
    name: str | None = None,
    tiers: Iterable[MemoryTier | RedisTier | Mapping[str, Any]] | None = None,
    stampede: Stampede | Mapping[str, Any] | None = None,
    strategy: Strategy = "fixed",
    tags: TagsFunc | None = None,
    codec: str = "json",
    key: Callable[..., str] | None = None,
    vary_on: Callable[[], Any] | None = None,
    max_value_bytes: int = 1 << 20,
    clock: Callable[[], float] | None = None,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache a function's results; stale results are served while refreshed in the background.

    ``name`` defaults to ``module.qualname``. ``stale_ttl`` defaults to ``ttl``. ``key`` replaces
    the argument encoding (entries keyed this way are recomputed only by the process that saw the
    call). ``vary_on()`` is called on each call and becomes part of the key: use it when the
    result depends on context that is not an argument (the current user or tenant).

    Trap: a method's ``self`` is an argument; it needs ``__cache_key__()`` (or use ``key=``).
    Generators and ``async def`` functions are refused.
    """

    def decorate(func: Callable[P, R]) -> CachedFunction[P, R]:
        if not callable(func):
            raise TypeError(f"refreshing_cache decorates functions; got {type(func).__name__}")
        label = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', '?')}"
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"{label} is a generator function; caching it would cache a generator object"
            )
        if inspect.iscoroutinefunction(func):
            raise TypeError(f"{label} is async; refreshing_cache supports sync functions only")
        cache_name = name or label.replace("<", "").replace(">", "")
        stale = (
            parse_duration(ttl if stale_ttl is None else stale_ttl, "stale_ttl", allow_zero=True)
            if (ttl is not None or stale_ttl is not None)
            else 0
        )
        holder: dict[str, CachedFunction[P, R]] = {}

        def resolve(key: str) -> Any:
            # Bound late: the CachedFunction is built after its cache.
            return holder["f"]._resolve(key)

        cache_obj = cache(
            cache_name,
            tiers=tiers,
            ttl=ttl if tiers is None else None,
            stale_ttl=stale,
            stampede=stampede,
            strategy=strategy,
            tags=tags,
            codec=codec,
            max_size=max_size,
            max_value_bytes=max_value_bytes,
            clock=clock,
            resolver=resolve,
        )
        wrapped = CachedFunction(func, cache_obj, key, vary_on)
        holder["f"] = wrapped
        return wrapped

    return decorate
