"""The user glob matcher (``keys.Glob``, issue 10 defect 1): same answers as before, linear time.

Three references pin the semantics: the regex translation ``Glob`` used to compile (kept here as
an oracle), an exhaustive comparison with it over every short pattern and key of a small
alphabet, and ``fnmatch.fnmatchcase`` on the syntax both understand. The worst cases of the old
matcher (polynomial of degree ~10, i.e. forever, on ``"*a"*10 + "*z"`` against ``"a"*3000``) must
take time linear in the key's length: measured at two sizes, not against a wall-clock budget.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import os
import re
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oqron_cache.core.errors import ConfigurationError
from oqron_cache.core.keys import MAX_SCAN_STARS, Glob, KeySpace, escape

# Examples per property; OQRON_GLOB_EXAMPLES=100000 for a longer run on demand.
EXAMPLES = int(os.environ.get("OQRON_GLOB_EXAMPLES", "400"))

# -- helpers ---------------------------------------------------------------------------------


class _Overrun(BaseException):
    """Raised by SIGALRM inside a call that overran (BaseException: no handler swallows it)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Fail the test if the block runs longer than ``seconds``.

    SIGALRM reaches a ``re`` match that backtracks (the regex engine polls for signals), so a
    matcher that hangs in the main thread fails the test instead of hanging it. pytest-timeout's
    own alarm, if one is set, is restored afterwards.
    """

    def alarm(signum: int, frame: FrameType | None) -> None:
        stack = traceback.extract_stack(frame, limit=3)
        raise _Overrun(" < ".join(f"{f.name} ({f.filename}:{f.lineno})" for f in stack[::-1]))

    previous = signal.signal(signal.SIGALRM, alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    except _Overrun as overrun:
        pytest.fail(f"{what} did not finish within {seconds} s (at {overrun})", pytrace=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 0.01))


def old_regex(pattern: str) -> re.Pattern[str]:
    """The regex ``Glob`` compiled before issue 10 (the oracle), with one correction.

    The old code looked for the closing ``]`` of ``[^`` from the character right after ``^``,
    so ``[^]...`` produced ``[^]`` followed by the rest of the pattern, which ``re`` then read as
    one class running into the following text (``[^]a]`` did not compile at all). The documented
    rule is that ``]`` right after ``[`` or ``[^`` is literal; the oracle follows it.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch in "*?":
            out.append(".*" if ch == "*" else ".")
        elif ch == "[":
            negate = pattern.startswith("^", i + 1)
            end = pattern.find("]", i + (3 if negate else 2))  # the old code: always i + 2
            if end == -1:
                raise ConfigurationError(f"pattern {pattern!r} has an unclosed '['")
            chars = pattern[i + (2 if negate else 1) : end]
            parts = [
                c if c == "-" and 0 < k < len(chars) - 1 else re.escape(c)
                for k, c in enumerate(chars)
            ]
            out.append("[" + ("^" if negate else "") + "".join(parts) + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # re's FutureWarning on "--" in a class
            return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ConfigurationError(f"pattern {pattern!r} is not a valid glob: {exc}") from None


def old_scan(pattern: str) -> str:
    """The SCAN MATCH fragment ``Glob`` built before issue 10, with the one change issue 10
    made on purpose: a fragment of more than ``MAX_SCAN_STARS`` stars keeps only the text
    before the first and after the last (CVE-2022-36021; see
    ``test_a_scan_fragment_of_many_stars_keeps_only_its_ends``)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(escape(pattern[i + 1]))
            i += 2
            continue
        if ch in "*?":
            out.append("*")
        elif ch == "[":
            negate = pattern.startswith("^", i + 1)
            i = pattern.find("]", i + (3 if negate else 2))
            out.append("*")
        else:
            out.append(escape(ch))
        i += 1
    scan = re.sub(r"\*+", "*", "".join(out))
    if scan.count("*") > MAX_SCAN_STARS:
        scan = f"{scan.partition('*')[0]}*{scan.rpartition('*')[2]}"
    return scan


def compare_with_oracle(pattern: str, keys: list[str]) -> None:
    """``Glob(pattern)`` refuses what the oracle refuses and matches what it matches."""
    try:
        oracle = old_regex(pattern)
    except ConfigurationError:
        with pytest.raises(ConfigurationError, match="pattern"):
            Glob(pattern)
        return
    glob = Glob(pattern)
    assert glob.pattern == pattern
    assert glob.scan == old_scan(pattern)
    for key in keys:
        assert glob.matches(key) == (oracle.fullmatch(key) is not None), (pattern, key)


def to_fnmatch(pattern: str) -> str | None:
    """``pattern`` in fnmatch's syntax (``[^`` becomes ``[!``); None if Glob refuses it."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] != "[":
            out.append(pattern[i])
            i += 1
            continue
        negate = pattern.startswith("^", i + 1)
        start = i + (2 if negate else 1)
        end = pattern.find("]", start + 1)
        if end == -1:
            return None
        out.append("[" + ("!" if negate else "") + pattern[start:end] + "]")
        i = end + 1
    return "".join(out)


# -- semantics -------------------------------------------------------------------------------


def test_exhaustively_equal_to_the_old_regex_on_short_patterns_and_keys() -> None:
    # Every pattern of up to 4 characters over the syntax's own characters, against every key of
    # up to 4 characters over the characters that have a meaning in a pattern.
    keys = ["".join(k) for n in range(5) for k in itertools.product("ab-]", repeat=n)]
    patterns = 0
    for n in range(5):
        for chars in itertools.product("a*?[]^-\\", repeat=n):
            compare_with_oracle("".join(chars), keys)
            patterns += 1
    assert patterns == 4681


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.text(alphabet="ab*?[]^-\\\n!", max_size=14),
    keys=st.lists(st.text(alphabet="ab]-^\\\n*?[", max_size=12), max_size=25),
)
def test_equal_to_the_old_regex_on_generated_patterns(pattern: str, keys: list[str]) -> None:
    compare_with_oracle(pattern, keys)


# Patterns built from pieces that usually parse, so that most examples reach the matcher.
_piece = st.sampled_from(
    ["a", "b", "ab", "*", "*", "?", "[ab]", "[^a]", "[a-b]", "[]a]", "[^]]", "\\*", "\\[", "-"]
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    pieces=st.lists(_piece, max_size=8),
    keys=st.lists(st.text(alphabet="ab]*[-", max_size=10), min_size=1, max_size=25),
)
def test_equal_to_the_old_regex_on_assembled_patterns(pieces: list[str], keys: list[str]) -> None:
    compare_with_oracle("".join(pieces), keys)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    pattern=st.text(alphabet="ab*?[]^-\n", max_size=14),
    keys=st.lists(st.text(alphabet="ab]-^\n[", max_size=12), max_size=25),
)
def test_agrees_with_fnmatchcase_on_the_common_syntax(pattern: str, keys: list[str]) -> None:
    translated = to_fnmatch(pattern)
    try:
        glob = Glob(pattern)
    except ConfigurationError:
        return  # an unclosed '[' or a reversed range: fnmatch reads those as literal / empty
    assert translated is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fnmatch's regex may draw re's FutureWarning
        for key in keys:
            assert glob.matches(key) == fnmatch.fnmatchcase(key, translated), (pattern, key)


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("", [""], ["a"]),
        ("*", ["", "a\nb"], []),
        ("a*", ["a", "a\n"], ["", "ba"]),
        ("*a", ["a", "\na"], ["", "ab"]),
        ("a*b*c", ["abc", "aXbYc", "abbc", "acbc"], ["ab", "acb", "abcx"]),
        ("*ab*ab*", ["abab", "xabyabz"], ["aba", "ab"]),
        ("a?*?a", ["aaaa", "abba", "ab\nba"], ["aaa", "aa"]),
        ("*[^a]", ["b", "ab", "\n"], ["a", "ba", ""]),
        ("[^]]", ["a", "^"], ["]", ""]),  # ']' right after '[^' is literal
        ("[^]a]x", ["bx"], ["]x", "ax"]),
        ("[]-a]", ["]", "^", "a"], ["b", "-"]),  # a range from ']' to 'a'
        ("[a-]", ["a", "-"], ["b"]),  # '-' last (or first) is literal
        ("[-a]", ["a", "-"], ["b"]),
        ("[a-c-e]", ["a", "b", "c", "-", "e"], ["d"]),  # a range, then '-' and 'e'
        ("[!a]", ["!", "a"], ["b"]),  # '!' does not negate
        ("[\\]]", ["\\]"], ["]", "\\"]),  # no escapes in a class: '\' is a member
        ("a\\", ["a\\"], ["a"]),  # a trailing '\' is literal
        ("A*", ["Ab"], ["ab"]),  # case-sensitive
        ("\ud800?", ["\ud800x"], ["x\ud800"]),  # lone surrogates are characters like any
        ("[ -\U0010ffff]", [" ", "\U0001f389", "é"], ["\x1f", "\n"]),  # a range too wide to list
        ("[^ -~]*", ["\n", "é1"], ["a", " \n"]),
    ],
)
def test_documented_semantics(pattern: str, matching: list[str], not_matching: list[str]) -> None:
    glob = Glob(pattern)
    for key in matching:
        assert glob.matches(key), key
    for key in not_matching:
        assert not glob.matches(key), key


