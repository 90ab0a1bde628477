"""Versions, keys, headers, dead letters and replies to undecodable requests."""

from __future__ import annotations

import re

import msgpack
import pytest

from schemas import (
    SCHEMA_HEADER,
    AdmittedRequest,
    DeadLetter,
    DecodeError,
    KeyDecodeError,
    LifecycleEvent,
    Request,
    SchemaError,
    SchemaRef,
    TokenChunk,
    ValidationError,
    VersionError,
    Cancel,
    dead_letter_for,
    decode,
    decode_admitted_record,
    decode_key,
    decode_model_record,
    decode_requests_record,
    encode,
    encode_key,
    headers_for,
    key_for,
    parse_schema_header,
    record_for,
    reply_route,
)
from schemas.limits import MAX_DEAD_LETTER_VALUE_BYTES

PLAIN_REQUEST = {
    "v": "1.0",
    "request_id": "req-42",
    "model": "tiny",
    "prompt": "Once upon a time",
    "submitted_at": 1_764_400_000_000,
}


def pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def request(**changes: object) -> Request:
    return decode(Request, pack({**PLAIN_REQUEST, **changes}))


# --- what another language produces ------------------------------------------------------


def test_a_plain_msgpack_map_decodes_with_documented_defaults() -> None:
    r = decode(Request, pack(PLAIN_REQUEST))
    assert (r.request_id, r.model, r.prompt) == ("req-42", "tiny", "Once upon a time")
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k) == (256, 1.0, 1.0, 0)
    assert (r.seed, r.stop, r.deadline_at, r.tenant) == (None, (), None, None)
    assert (r.latency_class, r.reply_topic) == ("interactive", "ember.replies")


def test_nil_means_the_default_and_integers_are_accepted_for_floats() -> None:
    r = request(max_tokens=None, temperature=0, top_p=1, seed=None, stop=None)
    assert (r.max_tokens, r.temperature, r.top_p, r.stop) == (256, 0.0, 1.0, ())
    assert isinstance(r.temperature, float)


def test_a_token_id_prompt_decodes() -> None:
    r = request(prompt=None, prompt_token_ids=[1, 15043, 2], seed=7, stop=["\n"])
    assert r.prompt is None and r.prompt_token_ids == (1, 15043, 2)


def test_a_plain_token_chunk_decodes_and_tells_first_and_last() -> None:
    first = {
        "v": "1.0",
        "request_id": "req-42",
        "seq": 0,
        "text": "Once",
        "token_ids": [9],
        "submitted_at": 1,
        "first_token_at": 2,
        "emitted_at": 2,
        "worker_id": "w-1",
        "warm": True,
    }
    last = {
        **first,
        "seq": 1,
        "text": "",
        "token_ids": [],
        "finish_reason": "length",
        "prompt_tokens": 4,
        "completion_tokens": 1,
    }
    a, b = decode(TokenChunk, pack(first)), decode(TokenChunk, pack(last))
    assert a.is_first and not a.is_last and a.warm is True
    assert b.is_last and not b.failed and b.completion_tokens == 1


# --- versions ----------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    r = request(priority=3, meta={"a": [1, 2]}, x_trace=b"\x00")
    assert r == request()


def test_a_newer_minor_version_is_read() -> None:
    r = request(v="1.7", new_field_of_1_7="whatever")
    assert r == request()
    assert msgpack.unpackb(encode(r))["v"] == "1.0"  # written back at our own version


def test_another_major_version_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(VersionError) as caught:
        request(v="2.0")
    message = str(caught.value)
    assert message.startswith("request: v: version 2.0 cannot be read")
    assert "reads 1.x" in message and caught.value.reason == "unsupported_version"
    with pytest.raises(VersionError):
        request(v="0.9")


def test_another_major_version_of_a_nested_request_is_rejected() -> None:
    admitted = {
        "v": "1.0",
        "request": {**PLAIN_REQUEST, "v": "2.0"},
        "latency_class": "batch",
        "prompt_tokens": 4,
        "prompt_bucket": 128,
        "admitted_at": 5,
    }
    with pytest.raises(VersionError, match=re.escape("version 2.0 cannot be read")):
        decode(AdmittedRequest, pack(admitted))


def test_the_header_is_checked_when_given() -> None:
    data = pack(PLAIN_REQUEST)
    assert decode(Request, data, [(SCHEMA_HEADER, b"request/1.3")]).request_id == "req-42"
    assert decode(Request, data, [("other", b"x")]).request_id == "req-42"
    with pytest.raises(VersionError, match=re.escape("header ember-schema: says request/2.0")):
        decode(Request, data, [(SCHEMA_HEADER, b"request/2.0")])
    with pytest.raises(
        ValidationError, match=re.escape("says token_chunk/1.0, expected request/1.x")
    ):
        decode(Request, data, [(SCHEMA_HEADER, b"token_chunk/1.0")])


