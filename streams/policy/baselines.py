"""The policies Ember is measured against, behind the same `decide` as Ember's own.

- FullyColdPolicy: no warm pool. A worker starts when work waits and none has room; a worker
  is released the moment it is idle. Every burst pays a cold start.
- AlwaysOnPolicy: a fixed pool of N workers, never released. Best latency, most cost.
- KnativePolicy: Knative's reactive autoscaler (KPA): observed concurrency averaged over a
  60 s stable window and a 6 s panic window, a target concurrency per worker, panic mode when
  the panic window wants 2x the ready workers (no scale-down while panicking), scale to zero
  after a grace period without traffic.

All respect the spec's floor and ceiling (run the cold baseline with floor 0) and remember
launches and releases they asked for (scaling.Outstanding), as the Ember policy does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from streams.policy.scaling import (
    Decision,
    Observation,
    Outstanding,
    Scalar,
    ScalingSpec,
    idle_for_release,
    least_busy,
    pending_inputs,
    rounded,
)
from streams.policy.windows import Buckets, ms


@dataclass(frozen=True, slots=True)
class BaselineState:
    """State of the fully cold and always-on baselines: only their outstanding actions."""

    outstanding: Outstanding = Outstanding()

    def to_dict(self) -> dict[str, Any]:
        return {"outstanding": self.outstanding.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaselineState:
        return cls(Outstanding.from_dict(data["outstanding"]))


def _pool_inputs(
    obs: Observation, outstanding: Outstanding, **more: float | int | None
) -> dict[str, Scalar]:
    return rounded(
        {
            "concurrency": obs.concurrency,
            "in_flight": obs.in_flight,
            "ready": len(outstanding.serving(obs)),
            "booting": len(obs.booting),
            "unseen_launches": outstanding.unseen_launches,
            "free_slots": obs.free_slots,
            **more,
        }
    ) | pending_inputs(obs)


@dataclass(frozen=True, slots=True)
class FullyColdPolicy:
    """A new worker per burst, released as soon as it is idle.

    Scale up when requests are pending and no ready worker has room, by the workers the
    pending requests need beyond what is already booting: 20 pending, 8 slots, 1 booting ->
    ceil(20 / 8) - 1 = 2 more."""

    name: str = "fully_cold"

    def initial_state(self) -> BaselineState:
        return BaselineState()

    def state_from_dict(self, data: Mapping[str, Any]) -> BaselineState:
        return BaselineState.from_dict(data)

    def decide(
        self, spec: ScalingSpec, state: BaselineState, observation: Observation, now: int
    ) -> tuple[BaselineState, list[Decision]]:
        obs = observation
        outstanding = state.outstanding.observed(obs, now, ms(spec.launch_grace_s))
        active = outstanding.active(obs)
        coming = len(obs.booting) + outstanding.unseen_launches
        pending = obs.pending_total
        inputs = _pool_inputs(obs, outstanding, active=active)
        decisions: list[Decision] = []
        if pending and obs.free_slots == 0:
            need = math.ceil(pending / spec.slots_per_worker) - coming
            n = min(need, spec.ceiling - active)
            if n > 0:
                why = f"{pending} pending, no ready worker has room, {coming} coming: start {n}"
                decisions.append(Decision.scale_up(n, why, inputs))
                outstanding = outstanding.launched(n, now)
        if active < spec.floor:
            n = spec.floor - active - sum(d.count for d in decisions)
            if n > 0:
                decisions.append(Decision.scale_up(n, f"below floor {spec.floor}", inputs))
                outstanding = outstanding.launched(n, now)
        room_to_release = max(active - spec.floor, 0)
        for w in idle_for_release(obs, outstanding, now, 0.0)[:room_to_release]:
            why = f"{w.worker_id} is idle: fully cold keeps no warm pool"
            decisions.append(Decision.release(w.worker_id, why, inputs))
            outstanding = outstanding.released(w.worker_id, now)
        if not decisions:
            decisions.append(Decision.hold("no pending work without room, no idle worker", inputs))
        return BaselineState(outstanding), decisions


@dataclass(frozen=True, slots=True)
class AlwaysOnPolicy:
    """A fixed pool of `workers` (clamped to the spec's floor and ceiling)."""

    workers: int = 1
    name: str = "always_on"

    def initial_state(self) -> BaselineState:
        return BaselineState()

    def state_from_dict(self, data: Mapping[str, Any]) -> BaselineState:
        return BaselineState.from_dict(data)

    def decide(
        self, spec: ScalingSpec, state: BaselineState, observation: Observation, now: int
    ) -> tuple[BaselineState, list[Decision]]:
        obs = observation
        outstanding = state.outstanding.observed(obs, now, ms(spec.launch_grace_s))
        active = outstanding.active(obs)
        target = spec.clamp(self.workers)
        inputs = _pool_inputs(obs, outstanding, active=active, target=target)
        if active < target:
            n = target - active
            outstanding = outstanding.launched(n, now)
            why = f"always on: {active} < {target} workers"
            return BaselineState(outstanding), [Decision.scale_up(n, why, inputs)]
        extra = idle_for_release(obs, outstanding, now, 0.0)[: active - target]
        decisions = []
        for w in extra:
            why = f"always on: {active} > {target} workers, {w.worker_id} idle"
            decisions.append(Decision.release(w.worker_id, why, inputs))
            outstanding = outstanding.released(w.worker_id, now)
        if not decisions:
            decisions.append(Decision.hold(f"always on: {active} of {target} workers", inputs))
        return BaselineState(outstanding), decisions


@dataclass(frozen=True, slots=True)
class KnativeState:
    """Concurrency samples (1 s buckets), panic mode, and when traffic was last seen.

    panic_until: unix ms the panic mode ends unless re-triggered; None when not panicking.
    panic_workers: the highest count wanted during this panic (never lowered within it)."""

    samples: Buckets
    panic_until: int | None = None
    panic_workers: int = 0
    last_traffic_at: int | None = None
    outstanding: Outstanding = Outstanding()

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples.to_dict(),
            "panic_until": self.panic_until,
            "panic_workers": self.panic_workers,
            "last_traffic_at": self.last_traffic_at,
            "outstanding": self.outstanding.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KnativeState:
        return cls(
            Buckets.from_dict(data["samples"]),
            data.get("panic_until"),
            int(data["panic_workers"]),
            data.get("last_traffic_at"),
            Outstanding.from_dict(data["outstanding"]),
        )


@dataclass(frozen=True, slots=True)
class KnativePolicy:
    """Knative's KPA, after `pkg/autoscaler/scaling/autoscaler.go`.

    Target concurrency per worker = slots x target utilization: 8 x 0.7 = 5.6.
    Stable: average concurrency over 60 s = 14 -> ceil(14 / 5.6) = 3 workers.
    Panic: average over 6 s = 40 -> ceil(40 / 5.6) = 8 workers; 8 / 2 ready = 4 >= 2:
    panic for the next 60 s, during which the count only goes up (8, or more).
    Scale to zero: once the stable average is 0, the last worker goes after no traffic for
    the stable window plus `scale_to_zero_grace_s` (60 + 30 s).

    Left out from Knative: the activator's buffering (Ember's pending queue plays that part)
    and the max scale-up / scale-down rates."""

    name: str = "knative_reactive"
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_to_zero_grace_s: float = 30.0
    sample_bucket_s: float = 1.0

    def initial_state(self) -> KnativeState:
        return KnativeState(Buckets(ms(self.sample_bucket_s), ms(self.stable_window_s)))

    def state_from_dict(self, data: Mapping[str, Any]) -> KnativeState:
        return KnativeState.from_dict(data)

    def decide(
        self, spec: ScalingSpec, state: KnativeState, observation: Observation, now: int
    ) -> tuple[KnativeState, list[Decision]]:
        obs = observation
        outstanding = state.outstanding.observed(obs, now, ms(spec.launch_grace_s))
        concurrency = obs.concurrency
        samples = state.samples.add(now, concurrency)
        last_traffic_at = now if concurrency > 0 else state.last_traffic_at
        stable = samples.mean(now, ms(self.stable_window_s)) or 0.0
        panic_avg = samples.mean(now, ms(self.panic_window_s)) or 0.0
        per_worker = spec.slots_per_worker * spec.target_utilization
        want_stable = math.ceil(round(stable / per_worker, 6))
        want_panic = math.ceil(round(panic_avg / per_worker, 6))
        active = outstanding.active(obs)
        ready = len(outstanding.serving(obs))

        panic_until, panic_workers = state.panic_until, state.panic_workers
        if panic_until is not None and now >= panic_until:
            panic_until, panic_workers = None, 0
        if want_panic / max(ready, 1) >= self.panic_threshold:
            if panic_until is None:
                panic_workers = active  # entering panic: never below the pool we have
            panic_until = now + ms(self.stable_window_s)
        panicking = panic_until is not None
        if panicking:
            panic_workers = max(panic_workers, want_panic)
            want = panic_workers
        else:
            want = want_stable

        quiet_s = None if last_traffic_at is None else (now - last_traffic_at) / 1000
        zero_after_s = self.stable_window_s + self.scale_to_zero_grace_s
        if want == 0 and active > 0 and quiet_s is not None and quiet_s < zero_after_s:
            want = 1  # the last worker waits out the grace period
        target = spec.clamp(want)
        inputs = _pool_inputs(
            obs,
            outstanding,
            active=active,
            stable_avg=stable,
            panic_avg=panic_avg,
            target_per_worker=per_worker,
            want_stable=want_stable,
            want_panic=want_panic,
            panic=int(panicking),
            quiet_s=quiet_s,
            target=target,
        )

        decisions: list[Decision] = []
        mode = "panic" if panicking else "stable"
        if target > active:
            n = target - active
            why = (
                f"{mode}: average concurrency {panic_avg if panicking else stable:.1f} over "
                f"{self.panic_window_s if panicking else self.stable_window_s:.0f} s wants "
                f"{target} workers, have {active}"
            )
            decisions.append(Decision.scale_up(n, why, inputs))
            outstanding = outstanding.launched(n, now)
        elif target < active and not panicking:
            for w in least_busy(obs, outstanding)[: active - target]:
                why = f"stable: average concurrency {stable:.1f} wants {target}, have {active}"
                if target == 0:
                    why = f"no traffic for {quiet_s:.0f} s >= {zero_after_s:.0f} s: scale to zero"
                decisions.append(Decision.release(w.worker_id, why, inputs))
                outstanding = outstanding.released(w.worker_id, now)
        if not decisions:
            why = f"{mode}: {active} workers for target {target}"
            if panicking and panic_until is not None and spec.clamp(want_stable) < active:
                why = (
                    f"panic: no scale-down for {(panic_until - now) / 1000:.0f} s more (stable "
                    f"window wants {spec.clamp(want_stable)}, have {active})"
                )
            decisions.append(Decision.hold(why, inputs))
        new_state = replace(
            state,
            samples=samples,
            panic_until=panic_until,
            panic_workers=panic_workers,
            last_traffic_at=last_traffic_at,
            outstanding=outstanding,
        )
        return new_state, decisions
