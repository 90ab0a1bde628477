"""streams.faust_app: the consumer Faust builds for Ember (no broker needed)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from aiokafka import TopicPartition
from aiokafka.consumer.fetcher import Fetcher
from aiokafka.consumer.subscription_state import Assignment
from aiokafka.structs import OffsetAndMetadata
from faust.types import TP

import pytest

from streams.faust_app import EmberApp, commit_start_offsets, lean_fetch_rounds, start_eagerly


def app(**options: Any) -> EmberApp:
    return EmberApp("ember-test-faust-app", broker="kafka://127.0.0.1:1", autodiscover=False,
                    **options)


async def test_the_consumer_waits_at_most_the_fetch_max_wait() -> None:
    ember = app(fetch_max_wait_ms=25)
    consumer = ember.consumer._thread._create_worker_consumer(ember.transport)
    try:
        assert consumer._fetch_max_wait_ms == 25  # Faust's own consumer thread passes 1500
        assert consumer._group_id == "ember-test-faust-app"  # the rest is still Faust's
    finally:
        await consumer.stop()
    assert ember.monitor not in set(ember.sensors)


class FakeAiokafka:
    """What the pause mirroring uses of an AIOKafkaConsumer, recording the calls and the
    thread (loop) they were made on."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.calls: list[tuple[str, set[TopicPartition], asyncio.AbstractEventLoop]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, *tps: TopicPartition) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in tps)
        self.calls.append(("pause", set(tps), asyncio.get_running_loop()))

    def resume(self, *tps: TopicPartition) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in tps)
        self.calls.append(("resume", set(tps), asyncio.get_running_loop()))


async def test_faust_pauses_are_made_in_aiokafka_on_the_consumer_thread() -> None:
    ember = app()
    consumer = ember.consumer
    changelog = [TP("ember-x-placement-changelog", p) for p in range(2)]
    fake = FakeAiokafka({TopicPartition(tp.topic, tp.partition) for tp in changelog})
    loop = asyncio.get_running_loop()  # stands in for the consumer thread's loop
    consumer._thread._consumer = fake
    consumer._thread.thread_loop = loop
    not_assigned = TP("ember.requests", 3)

    consumer.pause_partitions([*changelog, not_assigned])
    assert set(changelog) <= consumer._paused_partitions  # Faust's own bookkeeping as before
    assert fake.calls == []  # not yet: it runs on the consumer's loop
    await asyncio.sleep(0)
    assert fake.calls == [("pause", fake.assigned, loop)]  # only what aiokafka has assigned

    consumer.resume_partitions(changelog[:1])
    await asyncio.sleep(0)
    assert fake.calls[-1] == ("resume", {TopicPartition("ember-x-placement-changelog", 0)}, loop)
    assert changelog[0] not in consumer._paused_partitions

    consumer.pause_partitions([not_assigned])  # nothing of it assigned: no call at all
    await asyncio.sleep(0)
    assert len(fake.calls) == 2


def test_before_the_consumer_starts_pauses_stay_faust_bookkeeping() -> None:
    consumer = app().consumer
    consumer.pause_partitions([TP("t", 0)])  # no aiokafka consumer, no thread loop yet
    assert TP("t", 0) in consumer._paused_partitions


def test_a_rebalance_without_the_monitor_logs_no_missing_sensor_state(caplog: Any) -> None:
    """Without the Monitor no sensor returns rebalance state, and Faust warned "Missing sensor
    state for rebalance" twice per rebalance (every start of a streams process)."""
    ember = app()
    with caplog.at_level("WARNING"):
        ember.on_rebalance_start()
        ember.on_rebalance_return()
        ember.on_rebalance_end()
    assert not [r for r in caplog.records if "Missing sensor state" in r.getMessage()]
    assert ember.rebalancing is False and ember._rebalancing_sensor_state is None