def test_decode_by_schema_name() -> None:
    assert decode("request", pack(PLAIN_REQUEST)) == request()
    with pytest.raises(SchemaError, match=re.escape("unknown schema 'requests'")):
        decode("requests", pack(PLAIN_REQUEST))


# --- keys and headers --------------------------------------------------------------------


def test_keys_are_utf8_text() -> None:
    assert encode_key("req-é") == "req-é".encode()
    assert decode_key("req-é".encode()) == "req-é"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"req-\xc3", None, b""])
def test_a_key_that_is_not_utf8_text_is_rejected(raw: bytes | None) -> None:
    with pytest.raises(KeyDecodeError) as caught:
        decode_key(raw)
    assert str(caught.value).startswith("key: ")
    assert caught.value.reason == "bad_key"


def test_keys_follow_the_topic() -> None:
    r = request(model="org/llama")
    admitted = AdmittedRequest(
        request=r, latency_class="interactive", prompt_tokens=4, prompt_bucket=128, admitted_at=1
    )
    assert key_for(r) == b"req-42"
    assert key_for(admitted, "ember.admitted") == b"org/llama"
    assert key_for(admitted, "ember.model.org_llama") == b"req-42"
    assert key_for(admitted) == b"org/llama"
    with pytest.raises(SchemaError, match=re.escape("does not go to topic 'ember.requests'")):
        key_for(admitted, "ember.requests")
    event = LifecycleEvent(worker_id="w-1", model="tiny", kind="state", state="ready", at=1)
    assert key_for(event, "ember.lifecycle") == b"tiny"
    assert key_for(event, "ember.workers") == b"w-1"


def test_headers_name_schema_and_version() -> None:
    assert headers_for(request()) == [("ember-schema", b"request/1.0")]
    assert parse_schema_header([("ember-schema", b"request/1.0")]) == SchemaRef("request", 1, 0)
    assert parse_schema_header({"ember-schema": b"token_chunk/1.12"}) == SchemaRef(
        "token_chunk", 1, 12
    )
    assert parse_schema_header([]) is None and parse_schema_header(None) is None
    assert str(SchemaRef("request", 1, 0)) == "request/1.0"
    for bad in (b"request", b"request/1", b"/1.0", b"request/v1.0"):
        with pytest.raises(DecodeError, match=re.escape("must look like 'request/1.0'")):
            parse_schema_header([("ember-schema", bad)])


def test_a_record_has_topic_key_value_and_headers() -> None:
    r = request(reply_topic="svc.replies")
    chunk = TokenChunk(
        request_id=r.request_id,
        seq=0,
        text="Once",
        token_ids=(9,),
        submitted_at=r.submitted_at,
        emitted_at=r.submitted_at + 80,
        worker_id="w-1",
        warm=False,
    )
    rec = record_for(chunk, r.reply_topic)
    assert (rec.topic, rec.key, rec.headers) == (
        "svc.replies",
        b"req-42",
        [("ember-schema", b"token_chunk/1.0")],
    )
    assert decode(TokenChunk, rec.value, rec.headers) == chunk
    assert record_for(r).topic == "ember.requests"
    with pytest.raises(SchemaError, match=re.escape("has no default topic")):
        record_for(chunk)


# --- dead letters and rejections ---------------------------------------------------------


def test_a_dead_letter_keeps_the_error_and_the_original_bytes() -> None:
    bad = pack({**PLAIN_REQUEST, "temperature": float("nan")})
    try:
        decode(Request, bad)
    except SchemaError as exc:
        error = exc
    dead = dead_letter_for(
        topic="ember.requests",
        partition=2,
        offset=99,
        key=b"req-42",
        value=bad,
        error=error,
        at=5,
        component="admission",
        headers=[("ember-schema", b"request/1.0")],
    )
    assert (dead.reason, dead.key, dead.value_bytes, dead.value_size) == (
        "invalid",
        "req-42",
        bad,
        len(bad),
    )
    assert dead.source_schema == "request/1.0" and dead.component == "admission"
    assert [(p.path, p.problem) for p in dead.problems] == [
        ("temperature", "must be a finite number >= 0, got nan")
    ]
    assert dead.error == "request: temperature: must be a finite number >= 0, got nan"
    assert decode(DeadLetter, encode(dead)) == dead
    assert record_for(dead).key == b"req-42" and record_for(dead).topic == "ember.deadletters"


