"""Placement stepped by hand with a fake clock: lifecycle events in, placements out."""

from __future__ import annotations

import json
import random

import msgpack
import pytest

from schemas import AdmittedRequest, LifecycleEvent, Request
from streams.policy.placement import (
    PlacementSpec,
    PlacementState,
    PlacementStep,
    WorkerView,
    _queue_and_drain,
    choose_worker,
    failure_chunk,
    observe,
    on_admitted,
    on_admitted_all,
    on_completed,
    on_lifecycle,
    tick,
)

T0 = 1_764_403_200_000  # unix ms
MODEL = "org/tiny"
SPEC = PlacementSpec(MODEL, default_slots=4, pack_below=0.0)


def admitted(rid: str, cls: str = "interactive", at: int = T0, **request) -> AdmittedRequest:
    r = Request(request_id=rid, model=MODEL, submitted_at=at, prompt="hi", **request)
    return AdmittedRequest(
        request=r, latency_class=cls, prompt_tokens=1, prompt_bucket=16, admitted_at=at
    )


def event(worker: str, at: int, state: str = "ready", **fields) -> LifecycleEvent:
    kind = "heartbeat" if "in_flight" in fields or "total_slots" in fields else "state"
    if kind == "heartbeat":
        fields.setdefault("total_slots", 4)
        fields.setdefault("free_slots", fields["total_slots"] - len(fields.get("in_flight", ())))
        fields.setdefault("queued_tokens", 0)
    fields.setdefault("partition", int(worker.rsplit("-", 1)[1]))
    return LifecycleEvent(worker_id=worker, model=MODEL, kind=kind, state=state, at=at, **fields)


def heartbeat(worker: str, at: int, in_flight=(), state="ready", total=4) -> LifecycleEvent:
    return event(worker, at, state, in_flight=tuple(in_flight), total_slots=total)


def ready(state: PlacementState, *workers: str, at: int = T0, spec=SPEC) -> PlacementState:
    for w in workers:
        state = on_lifecycle(spec, state, heartbeat(w, at), at).state
    return state


def place(state, *rids, cls="interactive", at=T0, spec=SPEC) -> tuple[PlacementState, list]:
    placements = []
    for rid in rids:
        step = on_admitted(spec, state, admitted(rid, cls, at), at)
        state, placements = step.state, placements + list(step.placements)
    return state, placements


def where(step_placements) -> dict[str, str]:
    return {p.request.request_id: p.request.worker_id for p in step_placements}


# --- choosing a worker -------------------------------------------------------------------


def view(wid: str, busy: int, slots: int = 8, state: str = "ready", partition=0, since=T0):
    assigned = frozenset(f"{wid}-r{i}" for i in range(busy))
    return WorkerView(
        wid, state, partition, total_slots=slots, assigned=assigned, ready_since=since
    )


@pytest.mark.parametrize(
    ("pack_below", "workers", "chosen"),
    [
        # spreading: least loaded by occupancy
        (0.0, [view("a", 3), view("b", 1), view("c", 2)], "b"),
        (0.0, [view("a", 2, slots=4), view("b", 3, slots=8)], "b"),  # 0.5 vs 0.375
        # packing: a running batch under half full beats an idle worker
        (0.5, [view("a", 3), view("b", 0)], "a"),
        (0.5, [view("a", 3), view("b", 2), view("c", 0)], "b"),
        # every running batch at least half full: the least loaded of all, the idle one
        (0.5, [view("a", 4), view("b", 5), view("c", 0)], "c"),
        # ties: ready longest, then id
        (0.0, [view("b", 1, since=T0 + 5), view("a", 1, since=T0 + 9)], "b"),
        (0.0, [view("b", 1), view("a", 1)], "a"),
        # never a full, draining, booting or partition-less worker
        (0.0, [view("a", 8), view("b", 0, state="draining"), view("c", 6)], "c"),
        (0.0, [view("a", 0, state="warming"), view("b", 0, partition=None)], None),
    ],
)
def test_choose_worker(pack_below, workers, chosen):
    spec = PlacementSpec(MODEL, pack_below=pack_below)
    got = choose_worker(spec, workers)
    assert (got.worker_id if got else None) == chosen


