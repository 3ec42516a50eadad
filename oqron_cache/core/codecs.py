"""Codecs for values in L2 and in messages: strict JSON by default, msgpack as an option.

A codec must give back a value *equal to and of the same types as* what it was given, so that L1
(which keeps the Python object) and L2 (which keeps bytes) always return equal values. JSON would
silently turn a tuple into a list, ``{1: "a"}`` into ``{"1": "a"}`` and write ``NaN``; the strict
JSON codec refuses those with a :class:`SerializationError` (a ``TypeError``) naming the type and
the function that returned it. Pickle is never used.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol

import msgspec

from .errors import ConfigurationError, SerializationError

_MAX_DEPTH = 100
_fast_json = msgspec.json.Decoder().decode
_fast_json_encode = msgspec.json.Encoder().encode


class Codec(Protocol):
    """Encodes values to bytes and back. ``codec_id`` is stored in each envelope (1..15)."""

    name: str
    codec_id: int

    def encode(self, value: Any, origin: str) -> bytes:
        """Return the bytes of ``value``; raise :class:`SerializationError` naming ``origin``."""
        ...

    def decode(self, data: bytes | memoryview) -> Any:
        """Return the value encoded in ``data``; raise ``ValueError`` if it is not valid."""
        ...

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        """Decode an L2 entry's payload written by codec ``codec_id``; ``ValueError`` if this
        codec cannot read that id (the read path treats it as a bad entry: a miss)."""
        ...


def _check(value: Any, origin: str, codec: str, *, int_keys: bool, allow_bytes: bool) -> None:
    """Walk ``value`` and raise if it holds anything the codec would not return unchanged."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        cls = type(item)
        if cls is str or cls is int or cls is bool or item is None:
            continue
        if cls is float:
            if math.isnan(item) or math.isinf(item):
                raise SerializationError(
                    f"value returned by {origin} contains {item!r}, which codec {codec!r} "
                    "cannot store faithfully",
                    cache=origin,
                )
            continue
        if depth > _MAX_DEPTH:
            raise SerializationError(
                f"value returned by {origin} is nested deeper than {_MAX_DEPTH} levels",
                cache=origin,
            )
        if cls is list:
            stack.extend((x, depth + 1) for x in item)
        elif cls is dict:
            for key, sub in item.items():
                if type(key) is not str and not (int_keys and type(key) is int):
                    raise SerializationError(
                        f"value returned by {origin} has a dict key of type "
                        f"{type(key).__name__}, which codec {codec!r} would change; use str keys "
                        "or register a codec",
                        cache=origin,
                    )
                stack.append((sub, depth + 1))
        elif cls is bytes and allow_bytes:
            continue
        else:
            raise SerializationError(
                f"value of type {cls.__name__} returned by {origin} is not serializable by "
                f"codec {codec!r}; convert it (tuple -> list, set -> sorted list, Decimal -> str) "
                "or register a codec",
                cache=origin,
            )


class JsonCodec:
    """Strict JSON: str/int/float/bool/None, lists and str-keyed dicts; no NaN or infinity."""

    name = "json"
    codec_id = 1

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False
        )

    def encode(self, value: Any, origin: str) -> bytes:
        _check(value, origin, self.name, int_keys=False, allow_bytes=False)
        try:
            return _fast_json_encode(value)  # what the walk let through, msgspec writes as is
        except (UnicodeEncodeError, OverflowError):
            # surrogatepass: a str with a lone surrogate is a valid Python str and must
            # round-trip; msgspec refuses it (and, in old releases, ints past 64 bits), the
            # stdlib writes both.
            return self._encoder.encode(value).encode("utf-8", "surrogatepass")

    def decode(self, data: bytes | memoryview) -> Any:
        try:
            return _fast_json(data)  # msgspec: the same values as json.loads, 4x faster
        except (ValueError, msgspec.DecodeError):  # lone surrogates (not UTF-8), not JSON at
            # all (msgspec's DecodeError is a ValueError only from 0.19 on)
            return json.loads(bytes(data).decode("utf-8", "surrogatepass"))

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        # Typed JSON (id 3, value_type=) is JSON too: read as plain values (a rolling upgrade).
        if codec_id not in {1, 3}:
            raise ValueError(f"codec id {codec_id}")
        return self.decode(data)


class MsgpackCodec:
    """msgpack: like JSON plus ``bytes`` values and int dict keys, both returned unchanged."""

    name = "msgpack"
    codec_id = 2

    def __init__(self) -> None:
        try:
            import msgpack
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                "codec 'msgpack' needs the msgpack package: pip install 'oqron-cache[msgpack]'"
            ) from exc
        self._msgpack = msgpack

    def encode(self, value: Any, origin: str) -> bytes:
        _check(value, origin, self.name, int_keys=True, allow_bytes=True)
        try:
            data: bytes = self._msgpack.packb(
                value, use_bin_type=True, unicode_errors="surrogatepass"
            )
        except OverflowError:
            raise SerializationError(
                f"value returned by {origin} holds an int outside msgpack's 64-bit range",
                cache=origin,
            ) from None
        return data

    def decode(self, data: bytes | memoryview) -> Any:
        return self._msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True, unicode_errors="surrogatepass"
        )

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        # Typed msgpack (id 4, value_type=) is msgpack too: read as plain values.
        if codec_id not in {2, 4}:
            raise ValueError(f"codec id {codec_id}")
        return self.decode(data)


_CODECS: dict[str, type[JsonCodec] | type[MsgpackCodec]] = {
    "json": JsonCodec,
    "msgpack": MsgpackCodec,
}


def get_codec(name: object) -> Codec:
    """Return the codec called ``name`` ("json" or "msgpack"); "pickle" is refused."""
    if not isinstance(name, str):
        raise TypeError(f"codec must be 'json' or 'msgpack'; got {type(name).__name__}")
    if name == "pickle":
        raise ConfigurationError(
            "codec 'pickle' is not allowed (remote code execution); use 'json' or 'msgpack'"
        )
    try:
        return _CODECS[name]()
    except KeyError:
        raise ConfigurationError(f"unknown codec {name!r}; use 'json' or 'msgpack'") from None
