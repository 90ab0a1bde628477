"""Placement and autoscaler agents: records in, records out, state kept in (and rebuilt from)
its table rows. Tables are plain dicts here; the placement agent runs in Faust's test context.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from schemas import (
    AdmittedRequest,
    Cancel,
    LifecycleEvent,
    Request,
    ScaleDecision,
    TokenChunk,
    decode,
    encode,
    record_for,
)
from schemas.topics import ADMITTED, DEADLETTERS, DECISIONS, LIFECYCLE, model_topic_name
from streams.agents import placement as placement_module
from streams.agents.autoscaler import Autoscaler
from streams.agents.outbox import Consumed, Out, safely
from streams.agents.placement import Placer, placement
from streams.app import model_partition
from streams.policy import (
    AlwaysOnPolicy,
    EmberPolicy,
    Observation,
    PlacementSpec,
    ScalingSpec,
    WorkerSnapshot,
)
from streams.tables import IN_FLIGHT, PENDING, PlacementStore

MODEL = "tiny"
TOPIC = model_topic_name(MODEL)
T0 = 1_764_403_200_000


def admitted(rid: str, cls: str = "interactive", at: int = T0) -> AdmittedRequest:
    req = Request(request_id=rid, model=MODEL, submitted_at=at, prompt="hi", latency_class=cls)
    return AdmittedRequest(
        request=req, latency_class=cls, prompt_tokens=1, prompt_bucket=16, admitted_at=at
    )


def ready(
    worker: str, partition: int, at: int, slots: int = 2, busy: tuple[str, ...] = ()
) -> list[LifecycleEvent]:
    common: dict[str, Any] = {"worker_id": worker, "model": MODEL, "partition": partition}
    return [
        LifecycleEvent(**common, kind="state", state="ready", previous_state="warming", at=at),
        LifecycleEvent(**common, kind="heartbeat", state="ready", at=at + 1,
                       free_slots=slots - len(busy), total_slots=slots, queued_tokens=0,
                       in_flight=busy),
    ]


def consumed(msg: Any, topic: str, offset: int = 0) -> Consumed:
    rec = record_for(msg, topic)
    return Consumed(topic, model_partition(MODEL), offset, rec.key, rec.value, rec.headers)


class Tables:
    """The `placement` and `placement-requests` tables, as dicts."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}

    def placer(self, **spec: Any) -> Placer:
        specs = {MODEL: PlacementSpec(MODEL, **spec)}
        return Placer(specs, PlacementStore(self.head, self.requests))


@pytest.fixture
def tables() -> Tables:
    return Tables()


def feed(placer: Placer, *msgs: Any, at: int = T0) -> list[Out]:
    outs: list[Out] = []
    for msg in msgs:
        topic = LIFECYCLE if isinstance(msg, LifecycleEvent) else ADMITTED
        outs += placer.on_record(consumed(msg, topic), at)
    return outs


def placed(outs: list[Out]) -> list[tuple[int | None, AdmittedRequest]]:
    return [(o.partition, decode(AdmittedRequest, o.value)) for o in outs if o.topic == TOPIC]


def test_a_request_goes_to_the_ready_workers_partition_warm(tables: Tables) -> None:
    placer = tables.placer()
    assert feed(placer, *ready("w-1", 5, T0)) == []
    outs = feed(placer, admitted("r-1"), at=T0 + 10)
    [(partition, request)] = placed(outs)
    assert partition == 5
    assert (request.worker_id, request.warm, request.placed_at) == ("w-1", True, T0 + 10)
    assert outs[0].key == b"r-1"
    row = tables.requests["r-1"]
    assert (row["status"], row["model"]) == (IN_FLIGHT, MODEL)
    assert row["request"] == outs[0].value  # the bytes sent, also kept for recovery
    assert tables.head[MODEL]["workers"]["w-1"]["state"] == "ready"


def test_without_a_worker_it_waits_then_drains_cold(tables: Tables) -> None:
    placer = tables.placer()
    assert feed(placer, admitted("r-1"), admitted("r-2", "batch")) == []
    assert {r: row["status"] for r, row in tables.requests.items()} == {
        "r-1": PENDING, "r-2": PENDING
    }
    outs = feed(placer, *ready("w-1", 2, T0 + 100), at=T0 + 100)
    assert [(p, r.request_id, r.warm) for p, r in placed(outs)] == [
        (2, "r-1", False), (2, "r-2", False)
    ]
    assert all(row["status"] == IN_FLIGHT for row in tables.requests.values())


