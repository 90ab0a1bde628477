"""The worker's Kafka loop: one partition of a model's request topic in, token chunks and
lifecycle events out.

    starting -> loading (weights) -> warming (one throw-away step) -> ready -> draining -> stopped

Intake: the worker is *assigned* its partition (`consumer.assign`, no group membership), so
workers joining or leaving never trigger a rebalance of the others. It pulls only as many
records as the engine can queue (backpressure stays in Kafka).

Delivery: the first token of a request goes out at once, later ones in chunks (`ChunkPolicy`).
Every admitted record ends with exactly one terminal chunk. Offsets are committed only up to
the oldest record whose terminal chunk the broker has acknowledged (`OffsetTracker`), so a
crash re-delivers every unfinished request; chunks carry (attempt, seq) so the client drops
what it already has. Sampling without a seed is seeded from the request id, so a re-delivered
request regenerates the same text.

Placed records. A record the control plane placed on *another* worker (`worker_id` set, not
ours) is one an earlier worker of this partition left unread or unfinished when it stopped
or died. Placement re-sends those (attempt + 1, to a worker it chooses), so this worker skips
them: one request, one execution. Records nobody placed (no `worker_id`, written straight to
the model topic) are served by whoever owns the partition, re-delivery included. Heartbeats
and the `stopped` / `failed` events list what finished since the last one (`done`), so
placement knows exactly what a worker completed, even between two heartbeats.

Bad records never stop the loop: undecodable or invalid ones go to dead letters with their
reason, plus a `rejected` chunk when a reply topic can be read from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import (
    KafkaError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)

from gpu_worker.delivery import ChunkBatcher, ChunkOut, ChunkPolicy, OffsetTracker
from infra.logs import get_logger
from infra.settings import KafkaSettings
from schemas import (
    AdmittedRequest,
    Cancel,
    LifecycleEvent,
    Message,
    Request,
    SchemaError,
    TokenChunk,
    dead_letter_for,
    decode_key,
    decode_model_record,
    record_for,
    reply_route,
)
from schemas.limits import MAX_IN_FLIGHT
from schemas.topics import LIFECYCLE, WORKERS, model_topic_name

log = get_logger(__name__)

# Broker answers about one reply topic: they cost that request, never the worker.
_REPLY_TOPIC_ERRORS = (TopicAuthorizationFailedError, UnknownTopicOrPartitionError)
REPLY_TOPIC_CHECK_S = 2.0  # how long to wait for a reply topic's metadata
REPLY_TOPIC_VERDICT_S = 30.0  # how long a topic's writability is remembered


class ReplyTopicError(Exception):
    """The request's reply topic cannot be written by this worker (missing or not allowed)."""


