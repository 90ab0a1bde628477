"""docs/PROTOCOL.md matches the code: its tables are current and its examples decode."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import pytest

from schemas import MESSAGE_TYPES, decode, encode
from schemas.docgen import render

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
EXAMPLE = re.compile(r"<!-- example:(\w+) -->\n```json\n(.*?)\n```", re.DOTALL)


def examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(PROTOCOL.read_text())


def test_generated_tables_are_current() -> None:
    text = PROTOCOL.read_text()
    assert render(text) == text, "run: python -m schemas.docgen docs/PROTOCOL.md"


def test_every_message_type_has_a_table_and_an_example() -> None:
    text = PROTOCOL.read_text()
    shown = {name for name, _ in examples()}
    for name in MESSAGE_TYPES:
        assert f"<!-- generated:{name} -->" in text
        assert name in shown or name == "dead_letter"  # bytes cannot be written as JSON


@pytest.mark.parametrize(("name", "body"), examples(), ids=[n for n, _ in examples()])
def test_examples_decode_when_packed_as_plain_msgpack(name: str, body: str) -> None:
    plain = json.loads(body)
    msg = decode(name, msgpack.packb(plain, use_bin_type=True))
    assert_contains(msgpack.unpackb(encode(msg), raw=False), plain)


def assert_contains(actual: object, expected: object) -> None:
    """Every field the example gives comes back unchanged (encode adds the defaults)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        for key, value in expected.items():
            assert_contains(actual[key], value)
    else:
        assert actual == expected
