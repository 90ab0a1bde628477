"""Admission cases with a fake clock: catalog, classification, bounds, deadlines, tenants."""

from __future__ import annotations

import json

import msgpack
import pytest

from schemas import Request, TokenChunk
from streams.policy.admission import (
    RATE_LIMITED,
    AdmissionSpec,
    AdmissionState,
    ModelAdmission,
    ModelLoad,
    TenantLimit,
    admit,
    prompt_bucket,
)
from streams.policy.scaling import Observation, WorkerSnapshot

T0 = 1_764_403_200_000
MODEL = "org/tiny"
CATALOG = {
    MODEL: ModelAdmission(
        context_tokens=2048,
        queue_bounds={"interactive": 4, "batch": 6, "eval": 6},
        pressure_bound=3,
        service_s=4.0,
        cold_start_s=30.0,
        slots_per_worker=8,
    )
}
SPEC = AdmissionSpec(CATALOG, defer_s=5.0, max_defer_s=60.0)


def request(rid: str = "r1", at: int = T0, **fields) -> Request:
    fields.setdefault("prompt", "hello there")
    if "prompt_token_ids" in fields:
        fields.pop("prompt")
    return Request(request_id=rid, model=fields.pop("model", MODEL), submitted_at=at, **fields)


def with_load(**load) -> AdmissionState:
    load.setdefault("ready_slots", 16)
    return AdmissionState().with_load(MODEL, ModelLoad(**load))


# --- table: one request against one load, the outcome and its code ------------------------

CASES = [
    # (name, request fields, load, outcome, error code)
    ("admitted when there is room", {}, {"free_slots": 4}, "admit", None),
    ("unknown model", {"model": "org/huge"}, {}, "reject", "unknown_model"),
    (
        "prompt plus max_tokens past the context",
        {"prompt_token_ids": tuple(range(2000)), "max_tokens": 100},
        {},
        "reject",
        "prompt_too_long",
    ),
    (
        "deadline already passed",
        {"deadline_at": T0 + 1, "now": T0 + 1},
        {},
        "reject",
        "deadline_exceeded",
    ),
    (
        "interactive queue at its bound",
        {},
        {"queued": {"interactive": 4}},
        "reject",
        "overloaded",
    ),
    (
        "interactive under pressure still admitted first",
        {},
        {"queued": {"interactive": 2, "batch": 5}},
        "admit",
        None,
    ),
    (
        "batch deferred under pressure",
        {"latency_class": "batch"},
        {"queued": {"interactive": 3}},
        "defer",
        None,
    ),
    (
        "batch deferred at its own bound",
        {"latency_class": "batch"},
        {"queued": {"batch": 6}, "free_slots": 8},
        "defer",
        None,
    ),
    (
        "batch waiting past max_defer_s is refused",
        {"latency_class": "batch", "at": T0 - 58_000},
        {"queued": {"interactive": 3}},
        "reject",
        "overloaded",
    ),
    (
        "batch whose deadline falls before the retry",
        {"latency_class": "batch", "deadline_at": T0 + 4_000},
        {"queued": {"interactive": 3}},
        "reject",
        "deadline_exceeded",
    ),
    (
        "deadline before a cold start could finish",
        {"deadline_at": T0 + 10_000},
        {"ready_slots": 0},
        "reject",
        "deadline_exceeded",
    ),
    (
        "deadline before the queue ahead drains",
        {"deadline_at": T0 + 2_000},
        {"queued": {"interactive": 3}, "ready_slots": 4, "free_slots": 0},
        "reject",
        "deadline_exceeded",
    ),
    (
        "deadline met with a free slot",
        {"deadline_at": T0 + 2_000},
        {"ready_slots": 4, "free_slots": 1},
        "admit",
        None,
    ),
]


