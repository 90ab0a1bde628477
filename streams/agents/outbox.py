"""What agents send, as plain values, and the one place that sends them.

The step functions of the agents return `Out`s (topic, key, value bytes, headers, partition):
tests read them without Kafka, and `send_all` hands them to Faust's producer. Values are
exactly `schemas.encode(msg)` (the raw msgpack codec, no envelope).

Also here: the record an agent consumed (`Consumed`, independent of Faust's event type), the
dead letter + `rejected` chunk pair every agent answers a bad record with, and the process's
counters that /metrics exposes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from aiokafka.errors import KafkaError

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
from streams.faust_app import ReadyRecord, RecordBuffer

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


class DecodeMemo:
    """Messages this process encoded and expects to read back: admission's AdmittedRequests
    come back to placement through `ember.admitted`, in the same process when it owns the
    model. Decoding is a pure function of the bytes, so placement takes the message it finds
    here for the very same bytes instead of decoding and validating them a second time. At
    most `size` entries, oldest dropped first (records placed by another process are never
    taken here)."""

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self._items: OrderedDict[bytes, Message] = OrderedDict()

    def remember(self, value: bytes, msg: Message) -> None:
        self._items[value] = msg
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def take(self, value: bytes | None) -> Message | None:
        return None if value is None else self._items.pop(value, None)


MEMO = DecodeMemo()


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


# Topics sends go to without a second thought: Ember's own, applied before the app starts
# (`known_topics`), and any other topic once a send to it went through. A record for another
# topic (a client's own reply topic) is sent in the background the first time: the producer
# waits for an unknown topic's metadata (minutes, with Faust's request timeout), and an agent
# must not stall on a client's typo. A topic that stays unknown for FIRST_SEND_TIMEOUT_S is
# not written to for MISSING_FOR_S; its records are dropped with a warning and counted.
FIRST_SEND_TIMEOUT_S = 5.0
MISSING_FOR_S = 60.0
_known: set[str] = set()
_missing: dict[str, float] = {}  # topic -> monotonic time until which it counts as missing
_first_sends: set[asyncio.Task[None]] = set()


def known_topics(*names: str) -> None:
    _known.update(names)


async def send_all(outs: Iterable[Out]) -> None:
    """Hand every record to the app's producer, in order; returns once they are queued.
    Faust flushes this producer before it commits the offsets of the events that made them
    (at-least-once). A record of one of our topics with its partition known goes to the
    producer's RecordBuffer, which sends the records of each turn a batch per partition
    (streams.faust_app, 7); others straight to the producer. Not through `Topic.send`: our
    values are bytes already, and Faust's channel machinery costs more than the send itself."""
    producer = app.producer
    buffer = producer.buffer
    ready = isinstance(buffer, RecordBuffer) and not app.in_transaction
    for o in outs:
        if o.topic in _known:
            if ready and o.partition is not None:
                headers = list(o.headers) if o.headers else None
                buffer.put_record(ReadyRecord(o.topic, o.key, o.value, o.partition, headers))
                continue
            sent = await producer.send(
                o.topic, o.key, o.value, o.partition, None, list(o.headers)
            )
            sent.add_done_callback(_log_failure)  # type: ignore[attr-defined]
        elif _missing.get(o.topic, 0.0) > time.monotonic():
            count("ember_records_dropped_total", reason="unknown_topic")
        else:
            task = asyncio.ensure_future(_first_send(o))
            _first_sends.add(task)
            task.add_done_callback(_first_sends.discard)
    if ready:
        await buffer.ebb()


async def _first_send(o: Out) -> None:
    try:
        sent = await asyncio.wait_for(
            app.producer.send(o.topic, o.key, o.value, o.partition, None, list(o.headers)),
            FIRST_SEND_TIMEOUT_S,
        )
    except (asyncio.TimeoutError, KafkaError) as exc:
        _missing[o.topic] = time.monotonic() + MISSING_FOR_S
        count("ember_records_dropped_total", reason="unknown_topic")
        log.warning("topic unknown: record dropped", topic=o.topic, error=repr(exc)[:200])
        return
    _known.add(o.topic)
    _missing.pop(o.topic, None)
    sent.add_done_callback(_log_failure)  # type: ignore[attr-defined]


def _log_failure(sent: Any) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.error("a record could not be produced", error=repr(sent.exception())[:300])


MAX_BURST = 64  # events an agent takes in one step when that many wait


async def bursts(stream: Any, most: int = MAX_BURST) -> AsyncIterator[list[Any]]:
    """The stream's events in lists: each event with those already waiting behind it, at
    most `most`, so that an agent takes a burst in one step. The events of a list are acked
    when the agent asks for the next one, after it handled them (and queued what they made,
    which Faust flushes before it commits their offsets): at-least-once, as one at a time."""
    stream.enable_acks = False  # acked here, once handled
    burst: list[Any] = []
    async for event in stream.events():
        burst.append(event)
        if len(burst) < most and not stream.channel.queue.empty():
            continue
        yield burst
        for handled in burst:
            await stream.ack(handled)
        burst = []


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
