"""The one codec: messages to Kafka records and back.

Values are raw msgpack maps (no envelope) with a `v` field; keys are UTF-8 strings; a header
`ember-schema: <name>/<major>.<minor>` names the value's schema. Everything here is pure:
a loop calls `decode` and sends what fails to dead letters with `dead_letter_for`.

    record = record_for(chunk, topic=request.reply_topic)
    await producer.send(record.topic, record.value, key=record.key, headers=record.headers)

    try:
        request = decode(Request, msg.value)
    except SchemaError as exc:
        dead = dead_letter_for(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                               key=msg.key, value=msg.value, error=exc, at=now_ms())
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, overload

import msgpack  # type: ignore[import-untyped]

from schemas.errors import (
    DecodeError,
    FieldProblem,
    KeyDecodeError,
    SchemaError,
    ValidationError,
    VersionError,
)
from schemas.fields import Check, Invalid, wire_type_name
from schemas.limits import (
    MAX_DEAD_LETTER_VALUE_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PROBLEMS,
    MAX_REASON_CHARS,
)
from schemas.messages import (
    ID,
    MESSAGE_TYPES,
    NAME,
    REPLY_TOPIC,
    TIMESTAMP,
    AdmittedRequest,
    Cancel,
    DeadLetter,
    Message,
    Request,
    parse_version,
)
from schemas.topics import REPLIES

M = TypeVar("M", bound=Message)

SCHEMA_HEADER = "ember-schema"

Headers = Iterable[tuple[str, bytes | None]] | Mapping[str, bytes | None]


# --- values ------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """The record value: a msgpack map, `v` first. Bytes are msgpack bin, text is str."""
    data: bytes = msgpack.packb(msg.to_map(), use_bin_type=True)
    return data


def message_type(name: str) -> type[Message]:
    """The class for a schema name (`request`, `token_chunk`, ...)."""
    try:
        return MESSAGE_TYPES[name]
    except KeyError:
        known = ", ".join(MESSAGE_TYPES)
        problem = f"unknown schema {name!r}; known: {known}"
        raise SchemaError("", [FieldProblem("", problem)]) from None


@overload
def decode(schema: type[M], data: bytes | None, headers: Headers | None = None) -> M: ...
@overload
def decode(schema: str, data: bytes | None, headers: Headers | None = None) -> Message: ...
def decode(
    schema: type[Message] | str, data: bytes | None, headers: Headers | None = None
) -> Message:
    """Decode and validate a record value as `schema` (a class or a schema name).

    Raises DecodeError (not a msgpack map), ValidationError (bad fields, all listed) or
    VersionError (another major version, from `v` or from the `ember-schema` header).
    """
    cls = message_type(schema) if isinstance(schema, str) else schema
    if headers is not None:
        _check_header(cls, parse_schema_header(headers))
    return cls.from_map(unpack_map(data, cls.SCHEMA.name))


def unpack_map(data: bytes | bytearray | memoryview | None, schema: str = "") -> dict[str, Any]:
    """msgpack bytes -> dict, refusing anything that is not one map of at most 1 MiB."""
    if data is None:
        raise DecodeError(schema, [FieldProblem("", "no value (a tombstone)")])
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(schema, [FieldProblem("", f"value must be bytes, got {type(data)}")])
    if len(data) > MAX_MESSAGE_BYTES:
        problem = f"value has {len(data)} bytes, more than the limit of {MAX_MESSAGE_BYTES}"
        raise DecodeError(schema, [FieldProblem("", problem)])
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types; all mean the same thing here
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        problem = f"not valid msgpack ({detail[:200]})"
        raise DecodeError(schema, [FieldProblem("", problem)]) from None
    if not isinstance(value, dict):
        problem = f"value must be a msgpack map, got {wire_type_name(value)}"
        raise DecodeError(schema, [FieldProblem("", problem)])
    return value


# --- keys --------------------------------------------------------------------------------


def encode_key(key: str) -> bytes:
    return key.encode("utf-8")


def decode_key(raw: bytes | None) -> str:
    """A record key as text. Missing, empty or non-UTF-8 keys raise KeyDecodeError."""
    if not raw:
        raise KeyDecodeError("", [FieldProblem("key", "missing or empty; keys are UTF-8 text")])
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"not UTF-8 (byte {exc.start} is invalid); keys are UTF-8 text"
        raise KeyDecodeError("", [FieldProblem("key", problem)]) from None


def key_for(msg: Message, topic: str | None = None) -> bytes | None:
    """The record key of `msg` on `topic` (default: the type's first topic)."""
    routes = msg.SCHEMA.routes
    route = next((r for r in routes if topic is None or r.matches(topic)), None)
    if route is None:
        topics = ", ".join(r.topic for r in routes)
        problem = f"does not go to topic {topic!r}; its topics: {topics}"
        raise SchemaError(msg.SCHEMA.name, [FieldProblem("", problem)])
    value: Any = msg
    for part in route.key.split("."):
        value = getattr(value, part)
    if value is None or isinstance(value, bytes):
        return value
    return encode_key(value)


# --- headers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaRef:
    """What an `ember-schema` header says: e.g. `request/1.0`."""

    name: str
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.name}/{self.major}.{self.minor}"