def sent_to(spec, state, n, start, every_ms=10) -> list[str]:
    """Worker ids of n requests admitted every_ms apart from `start`."""
    order = []
    for i in range(n):
        step = on_admitted(spec, state, admitted(f"q{i}"), start + i * every_ms)
        state = step.state
        order += [p.request.worker_id for p in step.placements]
    return order


def longest_run(order, worker) -> int:
    run = best = 0
    for w in order:
        run = run + 1 if w == worker else 0
        best = max(best, run)
    return best


def test_equal_workers_take_turns_whatever_their_counts_say():
    """Heartbeats report finished requests late, so counts are stale: least loaded alone would
    send w-1 the next 20 requests (w-0 looks 20 busier) and w-0 nothing for that long."""
    spec = PlacementSpec(MODEL, pack_below=0.0, slow_start_s=0.0)
    workers = {
        "w-0": view("w-0", 20, slots=256, partition=0),
        "w-1": view("w-1", 0, slots=256, partition=1),
    }
    order = sent_to(spec, PlacementState(MODEL, workers=workers), 40, T0)
    assert longest_run(order, "w-1") <= 2
    assert 18 <= order.count("w-0") <= 22


def test_slow_start_eases_a_new_worker_in():
    spec = PlacementSpec(MODEL, pack_below=0.0, slow_start_s=1.0, slow_start_floor=0.1)
    workers = {
        "w-0": view("w-0", 5, slots=256, partition=0, since=T0 - 600_000),
        "w-1": view("w-1", 0, slots=256, partition=1, since=T0),
    }
    state = PlacementState(MODEL, workers=workers)
    order = sent_to(spec, state, 200, T0)  # 2 s, 10 ms apart
    first, second = order[:50], order[100:]  # its first 0.5 s; after the ramp
    assert 1 <= first.count("w-1") <= 20  # eased in: a share growing from a tenth
    assert 40 <= second.count("w-1") <= 60  # then half
    assert longest_run(order, "w-1") <= 2  # never a run that starves w-0
    # a fresh state without slow start or turns: plain least loaded, the idle worker first
    assert choose_worker(spec, workers.values()).worker_id == "w-1"
    assert choose_worker(spec, workers.values(), T0).worker_id == "w-0"


def test_slow_start_never_holds_back_pending():
    """A burst waiting for the first worker goes out to every free slot the moment it is
    ready: slow start weighs workers against each other, it does not shrink room."""
    spec = PlacementSpec(MODEL, default_slots=4, slow_start_s=10.0)
    state = PlacementState(MODEL)
    for i in range(6):
        state = on_admitted(spec, state, admitted(f"r{i}"), T0).state
    step = on_lifecycle(spec, state, event("w-0", T0 + 5), T0 + 5)
    assert len(step.placements) == 4
    assert len(step.state.queued("interactive")) == 2


def test_slow_start_floor_must_be_positive():
    with pytest.raises(ValueError, match="slow_start_floor"):
        PlacementSpec(MODEL, slow_start_floor=0.0)


# --- arrivals and the warm flag ----------------------------------------------------------


def test_request_with_room_is_placed_at_once_and_warm():
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    step = on_admitted(SPEC, state, admitted("r1"), T0 + 10)
    [p] = step.placements
    assert p.request.worker_id == "w-0" and p.partition == 0
    assert p.request.warm is True and p.request.placed_at == T0 + 10 and p.request.attempt == 1
    assert step.state.warm_total == 1 and step.state.cold_total == 0


def test_least_loaded_spreads_requests():
    state = ready(PlacementState(MODEL), "w-0", "w-1", "w-2")
    state, placements = place(state, "r1", "r2", "r3", "r4")
    assert where(placements) == {"r1": "w-0", "r2": "w-1", "r3": "w-2", "r4": "w-0"}


