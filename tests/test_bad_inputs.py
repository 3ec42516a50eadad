"""Bad inputs (/work/shared/bad-inputs.md): each gets a clear, typed error naming the parameter or
function, and nothing is lost. One section per row; rows 16, 19 and 23 (timings against Celery,
broker eviction policy, task messages) belong to the Celery issues and are not covered here."""

from __future__ import annotations

import asyncio
import contextvars
import decimal
import hashlib
import inspect
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import celery
import pytest
import redis

import oqron_cache
from oqron_cache import (
    ConfigurationError,
    DuplicateCacheError,
    InvalidKeyError,
    MemoryTier,
    RedisTier,
    SerializationError,
    Stampede,
    refreshing_cache,
)
from oqron_cache.config import mask_url, reset, validate_redis_url
from oqron_cache.core.entry import unpack
from oqron_cache.core.keys import printable
from oqron_cache.redis.replies import as_int
from tests.conftest import Closing, T

# ---------------------------------------------------------------------------------------------
# helpers


def unique(prefix: str = "bad") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def names(pattern: str, message: str) -> bool:
    """True if ``message`` names ``pattern`` as a whole word (``ttl`` is not ``stale_ttl``)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(pattern)}(?![A-Za-z0-9_])", message) is not None


@pytest.fixture
def closing() -> Iterator[Closing]:
    """``closing(obj)``: close a decorated function's cache (or a Cache) after the test."""
    made: list[Any] = []

    def keep(obj: T) -> T:
        made.append(obj)
        return obj

    try:
        yield keep
    finally:
        for obj in made:
            (obj.cache if hasattr(obj, "cache") else obj).close()


def l2_keys(client: redis.Redis, namespace: str) -> list[str]:
    """The namespace's keys, except bookkeeping: stats hashes, invalidation logs, tag sets."""
    keys = (k.decode() for k in client.scan_iter(match=f"oqron:{namespace}:*", count=1000))
    return sorted(
        k
        for k in keys
        if not k.startswith(f"oqron:{namespace}:stats:")
        and not k.endswith("}:inv")
        and "}:tag:" not in k
        and "}:tagi:" not in k
    )


def assert_not_registered(name_part: str) -> None:
    assert not [n for n in oqron_cache.engine.registry.names() if name_part in n]


# ---------------------------------------------------------------------------------------------
# row 1: generators, async def, sync functions returning coroutines


def test_row1_generator_function_is_refused_at_decoration() -> None:
    def numbers(n: int) -> Iterator[int]:
        yield n

    with pytest.raises(TypeError) as info:
        refreshing_cache(ttl="1m")(numbers)
    assert "numbers" in str(info.value)
    assert "generator" in str(info.value)
    assert_not_registered("numbers")


def test_row1_async_generator_function_is_refused_at_decoration() -> None:
    async def stream(n: int) -> Any:
        yield n

    with pytest.raises(TypeError, match=r"stream.*generator"):
        refreshing_cache(ttl="1m")(stream)
    assert_not_registered("stream")


def test_row1_async_def_gives_an_async_function_now_that_the_async_front_exists(
    configured: str, closing: Closing
) -> None:
    async def fetch(n: int) -> int:
        return n

    wrapped = closing(refreshing_cache(ttl="1m")(fetch))
    assert inspect.iscoroutinefunction(wrapped)
    assert asyncio.run(wrapped(3)) == 3


@pytest.mark.parametrize("returns", ["coroutine", "generator"])
def test_row1_sync_wrapper_returning_coroutine_or_generator_is_refused_at_call(
    configured: str, closing: Closing, returns: str
) -> None:
    calls: list[int] = []

    def gen(n: int) -> Iterator[int]:
        yield n

    @closing
    @refreshing_cache(ttl="1m")
    def sneaky(n: int) -> Any:
        calls.append(n)
        return asyncio.sleep(0) if returns == "coroutine" else gen(n)

    for _ in range(2):  # refused every time: nothing was cached
        with pytest.raises(TypeError) as info:
            sneaky(1)
        assert "sneaky" in str(info.value)
        assert "plain values only" in str(info.value)
    assert calls == [1, 1]
    # (filterwarnings=error: a coroutine left un-awaited would have failed the test)


# ---------------------------------------------------------------------------------------------
# row 2: arguments with no stable identity


@pytest.mark.parametrize("kind", ["object", "lambda", "open file", "kwarg object"])
def test_row2_unstable_argument_is_a_type_error_naming_it(
    configured: str, closing: Closing, tmp_path: Path, kind: str
) -> None:
    calls: list[Any] = []

    @closing
    @refreshing_cache(ttl="1m")
    def lookup(x: Any, *, flag: Any = None) -> str:
        calls.append(x)
        return "value"

    path = tmp_path / "f.txt"
    path.write_text("data")
    with path.open() as handle:
        arg: dict[str, Any] = {
            "object": {"args": (object(),), "kwargs": {}, "named": "'x'", "type": "object"},
            "lambda": {"args": (lambda: 1,), "kwargs": {}, "named": "'x'", "type": "function"},
            "open file": {"args": (handle,), "kwargs": {}, "named": "'x'", "type": "TextIOWrapper"},
            "kwarg object": {
                "args": (1,),
                "kwargs": {"flag": object()},
                "named": "'flag'",
                "type": "object",
            },
        }[kind]
        with pytest.raises(TypeError) as info:
            lookup(*arg["args"], **arg["kwargs"])
    assert isinstance(info.value, InvalidKeyError)
    message = str(info.value)
    assert arg["named"] in message
    assert arg["type"] in message
    assert "lookup" in message
    assert "__cache_key__" in message
    assert "key=" in message
    assert calls == []  # refused before the function ran


