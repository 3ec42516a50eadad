"""Typed, frozen option objects: the tiers, stampede protection and a cache's resolved options.

These are what users write (``MemoryTier(max_size=1000, ttl="30s")``) and what the library passes
around; they validate on construction, so a bad option fails where it is written. The seed's dict
forms (``{"adapter": "memory", ...}``, ``{"lock_ttl_ms": 5000, ...}``) are converted by
:func:`tier_from_dict` and :func:`stampede_from_dict`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .durations import Duration, parse_duration, positive_int
from .errors import ConfigurationError

Strategy = Literal["fixed", "sliding"]
MissPolicy = Literal["inline", "worker"]


@dataclass(frozen=True, slots=True, init=False)
class MemoryTier:
    """L1: an in-process LRU (cachetools) bounded by ``max_size`` entries.

    ``ttl`` bounds how long this process keeps its copy before looking at the tier below again;
    it does not make a value fresh for longer than the last tier's ``ttl``. When the memory tier is
    the only tier, its ``ttl`` is the freshness. ``None`` means "as long as the value is fresh".
    """

    max_size: int
    ttl: float | None

    def __init__(self, max_size: int = 1000, ttl: Duration | None = None) -> None:
        object.__setattr__(self, "max_size", positive_int(max_size, "MemoryTier max_size"))
        object.__setattr__(
            self, "ttl", None if ttl is None else parse_duration(ttl, "MemoryTier ttl")
        )


@dataclass(frozen=True, slots=True, init=False)
class RedisTier:
    """L2: the shared Redis tier. Its ``ttl`` is the entries' freshness when it is the last tier.

    Timeouts of Redis calls are set once for the process by ``configure(op_timeout=...)``.
    """

    ttl: float | None

    def __init__(self, ttl: Duration | None = None) -> None:
        object.__setattr__(
            self, "ttl", None if ttl is None else parse_duration(ttl, "RedisTier ttl")
        )


Tier = MemoryTier | RedisTier


@dataclass(frozen=True, slots=True, init=False)
class Stampede:
    """Stampede protection: single-flight on cold misses and stale-while-revalidate.

    ``lock_ttl`` is how long one process may hold a key's fill/refresh lock; a waiter whose wait
    passes it computes the value itself (liveness beats dedup), and a crashed holder delays others
    by at most this much.
    """

    enabled: bool
    lock_ttl: float
    stale_while_revalidate: bool

    def __init__(
        self, enabled: bool = True, lock_ttl: Duration = "5s", stale_while_revalidate: bool = True
    ) -> None:
        _check_bool(enabled, "Stampede enabled")
        _check_bool(stale_while_revalidate, "Stampede stale_while_revalidate")
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "lock_ttl", parse_duration(lock_ttl, "Stampede lock_ttl"))
        object.__setattr__(self, "stale_while_revalidate", stale_while_revalidate)


def _check_bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")


def _only(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ConfigurationError(
            f"{what}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )


def tier_from_dict(data: Mapping[str, Any]) -> Tier:
    """Convert the seed's dict form of a tier (``adapter`` "memory" or "redis")."""
    _only(data, {"name", "adapter", "max_size", "ttl"}, "tier")
    adapter = data.get("adapter", data.get("name"))
    if adapter == "memory":
        _only(data, {"name", "adapter", "max_size", "ttl"}, "memory tier")
        return MemoryTier(max_size=data.get("max_size", 1000), ttl=data.get("ttl"))
    if adapter == "redis":
        _only(data, {"name", "adapter", "ttl"}, "redis tier")
        return RedisTier(ttl=data.get("ttl"))
    raise ConfigurationError(f"tier adapter must be 'memory' or 'redis'; got {adapter!r}")


