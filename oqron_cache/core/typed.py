"""Typed values (DESIGN section 12): ``value_type=`` stores and returns instances of a type.

``cache(..., value_type=User)`` keeps ``User`` objects: L1 holds the object itself, L2 holds
msgspec's JSON (or msgpack, with ``codec="msgpack"``) of it, decoded back into ``User`` with
every field checked. Supported: dataclasses, ``msgspec.Struct``, ``TypedDict``, ``NamedTuple``,
``datetime``/``date``/``time``/``timedelta``, ``UUID``, ``Decimal``, ``Enum``, ``bytes``,
sets, tuples and nested containers of these; pydantic models (and containers of them) through
pydantic's own JSON. Never pickle.

A value is checked where it enters (``set()``, a resolver's result): it is encoded, decoded
with the type, and must come back equal and of the same type, or :class:`SerializationError`
says which field did not fit (``Expected `int`, got `str` - at `$.age```). So L1 (the object)
and L2 (its bytes) always give equal values. ``None`` is a value like any other (a cached
``None``), so the decoder accepts ``value_type | None``.

Envelope codec ids: 3 is typed JSON, 4 typed msgpack. A typed cache still reads entries that
an untyped one wrote (ids 1 and 2: decoded, then converted to the type), and an untyped cache of
the same name reads typed entries as plain JSON / msgpack: a rolling upgrade that adds
``value_type`` keeps serving what is in Redis.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import msgspec

from .codecs import Codec, JsonCodec, MsgpackCodec, get_codec
from .errors import ConfigurationError, SerializationError

TYPED_JSON_ID = 3
TYPED_MSGPACK_ID = 4
SUPPORTED = (
    "supported: dataclasses, msgspec.Struct, TypedDict, NamedTuple, datetime, UUID, Decimal, "
    "Enum, bytes, sets, tuples and containers of these, pydantic models"
)
_JSON_NATIVE = frozenset({str, int, float, bool, type(None), dict, list, Any, object})


def type_name(value_type: Any) -> str:
    """A readable name for ``value_type`` (``User``, ``list[User]``)."""
    if isinstance(value_type, type) and not typing.get_args(value_type):
        return value_type.__qualname__
    return repr(value_type).replace("typing.", "")


def _pydantic_adapter(target: Any) -> Any | None:
    """A pydantic ``TypeAdapter`` for ``target`` if pydantic is installed and takes it."""
    try:
        import pydantic
    except ImportError:  # pragma: no cover - pydantic is optional
        return None
    try:
        return pydantic.TypeAdapter(target)
    except Exception:
        return None


def _uses_pydantic(value_type: Any) -> bool:
    """True if ``value_type`` is, or holds, a pydantic model."""
    try:
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover - pydantic is optional
        return False
    seen = [value_type]
    while seen:
        item = seen.pop()
        if isinstance(item, type) and issubclass(item, BaseModel):
            return True
        seen.extend(typing.get_args(item))
    return False


class TypedCodec:
    """Values of one type through msgspec (or pydantic), checked on the way in."""

    def __init__(self, value_type: Any, base: str = "json") -> None:
        if value_type is None:
            raise TypeError("value_type must be a type; got None")
        self.value_type = value_type
        self.type_name = type_name(value_type)
        self.base = base
        self.name = f"typed {base} ({self.type_name})"
        self.codec_id = TYPED_JSON_ID if base == "json" else TYPED_MSGPACK_ID
        target = typing.Optional[value_type]  # noqa: UP045 - value_type is a runtime object
        self._target = target
        self._plain: Codec = JsonCodec() if base == "json" else MsgpackCodec()
        self._adapter: Any = None
        self._encode: Callable[[Any], bytes]
        self._decode: Callable[[bytes | memoryview], Any]
        if _uses_pydantic(value_type):
            adapter = _pydantic_adapter(target)
            if adapter is None:
                raise ConfigurationError(
                    f"value_type {self.type_name} is not supported by pydantic"
                )
            if base != "json":
                raise ConfigurationError(
                    f"value_type {self.type_name} holds pydantic models, which are stored "
                    "through pydantic's own JSON: use codec='json'"
                )
            self._adapter = adapter
            self._encode = adapter.dump_json
            self._decode = lambda data: adapter.validate_json(bytes(data))
            return
        module = msgspec.json if base == "json" else msgspec.msgpack
        try:
            decoder = module.Decoder(target)
        except TypeError as exc:
            raise ConfigurationError(
                f"value_type {self.type_name} is not supported: {exc} ({SUPPORTED})"
            ) from None
        opaque = _custom_types(value_type)
        if opaque:
            raise ConfigurationError(
                f"value_type {self.type_name} is not supported: {type_name(opaque[0])} is not a "
                f"type msgspec can check ({SUPPORTED})"
            )
        self._encode = module.Encoder().encode
        self._decode = decoder.decode

    def encode(self, value: Any, origin: str) -> bytes:
        """The bytes of ``value``, which must fit ``value_type`` and come back the same."""
        try:
            data = self._encode(value)
        except Exception as exc:  # msgspec's TypeError/OverflowError, or pydantic's own kinds
            raise SerializationError(
                f"value of type {type(value).__name__} returned by {origin} cannot be stored "
                f"as {self.type_name}: {exc}",
                cache=origin,
            ) from None
        try:
            back = self._decode(data)
        except Exception as exc:  # msgspec.ValidationError or pydantic's ValidationError
            raise SerializationError(
                f"value returned by {origin} does not fit value_type {self.type_name}: "
                f"{_one_line(exc)}",
                cache=origin,
            ) from None
        if type(back) is not type(value) or back != value:
            raise SerializationError(
                f"value of type {type(value).__name__} returned by {origin} would not come back "
                f"the same from value_type {self.type_name} (a dict for a class, a tuple for "
                "a list, NaN, or a subclass?); give it a value of that type",
                cache=origin,
            )
        return bytes(data)

    def decode(self, data: bytes | memoryview) -> Any:
        try:
            return self._decode(data)
        except Exception as exc:  # a ValueError is what the read path treats as a bad entry
            raise ValueError(f"not a {self.type_name}: {_one_line(exc)}") from None

    def read(self, codec_id: int, data: bytes | memoryview) -> Any:
        """Decode an entry written with ``codec_id``: this codec's, or the untyped base's."""
        if codec_id == self.codec_id:
            return self.decode(data)
        if codec_id != self._plain.codec_id:
            raise ValueError(f"codec id {codec_id}")
        plain = self._plain.decode(data)  # an entry from before value_type was declared
        try:
            if self._adapter is not None:
                return self._adapter.validate_python(plain)
            return msgspec.convert(plain, self._target, strict=False)
        except Exception as exc:
            raise ValueError(f"not a {self.type_name}: {_one_line(exc)}") from None


def _custom_types(value_type: Any) -> list[Any]:
    """The classes inside ``value_type`` that msgspec would only take with a hook of ours."""
    found: list[Any] = []
    stack: list[Any] = [msgspec.inspect.type_info(value_type)]
    seen: set[int] = set()
    while stack:
        info = stack.pop()
        if id(info) in seen:
            continue
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.CustomType):
            found.append(info.cls)
            continue
        for name in getattr(info, "__struct_fields__", ()):
            part = getattr(info, name)
            for item in part if isinstance(part, tuple) else (part,):
                if isinstance(item, msgspec.inspect.Field):
                    stack.append(item.type)
                elif isinstance(item, msgspec.inspect.Type):
                    stack.append(item)
    return found


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


def make_codec(name: str, value_type: Any | None) -> Codec:
    """The codec of a cache: ``name`` ("json"/"msgpack"), typed when ``value_type`` is given."""
    if value_type is None:
        return get_codec(name)
    get_codec(name)  # the same checks (pickle refused, unknown names)
    return TypedCodec(value_type, name)


def check_value_type(value_type: Any, label: str) -> None:
    """Fail at declaration on a ``value_type`` that cannot be served (``label`` names where)."""
    if value_type is None:
        return
    if not (isinstance(value_type, type) or typing.get_origin(value_type) is not None):
        raise TypeError(
            f"{label} value_type must be a type (a class, or list[User] and the like); got "
            f"{type(value_type).__name__} {value_type!r}"
        )
    TypedCodec(value_type)  # ConfigurationError for an unsupported type


def inferred_value_type(func: Callable[..., Any]) -> Any | None:
    """The return annotation of ``func`` if it needs a typed codec, else None.

    Only annotations that name something plain JSON would change (a dataclass, a Struct, a
    datetime, ...) are taken: ``-> dict`` keeps the strict JSON codec, as before. Unresolvable
    annotations (forward references) are ignored.
    """
    try:
        hints = typing.get_type_hints(func)
    except Exception:
        return None
    annotation = hints.get("return")
    if annotation is None or annotation is type(None):
        return None
    if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if annotation is typing.Awaitable or typing.get_origin(annotation) is typing.Awaitable:
        return None
    if not _needs_types(annotation):
        return None
    try:
        TypedCodec(annotation)
    except (ConfigurationError, TypeError):
        return None
    return annotation


def _needs_types(annotation: Any) -> bool:
    """True if a value of ``annotation`` would not survive plain JSON unchanged."""
    stack = [annotation]
    while stack:
        item = stack.pop()
        if item in _JSON_NATIVE or item is Ellipsis:
            continue
        origin = typing.get_origin(item)
        if origin in (dict, list) or origin in (typing.Union,):
            stack.extend(typing.get_args(item))
            continue
        if type(item).__name__ == "UnionType":
            stack.extend(typing.get_args(item))
            continue
        return True
    return False


__all__ = [
    "TYPED_JSON_ID",
    "TYPED_MSGPACK_ID",
    "TypedCodec",
    "check_value_type",
    "inferred_value_type",
    "make_codec",
    "type_name",
]