@pytest.mark.parametrize(
    ("fields", "load", "outcome", "code"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_admission_outcomes(fields, load, outcome, code):
    fields = dict(fields)
    at, now = fields.pop("at", T0), fields.pop("now", T0)
    state, result = admit(SPEC, with_load(**load), request(at=at, **fields), now)
    assert (result.outcome, result.error_code) == (outcome, code), result.reason
    assert result.reason  # every outcome says why
    if outcome == "reject":
        chunk = result.rejection(now)
        assert isinstance(chunk, TokenChunk) and chunk.finish_reason == "rejected"
        assert chunk.error_code == code and chunk.seq == 0
    if outcome == "defer":
        assert result.retry_at == now + 5_000
    if outcome != "admit":
        assert state.buckets == {}  # nothing charged


def test_admitted_request_is_classified():
    _, result = admit(SPEC, AdmissionState(), request(prompt="x" * 300), T0 + 7)
    a = result.admitted
    assert a is not None and a.request.request_id == "r1" and a.admitted_at == T0 + 7
    assert (a.prompt_tokens, a.prompt_bucket, a.latency_class) == (75, 128, "interactive")
    assert a.worker_id is None and a.attempt == 1
    _, result = admit(SPEC, AdmissionState(), request(prompt_token_ids=(1, 2, 3)), T0)
    assert (result.admitted.prompt_tokens, result.admitted.prompt_bucket) == (3, 16)


@pytest.mark.parametrize(
    ("tokens", "bucket"), [(0, 16), (3, 16), (16, 16), (17, 32), (75, 128), (1024, 1024)]
)
def test_prompt_buckets_are_powers_of_two(tokens, bucket):
    assert prompt_bucket(tokens, 16) == bucket


def test_unknown_model_reason_names_what_is_served():
    _, result = admit(SPEC, AdmissionState(), request(model="nope"), T0)
    assert "nope" in result.reason and MODEL in result.reason


def test_a_burst_meets_the_bound_before_placement_reports_the_queue():
    state = with_load(queued={"interactive": 1})
    outcomes = []
    for i in range(5):
        state, result = admit(SPEC, state, request(f"r{i}"), T0 + i)
        outcomes.append(result.outcome)
    assert outcomes == ["admit", "admit", "admit", "reject", "reject"]  # bound 4
    state = state.with_load(MODEL, ModelLoad(queued={"interactive": 0}, ready_slots=16))
    assert admit(SPEC, state, request("r9"), T0 + 9)[1].outcome == "admit"


def test_batch_is_admitted_again_once_pressure_is_gone():
    state = with_load(queued={"interactive": 3})
    _, first = admit(SPEC, state, request(latency_class="batch"), T0)
    assert first.outcome == "defer"
    state = state.with_load(MODEL, ModelLoad(queued={}, ready_slots=16, free_slots=8))
    _, again = admit(SPEC, state, request(latency_class="batch"), first.retry_at)
    assert again.outcome == "admit" and again.admitted.latency_class == "batch"


# --- tenants: a token bucket refilling with time -----------------------------------------

LIMITED = AdmissionSpec(
    {MODEL: ModelAdmission()},  # queue bounds far away
    tenant_limits={"acme": TenantLimit(rate_per_s=2.0, burst=3)},
    default_tenant_limit=TenantLimit(rate_per_s=100.0, burst=100),
)


def run_tenant(spec, state, steps):
    """steps: (ms after T0, tenant) -> outcomes (error code or 'admit')."""
    got = []
    for i, (t, tenant) in enumerate(steps):
        state, result = admit(spec, state, request(f"r{i}", tenant=tenant), T0 + t)
        got.append(result.error_code or result.outcome)
    return state, got


def test_tenant_rate_limit_with_a_refilling_bucket():
    steps = [
        (0, "acme"),
        (0, "acme"),
        (0, "acme"),  # burst of 3 spent
        (0, "acme"),  # refused
        (0, "other"),  # other tenants unaffected
        (499, "acme"),  # 0.998 tokens: still refused
        (500, "acme"),  # 1 token after 0.5 s at 2/s
        (600, "acme"),
        (10_000, "acme"),  # refilled, but only to the burst
        (10_000, "acme"),
        (10_000, "acme"),
        (10_000, "acme"),
    ]
    state, got = run_tenant(LIMITED, AdmissionState(), steps)
    assert got == [
        "admit",
        "admit",
        "admit",
        RATE_LIMITED,
        "admit",
        RATE_LIMITED,
        "admit",
        RATE_LIMITED,
        "admit",
        "admit",
        "admit",
        RATE_LIMITED,
    ]


def test_rate_limited_reason_says_when_to_retry():
    state, _ = run_tenant(LIMITED, AdmissionState(), [(0, "acme")] * 3)
    _, result = admit(LIMITED, state, request("x", tenant="acme"), T0 + 100)
    assert result.error_code == RATE_LIMITED
    # 0.2 tokens after 100 ms at 2/s: 0.8 / 2 = 0.4 s to a whole one
    assert "2 requests/s" in result.reason and "retry in 0.4 s" in result.reason
    assert result.rejection(T0 + 100).error_code == RATE_LIMITED


def test_refused_requests_do_not_spend_the_tenants_tokens():
    spec = AdmissionSpec(CATALOG, tenant_limits={"acme": TenantLimit(1.0, 2)})  # bound 4
    full = with_load(queued={"interactive": 4})
    state, _ = run_tenant(spec, full, [(0, "acme")] * 5)  # all overloaded
    state = state.with_load(MODEL, ModelLoad(ready_slots=16))
    _, got = run_tenant(spec, state, [(0, "acme")] * 3)
    assert got == ["admit", "admit", RATE_LIMITED]


def test_full_buckets_are_forgotten():
    state, _ = run_tenant(LIMITED, AdmissionState(), [(0, "acme"), (0, "other")])
    assert set(state.buckets) == {"acme", "other"}
    assert set(state.without_full_buckets(LIMITED, T0).buckets) == {"acme", "other"}
    # "other" refills 1 token in 10 ms at 100/s; "acme" needs 0.5 s at 2/s
    assert set(state.without_full_buckets(LIMITED, T0 + 100).buckets) == {"acme"}
    assert state.without_full_buckets(LIMITED, T0 + 10_000).buckets == {}


# --- the wait estimate -------------------------------------------------------------------

ONE_MODEL = ModelAdmission(service_s=4.0, cold_start_s=30.0, slots_per_worker=8)


@pytest.mark.parametrize(
    ("load", "cls", "wait_s"),
    [
        (ModelLoad(queued={"interactive": 2}, ready_slots=8, free_slots=3), "interactive", 0.0),
        # 40 ahead, 24 busy slots, 4 s each: (40 + 1) x 4 / 24
        (ModelLoad(queued={"interactive": 40}, ready_slots=24), "interactive", 41 * 4 / 24),
        # batch waits behind interactive too; eval behind both
        (ModelLoad(queued={"interactive": 5, "batch": 3}, ready_slots=8), "batch", 9 * 4 / 8),
        (ModelLoad(queued={"interactive": 5, "batch": 3}, ready_slots=8), "interactive", 3.0),
        (ModelLoad(queued={"eval": 1, "batch": 3}, ready_slots=8), "eval", 5 * 4 / 8),
        # no ready worker: a cold start, then one new worker's slots
        (ModelLoad(queued={"interactive": 12}), "interactive", 30 + 5 * 4 / 8),
        (ModelLoad(), "interactive", 30.0),
        # the observed service time replaces the default
        (ModelLoad(queued={"interactive": 7}, ready_slots=8, mean_service_s=2.0), "batch", 2.0),
    ],
)
def test_wait_estimate(load, cls, wait_s):
    assert load.wait_s(cls, ONE_MODEL) == pytest.approx(wait_s)


def test_load_from_a_placement_observation():
    obs = Observation(
        MODEL,
        T0,
        workers=(
            WorkerSnapshot("w-0", "ready", busy=6, total_slots=8),
            WorkerSnapshot("w-1", "loading"),
        ),
        pending={"interactive": 0, "batch": 4},
        in_flight=6,
        mean_service_s=3.5,
    )
    load = ModelLoad.from_observation(obs)
    assert load == ModelLoad({"interactive": 0, "batch": 4}, 8, 2, 3.5)


@pytest.mark.parametrize(
    "codec",
    [
        lambda d: json.loads(json.dumps(d)),
        lambda d: msgpack.unpackb(msgpack.packb(d)),
    ],
    ids=["json", "msgpack"],
)
def test_state_survives_a_table_codec(codec):
    state, _ = run_tenant(LIMITED, with_load(queued={"batch": 2}), [(0, "acme"), (5, None)])
    assert AdmissionState.from_dict(codec(state.to_dict())) == state
