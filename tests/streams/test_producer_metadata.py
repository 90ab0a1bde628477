"""streams.faust_app, "Metadata that shrinks", on the real broker: once aiokafka's producer
lists one topic, a record waiting for a topic it never listed is stuck; Ember's TopicList
lists every topic before the first send there."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from infra.settings import KafkaSettings
from infra.topics import TopicSpec, apply_topics
from streams.faust_app import TopicList


async def test_the_topic_list_starts_with_every_topic_of_the_cluster(
    kafka_settings: KafkaSettings,
) -> None:
    known = f"ember-test-known-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [TopicSpec(known, 2)])
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs())
    await producer.start()
    try:
        topics = TopicList(producer.client)
        assert known in await topics.start()
        assert known in topics.listed and known in producer.client._topics
        assert producer.client.cluster.partitions_for_topic(known) == {0, 1}
    finally:
        await producer.stop()


@pytest.mark.parametrize("listed", [False, True])
async def test_a_record_waiting_when_an_unknown_topic_is_listed_goes_out_only_when_listed(
    kafka_settings: KafkaSettings, listed: bool
) -> None:
    known = f"ember-test-known-{uuid.uuid4().hex[:8]}"
    nowhere = f"ember-test-nowhere-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [TopicSpec(known, 1)])
    # linger: the record waits in the producer while the unknown topic is listed
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs(), linger_ms=500)
    await producer.start()
    client = producer.client
    try:
        topics = TopicList(client)
        if listed:
            await topics.start()
            topics.add(known)
        else:
            await client.force_metadata_update()  # every topic, none listed
        assert client.cluster.partitions_for_topic(known) == {0}
        sent = await producer.send(known, b"waits")
        if listed:
            topics.add(nowhere)
        await client.add_topic(nowhere)  # what the first send to a missing topic does
        done, _ = await asyncio.wait([sent], timeout=3.0)
        assert bool(done) is listed
        if not listed:
            assert client.cluster.partitions_for_topic(known) is None  # dropped out
            await client.add_topic(known)  # lets it go, so the producer can stop
            await asyncio.wait_for(sent, 10)
    finally:
        await producer.stop()
