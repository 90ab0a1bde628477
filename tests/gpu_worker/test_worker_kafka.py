"""The worker loop on the real broker: token streaming, lifecycle, bad input, crash recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.worker import Worker, WorkerConfig, now_ms
from infra.topics import apply_topics
from schemas import (
    AdmittedRequest,
    DeadLetter,
    LifecycleEvent,
    Request,
    TokenChunk,
    decode,
    record_for,
)
from schemas.client import ReplyAssembler
from schemas.topics import DEADLETTERS, LIFECYCLE, TopicSpec, model_topic

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def expected_greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from gpu_worker.engine import Engine, EngineRequest
    from gpu_worker.sampling import SamplingParams
    from gpu_worker.tokenizer import Tokenizer
    from gpu_worker.weights import load_model

    engine = Engine(load_model(model_dir), Tokenizer.from_dir(model_dir), max_batch=2)
    engine.add_request(EngineRequest("x", prompt=prompt, params=SamplingParams(max_tokens)))
    text = ""
    while engine.has_work():
        text += "".join(out.text for out in engine.step())
    return text


async def _topics(kafka_settings) -> tuple[str, str]:
    """A fresh model topic (2 partitions) and reply topic: (model, reply topic)."""
    model, reply = f"tiny-{uuid.uuid4().hex[:8]}", f"test.replies.{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [model_topic(model, partitions=2), TopicSpec(reply, 1)])
    return model, reply


def admitted(model: str, prompt: str, reply: str, max_tokens: int, **fields) -> AdmittedRequest:
    now = now_ms()
    request = Request(
        request_id=str(uuid.uuid4()),
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        reply_topic=reply,
        submitted_at=now,
        **fields,
    )
    return AdmittedRequest(
        request=request, latency_class="interactive", prompt_tokens=len(prompt),
        prompt_bucket=128, admitted_at=now,
    )


async def produce(kafka_settings, topic: str, partition: int, msgs=(), raw=()) -> None:
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs())
    await producer.start()
    try:
        for msg in msgs:
            rec = record_for(msg, topic)
            await producer.send_and_wait(
                topic, rec.value, key=rec.key, headers=rec.headers, partition=partition
            )
        for key, value in raw:
            await producer.send_and_wait(topic, value, key=key, partition=partition)
    finally:
        await producer.stop()


class Replies:
    """A client's view of a reply topic, per request: the chunks of its current stream, in
    order, duplicates dropped (schemas.client.ReplyAssembler)."""

    def __init__(self) -> None:
        self.assemblers: dict[str, ReplyAssembler] = {}
        self.chunks: dict[str, list[TokenChunk]] = {}
        self.terminals: dict[str, list[TokenChunk]] = {}
        self.received: dict[str, int] = {}

    def add(self, chunk: TokenChunk) -> None:
        rid = chunk.request_id
        self.received[rid] = self.received.get(rid, 0) + 1
        if chunk.is_last:
            self.terminals.setdefault(rid, [])
        for c in self.assemblers.setdefault(rid, ReplyAssembler()).add(chunk):
            if c.seq == 0:
                self.chunks[rid] = []
            self.chunks[rid].append(c)
            if c.is_last:
                self.terminals[rid].append(c)

    def text(self, request_id: str) -> str:
        return "".join(c.text for c in self.chunks[request_id])


async def collect(kafka_settings, topic: str, request_ids: set[str], timeout_s: float,
                  replies: Replies | None = None, until_first: bool = False) -> Replies:
    replies = replies or Replies()
    consumer = AIOKafkaConsumer(
        topic, **kafka_settings.aiokafka_kwargs(), auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for rec in records:
                    chunk = decode(TokenChunk, rec.value, rec.headers)
                    if chunk.request_id in request_ids:
                        replies.add(chunk)
            if until_first and any(replies.chunks.get(r) for r in request_ids):
                return replies
            if request_ids <= set(replies.terminals):
                return replies
    finally:
        await consumer.stop()
    missing = request_ids - set(replies.terminals)
    raise AssertionError(f"no terminal chunk within {timeout_s}s for {len(missing)} requests")


async def read_all(kafka_settings, topic: str, cls, keep, idle_ms: int = 1000) -> list:
    consumer = AIOKafkaConsumer(
        topic, **kafka_settings.aiokafka_kwargs(), auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out = []
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=idle_ms)
            if not batches:
                return out
            for records in batches.values():
                out += [m for m in (decode(cls, r.value) for r in records) if keep(m)]
    finally:
        await consumer.stop()


def _config(model: str, model_dir: Path, partition: int, **fields) -> WorkerConfig:
    worker_id = f"w-{uuid.uuid4().hex[:6]}"
    return WorkerConfig(model=model, model_dir=model_dir, partition=partition,
                        worker_id=worker_id, **fields)


async def _ready_worker(config: WorkerConfig, kafka_settings) -> tuple[Worker, asyncio.Task]:
    """A worker running in this event loop, once it is `ready` (up to 60 s)."""
    worker = Worker(config, kafka_settings)
    task = asyncio.create_task(worker.run())
    for _ in range(600):
        if worker.state == "ready" or task.done():
            break
        await asyncio.sleep(0.1)
    assert worker.state == "ready"
    return worker, task


async def test_worker_streams_tokens_and_answers_every_record(kafka_settings, tiny_model):
    model, reply = await _topics(kafka_settings)
    config = _config(model, tiny_model, 1, max_batch=4, heartbeat_interval_s=0.2,
                     chunk=ChunkPolicy(max_tokens=4, max_delay_ms=20))
    worker, task = await _ready_worker(config, kafka_settings)

    prompts = ["hello world", "the quick brown fox", "café crème", "a"]
    good = [admitted(model, p, reply, max_tokens=12) for p in prompts]
    too_long = admitted(model, "word " * 5000, reply, max_tokens=4)
    other_model = admitted("not-this-one", "hi", reply, max_tokens=4)
    nowhere = admitted(model, "hi", f"test.missing.{uuid.uuid4().hex[:8]}", max_tokens=4)
    bad_fields = {"v": "1.0", "request_id": "bad-1", "model": model, "reply_topic": reply,
                  "submitted_at": now_ms(), "temperature": "hot"}
    topic = config.topic
    await produce(
        kafka_settings, topic, 1, msgs=[*good, too_long, other_model, nowhere],
        raw=[(b"junk", b"\xc1not msgpack"), (b"bad-1", msgpack.packb(bad_fields))],
    )
    ids = {m.request_id for m in [*good, too_long, other_model]} | {"bad-1"}
    collecting = asyncio.create_task(collect(kafka_settings, reply, ids, timeout_s=60))
    await asyncio.wait([collecting, task], return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), f"the worker stopped early: {task.result()}"
    replies = collecting.result()

    for rid in ids:
        assert len(replies.terminals[rid]) == 1, "exactly one terminal chunk per request"
    for msg, prompt in zip(good, prompts):
        rid = msg.request_id
        [last] = replies.terminals[rid]
        assert last.finish_reason in ("stop", "length")
        assert replies.text(rid) == expected_greedy(tiny_model, prompt, 12)
        assert [c.seq for c in replies.chunks[rid]] == list(range(len(replies.chunks[rid])))
        assert replies.received[rid] == len(replies.chunks[rid]), "no duplicates on a clean run"
        first = replies.chunks[rid][0]
        assert len(first.token_ids) == 1 and first.first_token_at is not None
        assert first.worker_id == config.worker_id and first.warm is True
        assert last.completion_tokens == sum(len(c.token_ids) for c in replies.chunks[rid])
    [long_last] = replies.terminals[too_long.request_id]
    assert (long_last.finish_reason, long_last.error_code) == ("rejected", "prompt_too_long")
    assert replies.terminals[other_model.request_id][0].error_code == "unknown_model"
    [bad] = replies.terminals["bad-1"]
    assert bad.finish_reason == "rejected" and "temperature" in bad.error_message

    letters = await read_all(
        kafka_settings, DEADLETTERS, DeadLetter, lambda d: d.source_topic == topic
    )
    reasons = {d.reason for d in letters}
    assert {"undecodable", "invalid"} <= reasons
    [missing] = [d for d in letters if d.key == nowhere.request_id]
    assert "does not exist" in missing.error, "a reply topic that is missing costs one request"
    assert not task.done(), "bad records must not stop the worker"

    worker.drain()
    assert await asyncio.wait_for(task, 30) == 0
    events = await read_all(
        kafka_settings, LIFECYCLE, LifecycleEvent, lambda e: e.worker_id == config.worker_id
    )
    states = [e.state for e in events if e.kind == "state"]
    assert states == ["starting", "loading", "warming", "ready", "stopped"]
    assert any(e.kind == "heartbeat" and e.total_slots == 4 for e in events)
    done = [rid for e in events for rid in (e.done or ())]
    answered = {m.request_id for m in [*good, too_long, other_model, nowhere]}
    assert sorted(done) == sorted(answered), "each request it answered reported done once"
    spans = {e.span_name for e in events if e.kind == "span"}
    assert {"process", "weights_load", "warm_up", "runtime_ready", "first_token"} <= spans


async def test_a_finished_request_is_reported_early(kafka_settings, tiny_model):
    """Heartbeats every 30 s, but a finished request shows in a heartbeat's `done` within
    done_report_s (plus the time to produce it), not up to 30 s later."""
    model, reply = await _topics(kafka_settings)
    config = _config(model, tiny_model, 0, heartbeat_interval_s=30.0, done_report_s=0.1)
    worker, task = await _ready_worker(config, kafka_settings)
    try:
        msg = admitted(model, "hello", reply, max_tokens=3)
        await produce(kafka_settings, config.topic, 0, msgs=[msg])
        replies = await collect(kafka_settings, reply, {msg.request_id}, timeout_s=60)
        [last] = replies.terminals[msg.request_id]
        await asyncio.sleep(1.0)
        events = await read_all(
            kafka_settings, LIFECYCLE, LifecycleEvent,
            lambda e: e.worker_id == config.worker_id and msg.request_id in (e.done or ()),
        )
    finally:
        worker.drain()
        await asyncio.wait_for(task, 30)
    [reported] = events
    assert reported.kind == "heartbeat"
    assert 0 <= reported.at - last.emitted_at < 1000


def _start_worker_process(model_dir: Path, model: str, worker_id: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "infra.cli", "worker", str(model_dir), "--model", model,
           "--partition", "0", "--worker-id", worker_id, "--chunk-tokens", "1"]
    return subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


async def test_a_killed_worker_leaves_its_request_to_the_next_one(kafka_settings, tiny_model):
    model, reply = await _topics(kafka_settings)
    long_request = admitted(model, "once upon a time", reply, max_tokens=1000)
    first = _start_worker_process(tiny_model, model, "killed-1")
    try:
        await produce(kafka_settings, model_topic(model).name, 0, msgs=[long_request])
        replies = await collect(
            kafka_settings, reply, {long_request.request_id}, 90, until_first=True
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert long_request.request_id not in replies.terminals, "killed before it finished"

    second = _start_worker_process(tiny_model, model, "survivor-2")
    try:
        replies = await collect(kafka_settings, reply, {long_request.request_id}, 120)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.stderr.read().decode()[-2000:]
    rid = long_request.request_id
    assert len(replies.terminals[rid]) == 1
    assembler = replies.assemblers[rid]
    assert assembler.restarts == 1, "the survivor's stream replaced the killed worker's"
    assert {c.worker_id for c in replies.chunks[rid]} == {"survivor-2"}
    assert replies.text(rid) == expected_greedy(tiny_model, "once upon a time", 1000)


async def test_a_second_copy_of_a_request_in_flight_is_not_answered(kafka_settings, tiny_model):
    """A second copy (attempt 2) of a request this worker runs, read while the original
    runs: one stream, one terminal chunk, the full text. A record placed on another worker
    (an earlier worker of the partition; placement re-sends those) gets no answer here."""
    model, reply = await _topics(kafka_settings)
    config = _config(model, tiny_model, 0, max_batch=4, heartbeat_interval_s=0.2,
                     chunk=ChunkPolicy(max_tokens=4, max_delay_ms=20))
    worker, task = await _ready_worker(config, kafka_settings)
    original = admitted(model, "once upon a time", reply, max_tokens=200)
    stale = admitted(model, "once upon a time", reply, max_tokens=8)
    stale = stale.placed_on("w-gone", warm=True, at=now_ms())
    original = original.placed_on(config.worker_id, warm=True, at=now_ms())
    again = original.placed_on(config.worker_id, warm=True, at=now_ms())
    assert again.attempt == 2
    await produce(kafka_settings, config.topic, 0, msgs=[stale, original, again])
    replies = await collect(kafka_settings, reply, {original.request_id}, 60)
    await asyncio.sleep(1.0)  # a second terminal chunk would come right after the first
    replies = await collect(kafka_settings, reply, {original.request_id}, 10)
    worker.drain()
    assert await asyncio.wait_for(task, 30) == 0
    rid = original.request_id
    [last] = replies.terminals[rid]
    assert last.finish_reason == "length"
    assert sum(1 for c in replies.chunks[rid] if c.is_last) == 1
    assert replies.received[rid] == len(replies.chunks[rid]), "nothing sent for the copy"
    assert replies.text(rid) == expected_greedy(tiny_model, "once upon a time", 200)
    stale_chunks = await read_all(
        kafka_settings, reply, TokenChunk, lambda c: c.request_id == stale.request_id
    )
    assert stale_chunks == [], "placed on another worker: not served here"
