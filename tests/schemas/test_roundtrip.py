"""Property-based: every message survives encode -> decode, and no input crashes decode."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import (
    MESSAGE_TYPES,
    Message,
    SchemaError,
    decode,
    decode_key,
    encode,
    key_for,
    record_for,
)
from schemas.fields import field_specs
from tests.schemas.strategies import STRATEGIES

TYPES = list(STRATEGIES)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Anything msgpack can carry: what a careless or hostile producer might send.
wire_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
    ),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_every_message_type_has_a_strategy() -> None:
    assert set(TYPES) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.SCHEMA.name)
@SETTINGS
@given(data=st.data())
def test_decode_of_encode_is_identity(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    raw = encode(msg)
    assert decode(cls, raw) == msg
    assert decode(cls.SCHEMA.name, raw) == msg
    assert encode(decode(cls, raw)) == raw


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.SCHEMA.name)
@SETTINGS
@given(data=st.data())
def test_value_is_a_plain_map_with_the_version_first(
    cls: type[Message], data: st.DataObject
) -> None:
    msg = data.draw(STRATEGIES[cls])
    plain = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(plain, dict)
    assert next(iter(plain)) == "v" and plain["v"] == cls.SCHEMA.version
    assert None not in plain.values()  # nil fields are left out
    assert set(plain) - {"v"} <= {fs.name for fs in field_specs(cls)}


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.SCHEMA.name)
@SETTINGS
@given(data=st.data())
def test_records_are_keyed_as_their_routes_say(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    for route in cls.SCHEMA.routes:
        topic = route.topic.replace("*", "") + "x" if "*" in route.topic else route.topic
        record = record_for(msg, topic)
        expected: Any = msg
        for part in route.key.split("."):
            expected = getattr(expected, part)
        assert record.topic == topic
        assert record.key == key_for(msg, topic)
        if isinstance(expected, str) and expected:
            assert decode_key(record.key) == expected
        else:  # a dead letter's original key: raw bytes, empty, or nil
            assert record.key == (expected.encode() if isinstance(expected, str) else expected)
        assert decode(cls, record.value, record.headers) == msg


@SETTINGS
@given(st.sampled_from(TYPES), st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_schema_errors(cls: type[Message], data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        decode(cls, data)


@SETTINGS
@given(st.sampled_from(TYPES), wire_values)
def test_arbitrary_msgpack_raises_only_schema_errors(cls: type[Message], value: Any) -> None:
    with contextlib.suppress(SchemaError):
        decode(cls, msgpack.packb(value, use_bin_type=True))


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.SCHEMA.name)
@SETTINGS
@given(data=st.data())
def test_one_field_replaced_by_anything_decodes_or_raises_schema_error(
    cls: type[Message], data: st.DataObject
) -> None:
    plain = msgpack.unpackb(encode(data.draw(STRATEGIES[cls])), raw=False)
    name = data.draw(st.sampled_from(sorted(plain)))
    plain[name] = data.draw(wire_values)
    try:
        msg = decode(cls, msgpack.packb(plain, use_bin_type=True))
    except SchemaError as exc:
        assert exc.problems and str(exc).startswith(cls.SCHEMA.name)
    else:
        assert decode(cls, encode(msg)) == msg


@pytest.mark.parametrize("cls", TYPES, ids=lambda c: c.SCHEMA.name)
@SETTINGS
@given(data=st.data())
def test_repr_hides_user_content(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(STRATEGIES[cls])
    text = repr(msg)
    for fs in field_specs(cls):
        value = getattr(msg, fs.name)
        if fs.sensitive and value:
            assert f"{fs.name}=<redacted len={len(value)}>" in text
