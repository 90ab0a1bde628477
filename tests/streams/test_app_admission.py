"""The admission agents through Faust's test context: what each request record turns into.

The agents' sends are captured (no broker); the admission state is a fresh one per test
with a catalog of its own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from schemas import (
    AdmittedRequest,
    Cancel,
    DeadLetter,
    Request,
    TokenChunk,
    decode,
    encode,
)
from schemas.topics import ADMITTED, DEADLETTERS, REPLIES
from streams.agents import admission as admission_module
from streams.agents.admission import Admission, admission, retry_at, retry_deferred
from streams.agents.outbox import Consumed, Out
from streams.app import RETRY_AT_HEADER, model_partition
from streams.policy import AdmissionSpec, ModelAdmission, ModelLoad
from streams.tables import load_row_due

DEFERRED = "test-deferred"


def request(**fields: Any) -> Request:
    values: dict[str, Any] = {
        "request_id": "r-1",
        "model": "tiny",
        "submitted_at": 1_000,
        "prompt": "hello",
    }
    return Request(**(values | fields))


class Loads:
    """What the model-load table holds, by model."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def set(self, model: str, at: int, **queued: int) -> None:
        self.rows[model] = {**ModelLoad(queued=queued, ready_slots=8).to_dict(), "at": at}


@pytest.fixture
def loads() -> Loads:
    return Loads()


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch, loads: Loads) -> Iterator[list[Out]]:
    spec = AdmissionSpec(
        models={"tiny": ModelAdmission(context_tokens=512, queue_bounds={"interactive": 4,
                                                                         "batch": 2, "eval": 2})},
        defer_s=5.0,
    )
    monkeypatch.setattr(admission_module, "ADMISSION", Admission(spec, DEFERRED, loads.rows.get))
    outs: list[Out] = []

    async def capture(records: Any) -> None:
        outs.extend(records)

    monkeypatch.setattr(admission_module, "send_all", capture)
    yield outs


@pytest_asyncio.fixture
async def agent(sent: list[Out]) -> AsyncIterator[Any]:
    async with admission.test_context() as tested:
        yield tested


def only(outs: list[Out], topic: str) -> list[Out]:
    return [o for o in outs if o.topic == topic]


async def test_a_valid_request_is_admitted_keyed_by_model(agent: Any, sent: list[Out]) -> None:
    req = request(latency_class="batch", prompt_token_ids=tuple(range(40)), prompt=None)
    await agent.put(value=encode(req), key=b"r-1")
    [admitted] = sent
    # the model's partition, as Kafka's default partitioner puts its key
    partition = model_partition("tiny")
    assert (admitted.topic, admitted.key, admitted.partition) == (ADMITTED, b"tiny", partition)
    assert dict(admitted.headers)["ember-schema"] == b"admitted_request/1.0"
    msg = decode(AdmittedRequest, admitted.value)
    assert msg.request == req
    assert (msg.latency_class, msg.prompt_tokens, msg.prompt_bucket) == ("batch", 40, 64)
    assert msg.worker_id is None


async def test_undecodable_bytes_become_a_dead_letter_only(agent: Any, sent: list[Out]) -> None:
    await agent.put(value=b"\xc1 not msgpack", key=b"k-1")
    [letter] = sent
    dead = decode(DeadLetter, letter.value)
    assert letter.topic == DEADLETTERS and letter.key == b"k-1"
    assert (dead.reason, dead.component, dead.source_topic) == (
        "undecodable", "admission", "ember.requests"
    )
    assert dead.value_bytes == b"\xc1 not msgpack"


async def test_an_invalid_request_also_gets_a_rejected_chunk(agent: Any, sent: list[Out]) -> None:
    value = msgpack.packb(
        {"v": "1.0", "request_id": "r-9", "model": "tiny", "submitted_at": 5, "prompt": "x",
         "temperature": -1.0, "reply_topic": "my-replies"}
    )
    await agent.put(value=value, key=b"r-9")
    letter, reply = sent
    assert decode(DeadLetter, letter.value).reason == "invalid"
    chunk = decode(TokenChunk, reply.value)
    assert (reply.topic, reply.key) == ("my-replies", b"r-9")
    assert (chunk.finish_reason, chunk.error_code, chunk.submitted_at) == (
        "rejected", "invalid_request", 5
    )
    assert "temperature" in (chunk.error_message or "")


