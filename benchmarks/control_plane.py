"""Control plane: latency admission + placement add to a request, one process's throughput,
and a serving worker's intake while another worker is added.

Two targets, measured side by side in one run (the machine is shared and noisy, so the ratio
is the steadier figure):

- ember: one `ember streams` process (memory store, its own group and model) with fake
  workers: `ready` workers of the model heartbeating every 250 ms with plenty of slots (no
  model runs; placement only needs their lifecycle events). Requests go to `ember.requests`.
- floor: a plain aiokafka forwarder doing the same two hops with no work at all (requests ->
  admitted -> a partition of a model topic, bytes copied, private topics): what two Kafka
  hops through one Python process cost here.
- faust_floor: the same two hops as two Faust agents (`--faust-forward`: Ember's producer
  settings, EMBER_STREAMS_LINGER_MS included, and event loop, `stream.events()`,
  `app.producer.send`, memory store, no tables, no work): what Faust itself costs per
  request before any of Ember's work, the ceiling for any design of two agent hops in one
  Faust process (`--no-faust-floor` leaves it out).
- ember_baseline (only with `--ember-baseline KEY=VALUE`, repeatable): `ember streams` like
  ember but for those environment variables, e.g. `EMBER_STREAMS_FETCH_MAX_WAIT_MS=1500`
  (the streams consumer as Faust builds it, streams/faust_app.py). Both read `ember.requests`,
  so they cannot run at once: after the rest, each sustained rate is offered to a fresh ember
  and then to a fresh ember_baseline, back to back (`compare_baseline`).

Latency (unloaded): requests one at a time. For each, from handing it to the producer to this
script's consumer having the placed record from the model topic: what going through the
control plane adds to a request, compared with producing straight to a worker's partition
(three Kafka hops). For ember, record CreateTimes split it into admission (request created ->
admitted created), placement (admitted created -> placed created) and delivery (placed
created -> read here). p50 / p95 / p99.

Throughput, backlog: `--requests` requests produced as fast as this script can; the target
falls behind and works through the backlog, so the rate at which placed records arrive is its
capacity with large batches: reported over all and over the middle 80 % of arrivals, with the
CPU seconds the target process used (/proc), as requests per CPU second.

Throughput, sustained (`--sustain-rates`, the figure issue #5 is judged on): requests sent on
a clock at each offered rate for `--sustain-s` seconds (open loop, as independent clients
send), each followed to its placed record. A rate is kept up when every request is placed
and the latency of the last quarter's requests stays bounded (p99 under 500 ms); over
capacity the backlog, and the latency, grow for the whole window. Arrivals spread over time
come in small fetches and leave in small produce requests: per request this costs more than
draining a backlog does. The longest pause is the longest time between two placed records
arriving here while requests were being sent: a target that stalls shows it there.

Intake gap (ember only, `measure_intake`): two lightweight worker processes
(`--serve-worker`: gpu_worker's assigned-partition consumer and lifecycle events, no model)
on a second model of the same streams process; one serves a steady flow, then the other is
started and gets placements. The serving worker's per-record intake times give the gaps
between consecutive intakes, without and around the add, side by side, split into what
placement's spacing of its sends explains and what it does not (records left untaken).

CPUs (`--pin`): each measured process runs on a CPU of its own, this script (the load
generator, the readers, the intake-gap workers) and the local broker's threads on the others.
Without it every process shares every CPU, and on a small machine a target's figures say as
much about the broker and the load generator beside it as about the target.

    .venv/bin/python benchmarks/control_plane.py --pin                # ~12 min
    .venv/bin/python benchmarks/control_plane.py --requests 2000 --latency-requests 100 --runs 1

Writes benchmarks/results/control_plane.md (and prints it). The machine's load average is
recorded with the results: other work on it slows everything measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.broker import BrokerSettings  # noqa: E402
from infra.settings import KafkaSettings  # noqa: E402
from infra.topics import apply_topics  # noqa: E402
from schemas import LifecycleEvent, Request, encode, record_for  # noqa: E402
from schemas.topics import (  # noqa: E402
    ADMITTED,
    CONTROL_PARTITIONS,
    LIFECYCLE,
    REQUESTS,
    TopicSpec,
    model_topic_name,
)

RESULTS = ROOT / "benchmarks" / "results"
HEARTBEAT_S = 0.25
SLOTS = 4096
WORKERS = 4
# The intake-gap model: real (lightweight) worker processes, each assigned its partition.
INTAKE_SLOTS = 256
INTAKE_PACK_BELOW = 0.0  # least loaded (with slow start): the added worker gets placements
INTAKE_HEARTBEAT_S = 0.25
INTAKE_IDLE_POLL_MS = 100  # as gpu_worker's WorkerConfig.idle_poll_ms
INTAKE_STEP_MS = 10  # getmany timeout while requests run: stands in for an engine step


def progress(msg: str) -> None:
    print(f"[control-plane {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> float:
    return os.getloadavg()[0]


# --- CPU pinning (--pin) ----------------------------------------------------------------------

# The CPU the measured process runs on, when pinned; None: every process shares every CPU.
TARGET_CPU: int | None = None


def pin(broker_pid: int | None) -> tuple[int, set[int]]:
    """Give the measured processes one CPU of their own: the last CPU this script may use
    goes to each target started from now on; this script (its load generator and readers,
    the intake-gap workers it starts) and the broker's threads get the others. Returns
    (the target's CPU, the rest). Linux only (sched_setaffinity)."""
    global TARGET_CPU
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs at least 2 CPUs; this process may use {sorted(cpus)}")
    TARGET_CPU = max(cpus)
    rest = cpus - {TARGET_CPU}
    os.sched_setaffinity(0, rest)
    if broker_pid is not None:
        set_affinity(broker_pid, rest)
    return TARGET_CPU, rest


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity moves one thread)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def on_target_cpu() -> None:
    """preexec_fn of a target process: runs it, and the threads it starts, on TARGET_CPU."""
    if TARGET_CPU is not None:
        os.sched_setaffinity(0, {TARGET_CPU})


# --- targets ----------------------------------------------------------------------------------


