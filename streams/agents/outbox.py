"""What agents send, as plain values, and the one place that sends them.

The step functions of the agents return `Out`s (topic, key, value bytes, headers, partition):
tests read them without Kafka, and `send_all` hands them to Faust's producer. Values are
exactly `schemas.encode(msg)` (the raw msgpack codec, no envelope).

Also here: the record an agent consumed (`Consumed`, independent of Faust's event type), the
dead letter + `rejected` chunk pair every agent answers a bad record with, and the process's
counters that /metrics exposes.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import faust

from infra.logs import get_logger
from schemas import (
    Message,
    SchemaError,
    TokenChunk,
    dead_letter_for,
    record_for,
    reply_route,
)
from streams.app import app
from streams.codec import MESSAGE_CODEC

log = get_logger(__name__)

# Well-known error codes for a record that failed to decode, by dead-letter reason.
_REJECT_CODES = {"unsupported_version": "unsupported_version"}

# Process-local counters for /metrics: (name, labels as sorted pairs) -> value.
COUNTERS: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()


def count(name: str, n: int = 1, **labels: str) -> None:
    COUNTERS[(name, tuple(sorted(labels.items())))] += n


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class Out:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    partition: int | None = None


def out(msg: Message, topic: str | None = None, partition: int | None = None) -> Out:
    """`msg` as a record of `topic` (default: its own), keyed as schemas says."""
    rec = record_for(msg, topic)
    return Out(rec.topic, rec.key, rec.value, tuple(rec.headers), partition)


@dataclass(frozen=True, slots=True)
class Consumed:
    """One consumed record, as the step functions see it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None = None

    @classmethod
    def of(cls, event: faust.EventT) -> Consumed:
        message = event.message
        return cls(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            message.headers,
        )


def rejected_outs(
    record: Consumed, error: BaseException, component: str, now: int
) -> list[Out]:
    """A bad record: its dead letter, plus a `rejected` chunk on its reply topic when the
    record says where that is (a request's request_id and reply_topic are readable)."""
    letter = dead_letter_for(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        error=error,
        at=now,
        headers=record.headers,
        component=component,
    )
    count("ember_dead_letters_total", component=component, reason=letter.reason)
    log.warning(
        "dead-lettered a record",
        agent=component,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        reason=letter.reason,
        error=letter.error[:300],
    )
    outs = [out(letter)]
    route = reply_route(record.value)
    if route is not None:
        if isinstance(error, SchemaError):
            code, message = _REJECT_CODES.get(error.reason, "invalid_request"), error.message
        else:
            code, message = "internal_error", f"{component} failed: {letter.error}"
        chunk = TokenChunk(
            request_id=route.request_id,
            seq=0,
            finish_reason="rejected",
            error_code=code,
            error_message=message[:1024],
            submitted_at=route.submitted_at or now,
            emitted_at=now,
        )
        outs.append(out(chunk, route.reply_topic))
    return outs


@lru_cache(maxsize=4096)
def _topic(name: str) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer=MESSAGE_CODEC,
        internal=False,
    )


async def send_all(outs: Iterable[Out]) -> None:
    """Hand every record to the producer, in order. Returns once they are queued (Faust
    flushes the producer before it commits the offsets of the events that made them)."""
    for o in outs:
        await _topic(o.topic).send(
            key=o.key, value=o.value, headers=list(o.headers), partition=o.partition
        )


def safely(component: str, record: Consumed, step: Any, *args: Any) -> list[Out]:
    """`step(record, *args)`, or, when it raises, the record's dead letter: a bad record
    never stops an agent. A SchemaError is the record's fault (logged as a warning); any
    other exception is ours (logged with its traceback)."""
    try:
        result: list[Out] = step(record, *args)
        return result
    except SchemaError as exc:
        error: Exception = exc
    except Exception as exc:  # a bug or a record no check foresaw: keep the agent alive
        log.exception("step failed", agent=component, topic=record.topic, offset=record.offset)
        error = exc
    try:
        return rejected_outs(record, error, component, now_ms())
    except Exception:
        log.exception("could not dead-letter a record", agent=component, topic=record.topic)
        return []
