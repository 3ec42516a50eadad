"""``@refreshing_cache``: cache a function's results by its arguments.

The decorator runs at import time and only records options; the cache connects on first call
after :func:`oqron_cache.configure`. The key of a call is the typed encoding of its arguments
(:func:`oqron_cache.call_keys.encode_call`), so the resolver can be rebuilt from the key alone and a
worker (or the background refresher) can recompute any entry.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, cast, overload

from .core.durations import Duration, parse_duration
from .core.keys import decode_call, encode_call_ex
from .core.options import MemoryTier, MissPolicy, RedisTier, Stampede, Strategy, TagsFunc
from .core.typed import inferred_value_type
from .engine.steps import call_sync
from .frontend import Cache, cache

P = ParamSpec("P")
R = TypeVar("R")


class CachedFunction(Protocol[P, R]):
    """What ``@refreshing_cache`` returns: the function, plus its cache's controls."""

    cache: Cache[Any]
    original: Callable[P, R]
    __wrapped__: Callable[P, R]
    __name__: str
    __qualname__: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    # A plain function, so a decorated method binds like one: ``A().method()`` passes self. The
    # bound form is typed loosely (a ParamSpec cannot drop its first parameter); the controls
    # (``invalidate``, ``refresh``, ...) take self explicitly: ``A.method.invalidate(a, ...)``.
    @overload
    def __get__(
        self, instance: None, owner: type[Any] | None = None, /
    ) -> CachedFunction[P, R]: ...
    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Callable[..., R]: ...

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The cache key of a call with these arguments."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached result of this call from every tier and every process."""
        ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Recompute this call now, store the result everywhere and return it."""
        ...

    def get_stats(self, local: bool = False) -> dict[str, Any]:
        """The cache's stats (see :meth:`Cache.get_stats`)."""
        ...

    def ainvalidate(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[None]:
        """:meth:`invalidate` for asyncio code (an ``async def`` function's wrapper)."""
        ...

    def arefresh(self, *args: P.args, **kwargs: P.kwargs) -> Awaitable[Any]:
        """:meth:`refresh` for asyncio code (an ``async def`` function's wrapper)."""
        ...


class _Controls(Generic[P, R]):
    """The key encoding and controls behind one decorated function."""

    cache: Cache[Any]  # set right after the cache is declared (it needs self.resolve)

    def __init__(
        self,
        func: Callable[P, R],
        key: Callable[..., str] | None,
        vary_on: Callable[[], Any] | None,
    ) -> None:
        self.original = func
        self._key_func = key
        self._vary_on = vary_on
        self.qualname = callable_name(func)
        sig = self._signature = inspect.signature(func)
        self._params = tuple(
            p.name
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        self._params_set = frozenset(self._params)

    def key_for(self, *args: Any, **kwargs: Any) -> str:
        return self._key(args, kwargs)[0]

    def _key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, bool]:
        """The key of a call and whether it can be rebuilt into the call (for refreshes)."""
        if self._key_func is not None:
            key = self._key_func(*args, **kwargs)
            if not isinstance(key, str) or not key:
                raise TypeError(f"key= function of {self.qualname} must return a non-empty str")
            return "k" + key, False
        if self._vary_on is not None:
            varied: dict[str, Any] = {**kwargs, "__vary_on__": self._vary_on()}
            return encode_call_ex(self.qualname, self._params, args, varied)[0], False
        if kwargs and not self._params_set.isdisjoint(kwargs):
            # f(1) and f(x=1) are the same call: move named positional parameters into place.
            bound = self._signature.bind(*args, **kwargs)
            args, kwargs = bound.args, bound.kwargs
        key, rebuildable = encode_call_ex(self.qualname, self._params, args, kwargs)
        return key or "-", rebuildable

    def call(self, *args: Any, **kwargs: Any) -> R:
        """Run the original function, refusing results that cannot be cached as values."""
        return cast("R", self._plain(self.original(*args, **kwargs)))

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Await the original ``async def`` function (same refusals as :meth:`call`)."""
        return self._plain(await self.original(*args, **kwargs))  # type: ignore[misc]

    def _plain(self, result: Any) -> Any:
        if inspect.isawaitable(result) or inspect.isgenerator(result):
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"{self.qualname} returned a {type(result).__name__}; "
                "refreshing_cache caches plain values only"
            )
        return result

    def lookup(self, *args: Any, **kwargs: Any) -> R:
        key, rebuildable = self._key(args, kwargs)
        if not rebuildable:
            # The call cannot be rebuilt from the key (key=, vary_on, __cache_key__ objects):
            # compute on a miss; a stale entry is reloaded in the foreground.
            return self.cache.get_or_set(key, lambda: self.call(*args, **kwargs))  # type: ignore[no-any-return]
        return cast("R", self.cache.get(key))

    def resolve(self, key: str) -> Any:
        """Recompute the value of ``key`` from the key alone (background refresh, workers)."""
        args, kwargs = decode_call("" if key == "-" else key)
        return self.call(*args, **kwargs)

    async def aresolve(self, key: str) -> Any:
        """:meth:`resolve` of an ``async def`` function (a worker runs it on its own loop)."""
        args, kwargs = decode_call("" if key == "-" else key)
        return await self.acall(*args, **kwargs)

    async def alookup(self, *args: Any, **kwargs: Any) -> Any:
        key, rebuildable = self._key(args, kwargs)
        if not rebuildable:

            async def compute() -> Any:
                return await self.acall(*args, **kwargs)

            return await self.cache.aget_or_set(key, compute)
        return await self.cache.aget(key)

    async def ainvalidate(self, *args: Any, **kwargs: Any) -> None:
        await self.cache.adelete(self.key_for(*args, **kwargs))

    async def arefresh(self, *args: Any, **kwargs: Any) -> Any:
        value = await self.acall(*args, **kwargs)
        await self.cache.aset(self.key_for(*args, **kwargs), value)
        return value

    def refresh_sync(self, *args: Any, **kwargs: Any) -> Any:
        """:meth:`refresh` of an ``async def`` function from sync code (its own loop)."""
        value = call_sync(lambda _key: self.acall(*args, **kwargs), "")
        self.cache.set(self.key_for(*args, **kwargs), value)
        return value

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        self.cache.delete(self.key_for(*args, **kwargs))

    def refresh(self, *args: Any, **kwargs: Any) -> R:
        value = self.call(*args, **kwargs)
        self.cache.set(self.key_for(*args, **kwargs), value)
        return value

    def get_stats(self, local: bool = False) -> dict[str, Any]:
        return self.cache.get_stats(local=local)


def callable_name(func: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, a ``functools.partial`` or a callable object."""
    target = func.func if isinstance(func, functools.partial) else func
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{qualname}"


def _wrap(controls: _Controls[P, R]) -> CachedFunction[P, R]:
    """Build the wrapper function: a plain function (not an object) so a hit stays cheap."""
    cache_obj = controls.cache
    lookup = controls.lookup
    plain = controls._key_func is None and controls._vary_on is None
    resolver = cache_obj.options.resolver
    keys = _KeyMemo()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if plain and not kwargs and len(args) == 1 and type(args[0]) is str:
            # The commonest call shape, f("id"): the key encode_call makes, remembered.
            arg = args[0]
            key = keys.get(arg) or keys.make(arg)
            return (cache_obj._stack or cache_obj._bind()).get(key, resolver)
        return lookup(*args, **kwargs)

    return _controls_on(wrapper, controls)


class _KeyMemo(dict[str, str]):
    """The keys of the last calls ``f("id")``: a dict lookup instead of building the string.

    Bounded: past :data:`MEMO_SIZE` arguments it starts over (a key costs 100 ns to build).
    """

    def make(self, arg: str) -> str:
        if len(self) >= MEMO_SIZE:
            self.clear()
        key = self[arg] = f"s{len(arg)}:{arg}"  # what encode_call gives for one str argument
        return key


MEMO_SIZE = 4096


def _wrap_async(controls: _Controls[P, R]) -> CachedFunction[P, R]:
    """The wrapper of an ``async def`` function: an ``async def`` too, on the async front."""
    cache_obj = controls.cache
    alookup = controls.alookup
    plain = controls._key_func is None and controls._vary_on is None
    resolver = cache_obj.options.resolver
    keys = _KeyMemo()

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if plain and not kwargs and len(args) == 1 and type(args[0]) is str:
            arg = args[0]
            key = keys.get(arg) or keys.make(arg)
            return await (cache_obj._stack or cache_obj._bind()).aget(key, resolver)
        return await alookup(*args, **kwargs)

    wrapped = _controls_on(wrapper, controls)
    wrapper.refresh = controls.refresh_sync  # type: ignore[attr-defined]
    wrapper.ainvalidate = controls.ainvalidate  # type: ignore[attr-defined]
    wrapper.arefresh = controls.arefresh  # type: ignore[attr-defined]
    return wrapped


def _controls_on(wrapper: Callable[..., Any], controls: _Controls[P, R]) -> CachedFunction[P, R]:
    cache_obj = controls.cache
    functools.update_wrapper(wrapper, controls.original)
    wrapper.cache = cache_obj  # type: ignore[attr-defined]
    wrapper.original = controls.original  # type: ignore[attr-defined]
    wrapper.key_for = controls.key_for  # type: ignore[attr-defined]
    wrapper.invalidate = controls.invalidate  # type: ignore[attr-defined]
    wrapper.refresh = controls.refresh  # type: ignore[attr-defined]
    wrapper.get_stats = controls.get_stats  # type: ignore[attr-defined]
    return cast("CachedFunction[P, R]", wrapper)


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
    miss: MissPolicy = "inline",
    early_refresh: float | None = None,
    clock: Callable[[], float] | None = None,
    value_type: Any = None,
) -> Callable[[Callable[P, R]], CachedFunction[P, R]]:
    """Cache a function's results; stale results are served while refreshed in the background.

    ``name`` defaults to ``module.qualname``. ``stale_ttl`` defaults to ``ttl``. ``key`` replaces
    the argument encoding (entries keyed this way are recomputed only by the process that saw the
    call). ``vary_on()`` is called on each call and becomes part of the key: use it when the
    result depends on context that is not an argument (the current user or tenant).

    ``miss`` and ``early_refresh`` are as for :func:`oqron_cache.cache`. ``value_type`` too,
    and without it the return annotation is taken when plain JSON would not give it back
    (``-> User`` for a dataclass ``User``, ``-> list[Order]``, ``-> datetime``); ``-> dict``
    and other JSON types keep the strict JSON codec.

    An ``async def`` function gives an ``async def`` wrapper (awaited on the async front,
    with ``.ainvalidate(...)`` and ``.arefresh(...)``); workers and the background refresher
    run it on an event loop of their own.

    Trap: a method's ``self`` is an argument; it needs ``__cache_key__()`` (or use ``key=``).
    Generators and async generators are refused.
    """

    def decorate(func: Callable[P, R]) -> CachedFunction[P, R]:
        if not callable(func):
            raise TypeError(f"refreshing_cache decorates functions; got {type(func).__name__}")
        label = callable_name(func)
        for option, given in (("key", key), ("vary_on", vary_on)):
            if given is not None and not callable(given):
                raise TypeError(
                    f"refreshing_cache {option}= must be callable; got {type(given).__name__} "
                    f"(decorating {label})"
                )
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"{label} is a generator function; caching it would cache a generator object"
            )
        is_async = inspect.iscoroutinefunction(func)
        cache_name = name or label.replace("<", "").replace(">", "")
        # ttl first, under its own name: a bad ttl must not be reported as a bad stale_ttl.
        fresh = parse_duration(ttl, "ttl") if ttl is not None else None
        if stale_ttl is not None:
            stale = parse_duration(stale_ttl, "stale_ttl", allow_zero=True)
        else:
            stale = fresh if fresh is not None else 0.0
        # Everything that can fail about the function itself fails before the name is taken.
        controls = _Controls(func, key, vary_on)
        typed = value_type if value_type is not None else inferred_value_type(func)

        cache_obj = cache(
            cache_name,
            tiers=tiers,
            ttl=fresh if tiers is None else None,
            stale_ttl=stale,
            stampede=stampede,
            strategy=strategy,
            tags=tags,
            codec=codec,
            max_size=max_size,
            max_value_bytes=max_value_bytes,
            miss=miss,
            early_refresh=early_refresh,
            clock=clock,
            resolver=controls.aresolve if is_async else controls.resolve,
            value_type=typed,
        )
        controls.cache = cache_obj
        return _wrap_async(controls) if is_async else _wrap(controls)

    return decorate
