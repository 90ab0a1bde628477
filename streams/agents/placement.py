"""Placement: `ember.admitted` + `ember.lifecycle` -> a worker's partition of `ember.model.<m>`.

Both topics are keyed by model and co-partitioned, so one agent task reads, in order, every
request and every worker event of the models of its partitions, and owns their
PlacementState (streams.tables.PlacementStore). Each record goes through the pure placement
policy (`streams.policy.placement`); the agent writes the new state back and sends what the
step says. The agent takes the records already waiting together (`outbox.bursts`), and
admitted requests in a row of one model and class take one step (`on_admitted_all`: the same
as one after the other, with one copy of the state):

- each Placement: the AdmittedRequest (worker_id, warm, placed_at set by `placed_on`) to the
  worker's own partition of the model topic, keyed by request id. Workers are *assigned*
  their partition (no consumer group on the request path), so a worker joining or leaving
  never pauses the others' intake;
- a request abandoned after its last attempt, or expired in pending: its terminal chunk
  (`worker_failed`, `deadline_exceeded`) on its reply topic;
- a worker that went silent (missed heartbeats, start timeout): a `release` decision on
  `ember.decisions` (policy `placement`), so the supervisor stops what may still run.

A cancel on `ember.admitted` (docs/PROTOCOL.md §5.3) takes a pending request out of the
queue with its `cancelled` chunk, goes on, unchanged, to the worker's partition of a placed
request, and is dropped for a request placement no longer knows.

Time passing (dead workers, deadlines) is the timer's: `Placer.tick`, called by
streams.agents.autoscaler for each model this process owns. A request that arrives while its
model has no worker ready or booting wakes that timer at once (`Placer.on_empty_pool`): a
scale-up from zero waits for no tick.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import faust

from infra.logs import get_logger
from schemas import (
    AdmittedRequest,
    Cancel,
    LifecycleEvent,
    Message,
    ScaleDecision,
    TokenChunk,
    decode,
    decode_admitted_record,
    encode,
    headers_for,
    key_for,
)
from schemas.topics import LIFECYCLE, model_topic_name
from streams.agents.outbox import (
    MEMO,
    Consumed,
    Out,
    bursts,
    count,
    now_ms,
    out,
    rejected_outs,
    safely,
    send_all,
)
from streams.app import SETTINGS, app, placement_topic
from streams.policy import PlacementSpec, PlacementState, PlacementStep
from streams.policy.placement import failure_chunk, on_admitted_all, on_lifecycle, tick
from streams.policy.scaling import BOOTING_STATES
from streams.tables import PlacementStore, writing_for

log = get_logger(__name__)


class Placer:
    """Runs the placement policy for the models of this process and turns steps into Outs."""

    def __init__(self, specs: Mapping[str, PlacementSpec], store: PlacementStore) -> None:
        self.specs = specs
        self.store = store
        # called with the model when a request arrives and no worker is ready or booting
        self.on_empty_pool: Callable[[str], None] | None = None

    def on_record(self, record: Consumed, now: int) -> list[Out]:
        if record.topic == LIFECYCLE:
            event = decode(LifecycleEvent, record.value, record.headers)
            spec = self.specs.get(event.model)
            if spec is None:  # a worker of a model this deployment does not place
                count("ember_lifecycle_ignored_total")
                return []
            return self._apply(spec, lambda state: on_lifecycle(spec, state, event, now), now)
        message = _admitted_message(record)
        if isinstance(message, Cancel):
            return self._cancel(message, bytes(record.value or b""), now)
        if not isinstance(message, AdmittedRequest):
            raise TypeError(f"expected an admitted request, got {type(message).__name__}")
        request = message
        spec = self.specs.get(request.model)
        if spec is None:
            return [out(_unknown_model(request, now), request.request.reply_topic)]
        return self._admitted(spec, [(record, request)], now)

    def on_records(self, records: Sequence[Consumed], now: int) -> list[Out]:
        """Records that arrived together, in order: what `on_record` gives for each, one
        after the other (each bad record its dead letter). Admitted requests in a row of one
        model and latency class take one step of the policy (`on_admitted_all`)."""
        outs: list[Out] = []
        run: list[tuple[Consumed, AdmittedRequest]] = []
        for record in records:
            request = self._placeable(record)
            if run and (request is None or (request.model, request.latency_class) != (
                run[0][1].model, run[0][1].latency_class
            )):
                outs += self._run(run, now)
                run = []
            if request is None:
                outs += safely("placement", record, self.on_record, now)
            else:
                run.append((record, request))
        if run:
            outs += self._run(run, now)
        return outs

    def _placeable(self, record: Consumed) -> AdmittedRequest | None:
        """The admitted request of a model placed here that `record` holds; None for any
        other record (a worker's event, a cancel, a bad record, another model's request)."""
        if record.topic == LIFECYCLE:
            return None
        try:
            message = _admitted_message(record)
        except Exception:  # on_record meets it again and answers with the dead letter
            return None
        if isinstance(message, AdmittedRequest) and message.model in self.specs:
            return message
        return None

    def _run(self, run: list[tuple[Consumed, AdmittedRequest]], now: int) -> list[Out]:
        """A row of admitted requests of one model and class in one step. Should the step
        fail before the state changed, each one alone (its dead letter if it fails again);
        after, each its dead letter, as `safely` gives one record."""
        model = run[0][1].model
        before: PlacementState | None = None
        try:
            before = self.store.get(model)
            return self._admitted(self.specs[model], run, now)
        except Exception as exc:
            log.exception("placing requests together failed", model=model, requests=len(run))
            if self.store.cached().get(model) is before:
                step = self.on_record
                return [o for record, _ in run for o in safely("placement", record, step, now)]
            return [o for record, _ in run for o in rejected_outs(record, exc, "placement", now)]

    def _admitted(
        self, spec: PlacementSpec, run: list[tuple[Consumed, AdmittedRequest]], now: int
    ) -> list[Out]:
        requests = [request for _, request in run]
        as_received = {r.request_id: bytes(c.value or b"") for c, r in run}
        outs = self._apply(
            spec, lambda state: on_admitted_all(spec, state, requests, now), now, as_received
        )
        if self.on_empty_pool is not None and not has_pool(self.store.get(spec.model)):
            self.on_empty_pool(spec.model)
        return outs

    def _cancel(self, cancel: Cancel, value: bytes, now: int) -> list[Out]:
        """docs/PROTOCOL.md §5.3: a pending request leaves the queue with its `cancelled`
        chunk; a placed one gets the cancel on its worker's partition; others: nothing."""
        spec = self.specs.get(cancel.model)
        if spec is None:
            return []
        with writing_for(spec.model):
            old = self.store.get(spec.model)
            new, where = cancelled(old, cancel.request_id)
            self.store.put(old, new)
        count("ember_cancels_total", model=spec.model, where=where.kind)
        if where.kind == "pending":
            assert where.request is not None
            chunk = cancelled_chunk(where.request, cancel, now)
            return [out(chunk, where.request.request.reply_topic)]
        if where.kind == "placed":
            topic = model_topic_name(spec.model)
            key = key_for(cancel, topic)
            return [Out(topic, key, value, tuple(headers_for(cancel)), where.partition)]
        return []

    def tick(self, model: str, now: int) -> tuple[PlacementState, list[Out]]:
        """Time passing for one model; the state after it, and what to send. Also writes the
        model's row if only its load changed since the last tick."""
        spec = self.specs[model]
        outs = self._apply(spec, lambda state: tick(spec, state, now), now)
        with writing_for(model):
            self.store.flush(model)
        return self.store.get(model), outs

    def _apply(
        self,
        spec: PlacementSpec,
        change: Callable[[PlacementState], PlacementStep],
        now: int,
        encoded: Mapping[str, bytes] | None = None,
    ) -> list[Out]:
        """Run one policy function on the model's state, store the result, say what to send.
        Each placed request is encoded once, for its record and its table row."""
        model = spec.model
        with writing_for(model):
            old = self.store.get(model)
            step = change(old)
            known = dict(encoded or {})
            for p in step.placements:
                known[p.request.request_id] = encode(p.request)
            placed = [p.request.request_id for p in step.placements]
            self.store.put(old, step.state, known, placed)
        return self._outs(spec, step, now, known)

    def _outs(
        self, spec: PlacementSpec, step: PlacementStep, now: int, encoded: Mapping[str, bytes]
    ) -> list[Out]:
        model = spec.model
        topic = model_topic_name(model)
        outs = [
            Out(
                topic,
                key_for(p.request, topic),
                encoded[p.request.request_id],
                tuple(headers_for(p.request)),
                p.partition,
            )
            for p in step.placements
        ]
        for r in step.reassignments:
            log.warning(
                "request of a lost worker",
                request_id=r.request.request_id,
                model=model,
                worker_id=r.from_worker,
                outcome=r.outcome,
                reason=r.reason,
            )
            if r.outcome == "abandoned":
                chunk = failure_chunk(r.request, "worker_failed", r.reason, now)
                outs.append(out(chunk, r.request.request.reply_topic))
        for request in step.expired:
            why = "deadline_at passed while waiting for a worker"
            chunk = failure_chunk(request, "deadline_exceeded", why, now)
            outs.append(out(chunk, request.request.reply_topic))
        for gone in step.gone:
            log.warning("worker gone", model=model, worker_id=gone.worker_id, cause=gone.cause,
                        detail=gone.detail)
            if gone.cause in ("missed_heartbeats", "start_timeout"):
                outs.append(out(_stop(model, gone.worker_id, gone.detail, now)))
        if step.placements:
            count("ember_placements_total", len(step.placements), model=model)
        return outs


