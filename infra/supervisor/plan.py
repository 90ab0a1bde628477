"""What the supervisor does, decided without processes, Kafka or a clock.

Inputs are scale decisions, worker exits and the passing of time (`now`, monotonic seconds,
and `now_ms`, unix ms, are arguments); outputs are `Action`s that the I/O layer
(infra.supervisor.supervisor) carries out through a backend. `Fleet` is the supervisor's
belief about its workers; its `on_*` methods plan (pure functions below) and then record what
they planned, so the next plan sees it.

Invariants:
- a model's partition is owned by at most one live worker (running or draining) or one
  pending restart; `scale_up(n)` takes the lowest free partitions;
- a crashed worker (non-zero exit, not asked to stop) is restarted on the SAME partition with
  a NEW worker id, so the requests it had not committed are read again by its replacement;
- restarts back off exponentially and stop after `max_restarts` in `window_s`.

Worked example (RestartPolicy(max_restarts=3, window_s=300, backoff_s=1, max_backoff_s=30)):
a worker on partition 2 dies at t=10 -> restart due at t=11 (1 s, no recent restarts); it dies
again at t=20 -> due at t=22 (2 s, one recent); at t=30 -> due at t=34 (4 s); at t=40 -> three
restarts since t=-260: give up, partition 2 is free for the next scale_up.
"""

from __future__ import annotations

import os
import re
import signal
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from schemas import ScaleDecision
from schemas.limits import MAX_ID_CHARS

# `StartWorker` that the backend could not carry out is reported back as this exit code, so a
# start failure goes through the same restart policy as a crash.
START_FAILED = 127
SEEN_DECISIONS = 4096  # decision ids remembered, to drop a redelivered decision


class CatalogError(ValueError):
    """A `--model NAME=DIR` entry that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class ModelCatalog:
    """The models this supervisor may start, name -> checkpoint directory."""

    models: Mapping[str, Path]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ModelCatalog:
        """From `NAME=DIR` strings (CLI `--model`, or EMBER_MODELS split on commas)."""
        models: dict[str, Path] = {}
        for entry in entries:
            name, sep, path = entry.strip().partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise CatalogError(
                    f"model entry {entry!r}: expected NAME=DIR, e.g. tiny=models/tiny"
                )
            if name in models:
                raise CatalogError(f"model {name!r} is given twice")
            models[name] = Path(path).expanduser().resolve()
        return cls(models)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ModelCatalog:
        """EMBER_MODELS="tiny=models/tiny,llama=/models/llama" (empty: no models)."""
        value = (os.environ if env is None else env).get("EMBER_MODELS", "")
        return cls.parse(e for e in value.split(",") if e.strip())

    def check(self) -> None:
        """Every directory exists (a checkpoint: config.json, or a packed artifact)."""
        for name, path in self.models.items():
            if not path.is_dir():
                raise CatalogError(f"model {name!r}: {path} is not a directory")

    def __contains__(self, model: object) -> bool:
        return model in self.models


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a crashed worker after `backoff_s * 2**recent` seconds (at most
    `max_backoff_s`), where `recent` is its partition's restarts in the last `window_s`; give
    up once `recent` reaches `max_restarts`."""

    max_restarts: int = 3
    window_s: float = 300.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_s < 0:
            raise ValueError(
                "RestartPolicy: max_restarts >= 0, window_s > 0 and backoff_s >= 0, got "
                f"{self.max_restarts}, {self.window_s}, {self.backoff_s}"
            )

    def delay_s(self, recent: int) -> float | None:
        """Seconds before the next restart, or None: give up."""
        if recent >= self.max_restarts:
            return None
        return min(self.max_backoff_s, self.backoff_s * 2**recent)


# -- state -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    model: str
    partition: int
    started_at: float  # monotonic s
    restart_of: str | None = None  # the crashed worker it replaces
    draining_since: float | None = None  # monotonic s; None: serving (or starting)
    killed: bool = False


@dataclass(frozen=True)
class PendingRestart:
    worker_id: str  # the replacement's id
    model: str
    partition: int
    restart_of: str
    due_at: float  # monotonic s


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartWorker:
    worker_id: str
    model: str
    partition: int
    reason: str
    restart_of: str | None = None


@dataclass(frozen=True)
class DrainWorker:
    """SIGTERM: finish in flight, then exit."""

    worker_id: str
    reason: str


@dataclass(frozen=True)
class KillWorker:
    worker_id: str
    reason: str


@dataclass(frozen=True)
class ReportFailed:
    """Publish a `failed` lifecycle event: the worker died without (necessarily) saying so."""

    worker_id: str
    model: str
    partition: int
    reason: str


@dataclass(frozen=True)
class ScheduleRestart:
    restart: PendingRestart
    reason: str