class FakeGroupConsumer:
    """What commit_start_offsets uses of an AIOKafkaConsumer: committed offsets, the log's
    ends, seek and commit (recorded)."""

    def __init__(self, committed: dict[TopicPartition, int]) -> None:
        self._committed = committed
        self._coordinator = self  # aiokafka's group coordinator answers the offset fetch
        self.fetches: list[list[TopicPartition]] = []
        self.sought: dict[TopicPartition, int] = {}
        self.commits: list[dict[TopicPartition, int]] = []

    async def fetch_committed_offsets(
        self, tps: list[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        self.fetches.append(list(tps))  # the broker answers -1 for "none"
        return {tp: OffsetAndMetadata(self._committed.get(tp, -1), "") for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 100 + tp.partition for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: tp.partition for tp in tps}

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


async def test_partitions_never_committed_start_where_reset_says_and_that_is_committed() -> None:
    fake = FakeGroupConsumer({TopicPartition("ember.requests", 0): 7})
    assigned = {TP("ember.requests", 0), TP("ember.requests", 1), TP("ember.admitted", 2),
                TP("g-placement-changelog", 1)}
    start = await commit_start_offsets(fake, assigned, "latest")
    expected = {TopicPartition("ember.requests", 1): 101, TopicPartition("ember.admitted", 2): 102}
    assert start == fake.sought == expected and fake.commits == [expected]
    assert len(fake.fetches) == 1 and len(fake.fetches[0]) == 3  # one request, no changelog
    # earliest: the log's start; nothing new to commit: no commit at all
    fake = FakeGroupConsumer({})
    assert await commit_start_offsets(fake, {TP("t", 3)}, "earliest") == {TopicPartition("t", 3): 3}
    fake = FakeGroupConsumer({TopicPartition("t", 3): 1})
    assert await commit_start_offsets(fake, {TP("t", 3)}, "latest") == {} and fake.commits == []


# --- records handed to the conductor's callback (module docstring, 5) ----------------------


async def test_a_callback_that_never_waits_runs_to_its_end_in_the_caller() -> None:
    seen: list[str] = []

    async def put(item: str) -> None:
        seen.append(item)

    assert start_eagerly(put("a")) is None
    assert seen == ["a"]  # done before any other task could run


async def test_a_callback_that_fails_without_waiting_raises_at_once() -> None:
    async def bad() -> None:
        raise ValueError("undecodable")

    with pytest.raises(ValueError, match="undecodable"):
        start_eagerly(bad())


async def test_a_callback_that_waits_finishes_in_its_rest_with_what_it_waited_for() -> None:
    room: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[object] = []

    async def put() -> str:
        steps.append("started")
        steps.append(await room)
        await asyncio.sleep(0)  # a bare yield on the way
        steps.append("put")
        return "done"

    task = start_eagerly(put())
    assert task is not None and steps == ["started"]
    await asyncio.sleep(0)
    assert not task.done()
    room.set_result(7)
    assert await task == "done"
    assert steps == ["started", 7, "put"]


async def test_a_waited_for_failure_reaches_the_callback() -> None:
    room: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def put() -> str:
        try:
            await room
        except KeyError:
            return "handled"
        return "not raised"

    task = start_eagerly(put())
    assert task is not None
    room.set_exception(KeyError("gone"))
    assert await task == "handled"


async def test_cancelling_the_rest_cancels_what_the_callback_waits_on() -> None:
    """What `wait_first` does to the rest when the flow is suspended: the callback sees the
    cancellation where it waits, as it would in a task."""
    room: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    cleaned: list[str] = []

    async def put() -> None:
        try:
            await room
        finally:
            cleaned.append("cleanup")

    task = start_eagerly(put())
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert room.cancelled()
    assert cleaned == ["cleanup"]


@pytest.mark.parametrize(
    "started",
    [
        True,  # cancelled while it gives the loop a turn: thrown into the callback
        False,  # cancelled before its first step: the callback is closed
    ],
)
async def test_a_rest_cancelled_without_a_future_to_cancel_ends_the_callback(
    started: bool,
) -> None:
    cleaned: list[str] = []

    async def put() -> None:
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            cleaned.append("cleanup")

    task = start_eagerly(put())
    assert task is not None
    if started:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["cleanup"]


def bare_fetcher() -> Any:
    """An aiokafka Fetcher with what its `_get_actions_per_node` reads, and no client:
    `ember.lifecycle`'s partitions lead on node 1, all others on node 0."""
    fetcher = object.__new__(Fetcher)
    fetcher._records = {}
    fetcher._in_flight = set()
    fetcher._preferred_read_replica = {}
    leader = lambda tp: 1 if tp.topic == "ember.lifecycle" else 0  # noqa: E731
    fetcher._client = SimpleNamespace(cluster=SimpleNamespace(leader_for_partition=leader))
    fetcher._max_partition_fetch_bytes = 1 << 20
    fetcher._fetch_max_wait_ms, fetcher._fetch_min_bytes, fetcher._fetch_max_bytes = 100, 1, 1 << 26
    fetcher._isolation_level, fetcher._client_rack, fetcher._fetcher_timeout = 0, None, 0.2
    return fetcher


def fetched(actions: Any) -> set[TopicPartition]:
    return {TopicPartition(topic, p) for _, request in actions[0]
            for topic, parts in request.topics for p, _, _ in parts}


async def test_a_fetch_round_walks_past_quiet_paused_partitions_to_the_same_actions() -> None:
    busy = [TopicPartition("ember.requests", p) for p in range(4)]
    changelog = [TopicPartition("ember-placement-changelog", p) for p in range(4)]
    assignment = Assignment([*busy, *changelog, TopicPartition("ember.lifecycle", 0)])
    for tp in busy + changelog:
        assignment.state_value(tp).seek(7)  # the lifecycle partition awaits its reset (node 1)
    for tp in changelog:
        assignment.state_value(tp).pause()
    plain, lean = bare_fetcher(), bare_fetcher()
    assert lean_fetch_rounds(lean)
    lean._records[changelog[0]] = plain._records[changelog[0]] = SimpleNamespace(
        calculate_backoff=lambda: 0)  # buffered before its pause: aiokafka's own way

    expected = Fetcher._get_actions_per_node(plain, assignment)
    got = lean._get_actions_per_node(assignment)
    assert fetched(got) == fetched(expected) == set(busy)
    assert got[1:4] == expected[1:4]  # the reset request, timeout, metadata flag
    assert dict(got[1]) == {1: [TopicPartition("ember.lifecycle", 0)]}
    # one future stands for the three quiet partitions' resumes
    assert len(expected[4]) == 3 and len(got[4]) == 1
    quiet_future = got[4][-1]
    assert not quiet_future.done()
    assert lean._get_actions_per_node(assignment)[4][-1] is quiet_future  # kept while quiet

    assignment.state_value(changelog[2]).resume()
    await asyncio.sleep(0)
    assert quiet_future.done()  # the round wakes
    again = lean._get_actions_per_node(assignment)
    assert fetched(again) == set(busy) | {changelog[2]}
    assert not again[4][-1].done()  # a new one for those still quiet

    assignment.state_value(changelog[2]).pause()  # paused again: a set seen before, anew
    assert not lean._get_actions_per_node(assignment)[4][-1].done()


def test_a_fetcher_of_another_make_is_left_as_it_is() -> None:
    assert not lean_fetch_rounds(SimpleNamespace())
