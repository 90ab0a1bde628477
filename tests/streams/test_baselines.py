"""The baselines on the same fake clock and fleet as Ember's policy."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import msgpack
import pytest

from streams.policy import POLICIES, Policy
from streams.policy.autoscaler import EmberPolicy
from streams.policy.baselines import AlwaysOnPolicy, FullyColdPolicy, KnativePolicy
from streams.policy.scaling import Observation, ScalingSpec, WorkerSnapshot

from .fleet import T0, actions, run, steady

MODEL = "org/tiny"
SPEC = ScalingSpec(MODEL, floor=0, ceiling=8, keep_alive_s=300, default_service_s=4.0)
KNATIVE = KnativePolicy()


def burst(start_s: float, end_s: float, concurrency: int, rate: float):
    return lambda t: (concurrency, rate) if start_s <= t < end_s else (0, 0.0)


# --- the protocol ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_has_the_same_interface(name):
    policy: Policy = POLICIES[name]()
    assert policy.name == name and re.fullmatch(r"[a-z][a-z0-9_.]*", name)
    obs = Observation(MODEL, T0, pending={"interactive": 3})
    state, decisions = policy.decide(SPEC, policy.initial_state(), obs, T0)
    assert decisions
    encoded = json.loads(json.dumps(state.to_dict()))
    assert policy.state_from_dict(encoded) == state
    assert policy.state_from_dict(msgpack.unpackb(msgpack.packb(state.to_dict()))) == state
    assert set(POLICIES) == {"ember_predictive", "fully_cold", "always_on", "knative_reactive"}


# --- fully cold --------------------------------------------------------------------------


def test_fully_cold_starts_a_worker_per_burst_and_releases_it_when_idle():
    load = lambda t: (5, 1.0) if t % 120 < 30 else (0, 0.0)  # noqa: E731  bursts every 2 min
    ticks, _, fleet = run(FullyColdPolicy(), SPEC, load, 599)
    ups = [(t, d.count) for t, d in actions(ticks, "scale_up")]
    assert ups == [(0, 1), (120, 1), (240, 1), (360, 1), (480, 1)]
    releases = [t for t, _ in actions(ticks, "release")]
    assert releases == [30, 150, 270, 390, 510]  # at the first idle tick
    assert fleet.live == 0


def test_fully_cold_starts_what_pending_needs_beyond_what_boots():
    policy, state = FullyColdPolicy(), FullyColdPolicy().initial_state()
    obs = Observation(MODEL, T0, pending={"interactive": 20})
    state, [d] = policy.decide(SPEC, state, obs, T0)
    assert (d.action, d.count) == ("scale_up", 3)  # ceil(20 / 8)
    booting = tuple(WorkerSnapshot(f"w-{i}", "loading") for i in range(3))
    obs = Observation(MODEL, T0 + 2_000, booting, pending={"interactive": 30})
    state, [d] = policy.decide(SPEC, state, obs, T0 + 2_000)
    assert (d.action, d.count) == ("scale_up", 1)  # ceil(30 / 8) - 3


def test_fully_cold_waits_while_a_ready_worker_has_room():
    w = WorkerSnapshot("w-0", "ready", busy=5, total_slots=8)
    obs = Observation(MODEL, T0, (w,), pending={"interactive": 2}, in_flight=5)
    _, [d] = FullyColdPolicy().decide(SPEC, FullyColdPolicy().initial_state(), obs, T0)
    assert d.action == "hold"


# --- always on ---------------------------------------------------------------------------


def test_always_on_keeps_n_workers_whatever_the_load():
    load = burst(100, 160, 40, 10.0)
    ticks, _, fleet = run(AlwaysOnPolicy(workers=2), SPEC, load, 1200)
    assert [(t, d.count) for t, d in actions(ticks, "scale_up")] == [(0, 2)]
    assert actions(ticks, "release") == [] and fleet.live == 2


def test_always_on_trims_extra_idle_workers_and_respects_the_ceiling():
    workers = tuple(WorkerSnapshot(f"w-{i}", "ready", 0, 8, T0) for i in range(4))
    obs = Observation(MODEL, T0 + 1_000, workers)
    policy = AlwaysOnPolicy(workers=2)
    _, decisions = policy.decide(SPEC, policy.initial_state(), obs, T0 + 1_000)
    assert [(d.action, d.worker_id) for d in decisions] == [("release", "w-0"), ("release", "w-1")]
    _, [d] = AlwaysOnPolicy(workers=20).decide(
        replace(SPEC, ceiling=5), policy.initial_state(), obs, T0
    )
    assert (d.action, d.count) == ("scale_up", 1)


# --- Knative -----------------------------------------------------------------------------


def test_knative_follows_the_stable_window_under_steady_load():
    ticks, _, fleet = run(KNATIVE, SPEC, steady(14, 3.5), 600)
    assert fleet.live == 3  # 14 / 5.6 -> 3
    # starting from zero is a panic (3 wanted, 0 ready) until 60 s after the pool is ready
    assert ticks[0].decisions[0].inputs["panic"] == 1
    assert all(d.inputs["panic"] == 0 for tk in ticks if tk.t_s >= 90 for d in tk.decisions)
    assert [(t, d.count) for t, d in actions(ticks, "scale_up")] == [(0, 3)]
    assert actions(ticks, "release") == []


def test_knative_panics_on_a_burst_and_does_not_scale_down_while_panicking():
    # 10 concurrent for 2 min (2 workers), then a 30 s burst of 60, then back to 10
    load = lambda t: (60, 15.0) if 120 <= t < 150 else (10, 2.5)  # noqa: E731
    ticks, _, _ = run(KNATIVE, replace(SPEC, ceiling=20), load, 400)
    panic_ticks = [tk.t_s for tk in ticks if tk.decisions[0].inputs["panic"] == 1]
    assert min(t for t in panic_ticks if t >= 90) == 120  # the 6 s window sees it at once
    [(t, d)] = [(t, d) for t, d in actions(ticks, "scale_up") if t >= 120][:1]
    assert t == 120 and d.inputs["want_panic"] >= 2 * 2
    # panic is re-triggered while the 6 s window wants 2x the *ready* workers (the new ones
    # boot for 20 s) and lasts 60 s past the last trigger, with no release in it
    last_trigger = max(
        tk.t_s
        for tk in ticks
        if tk.decisions[0].inputs["want_panic"] / max(tk.decisions[0].inputs["ready"], 1) >= 2
    )
    assert last_trigger == 140
    releases = [t for t, _ in actions(ticks, "release")]
    assert releases and min(releases) == last_trigger + 60
    holds = [d.reason for tk in ticks if 150 <= tk.t_s < min(releases) for d in tk.decisions]
    assert any("panic: no scale-down" in r for r in holds)


def test_knative_scales_to_zero_after_the_stable_window_and_the_grace():
    ticks, _, fleet = run(KNATIVE, SPEC, burst(0, 60, 5, 1.25), 400)
    releases = [t for t, _ in actions(ticks, "release")]
    last_traffic = 58  # the last tick with load
    assert releases == [min(t for t in range(0, 401, 2) if t - last_traffic >= 90)]
    assert "scale to zero" in actions(ticks, "release")[0][1].reason
    assert fleet.live == 0


def test_knative_respects_the_floor_instead_of_zero():
    ticks, _, fleet = run(KNATIVE, replace(SPEC, floor=1), burst(0, 60, 5, 1.25), 400)
    assert actions(ticks, "release") == [] and fleet.live == 1


# --- side by side ------------------------------------------------------------------------


def test_same_burst_each_policy_reacts_in_its_own_way():
    load = burst(10, 70, 20, 5.0)
    spec = replace(SPEC, keep_alive_s=60)
    first_up = {}
    live_at_end = {}
    for policy in (EmberPolicy(), KNATIVE, FullyColdPolicy(), AlwaysOnPolicy(workers=1)):
        ticks, _, fleet = run(policy, spec, load, 600)
        first_up[policy.name] = min(t for t, _ in actions(ticks, "scale_up"))
        live_at_end[policy.name] = fleet.live
    assert first_up == {
        "ember_predictive": 10,
        "knative_reactive": 10,
        "fully_cold": 10,
        "always_on": 0,
    }
    assert live_at_end == {
        "ember_predictive": 0,
        "knative_reactive": 0,
        "fully_cold": 0,
        "always_on": 1,
    }
