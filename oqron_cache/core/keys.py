"""Redis keys: a cache's ``str`` key to its Redis keys, and user globs over those keys.

:class:`KeySpace` turns a cache's ``str`` key into its Redis keys. Layout (DESIGN section 7)::

    oqron:<namespace>:{<cache>:<escaped key>}:<part>

The escaped key percent-encodes ``%``, braces, glob characters, ``#``, whitespace, control
characters and non-ASCII, so it contains no brace (the hash tag always ends where we put it), no
glob character (SCAN MATCH patterns built from it are literal) and stays readable for plain keys.
Encoded keys longer than ``max_key_bytes`` are replaced by ``#`` + the full SHA-256 of the key;
``#`` never appears unescaped in an ordinary key, so the two forms cannot collide.

The other encoding, a decorated function's arguments to its ``str`` key, is in
:mod:`.call_keys`; its names are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote

from .call_keys import KeyFunc, decode_call, encode_call, encode_call_ex
from .errors import ConfigurationError
from .glob_match import compile_tokens, parse

__all__ = [
    "CACHE_NAME_RE",
    "NAMESPACE_RE",
    "Glob",
    "KeyFunc",
    "KeySpace",
    "bus_channel",
    "decode_call",
    "encode_call",
    "encode_call_ex",
    "escape",
    "escape_glob",
    "glob_literal",
    "matches_everything",
    "printable",
    "stats_key",
    "unescape",
    "validate_cache_name",
    "validate_namespace",
]

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Cache names may be dotted paths with qualnames (decorated functions: "mod.Class.method").
CACHE_NAME_RE = re.compile(r"^[A-Za-z0-9_.<>-]{1,200}$")

# Characters kept as they are in a Redis key: printable ASCII minus the ones with a meaning to us
# (hash-tag braces, glob syntax, escape and hash markers, the part separator is fine after '}').
_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "%{}*?[]\\#")
# The same set as one regex: escape()'s common case (nothing to encode) is one C-level match.
_ALL_SAFE = re.compile("[" + re.escape("".join(sorted(_SAFE))) + "]*")


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
    if _ALL_SAFE.fullmatch(text) is not None:
        return text
    out: list[str] = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


MAX_SCAN_STARS = 4  # a SCAN MATCH fragment with more stars keeps only its ends (see Glob)


class Glob:
    """A user's glob over the keys of one cache, matched on the unescaped key.

    The syntax, matched case-sensitively against the whole key:

    * ``*`` matches any run of characters, empty or not, newlines included;
    * ``?`` matches exactly one character, a newline included;
    * ``[abc]`` one character of the set, ``[a-z]`` one in the inclusive range (by code point),
      ``[^a-z]`` one character *not* in the set (``^`` negates; ``!`` is an ordinary member).
      A ``]`` right after ``[`` or ``[^`` is a member (``[]a]``, ``[^]]``); a ``-`` first or
      last is a member (``[a-]``); after a range, a ``-`` starts a new member (``[a-c-e]`` is
      ``a``..``c``, ``-`` and ``e``). There are no escapes inside a class (``[\\]]`` is ``\\``
      followed by ``]``). An unclosed ``[`` or a reversed range (``[z-a]``) raises
      :class:`ConfigurationError` naming the pattern;
    * ``\\x`` matches the character ``x`` literally; a trailing lone ``\\`` is literal;
    * every other character, ``%`` included, matches itself.

    Matching takes time linear in the key's length whatever the pattern (see
    :mod:`.glob_match`: no regex, no backtracking), so a pattern from anyone (the API, a task, a
    bus message) cannot stall the threads that match it.

    Keys are stored escaped (a space is ``%20``), so a ``?`` cannot be expressed in Redis's own
    glob over the escaped form. ``scan`` is therefore a SCAN MATCH fragment that matches a
    superset (``?`` and classes widen to ``*``; literal text is escaped like keys, so it holds no
    glob character), and :meth:`matches` decides exactly on the unescaped key.
    """

    __slots__ = ("_match", "pattern", "scan")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        tokens = parse(pattern)
        scan = "".join(escape(token) if isinstance(token, str) else "*" for token in tokens)
        scan = re.sub(r"\*+", "*", scan)
        if scan.count("*") > MAX_SCAN_STARS:
            # Redis before 7.0.9 matched many stars in exponential time (CVE-2022-36021): give
            # it only the literal text before the first star and after the last; the exact
            # match is decided here anyway.
            scan = f"{scan.partition('*')[0]}*{scan.rpartition('*')[2]}"
        self.scan = scan
        self._match = compile_tokens(tokens)

    def matches(self, key: str) -> bool:
        """Does the (unescaped) cache key ``key`` match the whole pattern?"""
        return self._match(key)


def matches_everything(pattern: str) -> bool:
    """Does ``pattern`` match every key (``"*"``, ``"**"``, ``"?*"``, ...; keys are never
    empty)? Such a pattern needs ``allow_all=True``."""
    return set(pattern) <= {"*", "?"} and "*" in pattern and pattern.count("?") <= 1


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


VALUE_KEYS_KEPT = 4096  # KeySpace.value's memo, per cache


class KeySpace:
    """Builds the Redis keys of one cache in one namespace."""

    __slots__ = ("_values", "cache", "max_key_bytes", "namespace", "prefix")

    def __init__(self, namespace: str, cache: str, max_key_bytes: int) -> None:
        self.namespace = validate_namespace(namespace)
        self.cache = validate_cache_name(cache)
        self.max_key_bytes = max_key_bytes
        self.prefix = f"oqron:{namespace}:{{{escape(cache)}:"
        # The envelope keys of the last keys read: every read below L1 needs one, and
        # building it (escape, maybe a hash) costs more than the read's own Python path.
        self._values: dict[str, str] = {}

    def encoded(self, key: str) -> str:
        """The escaped (or, when too long, hashed) form of ``key`` used inside the hash tag."""
        text = escape(key)
        if len(text) > self.max_key_bytes:
            digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
            return "#" + digest
        return text

    def value(self, key: str) -> str:
        """Redis key of the entry's envelope."""
        found = self._values.get(key)
        if found is None:
            if len(self._values) >= VALUE_KEYS_KEPT:
                self._values.clear()  # bounded: start over (a dict op, safe under the GIL)
            found = self._values[key] = f"{self.prefix}{self.encoded(key)}}}:v"
        return found

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
        """The index of the entries that carry ``tag``: a sorted set of encoded keys, scored
        with the Redis time each was last indexed at."""
        return f"{self.cache_slot}tagi:{escape(tag)}"

    def legacy_tag_set(self, tag: str) -> str:
        """The plain set of ``<encoded key>|<version hex>`` that versions before 0.2 kept."""
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