def test_row2_cache_key_protocol_makes_an_object_usable(configured: str, closing: Closing) -> None:
    class Account:
        def __init__(self, ident: int) -> None:
            self.ident = ident

        def __cache_key__(self) -> int:
            return self.ident

    calls: list[int] = []

    @closing
    @refreshing_cache(ttl="1m")
    def balance(account: Account) -> int:
        calls.append(account.ident)
        return account.ident * 10

    assert balance(Account(1)) == 10
    assert balance(Account(1)) == 10
    assert balance(Account(2)) == 20
    assert calls == [1, 2]


# ---------------------------------------------------------------------------------------------
# rows 3-5: typed, unambiguous keys and distinct names


def test_row3_int_bool_float_are_three_keys(configured: str, closing: Closing) -> None:
    calls: list[Any] = []

    @closing
    @refreshing_cache(ttl="1m")
    def show(x: Any) -> str:
        calls.append(x)
        return f"{type(x).__name__}:{x!r}"

    assert len({show.key_for(1), show.key_for(True), show.key_for(1.0)}) == 3
    for _ in range(2):
        assert [show(1), show(True), show(1.0)] == ["int:1", "bool:True", "float:1.0"]
    assert len(calls) == 3


def test_row4_separators_inside_arguments_do_not_merge_keys(
    configured: str, closing: Closing
) -> None:
    calls: list[Any] = []

    @closing
    @refreshing_cache(ttl="1m")
    def join(*args: str, **kwargs: str) -> list[Any]:
        calls.append((args, kwargs))
        return [list(args), kwargs]

    assert join("a:b", "c") == [["a:b", "c"], {}]
    assert join("a", "b:c") == [["a", "b:c"], {}]
    assert join(a="b=1") == [[], {"a": "b=1"}]
    assert join(**{"a=b": "1"}) == [[], {"a=b": "1"}]
    assert join("s1:a") == [["s1:a"], {}]
    assert join("a") == [["a"], {}]
    assert len(calls) == 6
    assert join("a:b", "c") == [["a:b", "c"], {}]
    assert len(calls) == 6


def test_row5_same_method_name_on_two_classes(configured: str, closing: Closing) -> None:
    class A:
        def __cache_key__(self) -> str:
            return "k"

        @refreshing_cache(ttl="1m")
        def active(self) -> str:
            return "A"

    class B:
        def __cache_key__(self) -> str:
            return "k"

        @refreshing_cache(ttl="1m")
        def active(self) -> str:
            return "B"

    closing(A.active)
    closing(B.active)
    assert A.active.cache.name != B.active.cache.name
    assert A.active.cache.name.endswith(".A.active")
    assert B.active.cache.name.endswith(".B.active")
    assert (A().active(), B().active(), A().active()) == ("A", "B", "A")


def test_row5_a_second_cache_with_the_same_name_is_refused(
    configured: str, closing: Closing
) -> None:
    name = unique("dup")
    closing(oqron_cache.cache(name, ttl="1m"))
    with pytest.raises(DuplicateCacheError, match=name):
        oqron_cache.cache(name, ttl="1m")


# ---------------------------------------------------------------------------------------------
# row 6: glob characters in keys


GLOB_KEYS = ["*", "?", "[a]", "\\", "a*b", "a?b", "[", "]", "a\\*b"]


def test_row6_glob_characters_in_keys_are_stored_literally(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="1m")
    for key in GLOB_KEYS:
        c.set(key, key)
    c.set("plain", "plain")
    c.stack.l1.clear()
    for key in GLOB_KEYS:
        assert c.get(key) == key
    for rkey in l2_keys(redis_client, configured):
        tagged = rkey[rkey.index("{") + 1 : rkey.index("}")]
        assert not set(tagged) & set("*?[]\\"), rkey

    assert c.invalidate_pattern("\\*") == 1  # only the key '*'
    assert c.get("*") is None
    assert c.invalidate_pattern("a\\*b") == 1
    assert c.invalidate_pattern("\\[a\\]") == 1
    assert c.invalidate_pattern("\\\\") == 1
    for key in ("?", "a?b", "[", "]", "a\\*b", "plain"):
        assert c.get(key) == key, key


# ---------------------------------------------------------------------------------------------
# row 7: control characters, NUL, emoji, lone surrogates


ODD_KEYS = ["x\r\nSET evil 1", "nul\x00byte", "emoji 🎉", "lone \ud800 surrogate", "\udcff", "\t"]


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_row7_odd_keys_are_stored_and_read_back(
    configured: str, make_cache: Any, redis_client: redis.Redis, key: str
) -> None:
    c = make_cache(ttl="1m")
    c.set(key, {"key": key})
    c.stack.l1.clear()
    assert c.get(key) == {"key": key}
    (rkey,) = l2_keys(redis_client, configured)
    assert all(0x21 <= ord(ch) < 0x7F for ch in rkey), rkey
    assert rkey == c.stack.l2.keys.value(key)
    c.delete(key)
    assert c.get(key) is None


