"""Ember's asynchronous Python client: submit requests, stream their text, get their results.

    async with EmberClient(KafkaSettings.from_env()) as client:
        handle = await client.generate("tiny", "Hello", max_tokens=64, timeout_s=60)
        text = ""
        async for delta in handle.stream():   # in order, duplicates dropped
            if delta.restarted:                # a replacement worker starts the output over
                text = ""
            text += delta.text
        result = await handle.result()         # text, finish reason, usage, TTFT, tokens/s

Outcomes. `result()` returns a `Result` for `stop`, `length` and `cancelled`; it raises
`RequestRejected` (refused before any work: `error_code`, `error_message`), `RequestFailed`
(failed after admission) or `RequestTimeout` (no first chunk / no terminal chunk in time).
`stream()` yields `Delta`s and raises the same errors where the stream ends. `async for chunk
in handle` gives the raw, assembled `TokenChunk`s, terminal included, and raises only
`RequestTimeout` and `ClientClosed`.

Restarts (docs/PROTOCOL.md §6.2): a worker that dies mid-stream is replaced and the new one
starts the output from the beginning. The first `Delta` of the new stream has `restarted`
True: drop the text you had. `Result.text` is always the final stream's text alone.

Reply topic: one consumer per client process, never one per request. It is assigned every
partition of the client's reply topic (no consumer group, so no rebalances) and reads from
the end at start; chunks of other clients' requests are skipped. The default is the shared
`ember.replies`: nothing to create, fine for a few backend processes. A process with heavy
traffic, or among many, takes its own topic (`EmberClient.private(kafka)`:
`ember.replies.<client-id>`, created at start with one partition and 1 h retention), so it
reads only its own chunks.

Time-outs, per request (`Timeouts`, or `first_chunk_timeout_s` / `timeout_s` of `generate`):
no chunk at all within `first_chunk_s` of submitting, or no terminal chunk within `total_s`,
ends the handle with `RequestTimeout`. A request with a `deadline_at` and no `total_s` gets
`deadline_at` + 5 s. The client then cancels the request, so no worker keeps generating for
nobody. The reader task checks expiry; waiting code does not need its own timers.

Cancellation: `await handle.cancel()` produces a `cancel` record where the request went
(`ember.requests`, keyed by request id, or the model-topic partition of a direct
submission); the worker stops the request and its terminal chunk `cancelled` (with the text
so far) ends the handle. A request that finished first ends as it finished. Cancelling does
not wait: wrap `handle.result()` in `asyncio.wait_for` to bound the wait.

Direct submission: `generate(..., partition=P)` (or `submit(admitted, topic, P)`) produces to
partition P of the model's topic, where a worker consumes it, without the control plane.

The pure parts are `ReplyAssembler` (order, duplicates, restarts), `ReplyState` (text, usage,
timing and outcome of one request) and `Timeouts` (when a request times out); the Kafka part
is `EmberClient` and `RequestHandle`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from infra.logs import get_logger
from infra.settings import KafkaSettings
from schemas.codec import decode, record_for
from schemas.errors import SchemaError
from schemas.messages import (
    AdmittedRequest,
    Cancel,
    FinishReason,
    LatencyClass,
    Request,
    TokenChunk,
)
from schemas.topics import HOUR_MS, REPLIES, TopicSpec, model_topic_name

log = get_logger(__name__)

TimeoutKind = Literal["first_chunk", "total"]

DEADLINE_GRACE_S = 5.0  # a request with deadline_at times out this long after it
MAX_POLL_MS = 200  # the reader checks time-outs at least this often
METADATA_TIMEOUT_S = 10.0  # to learn the reply topic's partitions at start


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return uuid.uuid4().hex


def default_client_id() -> str:
    """`<host>-<pid>`, reduced to the characters a topic name allows."""
    return re.sub(r"[^a-zA-Z0-9._-]", "_", f"{socket.gethostname()}-{os.getpid()}")[:100]


# --- errors ------------------------------------------------------------------------------


class EmberError(Exception):
    """A request did not produce a result. `request_id` says which."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id}: {message}")
        self.request_id = request_id


class RequestRejected(EmberError):
    """Refused before any work (finish_reason `rejected`): bad request, unknown model,
    overloaded, rate limited, deadline cannot be met. `error_code` is one of
    schemas.ERROR_CODES (or a newer one)."""

    def __init__(self, request_id: str, error_code: str, error_message: str) -> None:
        super().__init__(request_id, f"rejected ({error_code}): {error_message}")
        self.error_code = error_code
        self.error_message = error_message


