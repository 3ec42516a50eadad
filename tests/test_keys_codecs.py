"""Unit tests of the pure parts: key encoding (keys.py), codecs (serializers.py), the envelope and
the read-path decision (entry.py) and the circuit breaker (breaker.py). No Redis."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import hashlib
import math
import struct
import uuid
from typing import Any

import pytest

from oqron_cache.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from oqron_cache.core.codecs import JsonCodec, MsgpackCodec, get_codec
from oqron_cache.core.entry import (
    FORMAT,
    HEADER_SIZE,
    NO_VERSION,
    Action,
    Corrupt,
    Entry,
    decide,
    new_version,
    pack,
    unpack,
)
from oqron_cache.core.errors import ConfigurationError, InvalidKeyError, SerializationError
from oqron_cache.core.keys import (
    Glob,
    KeySpace,
    bus_channel,
    decode_call,
    encode_call,
    encode_call_ex,
    escape,
    escape_glob,
    glob_literal,
    printable,
    stats_key,
    unescape,
    validate_cache_name,
    validate_namespace,
)

# ---------------------------------------------------------------------------------------------
# encode_call / decode_call

ROUND_TRIP_ARGS: list[Any] = [
    "",
    "plain",
    "a:b|c(d)e",
    "s3:abc",  # looks like an encoding itself
    "\r\n\x00 émoji 🎉",
    "\ud800",  # a lone surrogate is a valid Python str
    0,
    -17,
    10**30,
    True,
    False,
    None,
    0.0,
    -0.0,
    1.5,
    float("inf"),
    b"",
    b"\x00\xffbytes",
    (),
    (1, "a", (2, (3,))),
    [],
    [1, [2, [3, "x"]], {"k": (1, 2)}],
    {},
    {"b": 1, "a": [1, 2], 3: "int key", (1, 2): None},
    frozenset(),
    frozenset({1, "a", (2, 3)}),
    decimal.Decimal("1.10"),
    decimal.Decimal("-0"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    dt.datetime(2024, 2, 29, 23, 59, 59, 123456),
    dt.datetime(2024, 1, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    dt.date(1999, 12, 31),
    dt.time(7, 8, 9, 10),
    dt.timedelta(0),
    dt.timedelta(days=3, hours=4, microseconds=7),
    dt.timedelta(seconds=-1),
    dt.timedelta(days=-2, seconds=5),
    dt.timedelta(microseconds=1),
]


@pytest.mark.parametrize("value", ROUND_TRIP_ARGS, ids=repr)
def test_encode_decode_round_trip_positional(value: Any) -> None:
    key = encode_call("m.f", ("x",), (value,), {})
    args, kwargs = decode_call(key)
    assert kwargs == {}
    assert len(args) == 1
    assert args[0] == value
    assert type(args[0]) is type(value)
    if isinstance(value, float):  # -0.0 == 0.0: check the sign survived too
        assert math.copysign(1.0, args[0]) == math.copysign(1.0, value)


def test_encode_decode_round_trip_nested_types_and_kwargs() -> None:
    value = {
        "list": [1, (2, 3), frozenset({4})],
        "dec": decimal.Decimal("3.14"),
        "when": dt.datetime(2020, 1, 2, 3, 4, 5),
        "id": uuid.UUID(int=7),
        "span": dt.timedelta(minutes=90),
    }
    key = encode_call("m.f", ("a", "b"), (1, "two"), {"z": value, "y": None})
    args, kwargs = decode_call(key)
    assert args == (1, "two")
    assert kwargs == {"z": value, "y": None}
    assert type(kwargs["z"]["list"][1]) is tuple
    assert type(kwargs["z"]["list"][2]) is frozenset


def test_decode_nan_float() -> None:
    (arg,), _ = decode_call(encode_call("m.f", ("x",), (float("nan"),), {}))
    assert math.isnan(arg)


def test_set_argument_comes_back_as_frozenset_and_shares_the_key() -> None:
    key_set = encode_call("m.f", ("x",), ({3, 1, 2},), {})
    key_frozen = encode_call("m.f", ("x",), (frozenset({2, 3, 1}),), {})
    assert key_set == key_frozen
    assert decode_call(key_set) == ((frozenset({1, 2, 3}),), {})


def test_no_arguments_is_the_empty_key() -> None:
    assert encode_call("m.f", (), (), {}) == ""
    assert decode_call("") == ((), {})


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (((1,), {}), ((True,), {})),
        (((1,), {}), ((1.0,), {})),
        (((True,), {}), ((1.0,), {})),
        (((0,), {}), ((False,), {})),
        (((0,), {}), ((None,), {})),
        ((("a:b", "c"), {}), (("a", "b:c"), {})),
        ((("ab",), {}), (("a", "b"), {})),
        ((("1",), {}), ((1,), {})),
        (((b"ab",), {}), (("6162",), {})),
        (((), {"a": "b=1"}), ((), {"a=b": "1"})),
        (((), {"a": 1, "b": 2}), ((), {"a": 1, "bb": 2})),
        ((((1, 2),), {}), (([1, 2],), {})),
        ((((1, 2),), {}), ((1, 2), {})),
        ((({"a": 1},), {}), ((frozenset({"a", 1}),), {})),
        ((({1: "a"},), {}), (({"1": "a"},), {})),
        (((decimal.Decimal("1"),), {}), ((1,), {})),
        ((("x",), {}), ((), {"x": "x"})),
        (((dt.date(2020, 1, 1),), {}), ((dt.datetime(2020, 1, 1),), {})),
    ],
    ids=str,
)
def test_encode_call_is_unambiguous(left: Any, right: Any) -> None:
    params = ("a", "b")
    assert encode_call("m.f", params, left[0], left[1]) != encode_call(
        "m.f", params, right[0], right[1]
    )


def test_kwargs_order_does_not_matter() -> None:
    assert encode_call("m.f", (), (), {"a": 1, "b": 2}) == encode_call(
        "m.f", (), (), {"b": 2, "a": 1}
    )
    assert encode_call("m.f", (), ({"a": 1, "b": 2},), {}) == encode_call(
        "m.f", (), ({"b": 2, "a": 1},), {}
    )


class Color(enum.Enum):
    RED = 1


class Keyed:
    def __init__(self, ident: int) -> None:
        self.ident = ident

    def __cache_key__(self) -> Any:
        return ("keyed", self.ident)


def test_enum_and_cache_key_objects_are_encoded_but_not_rebuildable() -> None:
    key, rebuildable = encode_call_ex("m.f", ("x",), (Color.RED,), {})
    assert not rebuildable
    assert "Color" in key
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        decode_call(key)
    key1, rebuildable1 = encode_call_ex("m.f", ("x",), ([Keyed(1)],), {})
    key2, _ = encode_call_ex("m.f", ("x",), ([Keyed(2)],), {})
    assert not rebuildable1
    assert key1 != key2
    assert key1 == encode_call("m.f", ("x",), ([Keyed(1)],), {})
    _, plain = encode_call_ex("m.f", ("x",), ([1, {"a": (2,)}],), {})
    assert plain


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((object(),), {}, "'x'"),
        ((1, lambda: 1), {}, "'y'"),
        ((1, 2, object()), {}, "'#2'"),
        ((), {"flag": object()}, "'flag'"),
        (([1, {"deep": object()}],), {}, "'x'"),
    ],
)
def test_unstable_argument_is_a_type_error_naming_it(
    args: tuple[Any, ...], kwargs: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidKeyError) as info:
        encode_call("mod.func", ("x", "y"), args, kwargs)
    assert isinstance(info.value, TypeError)
    message = str(info.value)
    assert named in message
    assert "mod.func" in message
    assert "__cache_key__" in message


def test_huge_int_argument_is_encoded_or_refused_with_a_named_error() -> None:
    try:
        key = encode_call("mod.func", ("x",), (10**5000,), {})
    except InvalidKeyError as exc:
        assert "'x'" in str(exc)
    else:
        assert decode_call(key) == ((10**5000,), {})


@pytest.mark.parametrize("bad", ["t2(i1:1", "i1:", "x", "|s1:a", "d1(i1:1)", "l1(s1:a"])
def test_decode_call_rejects_malformed_keys(bad: str) -> None:
    # Truncated containers raise IndexError today; any refusal will do for these.
    with pytest.raises((ValueError, IndexError)):
        decode_call(bad)


def test_decode_call_rejects_a_length_prefix_past_the_end() -> None:
    with pytest.raises(ValueError):
        decode_call("s9:ab")


# ---------------------------------------------------------------------------------------------
# escape / escape_glob / glob_literal / printable


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("user_123", "user_123"),
        ("a:b/c=d", "a:b/c=d"),
        ("a b", "a%20b"),
        ("%", "%25"),
        ("%20", "%2520"),
        ("{x}", "%7Bx%7D"),
        ("*?[]\\", "%2A%3F%5B%5D%5C"),
        ("#", "%23"),
        ("\r\n\x00\t", "%0D%0A%00%09"),
        ("é", "%C3%A9"),
        ("🎉", "%F0%9F%8E%89"),
        ("\ud800", "%ED%A0%80"),
        ("", ""),
    ],
)
def test_escape(text: str, expected: str) -> None:
    assert escape(text) == expected
    assert all(0x21 <= ord(ch) < 0x7F for ch in escape(text))


def test_escape_is_injective_on_tricky_pairs() -> None:
    samples = ["a b", "a%20b", "a%2520b", "#" + "0" * 64, "{a}", "%7Ba%7D", "a*", "a%2A", "\x00"]
    assert len({escape(s) for s in samples}) == len(samples)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("user_*", "user_*"),
        ("a?c", "a*c"),  # '?' and classes widen to '*' in SCAN; Glob.matches decides
        ("[ab]x", "*x"),
        ("[^ab]x", "*x"),
        ("**a??", "*a*"),
        ("a\\*b", "a%2Ab"),
        ("a\\?b", "a%3Fb"),
        ("a\\[b", "a%5Bb"),
        ("a\\\\b", "a%5Cb"),
        ("a b*", "a%20b*"),
        ("é*", "%C3%A9*"),
        ("{x}*", "%7Bx%7D*"),
        ("100%", "100%25"),
        ("trailing\\", "trailing%5C"),
    ],
)
def test_escape_glob_scan_fragment(pattern: str, expected: str) -> None:
    assert escape_glob(pattern) == expected
    assert Glob(pattern).scan == expected
    # The SCAN fragment never holds '?', '[' or ']', and a '*' only where the user put a
    # wildcard: literal text is escaped like keys are.
    assert not set(expected) & set("?[]\\")


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        ("user_*", ["user_", "user_1", "user_\n x"], ["user", "xuser_1", "User_1"]),
        ("a?b", ["a b", "aéb", "a*b", "a\nb", "a\ud800b"], ["ab", "a  b", "a b "]),
        ("[ab]x", ["ax", "bx"], ["cx", "abx", "x"]),
        ("[^ab]x", ["cx", " x", "éx"], ["ax", "bx", "x"]),
        ("[a-c]*", ["a", "b1", "c-"], ["d", "A", ""]),
        ("[]]x", ["]x"], ["x", "]]x"]),
        ("\\*", ["*"], ["", "a", "**"]),
        ("a\\?b", ["a?b"], ["axb"]),
        ("\\[a\\]", ["[a]"], ["a"]),
        ("*", ["", "anything", "\r\n"], []),
        ("%4?", ["%41", "%4x"], ["A"]),  # '%' is literal, never an escape
    ],
)
def test_glob_matches_unescaped_keys(
    pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    glob = Glob(pattern)
    for key in matching:
        assert glob.matches(key), key
    for key in not_matching:
        assert not glob.matches(key), key


@pytest.mark.parametrize("pattern", ["[abc", "[]", "x[", "[z-a]*"])
def test_glob_refuses_broken_classes(pattern: str) -> None:
    with pytest.raises(ConfigurationError, match="pattern"):
        Glob(pattern)


@pytest.mark.parametrize("key", ["a b", "x}:l", "%41", "\ud800", "\r\n", "é🎉", "#x", "{a}"])
def test_unescape_inverts_escape_and_user_key_inverts_value(key: str) -> None:
    assert unescape(escape(key)) == key
    ks = KeySpace("ns", "c", 200)
    assert ks.user_key(ks.value(key)) == key


def test_user_key_of_foreign_or_hashed_keys_is_none() -> None:
    ks = KeySpace("ns", "c", 32)
    assert ks.user_key(ks.value("k" * 40)) is None  # hashed: the key cannot be recovered
    assert ks.user_key(ks.lock("x")) is None
    assert ks.user_key("oqron:ns:{d:x}:v") is None
    assert ks.user_key("oqron:other:{c:x}:v") is None


def test_glob_literal() -> None:
    assert glob_literal("plain:{x}") == "plain:{x}"
    assert glob_literal("a*b?c[d]e\\f") == "a\\*b\\?c\\[d\\]e\\\\f"


def test_printable_escapes_control_characters_and_truncates() -> None:
    shown = printable("x\r\nFAKE LOG LINE\x00")
    assert "\r" not in shown
    assert "\n" not in shown
    assert "\x00" not in shown
    assert "%0D%0A" in shown
    long = printable("k" * 500, limit=80)
    assert long.startswith("k" * 80)
    assert long.endswith("...(500 chars)")


# ---------------------------------------------------------------------------------------------
# KeySpace, namespaces and names


def test_keyspace_layout() -> None:
    ks = KeySpace("ns1", "users", 200)
    assert ks.value("u1") == "oqron:ns1:{users:u1}:v"
    assert ks.lock("u1") == "oqron:ns1:{users:u1}:l"
    assert ks.value("a b}*") == "oqron:ns1:{users:a%20b%7D%2A}:v"
    assert bus_channel("ns1") == "oqron:ns1:bus"
    assert stats_key("ns1", "users") == "oqron:ns1:stats:users"


def test_keyspace_cache_name_with_angle_brackets_and_dots() -> None:
    ks = KeySpace("ns", "mod.Class.method", 200)
    assert ks.value("k") == "oqron:ns:{mod.Class.method:k}:v"


@pytest.mark.parametrize(
    "key", ["x}:l", "x}:v", "lock:x", "__tags__:y", "gen:z", "{a}", "x}", "}", "#abc", "a{b"]
)
def test_user_keys_never_produce_internal_key_shapes(key: str) -> None:
    ks = KeySpace("ns", "c", 200)
    value_key = ks.value(key)
    # Exactly one hash tag: the first '{' opens it and the first '}' closes it right before the
    # part suffix, so the part is always ours and Cluster slots follow the entry.
    assert value_key.count("{") == 1
    assert value_key.count("}") == 1
    assert value_key.endswith("}:v")
    assert value_key != ks.lock("x")
    assert value_key != ks.value("x")
    assert not value_key.startswith(bus_channel("ns"))


def test_keyspace_hashes_long_keys_with_full_sha256() -> None:
    ks = KeySpace("ns", "c", 32)
    key = "k" * 33
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert ks.encoded(key) == "#" + digest
    assert ks.value(key) == f"oqron:ns:{{c:#{digest}}}:v"
    assert ks.encoded("k" * 32) == "k" * 32
    # The length limit is on the escaped form: 11 spaces escape to 33 chars.
    assert ks.encoded(" " * 11).startswith("#")
    # A lone surrogate still hashes (surrogatepass), and a literal '#' key cannot collide.
    assert ks.encoded("\ud800" * 20).startswith("#")
    assert ks.encoded("#" + digest[:20]).startswith("%23")


def test_match_values_is_confined_to_the_cache() -> None:
    ks = KeySpace("ns", "c", 200)
    assert ks.match_values("user_*") == "oqron:ns:{c:user_*}:v"
    assert ks.match_values("a\\*b") == "oqron:ns:{c:a%2Ab}:v"
    assert ks.match_values("}:v*") == "oqron:ns:{c:%7D:v*}:v"


@pytest.mark.parametrize("ns", ["a", "A-z_0.9", "x" * 64])
def test_valid_namespaces(ns: str) -> None:
    assert validate_namespace(ns) == ns


@pytest.mark.parametrize("ns", ["", "a:b", "a*", "a b", "x" * 65, "a{b}", "é", "\na"])
def test_invalid_namespaces(ns: str) -> None:
    with pytest.raises(ConfigurationError, match=r"namespace must match"):
        validate_namespace(ns)


def test_trailing_newline_in_namespace_and_cache_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="namespace must match"):
        validate_namespace("ns\n")
    with pytest.raises(ConfigurationError, match="cache name"):
        validate_cache_name("c\n")


def test_namespace_of_wrong_type() -> None:
    with pytest.raises(TypeError, match="namespace"):
        validate_namespace(b"ns")


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a{b", "a*", "x" * 201, "é"])
def test_invalid_cache_names(name: str) -> None:
    with pytest.raises(ConfigurationError, match="cache name"):
        validate_cache_name(name)


# ---------------------------------------------------------------------------------------------
# codecs


JSON_VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**100,
    1.5,
    "",
    "\ud800 lone surrogate",
    "é🎉\x00",
    [],
    [1, [2, [3]]],
    {"a": {"b": [None, 1.25]}},
]


@pytest.mark.parametrize("value", JSON_VALUES, ids=repr)
@pytest.mark.parametrize("codec_name", ["json", "msgpack"])
def test_codec_round_trip(codec_name: str, value: Any) -> None:
    if codec_name == "msgpack" and value in (2**100, "\ud800 lone surrogate"):
        return  # covered by the xfail tests below (big ints, lone surrogates)
    codec = get_codec(codec_name)
    decoded = codec.decode(codec.encode(value, "m.f"))
    assert decoded == value
    assert type(decoded) is type(value)


def test_msgpack_keeps_bytes_and_int_keys() -> None:
    codec = get_codec("msgpack")
    value = {1: b"\x00\xff", "s": [b"", {2: "two"}], -3: None}
    decoded = codec.decode(codec.encode(value, "m.f"))
    assert decoded == value
    assert type(decoded[1]) is bytes
    assert set(decoded) == {1, "s", -3}


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        ((1, 2), "tuple"),
        (decimal.Decimal("1"), "Decimal"),
        (dt.datetime(2020, 1, 1), "datetime"),
        (b"raw", "bytes"),
        (object(), "object"),
        ([1, {"x": {1, 2}}], "set"),
    ],
    ids=repr,
)
def test_json_refuses_values_it_would_change(value: Any, type_name: str) -> None:
    with pytest.raises(SerializationError) as info:
        JsonCodec().encode(value, "mod.func")
    assert isinstance(info.value, TypeError)
    assert f"value of type {type_name} returned by mod.func" in str(info.value)
    assert "'json'" in str(info.value)
    assert info.value.cache == "mod.func"


@pytest.mark.parametrize("codec_name", ["json", "msgpack"])
@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), [1.0, {"x": float("nan")}]],
    ids=repr,
)
def test_codecs_refuse_nan_and_infinity(codec_name: str, value: Any) -> None:
    with pytest.raises(SerializationError, match=r"mod\.func"):
        get_codec(codec_name).encode(value, "mod.func")


@pytest.mark.parametrize("key", [1, True, 1.5, None, (1,)], ids=repr)
def test_json_refuses_non_str_dict_keys(key: Any) -> None:
    with pytest.raises(SerializationError, match="dict key of type"):
        JsonCodec().encode({key: "v"}, "mod.func")


@pytest.mark.parametrize("key", [True, 1.5, None, (1,), b"b"], ids=repr)
def test_msgpack_refuses_dict_keys_other_than_str_and_int(key: Any) -> None:
    with pytest.raises(SerializationError, match="dict key of type"):
        MsgpackCodec().encode({key: "v"}, "mod.func")


def test_msgpack_refuses_tuples() -> None:
    with pytest.raises(SerializationError, match="tuple"):
        MsgpackCodec().encode([(1, 2)], "mod.func")


def test_msgpack_big_int_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match=r"mod\.func"):
        MsgpackCodec().encode({"id": 2**70}, "mod.func")


def test_msgpack_round_trips_a_lone_surrogate_like_json() -> None:
    codec = MsgpackCodec()
    assert codec.decode(codec.encode(["\ud800"], "mod.func")) == ["\ud800"]


def test_codecs_refuse_very_deep_nesting() -> None:
    value: Any = "leaf"
    for _ in range(150):
        value = [value]
    for codec in (JsonCodec(), MsgpackCodec()):
        with pytest.raises(SerializationError, match="nested deeper"):
            codec.encode(value, "mod.func")


def test_json_decode_of_garbage_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        JsonCodec().decode(b"\x80\x04not json")


def test_get_codec() -> None:
    assert get_codec("json").codec_id == 1
    assert get_codec("msgpack").codec_id == 2
    with pytest.raises(ConfigurationError, match="pickle"):
        get_codec("pickle")
    with pytest.raises(ConfigurationError, match="unknown codec 'yaml'"):
        get_codec("yaml")
    with pytest.raises(TypeError, match="codec"):
        get_codec(None)


# ---------------------------------------------------------------------------------------------
# envelope


def _entry(**overrides: Any) -> Entry:
    fields: dict[str, Any] = {
        "value": None,
        "created_at": 1000.5,
        "fresh_until": 1060.25,
        "stale_until": 1120.125,
        "version": new_version(),
        "tags": (),
        "delta": 0.75,
    }
    fields.update(overrides)
    return Entry(**fields)


def test_pack_unpack_round_trip() -> None:
    entry = _entry(tags=("tenant:acme", "é*"))
    raw = pack(entry, 2, b"payload-bytes")
    back, codec_id, payload = unpack(raw)
    assert codec_id == 2
    assert bytes(payload) == b"payload-bytes"
    assert back.version == entry.version
    assert (back.created_at, back.fresh_until, back.stale_until, back.delta) == (
        1000.5,
        1060.25,
        1120.125,
        0.75,
    )
    assert back.tags == ("tenant:acme", "é*")
    assert not back.tombstone
    assert back.size == len(raw)
    assert raw[0] == FORMAT
    assert raw[2:10] == entry.version  # the offset Lua compares


def test_pack_unpack_tombstone_without_tags() -> None:
    raw = pack(_entry(tombstone=True), 1, b"")
    back, codec_id, payload = unpack(raw)
    assert back.tombstone
    assert back.tags == ()
    assert codec_id == 1
    assert bytes(payload) == b""
    assert len(raw) == HEADER_SIZE


def test_new_version_is_random_8_bytes() -> None:
    versions = {new_version() for _ in range(100)}
    assert len(versions) == 100
    assert all(len(v) == 8 for v in versions)
    assert NO_VERSION not in versions


def _with_tags_block(block: bytes) -> bytes:
    header = struct.pack(">BB8sddddH", FORMAT, 1 << 4, b"v" * 8, 0.0, 0.0, 0.0, 0.0, len(block))
    return header + block


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01",
        b"\x01" * (HEADER_SIZE - 1),
        b"\x02" + b"\x00" * HEADER_SIZE,
        b"\x80\x04\x95" + b"\x00" * 60,  # a pickle protocol-4 prefix
        b'{"json": "value"}' + b" " * 40,
        _with_tags_block(b"not json"),
        _with_tags_block(b'{"a": 1}'),
        _with_tags_block(b"[1, 2]"),
        _with_tags_block(b'["ok", null]'),
        _with_tags_block(b'["x"]')[:-2],  # truncated tags block
    ],
)
def test_unpack_corrupt_input(raw: bytes) -> None:
    with pytest.raises(Corrupt):
        unpack(raw)


# ---------------------------------------------------------------------------------------------
# decide


@pytest.mark.parametrize(
    ("now", "swr", "expected"),
    [
        (50.0, True, Action.SERVE),
        (50.0, False, Action.SERVE),
        (99.999, False, Action.SERVE),
        (100.0, True, Action.SERVE_AND_REFRESH),  # fresh_until itself is stale
        (150.0, True, Action.SERVE_AND_REFRESH),
        (100.0, False, Action.LOAD),
        (150.0, False, Action.LOAD),
        (200.0, True, Action.LOAD),  # stale_until itself is expired (P3)
        (200.0, False, Action.LOAD),
        (1e9, True, Action.LOAD),
    ],
)
def test_decide(now: float, swr: bool, expected: Action) -> None:
    assert decide(100.0, 200.0, now, swr) is expected


def test_decide_without_stale_window_never_serves_stale() -> None:
    assert decide(100.0, 100.0, 100.0, True) is Action.LOAD
    assert decide(100.0, 100.0, 99.0, True) is Action.SERVE


# ---------------------------------------------------------------------------------------------
# circuit breaker


class Ticker:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_closed_open_half_open_closed() -> None:
    clock = Ticker()
    breaker = CircuitBreaker(cooldown=1.0, max_cooldown=4.0, clock=clock)
    assert breaker.state == CLOSED
    # bool(): mypy would otherwise keep breaker.is_open narrowed to False across failure()
    # below, and treat the rest of this test as unreachable.
    assert not bool(breaker.is_open)
    assert breaker.allow()
    breaker.success()
    breaker.failure()
    assert breaker.state == OPEN
    assert breaker.is_open
    assert breaker.trips == 1
    assert not breaker.allow()
    clock.now += 0.999
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow()  # only one probe
    assert not breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_breaker_failed_probe_doubles_cooldown_up_to_max_and_success_resets() -> None:
    clock = Ticker()
    breaker = CircuitBreaker(cooldown=1.0, max_cooldown=5.0, clock=clock)
    breaker.failure()
    expected_cooldowns = [2.0, 4.0, 5.0, 5.0]
    waited = 1.0
    for cooldown in expected_cooldowns:
        clock.now += waited
        assert breaker.allow()
        assert breaker.state == HALF_OPEN
        breaker.failure()  # the probe failed
        assert breaker.state == OPEN
        clock.now += cooldown - 0.01
        assert not breaker.allow()
        waited = 0.01
    clock.now += 0.01
    assert breaker.allow()
    breaker.success()
    assert breaker.state == CLOSED
    assert breaker.trips == 1 + len(expected_cooldowns)
    # After closing, the next trip starts from the base cooldown again.
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()


def test_breaker_failure_while_closed_uses_base_cooldown() -> None:
    clock = Ticker()
    breaker = CircuitBreaker(cooldown=0.5, max_cooldown=5.0, clock=clock)
    breaker.failure()
    clock.now += 0.5
    assert breaker.allow()
    breaker.success()
    breaker.failure()
    clock.now += 0.49
    assert not breaker.allow()
    clock.now += 0.01
    assert breaker.allow()