@dataclass
class Target:
    """A process that takes requests on `requests` and puts them on `placed` (keyed by
    request id); `admitted` is the topic between the two hops, when its values are admitted
    requests (ember)."""

    name: str
    proc: subprocess.Popen[bytes]
    requests: str
    placed: str
    admitted: str | None
    log: Path
    intake_model: str | None = None  # ember: a model with no fake workers (intake gap)


@contextlib.asynccontextmanager
async def ember_target(
    kafka: KafkaSettings, workdir: Path, profile: Path | None, name: str = "ember",
    env_extra: dict[str, str] | None = None,
) -> AsyncIterator[Target]:
    run = uuid.uuid4().hex[:8]
    group, model, intake = f"ember-bench-{run}", f"bench-{run}", f"intake-{run}"
    config = workdir / f"{name}.json"
    unbounded = {"interactive": 10**6, "batch": 10**6, "eval": 10**6}
    admission = {"queue_bounds": unbounded, "pressure_bound": 10**6, "context_tokens": 8192}
    config.write_text(json.dumps({
        "models": {
            model: {
                "slots": SLOTS,
                "placement": {"dead_after_s": 60.0, "unseen_done_after_s": 0.3},
                "admission": admission,
                "scaling": {"ceiling": 64},
            },
            intake: {
                "slots": INTAKE_SLOTS,
                "placement": {"dead_after_s": 60.0, "unseen_done_after_s": 0.3,
                              "pack_below": INTAKE_PACK_BELOW},
                "admission": admission,
                "scaling": {"ceiling": 64},
            },
        },
        "autoscaler": {"policy": "always_on", "workers": WORKERS},
    }))
    port = free_port()
    env = {
        **os.environ,
        "EMBER_MODELS": f"{model},{intake}",
        "EMBER_STREAMS_CONFIG": str(config),
        "EMBER_STREAMS_GROUP": group,
        "EMBER_STREAMS_STORE": "memory://",
        "EMBER_STREAMS_WEB_PORT": str(port),
        "EMBER_STREAMS_TICK_S": "0.5",
        **(env_extra or {}),
    }
    log = workdir / f"{name}.log"
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *profiler, "-m", "infra.cli", "--log-level", "WARNING", "streams"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=on_target_cpu,
        )
    target = Target(name, proc, REQUESTS, model_topic_name(model), ADMITTED, log, intake)
    producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), linger_ms=0)
    await producer.start()
    beats: asyncio.Task[None] | None = None
    try:
        await wait_http(target, f"http://127.0.0.1:{port}/ember/health/")
        beats = asyncio.create_task(fake_workers(producer, model, WORKERS))
        yield target
    finally:
        if beats is not None:
            beats.cancel()
            await asyncio.gather(beats, return_exceptions=True)
        await producer.stop()
        await stop(proc)
        await delete_topics(kafka, lambda t: t.startswith(group) or t in (
            target.placed, model_topic_name(intake)))


@contextlib.asynccontextmanager
async def forwarder_target(kafka: KafkaSettings, workdir: Path, name: str,
                           flag: str) -> AsyncIterator[Target]:
    """A `floor` target: this script run with `flag` (`--forward`, `--faust-forward`) on
    private topics, ready once it prints `forwarding`."""
    prefix = f"bench-{name.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    requests, admitted, placed = (f"{prefix}-{x}" for x in ("req", "adm", "model"))
    await apply_topics(kafka, [TopicSpec(requests, CONTROL_PARTITIONS),
                               TopicSpec(admitted, CONTROL_PARTITIONS), TopicSpec(placed, 8)])
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, flag, requests, admitted, placed],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "EMBER_HOME": str(workdir / f"{name}-home")},
            preexec_fn=on_target_cpu,
        )
    target = Target(name, proc, requests, placed, None, log)
    try:
        deadline = time.monotonic() + 120
        while b"forwarding" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start; see {log}")
            await asyncio.sleep(0.2)
        yield target
    finally:
        await stop(proc)
        await delete_topics(kafka, lambda t: t.startswith(prefix))


async def wait_http(target: Target, url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target.proc.poll() is not None:
            raise SystemExit(f"{target.name} exited; see {target.log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit(f"{target.name} not ready after {timeout} s; see {target.log}")


async def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def delete_topics(kafka: KafkaSettings, ours: object) -> None:
    admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs())
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if ours(t)]  # type: ignore[operator]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def fake_workers(producer: AIOKafkaProducer, model: str, count: int) -> None:
    """`count` ready workers on partitions 0.., heartbeating with free slots and nothing
    listed in flight (placement counts a request done `unseen_done_after_s` after placing)."""
    ids = [f"bench-w{i}" for i in range(count)]
    for i, w in enumerate(ids):
        event = LifecycleEvent(worker_id=w, model=model, kind="state", state="ready",
                               previous_state="warming", at=now_ms(), partition=i)
        rec = record_for(event, LIFECYCLE)
        await producer.send(rec.topic, rec.value, key=rec.key, headers=rec.headers)
    while True:
        for i, w in enumerate(ids):
            event = LifecycleEvent(worker_id=w, model=model, kind="heartbeat", state="ready",
                                   at=now_ms(), partition=i, free_slots=SLOTS,
                                   total_slots=SLOTS, queued_tokens=0)
            rec = record_for(event, LIFECYCLE)
            await producer.send(rec.topic, rec.value, key=rec.key, headers=rec.headers)
        await asyncio.sleep(HEARTBEAT_S)


async def forward(kafka: KafkaSettings, requests: str, admitted: str, placed: str) -> None:
    """The floor: two hops, bytes copied, nothing decided (run as `--forward`)."""
    producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), linger_ms=0,
                                max_batch_size=512 * 1024)
    await producer.start()

    async def hop(source: str, sink: str, partition: int | None) -> None:
        consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), enable_auto_commit=False)
        await consumer.start()
        tps = [TopicPartition(source, p) for p in await producer.partitions_for(source)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)
        while True:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for r in records:
                    await producer.send(sink, r.value, key=r.key, partition=partition)

    hops = [asyncio.create_task(hop(requests, admitted, None)),
            asyncio.create_task(hop(admitted, placed, 0))]
    print("forwarding", flush=True)
    await asyncio.gather(*hops)