def test_a_worker_joining_is_written_at_once_load_changes_on_the_tick(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 4, T0))
    assert tables.head[MODEL]["workers"]["w-1"]["partition"] == 4
    feed(placer, admitted("r-1"))
    assert tables.head[MODEL]["arrivals_total"] == 0
    placer.tick(MODEL, T0 + 100)
    assert tables.head[MODEL]["arrivals_total"] == 1


def test_admissions_own_messages_are_not_decoded_again(
    tables: Tables, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streams.agents.outbox import MEMO

    placer = tables.placer()
    feed(placer, *ready("w-1", 0, T0))
    req = admitted("r-1")
    record = consumed(req, ADMITTED)
    MEMO.remember(record.value, req)
    monkeypatch.setattr(placement_module, "decode", _no_decode)
    [(partition, placed_req)] = placed(placer.on_record(record, T0))
    assert placed_req.request == req.request


def _no_decode(*args: Any) -> Any:
    raise AssertionError("decoded although admission had the message")


def test_a_redelivered_request_is_placed_once(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 0, T0))
    assert len(placed(feed(placer, admitted("r-1"), admitted("r-1")))) == 1


def test_state_is_rebuilt_from_the_rows_after_a_restart(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 0, T0, slots=1))
    feed(placer, admitted("r-1"), admitted("r-2"), admitted("r-3", "batch", T0 + 1),
         admitted("r-4", "batch", T0 + 2))
    before = placer.store.get(MODEL)
    placer.store.flush(MODEL)  # the tick writes counters; workers were written at once

    restarted = tables.placer()
    after = restarted.store.get(MODEL)
    assert after.workers == before.workers  # `assigned` rebuilt from the in-flight rows
    assert after.in_flight.keys() == before.in_flight.keys() == {"r-1"}
    assert [r.request_id for r in after.queued("interactive")] == ["r-2"]
    assert [r.request_id for r in after.queued("batch")] == ["r-3", "r-4"]
    assert (after.arrivals_total, after.warm_total, after.cold_total) == (4, 1, 3)


def test_finished_requests_leave_the_table(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 0, T0), admitted("r-1"))
    assert "r-1" in tables.requests
    feed(placer, *ready("w-1", 0, T0 + 1000, busy=("r-1",)), at=T0 + 1000)  # seen running
    feed(placer, *ready("w-1", 0, T0 + 2000), at=T0 + 2000)  # no longer listed: done
    assert tables.requests == {}
    assert tables.head[MODEL]["completed_total"] == 0  # load and counters: on the tick
    placer.tick(MODEL, T0 + 2500)
    assert tables.head[MODEL]["completed_total"] == 1


def test_a_silent_workers_requests_move_and_it_is_released(tables: Tables) -> None:
    placer = tables.placer(dead_after_s=5.0)
    feed(placer, *ready("w-1", 1, T0), admitted("r-1"))
    feed(placer, *ready("w-2", 2, T0 + 4000), at=T0 + 4000)
    state, outs = placer.tick(MODEL, T0 + 6000)
    [(partition, request)] = placed(outs)
    assert (partition, request.worker_id, request.attempt) == (2, "w-2", 2)
    assert request.previous_workers == ("w-1",)
    [release] = [decode(ScaleDecision, o.value) for o in outs if o.topic == DECISIONS]
    assert (release.action, release.worker_id, release.policy) == ("release", "w-1", "placement")
    assert "w-1" not in state.workers


def test_a_request_out_of_attempts_fails_on_its_reply_topic(tables: Tables) -> None:
    placer = tables.placer(dead_after_s=5.0, max_attempts=1)
    feed(placer, *ready("w-1", 1, T0), admitted("r-1"))
    _, outs = placer.tick(MODEL, T0 + 6000)
    [chunk] = [decode(TokenChunk, o.value) for o in outs if o.topic == "ember.replies"]
    assert (chunk.request_id, chunk.finish_reason, chunk.error_code) == (
        "r-1", "error", "worker_failed"
    )
    assert tables.requests == {}


def test_other_models_workers_are_ignored_and_their_requests_refused(tables: Tables) -> None:
    placer = tables.placer()
    stranger = LifecycleEvent(worker_id="x", model="other", kind="state", state="ready", at=T0)
    assert placer.on_record(consumed(stranger, LIFECYCLE), T0) == []
    req = Request(request_id="r-9", model="other", submitted_at=T0, prompt="hi")
    other = AdmittedRequest(request=req, latency_class="interactive", prompt_tokens=1,
                            prompt_bucket=16, admitted_at=T0)
    [out] = placer.on_record(consumed(other, ADMITTED), T0)
    assert decode(TokenChunk, out.value).error_code == "unknown_model"