@pytest.mark.parametrize("key", ODD_KEYS, ids=repr)
def test_row7_odd_arguments_of_a_decorated_function(
    configured: str, closing: Closing, key: str
) -> None:
    calls: list[str] = []

    @closing
    @refreshing_cache(ttl="1m")
    def echo(text: str) -> str:
        calls.append(text)
        return text

    assert echo(key) == key
    l1 = echo.cache.stack.l1
    assert l1 is not None
    l1.clear()
    assert echo(key) == key
    assert calls == [key]


def test_row7_logs_escape_keys(
    configured: str, make_cache: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert "\n" not in printable("a\r\nb")
    assert "\r" not in printable("a\r\nb")
    c = make_cache(ttl="1m", max_value_bytes=20, resolver=lambda key: "v" * 100)
    key = "user\r\n2099-01-01 CRITICAL forged line"
    with caplog.at_level(logging.WARNING, logger="oqron_cache"):
        assert c.get(key) == "v" * 100
    messages = [r.getMessage() for r in caplog.records if "max_value_bytes" in r.getMessage()]
    assert messages
    for message in messages:
        assert "\n" not in message
        assert "\r" not in message
        assert "%0D%0A" in message


# ---------------------------------------------------------------------------------------------
# row 8: empty or wrong-typed keys, bad namespaces and cache names


@pytest.mark.parametrize("method", ["get", "set", "delete", "get_or_set"])
@pytest.mark.parametrize(
    ("key", "error", "words"),
    [
        ("", ValueError, "empty"),
        (b"k", TypeError, "bytes"),
        (1, TypeError, "int"),
        (None, TypeError, "NoneType"),
        (("a",), TypeError, "tuple"),
    ],
    ids=["empty", "bytes", "int", "None", "tuple"],
)
def test_row8_bad_keys(
    configured: str, make_cache: Any, method: str, key: Any, error: type, words: str
) -> None:
    c = make_cache(ttl="1m")
    call: dict[str, Callable[[], Any]] = {
        "get": lambda: c.get(key),
        "set": lambda: c.set(key, 1),
        "delete": lambda: c.delete(key),
        "get_or_set": lambda: c.get_or_set(key, lambda: 1),
    }
    with pytest.raises(error) as info:
        call[method]()
    assert "key" in str(info.value)
    assert words in str(info.value)


def test_row8_str_subclass_key_is_refused(configured: str, make_cache: Any) -> None:
    class Sneaky(str):
        pass

    c = make_cache(ttl="1m")
    with pytest.raises(TypeError, match="keys must be str"):
        c.get(Sneaky("k"))


@pytest.mark.parametrize("ns", ["", "a:b", "a*", "a b", "x" * 65, "{x}", "é"])
def test_row8_bad_namespace(redis_url: str, ns: str) -> None:
    reset()
    try:
        with pytest.raises(
            ValueError, match=re.escape("namespace must match [A-Za-z0-9_.-]{1,64}")
        ):
            oqron_cache.configure(redis_url=redis_url, namespace=ns)
        assert oqron_cache.config.current_runtime(create=False) is None  # nothing configured
    finally:
        reset()


def test_row8_bad_namespace_from_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OQRON_NAMESPACE", "bad namespace")
    reset()
    try:
        with pytest.raises(ValueError, match="namespace must match"):
            oqron_cache.configure(redis_url=redis_url)
    finally:
        reset()


def test_row8_namespace_of_wrong_type(redis_url: str) -> None:
    with pytest.raises(TypeError, match="namespace must be a str"):
        oqron_cache.configure(redis_url=redis_url, namespace=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a{b}", "a*", "x" * 201])
def test_row8_bad_cache_name(name: str) -> None:
    with pytest.raises(ValueError, match="cache name must match"):
        oqron_cache.cache(name, ttl="1m")


def test_row8_cache_name_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="cache name must be a str"):
        oqron_cache.cache(None, ttl="1m")  # type: ignore[call-overload]


# ---------------------------------------------------------------------------------------------
# row 9: very long keys


def test_row9_one_megabyte_key_is_hashed_with_full_sha256(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="1m")
    key = "k" * (1 << 20)
    other = "k" * ((1 << 20) - 1) + "j"  # same prefix, different key
    c.set(key, "long")
    c.set(other, "other")
    c.stack.l1.clear()
    assert c.get(key) == "long"
    assert c.get(other) == "other"
    digest = hashlib.sha256(key.encode()).hexdigest()
    rkeys = l2_keys(redis_client, configured)
    assert f"oqron:{configured}:{{{c.name}:#{digest}}}:v" in rkeys
    for rkey in rkeys:
        assert re.fullmatch(rf"oqron:{configured}:\{{{c.name}:#[0-9a-f]{{64}}\}}:v", rkey)


def test_row9_long_argument_of_a_decorated_function_is_hashed(
    configured: str, closing: Closing, redis_client: redis.Redis
) -> None:
    @closing
    @refreshing_cache(ttl="1m")
    def size(blob: str) -> int:
        return len(blob)

    blob = "x" * (1 << 20)
    assert size(blob) == 1 << 20
    digest = hashlib.sha256(f"s{len(blob)}:{blob}".encode()).hexdigest()
    assert l2_keys(redis_client, configured) == [
        f"oqron:{configured}:{{{size.cache.name}:#{digest}}}:v"
    ]


@pytest.mark.parametrize(("value", "error"), [(8, ValueError), (True, TypeError), (1.5, TypeError)])
def test_row9_max_key_bytes_is_validated(value: Any, error: type) -> None:
    with pytest.raises(error, match="max_key_bytes"):
        oqron_cache.cache(unique(), ttl="1m", max_key_bytes=value)


# ---------------------------------------------------------------------------------------------
# row 10: values over max_value_bytes


def test_row10_oversize_value_returned_not_cached_warned_and_counted(
    configured: str, closing: Closing, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    @closing
    @refreshing_cache(ttl="1m", max_value_bytes=1000)
    def report(n: int) -> str:
        calls.append(n)
        return "r" * n

    with caplog.at_level(logging.WARNING, logger="oqron_cache"):
        for _ in range(3):
            assert report(5000) == "r" * 5000
    assert calls == [5000] * 3
    assert report.get_stats()["oversize"] == 3
    assert l2_keys(redis_client, configured) == []
    assert any("max_value_bytes=1000" in r.getMessage() for r in caplog.records)
    assert report(10) == "r" * 10
    assert report(10) == "r" * 10
    assert calls == [5000] * 3 + [10]


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError)])
def test_row10_max_value_bytes_is_validated(value: Any, error: type) -> None:
    with pytest.raises(error, match="max_value_bytes"):
        oqron_cache.cache(unique(), ttl="1m", max_value_bytes=value)


