"""Placement: which worker of a model serves each admitted request, and what waits.

One PlacementState per model (the `admitted` and `lifecycle` topics are keyed by model, so
one agent task owns it). Four events change it, each a pure function returning a
PlacementStep (the new state, the placements to send, and what happened to the requests
of workers that went away):

    on_admitted(spec, state, request, now)   a request from `ember.admitted`
    on_lifecycle(spec, state, event, now)    a state change or heartbeat from `ember.lifecycle`
    on_completed(spec, state, request_id, now)   a completion signal, where one exists
    tick(spec, state, now)                   every second (at most dead_after_s / 2 apart):
                                             dead workers, expired deadlines

Choosing a worker. Only `ready` workers with a partition and room take requests (draining,
booting and dead ones never do). Room is the worker's slots minus the requests on it: ours
not yet finished, together with those its latest heartbeat lists. Among those with room
placement *packs*: a worker already running a batch and less than `pack_below` full (half,
by default) is preferred; only when every running batch is that full does an idle worker get
work. Continuous batching makes another sequence in a running batch nearly free, while an
idle worker left idle can be released by the autoscaler's keep-alive: packing saves
worker-seconds, and the cap keeps batches small enough that decode steps stay fast.
`pack_below=0` puts every worker with room in one tier (spreading). Within a tier workers
take turns (below); ties go to the least loaded, the worker ready longest, then the smaller
id, so placement is deterministic.

Sharing among candidates (stride scheduling, as weighted fair queueing does it). Within a
tier each candidate is weighed by its room, with a newly ready worker's room scaled by how long
it has been ready, from `slow_start_floor` at once to all of it `slow_start_s` later (Envoy's
slow start). Each worker has a `turn` on the model's virtual clock; the candidate with the
earliest turn (never earlier than the clock) takes the request, the clock moves to that turn
and the worker's next turn is 1 / weight later. So two workers with equal room alternate and
a newly ready one is eased in beside a serving one. Plain least-loaded on heartbeat counts
herds: a worker's finished requests reach placement only with its next heartbeat, so right
after one worker's heartbeat it looks least loaded and would be sent every request until its
count caught up, leaving the others without new work for that long (the intake gap of
benchmarks/control_plane.py). Load still breaks ties of turn, so a fresh state is least
loaded first. Room is never scaled: pending requests drain into every free slot at once, so
a cold burst waits for nothing.

Warm or cold. A request is `warm` iff a ready worker had room the moment it arrived (or, for
a re-placed one, the moment its worker was found dead). Requests that waited in pending are
`cold` when placed. Pending is ordered interactive, batch, eval; FIFO within a class; requests
of a dead worker go back at the head of their class. Pending drains whenever room appears.

Completion from heartbeats. Workers list what they finished since their previous event
(`LifecycleEvent.done`, in heartbeats and in the `stopped` / `failed` event): those requests
are finished, including short ones served between two heartbeats. A request is also finished
when a heartbeat no longer lists it in flight, having listed it before. For a worker whose
events carry no `done` (nil: an older worker, a test double), a request never listed is
taken as finished when a heartbeat of the still `ready` worker was taken
`unseen_done_after_s` after the placement (a request still waiting in the partition shows up
in the next ones, because placement never over-fills a worker). A draining worker stops
reading its partition, so what it neither listed nor reported done stays assigned and is
re-placed when it stops; the partition's next worker skips those records, placed on another
worker (see gpu_worker/worker.py), so each is served once. This assumes heartbeats list every
request in flight.

Dead workers. A worker is dead when it reports `failed`, or `stopped` (after a drain), or its
heartbeats stop for `dead_after_s` (`start_timeout_s` for a worker still booting, which sends
no heartbeats). Its unfinished requests are re-placed with attempt + 1
(`AdmittedRequest.placed_on`), at once where another worker has room, else at the head of
pending; a request already at `max_attempts` is abandoned (the agent fails it with
`worker_failed`). A worker that stopped after draining finished what it had read: only the
requests it neither listed nor reported done are re-placed; any worker's `done` requests are
finished, never re-placed. If the control plane itself stopped ticking for
longer than `dead_after_s`, workers get a fresh grace period instead of all being declared dead.

Time is unix ms (int) from the caller; the worker's clock (`event.at`) is used only to order
its own events and to compare with placement times.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from schemas import LATENCY_CLASSES, AdmittedRequest, LifecycleEvent, TokenChunk, WorkerState
from streams.policy.scaling import Observation, WorkerSnapshot
from streams.policy.windows import ms

HEARTBEATING: tuple[WorkerState, ...] = ("ready", "draining")
GONE: tuple[WorkerState, ...] = ("stopped", "failed")


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    """Placement settings of one model; see the module docstring for each rule.

    service_smoothing: weight of each finished request in the mean service time (an EWMA)."""

    model: str
    dead_after_s: float = 5.0
    start_timeout_s: float = 600.0
    default_slots: int = 8
    pack_below: float = 0.5
    unseen_done_after_s: float = 3.0
    max_attempts: int = 3
    service_smoothing: float = 0.1
    slow_start_s: float = 1.0
    slow_start_floor: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.slow_start_floor <= 1:
            raise ValueError(f"slow_start_floor must be in (0, 1], got {self.slow_start_floor}")


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker of the model, from its lifecycle events and our placements.

    total_slots: None until a heartbeat reports it (then spec.default_slots is assumed).
    reported: request ids of its latest heartbeat. assigned: ids we placed on it, unfinished.
    last_seen_at: our clock when its latest event arrived; last_event_at: that event's `at`.
    ready_since / idle_since: our clock; idle_since is set while ready with nothing to do.
    turn: when, on the model's virtual clock, it takes its next request (see "Sharing")."""

    worker_id: str
    state: WorkerState
    partition: int | None = None
    node: str | None = None
    total_slots: int | None = None
    reported: frozenset[str] = frozenset()
    assigned: frozenset[str] = frozenset()
    last_seen_at: int = 0
    last_event_at: int = 0
    ready_since: int | None = None
    idle_since: int | None = None
    turn: float = 0.0

    def slots(self, spec: PlacementSpec) -> int:
        return spec.default_slots if self.total_slots is None else self.total_slots

    @property
    def busy(self) -> int:
        """Requests on it: ours not finished and those its latest heartbeat lists (without
        building their union: placement asks for every request it places)."""
        if not self.reported:
            return len(self.assigned)
        return len(self.assigned) + len(self.reported.difference(self.assigned))

    def room(self, spec: PlacementSpec) -> int:
        if self.state != "ready" or self.partition is None:
            return 0
        return max(self.slots(spec) - self.busy, 0)

    def occupancy(self, spec: PlacementSpec) -> float:
        return self.busy / max(self.slots(spec), 1)

    def with_work(self, assigned: frozenset[str], reported: frozenset[str], now: int) -> WorkerView:
        """New request sets, idle_since following them: 0 busy since `now` (or earlier)."""
        idle = self.state == "ready" and not assigned and not reported
        idle_since = (now if self.idle_since is None else self.idle_since) if idle else None
        return replace(self, assigned=assigned, reported=reported, idle_since=idle_since)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "state": self.state,
            "partition": self.partition,
            "node": self.node,
            "total_slots": self.total_slots,
            "reported": sorted(self.reported),
            "assigned": sorted(self.assigned),
            "last_seen_at": self.last_seen_at,
            "last_event_at": self.last_event_at,
            "ready_since": self.ready_since,
            "idle_since": self.idle_since,
            "turn": self.turn,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerView:
        return cls(
            data["worker_id"],
            data["state"],
            data.get("partition"),
            data.get("node"),
            data.get("total_slots"),
            frozenset(data["reported"]),
            frozenset(data["assigned"]),
            int(data["last_seen_at"]),
            int(data["last_event_at"]),
            data.get("ready_since"),
            data.get("idle_since"),
            float(data.get("turn", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class InFlight:
    """A placed request (worker_id set) and whether its worker's heartbeats listed it yet."""

    request: AdmittedRequest
    seen: bool = False


@dataclass(frozen=True, slots=True)
class PlacementState:
    """A model's workers, pending queue per latency class, requests in flight and counters.

    arrivals_total / warm_total / cold_total: requests that arrived, and whether each was
    placed at once (warm) or had to wait (cold). completed_total: requests finished.
    mean_service_ms: smoothed placement-to-finish time. last_tick_at: our clock at the last
    tick. clock: placement's virtual clock, the turn of the latest placement (see "Sharing")."""

    model: str
    workers: Mapping[str, WorkerView] = field(default_factory=dict)
    pending: Mapping[str, tuple[AdmittedRequest, ...]] = field(default_factory=dict)
    in_flight: Mapping[str, InFlight] = field(default_factory=dict)
    arrivals_total: int = 0
    warm_total: int = 0
    cold_total: int = 0
    completed_total: int = 0
    mean_service_ms: float | None = None
    last_tick_at: int | None = None
    clock: float = 0.0

    def queued(self, latency_class: str) -> tuple[AdmittedRequest, ...]:
        return self.pending.get(latency_class, ())

    def is_known(self, request_id: str) -> bool:
        if request_id in self.in_flight:
            return True
        return any(r.request_id == request_id for q in self.pending.values() for r in q)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "workers": {w: v.to_dict() for w, v in self.workers.items()},
            "pending": {c: [r.to_map() for r in q] for c, q in self.pending.items()},
            "in_flight": {
                rid: {"request": f.request.to_map(), "seen": f.seen}
                for rid, f in self.in_flight.items()
            },
            "arrivals_total": self.arrivals_total,
            "warm_total": self.warm_total,
            "cold_total": self.cold_total,
            "completed_total": self.completed_total,
            "mean_service_ms": self.mean_service_ms,
            "last_tick_at": self.last_tick_at,
            "clock": self.clock,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlacementState:
        return cls(
            data["model"],
            {w: WorkerView.from_dict(v) for w, v in data["workers"].items()},
            {c: tuple(AdmittedRequest.from_map(r) for r in q) for c, q in data["pending"].items()},
            {
                rid: InFlight(AdmittedRequest.from_map(f["request"]), bool(f["seen"]))
                for rid, f in data["in_flight"].items()
            },
            int(data["arrivals_total"]),
            int(data["warm_total"]),
            int(data["cold_total"]),
            int(data["completed_total"]),
            data.get("mean_service_ms"),
            data.get("last_tick_at"),
            float(data.get("clock", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class Placement:
    """Send `request` (worker_id, warm and placed_at set) to `partition` of the model topic,
    keyed by request id."""

    request: AdmittedRequest
    partition: int


@dataclass(frozen=True, slots=True)
class Reassignment:
    """What became of one unfinished request of a worker that went away.

    replaced: placed on another worker now (its Placement is in the same step). pending: back
    at the head of the queue. abandoned: at max_attempts; fail it with `worker_failed`."""

    request: AdmittedRequest  # as it was on the dead worker
    from_worker: str
    outcome: Literal["replaced", "pending", "abandoned"]
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerGone:
    """A worker placement stopped counting on. For `missed_heartbeats` and `start_timeout` the
    process may still exist: the supervisor should stop it."""

    worker_id: str
    cause: Literal["stopped", "failed", "missed_heartbeats", "start_timeout"]
    detail: str


@dataclass(frozen=True, slots=True)
class PlacementStep:
    """The result of every placement function. The agent writes `state` back to its table,
    then sends every placement; fails abandoned and expired requests (`failure_chunk`)."""

    state: PlacementState
    placements: tuple[Placement, ...] = ()
    reassignments: tuple[Reassignment, ...] = ()
    gone: tuple[WorkerGone, ...] = ()
    expired: tuple[AdmittedRequest, ...] = ()


# --- choosing a worker and draining pending ----------------------------------------------


def choose_worker(
    spec: PlacementSpec, workers: Iterable[WorkerView], now: int | None = None, clock: float = 0.0
) -> WorkerView | None:
    """The worker the next request goes to, or None when no ready worker has room.

    pack_below 0.5, 8 slots: A runs 3 (0.375), B runs 5 (0.625), C idle -> A. A at 4 (0.5)
    and B at 5 -> C, the least loaded of all. Turns: A's next turn at 2.0, B's at 1.5, clock
    1.0 -> B. Slow start (`now` given, slow_start_s 1, floor 0.1): B ready 0 ms ago weighs
    a tenth of its room, so each request it takes puts its turn 10x further off than A's."""
    best, best_key = None, None
    for w in workers:
        if w.room(spec) <= 0:
            continue
        busy, slots = w.busy, w.slots(spec)
        packing = busy > 0 and busy / slots < spec.pack_below
        load = (busy + 1) / (slots * _warmed(spec, w, now))
        # packing candidates first, then the earliest turn, least loaded, ready longest, id
        key = (not packing, max(w.turn, clock), load, w.ready_since or 0, w.worker_id)
        if best_key is None or key < best_key:
            best, best_key = w, key
    return best


def _warmed(spec: PlacementSpec, worker: WorkerView, now: int | None) -> float:
    """The share of its room a worker weighs with: slow start."""
    if now is None or worker.ready_since is None or spec.slow_start_s <= 0:
        return 1.0
    ramp = (now - worker.ready_since) / (spec.slow_start_s * 1000)
    return min(1.0, max(spec.slow_start_floor, ramp))


def _took_turn(
    spec: PlacementSpec, worker: WorkerView, now: int, clock: float
) -> tuple[float, float]:
    """(the worker's next turn, the clock) after it took a request."""
    turn = max(worker.turn, clock)
    return turn + 1.0 / (worker.room(spec) * _warmed(spec, worker, now)), turn


def _drain(
    spec: PlacementSpec, state: PlacementState, now: int, fresh: frozenset[str] = frozenset()
) -> tuple[PlacementState, list[Placement]]:
    """Place pending requests, interactive first, while any worker has room. Requests in
    `fresh` arrived in this step: placed now, they are warm; all others waited: cold."""
    if not any(state.pending.values()):
        return state, []
    workers = dict(state.workers)
    in_flight = dict(state.in_flight)
    pending = dict(state.pending)
    clock = state.clock
    placements: list[Placement] = []
    for cls in LATENCY_CLASSES:
        queue = pending.get(cls, ())
        taken = 0
        while taken < len(queue):
            worker = choose_worker(spec, workers.values(), now, clock)
            if worker is None or worker.partition is None:
                break
            request = queue[taken]
            taken += 1
            placed = request.placed_on(worker.worker_id, warm=request.request_id in fresh, at=now)
            turn, clock = _took_turn(spec, worker, now, clock)
            workers[worker.worker_id] = replace(
                worker.with_work(worker.assigned | {placed.request_id}, worker.reported, now),
                turn=turn,
            )
            in_flight[placed.request_id] = InFlight(placed)
            placements.append(Placement(placed, worker.partition))
        pending[cls] = queue[taken:]
    state = replace(state, workers=workers, in_flight=in_flight, pending=pending, clock=clock)
    return state, placements


def _finished(
    spec: PlacementSpec, state: PlacementState, request_ids: Iterable[str], now: int
) -> PlacementState:
    """Forget finished requests and fold their service times into the mean.

    mean 4000 ms, a request placed 6000 ms ago finishes, smoothing 0.1 -> 4000 + 0.1 x 2000
    = 4200 ms."""
    in_flight = dict(state.in_flight)
    mean, done = state.mean_service_ms, 0
    for rid in request_ids:
        flight = in_flight.pop(rid, None)
        if flight is None:
            continue
        done += 1
        took = float(max(now - (flight.request.placed_at or now), 0))
        mean = took if mean is None else mean + spec.service_smoothing * (took - mean)
    return replace(
        state,
        in_flight=in_flight,
        completed_total=state.completed_total + done,
        mean_service_ms=mean,
    )


# --- the four events ----------------------------------------------------------------------


def on_admitted(
    spec: PlacementSpec, state: PlacementState, request: AdmittedRequest, now: int
) -> PlacementStep:
    """A newly admitted request: placed at once (warm) when a ready worker has room, else
    queued (cold). A request id already pending or in flight (a redelivered record) changes
    nothing. Raises ValueError for a request of another model (a routing bug)."""
    if request.model != spec.model:
        raise ValueError(f"placement of {spec.model!r} got a request for {request.model!r}")
    if state.is_known(request.request_id):
        return PlacementStep(state)
    if not any(state.pending.values()):
        step = _place_at_once(spec, state, request, now)
        if step is not None:
            return step
    return _queue_and_drain(spec, state, [request], now)


def on_admitted_all(
    spec: PlacementSpec, state: PlacementState, requests: Sequence[AdmittedRequest], now: int
) -> PlacementStep:
    """Requests of one latency class that arrived together, in order: the same step as
    `on_admitted` for one after the other (pending drains whenever room appears, so it is
    empty or there is no room, and a class's requests queue in arrival order), with one copy
    of the state for them all. Raises ValueError for a request of another model or class."""
    fresh: list[AdmittedRequest] = []
    ids: set[str] = set()
    for request in requests:
        if request.model != spec.model:
            raise ValueError(f"placement of {spec.model!r} got a request for {request.model!r}")
        if request.latency_class != requests[0].latency_class:
            raise ValueError("on_admitted_all takes requests of one latency class")
        if request.request_id not in ids and not state.is_known(request.request_id):
            ids.add(request.request_id)
            fresh.append(request)
    if len(fresh) <= 1:
        return on_admitted(spec, state, fresh[0], now) if fresh else PlacementStep(state)
    return _queue_and_drain(spec, state, fresh, now)


def _place_at_once(
    spec: PlacementSpec, state: PlacementState, request: AdmittedRequest, now: int
) -> PlacementStep | None:
    """`on_admitted` while nothing waits: the request goes to the chosen worker at once
    (warm), or None when no worker has room. The same step as queueing it and draining
    (`_queue_and_drain`), with one copy of the worker and of the state instead of five."""
    worker = choose_worker(spec, state.workers.values(), now, state.clock)
    if worker is None or worker.partition is None:
        return None
    placed = request.placed_on(worker.worker_id, warm=True, at=now)
    turn, clock = _took_turn(spec, worker, now, state.clock)
    # it has work now: not idle (`with_work`)
    taken = replace(worker, assigned=worker.assigned | {placed.request_id}, idle_since=None,
                    turn=turn)
    pending = state.pending
    if len(pending) != len(LATENCY_CLASSES):  # draining leaves every class's queue, empty
        pending = {**pending, **{c: () for c in LATENCY_CLASSES if c not in pending}}
    new = replace(
        state,
        workers={**state.workers, worker.worker_id: taken},
        in_flight={**state.in_flight, placed.request_id: InFlight(placed)},
        pending=pending,
        clock=clock,
        arrivals_total=state.arrivals_total + 1,
        warm_total=state.warm_total + 1,
    )
    return PlacementStep(new, (Placement(placed, worker.partition),))


def _queue_and_drain(
    spec: PlacementSpec, state: PlacementState, requests: Sequence[AdmittedRequest], now: int
) -> PlacementStep:
    """`on_admitted` in general, for new requests of one class: they join the tail of their
    class's queue, and pending drains into whatever room there is. Those placed now are
    warm, the others cold."""
    cls = requests[0].latency_class
    queued = replace(state, pending={**state.pending, cls: (*state.queued(cls), *requests)})
    ids = frozenset(r.request_id for r in requests)
    drained, placements = _drain(spec, queued, now, ids)
    warm = sum(p.request.request_id in ids for p in placements)
    counted = replace(
        drained,
        arrivals_total=drained.arrivals_total + len(requests),
        warm_total=drained.warm_total + warm,
        cold_total=drained.cold_total + len(requests) - warm,
    )
    return PlacementStep(counted, tuple(placements))


def on_lifecycle(
    spec: PlacementSpec, state: PlacementState, event: LifecycleEvent, now: int
) -> PlacementStep:
    """A worker's event: registers it, follows its state, reads capacity and finished
    requests from heartbeats, re-places the work of a worker that failed or stopped, and
    drains pending into any room that appeared. Events of other models, and events older than
    the worker's latest, change nothing."""
    if event.model != spec.model:
        return PlacementStep(state)
    worker = state.workers.get(event.worker_id)
    if worker is not None and event.at < worker.last_event_at:
        return PlacementStep(state)
    if event.state in GONE:
        if worker is None:
            return PlacementStep(state)
        cause: Literal["stopped", "failed"] = "failed" if event.state == "failed" else "stopped"
        gone = WorkerGone(worker.worker_id, cause, event.reason or f"reported {event.state}")
        return _without_workers(spec, state, [(worker, gone)], now, frozenset(event.done or ()))

    if worker is None:
        worker = WorkerView(event.worker_id, event.state)
    if event.state != "ready":
        ready_since = None
    elif worker.state != "ready" or worker.ready_since is None:
        ready_since = now
    else:
        ready_since = worker.ready_since
    worker = replace(
        worker,
        state=event.state,
        partition=worker.partition if event.partition is None else event.partition,
        node=worker.node if event.node is None else event.node,
        total_slots=worker.total_slots if event.total_slots is None else event.total_slots,
        last_seen_at=now,
        last_event_at=event.at,
        ready_since=ready_since,
    )
    reported, finished = worker.reported, []
    if event.kind == "heartbeat":
        reported = frozenset(event.in_flight)
        done = frozenset(event.done or ())
        in_flight = dict(state.in_flight)
        unseen_done_ms = ms(spec.unseen_done_after_s)
        for rid in worker.assigned:
            flight = in_flight[rid]
            if rid in done:
                finished.append(rid)
            elif rid in reported:
                if not flight.seen:
                    in_flight[rid] = InFlight(flight.request, seen=True)
            elif flight.seen:
                finished.append(rid)
            elif (
                event.done is None
                and event.state == "ready"
                and event.at - (flight.request.placed_at or 0) >= unseen_done_ms
            ):
                finished.append(rid)  # served between two heartbeats
        state = replace(state, in_flight=in_flight)
    worker = worker.with_work(worker.assigned.difference(finished), reported, now)
    state = replace(state, workers={**state.workers, worker.worker_id: worker})
    state = _finished(spec, state, finished, now)
    state, placements = _drain(spec, state, now)
    return PlacementStep(state, tuple(placements))


def on_completed(
    spec: PlacementSpec, state: PlacementState, request_id: str, now: int
) -> PlacementStep:
    """A request finished (a completion signal, where the agent has one; heartbeats alone are
    enough otherwise). Its slot goes to the head of pending. Unknown ids change nothing."""
    flight = state.in_flight.get(request_id)
    if flight is None:
        return PlacementStep(state)
    worker = state.workers.get(flight.request.worker_id or "")
    if worker is not None:
        worker = worker.with_work(
            worker.assigned - {request_id}, worker.reported - {request_id}, now
        )
        state = replace(state, workers={**state.workers, worker.worker_id: worker})
    state = _finished(spec, state, [request_id], now)
    state, placements = _drain(spec, state, now)
    return PlacementStep(state, tuple(placements))


def tick(spec: PlacementSpec, state: PlacementState, now: int) -> PlacementStep:
    """Time passing: requests in pending past their deadline expire; workers silent for too
    long are dead and their requests re-placed; pending drains."""
    dead_after, start_timeout = ms(spec.dead_after_s), ms(spec.start_timeout_s)
    if state.last_tick_at is not None and now - state.last_tick_at > dead_after:
        # We were away (restart, pause): the silence is ours, not the workers'.
        workers = {
            w: replace(v, last_seen_at=max(v.last_seen_at, now)) for w, v in state.workers.items()
        }
        state = replace(state, workers=workers)
    pending, expired = {}, []
    for cls, queue in state.pending.items():
        late = {
            r.request_id
            for r in queue
            if r.request.deadline_at is not None and r.request.deadline_at <= now
        }
        expired += [r for r in queue if r.request_id in late]
        pending[cls] = tuple(r for r in queue if r.request_id not in late) if late else queue
    state = replace(state, pending=pending, last_tick_at=now)

    dead: list[tuple[WorkerView, WorkerGone]] = []
    for worker in sorted(state.workers.values(), key=lambda w: w.worker_id):
        silent_ms = now - worker.last_seen_at
        if worker.state in HEARTBEATING and silent_ms > dead_after:
            detail = f"no event for {silent_ms / 1000:.1f} s (> {spec.dead_after_s:g} s)"
            dead.append((worker, WorkerGone(worker.worker_id, "missed_heartbeats", detail)))
        elif worker.state not in HEARTBEATING and silent_ms > start_timeout:
            detail = (
                f"{worker.state} for {silent_ms / 1000:.0f} s without an event "
                f"(> {spec.start_timeout_s:g} s)"
            )
            dead.append((worker, WorkerGone(worker.worker_id, "start_timeout", detail)))
    step = _without_workers(spec, state, dead, now)
    return replace(step, expired=tuple(expired))


def _without_workers(
    spec: PlacementSpec,
    state: PlacementState,
    dead: list[tuple[WorkerView, WorkerGone]],
    now: int,
    done: frozenset[str] = frozenset(),
) -> PlacementStep:
    """Remove workers; re-place what they left unfinished (see the module docstring), after
    all of them are gone, so nothing is re-placed onto another of them. `done`: request ids
    the workers reported finished in their last event. Drains pending."""
    left: list[tuple[AdmittedRequest, str]] = []  # (request, reason)
    finished: list[str] = []
    for worker, gone in dead:
        why = f"worker {worker.worker_id} {gone.cause}: {gone.detail}"
        for rid in sorted(worker.assigned):
            flight = state.in_flight.get(rid)
            if flight is None:
                continue
            if rid in done or (gone.cause == "stopped" and flight.seen):
                finished.append(rid)  # reported done, or read by a worker that drained
            else:
                left.append((flight.request, why))
    gone_ids = {worker.worker_id for worker, _ in dead}
    workers = {w: v for w, v in state.workers.items() if w not in gone_ids}
    state = _finished(spec, replace(state, workers=workers), finished, now)

    left.sort(key=lambda x: (LATENCY_CLASSES.index(x[0].latency_class), x[0].placed_at or 0))
    retry = [r for r, _ in left if r.attempt < spec.max_attempts]
    left_ids = {r.request_id for r, _ in left}
    in_flight = {k: v for k, v in state.in_flight.items() if k not in left_ids}
    pending = dict(state.pending)
    for cls in LATENCY_CLASSES:
        back = tuple(r for r in retry if r.latency_class == cls)
        if back:
            pending[cls] = back + state.queued(cls)
    state = replace(state, in_flight=in_flight, pending=pending)
    state, placements = _drain(spec, state, now, frozenset(r.request_id for r in retry))

    placed_ids = {p.request.request_id for p in placements}
    reassignments = []
    for request, why in left:
        if request.attempt >= spec.max_attempts:
            outcome: Literal["replaced", "pending", "abandoned"] = "abandoned"
            why = f"{why}; attempt {request.attempt} was the last"
        else:
            outcome = "replaced" if request.request_id in placed_ids else "pending"
        reassignments.append(Reassignment(request, request.worker_id or "", outcome, why))
    return PlacementStep(
        state, tuple(placements), tuple(reassignments), tuple(gone for _, gone in dead)
    )


# --- what the autoscaler, admission and the agent read ------------------------------------


def observe(spec: PlacementSpec, state: PlacementState, now: int) -> Observation:
    """The numbers the autoscaler decides on (and admission's ModelLoad comes from): workers
    by state with their load, pending per class (the queue depth), requests in flight, the
    arrival / warm / cold counters and the mean service time."""
    workers = tuple(
        WorkerSnapshot(w.worker_id, w.state, w.busy, w.slots(spec), w.idle_since)
        for w in sorted(state.workers.values(), key=lambda w: w.worker_id)
    )
    return Observation(
        model=state.model,
        at=now,
        workers=workers,
        pending={c: len(state.queued(c)) for c in LATENCY_CLASSES},
        in_flight=len(state.in_flight),
        arrivals_total=state.arrivals_total,
        warm_total=state.warm_total,
        cold_total=state.cold_total,
        mean_service_s=None if state.mean_service_ms is None else state.mean_service_ms / 1000,
    )


def failure_chunk(request: AdmittedRequest, code: str, message: str, now: int) -> TokenChunk:
    """The terminal chunk for a request placement gives up on (`worker_failed` for an
    abandoned one, `deadline_exceeded` for an expired one). It opens a new stream (seq 0, the
    next attempt), so a client that saw output of an earlier attempt accepts it."""
    attempt = request.attempt + 1 if request.placed else request.attempt
    return TokenChunk(
        request_id=request.request_id,
        seq=0,
        attempt=min(attempt, 64),
        finish_reason="error",
        error_code=code,
        error_message=message[:1024],
        submitted_at=request.request.submitted_at,
        emitted_at=now,
    )
