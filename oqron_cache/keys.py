"""Key encoding: decorated-function arguments to cache keys, cache keys to Redis keys.

Two encodings live here and nowhere else:

* :func:`encode_call` turns a call's arguments into the ``str`` key of a decorated function's cache.
  It is typed and length-prefixed (netstring-like), so ``f(1)``, ``f(True)`` and ``f(1.0)`` differ,
  and ``f("a:b", "c")`` differs from ``f("a", "b:c")``. Arguments with no stable encoding (objects
  whose identity is their address, lambdas, files) are refused with a ``TypeError`` naming them.
* :class:`KeySpace` turns a cache's ``str`` key into its Redis keys. Layout (DESIGN section 7)::

      oqron:<namespace>:{<cache>:<escaped key>}:<part>

  The escaped key percent-encodes ``%``, braces, glob characters, ``#``, whitespace, control
  characters and non-ASCII, so it contains no brace (the hash tag always ends where we put it), no
  glob character (SCAN MATCH patterns built from it are literal) and stays readable for plain keys.
  Encoded keys longer than ``max_key_bytes`` are replaced by ``#`` + the full SHA-256 of the key;
  ``#`` never appears unescaped in an ordinary key, so the two forms cannot collide.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import hashlib
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from .errors import ConfigurationError, InvalidKeyError

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Cache names may be dotted paths with qualnames (decorated functions: "mod.Class.method").
CACHE_NAME_RE = re.compile(r"^[A-Za-z0-9_.<>-]{1,200}$")

# Characters kept as they are in a Redis key: printable ASCII minus the ones with a meaning to us
# (hash-tag braces, glob syntax, escape and hash markers, the part separator is fine after '}').
_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%{}*?[]\\#")


def validate_namespace(namespace: object) -> str:
    """Return ``namespace`` if it matches ``[A-Za-z0-9_.-]{1,64}``, else raise."""
    if not isinstance(namespace, str):
        raise TypeError(f"namespace must be a str; got {type(namespace).__name__}")
    if not NAMESPACE_RE.fullmatch(namespace):
        raise ConfigurationError(f"namespace must match [A-Za-z0-9_.-]{{1,64}}; got {namespace!r}")
    return namespace


def validate_cache_name(name: object) -> str:
    """Return ``name`` if it is a usable cache name, else raise naming the parameter."""
    if not isinstance(name, str):
        raise TypeError(f"cache name must be a str; got {type(name).__name__}")
    if not CACHE_NAME_RE.fullmatch(name):
        raise ConfigurationError(f"cache name must match [A-Za-z0-9_.<>-]{{1,200}}; got {name!r}")
    return name


def escape(text: str) -> str:
    """Percent-encode ``text`` so it holds no brace, glob character, ``#``, space or non-ASCII."""
    if all(ch in _SAFE for ch in text):
        return text
    out: list[str] = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


class Glob:
    """A user's glob over the keys of one cache: ``*``, ``?``, ``[abc]``/``[^a-z]``, ``\\x``.

    Keys are stored escaped (a space is ``%20``), so a ``?`` cannot be expressed in Redis's own
    glob over the escaped form. ``scan`` is therefore a SCAN MATCH fragment that matches a
    superset (``?`` and classes widen to ``*``; literal text is escaped like keys, so it holds no
    glob character), and :meth:`matches` decides exactly on the unescaped key.
    """

    __slots__ = ("pattern", "regex", "scan")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        scan: list[str] = []
        regex: list[str] = []
        i = 0
        while i < len(pattern):
            ch = pattern[i]
            if ch == "\\" and i + 1 < len(pattern):
                scan.append(escape(pattern[i + 1]))
                regex.append(re.escape(pattern[i + 1]))
                i += 2
                continue
            if ch in "*?":
                scan.append("*")
                regex.append(".*" if ch == "*" else ".")
            elif ch == "[":
                end = pattern.find("]", i + 2)
                if end == -1:
                    raise ConfigurationError(f"pattern {pattern!r} has an unclosed '['")
                body = pattern[i + 1 : end]
                negate = body.startswith("^")
                chars = body[1:] if negate else body
                parts = [
                    c if c == "-" and 0 < k < len(chars) - 1 else re.escape(c)
                    for k, c in enumerate(chars)
                ]
                regex.append("[" + ("^" if negate else "") + "".join(parts) + "]")
                scan.append("*")
                i = end
            else:
                scan.append(escape(ch))
                regex.append(re.escape(ch))
            i += 1
        self.scan = re.sub(r"\*+", "*", "".join(scan))
        try:
            self.regex = re.compile("".join(regex), re.DOTALL)
        except re.error as exc:
            raise ConfigurationError(f"pattern {pattern!r} is not a valid glob: {exc}") from None

    def matches(self, key: str) -> bool:
        """Does the (unescaped) cache key ``key`` match the pattern?"""
        return self.regex.fullmatch(key) is not None