class RequestFailed(EmberError):
    """Failed after admission (finish_reason `error`): worker_failed, deadline_exceeded,
    internal_error, ..."""

    def __init__(
        self, request_id: str, error_code: str, error_message: str, worker_id: str | None
    ) -> None:
        super().__init__(request_id, f"failed ({error_code}): {error_message}")
        self.error_code = error_code
        self.error_message = error_message
        self.worker_id = worker_id


class RequestTimeout(EmberError):
    """No chunk within `first_chunk_s` (kind `first_chunk`) or no terminal chunk within
    `total_s` (kind `total`) of submitting."""

    def __init__(self, request_id: str, kind: TimeoutKind, after_s: float) -> None:
        what = "no first chunk" if kind == "first_chunk" else "no terminal chunk"
        super().__init__(request_id, f"timed out: {what} within {after_s:g} s")
        self.kind = kind
        self.after_s = after_s


class ClientClosed(EmberError):
    """The client stopped (or its reply consumer failed) before the request ended."""


# --- pure parts --------------------------------------------------------------------------


@dataclass
class ReplyAssembler:
    """Chunks of one request -> the in-order, duplicate-free chunks of one stream
    (docs/PROTOCOL.md §6.2).

    A stream is one execution, `(attempt, worker_id)`. Within it, chunks are ordered by `seq`
    and duplicates dropped: seq 0, 2, 1, 1, 3(last) -> `add` returns [0], [], [1, 2], [], [3].
    A seq-0 chunk of another stream with an attempt at least as high (placement re-sent the
    request, or a worker died and the next one re-read it from Kafka) restarts the output: it
    is returned as seq 0 again, and the caller drops the text it had. Chunks of a replaced
    stream, and anything after the terminal chunk, are dropped.
    """

    stream: tuple[int, str | None] | None = None
    next_seq: int = 0
    duplicates: int = 0
    restarts: int = 0
    done: bool = False
    _early: dict[int, TokenChunk] = field(default_factory=dict)

    def add(self, chunk: TokenChunk) -> list[TokenChunk]:
        if self.done:
            self.duplicates += 1
            return []
        key = (chunk.attempt, chunk.worker_id)
        if self.stream is None:
            self.stream = key
        elif key != self.stream:
            if chunk.seq != 0 or chunk.attempt < self.stream[0]:
                self.duplicates += 1
                return []
            self.stream, self.next_seq = key, 0
            self._early.clear()
            self.restarts += 1
        if chunk.seq < self.next_seq or chunk.seq in self._early:
            self.duplicates += 1
            return []
        self._early[chunk.seq] = chunk
        ready: list[TokenChunk] = []
        while self.next_seq in self._early:
            nxt = self._early.pop(self.next_seq)
            ready.append(nxt)
            self.next_seq += 1
            if nxt.is_last:
                self.done = True
                self._early.clear()
                break
        return ready


@dataclass(frozen=True)
class Timeouts:
    """When a request times out, in seconds after it was submitted (None: never).

    Example: first_chunk_s=2, total_s=30, submitted at t=100 (monotonic seconds). At t=101.5
    with no chunk yet, `next_deadline` is (102.0, "first_chunk"); at t=102 `expired` says
    "first_chunk". Had a chunk arrived at t=100.4, the next deadline would be (130.0, "total").
    """

    first_chunk_s: float | None = None
    total_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("first_chunk_s", "total_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds or None, got {value}")

    def with_deadline(self, request: Request) -> Timeouts:
        """These time-outs, with `total_s` from the request's deadline_at (+ a grace) when
        unset: the last resort of PROTOCOL.md §6.1."""
        if self.total_s is not None or request.deadline_at is None:
            return self
        total = (request.deadline_at - request.submitted_at) / 1000 + DEADLINE_GRACE_S
        return Timeouts(self.first_chunk_s, total)

    def next_deadline(
        self, submitted: float, first_chunk: float | None
    ) -> tuple[float, TimeoutKind] | None:
        """The next moment the request times out and why; None when it never does."""
        candidates: list[tuple[float, TimeoutKind]] = []
        if first_chunk is None and self.first_chunk_s is not None:
            candidates.append((submitted + self.first_chunk_s, "first_chunk"))
        if self.total_s is not None:
            candidates.append((submitted + self.total_s, "total"))
        return min(candidates, default=None)

    def expired(
        self, submitted: float, first_chunk: float | None, now: float
    ) -> TimeoutKind | None:
        deadline = self.next_deadline(submitted, first_chunk)
        return deadline[1] if deadline is not None and now >= deadline[0] else None

    def limit_s(self, kind: TimeoutKind) -> float:
        value = self.first_chunk_s if kind == "first_chunk" else self.total_s
        assert value is not None
        return value


