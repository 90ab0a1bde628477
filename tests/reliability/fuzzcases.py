"""Hypothesis strategies of bad (and oddly valid) records for `ember.requests` (admission) and
for a model topic (a worker), and the oracle that says what Ember must answer to each.

A drawn `Case` is a record template (key, value, headers); `materialize` gives it its
request id. The oracle decodes the record the way its consumer must (docs/PROTOCOL.md §2-§5)
and says: a dead letter (and a `rejected` chunk when `reply_route` finds a reply topic), or,
for a record that is valid, one terminal chunk with the code the policy implies.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Any

import msgpack
from hypothesis import strategies as st

from schemas import (
    Cancel,
    Request,
    SchemaError,
    decode,
    decode_key,
    decode_model_record,
    decode_requests_record,
)
from schemas.codec import reply_route
from schemas.limits import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS
from schemas.topics import REPLIES

RID = "\x00rid\x00"  # placeholder, replaced by the case's request id
NOW = "\x00now\x00"  # placeholder, replaced by the submit time

ADMISSION = "admission"
WORKER = "worker"


@dataclass(frozen=True)
class Case:
    """A record before it gets its request id: `value` is raw bytes, None (a tombstone) or a
    map to pack (placeholders inside); `key` is bytes, None, or RID (the request id)."""

    kind: str
    key: Any
    value: Any
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Record:
    kind: str
    request_id: str
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True)
class Expect:
    """What Ember must do with a record: `dead_letter` (from `component`), and a lone chunk
    on `reply_topic` for `request_id` whose finish reason is in `finish` (and code in `codes`,
    when given), or no chunk (`reply_topic` None)."""

    dead_letter: bool
    request_id: str | None = None
    reply_topic: str | None = None
    finish: tuple[str, ...] = ()
    codes: tuple[str, ...] = ()


def _fill(obj: Any, request_id: str, now: int) -> Any:
    if obj == RID:
        return request_id
    if obj == NOW:
        return now
    if isinstance(obj, dict):
        return {_fill(k, request_id, now): _fill(v, request_id, now) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, request_id, now) for v in obj]
    return obj


def materialize(case: Case, request_id: str, now: int) -> Record:
    if case.key == RID:
        key: bytes | None = request_id.encode()
    else:
        key = case.key
    if case.value is None and key is None:
        key = b""  # Kafka takes no record without both
    if case.value is None or isinstance(case.value, bytes):
        value = case.value
    else:
        value = msgpack.packb(_fill(case.value, request_id, now), use_bin_type=True)
    return Record(case.kind, request_id, key, value, case.headers)


# --- the oracle --------------------------------------------------------------------------------


def expect(target: str, record: Record, served: str, reply: str, nowhere: str) -> Expect:
    """`target` ADMISSION or WORKER; `served` the model the stack serves; `reply` the fuzz
    reply topic; `nowhere` a valid topic name that does not exist."""
    try:
        decode_key(record.key)
        work = (decode_requests_record if target == ADMISSION else decode_model_record)(
            record.value, list(record.headers)
        )
    except SchemaError:
        route = reply_route(record.value)
        if route is None or route.reply_topic not in (reply, REPLIES):
            return Expect(True)
        return Expect(True, route.request_id, route.reply_topic, ("rejected",))
    assert not isinstance(work, Cancel), "the strategies never draw cancels"
    request = work if isinstance(work, Request) else work.request
    if request.reply_topic == nowhere:
        # Nobody can be answered there. Admission has no reason to look; the worker
        # dead-letters it (its reply topic does not exist).
        return Expect(target == WORKER)
    if request.model != served:
        return Expect(False, request.request_id, request.reply_topic, ("rejected",),
                      ("unknown_model",))
    return Expect(False, request.request_id, request.reply_topic,
                  ("rejected", "error", "stop", "length"))


# --- strategies -------------------------------------------------------------------------------

SAFE = string.ascii_letters + string.digits + "._-"
BAD_NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, -1, -1e-9, 0, 1.0000001, 2**63 - 1,
                     -(2**63), 2**64 - 1, 1e308]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**63), 2**64 - 1),
)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.binary(max_size=12), st.lists(st.integers(-5, 5), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-(2**63), 2**63 - 1), max_size=3),
)


def base_request(model: str, reply: str, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "v": "1.0", "request_id": RID, "model": model, "submitted_at": NOW,
        "prompt": "fuzz", "max_tokens": 4, "temperature": 0.0, "reply_topic": reply,
    }
    for name, new in changes.items():
        if new is _DROP:
            value.pop(name, None)
        else:
            value[name] = new
    return value


_DROP = object()


def admitted_map(inner: dict[str, Any], **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "v": "1.0", "request": inner, "latency_class": "interactive", "prompt_tokens": 1,
        "prompt_bucket": 16, "admitted_at": NOW,
    }
    for name, new in changes.items():
        if new is _DROP:
            value.pop(name, None)
        else:
            value[name] = new
    return value


def not_an_id() -> st.SearchStrategy[Any]:
    """Request ids the wire refuses (so no two cases share one)."""
    return st.one_of(
        st.sampled_from(["", "has space", "a" * 129, "ünï", "slash/id"]),
        st.text(max_size=20).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", t)),
        ANY_VALUE.filter(lambda v: not isinstance(v, str)),
    )


def bad_topic_names() -> st.SearchStrategy[str]:
    """Reply topics a request may not name: illegal characters, too long, empty, `.`/`..`,
    Ember's own topics."""
    own = ["ember.requests", "ember.admitted", "ember.lifecycle", "ember.decisions",
           "ember.workers", "ember.deadletters", "ember.model.x", "", ".", "..", "a" * 250]
    illegal = st.text(min_size=1, max_size=20).filter(lambda t: any(c not in SAFE for c in t))
    return st.one_of(st.sampled_from(own), illegal)


