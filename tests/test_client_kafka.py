"""The client SDK and `ember generate` on the real broker, against a worker run in-process on
the tiny model: results equal to the streamed chunks, cancellation, rejection, time-outs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiokafka import AIOKafkaConsumer, TopicPartition

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.worker import Worker, WorkerConfig
from infra.settings import KafkaSettings
from infra.topics import apply_topics
from schemas import Cancel, Request, decode, parse_schema_header
from schemas.client import (
    EmberClient,
    RequestRejected,
    RequestTimeout,
    direct,
)
from schemas.topics import REQUESTS, model_topic

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def greedy(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from gpu_worker.engine import Engine, EngineRequest
    from gpu_worker.sampling import SamplingParams
    from gpu_worker.tokenizer import Tokenizer
    from gpu_worker.weights import load_model

    engine = Engine(load_model(model_dir), Tokenizer.from_dir(model_dir), max_batch=1)
    engine.add_request(EngineRequest("x", prompt=prompt, params=SamplingParams(max_tokens)))
    text = ""
    while engine.has_work():
        text += "".join(out.text for out in engine.step())
    return text


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def worker(kafka_settings: KafkaSettings, tiny_model: Path) -> AsyncIterator[Worker]:
    """A worker on partition 0 of a fresh two-partition model topic (partition 1: nobody)."""
    model = f"tiny-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [model_topic(model, partitions=2)])
    config = WorkerConfig(
        model=model, model_dir=tiny_model, partition=0, worker_id=f"w-{uuid.uuid4().hex[:6]}",
        max_batch=2, chunk=ChunkPolicy(max_tokens=4, max_delay_ms=20), heartbeat_interval_s=0.5,
    )
    w = Worker(config, kafka_settings)
    task = asyncio.create_task(w.run())
    for _ in range(600):
        if w.state == "ready" or task.done():
            break
        await asyncio.sleep(0.1)
    assert w.state == "ready", f"worker did not start: {task.result() if task.done() else w.state}"
    yield w
    w.drain()
    assert await asyncio.wait_for(task, 60) == 0


@pytest_asyncio.fixture(loop_scope="session")
async def client(kafka_settings: KafkaSettings) -> AsyncIterator[EmberClient]:
    """A client with its own reply topic, created at start."""
    async with EmberClient.private(kafka_settings, f"test-{uuid.uuid4().hex[:8]}") as c:
        yield c


async def test_result_text_is_the_streamed_text(client, worker, tiny_model):
    model = worker.config.model
    handle = await client.generate(
        model, "the quick brown fox", max_tokens=24, temperature=0.0, partition=0, timeout_s=120
    )
    deltas = [d async for d in handle.stream()]
    result = await handle.result()
    assert result.text == "".join(d.text for d in deltas)
    assert result.text == greedy(tiny_model, "the quick brown fox", 24)
    assert result.finish_reason in ("stop", "length")
    assert not any(d.restarted for d in deltas) and result.restarts == 0
    assert result.completion_tokens == len(result.token_ids) > 0
    assert result.worker_id == worker.config.worker_id and result.warm is True
    assert result.ttft_ms is not None and 0 <= result.ttft_ms < 120_000
    assert client.pending == 0


async def test_concurrent_requests_share_one_reply_reader(client, worker):
    handles = [
        await client.generate(worker.config.model, f"prompt {i}", max_tokens=8, partition=0,
                              seed=i, timeout_s=120)
        for i in range(4)
    ]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert {r.request_id for r in results} == {h.request_id for h in handles}
    assert all(r.finish_reason in ("stop", "length") for r in results)


async def test_cancel_mid_generation_ends_cancelled_and_frees_the_slot(client, worker):
    model = worker.config.model
    handle = await client.generate(
        model, "once upon a time", max_tokens=1500, temperature=0.0, partition=0, timeout_s=120
    )
    stream = handle.stream()
    first = await anext(stream)
    assert first.token_ids, "generation started"
    await handle.cancel("test")
    rest = [d async for d in stream]
    result = await handle.result()
    assert result.finish_reason == "cancelled"
    assert result.text == first.text + "".join(d.text for d in rest)
    assert result.completion_tokens is not None and result.completion_tokens < 1500
    for _ in range(50):  # the terminal chunk goes out before the worker's bookkeeping ends
        if not worker._in_flight:
            break
        await asyncio.sleep(0.05)
    assert handle.request_id not in worker._in_flight
    assert worker.engine.num_running == 0 and worker.engine.free_slots == worker.config.max_batch

    after = await client.generate(model, "hello", max_tokens=4, partition=0, timeout_s=60)
    assert (await after.result()).finish_reason in ("stop", "length")


async def test_a_prompt_too_long_raises_rejected(client, worker):
    handle = await client.generate(
        worker.config.model, "word " * 5000, max_tokens=4, partition=0, timeout_s=60
    )
    with pytest.raises(RequestRejected) as exc:
        await handle.result()
    assert exc.value.error_code == "prompt_too_long"


async def test_another_model_on_the_partition_raises_rejected(client, worker):
    request = Request(
        request_id=uuid.uuid4().hex, model="not-served-here", prompt="hi",
        submitted_at=int(time.time() * 1000), reply_topic=client.reply_topic,
    )
    handle = await client.submit(direct(request), model_topic(worker.config.model).name, 0)
    with pytest.raises(RequestRejected) as exc:
        [d async for d in handle.stream()]
    assert exc.value.error_code == "unknown_model"


async def test_no_worker_times_out_and_the_cancel_follows_the_request(
    kafka_settings, client, worker
):
    topic = model_topic(worker.config.model).name
    handle = await client.generate(
        worker.config.model, "anyone?", max_tokens=4, partition=1, first_chunk_timeout_s=1.0
    )
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as exc:
        await handle.result()
    assert exc.value.kind == "first_chunk" and 0.9 <= time.monotonic() - started < 10
    records = await read_partition(kafka_settings, topic, 1, handle.request_id, count=2)
    [_, cancel] = records
    assert isinstance(cancel, Cancel) and cancel.reason == "timeout first_chunk"


async def test_a_cancel_to_ember_requests_lands_after_its_request(kafka_settings, client):
    handle = await client.generate("no-such-model-here", "hi", max_tokens=4, timeout_s=30)
    await handle.cancel("changed my mind")
    partitions = await client._producer.partitions_for(REQUESTS)
    found = []
    for p in sorted(partitions):
        found += await read_partition(kafka_settings, REQUESTS, p, handle.request_id, count=0)
    kinds = [type(m).__name__ for m in found]
    assert kinds == ["Request", "Cancel"], "same key: same partition, in order"


async def read_partition(
    kafka: KafkaSettings, topic: str, partition: int, request_id: str, count: int
) -> list:
    """The records about `request_id` on one partition (waits for `count` of them)."""
    consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), enable_auto_commit=False)
    await consumer.start()
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    found: list = []
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            batches = await consumer.getmany(tp, timeout_ms=300)
            if not batches and len(found) >= count:
                return found
            for rec in batches.get(tp, []):
                if rec.key != request_id.encode():
                    continue
                schema = parse_schema_header(rec.headers)
                name = schema.name if schema else ""
                kind = {"cancel": Cancel, "request": Request}.get(name)
                if kind is None:
                    found.append(decode("admitted_request", rec.value))
                else:
                    found.append(decode(kind, rec.value))
    finally:
        await consumer.stop()
    return found


def run_generate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.cli", "--log-level", "WARNING", "generate", *args],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=timeout,
    )


async def test_ember_generate_streams_text_and_reports(worker, tiny_model):
    model = worker.config.model
    done = await asyncio.to_thread(
        run_generate, "--model", model, "hello world", "--max-tokens", "12",
        "--temperature", "0", "--direct-partition", "0", "--timeout", "90",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == greedy(tiny_model, "hello world", 12) + "\n"
    assert "finish=" in done.stderr and "ttft=" in done.stderr and "tokens/s=" in done.stderr

    rejected = await asyncio.to_thread(
        run_generate, "--model", model, "word " * 5000, "--max-tokens", "4",
        "--direct-partition", "0", "--timeout", "60",
    )
    assert rejected.returncode == 3, rejected.stderr[-2000:]
    assert "rejected (prompt_too_long)" in rejected.stderr

    timed_out = await asyncio.to_thread(
        run_generate, "--model", model, "hi", "--direct-partition", "1",
        "--first-chunk-timeout", "1",
    )
    assert timed_out.returncode == 4, timed_out.stderr[-2000:]
    assert "timed out" in timed_out.stderr
