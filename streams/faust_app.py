"""The Faust app class Ember runs: Faust's, with four of its defaults' costs taken out.

1. Fetch long polls. Faust creates its Kafka consumer with `fetch_max_wait_ms=1500` and no
   setting to change it. aiokafka keeps one fetch in flight per broker, and leaves out of it
   every partition whose fetched records the app has not taken yet. Under load that is the
   busy partitions (`ember.requests`, `ember.admitted`), so the fetch sent right after a
   response covers only idle ones (changelogs, the deferred topic), and the broker holds it
   for the whole wait: for up to 1.5 s nothing new is fetched for the busy partitions, even
   once the app has taken what it had. The control-plane benchmark showed it as seconds with
   no placement at all and multi-second latency from 400 requests/s. `fetch_max_wait_ms`
   (EMBER_STREAMS_FETCH_MAX_WAIT_MS) bounds that stall; an idle process sends that many
   more empty fetches (10 a second at 100 ms), which costs the broker next to nothing.
2. Pauses in name only. Faust pauses partitions it does not want records from (a table's
   changelog partitions once the table is recovered) in its own bookkeeping and asks
   aiokafka only for the others, so aiokafka goes on fetching the paused ones. The first
   record our own table writes put on such a partition is fetched and never taken, and
   aiokafka fetches nothing from that broker for `prefetch_backoff` (100 ms) after buffering
   records the app has not taken: 100 ms lost by every request in flight, once per changelog
   partition and process, each time a table partition is first written (the first cold
   start after a streams process starts lost 70-90 ms to it). Ember's consumer pauses and
   resumes those partitions in aiokafka too.
3. Start offsets nobody committed. A partition this group never committed an offset for
   starts at `consumer_auto_offset_reset` (latest), resolved anew at every assignment. A
   partition that got no record while its process ran (little traffic, a fresh group) still
   has no offset when the process restarts, and what was produced to it in between was then
   skipped: requests lost (a reliability run lost two). At each assignment Ember's consumer
   resolves such partitions once, seeks to that offset and commits it, so a restart resumes
   there. Changelog partitions are left to Faust's recovery.
4. The Monitor sensor: per-event statistics (Faust's own /stats page) that nothing of Ember
   reads, paid on every record in and out. Ember's counters are streams.agents.outbox's,
   served on /metrics. Without it no sensor returns state at a rebalance, which Faust logged
   as two "Missing sensor state for rebalance" warnings per rebalance; Ember's app keeps a
   marker state instead.
5. Four tasks per record. Faust's drain loop hands every fetched record to the conductor's
   callback through `Service.wait_first(callback(message), suspend_flow.wait())`: per record
   it creates four tasks (the callback, the flow, the consumer's stopped and crashed events),
   waits on them and cancels three, so that a rebalance can abandon a callback stuck on a
   full buffer. The callback almost never waits: it decodes the record and puts it in its
   streams' queues. Ember's loop starts the callback at once (`start_eagerly`, what Python
   3.12's eager tasks do) and pays for `wait_first` only when the callback does wait. The
   control-plane benchmark drained a backlog 1.5x as fast per CPU second with it. Only
   once the app is steady: before its tables are first recovered, and while it rebalances
   or recovers them again, every record takes Faust's own way. With the eager start on
   from the first record, a streams restart under traffic (tests/reliability, "streams app
   restart") lost requests in 2 of 4 runs; with it off until then, none in 6.
6. Metadata that shrinks. aiokafka's producer asks the broker for every topic's metadata
   while it tracks no topic by name, and a send to a topic found that way adds nothing to
   its list. The first send to a topic it has no metadata for (a client's reply topic that
   does not exist) puts that one topic on the list, and from then on it asks only for the
   listed ones: every other topic drops out of its metadata. A record already waiting for
   one of them is then stuck: its sender asks for metadata again and again, about a
   thousand times a second, with nothing on the list that would bring the topic back, until
   the record expires (an admitted request never placed; the storm of metadata requests
   slowed the whole process). A producer also starts with no topic's metadata at all (its
   bootstrap asks for none). Ember's producer fetches every topic's metadata once started
   and lists them all, and lists any other topic before its first send there, so a topic
   it sends to never leaves its metadata.
7. A future per record. Faust sends each changelog record through its producer buffer as
   a FutureMessage (a queue entry, a turn of the buffer's task, sensor calls and a callback
   per record), and each `send` puts one record in aiokafka's accumulator with a future of
   its own, resolved with a callback when the batch is in. Placement writes a request's row
   when it places it and deletes it when it ends, and the agents send two records per
   request (admitted, placed). Ember's tables (streams.tables) and agents
   (streams.agents.outbox) hand the buffer records ready to send, to a known partition
   (`put_record`); the records put between two turns of the buffer's task take one queue
   entry together, and that task sends them, in order, a batch per partition (aiokafka's
   `send_batch`: one future per batch), with Faust's own. Nothing else changes: agents
   never wait for a send (unless `max_records` wait), Faust's `flush` before a commit
   waits until every record put so far is handed to aiokafka, and a table's store notes
   the offset of its records once they are in.
8. Paused partitions walked every fetch round. aiokafka's fetcher decides what to fetch by
   walking every assigned partition, each time a fetch returns or the app takes records,
   and waits on a future per paused partition to learn of a resume. The 36 paused
   changelog partitions (9 tables x 4) are most of the 53 a process holds, and a busy
   process has a few hundred fetch rounds a second, each walked twice. Ember's fetcher
   hands aiokafka's walk only the partitions that can be fetched or need an action, and
   waits on one future that any paused partition's resume completes
   (`lean_fetch_rounds`). A paused partition with records still buffered, or without a
   position, takes aiokafka's own way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, cast

import aiokafka
import faust
from aiokafka import TopicPartition
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP

from infra.logs import get_logger

DEFAULT_FETCH_MAX_WAIT_MS = 100
# The rebalance "sensor state" when no sensor has any: Faust warns when that state is empty.
_NO_SENSORS: dict[Any, Any] = {"no sensors": None}


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by AIOKafkaConsumer.start() when it creates its fetcher: the constructor
        # argument Faust fixes at 1500 ms.
        consumer._fetch_max_wait_ms = getattr(
            self.app, "fetch_max_wait_ms", DEFAULT_FETCH_MAX_WAIT_MS
        )

        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is None or not lean_fetch_rounds(fetcher):
            self.log.warning("aiokafka's fetcher is not the expected one: fetch rounds as is")

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        try:
            await commit_start_offsets(
                self._ensure_consumer(), assigned, self.app.conf.consumer_auto_offset_reset
            )
        except Exception as exc:  # a new rebalance meanwhile, the broker away: Faust goes on
            self.log.warning("could not commit start offsets: %r", exc)
        await super().on_partitions_assigned(assigned, generation_id)


async def commit_start_offsets(
    consumer: Any, assigned: Iterable[TP], reset: str
) -> dict[TopicPartition, int]:
    """For each assigned partition (changelogs aside) without a committed offset: the offset
    `reset` (latest or earliest) gives it now, sought to and committed (module docstring,
    3). Returns what it committed. Runs in the rebalance listener, before fetching starts."""
    tps = [
        TopicPartition(tp.topic, tp.partition)
        for tp in assigned
        if not tp.topic.endswith("-changelog")
    ]
    # One OffsetFetch for them all: AIOKafkaConsumer.committed() asks partition by partition.
    found = await consumer._coordinator.fetch_committed_offsets(tps) if tps else {}
    new = [tp for tp in tps if tp not in found or found[tp].offset < 0]
    if not new:
        return {}
    if reset == "earliest":
        offsets = await consumer.beginning_offsets(new)
    else:
        offsets = await consumer.end_offsets(new)
    start = {tp: int(offsets[tp]) for tp in new}
    for tp, offset in start.items():
        consumer.seek(tp, offset)
    await consumer.commit(start)
    return start


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any] | None:
    """Run `coro` up to its first wait, in the caller's task. None when it finished without
    waiting (its result is dropped, its exception raised here); otherwise a task running the
    rest (module docstring, 5). The rest drives `coro` as a task of its own would: cancelled,
    it cancels the future `coro` waits on, and `coro` sees the CancelledError where it waits;
    cancelled before its first step, `coro` is closed (GeneratorExit where it waits)."""
    try:
        waited = coro.send(None)
    except StopIteration:
        return None
    rest = asyncio.ensure_future(_rest(coro, waited))
    rest.add_done_callback(lambda _: coro.close())  # no-op once `coro` has finished
    return rest


async def _rest(coro: Coroutine[Any, Any, Any], waited: Any) -> Any:
    while True:
        exc: BaseException | None = None
        try:
            if waited is None:  # a bare yield (asyncio.sleep(0)): give the loop a turn
                await asyncio.sleep(0)
            elif asyncio.isfuture(waited):
                # What a task does with the future a coroutine yields it: without this the
                # future still reads as awaited, and awaiting it again raises.
                waited._asyncio_future_blocking = False
                await waited
            else:
                raise RuntimeError(f"a coroutine yielded {waited!r}, not a future")
        except BaseException as raised:  # noqa: BLE001 - handed to `coro`, as a task would
            exc = raised
        try:
            if exc is None or _outcome_of(waited, exc):
                waited = coro.send(None)  # `coro` reads the future's outcome itself
            else:
                waited = coro.throw(exc)  # e.g. cancelled during a bare yield
        except StopIteration as stop:
            return stop.value


def _outcome_of(waited: Any, exc: BaseException) -> bool:
    """`exc` is the done future's own exception, or its cancellation."""
    if not asyncio.isfuture(waited) or not waited.done():
        return False
    if waited.cancelled():
        return isinstance(exc, asyncio.CancelledError)
    return waited.exception() is exc


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - the broker's
        """Faust's drain loop (faust.transport.consumer.Consumer._drain_messages), but for how
        a record reaches the conductor once the app is steady (not rebalancing, its tables
        recovered): started eagerly, with `wait_first` only for a callback that waits (module
        docstring, 5)."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag, unset_flag = self.diag.set_flag, self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for
        suspend_flow = self.suspend_flow
        app = self.app
        recovered = app.tables.recovery.completed.is_set

        def steady() -> bool:  # not rebalancing or recovering, tables recovered once
            return recovered() and not app.rebalancing and not app.in_recovery

        yield_every, num_since_yield = 100, 0
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                records = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in records:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await asyncio.sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset and acks_enabled_for(message.topic):
                                await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            if suspend_flow.is_set() or not steady():
                                await self.wait_first(callback(message), suspend_flow.wait())
                            else:
                                rest = start_eagerly(cast(Any, callback(message)))
                                if rest is not None:
                                    await self.wait_first(rest, suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        tps = list(tps)
        super().pause_partitions(tps)
        self._in_aiokafka("pause", tps)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = list(tps)
        super().resume_partitions(tps)
        self._in_aiokafka("resume", tps)

    def _in_aiokafka(self, action: str, tps: list[TP]) -> None:
        """`AIOKafkaConsumer.pause` or `.resume` of those of `tps` it has assigned, run on the
        consumer's own thread (its loop owns the subscription state)."""
        thread = self._thread
        consumer = getattr(thread, "_consumer", None)
        loop = getattr(thread, "thread_loop", None)
        if consumer is None or loop is None or loop.is_closed() or not tps:
            return
        wanted = {TopicPartition(tp.topic, tp.partition) for tp in tps}

        def apply() -> None:
            assigned = wanted & consumer.assignment()  # others would raise IllegalStateError
            if assigned:
                getattr(consumer, action)(*assigned)

        try:
            loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the consumer's loop closed meanwhile (shutting down)
            pass


