"""Parsing and validation of durations and other numeric options.

A duration is ``"250ms"``, ``"30s"``, ``"10m"``, ``"2h"``, ``"1d"``, a ``timedelta`` or a number of
seconds. ``bool`` is refused even though it is an ``int``; ``0``, negatives, NaN and infinity are
refused; a bare numeric string such as ``"60"`` is refused because its unit is ambiguous.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

from .errors import ConfigurationError

Duration = str | int | float | timedelta

MAX_SECONDS = 100 * 365 * 86400.0
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


def parse_duration(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a number of seconds, or raise naming the parameter ``name``.

    Raises ``TypeError`` for a value of the wrong type (including ``bool`` and ``None``) and
    :class:`ConfigurationError` (a ``ValueError``) for zero, negative, NaN, infinite or unparsable
    values. ``allow_zero`` admits exactly ``0`` (used by ``stale_ttl``, where 0 means "no stale
    window").
    """
    if isinstance(value, bool) or value is None:
        raise TypeError(
            f"{name} must be a duration such as '30s', a timedelta or seconds; got {value!r}"
        )
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if match is None:
            raise ConfigurationError(
                f"{name}={value!r} is not a duration; use a number with a unit: "
                "'250ms', '30s', '10m', '2h' or '1d'"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise TypeError(
            f"{name} must be a duration such as '30s', a timedelta or seconds; "
            f"got {type(value).__name__}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ConfigurationError(f"{name} must be finite; got {value!r}")
    if seconds > MAX_SECONDS:
        raise ConfigurationError(
            f"{name}={value!r} is longer than {MAX_SECONDS:.0f}s (100 years): Redis TTLs "
            "cannot hold it"
        )
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be {bound}; got {value!r}")
    return seconds


def positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) of at least ``minimum``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be >= {minimum}; got {value!r}")
    return value
