"""The control plane's state, as Faust tables, and the reads and writes the agents make.

Every table is keyed by model (or, for requests, stored in their model's partition), so one
placement task owns each model's rows and a restarted or rebalanced process recovers them
from the changelogs. Tables are written inside `model_partition(model)`: in an agent that is
the partition the event came from; in a timer, where Faust has no event to take it from,
`writing_for(model)` names it.

    table                key          value                                         fed by
    placement            model        workers (state, slots, requests), counters    placement
    placement-requests   request id   a pending or in-flight request, its model     placement
    queue-depth          model        pending and in flight per latency class       tick
    warm-pool            model        workers by state, ready and free slots        tick
    arrivals             model        arrivals in 60 s windows hopping by 10 s      tick
    warm-placements      model        requests placed warm, same windows            tick
    cold-placements      model        requests placed cold, same windows            tick
    hour-of-day          model        expected rate per hour (HourOfDayProfile)     tick
    autoscaler           model        scaling policy state, last decision           tick
    model-load (global)  model        queue and slots admission bounds (ModelLoad)  tick

"tick" tables are fed from each tick's Observation (`placement.observe`).

`PlacementStore` keeps each model's `PlacementState` in memory (the policy functions take and
return whole states) and writes only what changed: the model's row when its workers or
counters change, one row per request that changed (placed, queued, finished), so a step costs
what it changed, not the size of the queue. After a restart a model's state is rebuilt from
its rows: pending in order of (class, re-placed first, admitted_at).

Durability is Faust's at-least-once: a changelog write is flushed before the offset of the
event that made it is committed. The changelog records go to the producer's buffer ready to
send, not one FutureMessage each (streams.faust_app, 7).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import faust
from faust.types import ModelT
from faust.serializers.codecs import get_codec
from faust.tables.wrappers import WindowWrapper

from schemas import LATENCY_CLASSES, AdmittedRequest, decode, encode
from streams.app import app, model_partition
from streams.faust_app import ReadyRecord, RecordBuffer
from streams.codec import MAP_CODEC
from streams.policy import HourOfDayProfile, ModelLoad, Observation, PlacementState
from streams.policy.placement import InFlight
from streams.policy.windows import hour_of_day

# Hopping windows of the rate and hit-rate tables.
WINDOW_S = 60.0
WINDOW_STEP_S = 10.0
WINDOW_EXPIRES = timedelta(minutes=10)

_PARTITION: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "ember_table_partition", default=None
)


@contextlib.contextmanager
def writing_for(model: str) -> Iterator[None]:
    """Table writes in this block go to `model`'s partition (see the module docstring)."""
    token = _PARTITION.set(model_partition(model))
    try:
        yield
    finally:
        _PARTITION.reset(token)


@dataclass(frozen=True, slots=True)
class _Queued:
    """What Faust's table code reads of what `send_changelog` returns: `.message.partition`."""

    partition: int

    @property
    def message(self) -> _Queued:
        return self