@dataclass(frozen=True)
class CancelRestart:
    restart: PendingRestart
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """No more restarts for this partition (for now): it is free again."""

    worker_id: str
    model: str
    partition: int
    reason: str


@dataclass(frozen=True)
class Refuse:
    """A decision (or part of one) that was not carried out, and why."""

    model: str
    reason: str


@dataclass(frozen=True)
class Ignore:
    """A decision that is not this supervisor's (a model outside its catalog): another
    supervisor may serve it."""

    model: str
    reason: str


Action = (
    StartWorker
    | DrainWorker
    | KillWorker
    | ReportFailed
    | ScheduleRestart
    | CancelRestart
    | GiveUp
    | Refuse
    | Ignore
)


# -- pure planning ---------------------------------------------------------------------------

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")


def make_worker_id(supervisor_id: str, model: str, partition: int, serial: int) -> str:
    """`<supervisor>-<model>-p<partition>-<serial>`, within the wire's id rules
    (e.g. `node1-4242-org_llama-p3-17`)."""
    tail = f"-p{partition}-{serial}"
    head = _UNSAFE_ID.sub("_", f"{supervisor_id}-{model}")[: MAX_ID_CHARS - len(tail)]
    return head + tail


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == START_FAILED:
        return "could not be started"
    return f"exited with code {code}"


def owned_partitions(fleet: Fleet, model: str) -> set[int]:
    """Partitions of `model` held by a live worker (running or draining) or a pending
    restart: none of them may get another worker."""
    owned = {w.partition for w in fleet.workers.values() if w.model == model}
    owned |= {p for (m, p) in fleet.pending if m == model}
    return owned


def free_partitions(fleet: Fleet, model: str) -> list[int]:
    count = fleet.partitions.get(model, 0)
    owned = owned_partitions(fleet, model)
    return [p for p in range(count) if p not in owned]


def plan_decision(
    fleet: Fleet, decision: ScaleDecision, now_ms: int, max_age_ms: int
) -> list[Action]:
    """One scale decision -> actions. scale_up(n): start n workers on the lowest free
    partitions; release(w): drain w (or cancel its pending restart); hold: nothing."""
    model = decision.model
    if decision.decision_id is not None and decision.decision_id in fleet.seen_decisions:
        return []
    if model not in fleet.catalog:
        return [Ignore(model, "not in this supervisor's model catalog")]
    age_ms = now_ms - decision.decided_at
    if age_ms > max_age_ms:
        return [Refuse(model, f"{decision.action} is stale: decided {age_ms / 1000:.1f} s ago")]
    if decision.action == "hold":
        return []
    if decision.action == "release":
        return _plan_release(fleet, model, decision.worker_id or "")
    free = free_partitions(fleet, model)
    actions: list[Action] = [
        StartWorker(
            make_worker_id(fleet.supervisor_id, model, partition, fleet.serial + 1 + i),
            model,
            partition,
            reason=f"scale_up({decision.count}): {decision.reason}",
        )
        for i, partition in enumerate(free[: decision.count])
    ]
    if len(free) < decision.count:
        actions.append(
            Refuse(
                model,
                f"scale_up({decision.count}): only {len(free)} of "
                f"{fleet.partitions.get(model, 0)} partitions of its topic are free (one worker "
                "per partition); add partitions to serve more workers",
            )
        )
    return actions


def _plan_release(fleet: Fleet, model: str, worker_id: str) -> list[Action]:
    worker = fleet.workers.get(worker_id)
    if worker is not None:
        if worker.model != model:
            return [Refuse(model, f"release: worker {worker_id} serves {worker.model}")]
        if worker.draining_since is not None:
            return []
        return [DrainWorker(worker_id, "released")]
    for pending in fleet.pending.values():
        if worker_id in (pending.worker_id, pending.restart_of):
            return [CancelRestart(pending, "released before its restart")]
    return [Refuse(model, f"release: no worker {worker_id} here")]


def plan_exit(
    fleet: Fleet, worker_id: str, code: int, now: float, policy: RestartPolicy
) -> list[Action]:
    """A worker process ended with `code` (negative: killed by that signal)."""
    worker = fleet.workers[worker_id]
    actions: list[Action] = []
    what = describe_exit(code)
    if code != 0:
        actions.append(ReportFailed(worker_id, worker.model, worker.partition, what))
    if code == 0 or worker.draining_since is not None or fleet.stopping:
        return actions
    slot = (worker.model, worker.partition)
    recent = [t for t in fleet.restart_times.get(slot, ()) if now - t < policy.window_s]
    delay = policy.delay_s(len(recent))
    if delay is None:
        actions.append(
            GiveUp(
                worker_id,
                worker.model,
                worker.partition,
                f"{what}; {len(recent)} restarts in the last {policy.window_s:.0f} s, the most "
                "allowed: see its log, fix the cause, then scale up again",
            )
        )
        return actions
    restart = PendingRestart(
        make_worker_id(fleet.supervisor_id, worker.model, worker.partition, fleet.serial + 1),
        worker.model,
        worker.partition,
        restart_of=worker_id,
        due_at=now + delay,
    )
    actions.append(ScheduleRestart(restart, f"{what}; restart {len(recent) + 1} in {delay:g} s"))
    return actions


