"""A fake fleet for policy scenarios: decisions start and stop workers, a load function says
how many requests are in the system each tick, and a fake clock steps through it all.

Workers boot for `boot_s`, then are ready. Load is packed onto ready workers in id order, as
placement packs it, so surplus workers sit idle and the keep-alive rules can be seen. A
released worker drains for one tick, then is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from streams.policy.scaling import Decision, Observation, ScalingSpec, WorkerSnapshot

T0 = 1_764_403_200_000  # 2025-11-29 08:00 UTC, unix ms

# seconds since start -> (requests in the system, arrivals per second)
Load = Callable[[float], tuple[int, float]]


@dataclass
class FakeWorker:
    worker_id: str
    state: str
    ready_at: int
    busy: int = 0
    idle_since: int | None = None


@dataclass
class FakeFleet:
    model: str = "org/tiny"
    slots: int = 8
    boot_s: float = 20.0
    service_s: float = 4.0
    workers: dict[str, FakeWorker] = field(default_factory=dict)
    arrivals: float = 0.0
    warm: float = 0.0
    cold: float = 0.0
    started: int = 0
    last_at: int | None = None

    def apply(self, decisions: list[Decision], now: int) -> None:
        for d in decisions:
            if d.action == "scale_up":
                for _ in range(d.count):
                    wid = f"w-{self.started}"
                    self.started += 1
                    self.workers[wid] = FakeWorker(wid, "loading", now + int(self.boot_s * 1000))
            elif d.action == "release":
                assert d.worker_id in self.workers, f"released unknown {d.worker_id}"
                assert self.workers[d.worker_id].state == "ready", f"released a non-ready {d}"
                self.workers[d.worker_id].state = "draining"

    def observe(self, now: int, concurrency: int, rate_per_s: float) -> Observation:
        for wid, w in list(self.workers.items()):
            if w.state == "draining":
                del self.workers[wid]
            elif w.state == "loading" and now >= w.ready_at:
                w.state = "ready"
        left = concurrency
        for w in sorted(self.workers.values(), key=lambda w: int(w.worker_id[2:])):
            if w.state != "ready":
                continue
            w.busy = min(left, self.slots)
            left -= w.busy
            w.idle_since = (w.idle_since or now) if w.busy == 0 else None
        elapsed_s = 0.0 if self.last_at is None else (now - self.last_at) / 1000
        self.last_at = now
        arrived = rate_per_s * elapsed_s
        served_share = 1.0 if concurrency == 0 else 1 - left / concurrency
        self.arrivals += arrived
        self.warm += arrived * served_share
        self.cold += arrived * (1 - served_share)
        in_flight = concurrency - left
        return Observation(
            self.model,
            now,
            tuple(
                WorkerSnapshot(w.worker_id, w.state, w.busy, self.slots, w.idle_since)  # type: ignore[arg-type]
                for w in self.workers.values()
            ),
            {"interactive": left},
            in_flight,
            int(self.arrivals),
            int(self.warm),
            int(self.arrivals) - int(self.warm),
            self.service_s,
        )

    @property
    def live(self) -> int:
        return sum(w.state in ("loading", "ready") for w in self.workers.values())


@dataclass
class Tick:
    t_s: float
    observation: Observation
    decisions: list[Decision]
    live_after: int


def run(
    policy,
    spec: ScalingSpec,
    load: Load,
    seconds: float,
    *,
    tick_s: float = 2.0,
    state=None,
    fleet: FakeFleet | None = None,
    start: int = T0,
) -> tuple[list[Tick], object, FakeFleet]:
    """Step the fake clock every `tick_s` for `seconds`: observe, decide, apply."""
    fleet = fleet or FakeFleet(model=spec.model, slots=spec.slots_per_worker)
    state = policy.initial_state() if state is None else state
    ticks = []
    t = 0.0
    while t <= seconds:
        now = start + int(t * 1000)
        concurrency, rate = load(t)
        obs = fleet.observe(now, concurrency, rate)
        state, decisions = policy.decide(spec, state, obs, now)
        assert decisions, "a policy always says something"
        for d in decisions:
            d.to_message(model=spec.model, policy=policy.name, decided_at=now)  # valid on the wire
        fleet.apply(decisions, now)
        ticks.append(Tick(t, obs, decisions, fleet.live))
        t += tick_s
    return ticks, state, fleet


def actions(ticks: list[Tick], action: str) -> list[tuple[float, Decision]]:
    return [(tk.t_s, d) for tk in ticks for d in tk.decisions if d.action == action]


def steady(concurrency: int, rate: float) -> Load:
    return lambda t: (concurrency, rate)
