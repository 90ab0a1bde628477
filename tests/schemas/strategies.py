"""Hypothesis strategies for every message, derived from the field tables.

`fields_of(cls)` draws each field from its check (so a new field is covered without touching
this file); the per-type composites then bend the draw to satisfy the cross-field rules.
"""

from __future__ import annotations

import functools
import string
from typing import Any

from hypothesis import strategies as st

from schemas import (
    AdmittedRequest,
    Cancel,
    DeadLetter,
    FieldProblem,
    LifecycleEvent,
    Message,
    Request,
    ScaleDecision,
    TokenChunk,
)
from schemas.fields import (
    Blob,
    Bool,
    Check,
    Float,
    Int,
    ListOf,
    Nested,
    ScalarMap,
    Text,
    field_specs,
)
from schemas.limits import INT64_MAX

ID_ALPHABET = string.ascii_letters + string.digits + "._:-"
MODEL_ALPHABET = "".join(chr(c) for c in range(0x21, 0x7F))
TOPIC_ALPHABET = string.ascii_letters + string.digits + "._-"
MAX_DRAWN = 12  # keep drawn texts and arrays short; limits are tested separately

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-INT64_MAX - 1, INT64_MAX),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=MAX_DRAWN),
)


def _text(check: Text) -> st.SearchStrategy[str]:
    if check.choices:
        return st.sampled_from(check.choices)
    low, high = check.min_len, min(check.max_len, MAX_DRAWN)
    if check.pattern == r"[A-Za-z0-9._:-]+":
        return st.text(ID_ALPHABET, min_size=low, max_size=high)
    if check.pattern == r"[!-~]+":
        return st.text(MODEL_ALPHABET, min_size=low, max_size=high)
    if check.pattern is not None:
        return st.from_regex(check.pattern, fullmatch=True).filter(
            lambda s: check.min_len <= len(s) <= check.max_len
        )
    if check.rule is not None:
        return st.text(TOPIC_ALPHABET, min_size=1, max_size=30).filter(check.rule)
    return st.text(min_size=low, max_size=high)


@functools.cache
def for_check(check: Any) -> st.SearchStrategy[Any]:
    if isinstance(check, Text):
        return _text(check)
    if isinstance(check, Int):
        return st.integers(check.min, check.max)
    if isinstance(check, Float):
        return st.floats(
            min_value=check.min,
            max_value=check.max,
            exclude_min=check.min_exclusive,
            allow_nan=False,
            allow_infinity=False,
        )
    if isinstance(check, Bool):
        return st.booleans()
    if isinstance(check, Blob):
        raw = st.binary(max_size=64)
        return st.one_of(raw, st.text(max_size=MAX_DRAWN)) if check.text_ok else raw
    if isinstance(check, ListOf):
        items = for_check(check.item)
        size = min(check.max_items, MAX_DRAWN)
        return st.lists(items, min_size=check.min_items, max_size=size).map(tuple)
    if isinstance(check, ScalarMap):
        keys = st.text(min_size=1, max_size=16)
        return st.dictionaries(keys, scalars, max_size=6)
    if isinstance(check, Nested) and check.cls is Request:
        return requests()
    if isinstance(check, Nested) and check.cls is FieldProblem:
        return st.builds(FieldProblem, st.text(max_size=20), st.text(max_size=40))
    raise AssertionError(f"no strategy for {check!r}")


def check_of(cls: type[Message], name: str) -> Check:
    return next(fs.check for fs in field_specs(cls) if fs.name == name)


@functools.cache
def fields_of(cls: type[Message]) -> st.SearchStrategy[dict[str, Any]]:
    """Every field drawn independently: required ones from their check, optional ones either
    their default or a drawn value."""
    parts = {}
    for fs in field_specs(cls):
        drawn = for_check(fs.check)
        parts[fs.name] = drawn if fs.required else st.one_of(st.just(fs.default_value()), drawn)
    return st.fixed_dictionaries(parts)