def test_a_dead_letter_keeps_a_non_utf8_key_as_bytes_and_cuts_huge_values() -> None:
    value = b"\xc1" * (MAX_DEAD_LETTER_VALUE_BYTES + 10)
    dead = dead_letter_for(
        topic="ember.requests",
        partition=0,
        offset=1,
        key=b"\xff\x00",
        value=value,
        error=KeyError("boom"),
        at=5,
    )
    assert dead.key == b"\xff\x00" and record_for(dead).key == b"\xff\x00"
    assert dead.reason == "processing_failed" and dead.error == "KeyError: 'boom'"
    assert dead.truncated and dead.value_size == len(value)
    assert dead.value_bytes is not None and len(dead.value_bytes) == MAX_DEAD_LETTER_VALUE_BYTES
    assert decode(DeadLetter, encode(dead)) == dead


def test_a_dead_letter_of_a_tombstone_without_key() -> None:
    try:
        decode(LifecycleEvent, None)
    except DecodeError as exc:
        dead = dead_letter_for(
            topic="ember.workers", partition=0, offset=1, key=None, value=None, error=exc, at=5
        )
    assert (dead.key, dead.value_bytes, dead.value_size, dead.reason) == (
        None,
        None,
        0,
        "undecodable",
    )
    assert record_for(dead).key is None


def test_an_invalid_request_can_still_be_answered_on_its_reply_topic() -> None:
    bad = pack({**PLAIN_REQUEST, "reply_topic": "svc.replies", "top_p": 9})
    route = reply_route(bad)
    assert route is not None
    assert (route.request_id, route.reply_topic, route.submitted_at) == (
        "req-42",
        "svc.replies",
        PLAIN_REQUEST["submitted_at"],
    )
    no_topic = reply_route(pack({"request_id": "req-1", "submitted_at": "yesterday"}))
    assert no_topic is not None and (no_topic.reply_topic, no_topic.submitted_at) == (
        "ember.replies",
        None,
    )


def test_an_invalid_admitted_request_is_answered_on_its_requests_reply_topic() -> None:
    inner = {**PLAIN_REQUEST, "reply_topic": "svc.replies"}
    route = reply_route(pack({"v": "1.0", "request": inner, "attempt": 0}))
    assert route is not None and (route.request_id, route.reply_topic) == (
        "req-42", "svc.replies")
    assert reply_route(pack({"v": "1.0", "request": {"request_id": "bad id"}})) is None
    assert reply_route(pack({"v": "1.0", "request": "not a map"})) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        pack([1]),
        pack({"prompt": "no id"}),
        pack({"request_id": "bad id"}),
        pack({"request_id": "r", "reply_topic": "ember.requests"}),  # never our own topics
        pack({"request_id": "r", "reply_topic": "ember.model.tiny"}),
        pack({"request_id": "r", "reply_topic": "no spaces allowed"}),
    ],
)
def test_a_request_that_cannot_be_answered_has_no_route(data: bytes) -> None:
    assert reply_route(data) is None


# --- what a record of a topic is (§5.3) -----------------------------------------------------


def _topic_records() -> tuple[Request, AdmittedRequest, Cancel]:
    req = request()
    admitted = AdmittedRequest(request=req, latency_class="interactive", prompt_tokens=4,
                               prompt_bucket=64, admitted_at=req.submitted_at + 1)
    cancel = Cancel(request_id=req.request_id, model=req.model, cancelled_at=req.submitted_at)
    return req, admitted, cancel


@pytest.mark.parametrize("with_header", [True, False])
def test_each_topic_tells_its_messages_apart_with_or_without_the_header(
    with_header: bool,
) -> None:
    req, admitted, cancel = _topic_records()

    def read(reader: object, msg: Request | AdmittedRequest | Cancel) -> object:
        headers = headers_for(msg) if with_header else None
        return reader(encode(msg), headers)  # type: ignore[operator]

    assert read(decode_requests_record, req) == req
    assert read(decode_requests_record, cancel) == cancel
    assert read(decode_admitted_record, admitted) == admitted
    assert read(decode_admitted_record, cancel) == cancel
    assert read(decode_model_record, admitted) == admitted
    assert read(decode_model_record, req) == req
    assert read(decode_model_record, cancel) == cancel


def test_a_record_that_is_neither_kind_of_its_topic_is_a_schema_error() -> None:
    req, admitted, _ = _topic_records()
    with pytest.raises(SchemaError):
        decode_requests_record(pack(["not", "a", "map"]), None)
    with pytest.raises(ValidationError):  # an admitted request where requests go: no prompt
        decode_requests_record(encode(admitted), None)
    with pytest.raises(SchemaError):  # its header names another schema than the map is
        decode_admitted_record(encode(req), headers_for(req))