@st.composite
def request_fields(draw: st.DrawFn, model: str, unknown: str, reply: str,
                   max_work: int = 4096) -> dict[str, Any]:
    """A request map with one kind of problem (or none: an unknown model, extra fields).
    A request of the served model that stays valid generates at most 8 tokens when its
    max_tokens is at most `max_work` (the consumer would run it): fuzzing must not turn into
    load that crowds out the valid traffic it checks."""
    target_model = draw(st.sampled_from([unknown, unknown, unknown, model]))
    problem = draw(st.sampled_from([
        "wrong_type", "wrong_type", "missing", "huge_prompt", "huge_ids", "both_prompts",
        "max_tokens", "sampling", "sampling", "stop", "latency_class", "reply_topic",
        "version", "model_name", "ids", "times", "unknown_fields", "deep", "valid",
    ]))
    fields = [
        "v", "request_id", "model", "submitted_at", "prompt", "prompt_token_ids", "max_tokens",
        "temperature", "top_p", "top_k", "seed", "stop", "latency_class", "reply_topic",
        "deadline_at", "tenant",
    ]
    base = base_request(target_model, reply)
    if problem == "wrong_type":
        name = draw(st.sampled_from(fields))
        # request ids and reply topics stay unusable: a drawn valid one could repeat across
        # cases or name a topic nobody reads
        wrong = {"request_id": not_an_id(), "reply_topic": st.one_of(
            bad_topic_names(), ANY_VALUE.filter(lambda v: not isinstance(v, str)))}
        base[name] = draw(wrong.get(name, ANY_VALUE))
    elif problem == "missing":
        base.pop(draw(st.sampled_from(["v", "request_id", "model", "submitted_at", "prompt"])))
    elif problem == "huge_prompt":
        base["prompt"] = "x" * draw(st.integers(MAX_PROMPT_CHARS + 1, MAX_PROMPT_CHARS + 4096))
    elif problem == "huge_ids":
        base.pop("prompt")
        base["prompt_token_ids"] = [1] * draw(st.integers(MAX_PROMPT_TOKENS + 1,
                                                          MAX_PROMPT_TOKENS + 64))
    elif problem == "both_prompts":
        base["prompt_token_ids"] = [1, 2]
    elif problem == "max_tokens":
        base["max_tokens"] = draw(st.one_of(
            st.integers(MAX_NEW_TOKENS + 1, 2**64 - 1), st.integers(-(2**63), 0),
            st.integers(4097, MAX_NEW_TOKENS),  # valid, but past the model's context
            BAD_NUMBERS,
        ))
    elif problem == "sampling":
        name = draw(st.sampled_from(["temperature", "top_p", "top_k", "seed"]))
        base[name] = draw(BAD_NUMBERS)
    elif problem == "stop":
        base["stop"] = draw(st.sampled_from(
            [[""], ["x" * 257], ["a"] * 17, "not a list", [1, 2], [None], {"a": 1}]))
    elif problem == "latency_class":
        base["latency_class"] = draw(st.one_of(st.sampled_from(["realtime", "", "BATCH"]),
                                               st.text(max_size=10)))
    elif problem == "reply_topic":
        base["reply_topic"] = draw(bad_topic_names())
    elif problem == "version":
        base["v"] = draw(st.one_of(st.sampled_from(["2.0", "0.9", "1", "x.y", "1.0.0", ""]),
                                   ANY_VALUE))
    elif problem == "model_name":
        base["model"] = draw(st.one_of(
            st.sampled_from(["", "has space", "ünïcode", "a" * 201, "tab\tmodel"]),
            st.text(max_size=30)))
    elif problem == "ids":
        base["request_id"] = draw(not_an_id())
    elif problem == "times":
        which = draw(st.sampled_from(["submitted_at", "deadline_at", "deadline_before"]))
        if which == "deadline_before":
            base["deadline_at"] = 1  # before submitted_at
        else:
            base[which] = draw(BAD_NUMBERS)
    elif problem == "unknown_fields":
        extra = draw(st.dictionaries(st.text(SAFE, min_size=1, max_size=8).map("x_".__add__),
                                     ANY_VALUE, min_size=1, max_size=6))
        base.update(extra)
    elif problem == "deep":
        deep: Any = 1
        for _ in range(draw(st.integers(50, 400))):
            deep = [deep]
        base[draw(st.sampled_from(["prompt", "stop", "x_nested"]))] = deep
    tokens = base.get("max_tokens")
    if target_model == model and type(tokens) is int and 8 < tokens <= max_work:
        base["max_tokens"] = 8
    return base