class _Changelog(faust.Table):
    """Changelog records, serialized as Faust would, put in the producer's RecordBuffer
    (streams.faust_app, 7). Faust's own way where that buffer is not there, in a
    transaction, or when the producer is to pick the partition. Keys and values go straight
    to the codec Faust's serializer registry would pick for them (`_codecs`); models, or a
    changelog topic with a schema of its own, go through the registry itself."""

    def send_changelog(
        self,
        partition: int | None,
        key: Any,
        value: Any,
        key_serializer: Any = None,
        value_serializer: Any = None,
    ) -> Any:
        buffer = self.app.producer.buffer
        if partition is None or self.app.in_transaction or not isinstance(buffer, RecordBuffer):
            return super().send_changelog(partition, key, value, key_serializer, value_serializer)
        topic = self.changelog_topic
        codecs = self._codecs(topic, key_serializer, value_serializer)
        if codecs is None or isinstance(key, ModelT) or isinstance(value, ModelT):
            final_key, headers = topic.prepare_key(
                key, key_serializer or self.key_serializer, None, {}
            )
            final_value, headers = topic.prepare_value(
                value, value_serializer or self.value_serializer, None, headers
            )
            items = list(headers.items()) if headers else None
        else:
            key_codec, value_codec = codecs
            final_key = key if key is None or isinstance(key, bytes) else key_codec.dumps(key)
            final_value = value if isinstance(value, bytes) else value_codec.dumps(value)
            items = None
        name = topic.get_topic_name()
        buffer.put_record(ReadyRecord(name, final_key, final_value, partition, items, self))
        return _Queued(partition)

    def _codecs(self, topic: Any, key_serializer: Any, value_serializer: Any) -> Any:
        """(key codec, value codec) as Faust's registry resolves them for this changelog
        topic (`Registry._serializer`: the first serializer named, here or on the schema or
        the app), or None where the registry is needed: a schema class of Faust's default
        leaves headers alone and decides nothing else. Resolved once per serializer pair."""
        cache = self.__dict__.setdefault("_ember_codecs", {})
        wanted = (key_serializer, value_serializer)
        if wanted not in cache:
            schema, registry = topic.schema, self.app.serializers
            key_name = (key_serializer or self.key_serializer or schema.key_serializer
                        or registry.key_serializer)
            value_name = (value_serializer or self.value_serializer
                          or schema.value_serializer or registry.value_serializer)
            plain = type(schema) is faust.Schema and key_name and value_name
            cache[wanted] = (
                (get_codec(key_name), get_codec(value_name)) if plain else None
            )
        return cache[wanted]


