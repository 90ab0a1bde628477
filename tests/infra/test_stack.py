"""infra.stack.LocalStack on the real broker: it starts streams + supervisor, serves a request
through them, and leaves no process behind when it stops or fails to start."""

from __future__ import annotations

import asyncio

import os
import urllib.request
from pathlib import Path

import pytest

from aiokafka.admin import AIOKafkaAdminClient

from infra.settings import KafkaSettings
from infra.stack import LocalStack, StackConfig, StackError
from schemas.client import EmberClient
from schemas.topics import model_topic_name

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
SERVED, MISSING = f"stack-{os.getpid()}", f"stack-missing-{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
async def _model_topics(kafka_settings: KafkaSettings):
    yield
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        ours = {model_topic_name(SERVED), model_topic_name(MISSING)}
        names = [t for t in await admin.list_topics() if t in ours]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_request_goes_through_the_stack_and_nothing_is_left(
    kafka_settings: KafkaSettings, tiny_model: Path, tmp_path: Path
) -> None:
    model = SERVED
    config = StackConfig(
        models={model: tiny_model},
        streams_config={"models": {model: {"slots": 4}}},
        prestart=1,
        log_dir=tmp_path,
    )
    stack = LocalStack(config, kafka_settings)
    async with stack:
        assert stack.running()
        with urllib.request.urlopen(stack.web_url + "/ember/health/", timeout=5) as response:
            assert response.status == 200
        async with EmberClient(kafka_settings) as client:
            handle = await client.generate(model, "hello", max_tokens=4, timeout_s=90)
            result = await handle.result()
        assert result.finish_reason in ("stop", "length") and result.warm is False
        assert result.worker_id and result.worker_id.startswith(f"stack-{stack.run_id}-")
        roots = [stack.streams.process.pid, stack.supervisor.process.pid]  # type: ignore[union-attr]
        for _ in range(300):  # the pool's next pre-started process starts after the hand-off
            pids = roots + [pid for c in roots for pid, _ in _descendants(c)]
            if len(pids) >= 4:
                break
            await asyncio.sleep(0.1)
        assert len(pids) >= 4, pids  # streams, supervisor, a worker, a pre-started process
    assert not stack.running()
    assert [pid for pid in pids if _alive(pid)] == []
    stack.stop()  # idempotent


def _descendants(pid: int) -> list[tuple[int, str]]:
    from infra.stack import _descendants as descendants

    return descendants(pid)


async def test_a_component_that_cannot_start_is_reported_with_its_log(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    config = StackConfig(models={MISSING: tmp_path / "missing"}, prestart=0, log_dir=tmp_path)
    stack = LocalStack(config, kafka_settings)
    with pytest.raises(StackError, match="supervisor exited"):
        await stack.start()
    assert not stack.running()
    for c in (stack.streams, stack.supervisor):
        assert c is not None and c.process.poll() is not None