def stampede_from_dict(data: Mapping[str, Any]) -> Stampede:
    """Convert the seed's dict form (``lock_ttl_ms`` in milliseconds, or ``lock_ttl``)."""
    _only(data, {"enabled", "lock_ttl", "lock_ttl_ms", "stale_while_revalidate"}, "stampede")
    if "lock_ttl_ms" in data and "lock_ttl" in data:
        raise ConfigurationError("stampede: give lock_ttl or lock_ttl_ms, not both")
    lock_ttl: Duration = data.get("lock_ttl", "5s")
    if "lock_ttl_ms" in data:
        ms = data["lock_ttl_ms"]
        if isinstance(ms, bool) or not isinstance(ms, int | float):
            raise TypeError(f"stampede lock_ttl_ms must be a number; got {type(ms).__name__}")
        lock_ttl = parse_duration(ms, "stampede lock_ttl_ms") / 1000.0
    return Stampede(
        enabled=data.get("enabled", True),
        lock_ttl=lock_ttl,
        stale_while_revalidate=data.get("stale_while_revalidate", True),
    )


TagsFunc = Callable[[str, Any], Iterable[str]]


@dataclass(frozen=True, slots=True)
class CacheOptions:
    """Everything a cache was declared with, validated and normalised (durations in seconds)."""

    name: str
    ttl: float  # freshness: the last tier's ttl
    stale_ttl: float  # how long past ttl a stale value may still be served
    l1: MemoryTier | None
    l2: RedisTier | None
    stampede: Stampede
    strategy: Strategy
    resolver: Callable[[str], Any] | None
    tags: TagsFunc | None
    write_through: Callable[[str, Any], None] | None
    miss: MissPolicy
    codec: str
    max_value_bytes: int
    max_key_bytes: int
    max_tags: int = 32
    early_refresh: float | None = None  # XFetch beta; None = off
    value_type: Any = None  # typed values (core/typed.py); None = plain JSON/msgpack values
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def l1_ttl(self) -> float:
        """How long L1 keeps a copy before looking below (never longer than freshness)."""
        if self.l1 is None or self.l1.ttl is None:
            return self.ttl
        return min(self.l1.ttl, self.ttl)


def resolve_tiers(
    tiers: Iterable[Tier | Mapping[str, Any]] | None, ttl: Duration | None, max_size: int
) -> tuple[MemoryTier | None, RedisTier | None, float]:
    """Turn the ``tiers=`` argument (or ``ttl=`` alone) into (L1, L2, freshness ttl)."""
    if tiers is None:
        if ttl is None:
            raise ConfigurationError(
                "cache needs ttl=... or tiers=[...] (the freshness of a value)"
            )
        seconds = parse_duration(ttl, "ttl")
        return MemoryTier(max_size=max_size, ttl=seconds), RedisTier(ttl=seconds), seconds
    if isinstance(tiers, Mapping | str | bytes):
        raise TypeError("tiers must be a list of MemoryTier/RedisTier (or their dict forms)")
    parsed: list[Tier] = []
    for tier in tiers:
        if isinstance(tier, MemoryTier | RedisTier):
            parsed.append(tier)
        elif isinstance(tier, Mapping):
            parsed.append(tier_from_dict(tier))
        else:
            raise TypeError(
                f"tiers: expected MemoryTier, RedisTier or a dict; got {type(tier).__name__}"
            )
    if not parsed:
        raise ConfigurationError("tiers must hold at least one tier")
    l1 = [t for t in parsed if isinstance(t, MemoryTier)]
    l2 = [t for t in parsed if isinstance(t, RedisTier)]
    if len(l1) > 1 or len(l2) > 1 or (l1 and l2 and parsed[0] is not l1[0]):
        raise ConfigurationError(
            "tiers must be [MemoryTier, RedisTier], [MemoryTier] or [RedisTier]"
        )
    last = parsed[-1]
    fresh = (
        last.ttl if last.ttl is not None else (None if ttl is None else parse_duration(ttl, "ttl"))
    )
    if fresh is None:
        raise ConfigurationError("the last tier needs a ttl (it is the freshness of a value)")
    if ttl is not None and parse_duration(ttl, "ttl") != fresh:
        raise ConfigurationError("ttl= disagrees with the last tier's ttl; give one of them")
    mem = l1[0] if l1 else None
    if mem is not None and mem.ttl is not None and l2 and mem.ttl > fresh:
        warnings.warn(
            f"MemoryTier ttl ({mem.ttl}s) is longer than the freshness ({fresh}s); "
            "L1 keeps a copy at most until it stops being fresh",
            stacklevel=3,
        )
    return mem, (l2[0] if l2 else None), fresh