def test_without_a_ready_worker_requests_wait_and_drain_cold_when_one_becomes_ready():
    state = on_lifecycle(SPEC, PlacementState(MODEL), event("w-0", T0, "loading"), T0).state
    state, placements = place(state, "i1", "b1", cls="interactive")
    state, more = place(state, "b2", cls="batch", at=T0 + 1)
    state, more2 = place(state, "i2", at=T0 + 2)
    assert placements == more == more2 == []
    assert [r.request_id for r in state.queued("interactive")] == ["i1", "b1", "i2"]
    assert state.cold_total == 4

    step = on_lifecycle(SPEC, state, event("w-0", T0 + 30_000, "ready"), T0 + 30_000)
    got = [p.request for p in step.placements]
    # 4 default slots: interactive first, FIFO within class, then batch
    assert [r.request_id for r in got] == ["i1", "b1", "i2", "b2"]
    assert all(r.warm is False and r.placed_at == T0 + 30_000 for r in got)
    assert not any(step.state.pending.values())


def test_pending_waits_for_free_slots_then_drains_in_class_order():
    state = ready(PlacementState(MODEL), "w-0")
    state, placements = place(state, "r1", "r2", "r3", "r4")
    state, waiting = place(state, "b1", cls="batch", at=T0 + 1)
    state, waiting2 = place(state, "i5", at=T0 + 2)
    assert len(placements) == 4 and waiting == waiting2 == []
    assert state.warm_total == 4 and state.cold_total == 2

    step = on_completed(SPEC, state, "r2", T0 + 5_000)
    assert [p.request.request_id for p in step.placements] == ["i5"]  # interactive first
    assert step.placements[0].request.warm is False
    step = on_completed(SPEC, step.state, "r1", T0 + 6_000)
    assert [p.request.request_id for p in step.placements] == ["b1"]


def test_redelivered_request_is_ignored():
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1")
    step = on_admitted(SPEC, state, admitted("r1"), T0 + 1)
    assert step.placements == () and step.state is state


def test_request_for_another_model_is_a_routing_bug():
    r = Request(request_id="x", model="other", submitted_at=T0, prompt="hi")
    a = AdmittedRequest(
        request=r, latency_class="batch", prompt_tokens=1, prompt_bucket=16, admitted_at=T0
    )
    with pytest.raises(ValueError, match="other"):
        on_admitted(SPEC, PlacementState(MODEL), a, T0)


# --- workers that are not ready ----------------------------------------------------------


def test_no_placement_on_draining_or_booting_workers():
    state = ready(PlacementState(MODEL), "w-0")
    state = on_lifecycle(SPEC, state, event("w-0", T0 + 1, "draining"), T0 + 1).state
    state = on_lifecycle(SPEC, state, event("w-1", T0 + 1, "warming"), T0 + 1).state
    state, placements = place(state, "r1", at=T0 + 2)
    assert placements == [] and len(state.queued("interactive")) == 1


def test_events_older_than_the_workers_latest_are_ignored():
    state = ready(PlacementState(MODEL), "w-0", at=T0 + 100)
    step = on_lifecycle(SPEC, state, event("w-0", T0 + 50, "draining"), T0 + 101)
    assert step.state.workers["w-0"].state == "ready"


# --- completion from heartbeats ----------------------------------------------------------


def test_heartbeats_alone_tell_when_requests_finish():
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1", "r2", at=T0 + 10)
    # r1 listed, r2 not yet (still in the partition): both stay assigned
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 1_000, ["r1"]), T0 + 1_000).state
    assert state.workers["w-0"].assigned == {"r1", "r2"}
    # r1 gone after being listed: finished. r2 listed now.
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 2_000, ["r2"]), T0 + 2_000).state
    assert state.workers["w-0"].assigned == {"r2"} and state.completed_total == 1
    assert state.mean_service_ms == pytest.approx(2_000 - 10)


