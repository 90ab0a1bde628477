"""The per-request shortcuts of placement: a message copy that checks only what changed, a
worker's load without building set unions, and table rows written without comparing the keys
of everything in flight when a step only placed."""

from __future__ import annotations

from typing import Any

import pytest

from schemas import AdmittedRequest, LifecycleEvent, Request, ValidationError
from streams.agents.placement import Placer
from streams.policy import PlacementSpec
from streams.policy.placement import WorkerView
from streams.tables import IN_FLIGHT, PENDING, PlacementStore
from tests.streams.test_app_placement import MODEL, T0, Tables, admitted, consumed, ready


def test_replace_checks_the_changed_fields_and_the_rules() -> None:
    request = admitted("r-1")
    placed = request.placed_on("w-1", warm=True, at=T0 + 5)
    assert (placed.worker_id, placed.warm, placed.placed_at, placed.attempt) == (
        "w-1", True, T0 + 5, 1)
    assert placed.request is request.request and placed.admitted_at == request.admitted_at
    again = placed.placed_on("w-2", warm=False, at=T0 + 9)
    assert (again.attempt, again.previous_workers) == (2, ("w-1",))
    with pytest.raises(ValidationError):
        request.replace(worker_id="")  # an id must not be empty
    with pytest.raises(ValidationError):
        request.replace(worker_id="w-1")  # rule: placed_at and warm come with worker_id
    with pytest.raises(TypeError):
        request.replace(no_such_field=1)


def test_replace_normalizes_like_the_constructor() -> None:
    req = Request(request_id="r-1", model=MODEL, submitted_at=T0, prompt="hi")
    assert req.replace(stop=["a", "b"]) == Request(
        request_id="r-1", model=MODEL, submitted_at=T0, prompt="hi", stop=["a", "b"])


@pytest.mark.parametrize(
    ("assigned", "reported"),
    [((), ()), (("a", "b"), ()), ((), ("x",)), (("a", "b"), ("b", "c")), (("a",), ("a",))],
)
def test_busy_is_the_size_of_the_union(assigned: tuple[str, ...], reported: tuple[str, ...]) -> None:
    view = WorkerView("w", "ready", assigned=frozenset(assigned), reported=frozenset(reported))
    assert view.busy == len(set(assigned) | set(reported))


def _rows(tables: Tables) -> dict[str, tuple[str, Any]]:
    return {rid: (row["status"], row["seen"]) for rid, row in tables.requests.items()}


def test_a_step_that_finishes_and_places_writes_and_deletes_rows() -> None:
    tables = Tables()
    store = PlacementStore(tables.head, tables.requests)
    placer = Placer({MODEL: PlacementSpec(MODEL, unseen_done_after_s=0.0)}, store)
    for event in ready("w-1", 0, T0, slots=1):
        placer.on_record(consumed(event, "ember.lifecycle"), T0)
    for rid in ("r-1", "r-2"):
        placer.on_record(consumed(admitted(rid), "ember.admitted"), T0 + 10)
    assert _rows(tables) == {"r-1": (IN_FLIGHT, False), "r-2": (PENDING, False)}
    # r-1 listed, then no longer: finished; r-2 takes its slot in the same step
    for busy, at in ((("r-1",), T0 + 20), ((), T0 + 30)):
        beat = LifecycleEvent(worker_id="w-1", model=MODEL, kind="heartbeat", state="ready",
                              at=at, partition=0, free_slots=1 - len(busy), total_slots=1,
                              queued_tokens=0, in_flight=busy)
        placer.on_record(consumed(beat, "ember.lifecycle"), at)
    assert _rows(tables) == {"r-2": (IN_FLIGHT, False)}
    rebuilt = PlacementStore(tables.head, tables.requests).get(MODEL)
    assert set(rebuilt.in_flight) == {"r-2"} == set(store.get(MODEL).in_flight)
    assert isinstance(rebuilt.in_flight["r-2"].request, AdmittedRequest)


def test_the_event_loop_is_chosen_by_name() -> None:
    import asyncio

    from streams.commands import _use_event_loop

    assert _use_event_loop("nope") is None
    before = asyncio.get_event_loop_policy()
    try:
        assert _use_event_loop("asyncio") == "asyncio"
        assert asyncio.get_event_loop_policy() is before
        name = _use_event_loop("auto")
        assert name in ("uvloop", "asyncio")
        assert (type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")) == (
            name == "uvloop")
    finally:
        asyncio.set_event_loop_policy(before)
