"""streams.faust_app, "Metadata that shrinks", on the real broker: aiokafka's producer drops
every topic it never listed from its metadata once it lists one; Ember's lists them all."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaProducer

from infra.settings import KafkaSettings
from infra.topics import TopicSpec, apply_topics
from streams.faust_app import track_known_topics


@pytest.mark.parametrize("tracked", [False, True])
async def test_a_send_to_an_unknown_topic_keeps_the_known_ones_only_when_tracked(
    kafka_settings: KafkaSettings, tracked: bool
) -> None:
    known = f"ember-test-known-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [TopicSpec(known, 2)])
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs())
    await producer.start()  # asks for every topic: `known` is in its metadata, unlisted
    try:
        client = producer.client
        if client.cluster.partitions_for_topic(known) is None:  # created a moment ago
            await client._metadata_update(client.cluster, [])
        assert client.cluster.partitions_for_topic(known) == {0, 1}
        assert known not in client._topics
        if tracked:
            assert known in track_known_topics(client)
        # what the first send to a topic that does not exist does
        await client.add_topic(f"ember-test-nowhere-{uuid.uuid4().hex[:8]}")
        await client.force_metadata_update()
        still_known = client.cluster.partitions_for_topic(known) is not None
        assert still_known is tracked
    finally:
        await producer.stop()