def test_a_request_never_listed_is_finished_after_the_grace():
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1", at=T0)
    grace = int(SPEC.unseen_done_after_s * 1000)
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + grace - 1), T0 + grace - 1).state
    assert "r1" in state.in_flight
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + grace), T0 + grace).state
    assert "r1" not in state.in_flight and state.workers["w-0"].idle_since == T0 + grace


def test_a_freed_slot_drains_pending_from_a_heartbeat():
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1", "r2", "r3", "r4")
    state, _ = place(state, "r5", at=T0 + 1)
    state = on_lifecycle(
        SPEC, state, heartbeat("w-0", T0 + 1_000, ["r1", "r2", "r3", "r4"]), T0 + 1_000
    ).state
    step = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 2_000, ["r2", "r3", "r4"]), T0 + 2_000)
    assert [p.request.request_id for p in step.placements] == ["r5"]


def test_work_the_worker_reports_but_we_did_not_place_takes_room():
    state = ready(PlacementState(MODEL), "w-0")
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 1, ["x1", "x2", "x3"]), T0 + 1).state
    state, placements = place(state, "r1", "r2", at=T0 + 2)
    assert [p.request.request_id for p in placements] == ["r1"]


# --- dead workers ------------------------------------------------------------------------


def test_missed_heartbeats_kill_a_worker_and_its_requests_move_with_attempt_plus_one():
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    state, placements = place(state, "r1", "r2", "r3")
    assert where(placements) == {"r1": "w-0", "r2": "w-1", "r3": "w-0"}
    for t in range(1_000, 5_001, 1_000):  # w-1 keeps beating, w-0 went silent
        state = on_lifecycle(SPEC, state, heartbeat("w-1", T0 + t, ["r2"]), T0 + t).state
        step = tick(SPEC, state, T0 + t)
        assert step.gone == ()
        state = step.state

    step = tick(SPEC, state, T0 + 5_001)
    assert [(g.worker_id, g.cause) for g in step.gone] == [("w-0", "missed_heartbeats")]
    moved = {p.request.request_id: p.request for p in step.placements}
    assert set(moved) == {"r1", "r3"}
    for r in moved.values():
        assert r.worker_id == "w-1" and r.attempt == 2 and r.previous_workers == ("w-0",)
        assert r.warm is True  # w-1 had room the moment w-0 was found dead
    assert {(x.request.request_id, x.outcome) for x in step.reassignments} == {
        ("r1", "replaced"),
        ("r3", "replaced"),
    }
    assert "w-0" not in step.state.workers


def test_a_failed_worker_with_nowhere_to_go_puts_its_requests_at_the_head_of_pending():
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1", "r2", "r3", "r4")
    state, _ = place(state, "r5", at=T0 + 1)
    step = on_lifecycle(SPEC, state, event("w-0", T0 + 2, "failed", reason="CUDA OOM"), T0 + 2)
    assert step.placements == ()
    assert [g.cause for g in step.gone] == ["failed"]
    assert {x.outcome for x in step.reassignments} == {"pending"}
    assert [r.request_id for r in step.state.queued("interactive")] == [
        "r1",
        "r2",
        "r3",
        "r4",
        "r5",
    ]

    step = on_lifecycle(SPEC, step.state, heartbeat("w-1", T0 + 40_000), T0 + 40_000)
    got = {p.request.request_id: p.request for p in step.placements}
    assert list(got) == ["r1", "r2", "r3", "r4"]
    assert all(r.attempt == 2 and r.warm is False and r.worker_id == "w-1" for r in got.values())


def test_a_request_at_max_attempts_is_abandoned():
    spec = PlacementSpec(MODEL, max_attempts=2, default_slots=4)
    state = ready(PlacementState(MODEL), "w-0", spec=spec)
    state, _ = place(state, "r1", spec=spec)
    state = on_lifecycle(spec, state, event("w-0", T0 + 1, "failed"), T0 + 1).state
    state = ready(state, "w-1", at=T0 + 2, spec=spec)
    assert state.in_flight["r1"].request.attempt == 2
    step = on_lifecycle(spec, state, event("w-1", T0 + 3, "failed"), T0 + 3)
    [x] = step.reassignments
    assert x.outcome == "abandoned" and x.from_worker == "w-1"
    assert not step.state.in_flight and not any(step.state.pending.values())
    chunk = failure_chunk(x.request, "worker_failed", x.reason, T0 + 3)
    assert chunk.finish_reason == "error" and chunk.attempt == 3 and chunk.seq == 0


