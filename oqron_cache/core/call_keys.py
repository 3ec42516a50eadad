"""Call keys: a decorated function's arguments to the ``str`` key of its cache, and back.

:func:`encode_call` is typed and length-prefixed (netstring-like), so ``f(1)``, ``f(True)`` and
``f(1.0)`` differ, and ``f("a:b", "c")`` differs from ``f("a", "b:c")``. Arguments with no stable
encoding (objects whose identity is their address, lambdas, files) are refused with a
``TypeError`` naming them. :func:`decode_call` rebuilds the arguments from a key, so a worker can
refresh an entry from its key alone (not for keys holding ``__cache_key__`` objects or enums).

The ``str`` key is then turned into Redis keys by :class:`oqron_cache.keys.KeySpace`.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .errors import InvalidKeyError


class _Unstable(Exception):
    pass


class _Parts(list[str]):
    """Encoded parts, plus whether the key can be decoded back into arguments."""

    opaque = False


def _enc(value: Any, out: list[str]) -> None:
    """Append the typed, length-prefixed encoding of ``value`` to ``out``."""
    cls = type(value)
    if cls is str:
        out.append(f"s{len(value)}:{value}")
    elif cls is int:
        text = format(value, "x")  # hex: no digit limit (str() refuses > 4300 digits)
        out.append(f"i{len(text)}:{text}")
    elif cls is bool:
        out.append("T" if value else "F")
    elif value is None:
        out.append("N")
    elif cls is float:
        text = repr(value)
        out.append(f"f{len(text)}:{text}")
    elif cls is bytes:
        text = value.hex()
        out.append(f"b{len(text)}:{text}")
    elif cls is tuple or cls is list:
        out.append(f"{'t' if cls is tuple else 'l'}{len(value)}(")
        for item in value:
            _enc(item, out)
        out.append(")")
    elif cls is frozenset or cls is set:
        parts = []
        for item in value:
            sub = _Parts()
            _enc(item, sub)
            if sub.opaque:
                _mark_opaque(out)
            parts.append("".join(sub))
        parts.sort()
        out.append(f"z{len(parts)}(" + "".join(parts) + ")")
    elif cls is dict:
        items = []
        for k, v in value.items():
            sub = _Parts()
            _enc(k, sub)
            _enc(v, sub)
            if sub.opaque:
                _mark_opaque(out)
            items.append("".join(sub))
        items.sort()
        out.append(f"d{len(items)}(" + "".join(items) + ")")
    elif hasattr(value, "__cache_key__"):
        inner = value.__cache_key__()
        _mark_opaque(out)
        name = f"{cls.__module__}.{cls.__qualname__}"
        out.append(f"o{len(name)}:{name}")
        _enc(inner, out)
    elif isinstance(value, enum.Enum):
        _mark_opaque(out)
        name = f"{cls.__module__}.{cls.__qualname__}"
        out.append(f"e{len(name)}:{name}")
        _enc(value.name, out)
    elif cls in _SCALARS:
        text = str(value)
        tag = _SCALARS[cls]
        out.append(f"{tag}{len(text)}:{text}")
    else:
        raise _Unstable(cls.__name__)


def _mark_opaque(out: list[str]) -> None:
    if isinstance(out, _Parts):
        out.opaque = True


_SCALARS: Mapping[type, str] = {
    decimal.Decimal: "D",
    uuid.UUID: "U",
    _dt.datetime: "W",
    _dt.date: "Y",
    _dt.time: "H",
    _dt.timedelta: "R",
}


def encode_call(
    func_name: str, params: tuple[str, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> str:
    """Encode a call's arguments as a key; ``params`` names the positional parameters.

    Raises :class:`InvalidKeyError` (a ``TypeError``) naming the argument that has no stable
    encoding.
    """
    return encode_call_ex(func_name, params, args, kwargs)[0]


def encode_call_ex(
    func_name: str, params: tuple[str, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[str, bool]:
    """Like :func:`encode_call`, also saying whether :func:`decode_call` can rebuild the call
    (False when an argument is a ``__cache_key__`` object or an enum)."""
    out = _Parts()
    for index, value in enumerate(args):
        try:
            _enc(value, out)
        except _Unstable as exc:
            name = params[index] if index < len(params) else f"#{index}"
            raise _unstable_error(func_name, name, str(exc)) from None
    if kwargs:
        out.append("|")
        for name in sorted(kwargs):
            out.append(f"k{len(name)}:{name}")
            try:
                _enc(kwargs[name], out)
            except _Unstable as exc:
                raise _unstable_error(func_name, name, str(exc)) from None
    return "".join(out), not out.opaque


def _unstable_error(func_name: str, arg: str, type_name: str) -> InvalidKeyError:
    return InvalidKeyError(
        f"argument {arg!r} of {func_name} has type {type_name}, which has no stable cache key; "
        "pass key=... to the decorator or implement __cache_key__()",
        cache=func_name,
    )


KeyFunc = Callable[..., str]


class _Reader:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def sized(self) -> str:
        colon = self.text.index(":", self.pos)
        size = int(self.text[self.pos : colon])
        start = colon + 1
        self.pos = start + size
        if size < 0 or self.pos > len(self.text):
            raise ValueError("truncated key encoding")
        return self.text[start : self.pos]

    def count(self) -> int:
        paren = self.text.index("(", self.pos)
        size = int(self.text[self.pos : paren])
        self.pos = paren + 1
        return size

    def close(self) -> None:
        if self.text[self.pos] != ")":
            raise ValueError("bad key encoding")
        self.pos += 1


def _dec(r: _Reader) -> Any:
    tag = r.text[r.pos]
    r.pos += 1
    simple: dict[str, Any] = {"T": True, "F": False, "N": None}
    if tag in simple:
        return simple[tag]
    if tag == "s":
        return r.sized()
    if tag == "i":
        return int(r.sized(), 16)
    if tag == "f":
        return float(r.sized())
    if tag == "b":
        return bytes.fromhex(r.sized())
    if tag in "tlzd":
        n = r.count()
        if tag == "d":
            pairs = [(_dec(r), _dec(r)) for _ in range(n)]
            r.close()
            return dict(pairs)
        items = [_dec(r) for _ in range(n)]
        r.close()
        return tuple(items) if tag == "t" else items if tag == "l" else frozenset(items)
    decoders: dict[str, Callable[[str], Any]] = {
        "D": decimal.Decimal,
        "U": uuid.UUID,
        "W": _dt.datetime.fromisoformat,
        "Y": _dt.date.fromisoformat,
        "H": _dt.time.fromisoformat,
        "R": _parse_timedelta,
    }
    if tag in decoders:
        return decoders[tag](r.sized())
    raise ValueError(f"key holds an argument of a kind that cannot be rebuilt ({tag!r})")


def _parse_timedelta(text: str) -> _dt.timedelta:
    days = 0
    if " day" in text:
        day_part, text = text.split(", ")
        days = int(day_part.split(" ")[0])
    hours, minutes, seconds = text.split(":")
    return _dt.timedelta(days=days, hours=int(hours), minutes=int(minutes), seconds=float(seconds))


def decode_call(key: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rebuild ``(args, kwargs)`` from a key made by :func:`encode_call`.

    Works for keys made of builtin scalars, containers, Decimal, UUID and date/time values; raises
    ``ValueError`` for keys holding ``__cache_key__`` objects or enums (those can be refreshed only
    by a process that saw the call). Sets come back as frozensets.
    """
    try:
        return _decode_call(key)
    except (IndexError, KeyError) as exc:
        raise ValueError(f"bad key encoding: {exc}") from None


def _decode_call(key: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    r = _Reader(key)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    while r.pos < len(key) and key[r.pos] != "|":
        args.append(_dec(r))
    if r.pos < len(key):
        r.pos += 1
        while r.pos < len(key):
            if key[r.pos] != "k":
                raise ValueError("bad key encoding")
            r.pos += 1
            name = r.sized()
            kwargs[name] = _dec(r)
    return tuple(args), kwargs