def faust_forward(kafka: KafkaSettings, requests: str, admitted: str, placed: str,
                  datadir: Path) -> None:
    """The Faust floor (run as `--faust-forward`): the two hops as two Faust agents, with the
    app class (streams.faust_app), producer settings and event loop of streams.app, bytes
    copied, nothing decided."""
    import faust

    from streams.commands import _use_event_loop
    from streams.faust_app import DEFAULT_FETCH_MAX_WAIT_MS, EmberApp

    app = EmberApp(
        f"bench-faust-floor-{uuid.uuid4().hex[:8]}",
        broker=[f"kafka://{s.strip()}" for s in kafka.bootstrap_servers.split(",") if s],
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        topic_partitions=CONTROL_PARTITIONS,
        topic_allow_declare=False,
        topic_disable_leader=True,
        key_serializer="raw",
        value_serializer="raw",
        producer_acks=-1,
        producer_max_batch_size=512 * 1024,
        producer_linger=float(os.environ.get("EMBER_STREAMS_LINGER_MS", "0")) / 1000,
        fetch_max_wait_ms=int(os.environ.get("EMBER_STREAMS_FETCH_MAX_WAIT_MS",
                                             DEFAULT_FETCH_MAX_WAIT_MS)),
        web_enabled=False,
    )

    def raw(name: str) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=CONTROL_PARTITIONS, internal=False)

    @app.agent(raw(requests), name="hop-1")
    async def hop_1(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await app.producer.send(admitted, event.key, event.value, None, None, [])

    @app.agent(raw(admitted), name="hop-2")
    async def hop_2(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await app.producer.send(placed, event.key, event.value, 0, None, [])

    @app.on_rebalance_complete.connect
    async def _assigned(app: faust.App, **kwargs: object) -> None:
        print("forwarding", flush=True)

    datadir.mkdir(parents=True, exist_ok=True)
    _use_event_loop(os.environ.get("EMBER_STREAMS_LOOP", "auto"))
    worker = faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False,
                          override_logging=False)
    worker.execute_from_commandline()


# --- the intake-gap measurement ---------------------------------------------------------------


async def serve_worker(kafka: KafkaSettings, model: str, worker_id: str, partition: int,
                       service_ms: float, out_path: Path) -> None:
    """A lightweight serving worker (run as `--serve-worker`): gpu_worker's intake without a
    model. Its partition of the model topic is *assigned* (no group membership; the same
    consumer settings as gpu_worker.worker); it announces itself on `ember.lifecycle` like a
    real worker (state events, then heartbeats listing what it runs and what it finished) and
    "serves" each request for `service_ms`. Writes every record's intake time (time.time()
    when getmany returned it), the record's CreateTime and offset to `out_path` (JSON) when
    SIGTERM stops it."""
    started = time.time()
    topic = model_topic_name(model)
    tp = TopicPartition(topic, partition)
    producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), linger_ms=0)
    await producer.start()
    state = "starting"
    running: dict[str, float] = {}  # request id -> monotonic time it finishes
    done: list[str] = []  # finished since the last heartbeat (gpu_worker's `done` list)
    intake: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def announce(kind: str, new_state: str, **extra: Any) -> None:
        nonlocal state
        previous, state = state, new_state
        fields = {"previous_state": previous} if kind == "state" else {}
        event = LifecycleEvent(worker_id=worker_id, model=model, kind=kind, state=new_state,
                               at=now_ms(), partition=partition, node=platform.node(),
                               **fields, **extra)
        rec = record_for(event, LIFECYCLE)
        await producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)

    async def heartbeats() -> None:
        nonlocal done
        while True:
            ids = tuple(running)[:256]
            finished, done = tuple(done[:256]), done[256:]
            await announce("heartbeat", "ready", free_slots=max(INTAKE_SLOTS - len(ids), 0),
                           total_slots=INTAKE_SLOTS, queued_tokens=0, in_flight=ids,
                           done=finished)
            await asyncio.sleep(INTAKE_HEARTBEAT_S)

    await announce("state", "warming")
    consumer = AIOKafkaConsumer(
        **kafka.aiokafka_kwargs(), client_id=f"ember-worker-{worker_id}",
        group_id=f"ember.worker.{topic}", enable_auto_commit=False,
        auto_offset_reset="latest", isolation_level="read_committed",
    )
    await consumer.start()
    consumer.assign([tp])
    await consumer.seek_to_end(tp)
    await consumer.position(tp)
    ready_at = time.time()
    await announce("state", "ready")
    beats = asyncio.create_task(heartbeats())
    while not stop.is_set():
        timeout = INTAKE_STEP_MS if running else INTAKE_IDLE_POLL_MS
        room = INTAKE_SLOTS - len(running)
        batches = await consumer.getmany(tp, timeout_ms=timeout, max_records=max(room, 1))
        got = time.time()
        mono = time.monotonic()
        for r in batches.get(tp, []):
            intake.append((got, r.timestamp, r.offset))
            running[(r.key or b"").decode()] = mono + service_ms / 1000
        for rid in [rid for rid, end in running.items() if end <= mono]:
            del running[rid]
            done.append(rid)
    beats.cancel()
    await asyncio.gather(beats, return_exceptions=True)
    await consumer.stop()
    await producer.stop()
    out_path.write_text(json.dumps({"worker_id": worker_id, "started": started,
                                    "ready": ready_at, "intake": intake}))


@dataclass
class IntakeWindow:
    """Consecutive intakes of the serving worker within one window, in ms: the gap between
    two intakes, the gap between the two records' CreateTimes (placement's sends, so what of
    an intake gap placement caused by sending elsewhere) and the excess of the first over the
    second (time the records were on the partition and not taken in: a paused intake)."""

    name: str
    seconds: float
    records: int
    gaps: list[float]
    sent_gaps: list[float]
    excess: list[float]
    delay: list[float]  # intake - CreateTime per record


def intake_window(name: str, intake: list[list[float]], lo: float, hi: float) -> IntakeWindow:
    rows = [r for r in intake if lo <= r[0] < hi]
    gaps, sent, excess = [], [], []
    for (t0, c0, _), (t1, c1, _) in zip(rows, rows[1:]):
        gaps.append((t1 - t0) * 1000)
        sent.append(float(c1 - c0))
        excess.append((t1 - t0) * 1000 - (c1 - c0))
    delay = [t * 1000 - c for t, c, _ in rows]
    return IntakeWindow(name, hi - lo, len(rows), gaps, sent, excess, delay)