# ---------------------------------------------------------------------------------------------
# rows 11-12: values the codec cannot store faithfully


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


UNSERIALIZABLE = [
    ({1, 2}, "set"),
    (frozenset({1}), "frozenset"),
    ((1, 2), "tuple"),
    (decimal.Decimal("1.5"), "Decimal"),
    (datetime(2024, 1, 1, 12, 0), "datetime"),  # naive on purpose
    (Point(1), "Point"),
    (b"bytes", "bytes"),
    ({"nested": [1, {2, 3}]}, "set"),
]


@pytest.mark.parametrize(("value", "type_name"), UNSERIALIZABLE, ids=lambda v: repr(v)[:20])
def test_row11_unserializable_value_from_a_decorated_function(
    configured: str, closing: Closing, redis_client: redis.Redis, value: Any, type_name: str
) -> None:
    @closing
    @refreshing_cache(ttl="1m")
    def load(n: int) -> Any:
        return value

    with pytest.raises(SerializationError) as info:
        load(1)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert f"value of type {type_name} returned by" in message
    assert load.cache.name in message  # module.qualname of the function
    assert "codec 'json'" in message
    assert l2_keys(redis_client, configured) == []  # nothing stored, no lock left behind


@pytest.mark.parametrize(("value", "type_name"), UNSERIALIZABLE, ids=lambda v: repr(v)[:20])
def test_row11_unserializable_value_given_to_set_loses_nothing(
    configured: str, make_cache: Any, value: Any, type_name: str
) -> None:
    c = make_cache(ttl="1m")
    c.set("k", "previous")
    with pytest.raises(SerializationError) as info:
        c.set("k", value)
    assert type_name in str(info.value)
    assert c.name in str(info.value)
    assert info.value.cache == c.name
    assert c.get("k") == "previous"  # the failed set changed nothing
    c.stack.l1.clear()
    assert c.get("k") == "previous"


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), {"a": [1.0, float("nan")]}, {1: "int key"}],
    ids=repr,
)
def test_row12_nan_infinity_and_int_keys_are_rejected_by_json(
    configured: str, make_cache: Any, value: Any
) -> None:
    c = make_cache(ttl="1m", resolver=lambda key: value)
    with pytest.raises(SerializationError, match=c.name):
        c.get("k")


def test_row12_msgpack_round_trips_bytes_and_int_keys_faithfully(
    configured: str, make_cache: Any
) -> None:
    value = {1: b"\x00\xff", 2: [b"", {"s": -(2**63)}], "name": "é"}
    c = make_cache(ttl="1m", codec="msgpack", resolver=lambda key: value)
    from_resolver = c.get("k")  # the object the resolver returned, as L1 keeps it
    c.stack.l1.clear()
    from_l2 = c.get("k")
    assert from_l2 == from_resolver == value
    assert type(from_l2[1]) is bytes
    assert set(from_l2) == {1, 2, "name"}
    with pytest.raises(SerializationError, match="tuple"):
        c.set("t", (1, 2))  # msgpack would return a list
    with pytest.raises(SerializationError, match="nan"):
        c.set("n", float("nan"))


# ---------------------------------------------------------------------------------------------
# row 13: a resolver that returns None


def test_row13_none_is_cached_not_a_miss(configured: str, closing: Closing) -> None:
    calls: list[str] = []

    @closing
    @refreshing_cache(ttl="1m")
    def find_user(user_id: str) -> None:
        calls.append(user_id)

    for _ in range(5):
        assert find_user("ghost") is None
    l1 = find_user.cache.stack.l1
    assert l1 is not None
    l1.clear()
    assert find_user("ghost") is None
    assert calls == ["ghost"]
    assert find_user.get_stats()["misses"] == 1