def test_a_drained_worker_that_stops_only_hands_back_what_it_never_read():
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    state, _ = place(state, "r1", "r2")  # r1 on w-0, r2 on w-1
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 1_000, ["r1"]), T0 + 1_000).state
    state, _ = place(state, "r3", at=T0 + 1_001)  # w-0 and w-1 equally loaded: w-0
    assert state.in_flight["r3"].request.worker_id == "w-0"
    state = on_lifecycle(SPEC, state, event("w-0", T0 + 1_002, "draining"), T0 + 1_002).state
    # draining: it no longer reads its partition, so r3 is not taken for finished
    state = on_lifecycle(
        SPEC, state, heartbeat("w-0", T0 + 9_000, ["r1"], state="draining"), T0 + 9_000
    ).state
    assert state.workers["w-0"].assigned == {"r1", "r3"}
    step = on_lifecycle(SPEC, state, event("w-0", T0 + 9_500, "stopped"), T0 + 9_500)
    assert [(x.request.request_id, x.outcome) for x in step.reassignments] == [("r3", "replaced")]
    assert step.placements[0].request.worker_id == "w-1"
    assert step.state.completed_total == 1  # r1, which it had read, it finished


def test_a_request_served_between_heartbeats_then_a_drain_is_not_served_twice():
    """The worker reports r1 done in its `stopped` event (it finished between its last
    heartbeat and the drain): finished, not re-placed. r2 it never read: re-placed."""
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    state, _ = place(state, "r1", "r2", "r3")  # r1, r3 on w-0; r2 on w-1
    hb = event("w-0", T0 + 500, in_flight=(), total_slots=4, done=())
    state = on_lifecycle(SPEC, state, hb, T0 + 500).state
    state = on_lifecycle(SPEC, state, event("w-0", T0 + 600, "draining"), T0 + 600).state
    step = on_lifecycle(SPEC, state, event("w-0", T0 + 700, "stopped", done=("r1",)), T0 + 700)
    assert [(x.request.request_id, x.outcome) for x in step.reassignments] == [("r3", "replaced")]
    assert step.state.completed_total == 1 and "r1" not in step.state.in_flight


def test_a_worker_that_reports_done_is_never_guessed_finished():
    """With `done` in its heartbeats, a request the worker has not listed yet (still in the
    partition) stays assigned past the grace, and finishes when reported done."""
    state = ready(PlacementState(MODEL), "w-0")
    state, _ = place(state, "r1", at=T0)
    late = T0 + int(SPEC.unseen_done_after_s * 1000) + 5_000
    hb = event("w-0", late, in_flight=(), total_slots=4, done=())
    state = on_lifecycle(SPEC, state, hb, late).state
    assert state.workers["w-0"].assigned == {"r1"}
    hb = event("w-0", late + 1_000, in_flight=(), total_slots=4, done=("r1", "other"))
    state = on_lifecycle(SPEC, state, hb, late + 1_000).state
    assert state.workers["w-0"].assigned == frozenset() and state.completed_total == 1


def test_a_failed_worker_hands_back_only_what_it_did_not_report_done():
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    state, _ = place(state, "r1", "r2", "r3")  # r1, r3 on w-0
    step = on_lifecycle(SPEC, state, event("w-0", T0 + 100, "failed", done=("r1",)), T0 + 100)
    assert [(x.request.request_id, x.outcome) for x in step.reassignments] == [("r3", "replaced")]
    assert step.state.completed_total == 1