@dataclass(frozen=True)
class Delta:
    """A piece of a request's output, in order. `restarted`: the output started over (a
    replacement worker); drop all text received before this delta. `finish_reason` is set on
    the last delta."""

    text: str
    token_ids: tuple[int, ...]
    restarted: bool
    finish_reason: FinishReason | None
    chunk: TokenChunk


@dataclass(frozen=True)
class Result:
    """What a request produced. Times are unix ms: `submitted_at` and `first_token_at` (the
    worker's) come from the chunks, `first_token_received_at` and `finished_at` are this
    client's clock."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason  # stop, length or cancelled
    prompt_tokens: int | None
    completion_tokens: int | None
    submitted_at: int
    first_token_at: int | None
    first_token_received_at: int | None
    finished_at: int
    worker_id: str | None
    warm: bool | None
    attempt: int
    restarts: int
    duplicates: int

    @property
    def ttft_ms(self) -> int | None:
        """Submit -> first token received by this client (DESIGN.md: TTFT)."""
        if self.first_token_received_at is None:
            return None
        return self.first_token_received_at - self.submitted_at

    @property
    def server_ttft_ms(self) -> int | None:
        """Submit -> first token produced by the worker (TTFT without the reply path)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def total_ms(self) -> int:
        return self.finished_at - self.submitted_at

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token: (tokens - 1) / (finished - first token), e.g.
        33 tokens, first at 1000 ms, done at 1800 ms: 32 / 0.8 s = 40 tokens/s."""
        tokens = self.completion_tokens or len(self.token_ids)
        if self.first_token_received_at is None or tokens < 2:
            return None
        seconds = (self.finished_at - self.first_token_received_at) / 1000
        return (tokens - 1) / seconds if seconds > 0 else None


@dataclass
class ReplyState:
    """The chunks of one request -> its deltas as they come, then its outcome.

    `add(chunk, received_at)` feeds the assembler and returns the deltas it released; text,
    token ids and timing accumulate for the current stream (a restart clears them). Once
    `done`, `result()` returns the Result, or raises RequestRejected / RequestFailed.
    """

    request_id: str
    submitted_at: int
    assembler: ReplyAssembler = field(default_factory=ReplyAssembler)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    first_token_received_at: int | None = None
    last: TokenChunk | None = None
    finished_at: int | None = None
    _started: bool = False

    @property
    def done(self) -> bool:
        return self.last is not None

    def add(self, chunk: TokenChunk, received_at: int) -> list[Delta]:
        deltas = []
        for c in self.assembler.add(chunk):
            restarted = c.seq == 0 and self._started
            if restarted:
                self.text.clear()
                self.token_ids.clear()
            self._started = True
            if c.token_ids and self.first_token_received_at is None:
                self.first_token_received_at = received_at
            self.text.append(c.text)
            self.token_ids.extend(c.token_ids)
            if c.is_last:
                self.last, self.finished_at = c, received_at
            deltas.append(Delta(c.text, c.token_ids, restarted, c.finish_reason, c))
        return deltas

    def result(self) -> Result:
        last = self.last
        if last is None or self.finished_at is None:
            raise RuntimeError("result() before the terminal chunk")
        if last.finish_reason == "rejected":
            raise RequestRejected(self.request_id, last.error_code or "", last.error_message or "")
        if last.finish_reason == "error":
            raise RequestFailed(
                self.request_id, last.error_code or "", last.error_message or "", last.worker_id
            )
        assert last.finish_reason is not None
        return Result(
            request_id=self.request_id,
            text="".join(self.text),
            token_ids=tuple(self.token_ids),
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            submitted_at=self.submitted_at,
            first_token_at=last.first_token_at,
            first_token_received_at=self.first_token_received_at,
            finished_at=self.finished_at,
            worker_id=last.worker_id,
            warm=last.warm,
            attempt=last.attempt,
            restarts=self.assembler.restarts,
            duplicates=self.assembler.duplicates,
        )


# --- one request -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Route:
    """Where a request was produced: its cancel goes to the same place."""

    topic: str
    partition: int | None


class RequestHandle:
    """One submitted request: its chunks as they arrive, its result, its cancellation.

    Iterate it once (`stream()` or `async for chunk in handle`); `result()` can be awaited
    any number of times, with or without iterating.
    """

    def __init__(
        self,
        request: Request,
        timeouts: Timeouts = Timeouts(),
        *,
        submitted_mono: float | None = None,
        cancel: Callable[[str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.request = request
        self.timeouts = timeouts.with_deadline(request)
        self.submitted_mono = time.monotonic() if submitted_mono is None else submitted_mono
        self.first_chunk_mono: float | None = None
        self.state = ReplyState(request.request_id, request.submitted_at)
        self.cancel_requested = False
        self._send_cancel = cancel
        self._queue: asyncio.Queue[TokenChunk | EmberError] = asyncio.Queue()
        self._done = asyncio.Event()
        self._error: EmberError | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def assembler(self) -> ReplyAssembler:
        return self.state.assembler

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- fed by the client's reader ---------------------------------------------------------

    def _deliver(self, chunk: TokenChunk, received_at: int, now: float) -> None:
        if self.done:
            return
        if self.first_chunk_mono is None:
            self.first_chunk_mono = now
        for delta in self.state.add(chunk, received_at):
            self._queue.put_nowait(delta.chunk)
        if self.state.done:
            self._done.set()

    def _expired(self, now: float) -> TimeoutKind | None:
        if self.done:
            return None
        return self.timeouts.expired(self.submitted_mono, self.first_chunk_mono, now)

    def _next_deadline(self) -> float | None:
        if self.done:
            return None
        deadline = self.timeouts.next_deadline(self.submitted_mono, self.first_chunk_mono)
        return None if deadline is None else deadline[0]

    def _fail(self, error: EmberError) -> None:
        if self.done:
            return
        self._error = error
        self._queue.put_nowait(error)
        self._done.set()

    # -- for the caller ---------------------------------------------------------------------

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        """Assembled chunks in order, the terminal one last. A seq-0 chunk after others is a
        restart. Raises RequestTimeout or ClientClosed when the request ends without one."""
        while True:
            item = await self._queue.get()
            if isinstance(item, EmberError):
                raise item
            yield item
            if item.is_last:
                return

    __aiter__ = chunks

    async def stream(self) -> AsyncIterator[Delta]:
        """The output as deltas (`restarted` marks a start-over). Ends after the last delta
        of `stop`, `length` or `cancelled`; raises RequestRejected, RequestFailed,
        RequestTimeout or ClientClosed where the request ends that way."""
        started = False
        async for chunk in self.chunks():
            if chunk.failed:
                self.state.result()  # raises RequestRejected / RequestFailed
            restarted = started and chunk.seq == 0
            started = True
            yield Delta(chunk.text, chunk.token_ids, restarted, chunk.finish_reason, chunk)

    async def result(self) -> Result:
        """Wait for the terminal chunk: the Result, or the typed error of the outcome."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self.state.result()

    async def cancel(self, reason: str | None = None) -> None:
        """Ask Ember to stop this request (see the module docstring). Returns once the
        cancel is produced; the handle ends with the terminal chunk that follows."""
        if self.done or self.cancel_requested:
            return
        self.cancel_requested = True
        if self._send_cancel is None:
            raise RuntimeError("this handle was not submitted through an EmberClient")
        await self._send_cancel(reason)