@dataclass
class Intake:
    rate: float
    service_ms: float
    windows: list[IntakeWindow]
    added_ready_s: float  # the added worker: process start -> ready
    added_first_s: float | None  # process start -> its first placed request taken in
    added_records: int
    load: float


async def start_worker(model: str, worker_id: str, partition: int, service_ms: float,
                       workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    out_path = workdir / f"{worker_id}.json"
    log = (workdir / f"{worker_id}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-worker", model, worker_id, str(partition),
         str(service_ms), str(out_path)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    return proc, out_path


async def stop_worker(proc: subprocess.Popen[bytes], out_path: Path) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, 30)
    except subprocess.TimeoutExpired:
        proc.kill()
    if not out_path.exists():
        raise SystemExit(f"the serving worker wrote no intake; see {out_path.with_suffix('.log')}")
    data: dict[str, Any] = json.loads(out_path.read_text())
    return data


async def measure_intake(producer: AIOKafkaProducer, target: Target, workdir: Path,
                         rate: float, window_s: float, service_ms: float) -> Intake:
    """A serving worker (partition 0) takes a steady flow of `rate` requests/s through
    admission and placement; `baseline_s` later a second worker process is started on
    partition 1 (it announces itself ready and gets placements: placement by turns with slow
    start eases it in beside the serving worker); the flow goes on for `after_s`. Windows of
    the serving worker's intake: the baseline (the same length as the add window, before the
    add), and around the add (from the second process's start until the flow stops)."""
    baseline_s = after_s = window_s
    assert target.intake_model is not None
    model = target.intake_model
    serving, serving_out = await start_worker(model, "intake-serving", 0, service_ms, workdir)
    flow_stop = asyncio.Event()
    run_id = f"i{uuid.uuid4().hex[:6]}-"

    async def flow() -> None:
        period, n = 1.0 / rate, 0
        t0 = time.monotonic()
        while not flow_stop.is_set():
            rid = f"{run_id}{n:09d}"
            await producer.send(target.requests, request_bytes(model, rid), key=rid.encode())
            n += 1
            delay = t0 + n * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    await asyncio.sleep(3.0)  # the serving worker starts, announces itself, is placed on
    flowing = asyncio.create_task(flow())
    try:
        await asyncio.sleep(2.0 + baseline_s)  # 2 s of warm-up, then the baseline
        added_at = time.time()
        added, added_out = await start_worker(model, "intake-added", 1, service_ms, workdir)
        await asyncio.sleep(after_s)
    finally:
        flow_stop.set()
        await flowing
    await asyncio.sleep(1.0)
    serving_data = await stop_worker(serving, serving_out)
    added_data = await stop_worker(added, added_out)
    end = added_at + after_s
    rows = serving_data["intake"]
    windows = [
        intake_window("baseline (no add)", rows, added_at - after_s, added_at),
        intake_window("around the add", rows, added_at, end),
    ]
    first = added_data["intake"][0][0] - added_at if added_data["intake"] else None
    return Intake(rate, service_ms, windows, added_data["ready"] - added_at, first,
                  len(added_data["intake"]), load_average())


# --- watching what comes out ------------------------------------------------------------------


@dataclass
class Arrival:
    received: float  # time.time() when this script had it
    created_ms: int  # the record's CreateTime


@dataclass
class Watch:
    """Records of the target's placed topic (and admitted topic), by request id."""

    admitted: dict[str, int] = field(default_factory=dict)  # request id -> CreateTime
    placed: dict[str, Arrival] = field(default_factory=dict)
    consumer: AIOKafkaConsumer | None = None
    task: asyncio.Task[None] | None = None


@contextlib.asynccontextmanager
async def watching(
    kafka: KafkaSettings, producer: AIOKafkaProducer, target: Target, run_id: str
) -> AsyncIterator[Watch]:
    w = Watch()
    consumer = AIOKafkaConsumer(**kafka.aiokafka_kwargs(), enable_auto_commit=False,
                                fetch_max_wait_ms=50, max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    topics = [target.placed] + ([target.admitted] if target.admitted else [])
    tps = [TopicPartition(t, p) for t in topics for p in await producer.partitions_for(t)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    w.consumer = consumer
    w.task = asyncio.create_task(read(w, target, run_id))
    try:
        yield w
    finally:
        w.task.cancel()
        await asyncio.gather(w.task, return_exceptions=True)
        await consumer.stop()


async def read(w: Watch, target: Target, run_id: str) -> None:
    """Fill `w` forever. Request ids of this run start with `run_id`."""
    assert w.consumer is not None
    marker = run_id.encode()
    while True:
        batches = await w.consumer.getmany(timeout_ms=100, max_records=10_000)
        received = time.time()
        for tp, records in batches.items():
            for r in records:
                if tp.topic == target.placed:
                    rid = (r.key or b"").decode()
                    if rid.startswith(run_id):
                        w.placed.setdefault(rid, Arrival(received, r.timestamp))
                elif marker in r.value:
                    rid = msgpack.unpackb(r.value)["request"]["request_id"]
                    w.admitted.setdefault(rid, r.timestamp)


def request_bytes(model: str, rid: str) -> bytes:
    return encode(Request(request_id=rid, model=model, submitted_at=now_ms(),
                          prompt="Tell me about Kafka. " * 4, max_tokens=64))


# --- the two measurements ---------------------------------------------------------------------


@dataclass
class Latency:
    total_ms: list[float] = field(default_factory=list)
    admission_ms: list[float] = field(default_factory=list)
    placement_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)


async def measure_latency(producer: AIOKafkaProducer, w: Watch, target: Target, model: str,
                          run_id: str, count: int, gap_s: float) -> Latency:
    out = Latency()
    for i in range(count):
        rid = f"{run_id}{i:09d}"
        value = request_bytes(model, rid)
        sent = time.time()
        created = now_ms()
        await producer.send(target.requests, value, key=rid.encode(), timestamp_ms=created)
        deadline = time.monotonic() + 10
        while rid not in w.placed and time.monotonic() < deadline:
            await asyncio.sleep(0.0005)
        arrival = w.placed.get(rid)
        if arrival is None:
            progress(f"{target.name}: request {rid} not placed within 10 s")
            continue
        out.total_ms.append((arrival.received - sent) * 1000)
        admitted_at = w.admitted.get(rid)
        if admitted_at is not None:
            out.admission_ms.append(admitted_at - created)
            out.placement_ms.append(arrival.created_ms - admitted_at)
            out.delivery_ms.append(arrival.received * 1000 - arrival.created_ms)
        await asyncio.sleep(gap_s)
    return out


def numbered_requests(model: str, run_id: str, count: int) -> tuple[list[str], list[bytes]]:
    """`count` request ids starting with `run_id`, and their encoded requests."""
    ids = [f"{run_id}{i:09d}" for i in range(count)]
    return ids, [request_bytes(model, rid) for rid in ids]


async def until_placed(w: Watch, ids: Sequence[str], timeout_s: float) -> None:
    """Wait until every id is placed, or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(rid in w.placed for rid in ids):
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def spying(py_spy: Path | None, target: Target, run_id: str) -> AsyncIterator[None]:
    """py-spy record (raw, idle included) the target's process into PATH.<target>.<run>.txt
    meanwhile (not the plain aiokafka floor)."""
    if py_spy is None or target.name == "floor":
        yield
        return
    spy = subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid",
         str(target.proc.pid), "--idle", "--rate", "250", "--format", "raw", "-o",
         str(py_spy.with_suffix(f".{target.name}.{run_id.strip('-')}.txt"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    await asyncio.sleep(1.0)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        await asyncio.to_thread(spy.wait, 30)


@dataclass
class Throughput:
    target: str
    requests: int
    placed: int
    window_rate: float  # placed per second over the middle 80 % of arrivals
    overall_rate: float  # placed / (last arrival - first send)
    cpu_s: float  # target process CPU seconds from first send to last arrival
    load: float  # 1-minute load average at the end

    @property
    def per_cpu_s(self) -> float:
        return self.placed / self.cpu_s if self.cpu_s > 0 else float("nan")


async def measure_throughput(producer: AIOKafkaProducer, w: Watch, target: Target, model: str,
                             run_id: str, count: int, py_spy: Path | None = None) -> Throughput:
    ids, values = numbered_requests(model, run_id, count)
    async with spying(py_spy, target, run_id):
        cpu0 = cpu_seconds(target.proc.pid)
        start = time.time()
        for rid, value in zip(ids, values):
            await producer.send(target.requests, value, key=rid.encode())
        await producer.flush()
        await until_placed(w, ids, max(90.0, count / 100))
        cpu = cpu_seconds(target.proc.pid) - cpu0
    times = sorted(w.placed[rid].received for rid in ids if rid in w.placed)
    lo, hi = len(times) // 10, (len(times) * 9) // 10
    rate = (hi - lo) / (times[hi] - times[lo]) if hi > lo and times[hi] > times[lo] else 0.0
    overall = len(times) / (times[-1] - start) if times else 0.0
    if times:
        marks = [times[min(int(len(times) * q), len(times) - 1)] - start
                 for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
        progress(f"{target.name}: placed 0/10/50/90/100 % at "
                 + " / ".join(f"{m:.2f}" for m in marks) + " s after the first send")
    return Throughput(target.name, count, len(times), rate, overall, cpu, load_average())


@dataclass
class Sustained:
    target: str
    offered: float  # requests/s this script sent at
    seconds: float
    sent: int
    placed: int  # within the window plus SUSTAIN_GRACE_S
    placed_rate: float  # placed per second from the first send to the last placed arrival
    latency_ms: list[float]  # send -> placed record read here, every placed request
    tail_ms: list[float]  # the same, requests sent in the last quarter of the window
    cpu_s: float  # target process CPU seconds over the window
    load: float
    longest_pause_ms: float  # longest time between two placed arrivals while sending

    @property
    def kept_up(self) -> bool:
        """Every request placed, and latency not growing: the last quarter's p99 under
        SUSTAIN_TAIL_P99_MS (over capacity the backlog, and with it the latency, grows for as
        long as the window lasts)."""
        return (self.placed == self.sent and bool(self.tail_ms)
                and percentile(self.tail_ms, 0.99) < SUSTAIN_TAIL_P99_MS)

    @property
    def per_cpu_s(self) -> float:
        return self.placed / self.cpu_s if self.cpu_s > 0 else float("nan")


SUSTAIN_TICK_S = 0.005  # the load generator sends what is due every 5 ms
SUSTAIN_GRACE_S = 5.0  # after the window, for the last requests to come through
SUSTAIN_TAIL_P99_MS = 500.0


async def measure_sustained(producer: AIOKafkaProducer, w: Watch, target: Target, model: str,
                            run_id: str, rate: float, seconds: float,
                            py_spy: Path | None = None) -> Sustained:
    """Offer `rate` requests/s for `seconds` (open loop: sends are due on a clock, whatever
    the target does) and follow each request to its placed record."""
    count = round(rate * seconds)
    ids, values = numbered_requests(model, run_id, count)
    sent_at: list[float] = []
    async with spying(py_spy, target, run_id):
        cpu0 = cpu_seconds(target.proc.pid)
        start = time.time()
        while len(sent_at) < count:
            due = min(count, int((time.time() - start) * rate) + 1)
            for i in range(len(sent_at), due):
                sent_at.append(time.time())
                await producer.send(target.requests, values[i], key=ids[i].encode())
            await asyncio.sleep(SUSTAIN_TICK_S)
        window_end = time.time()
        cpu = cpu_seconds(target.proc.pid) - cpu0
    await until_placed(w, ids, SUSTAIN_GRACE_S)
    latency, tail = [], []
    last = start
    for rid, sent in zip(ids, sent_at):
        arrival = w.placed.get(rid)
        if arrival is None:
            continue
        last = max(last, arrival.received)
        latency.append((arrival.received - sent) * 1000)
        if sent >= start + 0.75 * (window_end - start):
            tail.append(latency[-1])
    placed_rate = len(latency) / (last - start) if last > start else 0.0
    return Sustained(target.name, rate, window_end - start, count, len(latency), placed_rate,
                     latency, tail, cpu, load_average(),
                     longest_pause(w, ids, start, window_end))


def longest_pause(w: Watch, ids: Sequence[str], start: float, end: float) -> float:
    """The longest time, in ms, between two placed records of `ids` arriving (the window's
    start and end count as arrivals) while requests were being sent."""
    times = sorted(t for t in (w.placed[rid].received for rid in ids if rid in w.placed)
                   if start <= t <= end)
    marks = [start, *times, end]
    return max(b - a for a, b in zip(marks, marks[1:])) * 1000


def sustained_line(s: Sustained) -> str:
    tail = percentile(s.tail_ms, 0.99) if s.tail_ms else float("nan")
    return (f"{s.target} at {s.offered:g}/s offered: placed {s.placed}/{s.sent}, p50 "
            f"{percentile(s.latency_ms, 0.5) if s.latency_ms else float('nan'):.1f} ms, tail "
            f"p99 {tail:.1f} ms, longest pause {s.longest_pause_ms:.0f} ms: "
            f"{'kept up' if s.kept_up else 'fell behind'}")


async def compare_baseline(args: argparse.Namespace, kafka: KafkaSettings, workdir: Path,
                           producer: AIOKafkaProducer) -> list[Sustained]:
    """Each sustained rate offered to a fresh ember (`ember_ab`) and then to a fresh ember
    with `--ember-baseline`'s environment (`ember_baseline`), back to back: both read
    `ember.requests`, so only one runs at a time."""
    env = dict(kv.split("=", 1) for kv in args.ember_baseline)
    out = []
    for rate in args.sustain_rates:
        for name, extra in (("ember_ab", {}), ("ember_baseline", env)):
            async with contextlib.AsyncExitStack() as stack:
                t = await stack.enter_async_context(
                    ember_target(kafka, workdir, None, name, extra))
                model = t.placed.removeprefix("ember.model.")
                run_id = f"b{uuid.uuid4().hex[:6]}-"
                w = await stack.enter_async_context(watching(kafka, producer, t, run_id))
                await measure_latency(producer, w, t, model, run_id + "w", 50, 0.01)
                await asyncio.sleep(2.0)
                s = await measure_sustained(producer, w, t, model, f"{run_id}s{rate:g}-", rate,
                                            args.sustain_s)
            progress(sustained_line(s))
            out.append(s)
    return out


# --- report -----------------------------------------------------------------------------------


def cpu_note(args: argparse.Namespace) -> str:
    if not args.pin:
        return "shared"
    return (f"each measured process pinned to CPU {TARGET_CPU}, the broker, the load generator "
            "and everything else on the others")


def report(args: argparse.Namespace, lat: dict[str, Latency], thr: list[Throughput],
           sus: list[Sustained], loads: list[float], intake: Intake | None) -> str:
    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"| {name} | - | - | - | 0 |"
        return (f"| {name} | {percentile(values, 0.5):.1f} | {percentile(values, 0.95):.1f} | "
                f"{percentile(values, 0.99):.1f} | {len(values)} |")

    def median(target: str, attr: str) -> float:
        values = [getattr(t, attr) for t in thr if t.target == target]
        return statistics.median(values) if values else float("nan")

    ember, floor = lat["ember"], lat.get("floor", Latency())
    p50 = percentile(ember.total_ms, 0.5) if ember.total_ms else float("inf")
    rate = median("ember", "overall_rate")
    lines = [
        "# Control plane: admission + placement latency and throughput",
        "",
        f"Run {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.node()} "
        f"({os.cpu_count()} cores, {cpu_note(args)}; 1-minute load average during the run "
        f"{min(loads):.1f}-{max(loads):.1f}; Python {platform.python_version()}); local Kafka "
        f"broker on loopback; one `ember streams` process (memory store) with {WORKERS} fake "
        "ready workers; `floor` is a plain aiokafka forwarder doing the same two hops with no "
        "work, `faust_floor` the same two hops as two Faust agents with no work (see the "
        "script's docstring).",
        "",
        f"    {shlex.join([Path(sys.executable).name, *sys.argv])}",
        "",
        f"## Latency added to a request (unloaded, {args.latency_requests} requests one at a "
        "time)",
        "",
        "From handing the request to the producer until the placed record is read from the "
        "worker's partition (three Kafka hops); ember's stages from record CreateTimes.",
        "",
        "| ms | p50 | p95 | p99 | n |",
        "|---|---|---|---|---|",
        row("**ember: requests -> placed on the model topic**", ember.total_ms),
        row("ember admission (request created -> admitted created)", ember.admission_ms),
        row("ember placement (admitted created -> placed created)", ember.placement_ms),
        row("ember delivery (placed created -> read by the client)", ember.delivery_ms),
        row("floor: the same three hops, no work", floor.total_ms),
        row("faust_floor: the same hops through two Faust agents, no work",
            lat.get("faust_floor", Latency()).total_ms),
        "",
        f"Target p50 < 20 ms: **{'met' if p50 < 20 else 'not met'}** ({p50:.1f} ms).",
        "",
        f"## Throughput of one process ({args.runs} runs of {args.requests} requests per target,"
        " alternating)",
        "",
        "Requests produced as fast as possible; the target works through the backlog. placed/s:"
        " all placed / (last placed arrival - first send); middle 80 %: over the middle 80 % of"
        " arrivals (ramp-up and tail left out).",
        "",
        "| run | target | placed | placed/s | middle 80 % | process CPU s | placed per CPU s |"
        " load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(thr, 1):
        lines.append(
            f"| {i} | {t.target} | {t.placed}/{t.requests} | {t.overall_rate:.0f} | "
            f"{t.window_rate:.0f} | {t.cpu_s:.1f} | {t.per_cpu_s:.0f} | {t.load:.1f} |"
        )
    floor_rate = median("floor", "overall_rate")
    lines += [
        "",
        f"ember, median: **{rate:.0f} requests/s** through admission and placement, "
        f"{median('ember', 'window_rate'):.0f}/s over the middle 80 % "
        f"({median('ember', 'per_cpu_s'):.0f} per CPU second of the streams process): what "
        "it drains a backlog at (the target is judged on sustained load, below). floor, median: "
        f"{floor_rate:.0f}/s ({median('floor', 'per_cpu_s'):.0f} per CPU "
        f"second). faust_floor, median: {median('faust_floor', 'overall_rate'):.0f}/s "
        f"({median('faust_floor', 'per_cpu_s'):.0f} per CPU second): two Faust agent hops "
        "with no work and no tables.",
        "",
    ]
    if sus:
        lines += sustained_report(args, sus)
    if intake is not None:
        lines += intake_report(intake)
    return "\n".join(lines)


def sustained_report(args: argparse.Namespace, sus: list[Sustained]) -> list[str]:
    def cell(values: list[float], q: float) -> str:
        return f"{percentile(values, q):.1f}" if values else "-"

    lines = [
        f"## Sustained load (open loop, {args.sustain_s:g} s per offered rate)",
        "",
        "Requests sent on a clock at the offered rate (what is due every "
        f"{SUSTAIN_TICK_S * 1000:g} ms), whatever the target does; each followed from its send "
        "to its placed record read here. *Kept up*: every request placed and the p99 latency of "
        f"those sent in the last quarter of the window under {SUSTAIN_TAIL_P99_MS:g} ms (over "
        "capacity the backlog and the latency grow for as long as the window lasts). "
        + ("The target on a CPU of its own; the load generator and the broker on the others."
           if args.pin else "The load generator, the broker and the target share this "
           "machine's cores."),
        "",
        "| target | offered/s | placed | placed/s | latency p50 ms | p95 | p99 | last quarter "
        "p99 | longest pause ms | process CPU s | placed per CPU s | kept up | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sus:
        lines.append(
            f"| {s.target} | {s.offered:g} | {s.placed}/{s.sent} | {s.placed_rate:.0f} | "
            f"{cell(s.latency_ms, 0.5)} | {cell(s.latency_ms, 0.95)} | "
            f"{cell(s.latency_ms, 0.99)} | {cell(s.tail_ms, 0.99)} | "
            f"{s.longest_pause_ms:.0f} | {s.cpu_s:.1f} | "
            f"{s.per_cpu_s:.0f} | {'yes' if s.kept_up else '**no**'} | {s.load:.1f} |"
        )
    if args.ember_baseline:
        lines.append(
            f"\nember_ab and ember_baseline: after the rest, each rate offered to a fresh ember "
            f"and then to a fresh ember with {' '.join(args.ember_baseline)}, back to back "
            "(both read `ember.requests`, so never at once)."
        )
    for name in dict.fromkeys(s.target for s in sus):
        kept = [s.offered for s in sus if s.target == name and s.kept_up]
        best = f"{max(kept):g} requests/s" if kept else "none of the offered rates"
        verdict = ""
        if name == "ember":
            met = bool(kept) and max(kept) >= 1000
            verdict = f"; target >= 1,000/s: **{'met' if met else 'not met'}**"
        lines.append(f"\n{name} kept up with **{best}**{verdict}.")
    lines.append("")
    return lines


def intake_report(intake: Intake) -> list[str]:
    def cells(values: list[float]) -> str:
        if not values:
            return "- | - | - | -"
        return (f"{percentile(values, 0.5):.1f} | {percentile(values, 0.99):.1f} | "
                f"**{max(values):.1f}**")

    base, add = intake.windows
    worst = max(add.gaps) if add.gaps else float("inf")
    stall = max(add.excess) if add.excess else float("inf")
    first = "-" if intake.added_first_s is None else f"{intake.added_first_s:.2f} s"
    lines = [
        "## Intake of a serving worker while another worker is added",
        "",
        f"One serving worker (partition 0 of its model's topic) takes a steady {intake.rate:g} "
        f"requests/s through admission and placement (it holds each for "
        f"{intake.service_ms:g} ms; its heartbeats every {INTAKE_HEARTBEAT_S:g} s list what "
        f"it runs and what it finished; placement by turns weighted by room with the default "
        f"slow start, {INTAKE_SLOTS} slots). Then a "
        "second worker process starts on partition 1, announces itself `ready` on "
        "`ember.lifecycle` and gets placements. Both are lightweight workers "
        "(`--serve-worker`: gpu_worker's assigned-partition intake and lifecycle events, no "
        f"model). The added worker was ready {intake.added_ready_s:.2f} s after its process "
        f"started, took in its first request at {first} and {intake.added_records} in all. "
        f"Load average at the end: {intake.load:.1f}.",
        "",
        "Gaps between consecutive intakes of the serving worker (ms): *intake gap* between "
        "the times it took two records in; *sent gap* between the two records' CreateTimes "
        "(when placement sent them: a placement that sent the added worker every request "
        "until its load matched would show here as a long sent gap; slow start eases it in); "
        "*not taken in*: intake gap minus sent gap, time records waited on the "
        "partition beyond placement's spacing (a paused intake would show here).",
        "",
        "| window | s | records | intake gap p50 | p99 | max | sent gap p50 | p99 | max | "
        "not taken in p50 | p99 | max |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in intake.windows:
        lines.append(f"| {w.name} | {w.seconds:.0f} | {w.records} | {cells(w.gaps)} | "
                     f"{cells(w.sent_gaps)} | {cells(w.excess)} |")
    lines += [
        "",
        f"Largest intake gap around the add: **{worst:.1f} ms** (baseline: "
        f"{max(base.gaps) if base.gaps else float('nan'):.1f} ms); of it, not taken in: "
        f"**{stall:.1f} ms** at most (baseline {max(base.excess) if base.excess else 0:.1f} "
        f"ms). Target < 100 ms: **{'met' if worst < 100 else 'not met'}** on the intake gap; "
        f"**{'met' if stall < 100 else 'not met'}** on the time not taken in.",
        "",
    ]
    return lines


async def main(args: argparse.Namespace) -> str:
    kafka = KafkaSettings.from_env()
    loads = [load_average()]
    broker_pid = local_broker_pid() if args.pin else None
    broker_cpus = os.sched_getaffinity(broker_pid) if broker_pid is not None else set()
    if args.pin:
        cpu, rest = pin(broker_pid)
        progress(f"targets on CPU {cpu}; this script"
                 f"{'' if broker_pid is None else ' and the broker'} on {sorted(rest)}")
    try:
        return await measure_all(args, kafka, loads)
    finally:
        if broker_pid is not None:
            with contextlib.suppress(OSError):
                set_affinity(broker_pid, broker_cpus)


def local_broker_pid() -> int | None:
    """The pid of the broker `ember broker start` runs, if it runs (None for another one)."""
    try:
        pid = int(BrokerSettings.from_env().pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


async def measure_all(args: argparse.Namespace, kafka: KafkaSettings,
                      loads: list[float]) -> str:
    lat: dict[str, Latency] = {}
    thr: list[Throughput] = []
    sus: list[Sustained] = []
    intake: Intake | None = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), acks="all", linger_ms=0,
                                    max_batch_size=1 << 20)
        await producer.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                ember = await stack.enter_async_context(ember_target(kafka, workdir, args.profile))
                targets = [ember]
                floors = [("floor", "--forward", args.no_floor),
                          ("faust_floor", "--faust-forward", args.no_faust_floor)]
                for name, flag, left_out in floors:
                    if not left_out:
                        targets.append(await stack.enter_async_context(
                            forwarder_target(kafka, workdir, name, flag)))
                model = ember.placed.removeprefix("ember.model.")
                progress(f"targets ready: {', '.join(t.name for t in targets)}")
                watches = {}
                for t in targets:
                    run_id = f"b{uuid.uuid4().hex[:6]}-"
                    w = await stack.enter_async_context(watching(kafka, producer, t, run_id))
                    watches[t.name] = (w, run_id)
                for t in targets:
                    w, run_id = watches[t.name]
                    progress(f"{t.name}: warm-up, then latency of {args.latency_requests}")
                    await measure_latency(producer, w, t, model, run_id + "w", 50, 0.01)
                    lat[t.name] = await measure_latency(
                        producer, w, t, model, run_id + "l", args.latency_requests, args.gap_s
                    )
                    loads.append(load_average())
                if not args.no_intake:
                    progress(f"ember: intake gap ({args.intake_window_s:g} s without, then "
                             f"{args.intake_window_s:g} s around adding a worker)")
                    intake = await measure_intake(producer, ember, workdir, args.intake_rate,
                                                  args.intake_window_s, args.intake_service_ms)
                    loads.append(intake.load)
                for i in range(args.runs):
                    for t in targets if i % 2 == 0 else targets[::-1]:
                        w, run_id = watches[t.name]
                        await asyncio.sleep(2.0)  # in-flight counts drain between runs
                        result = await measure_throughput(
                            producer, w, t, model, f"{run_id}{i}-", args.requests, args.py_spy
                        )
                        thr.append(result)
                        loads.append(result.load)
                        progress(f"{t.name} run {i + 1}/{args.runs}: "
                                 f"{result.overall_rate:.0f} placed/s")
                for rate in args.sustain_rates:
                    for t in targets:
                        if t.name == "floor" and not args.sustain_floor:
                            continue  # far above any rate offered here
                        w, run_id = watches[t.name]
                        await asyncio.sleep(2.0)
                        s = await measure_sustained(producer, w, t, model,
                                                    f"{run_id}s{rate:g}-", rate, args.sustain_s,
                                                    args.py_spy)
                        sus.append(s)
                        loads.append(s.load)
                        progress(sustained_line(s))
            if args.ember_baseline:
                for s in await compare_baseline(args, kafka, workdir, producer):
                    sus.append(s)
                    loads.append(s.load)
        finally:
            await producer.stop()
    return report(args, lat, thr, sus, loads, intake)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-requests", type=int, default=500)
    parser.add_argument("--gap-s", type=float, default=0.02, help="pause between them")
    parser.add_argument("--requests", type=int, default=10_000, help="per throughput run")
    parser.add_argument("--runs", type=int, default=3, help="throughput runs per target")
    parser.add_argument("--sustain-rates", type=lambda v: [float(r) for r in v.split(",") if r],
                        default=[250.0, 500.0, 750.0, 1000.0], metavar="R1,R2,...",
                        help="offered loads (requests/s) of the sustained-load part ('' skips it)")
    parser.add_argument("--sustain-s", type=float, default=20.0, help="seconds per offered load")
    parser.add_argument("--no-floor", action="store_true", help="leave the aiokafka floor out")
    parser.add_argument("--sustain-floor", action="store_true",
                        help="offer the sustained rates to the aiokafka floor too: what the load "
                        "generator and the broker keep up with")
    parser.add_argument("--ember-baseline", action="append", metavar="KEY=VALUE",
                        help="also measure an ember target with this environment variable set")
    parser.add_argument("--no-faust-floor", action="store_true",
                        help="leave the Faust floor out")
    parser.add_argument("--out", type=Path, default=RESULTS / "control_plane.md")
    parser.add_argument("--profile", type=Path, help="cProfile the streams process into PATH")
    parser.add_argument("--py-spy", type=Path, metavar="PATH",
                        help="py-spy record (raw, with idle) the Faust targets during each "
                        "throughput and sustained run into PATH.<target>.<run>.txt (py-spy "
                        "from PyPI)")
    parser.add_argument("--workdir", type=Path, help="keep the streams config and logs here")
    parser.add_argument("--no-intake", action="store_true", help="skip the intake-gap part")
    parser.add_argument("--pin", action="store_true",
                        help="run each measured process on a CPU of its own, this script and "
                        "the local broker on the others (Linux)")
    parser.add_argument("--intake-rate", type=float, default=100.0, help="requests/s")
    parser.add_argument("--intake-window-s", type=float, default=8.0,
                        help="baseline window, then the window around adding a worker")
    parser.add_argument("--intake-service-ms", type=float, default=50.0,
                        help="how long the lightweight workers hold a request")
    parser.add_argument("--serve-worker", nargs=5, help=argparse.SUPPRESS,
                        metavar=("MODEL", "WORKER_ID", "PARTITION", "SERVICE_MS", "OUT"))
    parser.add_argument("--forward", nargs=3, metavar="TOPIC", help=argparse.SUPPRESS)
    parser.add_argument("--faust-forward", nargs=3, metavar="TOPIC", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.serve_worker:
        m, wid, part, svc, path = arguments.serve_worker
        asyncio.run(serve_worker(KafkaSettings.from_env(), m, wid, int(part), float(svc),
                                 Path(path)))
        sys.exit(0)
    if arguments.forward:
        asyncio.run(forward(KafkaSettings.from_env(), *arguments.forward))
        sys.exit(0)
    if arguments.faust_forward:
        home = Path(os.environ.get("EMBER_HOME", tempfile.gettempdir()))
        faust_forward(KafkaSettings.from_env(), *arguments.faust_forward, home / "faust-floor")
        sys.exit(0)
    text = asyncio.run(main(arguments))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(text)
    print(text)
