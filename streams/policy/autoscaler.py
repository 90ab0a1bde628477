"""Ember's predictive autoscaler: size the warm pool for the demand that is coming.

    state, decisions = decide(spec, state, observation, now)

Each tick (the agent calls it every second or two) the policy:

1. folds the observation's counters into its windows: arrivals (trailing request rate),
   warm / cold arrivals (hit rate now and one window earlier) and the hour-of-day profile;
2. forecasts the request rate as the higher of the trailing rate and the profile's expected
   rate for the coming `lookahead_s` (so a daily peak is pre-warmed, and a surprise burst is
   still followed). The profile is read at least `cold_start_lead` cold starts ahead: the
   policy times its own launches (scale-up decision to a new worker seen ready, smoothed), so
   a pre-warm is asked for early enough to be ready when the hour's traffic starts, whatever
   a cold start costs on this machine;
3. turns rate into concurrency with Little's law, L = rate x service time, takes the higher of
   that and the concurrency observed now (in flight + pending), and sizes the pool for it at
   the spec's target utilization;
4. adds one worker while the hit rate is under `hit_rate_target`, lower than a window ago,
   the queue is rising and a worker is ready: the warm pool is falling behind, so expand
   before the forecast catches up. Not from an empty pool: there every arrival meets a cold
   worker by definition, and the demand in the system already sizes the scale-up (a lone
   request asks for one worker, not two);
5. clamps to the spec's floor and ceiling and compares with the pool (ready + booting +
   launches asked for but not seen yet).

Up is immediate: a missing worker costs a cold start per request. Down is slow, against
flapping: the pool shrinks only to the highest target of the last `stabilization_s` (so it
never releases within a stabilization window of a scale-up) or to what a peak the profile
sees in a coming hour asks for, until that hour has started (a pre-warmed worker waits for its
traffic even when the lookahead shrinks meanwhile), and only workers idle for the spec's
`keep_alive_s` are released, idle longest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from streams.policy.scaling import (
    Decision,
    Observation,
    Outstanding,
    ScalingSpec,
    idle_for_release,
    pending_inputs,
    rounded,
)
from streams.policy.windows import Buckets, HourOfDayProfile, ms


@dataclass(frozen=True, slots=True)
class Counters:
    """The observation counters at the previous tick; None before the first."""

    arrivals: int
    warm: int
    cold: int

    @staticmethod
    def delta(now: int, before: int | None) -> int:
        """Growth of a monotonic counter. Nothing before, or a counter that went backwards (its
        state was reset), counts as no growth: a restart must not look like a burst."""
        if before is None or now < before:
            return 0
        return now - before


@dataclass(frozen=True, slots=True)
class EmberState:
    """What the predictive policy remembers between ticks."""

    arrivals: Buckets
    warm: Buckets
    cold: Buckets
    profile: HourOfDayProfile
    counters: Counters | None = None
    last_pending: int = 0
    # (unix ms, target): each tick's target, and a peak's target from the start of its hour
    recent_targets: tuple[tuple[int, int], ...] = ()
    outstanding: Outstanding = Outstanding()
    launches: tuple[int, ...] = ()  # unix ms of each worker asked for and not seen ready yet
    ready_ids: frozenset[str] = frozenset()  # workers seen ready at the last tick
    cold_start_ms: float | None = None  # launch to ready, smoothed; None before one was seen

    def to_dict(self) -> dict[str, Any]:
        c = self.counters
        return {
            "arrivals": self.arrivals.to_dict(),
            "warm": self.warm.to_dict(),
            "cold": self.cold.to_dict(),
            "profile": self.profile.to_dict(),
            "counters": None if c is None else [c.arrivals, c.warm, c.cold],
            "last_pending": self.last_pending,
            "recent_targets": [list(t) for t in self.recent_targets],
            "outstanding": self.outstanding.to_dict(),
            "launches": list(self.launches),
            "ready_ids": sorted(self.ready_ids),
            "cold_start_ms": self.cold_start_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmberState:
        c = data.get("counters")
        return cls(
            Buckets.from_dict(data["arrivals"]),
            Buckets.from_dict(data["warm"]),
            Buckets.from_dict(data["cold"]),
            HourOfDayProfile.from_dict(data["profile"]),
            None if c is None else Counters(int(c[0]), int(c[1]), int(c[2])),
            int(data["last_pending"]),
            tuple((int(at), int(t)) for at, t in data["recent_targets"]),
            Outstanding.from_dict(data["outstanding"]),
            tuple(int(at) for at in data.get("launches", ())),
            frozenset(data.get("ready_ids", ())),
            data.get("cold_start_ms"),
        )


@dataclass(frozen=True, slots=True)
class EmberPolicy:
    """The predictive policy and its tuning.

    window_s / bucket_s: trailing windows for rate and hit rate (hopping, 10 s buckets over
    60 s). lookahead_s: how far ahead the hour-of-day profile is read. stabilization_s: the
    scale-down window. hit_rate_target: below it, with a rising queue, the pool expands.
    hour_s: the length of the profile's hour (3600; a time-compressed benchmark day shortens
    it: an hour is trusted after `hour_s` of watching and old days fade after 7 x `hour_s`).
    profile_max_gap_s: a longer gap between two ticks is not credited to the profile.
    cold_start_lead: the profile is read at least this many measured cold starts ahead.
    cold_start_smoothing: weight of each new launch-to-ready time in the smoothed one."""

    name: str = "ember_predictive"
    window_s: float = 60.0
    bucket_s: float = 10.0
    lookahead_s: float = 600.0
    stabilization_s: float = 120.0
    hit_rate_target: float = 0.9
    hour_s: float = 3600.0
    profile_max_gap_s: float = 600.0
    cold_start_lead: float = 2.0
    cold_start_smoothing: float = 0.3

    def initial_state(self) -> EmberState:
        bucket, keep = ms(self.bucket_s), 2 * ms(self.window_s)
        profile = HourOfDayProfile(
            max_gap_s=self.profile_max_gap_s,
            max_observed_s=7 * self.hour_s,
            min_observed_s=self.hour_s,
            hour_ms=ms(self.hour_s),
        )
        windows = (Buckets(bucket, keep), Buckets(bucket, keep), Buckets(bucket, keep))
        return EmberState(*windows, profile)

    def state_from_dict(self, data: Mapping[str, Any]) -> EmberState:
        return EmberState.from_dict(data)

    def decide(
        self, spec: ScalingSpec, state: EmberState, observation: Observation, now: int
    ) -> tuple[EmberState, list[Decision]]:
        obs = observation
        # 1. Counters into windows and the profile; what we asked for but cannot see yet.
        state = _fold_counters(state, obs, now)
        state = self._timed_launches(spec, state, obs, now)
        outstanding = state.outstanding.observed(obs, now, ms(spec.launch_grace_s))
        window = ms(self.window_s)

        # 2. Forecast. Trailing 60 s: 90 arrivals over 60 s -> 1.5/s. Profile for the next
        # 10 min: 3.0/s (a peak starts in 8 min) -> forecast max(1.5, 3.0) = 3.0/s. Cold
        # starts of 400 s (a slow machine) would stretch the 10 min to 2 x 400 s.
        rate_trailing = state.arrivals.rate_per_s(now, window)
        lookahead = self.lookahead_ms(state)
        rate_profile, profile_from = state.profile.peak_ahead(now, lookahead)
        rate = max(rate_trailing, rate_profile or 0.0)

        # 3. Little's law: 3.0/s x 4 s service = 12 concurrent; observed now 10 in flight +
        # 6 pending = 16 -> demand 16 -> 16 / (8 slots x 0.7) = 2.86 -> 3 workers.
        service_s = obs.mean_service_s or spec.default_service_s
        little = rate * service_s
        demand = max(little, float(obs.concurrency))
        base = spec.workers_for(demand)

        # 4. Hit-rate trend. Last 60 s: 30 warm of 40 -> 0.75 < 0.9; the 60 s before: 0.95;
        # pending 6 > 2 a tick ago; 2 workers ready -> expand by one.
        hit_rate, hit_before = hit_rates(state.warm, state.cold, now, window)
        queue_rising = obs.pending_total > state.last_pending
        falling = hit_rate is not None and (hit_before is None or hit_rate < hit_before)
        serving = outstanding.serving(obs)
        expand = (
            hit_rate is not None
            and hit_rate < self.hit_rate_target
            and falling
            and queue_rising
            and bool(serving)
        )

        # 5. Floor and ceiling; the pool is ready + booting + unseen launches: 2 + 1 + 0 = 3.
        target = spec.clamp(base + (1 if expand else 0))
        kept = tuple(x for x in state.recent_targets if now - x[0] < ms(self.stabilization_s))
        recent = (*kept, (now, target))
        if rate_profile and profile_from > now:
            # A peak the profile sees in a coming hour holds the pool sized for it until that
            # hour starts (and a stabilization window more): the lookahead may shrink
            # meanwhile (a faster measured cold start) and the peak fall out of it, and a
            # pre-warmed worker must not be released just before the traffic it came for.
            ahead = (profile_from, spec.clamp(spec.workers_for(rate_profile * service_s)))
            recent = recent if ahead in kept else (*recent, ahead)
        active = outstanding.active(obs)
        inputs = rounded(
            {
                "rate_trailing_per_s": rate_trailing,
                "rate_profile_per_s": rate_profile,
                "rate_forecast_per_s": rate,
                "service_s": service_s,
                "little_concurrency": little,
                "concurrency": obs.concurrency,
                "in_flight": obs.in_flight,
                "hit_rate": hit_rate,
                "hit_rate_before": hit_before,
                "ready": len(serving),
                "booting": len(obs.booting),
                "unseen_launches": outstanding.unseen_launches,
                "cold_start_s": None if state.cold_start_ms is None else state.cold_start_ms / 1000,
                "lookahead_s": lookahead / 1000,
                "active": active,
                "base": base,
                "target": target,
                "floor": spec.floor,
                "ceiling": spec.ceiling,
            }
        ) | pending_inputs(obs)

        sizing = (
            f"demand {demand:.1f} concurrent (forecast {rate:.2f}/s x {service_s:.1f} s, "
            f"{obs.concurrency} in system)"
        )
        if expand:
            sizing += f"; hit rate {hit_rate:.2f} falling and queue rising: +1 ahead"
        decisions: list[Decision]
        if target > active:
            n = target - active
            why = f"target {target} > {active} workers: {sizing}"
            decisions = [Decision.scale_up(n, why, inputs)]
            outstanding = outstanding.launched(n, now)
            state = replace(state, launches=(*state.launches, *([now] * n)))
        elif target < active:
            decisions, outstanding = self._scale_down(
                spec, obs, outstanding, now, active, target, recent, inputs
            )
        else:
            decisions = [
                Decision.hold(f"pool of {active} matches target {target}: {sizing}", inputs)
            ]

        state = replace(
            state, last_pending=obs.pending_total, recent_targets=recent, outstanding=outstanding
        )
        return state, decisions

    def lookahead_ms(self, state: EmberState) -> int:
        """How far ahead the profile is read: lookahead_s, or cold_start_lead measured cold
        starts when that is longer."""
        lead = 0 if state.cold_start_ms is None else self.cold_start_lead * state.cold_start_ms
        return max(ms(self.lookahead_s), round(lead))

    def _timed_launches(
        self, spec: ScalingSpec, state: EmberState, obs: Observation, now: int
    ) -> EmberState:
        """Each worker newly seen ready ends the oldest launch still waiting: its
        launch-to-ready time goes into cold_start_ms. Launches older than the launch grace
        are dropped (lost, or answered by a worker that was ready anyway).

        Launched at 10:00:00.0 and 10:00:01.0; one new worker ready at 10:00:02.5: 2.5 s;
        smoothed 0.3 into a previous 1.5 s -> 1.8 s."""
        ready = frozenset(w.worker_id for w in obs.ready)
        grace = ms(spec.launch_grace_s)
        launches = [at for at in state.launches if now - at < grace]
        cold_start = state.cold_start_ms
        for _ in range(min(len(ready - state.ready_ids), len(launches))):
            took = float(now - launches.pop(0))
            smoothing = self.cold_start_smoothing
            cold_start = took if cold_start is None else cold_start + smoothing * (took - cold_start)
        return replace(state, launches=tuple(launches), ready_ids=ready, cold_start_ms=cold_start)

    def _scale_down(
        self,
        spec: ScalingSpec,
        obs: Observation,
        outstanding: Outstanding,
        now: int,
        active: int,
        target: int,
        recent: tuple[tuple[int, int], ...],
        inputs: dict[str, Any],
    ) -> tuple[list[Decision], Outstanding]:
        # Stabilization: targets of the last 120 s were 5, 4, 3 -> shrink to 5, not 3.
        down_to = max(t for _, t in recent)
        inputs = inputs | {"down_to": down_to}
        if down_to >= active:
            peak = max((at for at, t in recent if t == down_to), default=now)
            if peak > now:
                why = (
                    f"target {target} < {active} workers, but the profile expects {down_to} "
                    f"from the hour that starts in {(peak - now) / 1000:.0f} s: holding for it"
                )
            else:
                why = (
                    f"target {target} < {active} workers, but it was {down_to} within the "
                    f"last {self.stabilization_s:.0f} s: holding against flapping"
                )
            return [Decision.hold(why, inputs)], outstanding
        idle = idle_for_release(obs, outstanding, now, spec.keep_alive_s)
        chosen = idle[: active - down_to]
        if not chosen:
            why = (
                f"target {down_to} < {active} workers, but none idle for keep-alive "
                f"{spec.keep_alive_s:.0f} s"
            )
            return [Decision.hold(why, inputs)], outstanding
        decisions = []
        for w in chosen:
            idle_s = (now - (w.idle_since or now)) / 1000
            why = (
                f"target {down_to} < {active} workers for {self.stabilization_s:.0f} s; "
                f"{w.worker_id} idle {idle_s:.0f} s >= keep-alive {spec.keep_alive_s:.0f} s"
            )
            decisions.append(Decision.release(w.worker_id, why, inputs))
            outstanding = outstanding.released(w.worker_id, now)
        return decisions, outstanding


def hit_rates(
    warm: Buckets, cold: Buckets, now: int, window_ms: int
) -> tuple[float | None, float | None]:
    """Warm share of arrivals in the window ending now and in the window before it; None for
    a window without arrivals. 30 warm + 10 cold now, 57 + 3 before -> (0.75, 0.95)."""
    w, c = warm.sum(now, window_ms), cold.sum(now, window_ms)
    wb, cb = warm.sum_before(now, window_ms), cold.sum_before(now, window_ms)
    return (w / (w + c) if w + c else None), (wb / (wb + cb) if wb + cb else None)


def _fold_counters(state: EmberState, obs: Observation, now: int) -> EmberState:
    """Step 1: the counters' growth since the last tick, added at `now` to the windows and the
    profile. arrivals_total 1200 -> 1290 since the last tick: 90 arrivals at `now`."""
    b = state.counters
    arrivals = Counters.delta(obs.arrivals_total, b.arrivals if b else None)
    warm = Counters.delta(obs.warm_total, b.warm if b else None)
    cold = Counters.delta(obs.cold_total, b.cold if b else None)
    return replace(
        state,
        arrivals=state.arrivals.add(now, arrivals) if arrivals else state.arrivals,
        warm=state.warm.add(now, warm) if warm else state.warm,
        cold=state.cold.add(now, cold) if cold else state.cold,
        profile=state.profile.add(now, arrivals),
        counters=Counters(obs.arrivals_total, obs.warm_total, obs.cold_total),
    )


DEFAULT_POLICY = EmberPolicy()


def decide(
    spec: ScalingSpec, state: EmberState, observation: Observation, now: int
) -> tuple[EmberState, list[Decision]]:
    """Ember's predictive policy with default tuning; see EmberPolicy for the steps."""
    return DEFAULT_POLICY.decide(spec, state, observation, now)


def initial_state() -> EmberState:
    return DEFAULT_POLICY.initial_state()