# ---------------------------------------------------------------------------------------------
# rows 14 and 24: durations and timeouts


def _cache_with(**kwargs: Any) -> Callable[[Any], Any]:
    def build(value: Any) -> Any:
        args = {"ttl": "1m", **{k: (value if v is None else v) for k, v in kwargs.items()}}
        return oqron_cache.cache(unique(), **args)

    return build


DURATION_SITES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "cache ttl": (_cache_with(ttl=None), "ttl"),
    "cache stale_ttl": (_cache_with(stale_ttl=None), "stale_ttl"),
    "MemoryTier ttl": (lambda v: MemoryTier(ttl=v), "MemoryTier ttl"),
    "RedisTier ttl": (lambda v: RedisTier(ttl=v), "RedisTier ttl"),
    "Stampede lock_ttl": (lambda v: Stampede(lock_ttl=v), "Stampede lock_ttl"),
    "stampede dict lock_ttl": (
        lambda v: _cache_with(stampede={"lock_ttl": v})(None),
        "Stampede lock_ttl",
    ),
    "configure op_timeout": (lambda v: oqron_cache.configure(op_timeout=v), "op_timeout"),
    "configure connect_timeout": (
        lambda v: oqron_cache.configure(connect_timeout=v),
        "connect_timeout",
    ),
    "refreshing_cache stale_ttl": (
        lambda v: refreshing_cache(ttl="1m", stale_ttl=v, name=unique())(lambda x: x),
        "stale_ttl",
    ),
    "refreshing_cache ttl": (
        lambda v: refreshing_cache(ttl=v, stale_ttl="1m", name=unique())(lambda x: x),
        "ttl",
    ),
}

BAD_DURATIONS: list[tuple[Any, type]] = [
    (0, ValueError),
    (-1, ValueError),
    (-0.5, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    ("60", ValueError),
    ("-5s", ValueError),
    ("5 minutes", ValueError),
    (True, TypeError),
    (False, TypeError),
    ([30], TypeError),
]


def _duration_cases() -> Iterator[Any]:
    for site in DURATION_SITES:
        for value, error in BAD_DURATIONS:
            if value == 0 and error is ValueError and site.endswith("stale_ttl"):
                continue  # stale_ttl=0 is allowed: "no stale window"
            yield pytest.param(site, value, error, id=f"{site}={value!r}")


@pytest.fixture
def no_configuration() -> Iterator[None]:
    reset()
    try:
        yield
    finally:
        reset()


@pytest.mark.parametrize(("site", "value", "error"), list(_duration_cases()))
def test_row14_bad_durations_are_typed_errors_naming_the_parameter(
    no_configuration: None, monkeypatch: pytest.MonkeyPatch, site: str, value: Any, error: type
) -> None:
    monkeypatch.delenv("OQRON_REDIS_URL", raising=False)
    build, param = DURATION_SITES[site]
    before = set(oqron_cache.engine.registry.names())
    with pytest.raises(error) as info:
        build(value)
    assert names(param, str(info.value)), str(info.value)
    assert set(oqron_cache.engine.registry.names()) == before  # nothing half-declared


@pytest.mark.parametrize("value", [-1, float("nan"), "60", True], ids=repr)
def test_row14_refreshing_cache_bad_ttl_is_named_ttl(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        refreshing_cache(ttl=value, name=unique())(lambda x: x)
    assert names("ttl", str(info.value)), str(info.value)


@pytest.mark.parametrize("value", [0, None, True, "60", float("nan")], ids=repr)
def test_row14_lock_ttl_ms_dict_form(value: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="lock_ttl_ms"):
        oqron_cache.cache(unique(), ttl="1m", stampede={"lock_ttl_ms": value})


def test_row14_stale_ttl_zero_is_allowed(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="1m", stale_ttl=0)
    assert c.options.stale_ttl == 0.0
    with pytest.raises(TypeError, match="stale_ttl"):
        make_cache(ttl="1m", stale_ttl=None)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (timedelta(minutes=2), 120.0),
        (45, 45.0),
        (0.5, 0.5),
    ],
)
def test_row14_good_durations(value: Any, seconds: float) -> None:
    assert RedisTier(ttl=value).ttl == seconds


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: oqron_cache.cache(unique(), ttl=1e17), "ttl"),
        (lambda: oqron_cache.cache(unique(), ttl="1m", stale_ttl=timedelta.max), "stale_ttl"),
        (lambda: Stampede(lock_ttl="36600d"), "Stampede lock_ttl"),
    ],
    ids=["ttl", "stale_ttl", "lock_ttl"],
)
def test_row14_absurdly_long_durations_are_refused(build: Any, param: str) -> None:
    # Redis cannot hold a PX this large: accepting it would make every L2 write fail silently.
    before = set(oqron_cache.engine.registry.names())
    with pytest.raises(ValueError) as info:
        build()
    assert names(param, str(info.value)), str(info.value)
    assert set(oqron_cache.engine.registry.names()) == before