def headers_for(msg: Message) -> list[tuple[str, bytes]]:
    """Record headers as aiokafka wants them."""
    return [(SCHEMA_HEADER, msg.SCHEMA.header_value.encode("ascii"))]


def parse_schema_header(headers: Headers | None) -> SchemaRef | None:
    """The `ember-schema` header of a record, None when absent. A malformed header raises
    DecodeError. Accepts aiokafka's sequence of pairs or a mapping."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    raw = next((v for k, v in pairs if k == SCHEMA_HEADER), None)
    if raw is None:
        return None
    text = bytes(raw).decode("utf-8", errors="replace")
    name, _, version_text = text.partition("/")
    version = parse_version(version_text)
    if not name or version is None:
        problem = f"must look like 'request/1.0', got {text[:80]!r}"
        raise DecodeError("", [FieldProblem(f"header {SCHEMA_HEADER}", problem)])
    return SchemaRef(name, *version)


def _check_header(cls: type[Message], ref: SchemaRef | None) -> None:
    schema = cls.SCHEMA
    if ref is None:
        return
    path = f"header {SCHEMA_HEADER}"
    if ref.name != schema.name:
        problem = f"says {ref}, expected {schema.name}/{schema.major}.x"
        raise ValidationError(schema.name, [FieldProblem(path, problem)])
    if ref.major != schema.major:
        problem = f"says {ref}: this reader reads {schema.major}.x (up to {schema.version})"
        raise VersionError(schema.name, [FieldProblem(path, problem)])


# --- what a record of a topic is (docs/PROTOCOL.md §5.3) ------------------------------------


def decode_requests_record(value: bytes | None, headers: Headers | None) -> Request | Cancel:
    """A record of `ember.requests`: a request or a cancel. The `ember-schema` header says
    which; without one, a map with `cancelled_at` and no `submitted_at` is a cancel."""
    schema = parse_schema_header(headers)
    if schema is not None:
        return decode(Cancel if schema.name == "cancel" else Request, value, headers)
    fields = unpack_map(value, "request")
    if "cancelled_at" in fields and "submitted_at" not in fields:
        return decode(Cancel, value)
    return decode(Request, value)


def decode_admitted_record(
    value: bytes | None, headers: Headers | None
) -> AdmittedRequest | Cancel:
    """A record of `ember.admitted`: an admitted request, or a cancel (by its header; without
    one, a map with `cancelled_at` is a cancel)."""
    schema = parse_schema_header(headers)
    if schema is not None:
        return decode(Cancel if schema.name == "cancel" else AdmittedRequest, value, headers)
    if "cancelled_at" in unpack_map(value, "admitted_request"):
        return decode(Cancel, value)
    return decode(AdmittedRequest, value)


def decode_model_record(
    value: bytes | None, headers: Headers | None
) -> AdmittedRequest | Request | Cancel:
    """A record of a model topic: an admitted request (placed by the control plane), a plain
    request (producers that bypass admission) or a cancel of one of them. The `ember-schema`
    header says which; without one, a map with a `request` field is an admitted request and
    one with `cancelled_at` a cancel."""
    schema = parse_schema_header(headers)
    if schema is not None:
        kinds = {"request": Request, "cancel": Cancel}
        return decode(kinds.get(schema.name, AdmittedRequest), value, headers)
    fields = unpack_map(value, "admitted_request")
    if "request" in fields:
        return decode(AdmittedRequest, value)
    if "cancelled_at" in fields:
        return decode(Cancel, value)
    return decode(Request, value)


# --- producing ---------------------------------------------------------------------------


class ProducerRecord(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def record_for(msg: Message, topic: str | None = None) -> ProducerRecord:
    """Topic, key, value and headers of `msg`. `topic` defaults to the type's own topic;
    token chunks have none (pass the request's reply_topic) and admitted requests go to
    `ember.admitted` unless given their model topic."""
    topic = topic or msg.SCHEMA.default_topic
    if topic is None:
        problem = "has no default topic; pass one (a token chunk goes to the reply_topic)"
        raise SchemaError(msg.SCHEMA.name, [FieldProblem("", problem)])
    return ProducerRecord(topic, key_for(msg, topic), encode(msg), headers_for(msg))


# --- failures ----------------------------------------------------------------------------


def dead_letter_for(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: BaseException,
    at: int,
    headers: Headers | None = None,
    component: str | None = None,
) -> DeadLetter:
    """A DeadLetter for a consumed record that failed. A SchemaError keeps its reason and
    field problems; any other exception is `processing_failed`. The key stays text when it is
    UTF-8; the value is kept up to 960 KiB (value_size says how long it was)."""
    if isinstance(error, SchemaError):
        reason = error.reason
        problems = error.problems[:MAX_PROBLEMS]
        message = error.message
    else:
        reason, problems = "processing_failed", ()
        message = f"{type(error).__name__}: {error}"
    return DeadLetter(
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        key=_key_as_text(key),
        value_bytes=None if value is None else bytes(value[:MAX_DEAD_LETTER_VALUE_BYTES]),
        value_size=0 if value is None else len(value),
        source_schema=_header_text(headers),
        reason=reason,  # type: ignore[arg-type]
        error=_clip(message, MAX_REASON_CHARS) or type(error).__name__,
        problems=tuple(FieldProblem(_clip(p.path, 256), _clip(p.problem, 1024)) for p in problems),
        component=_checked(NAME, component),
        at=at,
    )


def _key_as_text(key: bytes | None) -> bytes | str | None:
    if key is None:
        return None
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        return bytes(key)


def _header_text(headers: Headers | None) -> str | None:
    try:
        ref = parse_schema_header(headers)
    except DecodeError:
        return None
    return str(ref) if ref else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked(check: Check, value: Any) -> Any:
    """`value` if `check` accepts it, else None."""
    try:
        return check.read(value)
    except Invalid:
        return None


# --- replying to what cannot be decoded --------------------------------------------------


@dataclass(frozen=True)
class ReplyRoute:
    request_id: str
    reply_topic: str
    submitted_at: int | None


def reply_route(data: bytes | None) -> ReplyRoute | None:
    """Where to send the `rejected` chunk of an invalid request: its request_id, reply_topic
    (default ember.replies) and submitted_at if those fields are themselves valid, read from
    the map or, for an admitted request, from the request map inside it. None when the
    request cannot be answered (then only a dead letter records it)."""
    try:
        value = unpack_map(data)
    except DecodeError:
        return None
    inner = value.get("request")
    if "request_id" not in value and isinstance(inner, dict):
        value = inner
    request_id = _checked(ID, value.get("request_id"))
    reply_topic = _checked(REPLY_TOPIC, value.get("reply_topic") or REPLIES)
    if request_id is None or reply_topic is None:
        return None
    return ReplyRoute(request_id, reply_topic, _checked(TIMESTAMP, value.get("submitted_at")))