def test_booting_workers_get_a_start_timeout_not_the_heartbeat_one():
    spec = PlacementSpec(MODEL, dead_after_s=5, start_timeout_s=60)
    state = on_lifecycle(spec, PlacementState(MODEL), event("w-0", T0, "loading"), T0).state
    for t in range(1_000, 60_001, 1_000):
        state = tick(spec, state, T0 + t).state
    assert "w-0" in state.workers
    step = tick(spec, state, T0 + 61_000)
    assert [g.cause for g in step.gone] == ["start_timeout"]


def test_when_the_control_plane_was_away_workers_get_a_fresh_grace():
    state = ready(PlacementState(MODEL), "w-0")
    state = tick(SPEC, state, T0 + 1_000).state
    step = tick(SPEC, state, T0 + 60_000)  # 59 s without a tick: our silence
    assert step.gone == () and "w-0" in step.state.workers
    state = step.state
    for t in range(61_000, 65_001, 1_000):  # ticking again: the usual rule
        state = tick(SPEC, state, T0 + t).state
    assert "w-0" in state.workers
    assert [g.worker_id for g in tick(SPEC, state, T0 + 65_001).gone] == ["w-0"]


def test_two_workers_dying_together_do_not_inherit_each_others_requests():
    state = ready(PlacementState(MODEL), "w-0", "w-1", "w-2")
    state, _ = place(state, "r1", "r2")
    state = on_lifecycle(SPEC, state, heartbeat("w-2", T0 + 6_000), T0 + 6_000).state
    step = tick(SPEC, state, T0 + 6_000)
    assert {g.worker_id for g in step.gone} == {"w-0", "w-1"}
    assert {p.request.worker_id for p in step.placements} == {"w-2"}


def test_pending_requests_past_their_deadline_expire():
    state, _ = place(PlacementState(MODEL), "r1")
    step = on_admitted(SPEC, state, admitted("r2", deadline_at=T0 + 5_000), T0)
    step = tick(SPEC, step.state, T0 + 5_000)
    assert [r.request_id for r in step.expired] == ["r2"]
    assert [r.request_id for r in step.state.queued("interactive")] == ["r1"]
    chunk = failure_chunk(step.expired[0], "deadline_exceeded", "waited too long", T0 + 5_000)
    assert chunk.attempt == 1 and chunk.error_code == "deadline_exceeded"


# --- what others read --------------------------------------------------------------------


def test_observe_gives_the_autoscaler_its_numbers():
    state = ready(PlacementState(MODEL), "w-0", "w-1")
    state = on_lifecycle(SPEC, state, event("w-2", T0, "loading"), T0).state
    state, _ = place(state, *[f"r{i}" for i in range(8)])
    state, _ = place(state, "b1", "b2", cls="batch", at=T0 + 1)
    state = on_lifecycle(SPEC, state, event("w-1", T0 + 2, "draining"), T0 + 2).state
    obs = observe(SPEC, state, T0 + 3)
    assert obs.pending == {"interactive": 0, "batch": 2, "eval": 0}
    assert obs.in_flight == 8 and obs.concurrency == 10
    assert obs.workers_by_state() == {"ready": 1, "draining": 1, "loading": 1}
    assert (obs.arrivals_total, obs.warm_total, obs.cold_total) == (10, 8, 2)
    assert obs.free_slots == 0 and obs.ready_slots == 4


def test_idle_since_follows_the_work():
    state = ready(PlacementState(MODEL), "w-0", at=T0)
    assert state.workers["w-0"].idle_since == T0
    state, _ = place(state, "r1", at=T0 + 5)
    assert state.workers["w-0"].idle_since is None
    state = on_completed(SPEC, state, "r1", T0 + 4_000).state
    assert state.workers["w-0"].idle_since == T0 + 4_000


def roundtrip_json(state: PlacementState) -> PlacementState:
    return PlacementState.from_dict(json.loads(json.dumps(state.to_dict())))


def roundtrip_msgpack(state: PlacementState) -> PlacementState:
    return PlacementState.from_dict(msgpack.unpackb(msgpack.packb(state.to_dict())))