# Engine rejection reasons that are also wire error codes (schemas.ERROR_CODES); any other
# rejection is the request's own fault: `invalid_request`.
_WIRE_CODES = frozenset({"prompt_too_long"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def process_started_at_ms() -> int:
    """When this OS process started (Linux /proc), else now: the start of the `process` span."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return int((btime + ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, StopIteration, IndexError):
        return now_ms()


def replay_seed(request_id: str) -> int:
    """A stable seed for a request that gave none: a re-delivery samples the same tokens."""
    return int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") >> 1


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    model: str  # the served model's name: selects `ember.model.<model>`
    model_dir: Path
    partition: int = 0
    worker_id: str = field(default_factory=default_worker_id)
    max_batch: int = 8
    max_seq_len: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    chunk: ChunkPolicy = ChunkPolicy()
    heartbeat_interval_s: float = 1.0
    # A finished request is reported by an early heartbeat this long after it finished (the
    # wait gathers the others finishing meanwhile, and spaces heartbeats at least this far
    # apart), not up to heartbeat_interval_s later: placement's counts of what runs where and
    # the autoscaler's service time follow the worker closely. 0: on the interval only.
    done_report_s: float = 0.1
    idle_poll_ms: int = 100
    # Start of the `process` span, unix ms; None: when this OS process started. A pre-started
    # process (gpu_worker.prestart) sets it to the moment it was assigned its model.
    started_at_ms: int | None = None

    @property
    def topic(self) -> str:
        return model_topic_name(self.model)

    @property
    def group_id(self) -> str:
        # Offsets only: the consumer is assigned its partition and never joins the group.
        return f"ember.worker.{self.topic}"


@dataclass
class _InFlight:
    offset: int
    request: Request
    attempt: int
    warm: bool
    first_token_at: int | None = None


def import_runtime() -> None:
    """Import torch and the runtime: seconds in a fresh interpreter, nothing in a pre-started
    process (gpu_worker.prestart). The `process` span ends after it, so `weights_load` times
    the loading alone."""
    import torch  # noqa: F401

    import gpu_worker.engine
    import gpu_worker.tokenizer
    import gpu_worker.weights  # noqa: F401


def load_engine(config: WorkerConfig) -> Any:
    """Model, tokenizer and engine from a packed artifact (`ember pack`: snapshot restore and
    streamed weights) or a Hugging Face checkpoint directory (blocking). The engine's
    `cold_start_spans` are the load's own spans (weights GB/s among their attrs)."""
    from gpu_worker.loader import load_runtime

    runtime = load_runtime(
        config.model_dir,
        device=config.device,
        max_batch=config.max_batch,
        max_seq_len=config.max_seq_len,
        dtype=config.dtype,
    )
    runtime.engine.cold_start_spans = runtime.spans.spans
    return runtime.engine


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        kafka: KafkaSettings,
        engine_factory: Callable[[WorkerConfig], Any] = load_engine,
    ) -> None:
        self.config = config
        self.kafka = kafka
        self._engine_factory = engine_factory
        self.engine: Any = None
        self.state = "starting"
        self.ready_at: int | None = None
        self._draining = asyncio.Event()
        self._tracker = OffsetTracker()
        self._batcher = ChunkBatcher(config.chunk)
        self._in_flight: dict[str, _InFlight] = {}
        self._done: list[str] = []  # finished since the last event that listed `done`
        self._something_done = asyncio.Event()  # set by _finished: report it early
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tp = TopicPartition(config.topic, config.partition)
        self._first_token_span_sent = False
        self._reply_verdicts: dict[str, tuple[float, str | None]] = {}  # topic -> (at, problem)
        self.served = 0

    # -- lifecycle --------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop taking requests; finish those in flight, then stop (SIGTERM does this)."""
        self._draining.set()

    async def run(self) -> int:
        """The whole life of the worker. Returns the process exit code."""
        started = self.config.started_at_ms
        if started is None:
            started = process_started_at_ms()
        self._producer = AIOKafkaProducer(
            **self.kafka.aiokafka_kwargs(),
            client_id=f"ember-worker-{self.config.worker_id}",
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
        )
        await self._producer.start()
        try:
            await self._set_state("starting")
            await asyncio.to_thread(import_runtime)
            t0 = now_ms()
            await self._span("process", started, t0, float(t0 - started))
            await self._set_state("loading")
            t0, w0 = now_ms(), time.perf_counter()
            self.engine = await asyncio.to_thread(self._engine_factory, self.config)
            await self._span("weights_load", t0, now_ms(), (time.perf_counter() - w0) * 1e3)
            for span in getattr(self.engine, "cold_start_spans", ()):
                await self._span(
                    span.name, span.start_unix_ms, span.end_unix_ms, span.duration_ms, span.attrs
                )
            await self._set_state("warming")
            t0, w0 = now_ms(), time.perf_counter()
            await asyncio.to_thread(self.engine.warm_up)
            await self._span("warm_up", t0, now_ms(), (time.perf_counter() - w0) * 1e3)
            await self._start_consumer()
            self.ready_at = now_ms()
            await self._set_state("ready")
            await self._span("runtime_ready", started, self.ready_at, float(self.ready_at - started))
            heartbeats = asyncio.create_task(self._heartbeats())
            try:
                await self._serve()
            finally:
                heartbeats.cancel()
            await self._set_state("stopped", reason="drained", done=self._take_done())
            return 0
        except Exception as exc:
            # No terminal chunks for what is in flight and no commit: those requests are not
            # the failure's cause (a request's own failure ends it with an `error` chunk in
            # the engine). Placement re-places them and the partition's next worker re-reads
            # them; a terminal chunk now would make clients drop the re-run (PROTOCOL §6.2).
            log.exception("worker failed", worker_id=self.config.worker_id)
            with contextlib.suppress(Exception):
                await self._set_state(
                    "failed", reason=f"{type(exc).__name__}: {exc}"[:500], done=self._take_done()
                )
            return 1
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            await self._producer.stop()

    async def _start_consumer(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka_kwargs(),
            client_id=f"ember-worker-{self.config.worker_id}",
            group_id=self.config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
        await self._consumer.start()
        assert self._producer is not None
        try:
            partitions = await asyncio.wait_for(
                self._producer.partitions_for(self.config.topic), timeout=10
            )
        except (asyncio.TimeoutError, KafkaError):
            partitions = set()
        if not partitions or self.config.partition not in partitions:
            raise RuntimeError(
                f"topic {self.config.topic} has no partition {self.config.partition} "
                f"(partitions: {sorted(partitions or [])}); run `ember topics apply --model "
                f"{self.config.model}`"
            )
        self._consumer.assign([self._tp])

    # -- the loop ---------------------------------------------------------------------------

    async def _serve(self) -> None:
        engine = self.engine
        assert self._consumer is not None
        while not (self._draining.is_set() and not engine.has_work()):
            room = self.config.max_batch - engine.num_waiting
            if not self._draining.is_set() and room > 0:
                timeout = 0 if engine.has_work() else self.config.idle_poll_ms
                batches = await self._consumer.getmany(
                    self._tp, timeout_ms=timeout, max_records=room
                )
                for record in batches.get(self._tp, []):
                    await self._take(record)
            if engine.has_work():
                outputs = await asyncio.to_thread(engine.step)
                await self._publish(outputs)
            elif self._draining.is_set():
                break
            for chunk in self._batcher.due(now_ms()):
                await self._send_chunk(chunk)
            await self._commit()
        await self._commit()

    async def _take(self, record: Any) -> None:
        """One consumed record: into the engine, or answered at once (rejected / dead letter)."""
        offset = record.offset
        try:
            decode_key(record.key)
            work = decode_model_record(record.value, record.headers)
            if isinstance(work, Cancel):
                self._cancel(work)
                self._tracker.skipped(offset)
                return
            if isinstance(work, AdmittedRequest):
                request, attempt, warm = work.request, work.attempt, work.warm
            else:
                request, attempt, warm = work, 1, None
        except SchemaError as exc:
            await self._dead_letter(record, exc)
            self._tracker.skipped(offset)
            return
        placed_on = work.worker_id if isinstance(work, AdmittedRequest) else None
        if placed_on is not None and placed_on != self.config.worker_id:
            # An earlier worker of this partition did not finish it; placement re-sends it.
            log.info("request placed on another worker skipped", request_id=request.request_id,
                     attempt=attempt, placed_on=placed_on)
            self._tracker.skipped(offset)
            return
        if request.request_id in self._in_flight:
            # Another copy of a request this worker is running: a re-placement (attempt + 1)
            # on the partition that also holds the uncommitted original. The run in flight
            # answers it; a terminal chunk here would end the client's stream (PROTOCOL §6.2).
            log.info("duplicate of a request in flight ignored", request_id=request.request_id,
                     attempt=attempt, running_attempt=self._in_flight[request.request_id].attempt)
            self._tracker.skipped(offset)
            return
        problem_topic = await self._reply_topic_problem(request.reply_topic)
        if problem_topic is not None:
            await self._dead_letter(record, ReplyTopicError(problem_topic), reply=False)
            self._tracker.skipped(offset)
            self._finished(request.request_id)
            return
        if warm is None:  # not placed by the control plane: warm if we were ready before it
            warm = self.ready_at is not None and request.submitted_at >= self.ready_at
        live = _InFlight(offset, request, attempt, warm)
        problem = self._precheck(request)
        if problem is None:
            from gpu_worker.scheduler import RequestRejected

            try:
                self.engine.add_request(self._engine_request(request))
            except RequestRejected as exc:
                code = exc.reason if exc.reason in _WIRE_CODES else "invalid_request"
                problem = ("rejected", code, str(exc))
        if problem is not None:
            reason, code, message = problem
            await self._terminal_now(live, reason, code, message)
            self._tracker.skipped(offset)
            self._finished(request.request_id)
            return
        self._tracker.consumed(offset)
        self._in_flight[request.request_id] = live

    def _cancel(self, cancel: Cancel) -> None:
        """Stop a request in flight: the engine frees its slot and its next step reports it
        `cancelled`, which `_publish` sends as the terminal chunk. A cancel of a request this
        worker does not hold (finished, never seen, another model) is dropped."""
        live = self._in_flight.get(cancel.request_id)
        stopped = (
            live is not None
            and cancel.model == self.config.model
            and self.engine.cancel(cancel.request_id)
        )
        log.info("cancel", request_id=cancel.request_id, stopped=stopped, reason=cancel.reason)

    def _precheck(self, request: Request) -> tuple[str, str, str] | None:
        if request.model != self.config.model:
            return ("rejected", "unknown_model", f"this worker serves {self.config.model!r}")
        if request.deadline_at is not None and now_ms() > request.deadline_at:
            return ("error", "deadline_exceeded", "deadline passed before the request started")
        return None

    def _engine_request(self, request: Request) -> Any:
        from gpu_worker.engine import EngineRequest
        from gpu_worker.sampling import SamplingParams

        seed = request.seed
        if seed is None and request.temperature > 0:
            seed = replay_seed(request.request_id)
        params = SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=seed,
            stop=tuple(request.stop),
        )
        return EngineRequest(
            request.request_id,
            prompt=request.prompt,
            prompt_ids=list(request.prompt_token_ids) if request.prompt_token_ids else None,
            params=params,
        )

    async def _publish(self, outputs: list[Any]) -> None:
        now = now_ms()
        terminal_acks: list[tuple[str, asyncio.Future[Any]]] = []
        for out in outputs:
            live = self._in_flight.get(out.request_id)
            if live is None:
                continue
            if out.token_ids and live.first_token_at is None:
                live.first_token_at = now
                if not self._first_token_span_sent and self.ready_at is not None:
                    self._first_token_span_sent = True
                    await self._span("first_token", self.ready_at, now, float(now - self.ready_at))
            if out.token_ids or out.text:
                chunk = self._batcher.add(out.request_id, out.text, list(out.token_ids), now)
                if chunk is not None:
                    await self._send_chunk(chunk)
            if out.finished:
                code = message = None
                if out.finish_reason == "error":
                    code, message = "internal_error", (out.error or "engine error")[:500]
                chunk = self._batcher.finish(out.request_id, out.finish_reason)
                ack = await self._send_chunk(
                    chunk, code, message, out.prompt_tokens, out.completion_tokens
                )
                terminal_acks.append((out.request_id, ack))
        for request_id, ack in terminal_acks:
            try:
                await ack
            except _REPLY_TOPIC_ERRORS as exc:  # the reply topic went away or was forbidden
                log.warning("terminal chunk undeliverable", request_id=request_id, error=repr(exc))
            live = self._in_flight.pop(request_id)
            self._tracker.done(live.offset)
            self._finished(request_id)
            self.served += 1

    # -- producing --------------------------------------------------------------------------

    def _chunk(self, live: _InFlight, out: ChunkOut, **extra: Any) -> TokenChunk:
        return TokenChunk(
            request_id=out.request_id,
            seq=out.seq,
            attempt=live.attempt,
            text=out.text,
            token_ids=tuple(out.token_ids),
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            submitted_at=live.request.submitted_at,
            first_token_at=live.first_token_at,
            emitted_at=now_ms(),
            worker_id=self.config.worker_id,
            warm=live.warm,
            **extra,
        )

    async def _send_chunk(
        self,
        out: ChunkOut,
        error_code: str | None = None,
        error_message: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> asyncio.Future[Any]:
        live = self._in_flight[out.request_id]
        extra: dict[str, Any] = {}
        if out.finish_reason is not None:
            extra = {
                "error_code": error_code,
                "error_message": error_message,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
            }
        return await self._send(self._chunk(live, out, **extra), live.request.reply_topic)

    async def _terminal_now(self, live: _InFlight, reason: str, code: str, message: str) -> None:
        """Answer a request that never reaches the engine: one lone terminal chunk."""
        out = ChunkOut(live.request.request_id, 0, "", [], reason)
        chunk = self._chunk(live, out, error_code=code, error_message=message[:500])
        await (await self._send(chunk, live.request.reply_topic))
        log.info("request answered without generation", request_id=out.request_id, code=code)

    async def _dead_letter(self, record: Any, exc: Exception, reply: bool = True) -> None:
        """Record `record` in dead letters with why; when `reply`, also answer its request
        with a lone `rejected` chunk if a reply topic can be read from it."""
        at = now_ms()
        letter = dead_letter_for(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            error=exc,
            at=at,
            headers=record.headers,
            component="worker",
        )
        await (await self._send(letter))
        log.warning(
            "dead-lettered a record",
            offset=record.offset,
            reason=letter.reason,
            error=letter.error[:300],
        )
        route = reply_route(record.value) if reply and isinstance(exc, SchemaError) else None
        if route is None:
            return
        chunk = TokenChunk(
            request_id=route.request_id,
            seq=0,
            finish_reason="rejected",
            error_code="invalid_request" if exc.reason == "invalid" else exc.reason,
            error_message=exc.message[:500],
            submitted_at=route.submitted_at or at,
            emitted_at=at,
        )
        if await self._reply_topic_problem(route.reply_topic) is None:
            with contextlib.suppress(*_REPLY_TOPIC_ERRORS):
                await (await self._send(chunk, route.reply_topic))

    async def _send(self, msg: Message, topic: str | None = None) -> asyncio.Future[Any]:
        assert self._producer is not None
        rec = record_for(msg, topic)
        try:
            return await self._producer.send(
                rec.topic, rec.value, key=rec.key, headers=rec.headers
            )
        except _REPLY_TOPIC_ERRORS as exc:
            if not isinstance(msg, TokenChunk):
                raise  # one of Ember's own topics: the deployment is broken, fail loudly
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            failed.add_done_callback(lambda f: f.exception())  # retrieved: no warning
            return failed

    async def _reply_topic_problem(self, topic: str) -> str | None:
        """Why chunks cannot go to `topic` (missing, not allowed), or None. Remembered for
        REPLY_TOPIC_VERDICT_S, so a flood of such requests costs one metadata wait."""
        now = time.monotonic()
        verdict = self._reply_verdicts.get(topic)
        if verdict is not None and now - verdict[0] < REPLY_TOPIC_VERDICT_S:
            return verdict[1]
        assert self._producer is not None
        problem: str | None = None
        try:
            await asyncio.wait_for(self._producer.partitions_for(topic), REPLY_TOPIC_CHECK_S)
        except TopicAuthorizationFailedError:
            problem = f"reply topic {topic!r}: this worker is not allowed to write it"
        except (asyncio.TimeoutError, UnknownTopicOrPartitionError):
            problem = f"reply topic {topic!r} does not exist (create it before sending requests)"
        self._reply_verdicts[topic] = (now, problem)
        return problem

    async def _commit(self) -> None:
        offset = self._tracker.committable()
        if offset is None or self._consumer is None:
            return
        await self._consumer.commit({self._tp: offset})
        self._tracker.mark_committed(offset)

    # -- lifecycle events -------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> LifecycleEvent:
        return LifecycleEvent(
            worker_id=self.config.worker_id,
            model=self.config.model,
            kind=kind,  # type: ignore[arg-type]
            state=self.state,  # type: ignore[arg-type]
            at=now_ms(),
            partition=self.config.partition,
            node=socket.gethostname(),
            **fields,
        )

    def _finished(self, request_id: str) -> None:
        self._done.append(request_id)
        if self.config.done_report_s > 0:
            self._something_done.set()

    def _take_done(self) -> tuple[str, ...]:
        """Request ids finished since the last event that listed them (at most one event's
        worth; the rest go in the next event)."""
        taken, self._done = self._done[:MAX_IN_FLIGHT], self._done[MAX_IN_FLIGHT:]
        return tuple(taken)

    async def _set_state(
        self, state: str, reason: str | None = None, done: tuple[str, ...] | None = None
    ) -> None:
        previous, self.state = self.state, state
        event = self._event("state", previous_state=previous, reason=reason, done=done)
        await self._send(event, LIFECYCLE)
        await (await self._send(event, WORKERS))
        log.info("worker state", state=state, previous=previous, reason=reason)

    async def _span(
        self, name: str, start: int, end: int, duration_ms: float, attrs: Any = None
    ) -> None:
        event = self._event(
            "span",
            span_name=name,
            span_start_at=start,
            span_end_at=max(end, start),
            span_duration_ms=max(duration_ms, float(end - start), 0.0),
            attrs=dict(attrs or {}),
        )
        await self._send(event, LIFECYCLE)
        log.info("span", span=name, duration_ms=round(event.span_duration_ms or 0.0, 1))

    async def _heartbeats(self) -> None:
        """A heartbeat every heartbeat_interval_s, and done_report_s after a request finished
        when that comes sooner."""
        while True:
            engine = self.engine
            self._something_done.clear()
            try:
                event = self._event(
                    "heartbeat",
                    free_slots=engine.free_slots,
                    total_slots=engine.max_batch,
                    queued_tokens=engine.queued_tokens,
                    in_flight=tuple(list(self._in_flight)[:256]),
                    done=self._take_done(),
                )
                await self._send(event, LIFECYCLE)
            except Exception:
                log.exception("heartbeat failed")
            await self._until_next_heartbeat()

    async def _until_next_heartbeat(self) -> None:
        interval, early = self.config.heartbeat_interval_s, self.config.done_report_s
        if early <= 0 or early >= interval:
            await asyncio.sleep(interval)
            return
        await asyncio.sleep(early)
        try:
            await asyncio.wait_for(self._something_done.wait(), interval - early)
        except asyncio.TimeoutError:
            return
        await asyncio.sleep(early)


def run_worker(config: WorkerConfig, kafka: KafkaSettings) -> int:
    """Run a worker until SIGTERM/SIGINT, then drain and stop."""

    async def main() -> int:
        worker = Worker(config, kafka)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.drain)
        return await worker.run()

    return asyncio.run(main())