class ModelTable(_Changelog):
    """A table whose rows live in their model's partition, also when written by a timer.
    `value_serializer` picks the changelog codec (Faust's json by default)."""

    def __init__(self, *args: Any, value_serializer: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if value_serializer is not None:
            self.value_serializer = value_serializer

    def partition_for_key(self, key: Any) -> int | None:
        partition = _PARTITION.get()
        return partition if partition is not None else super().partition_for_key(key)


class ModelGlobalTable(_Changelog, faust.GlobalTable):
    """A global table (every process reads all of it), one partition as Faust advises for
    global tables shared by several processes."""

    def partition_for_key(self, key: Any) -> int | None:
        return 0


def _declare(cls: type[faust.Table], name: str, help: str, **kwargs: Any) -> Any:
    return app.tables.add(
        cls(app, name=name, beacon=app.tables.beacon, help=help, **kwargs)  # type: ignore[arg-type]
    )


def _windowed(name: str, help: str) -> WindowWrapper:
    table = _declare(ModelTable, name, help, default=int)
    window = faust.HoppingWindow(WINDOW_S, WINDOW_STEP_S, expires=WINDOW_EXPIRES)
    return table.using_window(window).relative_to_now()  # type: ignore[no-any-return]


placement = _declare(ModelTable, "placement", "model -> workers and counters of placement")
placement_requests = _declare(
    ModelTable,
    "placement-requests",
    "request id -> pending or in-flight request",
    value_serializer=MAP_CODEC,
)
queue_depth = _declare(ModelTable, "queue-depth", "model -> pending and in flight per class")
warm_pool = _declare(ModelTable, "warm-pool", "model -> workers by state, slots")
arrivals = _windowed("arrivals", "model -> requests arrived, 60 s windows hopping by 10 s")
warm_placements = _windowed("warm-placements", "model -> requests placed warm, 60 s windows")
cold_placements = _windowed("cold-placements", "model -> requests placed cold, 60 s windows")
hourly = _declare(ModelTable, "hour-of-day", "model -> expected request rate per hour")
autoscaler = _declare(ModelTable, "autoscaler", "model -> scaling policy state, last decision")
model_load = _declare(
    ModelGlobalTable,
    "model-load",
    "model -> queue and slots, for admission",
    partitions=1,
    recovery_buffer_size=1,
)


# --- placement state ---------------------------------------------------------------------

PENDING, IN_FLIGHT = "pending", "in_flight"


def _head_row(state: PlacementState) -> dict[str, Any]:
    """The model's row: PlacementState without its requests. A worker's `assigned` ids are
    left out (the in-flight request rows name their worker) and so are the ids of its latest
    heartbeat (the next heartbeat, within a second, brings them back), so the row stays a few
    hundred bytes per worker however many requests are in flight."""
    bare = {"assigned": frozenset(), "reported": frozenset()}
    return {
        "model": state.model,
        "workers": {w: replace(v, **bare).to_dict() for w, v in state.workers.items()},
        "arrivals_total": state.arrivals_total,
        "warm_total": state.warm_total,
        "cold_total": state.cold_total,
        "completed_total": state.completed_total,
        "mean_service_ms": state.mean_service_ms,
        "last_tick_at": state.last_tick_at,
        "clock": state.clock,
    }


def _request_row(model: str, status: str, request: bytes, seen: bool) -> dict[str, Any]:
    """A request's row: its model, where it is, and the request as its msgpack bytes."""
    return {"model": model, "status": status, "seen": seen, "request": request}


def _registration(view: Any) -> tuple[Any, ...]:
    return (view.state, view.partition, view.node, view.total_slots, view.ready_since)


def _workers_moved(old: PlacementState, new: PlacementState) -> bool:
    """A worker came, went, or changed state, partition or slots (not just its load)."""
    if old.workers is new.workers:
        return False
    if old.workers.keys() != new.workers.keys():
        return True
    return any(
        view is not old.workers[w] and _registration(view) != _registration(old.workers[w])
        for w, view in new.workers.items()
    )


def _queue_change(
    before: tuple[AdmittedRequest, ...], after: tuple[AdmittedRequest, ...]
) -> tuple[Sequence[AdmittedRequest], Sequence[AdmittedRequest]]:
    """(added, removed) between two versions of a pending queue. A request that arrived is
    appended and drained ones leave the head: those are slice comparisons (identity first,
    in C); anything else compares ids."""
    if before is after:
        return (), ()
    nb, na = len(before), len(after)
    if na >= nb and after[:nb] == before:
        return after[nb:], ()
    if na <= nb and before[nb - na :] == after:
        return (), before[: nb - na]
    before_ids = {r.request_id for r in before}
    after_ids = {r.request_id for r in after}
    return (
        [r for r in after if r.request_id not in before_ids],
        [r for r in before if r.request_id not in after_ids],
    )


def _head_changed(old: PlacementState, new: PlacementState) -> bool:
    return (
        old.workers is not new.workers
        or old.arrivals_total != new.arrivals_total
        or old.completed_total != new.completed_total
        or old.last_tick_at != new.last_tick_at
        or old.mean_service_ms != new.mean_service_ms
    )


class PlacementStore:
    """Each model's PlacementState: in memory while this process owns the model, in the
    `placement` and `placement-requests` tables for recovery.

    A request's row is written whenever the request changes (queued, placed, re-placed) and
    deleted when it finishes; that a heartbeat listed it (`seen`) is not worth a write: after
    a restart the next heartbeats show it again. The model's row is written at once when a
    worker comes, goes or changes state; changes of load and counters alone (every
    placement) are written by `flush`, once per tick: after a crash the workers are right,
    their requests come back from the request rows, and the counters may miss the last
    tick's arrivals."""

    def __init__(self, head: Any = placement, requests: Any = placement_requests) -> None:
        self._head = head
        self._requests = requests
        self._states: dict[str, PlacementState] = {}
        self._dirty: set[str] = set()

    def get(self, model: str) -> PlacementState:
        state = self._states.get(model)
        if state is None:
            state = self._states[model] = self._load(model)
        return state

    def cached(self) -> Mapping[str, PlacementState]:
        return self._states

    def forget(self) -> None:
        """Drop the in-memory states (partitions moved: reload from the tables)."""
        self._states.clear()
        self._dirty.clear()

    def put(
        self,
        old: PlacementState,
        new: PlacementState,
        encoded: Mapping[str, bytes] = {},
        placed: Iterable[str] = (),
    ) -> None:
        """Remember `new` and write what differs from `old`. Call inside the model's partition
        (an event of the model, or `writing_for(model)`). `encoded`: request id -> the msgpack
        of that request as it is in `new`, where the caller has it already; `placed`: the ids
        the step placed (new in flight, or re-placed under the same id).

        The cost follows the change, not the queue: a step that only placed writes the
        placed ids' rows without comparing keys (the policy puts requests in flight only by
        placing them); otherwise in-flight rows are found by set operations on the keys (in
        C); a queue that only grew at its tail or shrank at its head (admission, draining) is
        compared by slices."""
        model = new.model
        self._states[model] = new
        if _workers_moved(old, new):
            self._head[model] = _head_row(new)
            self._dirty.discard(model)
        elif _head_changed(old, new):
            self._dirty.add(model)
        requests = self._requests
        before, after = old.in_flight, new.in_flight
        gone: set[str] = set()
        if before is not after:
            # The policy puts a request in flight only by placing it: every id new in flight
            # is in `placed`. So when the placed ids account for all the growth, nothing left
            # and the keys need no comparing (a step that only placed: the common one).
            written = [rid for rid in dict.fromkeys(placed) if rid in after]
            grown = sum(rid not in before for rid in written)
            if len(before) + grown != len(after):
                written += list(after.keys() - before.keys() - set(written))
                gone = set(before.keys() - after.keys())
            for rid in written:
                flight = after[rid]
                value = encoded.get(rid) or encode(flight.request)
                requests[rid] = _request_row(model, IN_FLIGHT, value, flight.seen)
        queued: set[str] = set()
        for cls in LATENCY_CLASSES:
            added, removed = _queue_change(old.queued(cls), new.queued(cls))
            for request in added:
                rid = request.request_id
                queued.add(rid)
                value = encoded.get(rid) or encode(request)
                requests[rid] = _request_row(model, PENDING, value, False)
            gone.update(r.request_id for r in removed)
        for rid in gone:
            if rid not in after and rid not in queued and rid in requests:
                del requests[rid]

    def flush(self, model: str) -> None:
        """Write the model's row if only load or counters changed since it was written."""
        if model in self._dirty and model in self._states:
            self._head[model] = _head_row(self._states[model])
            self._dirty.discard(model)

    def _load(self, model: str) -> PlacementState:
        row = self._head.get(model)
        state = (
            PlacementState(model)
            if row is None
            else PlacementState.from_dict({**row, "pending": {}, "in_flight": {}})
        )
        pending: dict[str, list[AdmittedRequest]] = {c: [] for c in LATENCY_CLASSES}
        in_flight: dict[str, InFlight] = {}
        for rid, item in list(self._requests.items()):
            if not isinstance(item, dict) or item.get("model") != model:
                continue
            request = decode(AdmittedRequest, item["request"])
            if item["status"] == IN_FLIGHT:
                in_flight[rid] = InFlight(request, bool(item.get("seen")))
            else:
                pending.setdefault(request.latency_class, []).append(request)
        for queue in pending.values():
            queue.sort(key=lambda r: (-r.attempt, r.admitted_at))
        assigned: dict[str, set[str]] = {}
        for rid, flight in in_flight.items():
            assigned.setdefault(flight.request.worker_id or "", set()).add(rid)
        workers = {
            w: replace(view, assigned=frozenset(assigned.get(w, ())))
            for w, view in state.workers.items()
        }
        return replace(
            state,
            workers=workers,
            pending={c: tuple(q) for c, q in pending.items() if q},
            in_flight=in_flight,
        )


# --- tables fed from each tick's observation ----------------------------------------------


def in_flight_by_class(state: PlacementState) -> dict[str, int]:
    counts = dict.fromkeys(LATENCY_CLASSES, 0)
    for flight in state.in_flight.values():
        counts[flight.request.latency_class] = counts.get(flight.request.latency_class, 0) + 1
    return counts


class ObservationRecorder:
    """Writes a model's observation into the metric tables once per tick. Counters become
    window increments by difference with the previous tick (the first tick of a process is
    the baseline). `hour_s`: the length of the profile's hours (shorter in a benchmark that
    compresses a day, like the autoscaler's `hour_s`)."""

    def __init__(self, hour_s: float = 3600.0) -> None:
        self._previous: dict[str, tuple[int, int, int]] = {}
        self._hour_ms = round(hour_s * 1000)

    def _new_profile(self) -> HourOfDayProfile:
        return HourOfDayProfile(hour_ms=self._hour_ms)

    def record(self, state: PlacementState, obs: Observation, now: int) -> None:
        """Call inside `writing_for(obs.model)`."""
        model = obs.model
        depth = {"pending": dict(obs.pending), "in_flight": in_flight_by_class(state)}
        if _without_at(queue_depth.get(model)) != depth:
            queue_depth[model] = {**depth, "at": now}
        pool = {
            "by_state": obs.workers_by_state(),
            "ready_slots": obs.ready_slots,
            "free_slots": obs.free_slots,
        }
        if _without_at(warm_pool.get(model)) != pool:
            warm_pool[model] = {**pool, "at": now}

        counters = (obs.arrivals_total, obs.warm_total, obs.cold_total)
        before = self._previous.get(model, counters)
        self._previous[model] = counters
        new_arrivals, new_warm, new_cold = (max(a - b, 0) for a, b in zip(counters, before))
        if new_arrivals:
            arrivals[model] += new_arrivals
        if new_warm:
            warm_placements[model] += new_warm
        if new_cold:
            cold_placements[model] += new_cold
        row = hourly.get(model)
        profile = self._new_profile() if row is None else HourOfDayProfile.from_dict(row)
        hourly[model] = profile.add(now, new_arrivals).to_dict()

        load = ModelLoad.from_observation(obs).to_dict()
        if load_row_due(model_load.get(model), load, now):
            model_load[model] = {**load, "at": now}


LOAD_REFRESH_MS = 1_000


def load_row_due(
    row: Mapping[str, Any] | None, load: Mapping[str, Any], now: int,
    refresh_ms: int = LOAD_REFRESH_MS,
) -> bool:
    """Whether the `model-load` row must be written: the load changed, or the row is
    `refresh_ms` old. Admission counts its own admissions on top of the row until a newer one
    arrives; a load that went back to the same value (requests placed and finished within a
    tick) must still reach it, or that count only grows.

    row {"pending": 0, "at": 5000}, same load: due at now >= 6000, not at 5500."""
    if row is None or _without_at(row) != dict(load):
        return True
    return now - int(row.get("at", 0)) >= refresh_ms


def _without_at(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: v for k, v in row.items() if k != "at"}


def window_sum(table: WindowWrapper, model: str, now_s: float) -> int:
    """The count of the full trailing window (the earliest of the hopping windows holding
    `now_s`): with 60 s windows every 10 s, at 125 s the window [70, 130)."""
    rng = table.table.window.earliest(now_s)
    return int(table.table.data.get((model, rng), 0) or 0)


def trailing_rate(model: str, now_s: float) -> float:
    """Arrivals per second over the trailing window (the covered part of it)."""
    rng = arrivals.table.window.earliest(now_s)
    covered = max(min(now_s - rng[0], WINDOW_S), WINDOW_STEP_S)
    return window_sum(arrivals, model, now_s) / covered


def hit_rate(model: str, now_s: float) -> float | None:
    """Warm placements / all placements over the trailing window; None without any."""
    warm = window_sum(warm_placements, model, now_s)
    cold = window_sum(cold_placements, model, now_s)
    return warm / (warm + cold) if warm + cold else None


def expected_rate(model: str, now: int) -> float | None:
    """The hour-of-day profile's expected rate for the current hour; None until learned."""
    row = hourly.get(model)
    if row is None:
        return None
    profile = HourOfDayProfile.from_dict(row)
    return profile.expected_rate(hour_of_day(now, profile.hour_ms))