@pytest.mark.parametrize("roundtrip", [roundtrip_json, roundtrip_msgpack])
def test_state_survives_a_table_codec(roundtrip):
    state = ready(PlacementState(MODEL), "w-0")
    state = on_lifecycle(SPEC, state, event("w-1", T0, "loading"), T0).state
    state, _ = place(state, "r1", "r2", "r3", "r4", "r5")
    state = on_lifecycle(SPEC, state, heartbeat("w-0", T0 + 1_000, ["r1"]), T0 + 1_000).state
    state = tick(SPEC, state, T0 + 1_000).state
    assert roundtrip(state) == state
    step: PlacementStep = on_completed(SPEC, roundtrip(state), "r1", T0 + 2_000)
    assert [p.request.request_id for p in step.placements] == ["r5"]


@pytest.mark.parametrize("spec", [SPEC, PlacementSpec(MODEL, default_slots=3, pack_below=0.5)])
def test_placing_at_once_is_the_same_step_as_queueing_and_draining(spec):
    """on_admitted's short way (nothing waits) against the general one, over a random run of
    arrivals, heartbeats, workers coming ready and time passing, placed and pending alike."""
    rng = random.Random(7)
    state, at, short_ways, long_ways = PlacementState(MODEL), T0, 0, 0
    for i in range(400):
        at += rng.choice((0, 3, 40, 400, 4000))
        roll = rng.random()
        if roll < 0.3:
            state = on_lifecycle(spec, state, heartbeat(f"w-{rng.randrange(3)}", at), at).state
        elif roll < 0.35:
            state = tick(spec, state, at).state
        else:
            request = admitted(f"r-{i}", rng.choice(("interactive", "batch")), at)
            step = on_admitted(spec, state, request, at)
            assert step == _queue_and_drain(spec, state, [request], at)
            short = not any(state.pending.values()) and bool(step.placements)
            short_ways, long_ways = short_ways + short, long_ways + (not short)
            state = step.state
    assert short_ways > 20 and long_ways > 20, (short_ways, long_ways)  # both ways taken


@pytest.mark.parametrize("spec", [SPEC, PlacementSpec(MODEL, default_slots=3, pack_below=0.5)])
def test_requests_that_arrive_together_take_the_same_step_as_one_after_another(spec):
    """on_admitted_all against on_admitted for each in turn, over a random run of bursts
    (some with a request twice, or one already known), heartbeats and time passing."""
    rng = random.Random(11)
    state, at, n, placed_in_bursts, queued_in_bursts = PlacementState(MODEL), T0, 0, 0, 0
    for _ in range(300):
        at += rng.choice((0, 3, 40, 400, 4000))
        if rng.random() < 0.6:
            beat = heartbeat(f"w-{rng.randrange(3)}", at, total=8)
            state = on_lifecycle(spec, state, beat, at).state
            continue
        cls = rng.choice(("interactive", "batch"))
        burst = [admitted(f"r-{n + i}", cls, at) for i in range(rng.randint(2, 6))]
        n += len(burst)
        if rng.random() < 0.2:
            burst.append(burst[0])  # redelivered within the burst
        one_by_one, placements = state, []
        for request in burst:
            step = on_admitted(spec, one_by_one, request, at)
            one_by_one, placements = step.state, placements + list(step.placements)
        together = on_admitted_all(spec, state, burst, at)
        assert together == PlacementStep(one_by_one, tuple(placements))
        placed_in_bursts += len(placements)
        state = together.state
        waiting = {r.request_id for queue in state.pending.values() for r in queue}
        queued_in_bursts += any(r.request_id in waiting for r in burst)
    assert placed_in_bursts > 50 and queued_in_bursts > 10, (placed_in_bursts, queued_in_bursts)


def test_requests_placed_together_are_of_one_model_and_class():
    with pytest.raises(ValueError, match="one latency class"):
        on_admitted_all(SPEC, PlacementState(MODEL), [admitted("a"), admitted("b", "batch")], T0)
    other = PlacementSpec("org/other")
    with pytest.raises(ValueError, match="got a request for"):
        on_admitted_all(other, PlacementState("org/other"), [admitted("a"), admitted("b")], T0)