def lean_fetch_rounds(fetcher: Any) -> bool:
    """Install the lean fetch round on an aiokafka Fetcher (module docstring, 8); False,
    leaving it as it is, where its internals are not the ones this was written for."""
    original = getattr(fetcher, "_get_actions_per_node", None)
    if original is None or not hasattr(fetcher, "_records"):
        return False
    last: list[Any] = [None, None, None]  # paused tps left out, the view, their one future

    def actions(assignment: Any) -> Any:
        states = getattr(assignment, "_tp_state", None)
        if states is None:
            return original(assignment)
        records = fetcher._records
        quiet = tuple(
            tp for tp, st in states.items()
            if st.paused and st.has_valid_position and tp not in records
        )
        if not quiet:
            return original(assignment)
        # anew when they change, or one resumed (and maybe paused again) meanwhile
        if quiet != last[0] or last[1].assignment is not assignment or last[2].done():
            last[0], last[1] = quiet, _Unpaused(assignment, quiet)
            last[2] = _any_done([states[tp].resume_fut for tp in quiet])
        fetch, reset, timeout, invalid, resumes = original(last[1])
        return fetch, reset, timeout, invalid, [*resumes, last[2]]

    fetcher._get_actions_per_node = actions
    return True


class _Unpaused:
    """An aiokafka Assignment as the fetcher's walk sees it: without `quiet` partitions."""

    def __init__(self, assignment: Any, quiet: tuple[TopicPartition, ...]) -> None:
        self.assignment = assignment
        self.tps = assignment.tps.difference(quiet)
        self.state_value = assignment.state_value


