"""Declare Ember's topics on a Kafka cluster: create what is missing, report drift.

    report = await apply_topics(KafkaSettings.from_env(), all_topics(models))
    print(report.describe())

Applying is idempotent and never destructive: an existing topic is only described, never
altered or deleted, even when its partition count, replication factor or configs differ from
its spec; that difference is reported as drift for a person to resolve (changing partitions
re-keys data, so it is not something to do behind anyone's back).

`plan_topics` is the decision, a pure function of the specs and what the cluster reports;
`apply_topics` only observes, calls it and creates the topics it says are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from infra.handshake import connection_problem
from infra.logs import get_logger
from infra.settings import KafkaSettings
from schemas.topics import TopicSpec

log = get_logger(__name__)

CREATE_TIMEOUT_MS = 30_000
# After CreateTopics returns, brokers learn of the topic a moment later; wait for leaders so
# that a producer started right after `apply_topics` does not see UNKNOWN_TOPIC_OR_PARTITION.
LEADER_WAIT_S = 15.0


class TopicsError(RuntimeError):
    """Topics could not be observed or created; the message says what to do."""


class TopicAction(enum.StrEnum):
    CREATE = "create"  # missing: create it from the spec
    OK = "ok"  # exists and matches the spec
    DRIFT = "drift"  # exists and differs: reported, left alone


@dataclass(frozen=True)
class ObservedTopic:
    """What the cluster reports for one topic."""

    name: str
    partitions: int
    replication_factor: int
    configs: Mapping[str, str]  # effective value of every topic config


@dataclass(frozen=True)
class Drift:
    setting: str  # "partitions", "replication_factor" or a topic config name
    expected: str
    actual: str | None  # None: the cluster does not report this config

    def describe(self) -> str:
        return f"{self.setting}: spec {self.expected}, cluster {self.actual or '(unset)'}"


@dataclass(frozen=True)
class TopicPlan:
    spec: TopicSpec
    action: TopicAction
    drift: tuple[Drift, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name


def topic_drift(spec: TopicSpec, observed: ObservedTopic) -> tuple[Drift, ...]:
    """Every way `observed` differs from `spec`. Configs the spec does not name are the
    cluster's business (broker defaults) and never count as drift."""
    drift: list[Drift] = []
    if observed.partitions != spec.partitions:
        drift.append(Drift("partitions", str(spec.partitions), str(observed.partitions)))
    if observed.replication_factor != spec.replication_factor:
        drift.append(
            Drift(
                "replication_factor", str(spec.replication_factor), str(observed.replication_factor)
            )
        )
    for key, expected in sorted(spec.configs.items()):
        actual = observed.configs.get(key)
        if actual != expected:
            drift.append(Drift(key, expected, actual))
    return tuple(drift)


def plan_topics(
    specs: Sequence[TopicSpec], observed: Mapping[str, ObservedTopic]
) -> list[TopicPlan]:
    """One plan per spec, in spec order: CREATE when the topic is missing, OK when it matches,
    DRIFT (with every difference) when it does not. Pure: no Kafka, no clock.

    Example: spec ember.requests with 4 partitions, cluster has it with 2 ->
    TopicPlan(spec, DRIFT, (Drift("partitions", "4", "2"),)).
    """
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"topic specs name {', '.join(duplicates)} more than once")
    plans = []
    for spec in specs:
        seen = observed.get(spec.name)
        if seen is None:
            plans.append(TopicPlan(spec, TopicAction.CREATE))
            continue
        drift = topic_drift(spec, seen)
        plans.append(TopicPlan(spec, TopicAction.DRIFT if drift else TopicAction.OK, drift))
    return plans


@dataclass(frozen=True)
class TopicReport:
    bootstrap_servers: str
    plans: tuple[TopicPlan, ...]
    dry_run: bool = False  # True: CREATE plans were not carried out

    def _names(self, action: TopicAction) -> list[str]:
        return [plan.name for plan in self.plans if plan.action is action]

    @property
    def created(self) -> list[str]:
        """Topics created by this apply (would be created, for a dry run)."""
        return self._names(TopicAction.CREATE)

    @property
    def ok(self) -> list[str]:
        return self._names(TopicAction.OK)

    @property
    def drifted(self) -> list[str]:
        return self._names(TopicAction.DRIFT)

    def describe(self) -> str:
        """A human-readable table, one line per topic, then a summary line."""
        create_word = "missing" if self.dry_run else "created"
        width = max((len(plan.name) for plan in self.plans), default=0)
        lines = []
        for plan in self.plans:
            word = create_word if plan.action is TopicAction.CREATE else str(plan.action)
            spec = plan.spec
            if plan.action is TopicAction.DRIFT:
                detail = "; ".join(d.describe() for d in plan.drift)
            else:
                configs = " ".join(f"{k}={v}" for k, v in sorted(spec.configs.items()))
                plural = "" if spec.partitions == 1 else "s"
                detail = (
                    f"{spec.partitions} partition{plural}, rf {spec.replication_factor}  {configs}"
                )
            lines.append(f"{word:<8} {plan.name:<{width}}  {detail}".rstrip())
        summary = (
            f"{len(self.plans)} topics on {self.bootstrap_servers}: "
            f"{len(self.created)} {create_word}, {len(self.ok)} ok, {len(self.drifted)} drift"
        )
        lines.append(summary + (" (dry run, nothing created)" if self.dry_run else ""))
        if self.drifted:
            lines.append(
                "drift is reported, never fixed: ember does not alter or delete topics. Align "
                "the topic by hand (kafka-topics.sh --alter, kafka-configs.sh) or delete it and "
                "apply again, or change its spec in schemas/topics.py."
            )
        return "\n".join(lines)


