"""Typed values (issue 14, DESIGN section 12): ``value_type=`` round-trips without pickle.

Every supported kind of value goes through L1 (the object itself) and L2 (msgspec's bytes,
decoded with the type) on both fronts, set by ``set()`` and filled by a resolver, and must come
back equal *and of the same types all the way down* (:func:`same`). A value that does not fit is
refused where it enters, naming the field; entries written before ``value_type`` was declared
still read. ``assert_type`` lines are checked by mypy (``Cache[User]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import sys
import uuid
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple, TypedDict

import msgspec
import pydantic
import pytest

import oqron_cache
from oqron_cache import MemoryTier, RedisTier, refreshing_cache
from oqron_cache.core.entry import unpack
from oqron_cache.core.errors import ConfigurationError, SerializationError
from oqron_cache.core.typed import TYPED_JSON_ID, TYPED_MSGPACK_ID
from oqron_cache.testing import wait_for_refreshes

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # pragma: no cover - Python 3.10
    from typing_extensions import assert_type


class Role(enum.Enum):
    ADMIN = "admin"
    EDITOR = "editor"


@dataclasses.dataclass
class Address:
    street: str
    zip: str


@dataclasses.dataclass
class User:
    id: uuid.UUID
    name: str
    born: date
    joined: datetime
    balance: Decimal
    role: Role
    tags: set[str]
    avatar: bytes
    address: Address
    scores: list[int]
    meta: dict[str, float]
    wakes: time
    pair: tuple[int, str]
    nickname: str | None = None


class Point(NamedTuple):
    x: int
    y: int


class Movie(TypedDict):
    title: str
    year: int


class Item(msgspec.Struct):
    sku: str
    qty: int
    price: Decimal


class Account(pydantic.BaseModel):
    id: int
    owner: str
    opened: datetime


def a_user(n: int = 1) -> User:
    return User(
        id=uuid.UUID(int=n),
        name=f"user {n}",
        born=date(1990, 1, n),
        joined=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
        balance=Decimal("1234.50"),
        role=Role.EDITOR,
        tags={"a", "b"},
        avatar=b"\x00\xffpng",
        address=Address("1 Main St", "12345"),
        scores=[1, 2, 3],
        meta={"x": 0.5},
        wakes=time(7, 30),
        pair=(n, "one"),
    )


SAMPLES: list[tuple[str, Any, Any]] = [
    ("dataclass", User, a_user()),
    ("NamedTuple", Point, Point(1, 2)),
    ("TypedDict", Movie, Movie(title="Heat", year=1995)),
    ("Struct", Item, Item("sku-1", 3, Decimal("9.99"))),
    ("pydantic", Account, Account(id=1, owner="ada", opened=datetime(2026, 5, 1, 12, 0))),
    ("datetime", datetime, datetime(2026, 12, 4, 20, 15, 1, 5, tzinfo=timezone(timedelta(hours=2)))),  # noqa: E501
    ("naive datetime", datetime, datetime(2026, 12, 4, 20, 15)),
    ("date", date, date(2026, 12, 4)),
    ("time", time, time(23, 59, 59, 999999)),
    ("timedelta", timedelta, timedelta(days=2, microseconds=3)),
    ("UUID", uuid.UUID, uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("Decimal", Decimal, Decimal("1.10")),
    ("Enum", Role, Role.ADMIN),
    ("bytes", bytes, b"\x00\x01\xfe\xff"),
    ("set", set[int], {3, 1, 2}),
    ("frozenset", frozenset[str], frozenset({"x", "y"})),
    ("tuple", tuple[int, ...], (1, 2, 3)),
    ("list of dataclasses", list[User], [a_user(1), a_user(2)]),
    ("nested", dict[str, list[Point]], {"a": [Point(1, 2)], "b": []}),
    ("list of pydantic", list[Account], [Account(id=2, owner="b", opened=datetime(2026, 1, 1))]),
]
IDS = [name for name, _, _ in SAMPLES]


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same type at every level (``1 == 1.0`` and ``(1,) == [1]`` are not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Decimal):
        return str(a) == str(b)  # 1.10 is not 1.1
    if isinstance(a, datetime | time):
        return bool(a == b and a.utcoffset() == b.utcoffset())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, set | frozenset):
        return a == b and {type(x) for x in a} == {type(x) for x in b}
    if dataclasses.is_dataclass(a):
        return all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, msgspec.Struct):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__struct_fields__)
    if isinstance(a, pydantic.BaseModel):
        return all(same(getattr(a, f), getattr(b, f)) for f in type(a).model_fields)
    return bool(a == b)


def tiers() -> list[Any]:
    return [MemoryTier(max_size=100, ttl="1m"), RedisTier(ttl="1m")]


def clear_l1(cache: Any) -> None:
    cache.stack.l1.clear()


def codec_id_in_l2(cache: Any, key: str) -> int:
    raw = cache.stack.l2.read(key)
    assert raw is not None
    return unpack(raw)[1]


# -- every type, both tiers, both fronts, set and fill -------------------------------------


@pytest.mark.parametrize(("label", "value_type", "value"), SAMPLES, ids=IDS)
def test_each_type_round_trips_through_l1_and_l2(
    label: str, value_type: Any, value: Any, configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers(), value_type=value_type, resolver=lambda key: value)
    cache.set("k", value)
    assert cache.get("k") is value  # L1 keeps the object itself
    cache.stack.l1.clear()
    got = cache.get("k")  # from L2: decoded with the type
    assert same(got, value), (got, value)
    assert codec_id_in_l2(cache, "k") == TYPED_JSON_ID
    assert cache.get_stats(local=True)["l2_hits"] == 1

    filled = cache.get("filled")  # a resolver's value: checked, then stored alike
    assert filled is value
    cache.stack.l1.clear()
    assert same(cache.get("filled"), value)


@pytest.mark.asyncio
@pytest.mark.parametrize(("label", "value_type", "value"), SAMPLES, ids=IDS)
async def test_each_type_round_trips_on_the_async_front(
    label: str, value_type: Any, value: Any, configured: str, make_cache: Callable[..., Any]
) -> None:
    async def resolve(key: str) -> Any:
        await asyncio.sleep(0)
        return value

    cache = make_cache(tiers=tiers(), value_type=value_type, resolver=resolve)
    await cache.aset("k", value)
    assert await cache.aget("k") is value
    cache.stack.l1.clear()
    assert same(await cache.aget("k"), value)
    assert same((await cache.aget_many(["k"]))["k"], value)
    assert await cache.aget("filled") is value
    cache.stack.l1.clear()
    assert same(await cache.aget("filled"), value)


@pytest.mark.parametrize(
    ("label", "value_type", "value"),
    [s for s in SAMPLES if "pydantic" not in s[0]],
    ids=[s[0] for s in SAMPLES if "pydantic" not in s[0]],
)
def test_msgpack_based_typed_values_round_trip(
    label: str, value_type: Any, value: Any, configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers(), value_type=value_type, codec="msgpack")
    cache.set("k", value)
    cache.stack.l1.clear()
    got = cache.get("k")
    if isinstance(value, datetime) and value.tzinfo is not None:
        # msgpack's timestamp keeps the instant, in UTC: the offset is not kept (JSON keeps it)
        assert got == value and got.utcoffset() == timedelta(0)
    else:
        assert same(got, value)
    assert codec_id_in_l2(cache, "k") == TYPED_MSGPACK_ID


def test_a_cached_none_is_a_value_of_a_typed_cache(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers(), value_type=User)
    cache.set("k", None)
    cache.stack.l1.clear()
    assert cache.get("k", "absent") is None


# -- what does not fit is refused where it enters ---------------------------------------------


def test_a_mismatch_is_refused_at_set_naming_the_field_and_nothing_is_stored(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    cache = make_cache(tiers=tiers(), value_type=User)
    bad = a_user()
    bad.scores = [1, "two"]  # type: ignore[list-item]
    field = r"Expected `int`, got `str` - at `\$\.scores\[1\]`"
    with pytest.raises(SerializationError, match=field):
        cache.set("k", bad)
    bad = a_user()
    bad.address = {"street": "x", "zip": "y"}  # type: ignore[assignment]
    with pytest.raises(SerializationError, match="would not come back the same"):
        cache.set("k", bad)  # a dict where an Address belongs: L2 would give an Address
    with pytest.raises(SerializationError, match="value_type User"):
        cache.set("k", dataclasses.asdict(a_user()))  # the right fields, the wrong type
    with pytest.raises(SerializationError, match="does not fit value_type Point"):
        make_cache(tiers=tiers(), value_type=Point).set("p", Point("a", 2))  # type: ignore[arg-type]
    with pytest.raises(SerializationError):
        make_cache(tiers=tiers(), value_type=float).set("f", float("nan"))
    with pytest.raises(SerializationError, match="Account"):
        make_cache(tiers=tiers(), value_type=Account).set("a", {"id": 1})
    assert cache.stack.l2.read("k") is None
    assert cache.get("k") is None  # nothing reached L1 either


def test_a_resolver_value_that_does_not_fit_reaches_the_caller_and_a_refresh_keeps_the_stale(
    configured: str, make_cache: Callable[..., Any], clock: Any
) -> None:
    answers: list[Any] = [a_user(1), {"not": "a user"}]
    cache = make_cache(
        tiers=tiers(),
        ttl=None,
        stale_ttl="10m",
        value_type=User,
        resolver=lambda key: answers.pop(0),
        clock=clock,
    )
    assert same(cache.get("k"), a_user(1))
    clock.tick(61)  # stale: the refresh's resolver returns what does not fit
    assert same(cache.get("k"), a_user(1))
    wait_for_refreshes()
    counts = cache.get_stats(local=True)
    assert counts["refresh_failures"] == 1
    assert counts["refreshes_succeeded"] == 0
    cache.stack.l1.clear()
    assert same(cache.get("k"), a_user(1))  # L2 still holds the stale, well-typed value
    with pytest.raises(SerializationError, match="value_type User"):
        make_cache(tiers=tiers(), value_type=User, resolver=lambda key: [1]).get("cold")


# -- entries from before value_type, and readers without it --------------------------------------


def test_entries_written_without_value_type_still_read_and_untyped_readers_read_typed_ones(
    configured: str, make_cache: Callable[..., Any]
) -> None:
    name = "typed-upgrade"
    plain = make_cache(name=name, tiers=tiers())
    plain.set("old", {"street": "1 Main St", "zip": "12345"})
    plain.close()
    typed = make_cache(name=name, tiers=tiers(), value_type=Address)
    assert typed.get("old") == Address("1 Main St", "12345")  # converted from plain JSON
    typed.set("new", Address("2 High St", "999"))
    typed.close()
    again = make_cache(name=name, tiers=tiers())  # a process that does not declare it
    assert again.get("new") == {"street": "2 High St", "zip": "999"}
    assert again.get_stats(local=True)["corrupt"] == 0


# -- the decorator and declaration errors --------------------------------------------------------


def test_refreshing_cache_takes_the_type_from_the_return_annotation(configured: str) -> None:
    @refreshing_cache(ttl="1m", name="typed-fn")
    def find_user(n: int) -> User:
        return a_user(n)

    @refreshing_cache(ttl="1m", name="typed-afn")
    async def afind(n: int) -> list[Point] | None:
        return [Point(n, n)]

    @refreshing_cache(ttl="1m", name="plain-fn")
    def plain(n: int) -> dict[str, Any]:
        return {"n": n}

    @refreshing_cache(ttl="1m", name="explicit-fn", value_type=Movie)
    def movie(n: int) -> Any:
        return Movie(title="m", year=n)

    try:
        assert same(find_user(3), a_user(3))
        clear_l1(find_user.cache)
        assert same(find_user(3), a_user(3))
        assert asyncio.run(afind(2)) == [Point(2, 2)]
        clear_l1(afind.cache)
        assert same(asyncio.run(afind(2)), [Point(2, 2)])
        assert plain(1) == {"n": 1}
        assert movie(1995) == {"title": "m", "year": 1995}
        codecs = {
            f.cache.options.value_type
            for f in (find_user, afind, plain, movie)
        }
        assert codecs == {User, list[Point], None, Movie}
    finally:
        for f in (find_user, afind, plain, movie):
            f.cache.close()


def test_value_type_errors_name_the_parameter_and_the_type() -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match="value_type must be a type"):
        oqron_cache.cache("bad-vt-1", ttl="1m", value_type=5)
    with pytest.raises(ConfigurationError, match=r"value_type .*Opaque.* is not supported"):
        oqron_cache.cache("bad-vt-2", ttl="1m", value_type=Opaque)
    with pytest.raises(ConfigurationError, match="unknown codec"):
        oqron_cache.cache("bad-vt-3", ttl="1m", value_type=User, codec="yaml")
    with pytest.raises(ConfigurationError, match="pickle"):
        oqron_cache.cache("bad-vt-4", ttl="1m", value_type=User, codec="pickle")


def _static_types(users: oqron_cache.Cache[User], anything: oqron_cache.Cache[Any]) -> None:
    """Never called: mypy checks these (a regression fails ``mypy``, run by CI)."""
    assert_type(users.get("k"), User | None)
    assert_type(users.get("k", a_user()), User)
    assert_type(users.get_many(["k"]), dict[str, User])
    typed = oqron_cache.cache("static", ttl="1m", value_type=User)
    assert_type(typed, oqron_cache.Cache[User])
    assert_type(oqron_cache.cache("static2", ttl="1m"), oqron_cache.Cache[Any])
    assert_type(anything.get("k"), Any | None)
