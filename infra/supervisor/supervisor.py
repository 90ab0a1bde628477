"""The supervisor's loop: scale decisions from Kafka in, worker processes and lifecycle out.

    decisions ──▶ Fleet.on_decision ──▶ actions ──▶ backend.start / drain / kill
    ticks ──▶ backend.poll ──▶ Fleet.on_exit / on_tick ──▶ restarts, kills, `failed` events

All choices are made in infra.supervisor.plan; this module only reads, calls and carries out.

Decisions: `ember.decisions` is read without a consumer group (all partitions assigned), from
the decisions of the last `max_decision_age_s` (15 s) on: a supervisor restarted within that
blip still acts on what was decided meanwhile, and older decisions (deltas against a fleet
that no longer exists) are refused as stale; the autoscaler sees the fleet on lifecycle and
decides again. Run one supervisor per set of models: decisions for a model outside the
catalog are ignored, so supervisors with disjoint catalogs can share the topic. A decision
that cannot be decoded goes to dead letters; nothing stops the loop.

Lifecycle: a worker that exits non-zero (or is killed) may not have said so; the supervisor
publishes `failed` for it on `ember.lifecycle` and `ember.workers` so placement re-sends its
requests at once instead of waiting for missed heartbeats.

Stop (`stop()`, SIGTERM/SIGINT in the CLI): every worker is drained (SIGTERM), killed with its
process group after `drain_timeout_s`, and the pre-started pool is closed: no process is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.worker import WorkerConfig, now_ms
from infra.logs import get_logger
from infra.settings import KafkaSettings
from infra.supervisor.backends import BackendError, WorkerBackend, WorkerHandle
from infra.supervisor.plan import (
    START_FAILED,
    Action,
    CancelRestart,
    DrainWorker,
    Fleet,
    GiveUp,
    Ignore,
    KillWorker,
    ModelCatalog,
    Refuse,
    ReportFailed,
    RestartPolicy,
    ScheduleRestart,
    StartWorker,
)
from infra.topics import observe_topics
from schemas import LifecycleEvent, ScaleDecision, SchemaError, decode, dead_letter_for, record_for
from schemas.topics import DECISIONS, LIFECYCLE, WORKERS, model_topic_name

log = get_logger(__name__)


class SupervisorError(RuntimeError):
    """The supervisor cannot start; the message says what to fix."""


def default_supervisor_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerOptions:
    """What every worker this supervisor starts is given, besides its model and partition."""

    max_batch: int = 8
    max_seq_len: int | None = None
    dtype: str | None = None
    device: str = "cpu"
    chunk: ChunkPolicy = ChunkPolicy()
    heartbeat_interval_s: float = 1.0

    def config_for(
        self, model: str, model_dir: Path, partition: int, worker_id: str
    ) -> WorkerConfig:
        return WorkerConfig(
            model=model,
            model_dir=model_dir,
            partition=partition,
            worker_id=worker_id,
            max_batch=self.max_batch,
            max_seq_len=self.max_seq_len,
            dtype=self.dtype,
            device=self.device,
            chunk=self.chunk,
            heartbeat_interval_s=self.heartbeat_interval_s,
        )


@dataclass(frozen=True)
class SupervisorConfig:
    catalog: ModelCatalog
    worker: WorkerOptions = WorkerOptions()
    restart: RestartPolicy = RestartPolicy()
    drain_timeout_s: float = 60.0
    max_decision_age_s: float = 15.0
    supervisor_id: str = field(default_factory=default_supervisor_id)
    tick_s: float = 0.2


class Supervisor:
    def __init__(
        self,
        config: SupervisorConfig,
        kafka: KafkaSettings,
        backend: WorkerBackend,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kafka = kafka
        self.backend = backend
        self._clock = clock
        self.fleet = Fleet(config.supervisor_id, config.catalog, {})
        self._handles: dict[str, WorkerHandle] = {}
        self.ready = asyncio.Event()  # set once decisions are being read
        self._stopping = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._node = socket.gethostname()

    def stop(self) -> None:
        """Drain every worker and return from `run` (safe from a signal handler)."""
        self._stopping.set()

    async def run(self) -> int:
        """Until `stop()`. Raises SupervisorError when it cannot start."""
        try:
            self.backend.maintain()  # the pre-started pool boots while we connect
            await self._start_clients()
            self.ready.set()
            log.info(
                "supervisor ready",
                supervisor_id=self.config.supervisor_id,
                models=sorted(self.config.catalog.models),
                partitions=dict(self.fleet.partitions),
            )
            await self._loop()
        finally:
            await self._shutdown()
        return 0

    # -- start and stop ------------------------------------------------------------------------

    async def _start_clients(self) -> None:
        self.config.catalog.check()
        topics = {model: model_topic_name(model) for model in self.config.catalog.models}
        admin = AIOKafkaAdminClient(**self.kafka.aiokafka_kwargs(), client_id="ember-supervisor")
        try:
            await admin.start()
            observed = await observe_topics(admin, [DECISIONS, *topics.values()])
        except KafkaError as exc:
            raise SupervisorError(
                f"cannot reach Kafka at {self.kafka.bootstrap_servers} ({exc!r}): start the "
                "broker (`ember broker start`) or set EMBER_BOOTSTRAP_SERVERS"
            ) from exc
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        missing = [t for t in (DECISIONS, *topics.values()) if t not in observed]
        if missing:
            models = " ".join(f"--model {m}" for m, t in topics.items() if t in missing)
            raise SupervisorError(
                f"topic(s) {', '.join(missing)} do not exist: run `ember topics apply {models}`"
            )
        self.fleet.partitions = {m: observed[t].partitions for m, t in topics.items()}

        self._producer = AIOKafkaProducer(
            **self.kafka.aiokafka_kwargs(),
            client_id=f"ember-supervisor-{self.config.supervisor_id}",
            acks="all",
            linger_ms=2,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka_kwargs(),
            client_id=f"ember-supervisor-{self.config.supervisor_id}",
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        await self._consumer.start()
        tps = [TopicPartition(DECISIONS, p) for p in range(observed[DECISIONS].partitions)]
        self._consumer.assign(tps)
        # End offsets first: a decision sent after this point is at or past them.
        ends = await self._consumer.end_offsets(tps)
        since = now_ms() - int(self.config.max_decision_age_s * 1000)
        recent = await self._consumer.offsets_for_times({tp: since for tp in tps})
        for tp in tps:
            found = recent.get(tp)
            self._consumer.seek(tp, found.offset if found is not None else ends[tp])

    async def _shutdown(self) -> None:
        actions = self.fleet.on_stop(self._clock())
        await self._carry_out(actions)
        deadline = self._clock() + self.config.drain_timeout_s + 15.0
        while self._handles and self._clock() < deadline:
            try:
                await self._tick()
            except Exception:
                log.exception("supervisor tick failed while stopping")
            await asyncio.sleep(self.config.tick_s)
        for worker_id, handle in self._handles.items():  # survived SIGKILL (D state?)
            log.error("worker did not exit; killing its group once more", worker_id=worker_id)
            self.backend.kill(handle)
        await asyncio.to_thread(self.backend.close)
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()
        log.info("supervisor stopped", supervisor_id=self.config.supervisor_id)

    # -- the loop --------------------------------------------------------------------------------

    async def _loop(self) -> None:
        assert self._consumer is not None
        timeout_ms = int(self.config.tick_s * 1000)
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(timeout_ms=timeout_ms)
            for records in batches.values():
                for record in records:
                    await self._on_record(record)
            try:
                await self._tick()
            except Exception:  # a bug or a backend hiccup must not orphan the workers
                log.exception("supervisor tick failed")

    async def _on_record(self, record: Any) -> None:
        try:
            decision = decode(ScaleDecision, record.value, record.headers)
        except SchemaError as exc:
            await self._dead_letter(record, exc)
            return
        try:
            max_age_ms = int(self.config.max_decision_age_s * 1000)
            actions = self.fleet.on_decision(decision, self._clock(), now_ms(), max_age_ms)
            if any(isinstance(a, Ignore) for a in actions):
                await self._carry_out(actions)
                return
            log.info(
                "decision",
                model=decision.model,
                action=decision.action,
                count=decision.count,
                worker_id=decision.worker_id,
                decision_id=decision.decision_id,
                actions=len(actions),
            )
            await self._carry_out(actions)
        except Exception:
            log.exception("decision could not be carried out", model=decision.model)

    async def _tick(self) -> None:
        now = self._clock()
        for worker_id, handle in list(self._handles.items()):
            status = self.backend.poll(handle)
            if status.running:
                continue
            del self._handles[worker_id]
            code = status.exit_code if status.exit_code is not None else START_FAILED
            log.info("worker exited", worker_id=worker_id, code=code)
            await self._carry_out(self.fleet.on_exit(worker_id, code, now, self.config.restart))
        await self._carry_out(self.fleet.on_tick(now, self.config.drain_timeout_s))
        if not self._stopping.is_set():
            self.backend.maintain()

    # -- carrying out ----------------------------------------------------------------------------

    async def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case StartWorker():
                    await self._start(action)
                case DrainWorker(worker_id, reason):
                    log.info("draining worker", worker_id=worker_id, reason=reason)
                    self.backend.drain(self._handles[worker_id])
                case KillWorker(worker_id, reason):
                    log.warning("killing worker", worker_id=worker_id, reason=reason)
                    self.backend.kill(self._handles[worker_id])
                case ReportFailed(worker_id, model, partition, reason):
                    await self._report_failed(worker_id, model, partition, reason)
                case ScheduleRestart(restart, reason):
                    log.warning(
                        "restart scheduled",
                        worker_id=restart.worker_id,
                        restart_of=restart.restart_of,
                        model=restart.model,
                        partition=restart.partition,
                        reason=reason,
                    )
                case CancelRestart(restart, reason):
                    log.info("restart cancelled", worker_id=restart.worker_id, reason=reason)
                case GiveUp(worker_id, model, partition, reason):
                    log.error(
                        "no more restarts",
                        worker_id=worker_id,
                        model=model,
                        partition=partition,
                        reason=reason,
                    )
                case Refuse(model, reason):
                    log.warning("decision not carried out", model=model, reason=reason)
                case Ignore(model, reason):
                    log.debug("decision ignored", model=model, reason=reason)

    async def _start(self, action: StartWorker) -> None:
        model_dir = self.config.catalog.models[action.model]
        config = self.config.worker.config_for(
            action.model, model_dir, action.partition, action.worker_id
        )
        try:
            handle = self.backend.start(config)
        except BackendError as exc:
            log.error("worker could not be started", worker_id=action.worker_id, error=str(exc))
            actions = self.fleet.on_exit(
                action.worker_id, START_FAILED, self._clock(), self.config.restart
            )
            await self._carry_out(actions)
            return
        self._handles[action.worker_id] = handle
        log.info(
            "worker started",
            worker_id=action.worker_id,
            model=action.model,
            partition=action.partition,
            source=handle.source,
            restart_of=action.restart_of,
            reason=action.reason,
        )

    async def _report_failed(self, worker_id: str, model: str, partition: int, reason: str) -> None:
        assert self._producer is not None
        event = LifecycleEvent(
            worker_id=worker_id,
            model=model,
            kind="state",
            state="failed",
            at=now_ms(),
            partition=partition,
            node=self._node,
            reason=f"{reason} (reported by supervisor {self.config.supervisor_id})"[:500],
        )
        try:
            for topic in (LIFECYCLE, WORKERS):
                rec = record_for(event, topic)
                await self._producer.send_and_wait(
                    rec.topic, rec.value, key=rec.key, headers=rec.headers
                )
        except Exception:  # KafkaError, timeouts: the worker is gone either way
            log.exception("could not publish a failed event", worker_id=worker_id)
        log.warning("worker failed", worker_id=worker_id, model=model, reason=reason)

    async def _dead_letter(self, record: Any, exc: SchemaError) -> None:
        assert self._producer is not None
        letter = dead_letter_for(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            error=exc,
            at=now_ms(),
            headers=record.headers,
            component="supervisor",
        )
        rec = record_for(letter)
        try:
            await self._producer.send_and_wait(
                rec.topic, rec.value, key=rec.key, headers=rec.headers
            )
        except KafkaError:
            log.exception("could not dead-letter a decision", offset=record.offset)
        log.warning("dead-lettered a decision", offset=record.offset, reason=letter.reason)

    def workers(self) -> Mapping[str, WorkerHandle]:
        """Live worker handles by worker id (read-only view for callers and tests)."""
        return dict(self._handles)