@pytest.mark.parametrize("pattern", ["[", "[]", "[^]", "a[b", "[^]a", "[z-a]", "x[c-a]y", "[a--]"])
def test_broken_classes_are_a_configuration_error_naming_the_pattern(pattern: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(repr(pattern))):
        Glob(pattern)


def test_keyspace_match_values_takes_a_glob_or_its_text() -> None:
    ks = KeySpace("ns", "c", 200)
    assert ks.match_values("a?b*") == ks.match_values(Glob("a?b*")) == "oqron:ns:{c:a*b*}:v"


def test_a_huge_pattern_parses_and_matches_in_linear_time() -> None:
    # 100,000 small ranges in one class: the class is not expanded into millions of characters.
    with deadline(20.0, "parsing and matching a 500 kB pattern"):
        glob = Glob("*[" + "a-z0-9" * 50_000 + "]" + "?a" * 50_000 + "*")
        assert glob.matches("x" + "ba" * 50_000)
        assert not glob.matches("x" + "ba" * 49_999)


# -- linear time -----------------------------------------------------------------------------

SMALL, LARGE = 10_000, 100_000

WORST_CASES: list[tuple[str, Callable[[int], str], bool]] = [
    ("*a" * 10 + "*z", lambda n: "a" * n, False),
    ("*a" * 10 + "*z", lambda n: "a" * n + "z", True),
    ("*a" * 10 + "*z*", lambda n: "a" * n, False),
    ("*a*a*a*a*a*a*a*a*a*b", lambda n: "a" * n, False),
    ("?" * 50 + "*", lambda n: "a" * n, True),
    ("*" + "?" * 50 + "*b*", lambda n: "a" * n, False),
    ("*" + "a?" * 20 + "b*", lambda n: "a" * n, False),
    ("*" + "?a" * 100 + "*", lambda n: "a" * n, True),
    ("*" + "a" * 100 + "b*", lambda n: "a" * n, False),
    ("*[ab]" * 10 + "*c", lambda n: "ab" * (n // 2), False),
    ("*[^z]" * 10 + "*z", lambda n: "a" * n, False),
    ("*[^z]?" * 10 + "*z*", lambda n: "\n" * n, False),
    ("*a*" + "?" * 30 + "*b*?", lambda n: "a" * n, False),
]


def _best_time(glob: Glob, key: str, expected: bool) -> float:
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        assert glob.matches(key) is expected
        best = min(best, time.perf_counter() - started)
    return best


@pytest.mark.parametrize(
    ("pattern", "key_of", "expected"), WORST_CASES, ids=[p[:24] for p, _, _ in WORST_CASES]
)
def test_worst_cases_take_linear_time(
    pattern: str, key_of: Callable[[int], str], expected: bool
) -> None:
    glob = Glob(pattern)
    with deadline(20.0, f"matching {pattern!r}"):
        small = _best_time(glob, key_of(SMALL), expected)
        large = _best_time(glob, key_of(LARGE), expected)
    # Ten times the key: linear is ~10x; quadratic would be 100x. The slack absorbs timer noise
    # on matches that take microseconds.
    assert large <= 25 * small + 0.02, (pattern, small, large)
    assert large < 2.0, (pattern, large)


def test_a_scan_fragment_of_many_stars_keeps_only_its_ends() -> None:
    """Redis before 7.0.9 matched many stars in exponential time (CVE-2022-36021)."""
    assert Glob("user:*a*b:*").scan == "user:*a*b:*"
    assert Glob("u:" + "*a" * 10 + "*z").scan == "u:*z"
    assert Glob("*a" * 10 + "*").scan == "*"