def _admitted_message(record: Consumed) -> Message:
    """A record of `ember.admitted`: the message admission made in this process for the same
    bytes (`MEMO`), else the record decoded and validated."""
    return MEMO.take(record.value) or decode_admitted_record(record.value, record.headers)


def has_pool(state: PlacementState) -> bool:
    """A worker of the model is ready or on its way (booting)."""
    return any(w.state == "ready" or w.state in BOOTING_STATES for w in state.workers.values())


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """Where a cancelled request was: `pending` (request set), `placed` (on the worker's
    `partition`), or `unknown` (finished, never seen, or its worker has no partition)."""

    kind: Literal["pending", "placed", "unknown"]
    request: AdmittedRequest | None = None
    partition: int | None = None


def cancelled(state: PlacementState, request_id: str) -> tuple[PlacementState, CancelTarget]:
    """The state without `request_id` in pending, and where the request was. A placed
    request stays in flight until its worker's heartbeats stop listing it (the worker ends it
    with its `cancelled` chunk)."""
    for cls, queue in state.pending.items():
        for i, request in enumerate(queue):
            if request.request_id == request_id:
                pending = {**state.pending, cls: queue[:i] + queue[i + 1 :]}
                return replace(state, pending=pending), CancelTarget("pending", request)
    flight = state.in_flight.get(request_id)
    worker = state.workers.get(flight.request.worker_id or "") if flight else None
    if worker is not None and worker.partition is not None:
        return state, CancelTarget("placed", flight.request if flight else None, worker.partition)
    return state, CancelTarget("unknown")


