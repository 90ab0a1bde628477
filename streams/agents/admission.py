"""Admission: `ember.requests` -> `ember.admitted`, a `rejected` chunk, or later.

A cancel on `ember.requests` (docs/PROTOCOL.md §5.3) is forwarded unchanged to
`ember.admitted`, keyed by model, for placement; when its request is deferred here, the
request is answered `cancelled` when it comes back instead of being admitted.

Each request is decoded (a bad key or value: dead letter, plus a `rejected` chunk when its
reply topic is readable) and handed to `streams.policy.admission.admit`, in order; the agent
takes the requests already waiting together and sends what they make at once
(`outbox.bursts`). A request's outcome:

- admit: the AdmittedRequest goes to `ember.admitted`, keyed by model, so one placement task
  owns each model;
- reject: a lone `rejected` TokenChunk with the policy's code and reason on the reply topic;
- defer: the request's bytes go, unchanged, to this app's `<group>-deferred` topic with the
  time to retry in the `ember-retry-at` header (unix ms). `retry_deferred` reads them back,
  waits until that time and admits them again. A delay topic rather than an in-memory timer:
  a deferred request survives a restart (its offset on `ember.requests` is committed once it
  is on the delay topic) and waiting holds no memory. Every request of one partition is
  deferred by the same `defer_s`, so the partition is in retry order and the agent sleeps
  only for its head.

The model loads admission bounds queues with come from placement through the `model-load`
global table, written when the load changes and at least once a second
(`streams.tables.load_row_due`); between two rows `admit` counts its own admissions.
Tenant token buckets live in this process: with several streams processes each one limits
the requests of its own partitions of `ember.requests`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import faust

from infra.logs import get_logger
from schemas import (
    Cancel,
    Request,
    TokenChunk,
    decode_key,
    decode_requests_record,
    headers_for,
    key_for,
)
from schemas.topics import ADMITTED
from streams.agents.outbox import (
    MEMO,
    Consumed,
    Out,
    bursts,
    count,
    now_ms,
    out,
    safely,
    send_all,
)
from streams.app import (
    RETRY_AT_HEADER,
    SETTINGS,
    app,
    deferred_topic,
    model_partition,
    requests_topic,
)
from streams.policy import AdmissionSpec, AdmissionState, ModelLoad, admit
from streams.tables import model_load

log = get_logger(__name__)

PRUNE_EVERY_MS = 60_000  # drop refilled tenant buckets and lost deferrals this often


def retry_at(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None) -> int:
    """The `ember-retry-at` header as unix ms; 0 (now) when absent or unreadable."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for key, value in pairs:
        if key == RETRY_AT_HEADER:
            try:
                return int(bytes(value).decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return 0
    return 0


class Admission:
    """The admission policy's state in this process and the step the agents run."""

    def __init__(
        self,
        spec: AdmissionSpec,
        deferred_topic_name: str,
        load_of: Callable[[str], Mapping[str, Any] | None],
    ) -> None:
        self.spec = spec
        self.state = AdmissionState()
        self.deferred_topic = deferred_topic_name
        self._load_of = load_of
        self._load_at: dict[str, int] = {}
        self._pruned_at = 0
        self._deferred: dict[str, int] = {}  # request id -> retry_at, while deferred
        self._cancelled: dict[str, Cancel] = {}  # deferred requests a cancel arrived for

    def _refresh(self, model: str, now: int) -> None:
        row = self._load_of(model)
        if row is not None and int(row.get("at", 0)) > self._load_at.get(model, -1):
            self._load_at[model] = int(row.get("at", 0))
            self.state = self.state.with_load(model, ModelLoad.from_dict(row))
        if now - self._pruned_at >= PRUNE_EVERY_MS:
            self._pruned_at = now
            self.state = self.state.without_full_buckets(self.spec, now)
            self._forget_lost_deferrals(now)

    def step(self, record: Consumed, now: int) -> list[Out]:
        """One record of `ember.requests` (or the deferred topic) in, the records to send out
        (see the module docstring)."""
        decode_key(record.key)
        message = decode_requests_record(record.value, record.headers)
        if isinstance(message, Cancel):
            return self._cancel(message, record, now)
        request = message
        if record.topic == self.deferred_topic:
            self._deferred.pop(request.request_id, None)
            cancel = self._cancelled.pop(request.request_id, None)
            if cancel is not None:
                return [out(cancelled_chunk(request, cancel, now), request.reply_topic)]
        self._refresh(request.model, now)
        self.state, result = admit(self.spec, self.state, request, now)
        count("ember_admission_total", model=_label(request.model), outcome=result.outcome,
              code=result.error_code or "")
        if result.outcome == "admit":
            assert result.admitted is not None
            # the partition the producer would pick for the model's key, known here: the
            # record goes out in a batch with the others of its partition (outbox.send_all)
            admitted = out(result.admitted, partition=model_partition(request.model))
            MEMO.remember(admitted.value, result.admitted)
            return [admitted]
        if result.outcome == "reject":
            log.info(
                "request rejected",
                request_id=request.request_id,
                model=request.model,
                code=result.error_code,
                reason=result.reason,
            )
            return [out(result.rejection(now), request.reply_topic)]
        assert result.retry_at is not None
        log.info(
            "request deferred",
            request_id=request.request_id,
            model=request.model,
            retry_at=result.retry_at,
            reason=result.reason,
        )
        self._deferred[request.request_id] = result.retry_at
        headers = [(k, bytes(v)) for k, v in _pairs(record.headers) if k != RETRY_AT_HEADER]
        headers.append((RETRY_AT_HEADER, str(result.retry_at).encode("ascii")))
        return [Out(self.deferred_topic, record.key, bytes(record.value or b""), tuple(headers))]

    def _cancel(self, cancel: Cancel, record: Consumed, now: int) -> list[Out]:
        """Forward a cancel to placement, unchanged; remember it for a deferred request."""
        if cancel.request_id in self._deferred:
            self._cancelled[cancel.request_id] = cancel
        count("ember_cancels_total", model=_label(cancel.model))
        value = bytes(record.value or b"")
        return [Out(ADMITTED, key_for(cancel, ADMITTED), value, tuple(headers_for(cancel)))]

    def _forget_lost_deferrals(self, now: int) -> None:
        """Deferred requests that never came back (their retry was lost, or another process
        took it): forgotten `max_defer_s` past their retry time."""
        horizon = now - round(self.spec.max_defer_s * 1000)
        for rid in [r for r, at in self._deferred.items() if at < horizon]:
            self._deferred.pop(rid, None)
            self._cancelled.pop(rid, None)


def cancelled_chunk(request: Request, cancel: Cancel, now: int) -> TokenChunk:
    """The terminal chunk of a request cancelled before it was admitted."""
    reason = cancel.reason or "cancelled by the client"
    return TokenChunk(
        request_id=request.request_id,
        seq=0,
        finish_reason="cancelled",
        error_message=f"cancelled while deferred: {reason}"[:1024],
        submitted_at=request.submitted_at,
        emitted_at=now,
    )


def _pairs(headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None) -> list[Any]:
    return list(headers.items() if isinstance(headers, Mapping) else (headers or ()))


def _label(model: str) -> str:
    return model if model in SETTINGS.models else "(unknown)"


ADMISSION = Admission(SETTINGS.admission_spec(), deferred_topic.get_topic_name(), model_load.get)


@app.agent(requests_topic, name="admission")
async def admission(stream: faust.StreamT[bytes]) -> None:
    async for events in bursts(stream):
        now = now_ms()
        await send_all(
            [o for e in events for o in safely("admission", Consumed.of(e), ADMISSION.step, now)]
        )


@app.agent(deferred_topic, name="retry-deferred")
async def retry_deferred(stream: faust.StreamT[bytes]) -> None:
    async for event in stream.events():
        record = Consumed.of(event)
        wait_ms = retry_at(record.headers) - now_ms()
        if wait_ms > 0:
            await asyncio.sleep(wait_ms / 1000)
        await send_all(safely("admission", record, ADMISSION.step, now_ms()))
