"""`ember streams` on the real broker: admission, dead letters, placement, scale-up, dead workers.

One `ember streams` subprocess serves the module (its own group id, memory store, a web port
of its own); fake workers are lifecycle events this test publishes, so no model runs. Each
test watches the topics it expects output on from their current end (`Tail`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from infra.settings import KafkaSettings
from infra.tail import TopicTail
from infra.topics import apply_topics
from schemas import (
    AdmittedRequest,
    DeadLetter,
    LifecycleEvent,
    Message,
    Request,
    ScaleDecision,
    TokenChunk,
    decode,
    record_for,
)
from schemas.topics import (
    ADMITTED,
    DEADLETTERS,
    DECISIONS,
    LIFECYCLE,
    REQUESTS,
    TopicSpec,
    model_topic_name,
)

from streams.app import model_partition

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
RUN = uuid.uuid4().hex[:8]
GROUP = f"ember-streams-test-{RUN}"
REPLIES = f"ember-test-replies-{RUN}"
WARM, PENDING, DYING, PROBE, FULL = (
    f"st-{RUN}-{x}" for x in ("warm", "pending", "dying", "probe", "full")
)
MODELS = (WARM, PENDING, DYING, PROBE, FULL)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(model: str, **fields: Any) -> Request:
    values: dict[str, Any] = {
        "request_id": f"r-{uuid.uuid4().hex[:12]}",
        "model": model,
        "submitted_at": now_ms(),
        "prompt": "hello there",
        "max_tokens": 8,
        "reply_topic": REPLIES,
    }
    return Request(**(values | fields))


def worker_events(
    worker_id: str, model: str, partition: int, *, slots: int = 4, in_flight: Iterable[str] = ()
) -> list[LifecycleEvent]:
    """A worker that just became ready, then its heartbeat."""
    common: dict[str, Any] = {"worker_id": worker_id, "model": model, "partition": partition}
    return [
        LifecycleEvent(
            **common, kind="state", state="ready", previous_state="warming", at=now_ms()
        ),
        LifecycleEvent(
            **common,
            kind="heartbeat",
            state="ready",
            at=now_ms(),
            free_slots=slots - len(tuple(in_flight)),
            total_slots=slots,
            queued_tokens=0,
            in_flight=tuple(in_flight),
        ),
    ]


@dataclass(frozen=True)
class Seen:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None


class Tail(TopicTail):
    """Every record appended to some topics after `start`, kept as a Seen in `items`."""

    def __init__(self, kafka: KafkaSettings, topics: Iterable[str]) -> None:
        super().__init__(kafka, list(topics), lambda r: Seen(r.topic, r.partition, r.key, r.value))

    @property
    def records(self) -> list[Seen]:
        return self.items

    def decoded(self, cls: type[Message], topic: str) -> list[tuple[Seen, Any]]:
        found = []
        for seen in self.records:
            if seen.topic == topic:
                with contextlib.suppress(Exception):
                    found.append((seen, decode(cls, seen.value)))
        return found

    async def wait_for(
        self, cls: type[Message], topic: str, match: Callable[[Any], bool], timeout: float = 30
    ) -> tuple[Seen, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for seen, msg in self.decoded(cls, topic):
                if match(msg):
                    return seen, msg
            await asyncio.sleep(0.05)
        raise AssertionError(f"no matching {cls.__name__} on {topic} within {timeout} s")


@dataclass
class Streams:
    kafka: KafkaSettings
    producer: AIOKafkaProducer
    web: str
    log: Path

    async def send(self, msg: Message, topic: str | None = None) -> None:
        rec = record_for(msg, topic)
        await self.producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)

    async def send_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        await self.producer.send_and_wait(topic, value, key=key)

    @contextlib.asynccontextmanager
    async def tail(self, *topics: str) -> AsyncIterator[Tail]:
        tail = Tail(self.kafka, topics)
        await tail.start()
        try:
            yield tail
        finally:
            await tail.stop()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.web + path, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


def _config(path: Path) -> Path:
    placement = {"dead_after_s": 120.0, "unseen_done_after_s": 60.0}
    models = {m: {"slots": 4, "placement": placement} for m in MODELS}
    models[DYING] = {"slots": 4, "placement": {**placement, "dead_after_s": 3.0}}
    models[FULL] = {"slots": 4, "admission": {"queue_bounds": {"interactive": 8, "batch": 0}}}
    admission = {"defer_s": 1.0, "max_defer_s": 2.9}
    path.write_text(json.dumps({"models": models, "admission": admission}))
    return path


async def _wait_ready(streams: Streams, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ember streams exited {proc.returncode}:\n{_tail(streams.log)}")
        status, _ = await asyncio.to_thread(_safe_get, streams)
        if status == 200:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"ember streams not ready in {timeout} s:\n{_tail(streams.log)}")


def _safe_get(streams: Streams) -> tuple[int, bytes]:
    try:
        return streams.get("/ember/health/")
    except OSError:
        return 0, b""


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def _probe(streams: Streams) -> None:
    """Wait until the app's consumers read from the end: an unknown model's request gets its
    `rejected` chunk, and a probe model's request reaches a probe worker (placement reads
    ember.admitted and ember.lifecycle)."""
    async with streams.tail(REPLIES, model_topic_name(PROBE)) as tail:
        deadline = time.monotonic() + 60
        while True:
            req = request(f"nope-{RUN}")
            await streams.send(req)
            try:
                await tail.wait_for(
                    TokenChunk, REPLIES, lambda c: c.request_id == req.request_id, 3
                )
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
        for event in worker_events(f"probe-{RUN}", PROBE, 0):
            await streams.send(event, LIFECYCLE)
        while True:
            req = request(PROBE)
            await streams.send(req)
            try:
                await tail.wait_for(
                    AdmittedRequest, model_topic_name(PROBE),
                    lambda a: a.request_id == req.request_id, 3,
                )
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                for event in worker_events(f"probe-{RUN}", PROBE, 0):
                    await streams.send(event, LIFECYCLE)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def streams(
    kafka_settings: KafkaSettings, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Streams]:
    await apply_topics(kafka_settings, [TopicSpec(REPLIES, 1)])
    tmp = tmp_path_factory.mktemp("streams")
    port = free_port()
    env = {
        **os.environ,
        "EMBER_MODELS": ",".join(MODELS),
        "EMBER_STREAMS_CONFIG": str(_config(tmp / "streams.json")),
        "EMBER_STREAMS_GROUP": GROUP,
        "EMBER_STREAMS_STORE": "memory://",
        "EMBER_STREAMS_WEB_PORT": str(port),
        "EMBER_STREAMS_TICK_S": "0.5",
        "EMBER_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "EMBER_HOME": str(tmp / "fresh" / "home"),  # not there yet: streams creates it
    }
    log = tmp / "streams.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "streams"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs(), acks="all", linger_ms=0)
    await producer.start()
    handle = Streams(kafka_settings, producer, f"http://127.0.0.1:{port}", log)
    try:
        await _wait_ready(handle, proc, timeout=120)
        await _probe(handle)
        yield handle
    finally:
        await producer.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        await _delete_topics(kafka_settings)


async def _delete_topics(kafka: KafkaSettings) -> None:
    """The topics this module made: its reply and model topics, the app's own ones."""
    admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs())
    await admin.start()
    try:
        ours = {REPLIES, *(model_topic_name(m) for m in MODELS)}
        names = [t for t in await admin.list_topics() if t in ours or t.startswith(GROUP)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


# --- admission ------------------------------------------------------------------------------


async def test_valid_request_is_admitted_keyed_by_model(streams: Streams) -> None:
    req = request(WARM, latency_class="batch", prompt="x" * 100)
    async with streams.tail(ADMITTED) as tail:
        await streams.send(req)
        seen, admitted = await tail.wait_for(
            AdmittedRequest, ADMITTED, lambda a: a.request_id == req.request_id
        )
    assert seen.key == WARM.encode()
    assert admitted.request == req
    assert admitted.latency_class == "batch"
    assert admitted.prompt_tokens == 25 and admitted.prompt_bucket == 32
    assert admitted.worker_id is None and admitted.attempt == 1


async def test_garbage_is_dead_lettered(streams: Streams) -> None:
    async with streams.tail(DEADLETTERS) as tail:
        await streams.send_raw(REQUESTS, b"garbage-" + RUN.encode(), b"\xc1\xff not msgpack")
        _, letter = await tail.wait_for(
            DeadLetter, DEADLETTERS, lambda d: d.key == f"garbage-{RUN}"
        )
    assert letter.reason == "undecodable"
    assert letter.source_topic == REQUESTS
    assert letter.component == "admission"
    assert letter.value_bytes == b"\xc1\xff not msgpack"


async def test_invalid_request_gets_dead_letter_and_rejected_chunk(streams: Streams) -> None:
    rid = f"bad-{uuid.uuid4().hex[:8]}"
    value = msgpack.packb(
        {"v": "1.0", "request_id": rid, "model": WARM, "submitted_at": now_ms(),
         "prompt": "hi", "max_tokens": -5, "reply_topic": REPLIES}
    )
    async with streams.tail(DEADLETTERS, REPLIES) as tail:
        await streams.send_raw(REQUESTS, rid.encode(), value)
        _, letter = await tail.wait_for(DeadLetter, DEADLETTERS, lambda d: d.key == rid)
        _, chunk = await tail.wait_for(TokenChunk, REPLIES, lambda c: c.request_id == rid)
    assert letter.reason == "invalid"
    assert any(p.path == "max_tokens" for p in letter.problems)
    assert chunk.finish_reason == "rejected" and chunk.error_code == "invalid_request"
    assert "max_tokens" in (chunk.error_message or "")


async def test_unknown_model_is_rejected_with_its_code(streams: Streams) -> None:
    req = request(f"no-such-model-{RUN}")
    async with streams.tail(REPLIES) as tail:
        await streams.send(req)
        _, chunk = await tail.wait_for(
            TokenChunk, REPLIES, lambda c: c.request_id == req.request_id
        )
    assert chunk.finish_reason == "rejected"
    assert chunk.error_code == "unknown_model"
    assert chunk.seq == 0 and chunk.worker_id is None


async def test_batch_under_pressure_is_deferred_then_rejected_after_max_defer(
    streams: Streams,
) -> None:
    """FULL takes no batch requests (bound 0): each try is deferred 1 s through the app's own
    delay topic (created by Faust) until max_defer_s (2.9 s) is spent. The request is made once
    the tail listens: its clock starts at `submitted_at`, and the second try has 0.9 s to spare."""
    deferred = f"{GROUP}-deferred"
    async with streams.tail(REPLIES, deferred) as tail:
        req = request(FULL, latency_class="batch")
        await streams.send(req)
        _, chunk = await tail.wait_for(
            TokenChunk, REPLIES, lambda c: c.request_id == req.request_id, timeout=30
        )
        key = req.request_id.encode()
        retries = [s for s in tail.records if s.topic == deferred and s.key == key]
    assert chunk.finish_reason == "rejected" and chunk.error_code == "overloaded"
    assert len(retries) == 2  # deferred at 0 s and 1 s; at 2 s the next retry would pass 2.9 s
    assert chunk.emitted_at - req.submitted_at >= 2_000


async def test_a_reply_topic_that_does_not_exist_never_stalls_admission(
    streams: Streams,
) -> None:
    lost = request(f"no-such-model-{RUN}", reply_topic=f"ember-test-nowhere-{RUN}")
    req = request(WARM)
    async with streams.tail(ADMITTED) as tail:
        await streams.send(lost)  # its rejection has nowhere to go
        await streams.send(req)
        # well inside the 5 s a first send to an unknown topic may wait in the background
        await tail.wait_for(AdmittedRequest, ADMITTED, lambda a: a.request_id == req.request_id, 4)


async def test_faust_created_its_own_topics(streams: Streams) -> None:
    admin = AIOKafkaAdminClient(**streams.kafka.aiokafka_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if t.startswith(GROUP)]
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    partitions = {d["topic"]: len(d["partitions"]) for d in described}
    for table in ("placement", "placement-requests", "queue-depth", "warm-pool", "arrivals",
                  "hour-of-day", "autoscaler"):
        assert partitions[f"{GROUP}-{table}-changelog"] == 4
    assert partitions[f"{GROUP}-model-load-changelog"] == 1
    assert partitions[f"{GROUP}-deferred"] == 4


# --- placement ------------------------------------------------------------------------------


async def test_request_lands_on_the_ready_workers_partition_warm(streams: Streams) -> None:
    for event in worker_events(f"w-{RUN}", WARM, partition=3):
        await streams.send(event, LIFECYCLE)
    await asyncio.sleep(1.0)  # placement reads lifecycle and admitted independently
    req = request(WARM)
    changelog = f"{GROUP}-placement-requests-changelog"
    async with streams.tail(model_topic_name(WARM), changelog) as tail:
        await streams.send(req)
        seen, placed = await tail.wait_for(
            AdmittedRequest, model_topic_name(WARM), lambda a: a.request_id == req.request_id
        )
        row_key = json.dumps(req.request_id).encode()  # Faust's json key
        deadline = time.monotonic() + 10
        rows = []
        while not rows and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            rows = [r for r in tail.records if r.topic == changelog and r.key == row_key]
    assert seen.partition == 3
    assert seen.key == req.request_id.encode()
    assert placed.worker_id == f"w-{RUN}"
    assert placed.warm is True
    assert placed.placed_at is not None and placed.placed_at >= placed.admitted_at
    # its row, in flight, on the table's changelog (recovery reads it back)
    assert rows, f"no row of {req.request_id} on {changelog}"
    assert rows[0].partition == model_partition(WARM)
    row = msgpack.unpackb(rows[0].value)
    assert row["status"] == "in_flight" and row["model"] == WARM
    assert decode(AdmittedRequest, row["request"]).worker_id == f"w-{RUN}"


async def test_pending_request_scales_up_then_drains_cold(streams: Streams) -> None:
    topic = model_topic_name(PENDING)
    req = request(PENDING)
    async with streams.tail(DECISIONS, topic) as tail:
        await streams.send(req)
        seen, decision = await tail.wait_for(
            ScaleDecision, DECISIONS, lambda d: d.model == PENDING and d.action == "scale_up"
        )
        assert seen.key == PENDING.encode()
        assert decision.count >= 1
        assert decision.reason and decision.policy == "ember_predictive"
        assert decision.inputs["pending_interactive"] == 1
        assert not tail.decoded(AdmittedRequest, topic)  # nobody to place it on yet

        status, body = await asyncio.to_thread(streams.get, f"/ember/models/?model={PENDING}")
        assert status == 200
        view = json.loads(body)["models"][PENDING]
        assert view["queue"]["pending"]["interactive"] == 1
        assert view["autoscaler"]["last"]["action"] in ("scale_up", "hold")

        for event in worker_events(f"late-{RUN}", PENDING, partition=5):
            await streams.send(event, LIFECYCLE)
        seen, placed = await tail.wait_for(
            AdmittedRequest, topic, lambda a: a.request_id == req.request_id
        )
    assert seen.partition == 5
    assert placed.worker_id == f"late-{RUN}"
    assert placed.warm is False


async def test_requests_of_a_silent_worker_are_replaced_on_another(streams: Streams) -> None:
    topic = model_topic_name(DYING)
    first, second = f"first-{RUN}", f"second-{RUN}"
    for event in worker_events(first, DYING, partition=1):
        await streams.send(event, LIFECYCLE)
    await asyncio.sleep(1.0)
    req = request(DYING)
    async with streams.tail(topic, DECISIONS) as tail:
        await streams.send(req)
        seen, placed = await tail.wait_for(
            AdmittedRequest, topic, lambda a: a.request_id == req.request_id
        )
        assert (seen.partition, placed.worker_id) == (1, first)

        async def heartbeats() -> None:  # the second worker stays alive, the first is silent
            while True:
                for event in worker_events(second, DYING, partition=2):
                    await streams.send(event, LIFECYCLE)
                await asyncio.sleep(1.0)

        beating = asyncio.create_task(heartbeats())
        try:
            seen, again = await tail.wait_for(
                AdmittedRequest, topic,
                lambda a: a.request_id == req.request_id and a.worker_id == second,
            )
            _, release = await tail.wait_for(
                ScaleDecision, DECISIONS,
                lambda d: d.model == DYING and d.action == "release" and d.worker_id == first,
            )
        finally:
            beating.cancel()
    assert seen.partition == 2
    assert again.attempt == 2 and again.previous_workers == (first,)
    assert release.policy == "placement"


# --- tables over HTTP -----------------------------------------------------------------------


async def test_models_json_and_prometheus_metrics(streams: Streams) -> None:
    status, body = await asyncio.to_thread(streams.get, "/ember/models/")
    assert status == 200
    views = json.loads(body)["models"]
    assert set(views) == set(MODELS)
    warm = views[WARM]
    assert warm["warm_pool"]["by_state"].get("ready") == 1
    assert warm["totals"]["warm"] >= 1
    assert warm["hit_rate"]["ratio"] is None or 0 <= warm["hit_rate"]["ratio"] <= 1

    status, body = await asyncio.to_thread(streams.get, "/metrics")
    assert status == 200
    text = body.decode()
    assert "# TYPE ember_pending_requests gauge" in text
    assert f'ember_workers{{model="{WARM}",state="ready"}} 1' in text
    assert f'ember_requests_warm_total{{model="{WARM}"}}' in text
    assert 'ember_dead_letters_total{component="admission",reason="undecodable"}' in text