def _any_done(futures: list[asyncio.Future[Any]]) -> asyncio.Future[Any]:
    """A future done once any of `futures` is."""
    any_done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(_: Any) -> None:
        if not any_done.done():
            any_done.set_result(None)

    for future in futures:
        future.add_done_callback(done)
    return any_done


class TopicList:
    """The topics an aiokafka client asks metadata for, kept so that none it sends to ever
    drops out (module docstring, 6)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.listed: set[str] = set()

    async def start(self) -> list[str]:
        """Fetch every topic's metadata (the client lists none yet, so it asks for all) and
        list every topic there; returns them."""
        await self.client.force_metadata_update()
        topics = sorted(self.client.cluster.topics())
        for topic in topics:
            self.add(topic)
        return topics

    def add(self, topic: str) -> None:
        """List `topic`; call before the first send to it."""
        if topic not in self.listed:
            self.listed.add(topic)
            self.client.add_topic(topic)


@dataclass(frozen=True, slots=True)
class ReadyRecord:
    """A record ready to send to a known partition (module docstring, 7): a table write's
    changelog record as Faust would produce it (`table`'s store notes the offset once it is
    in), or an agent's output (`table` None)."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int
    headers: list[tuple[str, bytes]] | None
    table: Any = None


# Stands in the buffer's queue for all the ReadyRecords put since its last turn.
_RECORDS: Any = object()
_log = get_logger(__name__)


