"""Ember's predictive policy, stepped through scenarios on a fake clock and a fake fleet."""

from __future__ import annotations

import json
from dataclasses import replace

import msgpack
import pytest

from streams.policy.autoscaler import EmberPolicy, EmberState, decide, initial_state
from streams.policy.scaling import Observation, ScalingSpec, WorkerSnapshot
from streams.policy.windows import HOUR_MS, HourOfDayProfile

from .fleet import T0, FakeFleet, actions, run, steady

MODEL = "org/tiny"
# 8 slots at 70 %: 5.6 concurrent requests per worker
SPEC = ScalingSpec(MODEL, floor=0, ceiling=8, keep_alive_s=300, default_service_s=4.0)
EMBER = EmberPolicy()


def burst_at(start_s: float, concurrency: int, rate: float, end_s: float = 1e9):
    return lambda t: (concurrency, rate) if start_s <= t < end_s else (0, 0.0)


def test_a_burst_scales_up_at_once_and_only_once_while_workers_boot():
    ticks, _, fleet = run(EMBER, SPEC, burst_at(10, 20, 5.0), 120)
    ups = actions(ticks, "scale_up")
    assert [(t, d.count) for t, d in ups] == [(10, 4)]
    d = ups[0][1]
    # 20 in the system / 5.6 -> 4. Every arrival met no worker (hit rate 0, queue rising), but
    # from an empty pool that is the cold start itself: no +1 ahead
    assert d.inputs["base"] == 4 and d.inputs["target"] == 4 and d.inputs["concurrency"] == 20
    assert "ahead" not in d.reason
    assert actions(ticks, "release") == [] and fleet.live == 4


def test_a_lone_request_from_an_empty_pool_starts_one_worker():
    empty = dict(in_flight=0, workers=())
    state, [d] = decide(SPEC, initial_state(), observation(0, **empty), T0)
    assert d.action == "hold"
    obs = observation(1, arrivals=1, pending=1, **empty)
    state, [d] = decide(SPEC, state, obs, T0 + 1000)
    assert (d.action, d.count) == ("scale_up", 1)
    assert d.inputs["hit_rate"] == 0.0 and "ahead" not in d.reason


def test_steady_load_holds():
    # 2.5/s x 4 s = 10 concurrent = 10 in the system -> 2 workers, then nothing to do
    ticks, _, fleet = run(EMBER, SPEC, steady(10, 2.5), 900)
    assert [(t, d.count) for t, d in actions(ticks, "scale_up")] == [(0, 2)]
    assert actions(ticks, "release") == []
    assert all(d.action == "hold" for tk in ticks if tk.t_s >= 30 for d in tk.decisions)
    assert fleet.live == 2


def test_idle_workers_are_released_after_the_keep_alive_and_not_before():
    load = burst_at(0, 10, 2.5, end_s=300)  # load stops at 300 s: workers idle from then
    ticks, _, fleet = run(EMBER, SPEC, load, 700)
    releases = actions(ticks, "release")
    assert {t for t, _ in releases} == {600}  # 300 s idle, and not a tick earlier
    assert {d.worker_id for _, d in releases} == {"w-0", "w-1"}
    assert all("keep-alive 300 s" in d.reason for _, d in releases)
    assert fleet.live == 0


def test_no_release_right_after_a_scale_up():
    spec = replace(SPEC, keep_alive_s=0)
    ticks, _, _ = run(EMBER, spec, burst_at(0, 20, 5.0, end_s=40), 300)
    [(up_at, _)] = actions(ticks, "scale_up")
    first_release = min(t for t, _ in actions(ticks, "release"))
    assert first_release - up_at >= EMBER.stabilization_s
    holds = [d for tk in ticks if 40 <= tk.t_s < first_release for d in tk.decisions]
    assert holds and all(d.action == "hold" for d in holds)


@pytest.mark.parametrize(
    ("floor", "ceiling", "load", "live_always"),
    [
        (2, 8, steady(0, 0.0), {2}),  # the floor is started with no traffic, and kept
        (0, 3, steady(100, 25.0), {3}),  # the ceiling caps a flood
        (1, 8, burst_at(0, 30, 7.5, end_s=60), None),  # released down to the floor only
    ],
)
def test_floor_and_ceiling(floor, ceiling, load, live_always):
    spec = replace(SPEC, floor=floor, ceiling=ceiling, keep_alive_s=30)
    ticks, _, fleet = run(EMBER, spec, load, 900)
    lives = {tk.live_after for tk in ticks}
    assert all(floor <= n <= ceiling for n in lives)
    if live_always is not None:
        assert lives == live_always
    else:
        assert fleet.live == floor and actions(ticks, "release")