async def test_a_missing_key_is_a_bad_key(agent: Any, sent: list[Out]) -> None:
    await agent.put(value=encode(request()), key=None)
    letter, reply = sent
    assert decode(DeadLetter, letter.value).reason == "bad_key"
    assert decode(TokenChunk, reply.value).error_code == "invalid_request"


async def test_unknown_model_is_rejected_on_the_reply_topic(agent: Any, sent: list[Out]) -> None:
    await agent.put(value=encode(request(model="llama-70b")), key=b"r-1")
    [reply] = sent
    chunk = decode(TokenChunk, reply.value)
    assert reply.topic == REPLIES
    assert (chunk.finish_reason, chunk.error_code) == ("rejected", "unknown_model")
    assert "llama-70b" in (chunk.error_message or "")


async def test_a_full_interactive_queue_rejects_overloaded(
    agent: Any, sent: list[Out], loads: Loads
) -> None:
    loads.set("tiny", at=1, interactive=4)
    await agent.put(value=encode(request()), key=b"r-1")
    assert decode(TokenChunk, sent[0].value).error_code == "overloaded"


async def test_batch_under_pressure_is_deferred_unchanged_with_its_retry_time(
    agent: Any, sent: list[Out], loads: Loads
) -> None:
    loads.set("tiny", at=1, batch=2)
    req = request(latency_class="batch", submitted_at=time.time_ns() // 1_000_000)
    value = encode(req)
    await agent.put(value=value, key=b"r-1", headers=[("ember-schema", b"request/1.0")])
    [deferred] = sent
    assert (deferred.topic, deferred.key, deferred.value) == (DEFERRED, b"r-1", value)
    headers = dict(deferred.headers)
    assert headers["ember-schema"] == b"request/1.0"
    assert retry_at(deferred.headers) == int(headers[RETRY_AT_HEADER]) > req.submitted_at


async def test_a_crashing_step_dead_letters_and_the_agent_goes_on(
    agent: Any, sent: list[Out], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("policy bug")

    real_admit = admission_module.admit
    monkeypatch.setattr(admission_module, "admit", broken)
    await agent.put(value=encode(request(request_id="r-a")), key=b"r-a")
    letter, reply = sent
    assert decode(DeadLetter, letter.value).reason == "processing_failed"
    chunk = decode(TokenChunk, reply.value)
    assert (chunk.request_id, chunk.error_code) == ("r-a", "internal_error")
    monkeypatch.setattr(admission_module, "admit", real_admit)  # the agent is still there
    await agent.put(value=encode(request(request_id="r-b")), key=b"r-b")
    assert sent[-1].topic == ADMITTED


async def test_the_retry_agent_admits_a_due_deferred_request(sent: list[Out]) -> None:
    req = request(latency_class="batch")
    async with retry_deferred.test_context() as agent:
        await agent.put(value=encode(req), key=b"r-1", headers=[(RETRY_AT_HEADER, b"0")])
    [admitted] = sent
    assert admitted.topic == ADMITTED
    assert decode(AdmittedRequest, admitted.value).request == req


def test_a_refreshed_load_replaces_the_counted_one(loads: Loads) -> None:
    spec = AdmissionSpec(models={"tiny": ModelAdmission(queue_bounds={"interactive": 2})})
    adm = Admission(spec, DEFERRED, loads.rows.get)
    record = Consumed("ember.requests", 0, 0, b"r", encode(request()))
    assert adm.step(record, 2_000)[0].topic == ADMITTED  # counted: 1 queued
    assert adm.step(record, 2_000)[0].topic == ADMITTED  # counted: 2 queued
    assert decode(TokenChunk, adm.step(record, 2_000)[0].value).error_code == "overloaded"
    loads.set("tiny", at=3_000, interactive=0)  # placement drained the queue
    assert adm.step(record, 3_000)[0].topic == ADMITTED


def test_retry_at_reads_the_header_or_says_now() -> None:
    assert retry_at([(RETRY_AT_HEADER, b"1234")]) == 1234
    assert retry_at({RETRY_AT_HEADER: b"99"}) == 99
    assert retry_at([(RETRY_AT_HEADER, b"soon")]) == 0
    assert retry_at(None) == 0


# --- cancels (docs/PROTOCOL.md §5.3) --------------------------------------------------------


def cancel_of(req: Request) -> Cancel:
    return Cancel(request_id=req.request_id, model=req.model, reply_topic=req.reply_topic,
                  cancelled_at=req.submitted_at + 5, reason="client timeout")


@pytest.mark.parametrize("with_header", [True, False])
async def test_a_cancel_is_forwarded_unchanged_keyed_by_model(
    agent: Any, sent: list[Out], with_header: bool
) -> None:
    value = encode(cancel_of(request()))
    headers = [("ember-schema", b"cancel/1.0")] if with_header else None
    await agent.put(value=value, key=b"r-1", headers=headers)
    [forwarded] = sent
    assert (forwarded.topic, forwarded.key, forwarded.value) == (ADMITTED, b"tiny", value)
    assert dict(forwarded.headers)["ember-schema"] == b"cancel/1.0"


def test_a_deferred_request_that_was_cancelled_is_answered_when_it_returns(
    loads: Loads,
) -> None:
    spec = AdmissionSpec(models={"tiny": ModelAdmission(queue_bounds={"batch": 1})})
    adm = Admission(spec, DEFERRED, loads.rows.get)
    loads.set("tiny", at=1, batch=1)
    now = time.time_ns() // 1_000_000
    req = request(latency_class="batch", submitted_at=now)
    [deferred] = adm.step(Consumed("ember.requests", 0, 0, b"r-1", encode(req)), now)
    assert deferred.topic == DEFERRED
    [forwarded] = adm.step(Consumed("ember.requests", 0, 1, b"r-1", encode(cancel_of(req))), now)
    assert forwarded.topic == ADMITTED
    back = Consumed(DEFERRED, 0, 0, b"r-1", deferred.value, deferred.headers)
    [reply] = adm.step(back, now + 5_000)
    chunk = decode(TokenChunk, reply.value)
    assert (reply.topic, chunk.finish_reason, chunk.seq) == (REPLIES, "cancelled", 0)
    assert "client timeout" in (chunk.error_message or "")
    loads.set("tiny", at=2, batch=0)  # with room again, the next batch request is admitted
    other = request(request_id="r-2", latency_class="batch", submitted_at=now)
    [admitted] = adm.step(Consumed("ember.requests", 0, 2, b"r-2", encode(other)), now)
    assert admitted.topic == ADMITTED


async def test_a_newer_load_row_with_the_same_load_resets_admissions_own_count(
    agent: Any, sent: list[Out], loads: Loads
) -> None:
    """Between two rows admission counts its own admissions; a newer row with the same load
    (placement placed and finished them within a tick) brings the count back to the row."""
    loads.set("tiny", at=1, interactive=0)
    for i in range(4):
        await agent.put(value=encode(request(request_id=f"r-{i}")), key=f"r-{i}".encode())
    await agent.put(value=encode(request(request_id="r-4")), key=b"r-4")
    assert decode(TokenChunk, sent[-1].value).error_code == "overloaded"
    loads.set("tiny", at=2_000, interactive=0)  # same load, written again a second later
    await agent.put(value=encode(request(request_id="r-5")), key=b"r-5")
    assert sent[-1].topic == ADMITTED


def test_the_model_load_row_is_rewritten_when_it_changes_or_a_second_old() -> None:
    load = ModelLoad(queued={"interactive": 0}, ready_slots=8).to_dict()
    row = {**load, "at": 5_000}
    assert load_row_due(None, load, 5_000)
    assert not load_row_due(row, load, 5_500)
    assert load_row_due(row, load, 6_000)
    changed = ModelLoad(queued={"interactive": 1}, ready_slots=8).to_dict()
    assert load_row_due(row, changed, 5_001)
