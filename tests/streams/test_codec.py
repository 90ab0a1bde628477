"""The Faust codec: schemas messages out as exactly their msgpack, bytes untouched both ways."""

from __future__ import annotations

import pytest
from faust.serializers import codecs
from faust.serializers.registry import Registry

from schemas import Request, decode, encode
from streams.codec import MESSAGE_CODEC, MessageCodec, register_codecs

REQUEST = Request(request_id="r-1", model="tiny", submitted_at=1, prompt="hi")


def test_a_message_is_written_as_its_schema_encoding() -> None:
    assert MessageCodec().dumps(REQUEST) == encode(REQUEST)


@pytest.mark.parametrize("raw", [b"", b"\xc1\xff garbage", encode(REQUEST)])
def test_bytes_pass_through_both_ways(raw: bytes) -> None:
    codec = MessageCodec()
    assert codec.dumps(raw) == raw
    assert codec.loads(raw) == raw
    assert codec.dumps(bytearray(raw)) == raw and codec.loads(memoryview(raw)) == raw


def test_anything_else_is_refused_with_its_type() -> None:
    with pytest.raises(TypeError, match="dict"):
        MessageCodec().dumps({"v": "1.0"})


def test_registered_once_under_its_name() -> None:
    register_codecs()
    first = codecs.get_codec(MESSAGE_CODEC)
    register_codecs()
    assert isinstance(first, MessageCodec) and codecs.get_codec(MESSAGE_CODEC) is first


def test_fausts_registry_neither_wraps_nor_decodes() -> None:
    """What an agent's topic (value_type=bytes, the ember codec) does to a record."""
    register_codecs()
    registry = Registry(key_serializer="raw", value_serializer=MESSAGE_CODEC)
    wire = registry.dumps_value(bytes, REQUEST)
    assert wire == encode(REQUEST)  # no envelope, no `__faust` metadata
    assert registry.loads_value(bytes, wire) == wire
    assert decode(Request, registry.loads_value(bytes, wire)) == REQUEST
    garbage = b"\x93\x01\x02"  # an array, not a map: still handed to the agent as bytes
    assert registry.loads_value(bytes, garbage) == garbage
    assert registry.loads_key(bytes, b"r-1") == b"r-1"