def test_row14_long_but_sane_ttl_reaches_redis(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="3650d")
    c.set("k", 1)
    assert c.get_stats()["l2_errors"] == 0
    assert as_int(redis_client.pttl(c.stack.l2.keys.value("k"))) > 3649 * 86_400_000


@pytest.mark.parametrize(
    ("build", "param"),
    [
        # None is the invalid input under test: the signature rightly refuses it.
        (lambda: oqron_cache.configure(op_timeout=None), "op_timeout"),  # type: ignore[arg-type]
    ],
    ids=["configure"],
)
def test_row24_no_infinite_timeouts(
    no_configuration: None, monkeypatch: pytest.MonkeyPatch, build: Any, param: str
) -> None:
    monkeypatch.delenv("OQRON_REDIS_URL", raising=False)
    with pytest.raises(TypeError) as info:
        build()
    assert names(param, str(info.value))


# ---------------------------------------------------------------------------------------------
# row 15: max_size


MAX_SIZE_SITES: dict[str, Callable[[Any], Any]] = {
    "MemoryTier": lambda v: MemoryTier(max_size=v),
    "cache": lambda v: oqron_cache.cache(unique(), ttl="1m", max_size=v),
    "dict tier": lambda v: oqron_cache.cache(
        unique(), tiers=[{"adapter": "memory", "max_size": v, "ttl": "1m"}]
    ),
    "refreshing_cache": lambda v: refreshing_cache(ttl="1m", max_size=v, name=unique())(
        lambda x: x
    ),
}


@pytest.mark.parametrize("site", list(MAX_SIZE_SITES))
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), TypeError),
        (True, TypeError),
        (1.5, TypeError),
        ("10", TypeError),
        (None, TypeError),
    ],
    ids=repr,
)
def test_row15_bad_max_size(site: str, value: Any, error: type) -> None:
    before = set(oqron_cache.engine.registry.names())
    with pytest.raises(error, match="max_size"):
        MAX_SIZE_SITES[site](value)
    assert set(oqron_cache.engine.registry.names()) == before


# ---------------------------------------------------------------------------------------------
# row 17: Redis URLs


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("localhost:6379", "no scheme"),  # host:port, not scheme "localhost"
        ("127.0.0.1:6379", "no scheme"),
        ("//:hunter2@cache.internal:6379/0", "no scheme"),
        ("http://x", "not a Redis scheme"),
        ("http://:hunter2@x:6379", "not a Redis scheme"),
        ("ftp://user:hunter2@x", "not a Redis scheme"),
        ("redis+cluster://:hunter2@x:6379/3", "only db 0"),
        ("redis+sentinel://:hunter2@x", "no service name"),
        ("redis+sentinel://:hunter2@x:port/mymaster", "not a port number"),
    ],
)
def test_row17_bad_redis_url(no_configuration: None, url: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        oqron_cache.configure(redis_url=url, namespace="t-badurl")
    message = str(info.value)
    assert "redis_url" in message
    assert words in message
    assert "hunter2" not in message
    assert oqron_cache.config.current_runtime(create=False) is None


def test_row17_redis_url_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="redis_url must be a str"):
        validate_redis_url(b"redis://x")