def cancelled_chunk(request: AdmittedRequest, cancel: Cancel, now: int) -> TokenChunk:
    """The terminal chunk of a request cancelled while it waited for a worker."""
    return TokenChunk(
        request_id=request.request_id,
        seq=0,
        attempt=request.attempt,
        finish_reason="cancelled",
        error_message=f"cancelled before it started: {cancel.reason or 'by the client'}"[:1024],
        submitted_at=request.request.submitted_at,
        emitted_at=now,
    )


def _unknown_model(request: AdmittedRequest, now: int) -> TokenChunk:
    return TokenChunk(
        request_id=request.request_id,
        seq=0,
        finish_reason="rejected",
        error_code="unknown_model",
        error_message=f"model {request.model[:80]!r} is not placed by this control plane",
        submitted_at=request.request.submitted_at,
        emitted_at=now,
    )


def _stop(model: str, worker_id: str, detail: str, now: int) -> ScaleDecision:
    return ScaleDecision(
        model=model,
        action="release",
        count=1,
        worker_id=worker_id,
        reason=f"placement lost worker {worker_id}: {detail}"[:1024],
        inputs={},
        policy="placement",
        decided_at=now,
        decision_id=uuid.uuid4().hex,
    )


PLACER = Placer({m: s.placement for m, s in SETTINGS.model_specs().items()}, PlacementStore())


@app.agent(placement_topic, name="placement")
async def placement(stream: faust.StreamT[bytes]) -> None:
    async for events in bursts(stream):
        records = [Consumed.of(event) for event in events]
        await send_all(PLACER.on_records(records, now_ms()))


@app.on_partitions_revoked.connect
async def _forget_on_revoke(app: faust.App, revoked: set[faust.types.TP], **kwargs: object) -> None:
    PLACER.store.forget()


@app.on_rebalance_complete.connect
async def _forget_on_rebalance(app: faust.App, **kwargs: object) -> None:
    PLACER.store.forget()