def oscillating(t: float) -> tuple[int, float]:
    return (30, 7.5) if t % 60 < 30 else (5, 1.25)


def test_no_flapping_under_oscillating_load():
    spec = replace(SPEC, keep_alive_s=10)  # idle workers are soon eligible: only hysteresis holds
    ticks, _, _ = run(EMBER, spec, oscillating, 1200)
    assert actions(ticks, "release") == []
    assert len(actions(ticks, "scale_up")) <= 2
    # the same load without a stabilization window flaps
    jumpy = EmberPolicy(stabilization_s=4)
    ticks, _, _ = run(jumpy, spec, oscillating, 1200)
    assert len(actions(ticks, "release")) > 10 and len(actions(ticks, "scale_up")) > 10


def trained_profile(days: int = 3) -> HourOfDayProfile:
    """`days` days before T0 (08:00 UTC): 5 requests/s from 09:00 to 10:00, 0.2/s otherwise."""
    profile = HourOfDayProfile()
    for minute in range(days * 24 * 60):
        at = T0 - days * 24 * HOUR_MS + minute * 60_000
        rate = 5.0 if (at // HOUR_MS) % 24 == 9 else 0.2
        profile = profile.add(at, rate * 60)
    return profile


def test_the_hour_of_day_profile_prewarms_before_a_predictable_peak():
    state = replace(EMBER.initial_state(), profile=trained_profile())
    quiet = steady(1, 0.2)
    ticks, _, _ = run(EMBER, SPEC, quiet, 3600, tick_s=10, state=state)
    ups = actions(ticks, "scale_up")
    assert [t for t, _ in ups] == [0, 50 * 60]  # one worker at once; the peak 10 min ahead
    d = ups[1][1]
    assert d.inputs["rate_profile_per_s"] == pytest.approx(5.0)
    assert d.inputs["target"] == 4 and d.count == 3  # 5/s x 4 s = 20 -> 20 / 5.6 -> 4

    # without the profile the same quiet morning never grows the pool
    ticks, _, _ = run(EMBER, SPEC, quiet, 3600, tick_s=10)
    assert [t for t, _ in actions(ticks, "scale_up")] == [0]


# A day compressed 900 times: 4 s hours, every time constant / 900 (lookahead 600 s -> 0.667
# s, raised to 2 s); rates and service time stay real.
HOUR = 4_000
COMPRESSED = EmberPolicy(window_s=0.2, bucket_s=0.05, lookahead_s=2.0, stabilization_s=0.2,
                         hour_s=4.0, profile_max_gap_s=1.0)


def compressed_day(policy: EmberPolicy, quiet: float = 0.2) -> HourOfDayProfile:
    """The day before T0 (hour 0 of a 4 s-hour day) in 0.25 s ticks: hour 9 at 5/s, the
    others at `quiet`/s."""
    profile = policy.initial_state().profile
    for tick in range(24 * 16):
        at = T0 - 24 * HOUR + tick * 250
        profile = profile.add(at, (5.0 if (at // HOUR) % 24 == 9 else quiet) * 0.25)
    return profile


def test_a_compressed_day_prewarms_like_a_real_one():
    # The same morning with every time constant / 900: 4 s hours, lookahead 600 s -> 0.667 s.
    # Rates and service time are real: 5/s x 4 s = 20 concurrent -> 4 workers.
    policy = COMPRESSED
    state = replace(policy.initial_state(), profile=compressed_day(policy))
    spec = replace(SPEC, keep_alive_s=0.3)
    before_peak = T0 + 9 * HOUR - 1_000  # 08:45 in a 4 s hour: the peak is 2 s ahead
    _, decisions = policy.decide(spec, state, observation_at(before_peak), before_peak)
    assert decisions[0].action == "scale_up" and decisions[0].inputs["target"] == 4
    assert decisions[0].inputs["rate_profile_per_s"] == pytest.approx(5.0)
    early = T0 + 8 * HOUR - 3_000  # 07:15: only quiet hours ahead
    _, decisions = policy.decide(spec, state, observation_at(early), early)
    assert decisions[0].inputs["target"] == 1


def test_the_policy_times_its_own_cold_starts():
    # workers boot for 20 s; ticks every 2 s: launched at 10 s, seen ready at 30 s
    ticks, state, _ = run(EMBER, SPEC, burst_at(10, 20, 5.0), 60, fleet=FakeFleet(boot_s=20))
    assert ticks[-1].decisions[0].inputs["cold_start_s"] == pytest.approx(20.0)
    assert state.launches == () and state.cold_start_ms == pytest.approx(20_000)
    before = [tk.decisions[0].inputs["cold_start_s"] for tk in ticks if tk.t_s < 30]
    assert set(before) == {None}
    # a second, slower start is smoothed in: 20 + 0.3 x (30 - 20) = 23 s
    later = EMBER._timed_launches(
        SPEC, replace(state, launches=(T0,)), observation_at(T0 + 30_000, ready=("w-9",)),
        T0 + 30_000,
    )
    assert later.cold_start_ms == pytest.approx(23_000) and later.launches == ()


def test_a_slow_cold_start_stretches_the_prewarm_lead():
    """A compressed day whose lookahead (2 s) is shorter than this machine's cold start
    (3 s): the policy reads the profile 2 x 3 s ahead, so the peak 5 s away is prewarmed."""
    policy = COMPRESSED
    spec = replace(SPEC, keep_alive_s=0.3)
    five_ahead = T0 + 9 * HOUR - 5_000
    unknown = replace(policy.initial_state(), profile=compressed_day(policy))
    _, [d] = policy.decide(spec, unknown, observation_at(five_ahead), five_ahead)
    assert d.inputs["lookahead_s"] == 2.0 and d.inputs["target"] == 1
    measured = replace(unknown, cold_start_ms=3_000.0)
    _, [d] = policy.decide(spec, measured, observation_at(five_ahead), five_ahead)
    assert d.inputs["lookahead_s"] == 6.0 and d.inputs["target"] == 4
    assert d.inputs["rate_profile_per_s"] == pytest.approx(5.0)


def test_a_prewarmed_pool_waits_for_its_peak_when_the_lookahead_shrinks():
    """The diurnal benchmark's morning: the peak is read 2 measured cold starts ahead (3 s ->
    6 s) and prewarmed 5 s before it; the workers are ready in 0.25 s, the smoothed cold start
    falls (2.2 s) and the peak leaves the lookahead before it starts. The pool stays for it
    (it used to be released and asked for again, twice, before the traffic came)."""
    policy = COMPRESSED
    state = replace(policy.initial_state(), profile=compressed_day(policy, quiet=0.0),
                    cold_start_ms=3_000.0)
    spec = replace(SPEC, keep_alive_s=0.3)
    fleet = FakeFleet(model=spec.model, slots=spec.slots_per_worker, boot_s=0.1)
    ticks, _, _ = run(policy, spec, steady(0, 0.0), 5.0, tick_s=0.25, state=state, fleet=fleet,
                      start=T0 + 9 * HOUR - 5_000)
    assert [(t, d.count) for t, d in actions(ticks, "scale_up")] == [(0.0, 4)]
    assert actions(ticks, "release") == []
    gone = [tk.decisions[0] for tk in ticks if 0.25 <= tk.t_s < 2.5]  # the peak out of sight
    assert gone and all(d.inputs["lookahead_s"] < 5.0 and d.inputs["target"] == 0 for d in gone)
    assert "the profile expects 4 from the hour that starts in" in gone[0].reason
    assert len(ticks[-1].observation.ready) == 4  # 09:00: the traffic's hour, 4 workers ready


def observation_at(now: int, ready: tuple[str, ...] = ()) -> Observation:
    workers = tuple(WorkerSnapshot(w, "ready", 0, 8) for w in ready)
    return Observation(MODEL, now, workers, {"interactive": 0}, 0, 0, 0, 0, 4.0)


# --- single decisions from hand-made observations ----------------------------------------


def observation(at_s: float, *, arrivals=0, warm=0, pending=0, in_flight=16, workers=None):
    busy = [WorkerSnapshot(f"w-{i}", "ready", busy=8, total_slots=8) for i in range(2)]
    return Observation(
        MODEL,
        T0 + int(at_s * 1000),
        tuple(busy if workers is None else workers),
        {"interactive": pending},
        in_flight,
        arrivals,
        warm,
        arrivals - warm,
        4.0,
    )


@pytest.mark.parametrize(("queue_rising", "expands"), [(True, True), (False, False)])
def test_falling_hit_rate_with_a_rising_queue_expands_ahead(queue_rising, expands):
    state = initial_state()
    for step in range(13):  # 0..120 s: 1 request/s, every one warm
        obs = observation(step * 10, arrivals=step * 10, warm=step * 10)
        state, _ = decide(SPEC, state, obs, T0 + step * 10_000)
    for step in range(13, 19):  # 130..180 s: 6 of every 10 warm
        pending = step - 12 if queue_rising else 3
        obs = observation(
            step * 10, arrivals=step * 10, warm=120 + (step - 12) * 6, pending=pending
        )
        state, decisions = decide(SPEC, state, obs, T0 + step * 10_000)
    [d] = decisions
    assert d.inputs["hit_rate"] == pytest.approx(0.6, abs=0.05)
    assert d.inputs["hit_rate_before"] == pytest.approx(1.0)
    assert d.inputs["target"] == d.inputs["base"] + (1 if expands else 0)
    assert ("falling and queue rising" in d.reason) == expands


def test_launches_are_not_repeated_until_the_grace_runs_out():
    empty = dict(workers=(), in_flight=0, pending=10)
    state, [d] = decide(SPEC, initial_state(), observation(0, **empty), T0)
    assert (d.action, d.count) == ("scale_up", 2)
    state, [d] = decide(SPEC, state, observation(10, **empty), T0 + 10_000)
    assert d.action == "hold" and d.inputs["unseen_launches"] == 2
    # one worker shows up booting: it takes one of the two launches
    booting = (WorkerSnapshot("w-0", "loading"),)
    state, [d] = decide(SPEC, state, observation(20, **{**empty, "workers": booting}), T0 + 20_000)
    assert d.action == "hold" and d.inputs["unseen_launches"] == 1 and d.inputs["booting"] == 1
    # the other never appears: after the launch grace it is asked for again
    later = observation(61, **{**empty, "workers": booting})
    state, [d] = decide(SPEC, state, later, T0 + 61_000)
    assert (d.action, d.count) == ("scale_up", 1)


def test_a_reset_counter_is_not_a_burst():
    state, _ = decide(SPEC, initial_state(), observation(0, arrivals=50_000, warm=50_000), T0)
    state, [d] = decide(SPEC, state, observation(2, arrivals=50_002, warm=50_002), T0 + 2_000)
    assert d.inputs["rate_trailing_per_s"] < 1
    state, [d] = decide(SPEC, state, observation(4, arrivals=3, warm=3), T0 + 4_000)
    assert d.inputs["rate_trailing_per_s"] < 1


def test_every_decision_is_a_valid_scale_decision_message():
    ticks, _, _ = run(EMBER, replace(SPEC, keep_alive_s=0), burst_at(0, 20, 5.0, end_s=40), 400)
    seen = {d.action for tk in ticks for d in tk.decisions}
    assert seen == {"scale_up", "hold", "release"}
    for tk in ticks:
        for d in tk.decisions:
            msg = d.to_message(model=MODEL, policy=EMBER.name, decided_at=T0, decision_id="d-1")
            assert msg.reason and msg.inputs and msg.policy == "ember_predictive"


@pytest.mark.parametrize(
    "codec",
    [lambda d: json.loads(json.dumps(d)), lambda d: msgpack.unpackb(msgpack.packb(d))],
    ids=["json", "msgpack"],
)
def test_state_survives_a_table_codec_and_decides_the_same(codec):
    ticks, state, fleet = run(EMBER, SPEC, oscillating, 300)
    restored = EmberState.from_dict(codec(state.to_dict()))
    assert restored == state
    obs = fleet.observe(T0 + 302_000, 30, 7.5)
    assert decide(SPEC, restored, obs, T0 + 302_000) == decide(SPEC, state, obs, T0 + 302_000)


def test_fleet_sanity():
    fleet = FakeFleet(boot_s=10)
    fleet.apply([], T0)
    obs = fleet.observe(T0, 5, 1.0)
    assert obs.pending == {"interactive": 5} and obs.in_flight == 0