@pytest.fixture
def agent_outs(monkeypatch: pytest.MonkeyPatch, tables: Tables) -> Iterator[list[Out]]:
    monkeypatch.setattr(placement_module, "PLACER", tables.placer())
    outs: list[Out] = []

    async def capture(records: Any) -> None:
        outs.extend(records)

    monkeypatch.setattr(placement_module, "send_all", capture)
    yield outs


async def test_the_placement_agent_reads_both_topics(agent_outs: list[Out]) -> None:
    async with placement.test_context() as agent:
        topic_of = {}
        # one channel carries two topics; the test wrapper names one per record
        agent._get_strtopic = lambda channel: topic_of["next"]
        for msg, topic in [*((e, LIFECYCLE) for e in ready("w-1", 3, T0)),
                           (admitted("r-1"), ADMITTED)]:
            topic_of["next"] = topic
            rec = record_for(msg, topic)
            await agent.put(value=rec.value, key=rec.key, partition=model_partition(MODEL))
        topic_of["next"] = ADMITTED
        await agent.put(value=b"\x00", key=MODEL.encode())
    placement_out, letter = agent_outs
    assert (placement_out.topic, placement_out.partition) == (TOPIC, 3)
    assert decode(AdmittedRequest, placement_out.value).warm is True
    assert letter.topic == "ember.deadletters"


def test_records_that_arrive_together_give_what_each_gives_in_turn() -> None:
    """A burst: requests of two classes, a worker's events, a cancel, a bad record and another
    model's request between them. Placer.on_records against on_record for each in turn, on
    two fresh sets of tables: the same records out, the same rows."""
    one, together = Tables(), Tables()
    late = admitted("x-1")
    other_model = AdmittedRequest(
        request=Request(request_id="x-2", model="elsewhere", submitted_at=T0, prompt="hi"),
        latency_class="interactive", prompt_tokens=1, prompt_bucket=16, admitted_at=T0,
    )
    msgs: list[tuple[Any, str]] = [
        *((e, LIFECYCLE) for e in ready("w-1", 3, T0, slots=4)),
        (admitted("r-1"), ADMITTED), (admitted("r-2"), ADMITTED), (admitted("r-3"), ADMITTED),
        (admitted("b-1", "batch"), ADMITTED), (admitted("b-2", "batch"), ADMITTED),
        (cancel("b-2"), ADMITTED), (b"\x00", ADMITTED), (other_model, ADMITTED),
        (admitted("r-1"), ADMITTED), (late, ADMITTED), (admitted("r-4"), ADMITTED),
    ]
    records = [
        Consumed(ADMITTED, model_partition(MODEL), i, MODEL.encode(), msg, None)
        if isinstance(msg, bytes) else consumed(msg, topic, i)
        for i, (msg, topic) in enumerate(msgs)
    ]
    one_placer, together_placer = one.placer(), together.placer()
    expected = [o for r in records for o in safely("placement", r, one_placer.on_record, T0)]
    got = together_placer.on_records(records, T0)
    assert [(o.topic, o.key, o.partition) for o in got] == [
        (o.topic, o.key, o.partition) for o in expected
    ]
    assert [o.value for o in got if o.topic != DEADLETTERS] == [
        o.value for o in expected if o.topic != DEADLETTERS
    ]  # a dead letter says when it was written
    assert (together.head, together.requests) == (one.head, one.requests)
    assert len(placed(got)) == 4 and sum(o.topic == DEADLETTERS for o in got) == 1


def test_a_burst_whose_step_fails_is_placed_one_at_a_time(
    tables: Tables, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = placement_module.on_admitted_all

    def only_alone(spec: Any, state: Any, requests: Any, now: int) -> Any:
        if len(requests) > 1:
            raise RuntimeError("a bug that only bursts meet")
        return real(spec, state, requests, now)

    monkeypatch.setattr(placement_module, "on_admitted_all", only_alone)
    placer = tables.placer(default_slots=4)
    feed(placer, *ready("w-1", 3, T0, slots=4))
    records = [consumed(admitted(f"r-{i}"), ADMITTED, i) for i in range(3)]
    outs = placer.on_records(records, T0)
    assert [r.request_id for _, r in placed(outs)] == ["r-0", "r-1", "r-2"]


def test_a_burst_that_fails_once_placed_gives_each_record_its_dead_letter(
    tables: Tables, monkeypatch: pytest.MonkeyPatch
) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 3, T0, slots=4))
    monkeypatch.setattr(placer, "_outs", lambda *args: 1 / 0)  # after the state is stored
    records = [consumed(admitted(f"r-{i}"), ADMITTED, i) for i in range(2)]
    outs = placer.on_records(records, T0)
    assert [o.topic for o in outs] == [DEADLETTERS, "ember.replies"] * 2
    assert {decode(TokenChunk, o.value).request_id for o in outs[1::2]} == {"r-0", "r-1"}


