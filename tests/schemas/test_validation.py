"""Bad input is refused with an error that names the field and the problem."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from schemas import (
    AdmittedRequest,
    DeadLetter,
    DecodeError,
    LifecycleEvent,
    Message,
    Request,
    ScaleDecision,
    TokenChunk,
    ValidationError,
    decode,
)
from schemas.limits import (
    MAX_MESSAGE_BYTES,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_STOP_STRINGS,
)

CANARY = "canary-7f3a9c"

REQUEST = {"v": "1.0", "request_id": "r-1", "model": "tiny", "prompt": "Hi", "submitted_at": 1000}
ADMITTED = {
    "v": "1.0",
    "request": REQUEST,
    "latency_class": "interactive",
    "prompt_tokens": 2,
    "prompt_bucket": 128,
    "admitted_at": 1001,
}
CHUNK = {"v": "1.0", "request_id": "r-1", "seq": 0, "submitted_at": 1000, "emitted_at": 1010}
EVENT = {
    "v": "1.0",
    "worker_id": "w-1",
    "model": "tiny",
    "kind": "state",
    "state": "ready",
    "at": 5,
}
DECISION = {
    "v": "1.0",
    "model": "tiny",
    "action": "hold",
    "count": 0,
    "reason": "queue empty",
    "policy": "predictive",
    "decided_at": 5,
}
DEAD = {
    "v": "1.0",
    "source_topic": "ember.requests",
    "source_partition": 0,
    "source_offset": 7,
    "value_size": 0,
    "reason": "undecodable",
    "error": "not msgpack",
    "at": 5,
}
BASES: dict[type[Message], dict[str, Any]] = {
    Request: REQUEST,
    AdmittedRequest: ADMITTED,
    TokenChunk: CHUNK,
    LifecycleEvent: EVENT,
    ScaleDecision: DECISION,
    DeadLetter: DEAD,
}
DROP = object()  # remove the field instead of setting it


def with_fields(cls: type[Message], **changes: Any) -> bytes:
    value = dict(BASES[cls])
    for name, new in changes.items():
        if new is DROP:
            value.pop(name, None)
        else:
            value[name] = new
    return msgpack.packb(value, use_bin_type=True)


@pytest.mark.parametrize("cls", list(BASES), ids=lambda c: c.SCHEMA.name)
def test_the_base_maps_are_valid(cls: type[Message]) -> None:
    decode(cls, with_fields(cls))


# (type, changes, expected error text): every row names the field and what is wrong.
BAD: list[tuple[type[Message], dict[str, Any], str]] = [
    (Request, {"temperature": math.nan}, "temperature: must be a finite number >= 0, got nan"),
    (Request, {"temperature": -0.5}, "temperature: must be a finite number >= 0, got -0.5"),
    (Request, {"temperature": math.inf}, "temperature: must be a finite number >= 0, got inf"),
    (Request, {"temperature": "hot"}, "temperature: must be a finite number >= 0, got string"),
    (Request, {"top_p": 0}, "top_p: must be a finite number > 0 and <= 1, got 0"),
    (Request, {"top_p": 1.5}, "top_p: must be a finite number > 0 and <= 1, got 1.5"),
    (
        Request,
        {"max_tokens": 0},
        f"max_tokens: must be an integer >= 1 and <= {MAX_NEW_TOKENS}, got 0",
    ),
    (Request, {"max_tokens": MAX_NEW_TOKENS + 1}, f"got {MAX_NEW_TOKENS + 1}"),
    (Request, {"max_tokens": 16.0}, "max_tokens: must be an integer >= 1 and <= 16384, got float"),
    (
        Request,
        {"max_tokens": True},
        "max_tokens: must be an integer >= 1 and <= 16384, got boolean",
    ),
    (Request, {"top_k": -1}, "top_k: must be an integer >= 0 and <= 1000000, got -1"),
    (Request, {"seed": -1}, "seed: must be an integer >= 0, got -1"),
    (Request, {"seed": 2**64 - 1}, "seed: must be an integer >= 0, got 18446744073709551615"),
    (Request, {"model": ""}, "model: must not be empty"),
    (
        Request,
        {"model": "llama 7b"},
        "model: must be printable ASCII without spaces, got 'llama 7b'",
    ),
    (Request, {"model": 7}, "model: must be a string, got integer"),
    (Request, {"request_id": DROP}, "request_id: required field missing"),
    (Request, {"request_id": None}, "request_id: required, got nil"),
    (Request, {"request_id": "a/b"}, "request_id: must be made of [A-Za-z0-9._:-], got 'a/b'"),
    (Request, {"request_id": "x" * 129}, "request_id: must have 1..128 characters, got 129"),
    (Request, {"submitted_at": DROP}, "submitted_at: required field missing"),
    (Request, {"submitted_at": -1}, "submitted_at: must be an integer >= 0, got -1"),
    (Request, {"submitted_at": "2026-01-01"}, "submitted_at: must be an integer >= 0, got string"),
    (Request, {"reply_topic": "my topic"}, "reply_topic: must be a Kafka topic name"),
    (Request, {"reply_topic": ""}, "reply_topic: must not be empty"),
    (
        Request,
        {"reply_topic": "ember.requests"},
        "not an Ember control or model topic, got 'ember.requests'",
    ),
    (Request, {"reply_topic": "ember.model.tiny"}, "reply_topic: must be a Kafka topic name"),
    (
        Request,
        {"latency_class": "fast"},
        "latency_class: must be one of interactive, batch, eval, got 'fast'",
    ),
    (Request, {"prompt": ""}, "prompt: must not be empty"),
    (
        Request,
        {"prompt": "x" * (MAX_PROMPT_CHARS + 1)},
        f"prompt: must have 1..{MAX_PROMPT_CHARS} characters, got {MAX_PROMPT_CHARS + 1}",
    ),
    (Request, {"prompt": b"Hi"}, "prompt: must be a string, got binary"),
    (
        Request,
        {"prompt": DROP},
        "prompt: exactly one of prompt and prompt_token_ids must be set, got neither",
    ),
    (
        Request,
        {"prompt_token_ids": [1, 2]},
        "prompt: exactly one of prompt and prompt_token_ids must be set, got both",
    ),
    (Request, {"prompt": DROP, "prompt_token_ids": []}, "prompt_token_ids: must not be empty"),
    (
        Request,
        {"prompt": DROP, "prompt_token_ids": [1, -2, 3]},
        "prompt_token_ids[1]: must be an integer >= 0 and <= 2147483647, got -2",
    ),
    (
        Request,
        {"prompt": DROP, "prompt_token_ids": [1, "2"]},
        "prompt_token_ids[1]: must be an integer >= 0 and <= 2147483647, got string",
    ),
    (
        Request,
        {"prompt": DROP, "prompt_token_ids": [1] * (MAX_PROMPT_TOKENS + 1)},
        f"prompt_token_ids: must have 1..{MAX_PROMPT_TOKENS} items, got {MAX_PROMPT_TOKENS + 1}",
    ),
    (
        Request,
        {"prompt": DROP, "prompt_token_ids": "1 2 3"},
        "prompt_token_ids: must be an array of int, got string",
    ),
    (
        Request,
        {"stop": ["a"] * (MAX_STOP_STRINGS + 1)},
        f"stop: must have 0..{MAX_STOP_STRINGS} items, got 17",
    ),
    (Request, {"stop": ["ok", ""]}, "stop[1]: must not be empty"),
    (Request, {"stop": "###"}, "stop: must be an array of str, got string"),
    (Request, {"deadline_at": 999}, "deadline_at: must be after submitted_at (1000), got 999"),
    (Request, {"tenant": ""}, "tenant: must not be empty"),
    (Request, {"v": DROP}, "v: must be a 'MAJOR.MINOR' string like '1.0', missing"),
    (Request, {"v": 1}, "v: must be a 'MAJOR.MINOR' string like '1.0', got 1"),
    (Request, {"v": "1"}, "v: must be a 'MAJOR.MINOR' string like '1.0', got '1'"),
    (
        AdmittedRequest,
        {"request": {**REQUEST, "top_p": 0.0}},
        "request.top_p: must be a finite number > 0 and <= 1, got 0.0",
    ),
    (
        AdmittedRequest,
        {"request": {k: v for k, v in REQUEST.items() if k != "v"}},
        "request.v: must be a 'MAJOR.MINOR' string",
    ),
    (AdmittedRequest, {"request": "r-1"}, "request: must be a map, got string"),
    (AdmittedRequest, {"prompt_bucket": 0}, "prompt_bucket: must be an integer >= 1"),
    (AdmittedRequest, {"attempt": 0}, "attempt: must be an integer >= 1 and <= 64, got 0"),
    (AdmittedRequest, {"warm": True}, "warm: only allowed once worker_id is set"),
    (
        AdmittedRequest,
        {"worker_id": "w-1"},
        "warm: required once worker_id is set; placed_at: required once worker_id is set",
    ),
    (
        AdmittedRequest,
        {"worker_id": "w-1", "warm": 1, "placed_at": 5},
        "warm: must be a boolean, got integer",
    ),
    (TokenChunk, {"seq": -1}, "seq: must be an integer >= 0 and <= 2147483647, got -1"),
    (
        TokenChunk,
        {"finish_reason": "done"},
        "finish_reason: must be one of stop, length, cancelled, error, rejected, got 'done'",
    ),
    (
        TokenChunk,
        {"finish_reason": "error"},
        "error_code: required when finish_reason is error; "
        "error_message: required when finish_reason is error",
    ),
    (
        TokenChunk,
        {"error_code": "overloaded"},
        "error_code: only allowed when finish_reason is error, rejected or cancelled",
    ),
    (
        TokenChunk,
        {"finish_reason": "stop", "error_message": "boom"},
        "error_message: only allowed when finish_reason is error, rejected or cancelled",
    ),
    (
        TokenChunk,
        {"error_code": "Bad Code", "finish_reason": "error", "error_message": "x"},
        "error_code: must be matching [a-z][a-z0-9_.]*, got 'Bad Code'",
    ),
    (
        TokenChunk,
        {"completion_tokens": 3},
        "completion_tokens: only allowed on the terminal chunk (with a finish_reason)",
    ),
    (
        TokenChunk,
        {
            "finish_reason": "rejected",
            "error_code": "overloaded",
            "error_message": "full",
            "seq": 2,
        },
        "finish_reason: rejected is a lone chunk",
    ),
    (TokenChunk, {"worker_id": "w-1"}, "warm: required on every chunk a worker emits"),
    (
        TokenChunk,
        {"token_ids": [1, 2**31]},
        "token_ids[1]: must be an integer >= 0 and <= 2147483647, got 2147483648",
    ),
    (TokenChunk, {"emitted_at": DROP}, "emitted_at: required field missing"),
    (
        LifecycleEvent,
        {"state": "sleeping"},
        "state: must be one of starting, loading, restoring, warming, ready, draining, stopped, "
        "failed, got 'sleeping'",
    ),
    (LifecycleEvent, {"kind": "ping"}, "kind: must be one of state, heartbeat, span, got 'ping'"),
    (
        LifecycleEvent,
        {"kind": "heartbeat"},
        "free_slots: required when kind is heartbeat; total_slots: required when kind is "
        "heartbeat; queued_tokens: required when kind is heartbeat",
    ),
    (
        LifecycleEvent,
        {"kind": "heartbeat", "free_slots": 9, "total_slots": 8, "queued_tokens": 0},
        "free_slots: must be <= total_slots (8), got 9",
    ),
    (
        LifecycleEvent,
        {
            "kind": "span",
            "span_name": "weights_load",
            "span_start_at": 10,
            "span_end_at": 9,
            "span_duration_ms": 1,
        },
        "span_end_at: must be >= span_start_at (10), got 9",
    ),
    (
        LifecycleEvent,
        {"kind": "span", "span_name": "load", "span_start_at": 1, "span_end_at": 2},
        "span_duration_ms: required when kind is span",
    ),
    (
        LifecycleEvent,
        {"in_flight": ["r-1", "bad id"]},
        "in_flight[1]: must be made of [A-Za-z0-9._:-], got 'bad id'",
    ),
    (LifecycleEvent, {"attrs": {"gbps": math.nan}}, "attrs.gbps: must be a finite number, got nan"),
    (
        LifecycleEvent,
        {"attrs": {"shape": [1, 2]}},
        "attrs.shape: must be nil, boolean, integer, float or string, got array",
    ),
    (
        ScaleDecision,
        {"action": "scale_down"},
        "action: must be one of scale_up, hold, release, got 'scale_down'",
    ),
    (ScaleDecision, {"action": "scale_up"}, "count: must be >= 1 for scale_up, got 0"),
    (ScaleDecision, {"count": 2}, "count: must be 0 for hold, got 2"),
    (ScaleDecision, {"action": "release", "count": 1}, "worker_id: required for release"),
    (ScaleDecision, {"worker_id": "w-1"}, "worker_id: only allowed for release, got action hold"),
    (ScaleDecision, {"reason": ""}, "reason: must not be empty"),
    (
        ScaleDecision,
        {"inputs": {"hit_rate": math.inf}},
        "inputs.hit_rate: must be a finite number, got inf",
    ),
    (ScaleDecision, {"inputs": []}, "inputs: must be a map, got array"),
    (ScaleDecision, {"policy": "Knative Style"}, "policy: must be matching [a-z][a-z0-9_.]*"),
    (
        DeadLetter,
        {"reason": "oops"},
        "reason: must be one of undecodable, invalid, unsupported_version, bad_key, "
        "processing_failed, got 'oops'",
    ),
    (DeadLetter, {"value_bytes": "text"}, "value_bytes: must be bin, got string"),
    (DeadLetter, {"key": 5}, "key: must be bin or str, got integer"),
    (DeadLetter, {"source_topic": "a b"}, "source_topic: must be a Kafka topic name, got 'a b'"),
    (
        DeadLetter,
        {"problems": [{"path": 1}]},
        "problems[0]: must be a map {path: str, problem: str}",
    ),
]


@pytest.mark.parametrize(
    ("cls", "changes", "expected"),
    BAD,
    ids=[f"{cls.SCHEMA.name}-{'-'.join(changes)}" for cls, changes, _ in BAD],
)
def test_bad_field_is_named_with_its_problem(
    cls: type[Message], changes: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        decode(cls, with_fields(cls, **changes))
    assert expected in str(caught.value)
    assert str(caught.value).startswith(f"{cls.SCHEMA.name}: ")
    assert caught.value.reason == "invalid"


def test_every_problem_is_reported_at_once() -> None:
    data = with_fields(Request, temperature=math.nan, top_p=2, max_tokens=0, model="")
    with pytest.raises(ValidationError) as caught:
        decode(Request, data)
    assert [p.path for p in caught.value.problems] == [
        "model",
        "max_tokens",
        "temperature",
        "top_p",
    ]
    assert caught.value.problems[0].problem == "must not be empty"


def test_constructors_validate_like_decode() -> None:
    with pytest.raises(ValidationError, match="temperature: must be a finite number >= 0, got nan"):
        Request(request_id="r-1", model="tiny", submitted_at=0, prompt="Hi", temperature=math.nan)
    with pytest.raises(ValidationError, match="count: must be 1 for release, got 2"):
        ScaleDecision(
            model="tiny",
            action="release",
            count=2,
            worker_id="w",
            reason="idle",
            policy="p",
            decided_at=0,
        )


def test_constructors_normalize_lists_and_numbers() -> None:
    r = Request(
        request_id="r-1",
        model="tiny",
        submitted_at=0,
        prompt_token_ids=[1, 2],  # type: ignore[arg-type]
        temperature=0,
        stop=["\n\n"],  # type: ignore[arg-type]
    )
    assert r.prompt_token_ids == (1, 2) and r.stop == ("\n\n",)
    assert isinstance(r.temperature, float) and r.temperature == 0.0
    hash(r)  # frozen and hashable: lists became tuples


def test_problems_never_echo_user_text() -> None:
    long_prompt = CANARY * (MAX_PROMPT_CHARS // len(CANARY) + 1)
    for data in (
        with_fields(Request, prompt=long_prompt),
        with_fields(Request, stop=[CANARY * 30]),
        with_fields(Request, prompt=DROP, prompt_token_ids=[CANARY]),
        with_fields(TokenChunk, text=CANARY * 10_000),
    ):
        with pytest.raises(ValidationError) as caught:
            decode(Request if b"prompt" in data or b"stop" in data else TokenChunk, data)
        assert CANARY not in str(caught.value)


def test_lone_surrogates_are_refused_before_they_reach_msgpack() -> None:
    with pytest.raises(ValidationError, match="prompt: must be valid Unicode"):
        Request(request_id="r-1", model="tiny", submitted_at=0, prompt="\ud800")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2]), "value must be a msgpack map, got array"),
        (msgpack.packb("hello"), "value must be a msgpack map, got string"),
        (msgpack.packb({"v": "1.0"}) + b"\x00", "not valid msgpack (ExtraData"),
        (b"\x81\xa1v\xa3\xff\xfe\xfd", "not valid msgpack"),  # a str that is not UTF-8
        (None, "no value (a tombstone)"),
        (
            b"\xc4" + b"\x00" * (MAX_MESSAGE_BYTES + 1),
            f"more than the limit of {MAX_MESSAGE_BYTES}",
        ),
    ],
    ids=["empty", "reserved-byte", "array", "string", "trailing", "bad-utf8", "tombstone", "huge"],
)
def test_undecodable_bytes_raise_decode_error(data: bytes | None, expected: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode(Request, data)
    assert expected in str(caught.value)
    assert caught.value.reason == "undecodable"
