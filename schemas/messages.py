"""Every message Ember puts on Kafka, one frozen dataclass per type.

Each class says, in one place, its schema name and version (`SCHEMA`), the topics it travels
on with the field used as the record key, and its field table: each field's check, default and
meaning (`spec(...)`). Constructing a message validates it, so an invalid message can neither
be produced nor decoded; cross-field rules live in `_rules`. docs/PROTOCOL.md is the reference
for other languages; its field tables are generated from these classes (schemas/docgen.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self, get_args

from schemas.errors import FieldProblem, ValidationError, VersionError
from schemas.fields import (
    Blob,
    Bool,
    Float,
    Int,
    Issue,
    ListOf,
    Nested,
    ScalarMap,
    Text,
    field_specs,
    read_fields,
    show,
    spec,
    write_fields,
)
from schemas.limits import (
    INT32_MAX,
    MAX_ATTEMPTS,
    MAX_CHUNK_CHARS,
    MAX_CHUNK_TOKENS,
    MAX_DEAD_LETTER_VALUE_BYTES,
    MAX_ID_CHARS,
    MAX_IN_FLIGHT,
    MAX_MESSAGE_BYTES,
    MAX_MODEL_CHARS,
    MAX_NAME_CHARS,
    MAX_NEW_TOKENS,
    MAX_PROBLEMS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKENS,
    MAX_REASON_CHARS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    MAX_TOPIC_CHARS,
)
from schemas.topics import (
    ADMITTED,
    DEADLETTERS,
    DECISIONS,
    LIFECYCLE,
    MODEL_TOPIC_PREFIX,
    REPLIES,
    REQUESTS,
    WORKERS,
    is_valid_topic_name,
)

LatencyClass = Literal["interactive", "batch", "eval"]
FinishReason = Literal["stop", "length", "cancelled", "error", "rejected"]
WorkerState = Literal[
    "starting", "loading", "restoring", "warming", "ready", "draining", "stopped", "failed"
]
EventKind = Literal["state", "heartbeat", "span"]
ScaleAction = Literal["scale_up", "hold", "release"]
DeadLetterReason = Literal[
    "undecodable", "invalid", "unsupported_version", "bad_key", "processing_failed"
]

LATENCY_CLASSES: tuple[LatencyClass, ...] = get_args(LatencyClass)  # in priority order
FINISH_REASONS: tuple[FinishReason, ...] = get_args(FinishReason)
FAILED_FINISH_REASONS: tuple[FinishReason, ...] = ("error", "rejected")
WORKER_STATES: tuple[WorkerState, ...] = get_args(WorkerState)
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
SCALE_ACTIONS: tuple[ScaleAction, ...] = get_args(ScaleAction)
DEAD_LETTER_REASONS: tuple[DeadLetterReason, ...] = get_args(DeadLetterReason)

# Well-known `error_code`s of a failed TokenChunk. Clients must accept codes not listed here.
ERROR_CODES: dict[str, str] = {
    "invalid_request": "the request failed validation; error_message names the fields",
    "unsupported_version": "the request's major version is not readable by this deployment",
    "unknown_model": "no such model is served",
    "prompt_too_long": "prompt plus max_tokens exceed the model's context",
    "deadline_exceeded": "the request could not finish (or start) before its deadline_at",
    "overloaded": "the model's queue for this latency class is past its bound",
    "rate_limited": "the tenant sent more than its rate limit allows; retry later",
    "worker_failed": "the worker serving the request died and the request ran out of attempts",
    "internal_error": "a bug; error_message says where",
}

CONTROL_TOPICS = frozenset({REQUESTS, ADMITTED, LIFECYCLE, DECISIONS, WORKERS, DEADLETTERS})


def is_valid_reply_topic(name: str) -> bool:
    """A legal Kafka topic name that is not one of Ember's own control or per-model topics."""
    return (
        is_valid_topic_name(name)
        and name not in CONTROL_TOPICS
        and not name.startswith(MODEL_TOPIC_PREFIX)
    )


# --- the checks fields share -------------------------------------------------------------

