"""What every scaling policy shares: its input (Observation), output (Decision), per-model
limits (ScalingSpec), the Policy protocol, and the memory of actions not yet visible.

A policy is `decide(spec, state, observation, now) -> (state, decisions)`: time is passed in
(unix ms), the state is a frozen value the caller stores (a Faust table row via `to_dict`),
and the decisions are plain values that `Decision.to_message` turns into the
`schemas.ScaleDecision` the supervisor acts on. The live agent, the tests and the fleet
simulator all run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from schemas import LATENCY_CLASSES, ScaleAction, ScaleDecision, WorkerState
from streams.policy.windows import ms

BOOTING_STATES: tuple[WorkerState, ...] = ("starting", "loading", "restoring", "warming")

Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """One worker as placement sees it at observation time.

    busy: requests on it (placed by us and not finished, or reported in its heartbeat).
    idle_since: unix ms since when a ready worker has had nothing to do; None while busy or
    not ready."""

    worker_id: str
    state: WorkerState
    busy: int = 0
    total_slots: int = 0
    idle_since: int | None = None

    @property
    def room(self) -> int:
        return max(self.total_slots - self.busy, 0) if self.state == "ready" else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "state": self.state,
            "busy": self.busy,
            "total_slots": self.total_slots,
            "idle_since": self.idle_since,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerSnapshot:
        return cls(
            data["worker_id"],
            data["state"],
            int(data["busy"]),
            int(data["total_slots"]),
            data.get("idle_since"),
        )


@dataclass(frozen=True, slots=True)
class Observation:
    """What a scaling policy sees of one model at time `at` (built by `placement.observe`, or
    by a simulator).

    pending: requests waiting for a worker, per latency class (the model's queue depth).
    in_flight: requests placed on a worker and not finished.
    arrivals_total, warm_total, cold_total: monotonic counters since placement state began;
    a request counts warm when it was placed on arrival, cold when it had to wait. Policies
    turn them into rates by difference between two observations.
    mean_service_s: observed placement-to-finish time, smoothed; None before any finished."""

    model: str
    at: int
    workers: tuple[WorkerSnapshot, ...] = ()
    pending: Mapping[str, int] = field(default_factory=dict)
    in_flight: int = 0
    arrivals_total: int = 0
    warm_total: int = 0
    cold_total: int = 0
    mean_service_s: float | None = None

    @property
    def pending_total(self) -> int:
        return sum(self.pending.values())

    @property
    def concurrency(self) -> int:
        """Requests in the system now: being served or waiting (Knative's 'concurrency')."""
        return self.in_flight + self.pending_total

    @property
    def ready(self) -> tuple[WorkerSnapshot, ...]:
        return tuple(w for w in self.workers if w.state == "ready")

    @property
    def booting(self) -> tuple[WorkerSnapshot, ...]:
        return tuple(w for w in self.workers if w.state in BOOTING_STATES)

    @property
    def ready_slots(self) -> int:
        return sum(w.total_slots for w in self.ready)

    @property
    def free_slots(self) -> int:
        return sum(w.room for w in self.workers)

    def workers_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for w in self.workers:
            counts[w.state] = counts.get(w.state, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "at": self.at,
            "workers": [w.to_dict() for w in self.workers],
            "pending": dict(self.pending),
            "in_flight": self.in_flight,
            "arrivals_total": self.arrivals_total,
            "warm_total": self.warm_total,
            "cold_total": self.cold_total,
            "mean_service_s": self.mean_service_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observation:
        return cls(
            data["model"],
            int(data["at"]),
            tuple(WorkerSnapshot.from_dict(w) for w in data["workers"]),
            {c: int(n) for c, n in data["pending"].items()},
            int(data["in_flight"]),
            int(data["arrivals_total"]),
            int(data["warm_total"]),
            int(data["cold_total"]),
            data.get("mean_service_s"),
        )


@dataclass(frozen=True, slots=True)
class ScalingSpec:
    """Per-model limits every policy respects.

    floor / ceiling: fewest and most workers (ready + booting). slots_per_worker: batch slots
    of a worker, used until workers report theirs. target_utilization: the share of slots a
    policy plans to fill, leaving headroom for bursts (Knative's 70 %). keep_alive_s: how long
    a worker must have been idle before it may be released. default_service_s: service time
    assumed until one is observed. launch_grace_s: how long a requested worker may take to
    appear in observations before the request is presumed lost."""

    model: str
    floor: int = 0
    ceiling: int = 8
    slots_per_worker: int = 8
    target_utilization: float = 0.7
    keep_alive_s: float = 300.0
    default_service_s: float = 5.0
    launch_grace_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling:
            raise ValueError(f"need 0 <= floor <= ceiling, got {self.floor}, {self.ceiling}")
        if self.slots_per_worker < 1:
            raise ValueError(f"slots_per_worker must be >= 1, got {self.slots_per_worker}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {self.target_utilization}")

    def clamp(self, workers: int) -> int:
        return min(max(workers, self.floor), self.ceiling)

    def workers_for(self, concurrency: float) -> int:
        """Workers to hold `concurrency` requests at the target utilization.

        12 concurrent, 8 slots, 0.7 -> 12 / 5.6 = 2.14 -> 3 workers."""
        per_worker = self.slots_per_worker * self.target_utilization
        return math.ceil(round(concurrency / per_worker, 6))


@dataclass(frozen=True, slots=True)
class Decision:
    """One scaling action with its reason in words and the numbers it was based on.

    scale_up: start `count` workers. hold: nothing (count 0). release: drain and stop
    `worker_id` (count 1)."""

    action: ScaleAction
    count: int
    reason: str
    inputs: Mapping[str, Scalar] = field(default_factory=dict)
    worker_id: str | None = None

    @classmethod
    def scale_up(cls, count: int, reason: str, inputs: Mapping[str, Scalar]) -> Decision:
        return cls("scale_up", count, reason, inputs)

    @classmethod
    def hold(cls, reason: str, inputs: Mapping[str, Scalar]) -> Decision:
        return cls("hold", 0, reason, inputs)

    @classmethod
    def release(cls, worker_id: str, reason: str, inputs: Mapping[str, Scalar]) -> Decision:
        return cls("release", 1, reason, inputs, worker_id)

    def to_message(
        self, *, model: str, policy: str, decided_at: int, decision_id: str | None = None
    ) -> ScaleDecision:
        return ScaleDecision(
            model=model,
            action=self.action,
            count=self.count,
            worker_id=self.worker_id,
            reason=self.reason[:1024],
            inputs=dict(self.inputs),
            policy=policy,
            decided_at=decided_at,
            decision_id=decision_id,
        )


def rounded(inputs: Mapping[str, float | int | None]) -> dict[str, Scalar]:
    """Inputs for a decision: floats to 4 decimals so an audit reads easily."""
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in inputs.items()}


def pending_inputs(observation: Observation) -> dict[str, Scalar]:
    return {f"pending_{c}": observation.pending.get(c, 0) for c in LATENCY_CLASSES}


@dataclass(frozen=True, slots=True)
class Outstanding:
    """Actions a policy took that observations cannot show yet, so it does not repeat them.

    A scale_up of 2 at 10:00:00 is 2 unseen launches until two new worker ids appear (or
    `launch_grace_s` passes: the launch is presumed lost and may be asked for again). A
    release of w-3 keeps w-3 out of the counts while it still reports `ready`.

    known: worker ids in the last observation. releasing: worker id -> unix ms released."""

    known: frozenset[str] = frozenset()
    unseen_launches: int = 0
    launched_at: int | None = None
    releasing: Mapping[str, int] = field(default_factory=dict)

    def observed(self, observation: Observation, now: int, grace_ms: int) -> Outstanding:
        ids = frozenset(w.worker_id for w in observation.workers)
        unseen = max(self.unseen_launches - len(ids - self.known), 0)
        if self.launched_at is None or now - self.launched_at >= grace_ms:
            unseen = 0
        ready = {w.worker_id for w in observation.ready}
        releasing = {
            w: at for w, at in self.releasing.items() if w in ready and now - at < grace_ms
        }
        return Outstanding(ids, unseen, self.launched_at if unseen else None, releasing)

    def launched(self, count: int, now: int) -> Outstanding:
        return Outstanding(self.known, self.unseen_launches + count, now, self.releasing)

    def released(self, worker_id: str, now: int) -> Outstanding:
        releasing = {**self.releasing, worker_id: now}
        return Outstanding(self.known, self.unseen_launches, self.launched_at, releasing)

    def serving(self, observation: Observation) -> tuple[WorkerSnapshot, ...]:
        """Ready workers not being released."""
        return tuple(w for w in observation.ready if w.worker_id not in self.releasing)

    def active(self, observation: Observation) -> int:
        """Workers the pool has or will have: ready (not released) + booting + unseen."""
        return len(self.serving(observation)) + len(observation.booting) + self.unseen_launches

    def to_dict(self) -> dict[str, Any]:
        return {
            "known": sorted(self.known),
            "unseen_launches": self.unseen_launches,
            "launched_at": self.launched_at,
            "releasing": dict(self.releasing),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outstanding:
        return cls(
            frozenset(data["known"]),
            int(data["unseen_launches"]),
            data.get("launched_at"),
            {w: int(at) for w, at in data["releasing"].items()},
        )


def idle_for_release(
    observation: Observation, outstanding: Outstanding, now: int, min_idle_s: float
) -> list[WorkerSnapshot]:
    """Ready, idle workers not already released, idle for at least `min_idle_s`: the ones
    idle longest first (they are the least likely to be needed), then by id."""
    min_idle_ms = ms(min_idle_s)
    idle = [
        w
        for w in outstanding.serving(observation)
        if w.busy == 0 and w.idle_since is not None and now - w.idle_since >= min_idle_ms
    ]
    return sorted(idle, key=lambda w: (w.idle_since, w.worker_id))


def least_busy(observation: Observation, outstanding: Outstanding) -> list[WorkerSnapshot]:
    """Ready workers not already released, idle ones first (longest idle), then least busy."""
    far_future = 2**62
    return sorted(
        outstanding.serving(observation),
        key=lambda w: (
            w.busy,
            w.idle_since if w.idle_since is not None else far_future,
            w.worker_id,
        ),
    )


S = TypeVar("S")


class Policy(Protocol[S]):
    """A scaling policy: the predictive Ember policy and every baseline implement this.

    name: as written to ScaleDecision.policy (matches [a-z][a-z0-9_.]*)."""

    name: str

    def initial_state(self) -> S: ...

    def state_from_dict(self, data: Mapping[str, Any]) -> S: ...

    def decide(
        self, spec: ScalingSpec, state: S, observation: Observation, now: int
    ) -> tuple[S, list[Decision]]: ...
