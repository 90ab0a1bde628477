"""Table writes hand the producer's buffer their changelog records ready to send
(streams.tables, streams.faust_app "A future per table write"): the bytes Faust would send,
one queue entry per turn of the buffer's task, offsets noted once in. No broker needed; the
real-broker side is in test_app_kafka (a placed request's row on its changelog)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.structs import RecordMetadata, TopicPartition

from streams.app import app
from streams.faust_app import ReadyRecord, RecordBuffer
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


class FakeClient:
    """What RecordBuffer uses of aiokafka's producer: real batches (`create_batch`), and a
    `send_batch` that keeps them and returns the future of the first record's metadata;
    batches to `fail_topic` raise."""

    def __init__(self, fail_topic: str = "", batch_size: int = 16384) -> None:
        self.batches: list[tuple[str, int, list[bytes | None]]] = []
        self.fail_topic = fail_topic
        self.batch_size = batch_size
        self.offset = 41

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.batch_size, 0)

    async def send_batch(
        self, batch: BatchBuilder, topic: str, *, partition: int
    ) -> asyncio.Future[Any]:
        if topic == self.fail_topic:
            raise RuntimeError("no metadata")
        keys = [record.key for record in DefaultRecordBatch(bytes(batch._build()))]
        self.batches.append((topic, partition, keys))
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        tp = TopicPartition(topic, partition)
        done.set_result(RecordMetadata(topic, partition, tp, self.offset, -1, 0, 0))
        self.offset += len(keys)
        return done


class FakeProducer:
    """What RecordBuffer uses of Faust's producer: its aiokafka producer and topic list."""

    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.topic_list = None

    def _ensure_producer(self) -> FakeClient:
        return self.client


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


def record(topic: str, key: bytes, table: FakeTable | None, partition: int = 2) -> ReadyRecord:
    return ReadyRecord(topic, key, b"row", partition, None, table)


def new_buffer(client: FakeClient) -> RecordBuffer:
    buffer = RecordBuffer()
    buffer.app = FakeApp(FakeProducer(client))
    return buffer


async def test_records_put_between_two_turns_take_one_entry_and_go_a_batch_per_partition(
) -> None:
    client = FakeClient()
    buffer = new_buffer(client)
    table = FakeTable()
    for key, partition in ((b"a", 2), (b"b", 0), (b"c", 2)):
        buffer.put_record(record("t-changelog", key, table, partition))
    buffer.put_record(record("ember.admitted", b"d", None, 2))  # an agent's, no table
    assert buffer.size == 1
    await buffer._send_pending(buffer.pending.get_nowait())
    assert client.batches == [
        ("t-changelog", 2, [b"a", b"c"]),
        ("t-changelog", 0, [b"b"]),
        ("ember.admitted", 2, [b"d"]),
    ]
    assert buffer.size == 0 and buffer.take_records() == []
    await asyncio.sleep(0)  # the done callbacks
    # each batch's last record of the table: offsets 41-42 (partition 2), then 43
    assert table.data.persisted == [
        (TopicPartition("t-changelog", 2), 42), (TopicPartition("t-changelog", 0), 43)
    ]
    buffer.put_record(record("t-changelog", b"e", table))  # after the turn: a new entry
    assert buffer.size == 1


async def test_records_more_than_a_batch_holds_go_in_several_in_order() -> None:
    client = FakeClient(batch_size=200)
    buffer = new_buffer(client)
    keys = [b"k%02d" % i for i in range(12)]
    for key in keys:
        buffer.put_record(record("t", key, None))
    await buffer._send_pending(buffer.pending.get_nowait())
    assert len(client.batches) > 1
    assert [k for _, _, batch in client.batches for k in batch] == keys


async def test_a_record_that_cannot_be_sent_does_not_stop_the_others() -> None:
    client = FakeClient(fail_topic="gone-changelog", batch_size=200)
    buffer = new_buffer(client)
    table = FakeTable()
    buffer.put_record(record("gone-changelog", b"a", table))
    buffer.put_record(ReadyRecord("t", b"huge", b"x" * 1000, 2, None, None))  # over a batch
    buffer.put_record(record("t", b"b", None))
    await buffer._send_pending(buffer.pending.get_nowait())  # the failure is logged
    assert client.batches == [("t", 2, [b"huge"]), ("t", 2, [b"b"])]


async def test_flush_waits_until_every_ready_record_is_handed_over() -> None:
    client = FakeClient()
    buffer = new_buffer(client)
    await buffer.start()
    try:
        for key in (b"a", b"b"):
            buffer.put_record(record("t", key, None))
        await buffer.flush()
        assert client.batches == [("t", 2, [b"a", b"b"])]
    finally:
        await buffer.stop()
