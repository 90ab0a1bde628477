"""Table writes hand the producer's buffer their changelog records ready to send
(streams.tables, streams.faust_app "A future per table write"): the bytes Faust would send,
one queue entry per turn of the buffer's task, offsets noted once in. No broker needed; the
real-broker side is in test_app_kafka (a placed request's row on its changelog)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.app import app
from streams.faust_app import ChangelogRecord, RecordBuffer
from streams.tables import _Queued, arrivals, model_load, placement, placement_requests


@pytest.fixture
def buffer() -> Any:
    buffer = app.producer.buffer
    assert isinstance(buffer, RecordBuffer)
    buffer.take_records()  # what earlier tests left
    while not buffer.pending.empty():
        buffer.pending.get_nowait()
    yield buffer
    buffer.take_records()
    while not buffer.pending.empty():
        buffer.pending.get_nowait()


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
        (model_load, "tiny", {"queued": 1}),  # the global table
    ],
)
async def test_a_write_queues_the_record_faust_would_send(
    buffer: RecordBuffer, table: Any, key: Any, value: Any
) -> None:
    queued = table.send_changelog(3, key, value)
    assert queued.message.partition == 3  # what Faust's table code reads back
    [record] = buffer.take_records()
    expected = faust_would_send(table, key, value)
    assert (record.topic, record.key, record.value, record.partition) == (
        table.changelog_topic.get_topic_name(), expected.key, expected.value, 3
    )
    assert record.table is table


async def test_a_delete_queues_a_tombstone(buffer: RecordBuffer) -> None:
    placement_requests.send_changelog(3, "r-1", None, value_serializer="raw")
    [record] = buffer.take_records()
    assert record.value is None
    assert record.key == faust_would_send(placement_requests, "r-1", None, "raw").key


async def test_without_a_partition_the_write_goes_faust_s_way(
    buffer: RecordBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Any] = []  # Faust's way: `send_soon`, a FutureMessage in its queue
    monkeypatch.setattr(placement.changelog_topic, "send_soon",
                        lambda **kw: calls.append(kw) or _Queued(1))
    assert placement.send_changelog(None, "tiny", {"model": "tiny"}).message.partition == 1
    assert buffer.take_records() == [] and calls[0]["key"] == "tiny"


class FakeProducer:
    """What RecordBuffer uses of Faust's producer: `send`, returning a future of the
    record's metadata; sends to `fail_topic` raise."""

    def __init__(self, fail_topic: str = "") -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int]] = []
        self.fail_topic = fail_topic

    async def send(self, topic: str, key: bytes | None, value: bytes | None,
                   partition: int, timestamp: Any, headers: Any) -> asyncio.Future[Any]:
        if topic == self.fail_topic:
            raise RuntimeError("no metadata")
        self.sent.append((topic, key, value, partition))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(RecordMetadata(topic, partition, TopicPartition(topic, partition),
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


class FakeApp:
    def __init__(self, producer: FakeProducer) -> None:
        self.producer = producer
        self.conf = type("Conf", (), {"producer_threaded": False})()


def record(topic: str, key: bytes, table: FakeTable) -> ChangelogRecord:
    return ChangelogRecord(topic, key, b"row", 2, None, table)


async def test_records_put_between_two_turns_take_one_entry_and_go_out_in_order() -> None:
    producer = FakeProducer()
    buffer = RecordBuffer()
    buffer.app = FakeApp(producer)
    table = FakeTable()
    for key in (b"a", b"b", b"c"):
        buffer.put_record(record("t-changelog", key, table))
    assert buffer.size == 1
    await buffer._send_pending(buffer.pending.get_nowait())
    assert [key for _, key, _, _ in producer.sent] == [b"a", b"b", b"c"]
    assert buffer.size == 0 and buffer.take_records() == []
    await asyncio.sleep(0)  # the done callbacks
    tp = TopicPartition("t-changelog", 2)
    assert table.data.persisted == [(tp, 41), (tp, 42), (tp, 43)]
    buffer.put_record(record("t-changelog", b"d", table))  # after the turn: a new entry
    assert buffer.size == 1


async def test_a_record_that_cannot_be_sent_does_not_stop_the_others() -> None:
    producer = FakeProducer(fail_topic="gone-changelog")
    buffer = RecordBuffer()
    buffer.app = FakeApp(producer)
    table = FakeTable()
    buffer.put_record(record("gone-changelog", b"a", table))
    buffer.put_record(record("t-changelog", b"b", table))
    await buffer._send_pending(buffer.pending.get_nowait())
    assert producer.sent == [("t-changelog", b"b", b"row", 2)]