@st.composite
def raw_value(draw: st.DrawFn) -> Any:
    """Bytes that are not a msgpack map (or not msgpack), or a tombstone."""
    kind = draw(st.sampled_from(["bytes", "not_map", "tombstone", "truncated", "empty"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "not_map":
        return msgpack.packb(draw(st.one_of(
            st.integers(-5, 5), st.text(max_size=10), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
            st.floats(allow_nan=True), st.binary(max_size=8), st.none(), st.booleans())))
    if kind == "truncated":
        whole = msgpack.packb({"v": "1.0", "request_id": "cut", "prompt": "x" * 20})
        return whole[: draw(st.integers(1, len(whole) - 1))]
    if kind == "empty":
        return b""
    return None


@st.composite
def keys(draw: st.DrawFn) -> Any:
    """Mostly the request id; sometimes missing, empty or not UTF-8."""
    kind = draw(st.sampled_from(["rid"] * 8 + ["none", "empty", "not_utf8"]))
    if kind == "rid":
        return RID
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    return draw(st.binary(min_size=1, max_size=16).filter(_not_utf8))


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


HEADERS = st.sampled_from([
    (), (), (), (("ember-schema", b"request/1.0"),), (("ember-schema", b"request/2.0"),),
    (("ember-schema", b"token_chunk/1.0"),), (("ember-schema", b"\xff\xfe"),),
    (("ember-schema", b"garbage"),),
])


@st.composite
def admission_cases(draw: st.DrawFn, model: str, unknown: str, reply: str,
                    nowhere: str) -> Case:
    """A record for ember.requests."""
    shape = draw(st.sampled_from(["fields"] * 12 + ["raw", "raw", "nowhere", "default_reply"]))
    headers = draw(HEADERS) if draw(st.integers(0, 5)) == 0 else ()
    key = draw(keys())
    if shape == "raw":
        return Case("raw", key, draw(raw_value()), headers)
    if shape == "nowhere":
        return Case("nowhere", key, base_request(unknown, nowhere), headers)
    if shape == "default_reply":
        return Case("default_reply", key, base_request(unknown, reply, reply_topic=_DROP))
    fields = draw(request_fields(model, unknown, reply))
    tokens = fields.get("max_tokens")
    runs = tokens is None or (type(tokens) is int and tokens <= 4000)  # within the context
    if fields.get("model") == model and runs and _admissible(fields):
        # A valid request of the served model would be admitted and run: hundreds of them
        # in a burst are load, and admission rightly refuses valid traffic `overloaded`.
        # The valid traffic beside the fuzz covers that path.
        fields["model"] = unknown
    return Case("fields", key, fields, headers)


def _admissible(fields: dict[str, Any]) -> bool:
    """Would admission take this map as a valid request (placeholders filled)?"""
    try:
        value = msgpack.packb(_fill(fields, "probe", 1), use_bin_type=True)
        decode(Request, value)
    except (SchemaError, ValueError, TypeError, OverflowError):
        return False
    return True


@st.composite
def worker_cases(draw: st.DrawFn, model: str, unknown: str, reply: str, nowhere: str) -> Case:
    """A record for a worker's partition: an admitted request (or a plain request, which
    workers also read) with a problem, raw bytes, or a valid one the worker must refuse."""
    shape = draw(st.sampled_from(
        ["admitted"] * 6 + ["plain"] * 3 + ["admitted_fields"] * 3
        + ["raw", "raw", "nowhere", "too_long", "vocab", "late"]))
    key = draw(keys())
    headers = draw(HEADERS) if draw(st.integers(0, 5)) == 0 else ()
    if shape == "raw":
        return Case("raw", key, draw(raw_value()), headers)
    # a worker runs any max_tokens up to its context: keep what it would run short
    fields = request_fields(model, unknown, reply, max_work=MAX_NEW_TOKENS)
    if shape == "plain":
        return Case("plain", key, draw(fields), ())
    if shape == "admitted":
        return Case("admitted", key, admitted_map(draw(fields)), headers)
    if shape == "admitted_fields":
        name = draw(st.sampled_from(["v", "request", "latency_class", "prompt_tokens",
                                     "prompt_bucket", "admitted_at", "attempt", "worker_id",
                                     "warm", "placed_at", "previous_workers"]))
        value = draw(st.one_of(ANY_VALUE, st.just(_DROP)))
        return Case("admitted_fields", key,
                    admitted_map(base_request(unknown, reply), **{name: value}), headers)
    if shape == "nowhere":
        return Case("nowhere", key, admitted_map(base_request(model, nowhere)))
    if shape == "too_long":  # valid on the wire; the prompt alone fills the context
        ids = [1] * draw(st.integers(2048, 4096))
        return Case("too_long", key, admitted_map(base_request(
            model, reply, prompt=_DROP, prompt_token_ids=ids)))
    if shape == "vocab":  # valid on the wire; ids outside the model's vocabulary
        ids = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8))
        return Case("vocab", key, admitted_map(base_request(
            model, reply, prompt=_DROP, prompt_token_ids=ids, max_tokens=2)))
    return Case("late", key, admitted_map(base_request(model, reply, submitted_at=1,
                                                        deadline_at=2)))