# --- autoscaler -----------------------------------------------------------------------------


def observation(at: int, pending: int = 0, ready_ids: tuple[str, ...] = ()) -> Observation:
    workers = tuple(WorkerSnapshot(w, "ready", 0, 8, T0) for w in ready_ids)
    return Observation(MODEL, at, workers, {"interactive": pending}, arrivals_total=pending)


def test_decisions_carry_reason_inputs_and_are_keyed_by_model() -> None:
    table: dict[str, Any] = {}
    scaler = Autoscaler(EmberPolicy(), {MODEL: ScalingSpec(MODEL)}, hold_every_s=30, table=table)
    [out] = scaler.decide(observation(T0, pending=3), T0)
    decision = decode(ScaleDecision, out.value)
    assert (out.topic, out.key) == (DECISIONS, MODEL.encode())
    assert (decision.action, decision.count, decision.policy) == ("scale_up", 1, "ember_predictive")
    assert decision.inputs["pending_interactive"] == 3 and decision.reason
    assert decision.decision_id
    assert table[MODEL]["last"]["action"] == "scale_up"
    assert table[MODEL]["state"]["outstanding"]["unseen_launches"] == 1


def test_holds_are_published_on_change_and_then_every_so_often() -> None:
    table: dict[str, Any] = {}
    policy = AlwaysOnPolicy(workers=1)
    scaler = Autoscaler(policy, {MODEL: ScalingSpec(MODEL)}, hold_every_s=30, table=table)
    ticks = [scaler.decide(observation(T0 + s * 1000, ready_ids=("w-1",)), T0 + s * 1000)
             for s in (0, 1, 29, 30, 31)]
    assert [len(t) for t in ticks] == [1, 0, 0, 1, 0]
    assert table[MODEL]["policy"] == "always_on"
    assert table[MODEL]["last"]["action"] == "hold"


def test_a_changed_policy_starts_from_its_initial_state() -> None:
    table: dict[str, Any] = {MODEL: {"policy": "knative_reactive", "state": {"bogus": 1}}}
    scaler = Autoscaler(AlwaysOnPolicy(workers=2), {MODEL: ScalingSpec(MODEL)}, 30, table=table)
    [out] = scaler.decide(observation(T0), T0)
    assert decode(ScaleDecision, out.value).count == 2


def test_model_partition_is_kafkas_default_partitioner() -> None:
    from aiokafka.partitioner import DefaultPartitioner

    for model in ("tiny", "Qwen/Qwen2.5-7B-Instruct", "m" * 200):
        expected = DefaultPartitioner()(model.encode(), [0, 1, 2, 3], [0, 1, 2, 3])
        assert model_partition(model) == expected


def test_encode_round_trip_sanity() -> None:
    msg = admitted("r-1")
    assert decode(AdmittedRequest, encode(msg)) == msg


# --- cancels (docs/PROTOCOL.md §5.3) --------------------------------------------------------


def cancel(rid: str) -> Cancel:
    return Cancel(request_id=rid, model=MODEL, cancelled_at=T0 + 50, reason="client timeout")


def test_a_pending_request_is_cancelled_out_of_the_queue(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, admitted("r-1"), admitted("r-2"))
    [reply] = placer.on_record(consumed(cancel("r-1"), ADMITTED), T0 + 60)
    chunk = decode(TokenChunk, reply.value)
    assert (reply.topic, chunk.request_id, chunk.finish_reason) == (
        "ember.replies", "r-1", "cancelled"
    )
    assert [r.request_id for r in placer.store.get(MODEL).queued("interactive")] == ["r-2"]
    assert set(tables.requests) == {"r-2"}
    outs = feed(placer, *ready("w-1", 1, T0 + 100), at=T0 + 100)
    assert [r.request_id for _, r in placed(outs)] == ["r-2"]


