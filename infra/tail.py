"""Follow topics from their current end: the demo's decision log, the benchmarks' tails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from infra.settings import KafkaSettings


class TopicTail:
    """Every record appended to `topics` after start(), passed through `keep(record)` (an
    aiokafka ConsumerRecord); what `keep` returns (None: skip; an exception: skip) lands in
    `items`, in arrival order. All partitions are assigned (no group), so starting one never
    rebalances anybody. `consumer` settings go to the AIOKafkaConsumer; `max_records` caps
    each fetch."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: str | Sequence[str],
        keep: Callable[[ConsumerRecord], Any],
        max_records: int | None = None,
        **consumer: Any,
    ) -> None:
        self.kafka, self.keep = kafka, keep
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.items: list[Any] = []
        self._max_records = max_records
        self._settings = consumer
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            **self.kafka.aiokafka_kwargs(), enable_auto_commit=False, **self._settings
        )
        await self._consumer.start()
        tps = [TopicPartition(t, p) for t in self.topics for p in await self._partitions(t)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _partitions(self, topic: str) -> list[int]:
        """The topic's partitions; a topic created a moment ago gets up to 5 s for its
        metadata (then partition 0 is assumed)."""
        assert self._consumer is not None
        parts = self._consumer.partitions_for_topic(topic)
        for _ in range(50):
            if parts:
                break
            await self._consumer._client.force_metadata_update()  # noqa: SLF001
            self._consumer._client.add_topic(topic)  # noqa: SLF001
            await asyncio.sleep(0.1)
            parts = self._consumer.partitions_for_topic(topic)
        return sorted(parts or {0})

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=200, max_records=self._max_records)
            for records in batches.values():
                for rec in records:
                    with contextlib.suppress(Exception):
                        item = self.keep(rec)
                        if item is not None:
                            self.items.append(item)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
