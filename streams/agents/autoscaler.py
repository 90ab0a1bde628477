"""The autoscaler and the control tick: every `tick_s`, and at once when placement finds a
request with no worker ready or booting for its model (a scale-up from zero waits for no
tick; woken ticks at most every `WOKEN_MIN_GAP_S`), for each model this process owns,

1. placement's `tick` (dead workers, expired requests) runs and its records are sent;
2. the model's Observation (`placement.observe`) is written into the metric tables
   (streams.tables.ObservationRecorder) and the `model-load` table admission reads;
3. the scaling policy (`EMBER_AUTOSCALER_POLICY`: Ember's predictive one or a baseline,
   all `decide(spec, state, observation, now)`) decides, its state goes back to the
   `autoscaler` table, and its decisions go to `ember.decisions` keyed by model, each with
   its reason and inputs, for the supervisor.

A `hold` is published when the previous published decision was something else, and then at
most every `EMBER_AUTOSCALER_HOLD_EVERY_S`, so the audit trail shows when the policy settled
without a record per tick; scale_up and release are always published.

A process owns a model when it holds the model's partition of `ember.admitted` (Faust's
assignor gives the same partition of every co-partitioned topic to one process). The tick
does nothing while a rebalance or table recovery is under way (flow control suspended), so
it never reads a table that is not recovered yet.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from infra.logs import get_logger
from schemas import ScaleDecision
from schemas.topics import ADMITTED
from streams.agents.outbox import Out, count, now_ms, out, send_all
from streams.agents.placement import PLACER
from streams.app import SETTINGS, app, model_partition
from streams.policy import Observation, Policy, ScalingSpec, observe
from streams.tables import ObservationRecorder, autoscaler, writing_for

log = get_logger(__name__)


class Autoscaler:
    """One scaling policy for every model; its state per model in the `autoscaler` table."""

    def __init__(
        self,
        policy: Policy[Any],
        specs: Mapping[str, ScalingSpec],
        hold_every_s: float,
        table: Any = autoscaler,
    ) -> None:
        self.policy = policy
        self.specs = specs
        self.hold_every_ms = round(hold_every_s * 1000)
        self.table = table

    def decide(self, obs: Observation, now: int) -> list[Out]:
        """Call inside `writing_for(obs.model)`."""
        model, policy = obs.model, self.policy
        row: dict[str, Any] = dict(self.table.get(model) or {})
        if row.get("policy") == policy.name:
            state = policy.state_from_dict(row["state"])
        else:  # first tick, or the policy was changed: start afresh
            state = policy.initial_state()
        state, decisions = policy.decide(self.specs[model], state, obs, now)
        messages = [
            d.to_message(model=model, policy=policy.name, decided_at=now,
                         decision_id=uuid.uuid4().hex)
            for d in decisions
        ]
        published = [m for m in messages if self._publish(m, row, now)]
        for m in published:
            row["last_sent_action"], row["last_sent_at"] = m.action, now
            count("ember_scale_decisions_total", model=model, action=m.action, policy=m.policy)
            if m.action != "hold":
                log.info("scale decision", model=model, action=m.action, count=m.count,
                         worker_id=m.worker_id, reason=m.reason, policy=m.policy)
        last = messages[-1] if messages else None
        self.table[model] = {
            **row,
            "policy": policy.name,
            "state": state.to_dict(),
            "last": None if last is None else _summary(last),
        }
        return [out(m) for m in published]

    def _publish(self, decision: ScaleDecision, row: Mapping[str, Any], now: int) -> bool:
        if decision.action != "hold" or row.get("last_sent_action") != "hold":
            return True
        return now - int(row.get("last_sent_at", 0)) >= self.hold_every_ms


def _summary(decision: ScaleDecision) -> dict[str, Any]:
    return {
        "action": decision.action,
        "count": decision.count,
        "worker_id": decision.worker_id,
        "reason": decision.reason,
        "inputs": dict(decision.inputs),
        "decided_at": decision.decided_at,
    }


RECORDER = ObservationRecorder(
    float((SETTINGS.config.get("autoscaler") or {}).get("hour_s", 3600.0))
)
AUTOSCALER = Autoscaler(
    SETTINGS.scaling_policy(),
    {m: s.scaling for m, s in SETTINGS.model_specs().items()},
    SETTINGS.hold_every_s,
)


def owned_models() -> list[str]:
    """The catalog's models whose partition of `ember.admitted` this process holds."""
    partitions = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == ADMITTED}
    return [m for m in SETTINGS.models if model_partition(m) in partitions]


def control_tick(model: str, now: int) -> list[Out]:
    """Steps 1-3 of the module docstring for one model."""
    with writing_for(model):
        state, outs = PLACER.tick(model, now)
        obs = observe(PLACER.specs[model], state, now)
        RECORDER.record(state, obs, now)
        return outs + AUTOSCALER.decide(obs, now)


WOKEN_MIN_GAP_S = 0.05


class TickLoop:
    """Calls `tick` every `every_s`, and early when woken, but never twice within
    `min_gap_s`. every 1 s, a wake 0.3 s after a tick -> a tick at once, the next 1 s later."""

    def __init__(self, every_s: float, min_gap_s: float = WOKEN_MIN_GAP_S) -> None:
        self.every_s = every_s
        self.min_gap_s = min_gap_s
        self._wake = asyncio.Event()

    def wake(self, model: str) -> None:
        """Placement's `on_empty_pool`: every model this process owns ticks."""
        self._wake.set()

    async def run(self, tick: Callable[[], Awaitable[None]]) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()
            try:
                await tick()
            except Exception:  # the loop outlives a failed tick
                log.exception("control tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.every_s)
            except asyncio.TimeoutError:
                continue
            gap = self.min_gap_s - (time.monotonic() - started)
            if gap > 0:
                await asyncio.sleep(gap)


LOOP = TickLoop(SETTINGS.tick_s)
PLACER.on_empty_pool = LOOP.wake


@app.task
async def control() -> None:
    await asyncio.sleep(SETTINGS.tick_s)
    await LOOP.run(tick)


async def tick() -> None:
    if app.rebalancing or not app.flow_control.is_active():
        return
    for model in owned_models():
        now = now_ms()
        try:
            outs = control_tick(model, now)
        except Exception:  # one model's failure must not stop the others' ticks
            log.exception("control tick failed", model=model)
            continue
        await send_all(outs)