class RecordBuffer(ProducerBuffer):
    """Faust's producer buffer, which also takes ready records and sends them a batch per
    partition (module docstring, 7). Not for a threaded producer (Faust's
    `producer_threaded`). `max_records`: how many may wait before `ebb` makes a sender wait.
    """

    max_records = 20_000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._records: list[ReadyRecord] = []
        self._sending = False
        self._handed = asyncio.Event()  # set after each turn that sent ready records

    def put_record(self, record: ReadyRecord) -> None:
        if not self._records:  # else a _RECORDS already waits in the queue for this one too
            self.pending.put_nowait(_RECORDS)
        self._records.append(record)

    def take_records(self) -> list[ReadyRecord]:
        """The records put since the buffer's last turn, taken out: the caller sends them."""
        records, self._records = self._records, []
        return records

    @property
    def size(self) -> int:
        """Entries waiting in the queue (Faust's `size`, without reading its settings: the
        conductor asks, through `wait_until_ebb`, before every record it hands an agent)."""
        return self.pending.qsize()

    async def wait_until_ebb(self) -> None:
        if self.pending.qsize() > self.max_messages:
            await super().wait_until_ebb()

    async def ebb(self) -> None:
        """Wait while more than `max_records` records wait to be sent."""
        while len(self._records) > self.max_records:
            await self._next_turn()

    async def flush(self) -> None:
        """Faust's flush, then until every ready record put so far is handed to the Kafka
        producer: Faust commits the offsets of the events that made them right after."""
        await super().flush()
        while (self._records or self._sending) and self.state == "running":
            await self._next_turn()

    async def _next_turn(self) -> None:
        self._handed.clear()
        try:
            await asyncio.wait_for(self._handed.wait(), 0.1)
        except asyncio.TimeoutError:
            pass

    async def _send_pending(self, fut: Any) -> None:
        if fut is not _RECORDS:
            await super()._send_pending(fut)
            return
        self._sending = True
        try:
            records = self.take_records()
            by_partition: dict[tuple[str, int], list[ReadyRecord]] = {}
            for r in records:
                by_partition.setdefault((r.topic, r.partition), []).append(r)
            producer = cast(Any, self.app).producer
            for (topic, partition), group in by_partition.items():
                await _send_batches(producer, topic, partition, group)
        finally:
            self._sending = False
            self._handed.set()


