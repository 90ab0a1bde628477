"""A streams process restarted: what was produced while it was down is still answered (real
broker, the `ember streams` process; streams/faust_app.py, "Start offsets nobody committed").

A fresh group starts each partition at its end. A partition that got no record while the
first process ran had no committed offset, so the next process started at the end again and
skipped what came in between: requests lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from infra.settings import KafkaSettings
from infra.tail import TopicTail
from infra.topics import apply_topics
from schemas import Request, TokenChunk, decode, record_for
from schemas.topics import CONTROL_PARTITIONS, REQUESTS, TopicSpec

ROOT = Path(__file__).resolve().parents[2]
RUN = uuid.uuid4().hex[:8]
GROUP = f"ember-restart-test-{RUN}"
REPLIES = f"ember-test-restart-replies-{RUN}"
MODEL = f"restart-{RUN}"


def _start(kafka: KafkaSettings, tmp: Path, port: int, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "EMBER_MODELS": MODEL,
        "EMBER_STREAMS_GROUP": GROUP,
        "EMBER_STREAMS_STORE": "memory://",
        "EMBER_STREAMS_WEB_PORT": str(port),
        "EMBER_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "EMBER_HOME": str(tmp / "home"),
    }
    with (tmp / f"{name}.log").open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "infra.cli", "streams"], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT)


async def _owns_its_model(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Ready, with the model's partitions assigned (so the group's assignment is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ember streams exited {proc.returncode}"
        try:
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/ember/health/", timeout=2)
                .read()
            )
            if MODEL.encode() in body and b'"ready":true' in body.replace(b" ", b""):
                return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise AssertionError(f"ember streams not ready in {timeout} s")


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def test_requests_sent_while_streams_restarts_are_answered_on_every_partition(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    from tests.streams.test_app_kafka import free_port, request

    await apply_topics(kafka_settings, [TopicSpec(REPLIES, 1)])
    port = free_port()
    first = _start(kafka_settings, tmp_path, port, "first")
    try:
        await _owns_its_model(first, port, 120)
    finally:
        await _stop(first)  # it read nothing: no partition got a record while it ran

    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs(), acks="all")
    await producer.start()
    tail = TopicTail(kafka_settings, [REPLIES], lambda r: decode(TokenChunk, r.value))
    await tail.start()
    second = None
    try:
        sent: list[Request] = []
        for partition in range(CONTROL_PARTITIONS):  # one on each, while no process runs
            req = request(f"no-such-model-{RUN}", reply_topic=REPLIES)
            rec = record_for(req)
            await producer.send_and_wait(REQUESTS, rec.value, key=rec.key, headers=rec.headers,
                                         partition=partition)
            sent.append(req)
        second = _start(kafka_settings, tmp_path, port, "second")
        await _owns_its_model(second, port, 120)
        deadline = time.monotonic() + 30
        wanted = {r.request_id for r in sent}
        while time.monotonic() < deadline and not wanted <= {c.request_id for c in tail.items}:
            await asyncio.sleep(0.2)
        answered = {c.request_id: c.finish_reason for c in tail.items if c.request_id in wanted}
        assert answered == {rid: "rejected" for rid in wanted}  # unknown model, each answered
        committed = await _committed_requests_partitions(kafka_settings)
        assert committed == set(range(CONTROL_PARTITIONS))
    finally:
        await tail.stop()
        await producer.stop()
        if second is not None:
            await _stop(second)


async def _committed_requests_partitions(kafka: KafkaSettings) -> set[int]:
    admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(GROUP)
    finally:
        await admin.close()
    return {tp.partition for tp in offsets if isinstance(tp, TopicPartition)
            and tp.topic == REQUESTS}

