"""Changelog records of table writes go to the producer with the step's records
(streams.tables.Changelog, streams.agents.outbox.send_all), as the bytes Faust would send."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.agents import outbox
from streams.agents.outbox import Out, send_all
from streams.tables import CHANGELOG, ChangelogRecord, arrivals, placement, placement_requests


@pytest.fixture(autouse=True)
def empty_changelog() -> Any:
    CHANGELOG.take()
    yield
    CHANGELOG.take()


def faust_would_send(table: Any, key: Any, value: Any, value_serializer: Any = None) -> Any:
    return table.changelog_topic.as_future_message(
        key=key,
        value=value,
        partition=3,
        key_serializer=table.key_serializer,
        value_serializer=value_serializer or table.value_serializer,
    ).message


@pytest.mark.parametrize(
    ("table", "key", "value"),
    [
        (placement, "tiny", {"model": "tiny", "workers": {}}),  # json
        (placement_requests, "r-1", {"model": "tiny", "request": b"\x81\xa1a\x01"}),  # msgpack
        (arrivals.table, ("tiny", (0.0, 60.0)), 5),  # a windowed key
    ],
)
def test_a_write_queues_the_record_faust_would_send(table: Any, key: Any, value: Any) -> None:
    queued = table.send_changelog(3, key, value)
    assert queued.message.partition == 3  # what Faust's table code reads back
    [record] = CHANGELOG.take()
    expected = faust_would_send(table, key, value)
    assert (record.topic, record.key, record.value, record.partition) == (
        table.changelog_topic.get_topic_name(), expected.key, expected.value, 3
    )
    assert record.table is table


def test_a_delete_queues_a_tombstone() -> None:
    placement_requests.send_changelog(3, "r-1", None, value_serializer="raw")
    [record] = CHANGELOG.take()
    assert record.value is None
    assert record.key == faust_would_send(placement_requests, "r-1", None, "raw").key


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int | None, timestamp: Any, headers: Any) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, partition))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(RecordMetadata(topic, partition, TopicPartition(topic, partition or 0),
                                       len(self.sent) + 40, -1, 0, 0))
        return done


class FakeStore:
    def __init__(self) -> None:
        self.persisted: list[tuple[TopicPartition, int]] = []

    def set_persisted_offset(self, tp: TopicPartition, offset: int) -> None:
        self.persisted.append((tp, offset))


class FakeTable:
    def __init__(self) -> None:
        self.data = FakeStore()


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    fake = FakeProducer()

    class App:
        producer = fake

    monkeypatch.setattr(outbox, "app", App())
    outbox.known_topics("ember.model.tiny")
    return fake


async def test_send_all_sends_the_steps_changelog_first_and_notes_its_offsets(
    producer: FakeProducer,
) -> None:
    table = FakeTable()
    CHANGELOG.add(ChangelogRecord("t-changelog", b'"r-1"', b"row", 3, None, table))
    await send_all([Out("ember.model.tiny", b"r-1", b"placed", (), 1)])
    assert producer.sent == [
        ("t-changelog", b'"r-1"', b"row", 3),
        ("ember.model.tiny", b"r-1", b"placed", 1),
    ]
    await asyncio.sleep(0)  # the done callbacks
    assert table.data.persisted == [(TopicPartition("t-changelog", 3), 41)]
    assert CHANGELOG.take() == []


async def test_writes_outside_a_step_are_sent_soon_after(producer: FakeProducer) -> None:
    CHANGELOG.add(ChangelogRecord("t-changelog", b'"m"', b"row", 0, None, FakeTable()))
    for _ in range(3):
        await asyncio.sleep(0)
    assert producer.sent == [("t-changelog", b'"m"', b"row", 0)]


async def test_writes_a_step_sends_itself_are_not_sent_twice(producer: FakeProducer) -> None:
    CHANGELOG.add(ChangelogRecord("t-changelog", b'"m"', b"row", 0, None, FakeTable()))
    await send_all([])
    for _ in range(3):
        await asyncio.sleep(0)
    assert producer.sent == [("t-changelog", b'"m"', b"row", 0)]