def escape_glob(pattern: str) -> str:
    """The SCAN MATCH fragment of a user glob (see :class:`Glob`)."""
    return Glob(pattern).scan


def unescape(text: str) -> str:
    """Invert :func:`escape`."""
    return unquote(text, encoding="utf-8", errors="surrogatepass")


def printable(key: str, limit: int = 80) -> str:
    """A log-safe rendering of ``key``: escaped (no CR/LF injection) and truncated."""
    shown = escape(key)
    return shown if len(shown) <= limit else shown[:limit] + f"...({len(shown)} chars)"


class KeySpace:
    """Builds the Redis keys of one cache in one namespace."""

    __slots__ = ("cache", "max_key_bytes", "namespace", "prefix")

    def __init__(self, namespace: str, cache: str, max_key_bytes: int) -> None:
        self.namespace = validate_namespace(namespace)
        self.cache = validate_cache_name(cache)
        self.max_key_bytes = max_key_bytes
        self.prefix = f"oqron:{namespace}:{{{escape(cache)}:"

    def encoded(self, key: str) -> str:
        """The escaped (or, when too long, hashed) form of ``key`` used inside the hash tag."""
        text = escape(key)
        if len(text) > self.max_key_bytes:
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return "#" + digest
        return text

    def value(self, key: str) -> str:
        """Redis key of the entry's envelope."""
        return f"{self.prefix}{self.encoded(key)}}}:v"

    def lock(self, key: str) -> str:
        """Redis key of the entry's fill/refresh lock (same hash tag as the value)."""
        return f"{self.prefix}{self.encoded(key)}}}:l"

    def writes(self, key: str) -> str:
        """The hash of write-through outcomes of the entry (field: version hex)."""
        return f"{self.prefix}{self.encoded(key)}}}:w"

    def write_lock(self, key: str) -> str:
        """The lock that serialises origin writes of the entry (write-through)."""
        return f"{self.prefix}{self.encoded(key)}}}:wl"

    @property
    def cache_slot(self) -> str:
        """Prefix of the cache-wide keys (tag sets, invalidation log): hash tag ``{<cache>}``."""
        return f"oqron:{self.namespace}:{{{escape(self.cache)}}}:"

    def tag_set(self, tag: str) -> str:
        """The set indexing the entries that carry ``tag`` (members: encoded key + version)."""
        return f"{self.cache_slot}tag:{escape(tag)}"

    def invalidations(self) -> str:
        """The sorted set of recent pattern/tag invalidations (score: Redis time, ms)."""
        return f"{self.cache_slot}inv"

    def match_values(self, user_pattern: str | Glob) -> str:
        """A SCAN MATCH pattern for (a superset of) the value keys matching ``user_pattern``."""
        glob = user_pattern if isinstance(user_pattern, Glob) else Glob(user_pattern)
        return f"{glob_literal(self.prefix)}{glob.scan}}}:v"

    def user_key(self, redis_key: str) -> str | None:
        """The cache key of a value key of this cache; ``None`` for hashed (over-long) keys."""
        if not (redis_key.startswith(self.prefix) and redis_key.endswith("}:v")):
            return None
        encoded = redis_key[len(self.prefix) : -3]
        return None if encoded.startswith("#") else unescape(encoded)


def glob_literal(text: str) -> str:
    """Backslash-escape glob metacharacters so that ``text`` matches only itself in SCAN MATCH."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def bus_channel(namespace: str) -> str:
    """The pub/sub channel of a namespace (no braces: it is not an entry key)."""
    return f"oqron:{namespace}:bus"


def stats_key(namespace: str, cache: str) -> str:
    """The hash that aggregates a cache's counters across processes."""
    return f"oqron:{namespace}:stats:{escape(cache)}"


# ---------------------------------------------------------------------------------------------
# Decorated-function arguments -> str key


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