def plan_tick(fleet: Fleet, now: float, drain_timeout_s: float) -> list[Action]:
    """Due restarts start; workers draining for longer than `drain_timeout_s` are killed."""
    actions: list[Action] = []
    for pending in sorted(fleet.pending.values(), key=lambda p: p.due_at):
        if pending.due_at <= now and not fleet.stopping:
            actions.append(
                StartWorker(
                    pending.worker_id,
                    pending.model,
                    pending.partition,
                    reason=f"restart of {pending.restart_of}",
                    restart_of=pending.restart_of,
                )
            )
    for worker in fleet.workers.values():
        since = worker.draining_since
        if since is not None and not worker.killed and now - since > drain_timeout_s:
            actions.append(
                KillWorker(worker.worker_id, f"still draining after {drain_timeout_s:g} s")
            )
    return actions


def plan_stop(fleet: Fleet) -> list[Action]:
    """The supervisor is stopping: cancel pending restarts, drain every worker."""
    actions: list[Action] = [
        CancelRestart(p, "supervisor stopping") for p in fleet.pending.values()
    ]
    actions += [
        DrainWorker(w.worker_id, "supervisor stopping")
        for w in fleet.workers.values()
        if w.draining_since is None
    ]
    return actions


# -- the fleet -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The supervisor's workers as it believes them to be. `on_*` plan, then record the plan
    (a StartWorker is recorded as running; the I/O layer reports a failed start as an exit
    with START_FAILED)."""

    supervisor_id: str
    catalog: ModelCatalog
    partitions: Mapping[str, int]  # model -> partitions of its topic
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    pending: dict[tuple[str, int], PendingRestart] = field(default_factory=dict)
    restart_times: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    seen_decisions: OrderedDict[str, None] = field(default_factory=OrderedDict)
    serial: int = 0
    stopping: bool = False

    def on_decision(
        self, decision: ScaleDecision, now: float, now_ms: int, max_age_ms: int
    ) -> list[Action]:
        actions = plan_decision(self, decision, now_ms, max_age_ms)
        self.apply(actions, now)
        if decision.decision_id is not None:
            self.seen_decisions[decision.decision_id] = None
            while len(self.seen_decisions) > SEEN_DECISIONS:
                self.seen_decisions.popitem(last=False)
        return actions

    def on_exit(self, worker_id: str, code: int, now: float, policy: RestartPolicy) -> list[Action]:
        actions = plan_exit(self, worker_id, code, now, policy)
        worker = self.workers.pop(worker_id)
        slot = (worker.model, worker.partition)
        if slot in self.restart_times:  # only the window counts
            self.restart_times[slot] = [
                t for t in self.restart_times[slot] if now - t < policy.window_s
            ]
        self.apply(actions, now)
        return actions

    def on_tick(self, now: float, drain_timeout_s: float) -> list[Action]:
        actions = plan_tick(self, now, drain_timeout_s)
        self.apply(actions, now)
        return actions

    def on_stop(self, now: float) -> list[Action]:
        self.stopping = True
        actions = plan_stop(self)
        self.apply(actions, now)
        return actions

    def apply(self, actions: Sequence[Action], now: float) -> None:
        for action in actions:
            match action:
                case StartWorker(worker_id, model, partition, _, restart_of):
                    self.pending.pop((model, partition), None)
                    self.workers[worker_id] = WorkerRecord(
                        worker_id, model, partition, now, restart_of
                    )
                    if restart_of is None:  # a restart's id was numbered when scheduled
                        self.serial += 1
                case ScheduleRestart(restart):
                    slot = (restart.model, restart.partition)
                    self.pending[slot] = restart
                    self.restart_times.setdefault(slot, []).append(now)
                    self.serial += 1
                case CancelRestart(restart):
                    self.pending.pop((restart.model, restart.partition), None)
                case DrainWorker(worker_id):
                    self.workers[worker_id] = replace(self.workers[worker_id], draining_since=now)
                case KillWorker(worker_id):
                    self.workers[worker_id] = replace(self.workers[worker_id], killed=True)
                case ReportFailed() | GiveUp() | Refuse() | Ignore():
                    pass

    def live_workers(self, model: str | None = None) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if model is None or w.model == model]