def test_row17_redis_url_from_environment_is_validated(
    no_configuration: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OQRON_REDIS_URL", "http://:hunter2@x")
    with pytest.raises(ValueError, match="redis_url") as info:
        oqron_cache.configure(namespace="t-badurl")
    assert "hunter2" not in str(info.value)


def test_row17_tls_without_certificate_checks_warns_loudly_with_masked_password(
    no_configuration: None, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = "rediss://app:hunter2@127.0.0.1:1/0?ssl_cert_reqs=none"  # port 1: nothing listens
    with (
        caplog.at_level(logging.DEBUG),
        pytest.warns(UserWarning, match="certificate verification off") as record,
    ):
        settings = oqron_cache.configure(redis_url=url, namespace=namespace)
    for warning in record:
        assert "hunter2" not in str(warning.message)
    assert "app:***@" in str(record[0].message)
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in caplog.text
    assert "hunter2" not in str(oqron_cache.config.current_runtime().status())


def test_row17_wrong_credentials_fail_fast_with_masked_password(
    no_configuration: None, namespace: str
) -> None:
    url = "redis://oqron-nobody:hunter2@127.0.0.1:6379/0"
    with pytest.raises(ConfigurationError) as info:
        oqron_cache.configure(redis_url=url, namespace=namespace)
    message = str(info.value)
    assert "hunter2" not in message
    assert "oqron-nobody:***@" in message


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host/2", "redis://:***@host/2"),
        ("rediss://user:p%40ss@host:6380", "rediss://user:***@host:6380"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_row17_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_row17_password_in_query_string_is_masked() -> None:
    url = "rediss://host:6380/0?ssl_cert_reqs=none&password=hunter2"
    assert "hunter2" not in mask_url(url)
    with pytest.warns(UserWarning) as record:
        validate_redis_url(url)
    assert all("hunter2" not in str(w.message) for w in record)


def test_row17_mask_url_keeps_ipv6_brackets() -> None:
    assert mask_url("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"


# ---------------------------------------------------------------------------------------------
# row 18: Celery apps that speak pickle


def _celery_app(**conf: Any) -> celery.Celery:
    app = celery.Celery(unique("app"), broker="memory://")
    app.conf.update(**conf)
    return app


@pytest.mark.parametrize(
    ("conf", "setting"),
    [
        ({"task_serializer": "pickle"}, "task_serializer"),
        ({"result_serializer": "pickle"}, "result_serializer"),
        ({"accept_content": ["json", "pickle"]}, "accept_content"),
        ({"result_accept_content": ["pickle"]}, "result_accept_content"),
        ({"task_serializer": "PICKLE"}, "task_serializer"),
    ],
    ids=str,
)
def test_row18_celery_app_with_pickle_is_refused(
    no_configuration: None, redis_url: str, namespace: str, conf: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        oqron_cache.configure(
            redis_url=redis_url, celery_app=_celery_app(**conf), namespace=namespace
        )
    assert "pickle is not allowed; use json" in str(info.value)
    assert setting in str(info.value)
    assert oqron_cache.config.current_runtime(create=False) is None


def test_row18_pickle_by_content_type_is_refused(
    no_configuration: None, redis_url: str, namespace: str
) -> None:
    app = _celery_app(accept_content=["json", "application/x-python-serialize"])
    with pytest.raises(ConfigurationError, match="pickle is not allowed"):
        oqron_cache.configure(redis_url=redis_url, celery_app=app, namespace=namespace)


def test_row18_json_celery_app_is_accepted(
    no_configuration: None, redis_url: str, namespace: str
) -> None:
    app = _celery_app(task_serializer="json", accept_content=["json"])
    settings = oqron_cache.configure(redis_url=redis_url, celery_app=app, namespace=namespace)
    assert settings.celery_app is app


def test_row18_celery_app_of_wrong_type(no_configuration: None, redis_url: str) -> None:
    with pytest.raises(TypeError, match="celery_app"):
        oqron_cache.configure(redis_url=redis_url, celery_app=object(), namespace="t-x")


def test_row18_pickle_codec_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="pickle"):
        oqron_cache.cache(unique(), ttl="1m", codec="pickle")
    with pytest.raises(ConfigurationError, match="pickle"):
        refreshing_cache(ttl="1m", codec="pickle", name=unique())(lambda x: x)
    assert_not_registered("bad-")


# ---------------------------------------------------------------------------------------------
# row 20: pattern invalidation stays inside the cache


@pytest.mark.parametrize("pattern", ["*", "", "**", "***"])
def test_row20_invalidate_all_needs_allow_all(
    configured: str, make_cache: Any, pattern: str
) -> None:
    c = make_cache(ttl="1m")
    c.set("k", 1)
    with pytest.raises(ValueError) as info:
        c.invalidate_pattern(pattern)
    assert "allow_all=True" in str(info.value)
    assert c.name in str(info.value)
    c.stack.l1.clear()
    assert c.get("k") == 1


@pytest.mark.parametrize("pattern", ["?*", "*?"])
def test_row20_patterns_matching_every_key_need_allow_all(
    configured: str, make_cache: Any, pattern: str
) -> None:
    c = make_cache(ttl="1m")
    c.set("k", 1)
    with pytest.raises(ValueError, match="allow_all"):
        c.invalidate_pattern(pattern)


@pytest.mark.parametrize("pattern", ["*}:v", "}*", "*:*", f"*{'}'}:l*", "../*", "oqron:*", "*\\}*"])
def test_row20_patterns_cannot_leave_the_cache(
    configured: str, make_cache: Any, redis_client: redis.Redis, pattern: str
) -> None:
    c = make_cache(ttl="1m")
    sibling = make_cache(ttl="1m")
    sibling.set("k", "sibling")
    foreign = f"oqron:{configured}:unrelated"
    redis_client.set(foreign, "x", px=60_000)
    c.set("k", "mine")
    before = l2_keys(redis_client, configured)
    removed = c.invalidate_pattern(pattern)
    after = l2_keys(redis_client, configured)
    assert sibling.stack.l2.keys.value("k") in after
    assert foreign in after
    assert removed == len(before) - len(after)
    assert set(before) - set(after) <= {c.stack.l2.keys.value("k")}
    assert sibling.get("k") == "sibling"


@pytest.mark.parametrize("pattern", ["[abc", "x[", "[z-a]*"])
def test_row20_unsupported_glob_is_a_value_error_naming_the_pattern(
    configured: str, make_cache: Any, pattern: str
) -> None:
    c = make_cache(ttl="1m")
    with pytest.raises(ValueError, match="pattern"):
        c.invalidate_pattern(pattern)


def test_row20_pattern_of_wrong_type(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="1m")
    with pytest.raises(TypeError, match="pattern must be a str"):
        c.invalidate_pattern(b"*")


# ---------------------------------------------------------------------------------------------
# row 21: tags


@pytest.mark.parametrize(
    ("tags", "error", "words"),
    [
        (lambda k, v: [1], TypeError, "non-empty str"),
        (lambda k, v: ["ok", None], TypeError, "non-empty str"),
        (lambda k, v: [""], TypeError, "non-empty str"),
        (lambda k, v: "tenant:acme", TypeError, "list of str"),
        (lambda k, v: 42, TypeError, "list of str"),
        (lambda k, v: [f"t{i}" for i in range(3)], ValueError, "max_tags=2"),
    ],
    ids=["int", "None", "empty", "bare str", "not iterable", "too many"],
)
def test_row21_bad_tags(
    configured: str,
    make_cache: Any,
    redis_client: redis.Redis,
    tags: Any,
    error: type,
    words: str,
) -> None:
    c = make_cache(ttl="1m", tags=tags, max_tags=2, resolver=lambda key: "v")
    with pytest.raises(error) as info:
        c.get("k")
    assert words in str(info.value)
    assert c.name in str(info.value)
    assert l2_keys(redis_client, configured) == []  # nothing stored, the lock released
    with pytest.raises(error):
        c.set("k", "v")


def test_row21_tags_must_be_callable_and_max_tags_validated() -> None:
    with pytest.raises(TypeError, match="tags must be callable"):
        oqron_cache.cache(unique(), ttl="1m", tags=["a"])  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="max_tags"):
        oqron_cache.cache(unique(), ttl="1m", max_tags=0)


def test_row21_tags_within_limits_are_stored(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="1m", tags=lambda k, v: ["tenant:acme", "*"], max_tags=2)
    c.set("k", "v")
    entry, _, _ = unpack(cast(bytes, redis_client.get(c.stack.l2.keys.value("k"))))
    assert entry.tags == ("tenant:acme", "*")


def test_row21_huge_tag_is_a_clear_error(configured: str, make_cache: Any) -> None:
    c = make_cache(ttl="1m", tags=lambda k, v: ["x" * 70_000], resolver=lambda key: "v")
    with pytest.raises(ValueError, match=c.name):
        c.get("k")


# ---------------------------------------------------------------------------------------------
# row 22: user keys shaped like internal keys


COLLIDING_KEYS = ["x", "x}:l", "x}:v", "lock:x", "__tags__:y", "gen:z", "{a}", "bus", "stats:x"]


def test_row22_user_keys_never_collide_with_internal_keys(
    configured: str, make_cache: Any, redis_client: redis.Redis
) -> None:
    c = make_cache(ttl="1m")
    for key in COLLIDING_KEYS:
        c.set(key, f"value of {key}")
    rkeys = l2_keys(redis_client, configured)
    assert len(rkeys) == len(COLLIDING_KEYS)
    prefix = f"oqron:{configured}:{{{c.name}:"
    for rkey in rkeys:
        assert rkey.startswith(prefix)
        assert rkey.endswith("}:v")
        assert rkey.count("{") == 1
        assert rkey.count("}") == 1
    assert f"oqron:{configured}:bus" not in rkeys

    # The lock of "x" is not the value of "x}:l", and taking it changes no value.
    stack = c.stack
    assert stack.l2.acquire("x", "token-123", 5.0)
    lock_key = stack.l2.keys.lock("x")
    assert lock_key not in rkeys
    assert redis_client.get(lock_key) == b"rtoken-123"  # phase "r" (computing), then the token
    stack.l1.clear()
    for key in COLLIDING_KEYS:
        assert c.get(key) == f"value of {key}"
    assert stack.l2.release("x", "token-123")


# ---------------------------------------------------------------------------------------------
# row 25: results that depend on context outside the arguments


current_user: contextvars.ContextVar[str] = contextvars.ContextVar("current_user")


def test_row25_vary_on_separates_users_with_the_same_arguments(
    configured: str, closing: Closing
) -> None:
    calls: list[tuple[str, int]] = []

    @closing
    @refreshing_cache(ttl="1m", vary_on=current_user.get)
    def dashboard(page: int) -> str:
        calls.append((current_user.get(), page))
        return f"{current_user.get()}:{page}"

    def as_user(user: str) -> str:
        token = current_user.set(user)
        try:
            return dashboard(1)
        finally:
            current_user.reset(token)

    assert as_user("alice") == "alice:1"
    assert as_user("bob") == "bob:1"
    assert as_user("alice") == "alice:1"
    assert as_user("bob") == "bob:1"
    assert calls == [("alice", 1), ("bob", 1)]


def test_row25_without_vary_on_the_entry_is_shared_documented_trap(
    configured: str, closing: Closing
) -> None:
    @closing
    @refreshing_cache(ttl="1m")
    def dashboard(page: int) -> str:
        return f"{current_user.get()}:{page}"

    token = current_user.set("alice")
    try:
        assert dashboard(1) == "alice:1"
    finally:
        current_user.reset(token)
    token = current_user.set("bob")
    try:
        assert dashboard(1) == "alice:1"  # the trap vary_on= exists for
    finally:
        current_user.reset(token)


def test_row25_vary_on_returning_an_unstable_value_is_a_type_error(
    configured: str, closing: Closing
) -> None:
    @closing
    @refreshing_cache(ttl="1m", vary_on=object)
    def page(n: int) -> int:
        return n

    with pytest.raises(TypeError, match="__vary_on__"):
        page(1)


@pytest.mark.parametrize("param", ["vary_on", "key"])
def test_row25_vary_on_and_key_must_be_callable(param: str) -> None:
    name = unique()
    not_callable: dict[str, Any] = {param: "user"}
    try:
        with pytest.raises(TypeError, match=param):
            refreshing_cache(ttl="1m", name=name, **not_callable)(lambda x: x)
    finally:
        oqron_cache.engine.registry.unregister(name)
