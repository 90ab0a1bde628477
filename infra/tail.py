"""Follow topics from their current end: the demo's decision log, the benchmarks' tails."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.settings import KafkaSettings


class TopicTail:
    """Every record appended to `topic` after start(), decoded by `keep(value, headers)`;
    what `keep` returns (None: skip; an exception: skip) lands in `items`. All partitions are
    assigned (no group), so starting one never rebalances anybody."""

    def __init__(self, kafka: KafkaSettings, topic: str, keep: Callable[[bytes, Any], Any]):
        self.kafka, self.topic, self.keep = kafka, topic, keep
        self.items: list[Any] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self.kafka.aiokafka_kwargs(), enable_auto_commit=False)
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic)
        for _ in range(50):  # a topic created a moment ago: up to 5 s for its metadata
            if parts:
                break
            await self._consumer._client.force_metadata_update()  # noqa: SLF001
            self._consumer._client.add_topic(self.topic)  # noqa: SLF001
            await asyncio.sleep(0.1)
            parts = self._consumer.partitions_for_topic(self.topic)
        tps = [TopicPartition(self.topic, p) for p in sorted(parts or {0})]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._consumer is not None
        while True:
            for records in (await self._consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    with contextlib.suppress(Exception):
                        item = self.keep(rec.value, rec.headers)
                        if item is not None:
                            self.items.append(item)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