async def _send_batches(
    producer: Any, topic: str, partition: int, records: list[ReadyRecord]
) -> None:
    """`records`, in order, to one partition: as few of aiokafka's batches as hold them, one
    future each instead of one per record (a batch takes its first record whatever its size,
    so each takes at least one). A failure is logged and does not stop the other records, as
    with Faust's own buffer."""
    client = producer._ensure_producer()
    if producer.topic_list is not None:
        producer.topic_list.add(topic)
    i = 0
    while i < len(records):
        start = i
        builder = client.create_batch()
        while i < len(records):
            r = records[i]
            headers = r.headers or []
            if builder.append(timestamp=None, key=r.key, value=r.value, headers=headers) is None:
                break
            i += 1
        try:
            sent = await client.send_batch(builder, topic, partition=partition)
        except Exception as exc:
            error = repr(exc)[:300]
            _log.error("could not send records", topic=topic, records=i - start, error=error)
            continue
        sent.add_done_callback(partial(_sent, records[start:i]))


def _sent(records: list[ReadyRecord], sent: asyncio.Future[Any]) -> None:
    """A batch is in (its offset is the first record's): each table's store notes the offset
    of its last record there, as Faust's own callback does (a durable store recovers from
    there). A batch that failed is logged."""
    if sent.cancelled():
        return
    if sent.exception() is not None:
        error = repr(sent.exception())[:300]
        _log.error("records could not be produced", records=len(records), error=error)
        return
    metadata = sent.result()
    last: dict[int, tuple[Any, int]] = {}
    for i, r in enumerate(records):
        if r.table is not None:
            last[id(r.table)] = (r.table, i)
    for table, i in last.values():
        table.data.set_persisted_offset(metadata.topic_partition, metadata.offset + i)


class _Producer(faust_aiokafka.Producer):
    topic_list: TopicList | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.app.conf.producer_threaded:
            self.buffer = RecordBuffer(loop=self.loop, beacon=self.beacon)
            self.buffer.app = self.app

    async def on_start(self) -> None:
        await super().on_start()
        self.topic_list = TopicList(self._ensure_producer().client)
        await self.topic_list.start()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Any:
        if self.topic_list is not None:
            self.topic_list.add(topic)
        return await super().send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )


class _Transport(faust_aiokafka.Transport):
    Consumer: ClassVar[Any] = _Consumer
    Producer: ClassVar[Any] = _Producer


class EmberApp(faust.App):
    """`faust.App` with the consumer's fetch wait bounded, its pauses made in aiokafka too, the
    start offsets of its partitions committed, without the Monitor sensor, records handed to
    the streams without four tasks each, a producer whose metadata keeps every topic it
    knows, and ready records sent a batch per partition (see the module docstring). Takes
    Faust's options plus `fetch_max_wait_ms`. Kafka only (`kafka://` broker URLs)."""

    def __init__(
        self, *args: Any, fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS, **options: Any
    ) -> None:
        if fetch_max_wait_ms < 0:
            raise ValueError(f"fetch_max_wait_ms must be >= 0, got {fetch_max_wait_ms}")
        self.fetch_max_wait_ms = fetch_max_wait_ms
        super().__init__(*args, **options)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def on_rebalance_start(self) -> None:
        super().on_rebalance_start()
        if not self._rebalancing_sensor_state:  # no sensor keeps any (the Monitor is gone)
            self._rebalancing_sensor_state = _NO_SENSORS

    def on_init_dependencies(self) -> Any:
        dependencies = super().on_init_dependencies()  # adds the monitor to the sensors
        if self.monitor in set(self.sensors):
            self.sensors.remove(self.monitor)
        return dependencies