ID = Text(max_len=MAX_ID_CHARS, pattern=r"[A-Za-z0-9._:-]+", shape="made of [A-Za-z0-9._:-]")
MODEL = Text(max_len=MAX_MODEL_CHARS, pattern=r"[!-~]+", shape="printable ASCII without spaces")
NAME = Text(max_len=MAX_NAME_CHARS, pattern=r"[a-z][a-z0-9_.]*", shape="matching [a-z][a-z0-9_.]*")
TOPIC = Text(max_len=MAX_TOPIC_CHARS, rule=is_valid_topic_name, shape="a Kafka topic name")
REPLY_TOPIC = Text(
    max_len=MAX_TOPIC_CHARS,
    rule=is_valid_reply_topic,
    shape="a Kafka topic name ([a-zA-Z0-9._-]) that is not an Ember control or model topic",
)
REASON = Text(max_len=MAX_REASON_CHARS)
TIMESTAMP = Int(min=0)  # unix milliseconds
COUNT = Int(0, INT32_MAX)
TOKEN_ID = Int(0, MAX_TOKEN_ID)
LATENCY_CLASS = Text(max_len=16, choices=LATENCY_CLASSES)
WORKER_STATE = Text(max_len=16, choices=WORKER_STATES)


# --- the base every message shares -------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """A topic a message travels on and the field (dotted path) whose value is the key.
    `topic` is an exact name, a prefix ending in `*`, or `*` for any topic."""

    topic: str
    key: str

    def matches(self, topic: str) -> bool:
        if self.topic.endswith("*"):
            return topic.startswith(self.topic[:-1])
        return topic == self.topic


@dataclass(frozen=True)
class Schema:
    name: str
    major: int
    minor: int
    routes: tuple[Route, ...]

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def header_value(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def default_topic(self) -> str | None:
        first = self.routes[0].topic
        return None if first.endswith("*") else first


_VERSION = re.compile(r"(0|[1-9][0-9]{0,5})\.(0|[1-9][0-9]{0,5})")


def parse_version(value: Any) -> tuple[int, int] | None:
    """'MAJOR.MINOR' -> (major, minor); None when `value` is not such a string."""
    match = _VERSION.fullmatch(value) if isinstance(value, str) else None
    return (int(match[1]), int(match[2])) if match else None


class Message:
    """Base of every message: validation on construction, map conversion, a redacted repr."""

    __slots__ = ()
    SCHEMA: ClassVar[Schema]

    def __post_init__(self) -> None:
        specs = field_specs(type(self))
        given = {fs.name: getattr(self, fs.name) for fs in specs}
        values, issues = read_fields(specs, given)
        self._raise_if(issues)
        for name, value in values.items():
            if value is not given[name]:
                object.__setattr__(self, name, value)
        self._raise_if(list(self._rules()))

    def _raise_if(self, issues: list[Issue]) -> None:
        if issues:
            raise ValidationError(self.SCHEMA.name, [FieldProblem(p, m) for p, m in issues])

    def _rules(self) -> Iterator[Issue]:
        """Cross-field rules, checked after every field is valid on its own."""
        return iter(())

    def to_map(self) -> dict[str, Any]:
        """The msgpack map: `v` first, then every field that is not nil."""
        return {"v": self.SCHEMA.version, **write_fields(field_specs(type(self)), self)}

    @classmethod
    def from_map(cls, value: Mapping[str, Any]) -> Self:
        """Validate a decoded map. Unknown keys are ignored; a newer minor version is read;
        another major version raises VersionError."""
        schema = cls.SCHEMA
        issues: list[Issue] = []
        version = parse_version(value.get("v"))
        if version is None:
            got = "missing" if value.get("v") is None else f"got {show(value.get('v'))}"
            issues.append(("v", f"must be a 'MAJOR.MINOR' string like '{schema.version}', {got}"))
        elif version[0] != schema.major:
            raise VersionError(
                schema.name,
                [
                    FieldProblem(
                        "v",
                        f"version {version[0]}.{version[1]} cannot be read: this reader reads "
                        f"{schema.major}.x (up to {schema.version}); produce {schema.major}.x or "
                        "upgrade the consumer",
                    )
                ],
            )
        values, field_issues = read_fields(field_specs(cls), value)
        issues += field_issues
        if issues:
            raise ValidationError(schema.name, [FieldProblem(p, m) for p, m in issues])
        # Every field is checked and normalized already: skip __init__'s second pass.
        msg = object.__new__(cls)
        for name, field_value in values.items():
            object.__setattr__(msg, name, field_value)
        msg._raise_if(list(msg._rules()))
        return msg

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated like any new message: the changed fields
        each against its spec, then the cross-field rules. The other fields were checked when
        this message was made and cannot have changed since (messages are frozen), so they are
        not checked again (placement copies every request it places)."""
        cls = type(self)
        specs = field_specs(cls)
        changed = tuple(fs for fs in specs if fs.name in changes)
        if len(changed) != len(changes):
            unknown = sorted(set(changes) - {fs.name for fs in specs})
            raise TypeError(f"{cls.__name__}.replace: unknown field(s) {unknown}")
        values, issues = read_fields(changed, changes)
        self._raise_if(issues)
        msg = object.__new__(cls)
        for fs in specs:
            name = fs.name
            object.__setattr__(msg, name, values[name] if name in values else getattr(self, name))
        msg._raise_if(list(msg._rules()))
        return msg

    def __repr__(self) -> str:
        parts = []
        for fs in field_specs(type(self)):
            value = getattr(self, fs.name)
            if fs.sensitive and value is not None:
                parts.append(f"{fs.name}=<redacted len={len(value)}>")
            else:
                parts.append(f"{fs.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


# --- requests ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Request(Message):
    """What a backend service produces on `ember.requests`, keyed by request_id."""

    SCHEMA: ClassVar[Schema] = Schema("request", 1, 0, (Route(REQUESTS, "request_id"),))

    request_id: str = spec(ID, doc="unique per request; the key of every record about it")
    model: str = spec(MODEL, doc="model name as served, e.g. `Qwen/Qwen2.5-7B-Instruct`")
    submitted_at: int = spec(TIMESTAMP, doc="unix ms when the client submitted; TTFT starts here")
    prompt: str | None = spec(
        Text(max_len=MAX_PROMPT_CHARS),
        default=None,
        sensitive=True,
        doc="prompt text; exactly one of `prompt` and `prompt_token_ids`",
    )
    prompt_token_ids: tuple[int, ...] | None = spec(
        ListOf(TOKEN_ID, max_items=MAX_PROMPT_TOKENS, min_items=1),
        default=None,
        sensitive=True,
        doc="prompt as token ids of the model's tokenizer",
    )
    max_tokens: int = spec(Int(1, MAX_NEW_TOKENS), default=256, doc="new tokens to generate")
    temperature: float = spec(Float(min=0.0), default=1.0, doc="0 means greedy")
    top_p: float = spec(Float(min=0.0, max=1.0, min_exclusive=True), default=1.0)
    top_k: int = spec(Int(0, MAX_TOP_K), default=0, doc="0 means no top-k cut")
    seed: int | None = spec(Int(min=0), default=None, doc="sampling seed; nil: random")
    stop: tuple[str, ...] = spec(
        ListOf(Text(max_len=MAX_STOP_CHARS), max_items=MAX_STOP_STRINGS),
        default=(),
        sensitive=True,
        doc="generation stops before the first of these strings",
    )
    latency_class: LatencyClass = spec(LATENCY_CLASS, default="interactive")
    reply_topic: str = spec(REPLY_TOPIC, default=REPLIES, doc="where token chunks go")
    deadline_at: int | None = spec(
        TIMESTAMP, default=None, doc="unix ms; past it the request is rejected or cancelled"
    )
    tenant: str | None = spec(ID, default=None, doc="who pays; for quotas and accounting")

    def _rules(self) -> Iterator[Issue]:
        if self.prompt is None and self.prompt_token_ids is None:
            yield ("prompt", "exactly one of prompt and prompt_token_ids must be set, got neither")
        if self.prompt is not None and self.prompt_token_ids is not None:
            yield ("prompt", "exactly one of prompt and prompt_token_ids must be set, got both")
        if self.deadline_at is not None and self.deadline_at <= self.submitted_at:
            yield (
                "deadline_at",
                f"must be after submitted_at ({self.submitted_at}), got {self.deadline_at}",
            )


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class AdmittedRequest(Message):
    """A validated, classified request. On `ember.admitted` (keyed by model) it is not placed
    yet; placement sends it to a worker's partition of `ember.model.<m>` (keyed by request_id)
    with worker_id, warm and placed_at set. A request re-sent after its worker died keeps its
    request and gets attempt + 1, the dead worker appended to previous_workers."""

    SCHEMA: ClassVar[Schema] = Schema(
        "admitted_request",
        1,
        0,
        (
            Route(ADMITTED, "request.model"),
            Route(MODEL_TOPIC_PREFIX + "*", "request.request_id"),
        ),
    )

    request: Request = spec(Nested(Request), doc="the request as the client sent it")
    latency_class: LatencyClass = spec(
        LATENCY_CLASS, doc="class admission put it in (may differ from the request's)"
    )
    prompt_tokens: int = spec(COUNT, doc="prompt length in tokens (estimated for text prompts)")
    prompt_bucket: int = spec(
        Int(1, INT32_MAX), doc="upper bound, in tokens, of the prompt-length bucket"
    )
    admitted_at: int = spec(TIMESTAMP, doc="unix ms when admission accepted it")
    attempt: int = spec(Int(1, MAX_ATTEMPTS), default=1, doc="1 + times it was re-placed")
    worker_id: str | None = spec(ID, default=None, doc="assigned worker; nil before placement")
    warm: bool | None = spec(
        Bool(), default=None, doc="a ready worker had room when placed; nil before placement"
    )
    placed_at: int | None = spec(TIMESTAMP, default=None, doc="unix ms of the (latest) placement")
    previous_workers: tuple[str, ...] = spec(
        ListOf(ID, max_items=MAX_ATTEMPTS), default=(), doc="workers of earlier attempts"
    )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def placed(self) -> bool:
        return self.worker_id is not None

    def placed_on(self, worker_id: str, *, warm: bool, at: int) -> AdmittedRequest:
        """This request assigned to `worker_id`. If it was already placed (its worker died or
        drained), the copy is the next attempt and remembers the previous worker."""
        if self.worker_id is None:
            return self.replace(worker_id=worker_id, warm=warm, placed_at=at)
        return self.replace(
            worker_id=worker_id,
            warm=warm,
            placed_at=at,
            attempt=self.attempt + 1,
            previous_workers=(*self.previous_workers, self.worker_id),
        )

    def _rules(self) -> Iterator[Issue]:
        for name in ("warm", "placed_at"):
            given = getattr(self, name) is not None
            if self.worker_id is not None and not given:
                yield (name, "required once worker_id is set")
            if self.worker_id is None and given:
                yield (name, "only allowed once worker_id is set")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Cancel(Message):
    """A client asks Ember to stop a request it submitted. Produced on `ember.requests` keyed
    by request_id (the request's own partition, so admission reads it after the request);
    routed like the request (admission -> `ember.admitted` keyed by model -> placement -> the
    serving worker's partition of `ember.model.<m>`). A client that produced its request
    straight to a model topic partition sends the cancel to that same partition. The worker
    stops generating and sends the terminal chunk `cancelled`; a cancel for a request that
    already finished, or that nobody knows, is dropped (docs/PROTOCOL.md §5.3)."""

    SCHEMA: ClassVar[Schema] = Schema(
        "cancel",
        1,
        0,
        (
            Route(REQUESTS, "request_id"),
            Route(ADMITTED, "model"),
            Route(MODEL_TOPIC_PREFIX + "*", "request_id"),
        ),
    )

    request_id: str = spec(ID, doc="the request to stop")
    model: str = spec(MODEL, doc="the request's model: routes the cancel like the request")
    reply_topic: str = spec(
        REPLY_TOPIC, default=REPLIES, doc="the request's reply topic (for a `cancelled` chunk)"
    )
    cancelled_at: int = spec(TIMESTAMP, doc="unix ms when the client asked")
    reason: str | None = spec(REASON, default=None, doc="why, for logs, e.g. `client timeout`")


# --- replies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class TokenChunk(Message):
    """A piece of output on the request's reply topic, keyed by request_id. Exactly one chunk
    per admitted request carries a finish_reason: the terminal one."""

    SCHEMA: ClassVar[Schema] = Schema("token_chunk", 1, 0, (Route("*", "request_id"),))

    request_id: str = spec(ID)
    seq: int = spec(COUNT, doc="0, 1, 2... per attempt; drop a chunk whose seq you already have")
    attempt: int = spec(
        Int(1, MAX_ATTEMPTS), default=1, doc="placement attempt; a higher one restarts output"
    )
    text: str = spec(
        Text(max_len=MAX_CHUNK_CHARS, min_len=0), default="", sensitive=True, doc="text delta"
    )
    token_ids: tuple[int, ...] = spec(
        ListOf(TOKEN_ID, max_items=MAX_CHUNK_TOKENS),
        default=(),
        sensitive=True,
        doc="the tokens of this delta",
    )
    finish_reason: FinishReason | None = spec(
        Text(max_len=16, choices=FINISH_REASONS), default=None, doc="set on the last chunk only"
    )
    error_code: str | None = spec(NAME, default=None, doc="why it failed; see the well-known codes")
    error_message: str | None = spec(REASON, default=None, doc="for a person; never user text")
    submitted_at: int = spec(TIMESTAMP, doc="copied from the request")
    first_token_at: int | None = spec(
        TIMESTAMP, default=None, doc="unix ms the worker produced the first token"
    )
    emitted_at: int = spec(TIMESTAMP, doc="unix ms this chunk was produced")
    worker_id: str | None = spec(ID, default=None, doc="nil when admission rejected it")
    warm: bool | None = spec(Bool(), default=None, doc="set whenever worker_id is set")
    prompt_tokens: int | None = spec(COUNT, default=None, doc="usage; terminal chunk only")
    completion_tokens: int | None = spec(COUNT, default=None, doc="usage; terminal chunk only")

    @property
    def is_first(self) -> bool:
        return self.seq == 0

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None

    @property
    def failed(self) -> bool:
        return self.finish_reason in FAILED_FINISH_REASONS

    def _rules(self) -> Iterator[Issue]:
        reason = self.finish_reason
        if reason in FAILED_FINISH_REASONS:
            for name in ("error_code", "error_message"):
                if getattr(self, name) is None:
                    yield (name, f"required when finish_reason is {reason}")
        elif reason != "cancelled":
            for name in ("error_code", "error_message"):
                if getattr(self, name) is not None:
                    yield (name, "only allowed when finish_reason is error, rejected or cancelled")
        if reason is None:
            for name in ("prompt_tokens", "completion_tokens"):
                if getattr(self, name) is not None:
                    yield (name, "only allowed on the terminal chunk (with a finish_reason)")
        if reason == "rejected" and (self.seq != 0 or self.text or self.token_ids):
            yield ("finish_reason", "rejected is a lone chunk: seq 0, no text, no token_ids")
        if self.worker_id is not None and self.warm is None:
            yield ("warm", "required on every chunk a worker emits (worker_id is set)")


# --- workers and the control plane -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class LifecycleEvent(Message):
    """What a worker says about itself: a state change, a heartbeat with capacity, or a
    cold-start span. Every event carries the current state, so the latest event per worker on
    the compacted `ember.workers` topic is its state."""

    SCHEMA: ClassVar[Schema] = Schema(
        "lifecycle_event", 1, 1, (Route(LIFECYCLE, "model"), Route(WORKERS, "worker_id"))
    )

    worker_id: str = spec(ID)
    model: str = spec(MODEL)
    kind: EventKind = spec(Text(max_len=16, choices=EVENT_KINDS), doc="why the event was sent")
    state: WorkerState = spec(WORKER_STATE, doc="state now")
    at: int = spec(TIMESTAMP, doc="unix ms of the event")
    previous_state: WorkerState | None = spec(WORKER_STATE, default=None, doc="kind `state`")
    partition: int | None = spec(
        COUNT, default=None, doc="partition of the model topic it consumes; nil: none yet"
    )
    node: str | None = spec(ID, default=None, doc="machine it runs on (shard cache locality)")
    reason: str | None = spec(REASON, default=None, doc="why it changed state, e.g. the failure")
    free_slots: int | None = spec(COUNT, default=None, doc="batch slots free; heartbeat")
    total_slots: int | None = spec(COUNT, default=None, doc="batch slots in all; heartbeat")
    queued_tokens: int | None = spec(
        Int(min=0), default=None, doc="prompt + remaining tokens of its queue; heartbeat"
    )
    in_flight: tuple[str, ...] = spec(
        ListOf(ID, max_items=MAX_IN_FLIGHT), default=(), doc="request ids it is serving"
    )
    done: tuple[str, ...] | None = spec(
        ListOf(ID, max_items=MAX_IN_FLIGHT),
        default=None,
        doc="request ids it finished (terminal chunk acknowledged, or refused) since its "
        "previous event that listed any; heartbeat, `stopped`, `failed`; nil: not reported "
        "(since 1.1)",
    )
    span_name: str | None = spec(NAME, default=None, doc="e.g. `weights_load`; kind `span`")
    span_start_at: int | None = spec(TIMESTAMP, default=None, doc="unix ms; kind `span`")
    span_end_at: int | None = spec(TIMESTAMP, default=None, doc="unix ms; kind `span`")
    span_duration_ms: float | None = spec(
        Float(min=0.0), default=None, doc="measured on a monotonic clock; kind `span`"
    )
    attrs: dict[str, str | int | float | bool | None] = spec(
        ScalarMap(), default={}, doc="extra numbers, e.g. `bytes`, `gbps`"
    )

    def _rules(self) -> Iterator[Issue]:
        required = {
            "heartbeat": ("free_slots", "total_slots", "queued_tokens"),
            "span": ("span_name", "span_start_at", "span_end_at", "span_duration_ms"),
        }.get(self.kind, ())
        for name in required:
            if getattr(self, name) is None:
                yield (name, f"required when kind is {self.kind}")
        free, total = self.free_slots, self.total_slots
        if free is not None and total is not None and free > total:
            yield ("free_slots", f"must be <= total_slots ({total}), got {free}")
        start, end = self.span_start_at, self.span_end_at
        if start is not None and end is not None and end < start:
            yield ("span_end_at", f"must be >= span_start_at ({start}), got {end}")


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ScaleDecision(Message):
    """One autoscaler decision for a model, with what it saw, so an operator can audit it.
    count: workers to add for scale_up (>= 1), 0 for hold, 1 for release (of worker_id)."""

    SCHEMA: ClassVar[Schema] = Schema("scale_decision", 1, 0, (Route(DECISIONS, "model"),))

    model: str = spec(MODEL)
    action: ScaleAction = spec(Text(max_len=16, choices=SCALE_ACTIONS))
    count: int = spec(COUNT)
    worker_id: str | None = spec(ID, default=None, doc="the worker to release; release only")
    reason: str = spec(REASON, doc="in words, e.g. `hit rate 0.62 < 0.9 and queue rising`")
    inputs: dict[str, str | int | float | bool | None] = spec(
        ScalarMap(), default={}, doc="the observation the policy decided on"
    )
    policy: str = spec(NAME, doc="name of the policy function")
    decided_at: int = spec(TIMESTAMP)
    decision_id: str | None = spec(
        ID, default=None, doc="unique; lets the actuator drop a redelivered decision"
    )

    def _rules(self) -> Iterator[Issue]:
        if self.action == "scale_up" and self.count < 1:
            yield ("count", f"must be >= 1 for scale_up, got {self.count}")
        if self.action == "hold" and self.count != 0:
            yield ("count", f"must be 0 for hold, got {self.count}")
        if self.action == "release":
            if self.count != 1:
                yield ("count", f"must be 1 for release, got {self.count}")
            if self.worker_id is None:
                yield ("worker_id", "required for release")
        elif self.worker_id is not None:
            yield ("worker_id", f"only allowed for release, got action {self.action}")


# --- dead letters ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class DeadLetter(Message):
    """A record that could not be decoded, validated or processed, with its original bytes
    and the reason. Keyed by the original key (nil stays nil)."""

    SCHEMA: ClassVar[Schema] = Schema("dead_letter", 1, 0, (Route(DEADLETTERS, "key"),))

    source_topic: str = spec(TOPIC)
    source_partition: int = spec(COUNT)
    source_offset: int = spec(Int(min=0))
    key: bytes | str | None = spec(
        Blob(MAX_MESSAGE_BYTES, text_ok=True), default=None, doc="str when it was UTF-8"
    )
    value_bytes: bytes | None = spec(
        Blob(MAX_DEAD_LETTER_VALUE_BYTES),
        default=None,
        sensitive=True,
        doc="original value, cut to its first 960 KiB; nil for a tombstone",
    )
    value_size: int = spec(Int(min=0), doc="length of the original value in bytes")
    source_schema: str | None = spec(
        Text(max_len=MAX_NAME_CHARS * 2), default=None, doc="its `ember-schema` header, if any"
    )
    reason: DeadLetterReason = spec(Text(max_len=32, choices=DEAD_LETTER_REASONS))
    error: str = spec(REASON, doc="the error, for a person")
    problems: tuple[FieldProblem, ...] = spec(
        ListOf(Nested(FieldProblem), max_items=MAX_PROBLEMS),
        default=(),
        doc="array of {path: str, problem: str}, one per bad field",
    )
    component: str | None = spec(NAME, default=None, doc="who dead-lettered it, e.g. `admission`")
    at: int = spec(TIMESTAMP)

    @property
    def truncated(self) -> bool:
        return self.value_bytes is not None and len(self.value_bytes) < self.value_size


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.SCHEMA.name: cls
    for cls in (
        Request,
        AdmittedRequest,
        Cancel,
        TokenChunk,
        LifecycleEvent,
        ScaleDecision,
        DeadLetter,
    )
}