# -- talking to the cluster ----------------------------------------------------------------


def _error_text(code: int, message: str | None) -> str:
    return f"{for_code(code).__name__}: {message or 'no message'}"


async def observe_topics(
    admin: AIOKafkaAdminClient, names: Sequence[str]
) -> dict[str, ObservedTopic]:
    """Partitions, replication factor and effective configs of those of `names` that exist.

    Reads the metadata of all topics instead of asking for `names`: a metadata request for
    a missing topic would create it on a cluster with auto.create.topics.enable=true."""
    wanted = set(names)
    shapes: dict[str, tuple[int, int]] = {}
    for topic in await admin.describe_topics():
        if topic["topic"] in wanted and topic["error_code"] == 0:
            replicas = max((len(p["replicas"]) for p in topic["partitions"]), default=0)
            shapes[topic["topic"]] = (len(topic["partitions"]), replicas)
    if not shapes:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in sorted(shapes)]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            name = resource["resource_name"]
            if resource["error_code"] != 0:
                raise TopicsError(
                    f"cannot read the configs of topic {name}: "
                    f"{_error_text(resource['error_code'], resource['error_message'])}"
                )
            configs[name] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"]
                if entry["config_value"] is not None
            }
    return {
        name: ObservedTopic(name, partitions, replicas, configs.get(name, {}))
        for name, (partitions, replicas) in shapes.items()
    }


async def _create(admin: AIOKafkaAdminClient, specs: Sequence[TopicSpec]) -> set[str]:
    """Create `specs`; returns the names that already existed (created concurrently)."""
    new_topics = [
        NewTopic(s.name, s.partitions, s.replication_factor, topic_configs=dict(s.configs))
        for s in specs
    ]
    response = await admin.create_topics(new_topics, timeout_ms=CREATE_TIMEOUT_MS)
    existed: set[str] = set()
    failures: list[str] = []
    for result in response.to_object()["topic_errors"]:
        code, name = result["error_code"], result["topic"]
        if code == 0:
            log.info("topics.created", topic=name)
        elif code == TopicAlreadyExistsError.errno:
            existed.add(name)
        else:
            failures.append(f"{name} ({_error_text(code, result['error_message'])})")
    if failures:
        raise TopicsError(
            f"could not create {len(failures)} topic(s): {'; '.join(failures)}. Fix the spec in "
            "schemas/topics.py or the cluster (brokers, permissions), then apply again"
        )
    return existed


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: Sequence[str]) -> None:
    deadline = time.monotonic() + LEADER_WAIT_S
    pending = set(names)
    while pending:
        for topic in await admin.describe_topics(sorted(pending)):
            partitions = topic["partitions"]
            if (
                topic["error_code"] == 0
                and partitions
                and all(p["leader"] >= 0 for p in partitions)
            ):
                pending.discard(topic["topic"])
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise TopicsError(
                f"created topics {', '.join(sorted(pending))} have no partition leader after "
                f"{LEADER_WAIT_S:.0f} s: check the brokers' health and logs"
            )
        await asyncio.sleep(0.1)


async def apply_topics(
    settings: KafkaSettings, specs: Sequence[TopicSpec], *, dry_run: bool = False
) -> TopicReport:
    """Create the missing topics of `specs` and report the rest as ok or drift. Idempotent;
    safe to run from several processes at once. dry_run: observe and plan only."""
    plans_by_name: dict[str, TopicPlan] = {}
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs(), client_id="ember-topics")
    try:
        try:
            await admin.start()
        except KafkaError as exc:
            reason = await connection_problem(settings)  # aiokafka only logs the cause
            raise TopicsError(
                reason
                or f"cannot reach Kafka at {settings.bootstrap_servers} ({exc}): start the local "
                "broker with `ember broker start` or set EMBER_BOOTSTRAP_SERVERS"
            ) from exc
        observed = await observe_topics(admin, [spec.name for spec in specs])
        plans = plan_topics(specs, observed)
        plans_by_name = {plan.name: plan for plan in plans}
        missing = [plan.spec for plan in plans if plan.action is TopicAction.CREATE]
        if missing and not dry_run:
            existed = await _create(admin, missing)
            await _wait_for_leaders(admin, [spec.name for spec in missing])
            if existed:  # created by someone else meanwhile: judge them as existing topics
                raced = await observe_topics(admin, sorted(existed))
                for plan in plan_topics([plans_by_name[n].spec for n in sorted(existed)], raced):
                    plans_by_name[plan.name] = plan
    except KafkaError as exc:
        raise TopicsError(
            f"Kafka at {settings.bootstrap_servers} failed while applying topics ({exc!r}); "
            "apply again, it is idempotent"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    report = TopicReport(
        settings.bootstrap_servers, tuple(plans_by_name[s.name] for s in specs), dry_run
    )
    log.info(
        "topics.applied",
        bootstrap=settings.bootstrap_servers,
        created=report.created,
        drift=report.drifted,
        ok=len(report.ok),
        dry_run=dry_run,
    )
    return report