@st.composite
def requests(draw: st.DrawFn) -> Request:
    d = draw(fields_of(Request))
    if draw(st.booleans()):
        d["prompt"] = draw(st.text(min_size=1, max_size=40))
        d["prompt_token_ids"] = None
    else:
        d["prompt"] = None
        d["prompt_token_ids"] = draw(for_check(check_of(Request, "prompt_token_ids")))
    if d["deadline_at"] is not None:
        room = INT64_MAX - d["submitted_at"]
        d["deadline_at"] = d["submitted_at"] + draw(st.integers(1, 10**9)) if room > 10**9 else None
    return Request(**d)


@st.composite
def admitted_requests(draw: st.DrawFn) -> AdmittedRequest:
    d = draw(fields_of(AdmittedRequest))
    if d["worker_id"] is None:
        d["warm"] = d["placed_at"] = None
    else:
        d["warm"] = draw(st.booleans())
        d["placed_at"] = draw(st.integers(0, INT64_MAX))
    return AdmittedRequest(**d)


@st.composite
def token_chunks(draw: st.DrawFn) -> TokenChunk:
    d = draw(fields_of(TokenChunk))
    reason = d["finish_reason"]
    if reason in ("error", "rejected"):
        d["error_code"] = draw(st.sampled_from(["overloaded", "deadline_exceeded", "x.y_1"]))
        d["error_message"] = draw(st.text(min_size=1, max_size=40))
    elif reason != "cancelled":
        d["error_code"] = d["error_message"] = None
    if reason is None:
        d["prompt_tokens"] = d["completion_tokens"] = None
    if reason == "rejected":
        d.update(seq=0, text="", token_ids=())
    if d["worker_id"] is not None and d["warm"] is None:
        d["warm"] = draw(st.booleans())
    return TokenChunk(**d)


@st.composite
def lifecycle_events(draw: st.DrawFn) -> LifecycleEvent:
    d = draw(fields_of(LifecycleEvent))
    if d["kind"] == "heartbeat":
        for name in ("free_slots", "total_slots", "queued_tokens"):
            if d[name] is None:
                d[name] = draw(st.integers(0, 64))
    if d["kind"] == "span":
        d["span_name"] = d["span_name"] or "weights_load"
        d["span_start_at"] = d["span_start_at"] or 0
        d["span_end_at"] = d["span_end_at"] or 0
        d["span_duration_ms"] = d["span_duration_ms"] or 0.0
    if d["free_slots"] is not None and d["total_slots"] is not None:
        d["free_slots"], d["total_slots"] = sorted((d["free_slots"], d["total_slots"]))
    if d["span_start_at"] is not None and d["span_end_at"] is not None:
        d["span_start_at"], d["span_end_at"] = sorted((d["span_start_at"], d["span_end_at"]))
    return LifecycleEvent(**d)


@st.composite
def scale_decisions(draw: st.DrawFn) -> ScaleDecision:
    d = draw(fields_of(ScaleDecision))
    if d["action"] == "scale_up":
        d.update(count=draw(st.integers(1, 100)), worker_id=None)
    elif d["action"] == "hold":
        d.update(count=0, worker_id=None)
    else:
        d.update(count=1, worker_id=d["worker_id"] or "w-1")
    return ScaleDecision(**d)


@st.composite
def cancels(draw: st.DrawFn) -> Cancel:
    return Cancel(**draw(fields_of(Cancel)))


@st.composite
def dead_letters(draw: st.DrawFn) -> DeadLetter:
    return DeadLetter(**draw(fields_of(DeadLetter)))


STRATEGIES: dict[type[Message], st.SearchStrategy[Any]] = {
    Request: requests(),
    AdmittedRequest: admitted_requests(),
    Cancel: cancels(),
    TokenChunk: token_chunks(),
    LifecycleEvent: lifecycle_events(),
    ScaleDecision: scale_decisions(),
    DeadLetter: dead_letters(),
}
messages = st.one_of(*STRATEGIES.values())