# --- the client --------------------------------------------------------------------------


def reply_topic_spec(name: str) -> TopicSpec:
    """A private reply topic: one partition (one reader), chunks kept an hour."""
    return TopicSpec(
        name,
        1,
        {"cleanup.policy": "delete", "retention.ms": str(HOUR_MS)},
        description="reply topic of one client process",
    )


class EmberClient:
    """A producer of requests and cancels, and one reader of the reply topic, shared by every
    request of this process. Use as `async with`, or call start() and stop()."""

    def __init__(
        self,
        kafka: KafkaSettings,
        reply_topic: str = REPLIES,
        *,
        create_reply_topic: bool = False,
        timeouts: Timeouts = Timeouts(),
        client_id: str | None = None,
    ) -> None:
        """`reply_topic`: where this client's requests ask for their chunks; it must exist
        unless `create_reply_topic`. `timeouts`: the default of every request."""
        self.kafka = kafka
        self.reply_topic = reply_topic
        self.create_reply_topic = create_reply_topic
        self.timeouts = timeouts
        self.client_id = client_id or default_client_id()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._reader: asyncio.Task[None] | None = None
        self._cancels: set[asyncio.Task[None]] = set()  # cancels of timed-out requests

    @classmethod
    def private(
        cls, kafka: KafkaSettings, client_id: str | None = None, timeouts: Timeouts = Timeouts()
    ) -> EmberClient:
        """A client with its own reply topic `ember.replies.<client-id>`, created at start."""
        client_id = client_id or default_client_id()
        return cls(
            kafka,
            f"{REPLIES}.{client_id}",
            create_reply_topic=True,
            timeouts=timeouts,
            client_id=client_id,
        )

    async def __aenter__(self) -> EmberClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pending(self) -> int:
        """Requests submitted and not yet ended."""
        return len(self._handles)

    async def start(self) -> None:
        """Connect, find the reply topic (create it if asked), start reading from its end.
        Raises KafkaError when Kafka cannot be reached, RuntimeError when the topic is
        missing; nothing is left open then."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        if self.create_reply_topic:
            from infra.topics import apply_topics  # the admin client: only when asked

            await apply_topics(self.kafka, [reply_topic_spec(self.reply_topic)])
        kwargs = self.kafka.aiokafka_kwargs()
        self._producer = AIOKafkaProducer(
            **kwargs,
            client_id=f"ember-client-{self.client_id}",
            acks="all",
            enable_idempotence=True,
            linger_ms=1,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **kwargs,
            client_id=f"ember-client-{self.client_id}",
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        await self._consumer.start()
        try:
            partitions = await asyncio.wait_for(
                self._producer.partitions_for(self.reply_topic), METADATA_TIMEOUT_S
            )
        except (asyncio.TimeoutError, KafkaError):
            partitions = set()
        if not partitions:
            raise RuntimeError(
                f"reply topic {self.reply_topic} does not exist on {self.kafka.bootstrap_servers}:"
                " run `ember topics apply`, or create the client with create_reply_topic=True"
            )
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, so no reply sent after start is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read(), name="ember-client-replies")

    async def stop(self) -> None:
        """Stop reading; requests still pending end with ClientClosed."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self._cancels:  # let the cancels of timed-out requests go out
            await asyncio.wait(self._cancels, timeout=5)
        self._fail_all("the client stopped")
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    # -- submitting -------------------------------------------------------------------------

    async def generate(
        self,
        model: str,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        latency_class: LatencyClass = "interactive",
        deadline_s: float | None = None,
        tenant: str | None = None,
        first_chunk_timeout_s: float | None = None,
        timeout_s: float | None = None,
        partition: int | None = None,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Build a request (text prompt, or token ids), submit it and return its handle.

        Through `ember.requests` (admission, placement) by default; with `partition`,
        straight to that partition of the model's topic (no control plane). Time-outs not
        given fall back to the client's; `deadline_s` sets the request's deadline_at."""
        submitted = now_ms()
        ids = None if isinstance(prompt, str) else tuple(prompt)
        request = Request(
            request_id=request_id or new_request_id(),
            model=model,
            submitted_at=submitted,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=tuple(stop),
            latency_class=latency_class,
            reply_topic=self.reply_topic,
            deadline_at=None if deadline_s is None else submitted + int(deadline_s * 1000),
            tenant=tenant,
        )
        timeouts = Timeouts(
            first_chunk_timeout_s or self.timeouts.first_chunk_s,
            timeout_s or self.timeouts.total_s,
        )
        if partition is None:
            return await self.submit(request, timeouts=timeouts)
        return await self.submit(
            direct(request), model_topic_name(model), partition, timeouts=timeouts
        )

    async def submit(
        self,
        request: Request | AdmittedRequest,
        topic: str | None = None,
        partition: int | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> RequestHandle:
        """Produce `request` (a Request to `ember.requests`, or an AdmittedRequest straight
        to a model topic) and return the handle of its reply stream."""
        if self._producer is None or self._reader is None:
            raise RuntimeError("call start() first (or use `async with`)")
        inner = request.request if isinstance(request, AdmittedRequest) else request
        if inner.reply_topic != self.reply_topic:
            raise ValueError(
                f"request replies to {inner.reply_topic}, this client reads {self.reply_topic}"
            )
        if inner.request_id in self._handles:
            raise ValueError(f"request {inner.request_id} is already pending on this client")
        rec = record_for(request, topic)
        route = _Route(rec.topic, partition)
        handle = RequestHandle(
            inner, timeouts or self.timeouts, cancel=functools.partial(self._cancel, inner, route)
        )
        self._handles[inner.request_id] = handle
        try:
            await self._producer.send_and_wait(
                rec.topic, rec.value, key=rec.key, headers=rec.headers, partition=partition
            )
        except BaseException:
            self._handles.pop(inner.request_id, None)
            raise
        return handle

    async def _cancel(self, request: Request, route: _Route, reason: str | None) -> None:
        if self._producer is None:
            return
        cancel = Cancel(
            request_id=request.request_id,
            model=request.model,
            reply_topic=request.reply_topic,
            cancelled_at=now_ms(),
            reason=reason,
        )
        rec = record_for(cancel, route.topic)
        await self._producer.send_and_wait(
            rec.topic, rec.value, key=rec.key, headers=rec.headers, partition=route.partition
        )
        log.info("cancel sent", request_id=request.request_id, topic=rec.topic, reason=reason)

    # -- reading ----------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=self._poll_ms())
                received, now = now_ms(), time.monotonic()
                for records in batches.values():
                    for rec in records:
                        self._on_record(rec.value, rec.headers, received, now)
                self._expire(time.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("reply consumer failed", topic=self.reply_topic)
            self._fail_all(f"the reply consumer failed: {type(exc).__name__}: {exc}")
            raise

    def _on_record(self, value: bytes | None, headers: object, received: int, now: float) -> None:
        try:
            chunk = decode(TokenChunk, value, headers)  # type: ignore[arg-type]
        except SchemaError:
            return  # not ours to judge: the reply topic may be shared
        handle = self._handles.get(chunk.request_id)
        if handle is None:
            return
        handle._deliver(chunk, received, now)
        if handle.done:
            self._handles.pop(chunk.request_id, None)

    def _poll_ms(self) -> int:
        deadlines = [d for h in self._handles.values() if (d := h._next_deadline()) is not None]
        if not deadlines:
            return MAX_POLL_MS
        wait_ms = (min(deadlines) - time.monotonic()) * 1000
        return int(min(MAX_POLL_MS, max(1.0, wait_ms)))

    def _expire(self, now: float) -> None:
        """End the requests whose time is up with RequestTimeout, and cancel them (in the
        background: the reader does not wait for the broker)."""
        for request_id, handle in list(self._handles.items()):
            kind = handle._expired(now)
            if kind is None:
                continue
            del self._handles[request_id]
            handle._fail(RequestTimeout(request_id, kind, handle.timeouts.limit_s(kind)))
            log.warning("request timed out", request_id=request_id, kind=kind)
            if not handle.cancel_requested and handle._send_cancel is not None:
                handle.cancel_requested = True
                task = asyncio.create_task(self._quietly(handle._send_cancel(f"timeout {kind}")))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    @staticmethod
    async def _quietly(sending: Awaitable[None]) -> None:
        try:
            await sending
        except Exception as exc:  # best effort: the request ended for this client anyway
            log.warning("cancel not sent", error=f"{type(exc).__name__}: {exc}")

    def _fail_all(self, why: str) -> None:
        for request_id, handle in list(self._handles.items()):
            handle._fail(ClientClosed(request_id, why))
        self._handles.clear()


def direct(request: Request, prompt_bucket: int = 128) -> AdmittedRequest:
    """`request` as an AdmittedRequest for a model topic partition, bypassing admission: the
    worker reads it as placed there by hand (prompt_tokens estimated, ~4 characters a token)."""
    if request.prompt_token_ids is not None:
        tokens = len(request.prompt_token_ids)
    else:
        tokens = len(request.prompt or "") // 4 + 1
    bucket = prompt_bucket
    while bucket < tokens:
        bucket *= 2
    return AdmittedRequest(
        request=request,
        latency_class=request.latency_class,
        prompt_tokens=tokens,
        prompt_bucket=bucket,
        admitted_at=request.submitted_at,
    )


__all__ = [
    "ClientClosed",
    "Delta",
    "EmberClient",
    "EmberError",
    "ReplyAssembler",
    "ReplyState",
    "RequestFailed",
    "RequestHandle",
    "RequestRejected",
    "RequestTimeout",
    "Result",
    "Timeouts",
    "direct",
    "new_request_id",
]