def test_a_placed_requests_cancel_goes_to_its_workers_partition(tables: Tables) -> None:
    placer = tables.placer()
    feed(placer, *ready("w-1", 6, T0), admitted("r-1"))
    record = consumed(cancel("r-1"), ADMITTED)
    [forwarded] = placer.on_record(record, T0 + 60)
    assert (forwarded.topic, forwarded.partition, forwarded.key) == (TOPIC, 6, b"r-1")
    assert forwarded.value == record.value
    assert dict(forwarded.headers)["ember-schema"] == b"cancel/1.0"


def test_a_cancel_for_an_unknown_request_is_dropped(tables: Tables) -> None:
    placer = tables.placer()
    assert placer.on_record(consumed(cancel("r-9"), ADMITTED), T0) == []


# --- the rows always rebuild the state ------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_rows_rebuild_the_same_state_after_any_sequence(tables: Tables, seed: int) -> None:
    import random

    rng = random.Random(seed)
    placer = tables.placer(dead_after_s=2.0, unseen_done_after_s=1.0, max_attempts=3)
    now, n = T0, 0
    for _ in range(200):
        now += rng.randint(1, 400)
        roll = rng.random()
        if roll < 0.45:
            n += 1
            cls = rng.choice(["interactive", "batch", "eval"])
            feed(placer, admitted(f"r-{n}", cls, now), at=now)
        elif roll < 0.75:
            worker = f"w-{rng.randint(1, 3)}"
            busy = placer.store.get(MODEL).workers.get(worker)
            listed = tuple(sorted(busy.assigned))[: rng.randint(0, 2)] if busy else ()
            [state_event, heartbeat] = ready(worker, int(worker[-1]), now, slots=2, busy=listed)
            feed(placer, *([heartbeat] if busy else [state_event, heartbeat]), at=now)
        elif roll < 0.9:
            placer.tick(MODEL, now)
        elif n:
            placer.on_record(consumed(cancel(f"r-{rng.randint(1, n)}"), ADMITTED), now)
        live = placer.store.get(MODEL)
        rebuilt = tables.placer().store.get(MODEL)
        for cls in ("interactive", "batch", "eval"):
            assert {r.request_id for r in rebuilt.queued(cls)} == {
                r.request_id for r in live.queued(cls)
            }
        assert {rid: f.request.worker_id for rid, f in rebuilt.in_flight.items()} == {
            rid: f.request.worker_id for rid, f in live.in_flight.items()
        }
        assert {w: v.assigned for w, v in rebuilt.workers.items()} == {
            w: v.assigned for w, v in live.workers.items()
        }


# --- waking the control tick for a scale-up from zero ---------------------------------------


def test_a_request_with_no_worker_ready_or_booting_wakes_the_tick() -> None:
    placer = Tables().placer()
    woken: list[str] = []
    placer.on_empty_pool = woken.append
    placer.on_record(consumed(admitted("r-1"), ADMITTED), T0)
    assert woken == [MODEL]
    # a worker on its way: nothing to wake, the tick that launched it follows it
    booting = LifecycleEvent(worker_id="w-1", model=MODEL, kind="state", state="loading",
                             at=T0 + 1, partition=0)
    placer.on_record(consumed(booting, LIFECYCLE), T0 + 1)
    placer.on_record(consumed(admitted("r-2"), ADMITTED), T0 + 2)
    assert woken == [MODEL]
    for event in ready("w-1", 0, T0 + 3):
        placer.on_record(consumed(event, LIFECYCLE), T0 + 3)
    placer.on_record(consumed(admitted("r-3"), ADMITTED), T0 + 4)
    assert woken == [MODEL]


async def test_the_tick_loop_runs_early_when_woken_and_not_too_often() -> None:
    import asyncio
    import time

    from streams.agents.autoscaler import TickLoop

    loop = TickLoop(every_s=30.0, min_gap_s=0.2)
    ticks: list[float] = []

    async def tick() -> None:
        ticks.append(time.monotonic())

    task = asyncio.create_task(loop.run(tick))
    try:
        while not ticks:
            await asyncio.sleep(0.01)
        loop.wake(MODEL)  # 30 s before the next tick is due
        loop.wake(MODEL)
        for _ in range(500):
            if len(ticks) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(ticks) == 2, "a wake runs a tick at once"
        assert ticks[1] - ticks[0] >= 0.2, "never twice within min_gap_s"
        loop.wake(MODEL)
        for _ in range(500):
            if len(ticks) >= 3:
                break
            await asyncio.sleep(0.01)
        assert len(ticks) == 3 and ticks[2] - ticks[1] >= 0.2
        await asyncio.sleep(0.3)
        assert len(ticks) == 3, "two wakes before a tick make one tick"
    finally:
        task.cancel()
