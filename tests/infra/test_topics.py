"""Topic apply: the pure plan, then create / idempotence / drift against the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from infra.settings import KafkaSettings
from infra.topics import (
    Drift,
    ObservedTopic,
    TopicAction,
    TopicReport,
    TopicsError,
    apply_topics,
    observe_topics,
    plan_topics,
)
from schemas.topics import TopicSpec, core_topics

RETAIN_DAY = {"cleanup.policy": "delete", "retention.ms": "86400000"}


def _seen(spec: TopicSpec, **changes: object) -> ObservedTopic:
    """What a cluster would report for `spec`, plus broker defaults, with `changes`."""
    configs = {"segment.bytes": "1073741824", **spec.configs}
    fields: dict[str, object] = {
        "name": spec.name,
        "partitions": spec.partitions,
        "replication_factor": spec.replication_factor,
        "configs": configs,
    }
    fields.update(changes)
    return ObservedTopic(**fields)  # type: ignore[arg-type]


# -- the pure plan -------------------------------------------------------------------------


def test_plan_creates_missing_and_accepts_matching() -> None:
    a, b = TopicSpec("a", 4, RETAIN_DAY), TopicSpec("b", 1)
    plans = plan_topics([a, b], {"b": _seen(b)})
    assert [(p.name, p.action, p.drift) for p in plans] == [
        ("a", TopicAction.CREATE, ()),
        ("b", TopicAction.OK, ()),
    ]


def test_plan_reports_every_difference_as_drift() -> None:
    spec = TopicSpec("t", 4, {"cleanup.policy": "compact", "retention.ms": "1000"})
    seen = _seen(
        spec,
        partitions=2,
        replication_factor=3,
        configs={"cleanup.policy": "delete"},  # retention.ms not reported at all
    )
    (plan,) = plan_topics([spec], {"t": seen})
    assert plan.action is TopicAction.DRIFT
    assert plan.drift == (
        Drift("partitions", "4", "2"),
        Drift("replication_factor", "1", "3"),
        Drift("cleanup.policy", "compact", "delete"),
        Drift("retention.ms", "1000", None),
    )


def test_plan_ignores_configs_the_spec_does_not_name() -> None:
    spec = TopicSpec("t", 1, {"retention.ms": "1000"})
    seen = _seen(spec, configs={"retention.ms": "1000", "max.message.bytes": "1", "x": "y"})
    assert plan_topics([spec], {"t": seen})[0].action is TopicAction.OK


def test_plan_keeps_spec_order_and_ignores_unrelated_topics() -> None:
    specs = [TopicSpec(n, 1) for n in ("z", "a", "m")]
    observed = {"a": _seen(specs[1]), "other": _seen(TopicSpec("other", 9))}
    assert [p.name for p in plan_topics(specs, observed)] == ["z", "a", "m"]


def test_plan_rejects_duplicate_specs() -> None:
    with pytest.raises(ValueError, match="dup"):
        plan_topics([TopicSpec("dup", 1), TopicSpec("dup", 2)], {})


def test_plan_of_core_topics_on_an_empty_cluster_creates_them_all() -> None:
    plans = plan_topics(core_topics(), {})
    assert {p.action for p in plans} == {TopicAction.CREATE}


def test_report_describes_each_topic_and_sums_up() -> None:
    specs = [TopicSpec("new", 2, RETAIN_DAY), TopicSpec("same", 1), TopicSpec("moved", 4)]
    observed = {"same": _seen(specs[1]), "moved": _seen(specs[2], partitions=2)}
    report = TopicReport("broker:9092", tuple(plan_topics(specs, observed)))
    text = report.describe()
    assert report.created == ["new"] and report.ok == ["same"] and report.drifted == ["moved"]
    assert "created  new" in text and "2 partitions, rf 1" in text
    assert "partitions: spec 4, cluster 2" in text
    assert "3 topics on broker:9092: 1 created, 1 ok, 1 drift" in text
    assert "never fixed" in text
    dry = TopicReport("broker:9092", report.plans, dry_run=True).describe()
    assert "missing  new" in dry and "dry run, nothing created" in dry


async def test_unreachable_cluster_is_a_clear_error() -> None:
    nowhere = KafkaSettings(bootstrap_servers="127.0.0.1:1")
    with pytest.raises(TopicsError, match="cannot reach Kafka at 127.0.0.1:1.*ember broker start"):
        await apply_topics(nowhere, [TopicSpec("t", 1)])


# -- against the real broker ---------------------------------------------------------------


@pytest.fixture
async def scratch_topics(
    kafka_settings: KafkaSettings,
) -> AsyncIterator[Callable[[str], str]]:
    """Unique topic names for one test; the topics are deleted afterwards."""
    names: list[str] = []
    run = uuid.uuid4().hex[:8]

    def name(base: str) -> str:
        names.append(f"ember.test.{base}.{run}")
        return names[-1]

    yield name
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        doomed = [n for n in names if n in existing]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()


async def _observe(settings: KafkaSettings, names: list[str]) -> dict[str, ObservedTopic]:
    admin = AIOKafkaAdminClient(**settings.aiokafka_kwargs())
    await admin.start()
    try:
        return await observe_topics(admin, names)
    finally:
        await admin.close()


@pytest.mark.kafka
async def test_core_topics_are_in_place(kafka_settings: KafkaSettings) -> None:
    report = await apply_topics(kafka_settings, core_topics(), dry_run=True)
    assert report.ok == [spec.name for spec in core_topics()]


@pytest.mark.kafka
async def test_apply_creates_then_is_idempotent(
    kafka_settings: KafkaSettings, scratch_topics: Callable[[str], str]
) -> None:
    specs = [
        TopicSpec(scratch_topics("traffic"), 3, RETAIN_DAY),
        TopicSpec(scratch_topics("state"), 2, {"cleanup.policy": "compact"}),
    ]
    names = [s.name for s in specs]

    dry = await apply_topics(kafka_settings, specs, dry_run=True)
    assert dry.created == names and await _observe(kafka_settings, names) == {}

    first = await apply_topics(kafka_settings, specs)
    assert first.created == names and first.drifted == []
    observed = await _observe(kafka_settings, names)
    assert observed[names[0]].partitions == 3
    assert observed[names[0]].configs["retention.ms"] == "86400000"
    assert observed[names[1]].configs["cleanup.policy"] == "compact"

    second = await apply_topics(kafka_settings, specs)
    assert second.created == [] and second.drifted == [] and second.ok == names


@pytest.mark.kafka
async def test_concurrent_applies_create_each_topic_once(
    kafka_settings: KafkaSettings, scratch_topics: Callable[[str], str]
) -> None:
    specs = [TopicSpec(scratch_topics(f"race{i}"), 2) for i in range(3)]
    reports = await asyncio.gather(*(apply_topics(kafka_settings, specs) for _ in range(3)))
    created = [name for report in reports for name in report.created]
    assert sorted(created) == sorted(s.name for s in specs)
    assert all(report.drifted == [] for report in reports)


@pytest.mark.kafka
async def test_drift_is_reported_and_left_alone(
    kafka_settings: KafkaSettings, scratch_topics: Callable[[str], str]
) -> None:
    name = scratch_topics("drift")
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1, topic_configs={"retention.ms": "60000"})])
    finally:
        await admin.close()

    spec = TopicSpec(name, 4, RETAIN_DAY)
    report = await apply_topics(kafka_settings, [spec])
    assert report.created == [] and report.drifted == [name]
    (plan,) = report.plans
    assert Drift("partitions", "4", "2") in plan.drift
    assert Drift("retention.ms", "86400000", "60000") in plan.drift
    assert "cleanup.policy" not in {d.setting for d in plan.drift}  # the default is delete

    observed = (await _observe(kafka_settings, [name]))[name]
    assert observed.partitions == 2 and observed.configs["retention.ms"] == "60000"


@pytest.mark.kafka
async def test_impossible_spec_is_a_clear_error(
    kafka_settings: KafkaSettings, scratch_topics: Callable[[str], str]
) -> None:
    spec = TopicSpec(scratch_topics("rf"), 1, replication_factor=5)
    with pytest.raises(TopicsError, match=rf"could not create 1 topic\(s\): {spec.name} \("):
        await apply_topics(kafka_settings, [spec])
