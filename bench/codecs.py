"""Codec cost: what a value costs to encode and decode, stdlib json beside orjson and msgspec.

Issue 14 asks to measure before choosing the engine of typed values. Two values, each encoded
and decoded by every candidate in the same run, interleaved, one call at a time:

* the ~200-byte JSON dict every benchmark caches (:func:`bench.common.sample_value`): stdlib
  ``json`` (today's strict codec, with and without its type walk), ``orjson``, ``msgspec.json``
  and ``msgspec.msgpack`` (untyped);
* a 20-field dataclass (str, int, float, bool, datetime, UUID, Decimal, a list and a dict):
  stdlib ``json`` with ``dataclasses.asdict`` and a hand-written ``from_dict`` (the user's own
  conversion), ``orjson`` (native dataclass encode, the same ``from_dict``), ``msgspec.json``
  and ``msgspec.msgpack`` with ``type=`` (decode builds and checks the dataclass).

Run: ``.venv/bin/python -m bench.codecs`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import msgspec
import orjson

from oqron_cache.core.codecs import JsonCodec

from .common import Loop, Report, markdown_table, measure, print_table, sample_value, update_section


@dataclasses.dataclass
class Row:
    """A 20-field record, as a database row turned into an object."""

    id: uuid.UUID
    name: str
    email: str
    tenant: str
    score: int
    balance: Decimal
    ratio: float
    active: bool
    created_at: datetime
    updated_at: datetime
    roles: list[str]
    prefs: dict[str, str]
    a1: str
    a2: str
    a3: int
    a4: int
    a5: float
    a6: bool
    a7: str
    a8: int


def sample_row() -> Row:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    return Row(
        uuid.UUID(int=12345678901234567890), "Ada Lovelace", "ada@example.com", "acme", 42,
        Decimal("1234.56"), 0.25, True, at, at, ["admin", "editor"], {"lang": "en", "tz": "UTC"},
        "x" * 10, "y" * 10, 7, 8, 9.5, False, "z" * 10, 11,
    )  # fmt: skip


def _row_dict(row: Row) -> dict[str, Any]:
    """What a user writes to put a Row through stdlib json: every non-JSON field by hand."""
    out = dataclasses.asdict(row)
    out["id"] = str(row.id)
    out["balance"] = str(row.balance)
    out["created_at"] = row.created_at.isoformat()
    out["updated_at"] = row.updated_at.isoformat()
    return out


def _from_dict(data: dict[str, Any]) -> Row:
    return Row(
        **{
            **data,
            "id": uuid.UUID(data["id"]),
            "balance": Decimal(data["balance"]),
            "created_at": datetime.fromisoformat(data["created_at"]),
            "updated_at": datetime.fromisoformat(data["updated_at"]),
        }
    )


def _cases() -> tuple[dict[str, tuple[Callable[[], Any], Callable[[], Any]]], dict[str, Any]]:
    value = sample_value()
    row = sample_row()
    strict = JsonCodec()
    dumps, loads = json.dumps, json.loads
    j_enc, j_dec = msgspec.json.Encoder(), msgspec.json.Decoder()
    m_enc, m_dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    row_j_dec = msgspec.json.Decoder(Row)
    row_m_dec = msgspec.msgpack.Decoder(Row)
    value_json = strict.encode(value, "bench")
    value_pack = m_enc.encode(value)
    row_json = dumps(_row_dict(row)).encode()
    row_orjson = orjson.dumps(row, default=str)
    row_msgspec = j_enc.encode(row)
    row_pack = m_enc.encode(row)
    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "dict: oqron strict json (type walk + json)": (
            lambda: strict.encode(value, "bench"),
            lambda: strict.decode(value_json),
        ),
        "dict: stdlib json": (lambda: dumps(value), lambda: loads(value_json)),
        "dict: orjson": (lambda: orjson.dumps(value), lambda: orjson.loads(value_json)),
        "dict: msgspec.json": (lambda: j_enc.encode(value), lambda: j_dec.decode(value_json)),
        "dict: msgspec.msgpack": (lambda: m_enc.encode(value), lambda: m_dec.decode(value_pack)),
        "Row: stdlib json + asdict/from_dict": (
            lambda: dumps(_row_dict(row)),
            lambda: _from_dict(loads(row_json)),
        ),
        "Row: orjson + from_dict": (
            lambda: orjson.dumps(row, default=str),
            lambda: _from_dict(orjson.loads(row_orjson)),
        ),
        "Row: msgspec.json typed": (
            lambda: j_enc.encode(row),
            lambda: row_j_dec.decode(row_msgspec),
        ),
        "Row: msgspec.msgpack typed": (
            lambda: m_enc.encode(row),
            lambda: row_m_dec.decode(row_pack),
        ),
    }
    for name, (_, decode) in cases.items():  # every decoder gives back what was encoded
        got = decode()
        expected = row if name.startswith("Row") else value
        if got != expected:
            raise AssertionError(f"{name} decoded {got!r}")
    sizes = {
        "dict": len(value_json),
        "Row json": len(row_msgspec),
        "Row msgpack": len(row_pack),
        "Row orjson": len(row_orjson),
    }
    return cases, sizes


def _loop(call: Callable[[], Any]) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            call()

    return loop


def run(*, reps: int = 2000, inner: int = 20, warmup: int = 100) -> Report:
    cases, sizes = _cases()
    loops: dict[str, Loop] = {}
    for name, (encode, decode) in cases.items():
        loops[f"{name} | encode"] = _loop(encode)
        loops[f"{name} | decode"] = _loop(decode)
    timings = measure(loops, inner=inner, reps=reps, warmup=warmup)
    headers = ["value: codec", "encode median ns", "decode median ns", "decode vs stdlib json"]
    rows = []
    for name in cases:
        base = (
            "dict: stdlib json"
            if name.startswith("dict")
            else "Row: stdlib json + asdict/from_dict"
        )
        decode_ns = timings[f"{name} | decode"].median_ns
        base_ns = timings[f"{base} | decode"].median_ns
        rows.append(
            (
                name,
                f"{timings[f'{name} | encode'].median_ns:.0f}",
                f"{decode_ns:.0f}",
                f"{decode_ns / base_ns:.2f}x",
            )
        )
    print_table("codec cost", headers, rows)
    size_text = ", ".join(f"{k} {v} B" for k, v in sizes.items())
    body = "\n".join(
        [
            f"{reps} repetitions of {inner} calls per case (after {warmup}), interleaved; the "
            f"medians are per call. Sizes: {size_text}. Every decoder was checked to give back "
            "a value equal to the one encoded.",
            "",
            markdown_table(headers, rows),
        ]
    )
    return Report("codecs", "Codec cost: stdlib json, orjson and msgspec", body, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    report = run(reps=args.reps)
    if not args.no_write:
        update_section(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
