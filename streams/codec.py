"""Faust's view of Ember's wire format: raw msgpack values, no envelope.

Ember's topics carry exactly what `schemas.encode` writes, so Faust must neither wrap values
in its own envelope nor decode them behind the agents' backs. The `ember` codec therefore
writes a `schemas.Message` as its msgpack map and passes bytes through untouched, in both
directions: agents receive the record's bytes and decode them with `schemas.decode`, so an
invalid record is a `SchemaError` the agent turns into a dead letter (Faust's own decode
errors would only be logged and the record skipped).

    register_codecs()                       # once, before topics are declared
    app.topic(REQUESTS, value_type=bytes, value_serializer=MESSAGE_CODEC)

Decoding is the agents' business too: topics declared with `RawSchema` hand Faust's events
the record's key and value as they are, without a pass through Faust's serializer registry
per record (which, with these codecs, would give back the same bytes).

Table changelogs are Faust's own business: most keep Faust's `json` codec; rows that hold
messages use `MAP_CODEC`, plain maps as msgpack, so a message can sit in a row as the bytes
it already travels as (`{"request": <msgpack bin>}`) instead of being re-encoded as JSON.
"""

from __future__ import annotations

from typing import Any

import faust
import msgpack  # type: ignore[import-untyped]
from faust.serializers import codecs

from schemas import Message, encode

MESSAGE_CODEC = "ember"
MAP_CODEC = "ember_map"


class MessageCodec(codecs.Codec):
    """`schemas.Message` -> its msgpack bytes; bytes -> the same bytes (both ways)."""

    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, Message):
            return encode(obj)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(
            f"the {MESSAGE_CODEC} codec writes schemas messages or bytes, got {type(obj).__name__}"
        )

    def _loads(self, s: bytes) -> bytes:
        return bytes(s)


class MapCodec(codecs.Codec):
    """Plain maps (str keys; lists, numbers, text, bytes, nil) <-> msgpack."""

    def _dumps(self, obj: Any) -> bytes:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    def _loads(self, s: bytes) -> Any:
        return msgpack.unpackb(s, raw=False)


class RawSchema(faust.Schema):
    """Events with the record's key and value bytes, undecoded (the module docstring).
    Sending is Faust's, through the codecs named."""

    def __init__(self) -> None:
        super().__init__(
            key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer=MESSAGE_CODEC
        )

    def compile(self, app: Any, **options: Any) -> Any:
        create_event = app.create_event

        async def decode(message: Any, *, propagate: bool = False) -> Any:
            return create_event(message.key, message.value, message.headers, message)

        return decode


def register_codecs() -> None:
    """Make `MESSAGE_CODEC` and `MAP_CODEC` known to Faust (idempotent)."""
    if not isinstance(codecs.codecs.get(MESSAGE_CODEC), MessageCodec):
        codecs.register(MESSAGE_CODEC, MessageCodec())
    if not isinstance(codecs.codecs.get(MAP_CODEC), MapCodec):
        codecs.register(MAP_CODEC, MapCodec())
