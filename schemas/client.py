"""A minimal asynchronous client of the wire protocol: submit requests, read their chunks.

    async with EmberClient(KafkaSettings.from_env()) as client:
        handle = await client.submit(request)
        async for chunk in handle:   # in order, duplicates dropped, ends at the terminal
            text = chunk.text if chunk.seq == 0 else text + chunk.text

One reply consumer per client process (all partitions of its reply topic, from the end at
start), not one per request. `ReplyAssembler` is the pure part: it orders chunks by `seq` and
drops the duplicates a re-delivered request produces.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.settings import KafkaSettings
from schemas.codec import decode, record_for
from schemas.errors import SchemaError
from schemas.messages import Message, Request, TokenChunk
from schemas.topics import REPLIES


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


class RequestHandle:
    """The chunks of one submitted request, as an async iterator."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.assembler = ReplyAssembler()
        self._queue: asyncio.Queue[TokenChunk] = asyncio.Queue()

    def _deliver(self, chunk: TokenChunk) -> None:
        for c in self.assembler.add(chunk):
            self._queue.put_nowait(c)

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        """In-order chunks; a second seq-0 chunk means the output restarted (drop the text)."""
        while True:
            chunk = await self._queue.get()
            yield chunk
            if chunk.is_last:
                return


class EmberClient:
    def __init__(self, kafka: KafkaSettings, reply_topic: str = REPLIES) -> None:
        self.kafka = kafka
        self.reply_topic = reply_topic
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._handles: dict[str, RequestHandle] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EmberClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**self.kafka.aiokafka_kwargs(), acks="all", linger_ms=1)
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka_kwargs(), enable_auto_commit=False, auto_offset_reset="latest"
        )
        await self._consumer.start()
        partitions = await self._producer.partitions_for(self.reply_topic)
        tps = [TopicPartition(self.reply_topic, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end offsets now, so no reply sent after start is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def submit(
        self, request: Request | Message, topic: str | None = None, partition: int | None = None
    ) -> RequestHandle:
        """Produce `request` (a Request, or an AdmittedRequest straight to a model topic) and
        return the handle of its reply stream."""
        assert self._producer is not None, "call start() first"
        inner = getattr(request, "request", request)
        assert isinstance(inner, Request)
        if inner.reply_topic != self.reply_topic:
            raise ValueError(
                f"request replies to {inner.reply_topic}, this client reads {self.reply_topic}"
            )
        handle = RequestHandle(inner)
        self._handles[inner.request_id] = handle
        rec = record_for(request, topic)
        await self._producer.send_and_wait(
            rec.topic, rec.value, key=rec.key, headers=rec.headers, partition=partition
        )
        return handle

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for rec in records:
                    try:
                        chunk = decode(TokenChunk, rec.value, rec.headers)
                    except SchemaError:
                        continue  # not ours to judge: the reply topic may be shared
                    handle = self._handles.get(chunk.request_id)
                    if handle is not None:
                        handle._deliver(chunk)
                        if handle.assembler.done:
                            self._handles.pop(chunk.request_id, None)
