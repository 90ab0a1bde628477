"""Ember's topics, declared once: name, key, partitions and configs.

`ember topics apply` (infra/topics.py) creates what is missing from these specs and reports
drift; it never deletes. Partition counts of `requests`, `admitted`, `lifecycle` and
`decisions` are equal because the Faust app co-partitions tables keyed by model across them.

| topic               | key            | value                | kind                          |
|---------------------|----------------|----------------------|-------------------------------|
| ember.requests      | request id     | request              | traffic, 24 h retention       |
| ember.admitted      | model name     | admitted request     | traffic, 24 h retention       |
| ember.model.<m>     | request id     | admitted request     | traffic, per model, 24 h      |
| ember.replies       | request id     | token chunk          | traffic, 1 h (default reply)  |
| ember.lifecycle     | model name     | lifecycle event      | events, 24 h retention        |
| ember.decisions     | model name     | scale decision       | audit, 7 days                 |
| ember.workers       | worker id      | lifecycle event      | state, compacted (latest)     |
| ember.deadletters   | source key     | dead letter          | audit, 14 days                |
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

# Equal on purpose: the streams app joins these by model (co-partitioning).
CONTROL_PARTITIONS = 4
# One partition per potential worker of a model: a worker owns exactly one partition.
MODEL_TOPIC_PARTITIONS = 8

TOPIC_PREFIX = "ember."
REQUESTS = "ember.requests"
ADMITTED = "ember.admitted"
REPLIES = "ember.replies"
LIFECYCLE = "ember.lifecycle"
DECISIONS = "ember.decisions"
WORKERS = "ember.workers"
DEADLETTERS = "ember.deadletters"
MODEL_TOPIC_PREFIX = "ember.model."

_TOPIC_NAME = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
_UNSAFE = re.compile(r"[^a-zA-Z0-9._-]")


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    replication_factor: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if not _TOPIC_NAME.match(self.name):
            raise ValueError(f"topic name {self.name!r}: only [a-zA-Z0-9._-], at most 249 chars")
        if self.partitions < 1:
            raise ValueError(f"topic {self.name}: partitions must be >= 1")


def _traffic(retention_ms: int) -> dict[str, str]:
    return {"cleanup.policy": "delete", "retention.ms": str(retention_ms)}


def is_valid_topic_name(name: str) -> bool:
    return bool(_TOPIC_NAME.match(name)) and name not in (".", "..")


def model_topic_name(model: str) -> str:
    """Per-model request topic. Characters Kafka forbids become '_' (e.g. 'org/llama' ->
    'ember.model.org_llama')."""
    return MODEL_TOPIC_PREFIX + _UNSAFE.sub("_", model)[: 249 - len(MODEL_TOPIC_PREFIX)]


def model_topic(
    model: str, partitions: int = MODEL_TOPIC_PARTITIONS, replication_factor: int = 1
) -> TopicSpec:
    return TopicSpec(
        model_topic_name(model),
        partitions,
        _traffic(DAY_MS),
        replication_factor,
        description=f"admitted requests for model {model}; one partition per worker",
    )


def core_topics(replication_factor: int = 1) -> list[TopicSpec]:
    rf = replication_factor
    return [
        TopicSpec(REQUESTS, CONTROL_PARTITIONS, _traffic(DAY_MS), rf, "requests from backends"),
        TopicSpec(ADMITTED, CONTROL_PARTITIONS, _traffic(DAY_MS), rf, "admitted, keyed by model"),
        TopicSpec(REPLIES, CONTROL_PARTITIONS, _traffic(HOUR_MS), rf, "default reply topic"),
        TopicSpec(LIFECYCLE, CONTROL_PARTITIONS, _traffic(DAY_MS), rf, "worker lifecycle events"),
        TopicSpec(DECISIONS, CONTROL_PARTITIONS, _traffic(7 * DAY_MS), rf, "scale decisions"),
        TopicSpec(
            WORKERS,
            CONTROL_PARTITIONS,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": str(HOUR_MS)},
            rf,
            "latest lifecycle state per worker (compacted)",
        ),
        TopicSpec(DEADLETTERS, 1, _traffic(14 * DAY_MS), rf, "undecodable or invalid input"),
    ]


def all_topics(models: Sequence[str] = (), replication_factor: int = 1) -> list[TopicSpec]:
    specs = core_topics(replication_factor)
    specs += [model_topic(m, replication_factor=replication_factor) for m in models]
    return specs
