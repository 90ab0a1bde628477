"""The supervisor: pure planning (decisions, partitions, restarts on a fake clock), the local
backend's command line, and on the real broker: scale up -> ready, kill -9 -> restarted on the
same partition, release -> drained, stop -> no process left."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.worker import WorkerConfig, now_ms
from infra.supervisor import (
    CatalogError,
    Fleet,
    LocalProcessBackend,
    LocalWorker,
    ModelCatalog,
    PrestartPool,
    RestartPolicy,
    Supervisor,
    SupervisorConfig,
    WorkerOptions,
)
from infra.supervisor.backends import worker_argv
from infra.supervisor.plan import (
    START_FAILED,
    CancelRestart,
    DrainWorker,
    GiveUp,
    Ignore,
    KillWorker,
    Refuse,
    ReportFailed,
    ScheduleRestart,
    StartWorker,
    describe_exit,
    free_partitions,
    make_worker_id,
    plan_decision,
)
from infra.topics import apply_topics
from schemas import LifecycleEvent, ScaleDecision, decode, record_for
from schemas.topics import DECISIONS, LIFECYCLE, model_topic

MAX_AGE_MS = 60_000
POLICY = RestartPolicy(max_restarts=3, window_s=300, backoff_s=1, max_backoff_s=30)


def decision(action: str, model: str = "tiny", count: int | None = None, **fields) -> ScaleDecision:
    if count is None:
        count = {"scale_up": 1, "hold": 0, "release": 1}[action]
    return ScaleDecision(
        model=model,
        action=action,
        count=count,
        reason="test",
        policy="test",
        decided_at=fields.pop("decided_at", 1_000_000),
        **fields,
    )


def fleet(partitions: int = 4) -> Fleet:
    catalog = ModelCatalog({"tiny": Path("/models/tiny"), "other": Path("/models/other")})
    return Fleet("sup", catalog, {"tiny": partitions, "other": 2})


def starts(actions) -> list[StartWorker]:
    return [a for a in actions if isinstance(a, StartWorker)]


# -- catalog --------------------------------------------------------------------------------


def test_catalog_parses_name_dir_entries(tmp_path):
    catalog = ModelCatalog.parse([f"tiny={tmp_path}", " org/llama = /m/llama "])
    assert catalog.models == {"tiny": tmp_path.resolve(), "org/llama": Path("/m/llama")}
    assert "tiny" in catalog and "x" not in catalog
    env = ModelCatalog.from_env({"EMBER_MODELS": f"a={tmp_path},b={tmp_path}"})
    assert set(env.models) == {"a", "b"}
    assert ModelCatalog.from_env({}).models == {}


@pytest.mark.parametrize(
    ("entries", "problem"),
    [(["tiny"], "expected NAME=DIR"), (["=dir"], "expected NAME=DIR"), (["a=x", "a=y"], "twice")],
)
def test_catalog_refuses_bad_entries(entries, problem):
    with pytest.raises(CatalogError, match=problem):
        ModelCatalog.parse(entries)


def test_catalog_check_names_the_missing_directory(tmp_path):
    with pytest.raises(CatalogError, match="tiny.*not a directory"):
        ModelCatalog.parse([f"tiny={tmp_path / 'nope'}"]).check()


# -- decisions ------------------------------------------------------------------------------


def test_scale_up_takes_the_lowest_free_partitions_with_unique_ids():
    f = fleet()
    first = f.on_decision(decision("scale_up", count=2), 0.0, 1_000_000, MAX_AGE_MS)
    assert [(a.model, a.partition) for a in first] == [("tiny", 0), ("tiny", 1)]
    second = f.on_decision(decision("scale_up", count=1), 1.0, 1_000_000, MAX_AGE_MS)
    assert [a.partition for a in starts(second)] == [2]
    ids = [a.worker_id for a in first + second]
    assert len(set(ids)) == 3
    assert ids[0] == "sup-tiny-p0-1"
    assert free_partitions(f, "tiny") == [3]
    assert free_partitions(f, "other") == [0, 1]


def test_scale_up_beyond_the_partitions_starts_what_fits_and_says_why():
    f = fleet(partitions=2)
    actions = f.on_decision(decision("scale_up", count=3), 0.0, 1_000_000, MAX_AGE_MS)
    assert [a.partition for a in starts(actions)] == [0, 1]
    (refusal,) = [a for a in actions if isinstance(a, Refuse)]
    assert "only 2 of 2 partitions" in refusal.reason
    again = f.on_decision(decision("scale_up"), 1.0, 1_000_000, MAX_AGE_MS)
    assert not starts(again) and isinstance(again[0], Refuse)


def test_a_draining_worker_still_owns_its_partition():
    f = fleet(partitions=2)
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    release = decision("release", worker_id=start.worker_id)
    assert f.on_decision(release, 1.0, 1_000_000, MAX_AGE_MS) == [
        DrainWorker(start.worker_id, "released")
    ]
    actions = f.on_decision(decision("scale_up", count=2), 2.0, 1_000_000, MAX_AGE_MS)
    assert [a.partition for a in starts(actions)] == [1], "partition 0 is still draining"
    assert f.on_exit(start.worker_id, 0, 3.0, POLICY) == []
    assert [a.partition for a in starts(f.on_decision(decision("scale_up"), 4.0, 1_000_000,
                                                      MAX_AGE_MS))] == [0]


def test_hold_does_nothing_and_release_twice_drains_once():
    f = fleet()
    assert f.on_decision(decision("hold"), 0.0, 1_000_000, MAX_AGE_MS) == []
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    release = decision("release", worker_id=start.worker_id)
    assert len(f.on_decision(release, 1.0, 1_000_000, MAX_AGE_MS)) == 1
    assert f.on_decision(release, 2.0, 1_000_000, MAX_AGE_MS) == []


@pytest.mark.parametrize(
    ("made", "problem"),
    [
        (decision("scale_up", decided_at=1_000_000 - MAX_AGE_MS - 1), "stale"),
        (decision("release", worker_id="nobody"), "no worker nobody"),
    ],
)
def test_decisions_that_cannot_be_carried_out_are_refused_with_a_reason(made, problem):
    (action,) = plan_decision(fleet(), made, 1_000_000, MAX_AGE_MS)
    assert isinstance(action, Refuse) and problem in action.reason


def test_decisions_for_models_outside_the_catalog_are_ignored():
    (action,) = plan_decision(fleet(), decision("scale_up", model="unknown"), 1_000_000, 1)
    assert isinstance(action, Ignore) and "catalog" in action.reason


def test_release_of_a_worker_of_another_model_is_refused():
    f = fleet()
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    release = decision("release", model="other", worker_id=start.worker_id)
    (action,) = f.on_decision(release, 1.0, 1_000_000, MAX_AGE_MS)
    assert isinstance(action, Refuse) and "serves tiny" in action.reason


def test_a_redelivered_decision_is_dropped_by_its_id():
    f = fleet()
    up = decision("scale_up", decision_id="d-1")
    assert len(f.on_decision(up, 0.0, 1_000_000, MAX_AGE_MS)) == 1
    assert f.on_decision(up, 1.0, 1_000_000, MAX_AGE_MS) == []
    assert len(f.on_decision(decision("scale_up", decision_id="d-2"), 1.0, 1_000_000,
                             MAX_AGE_MS)) == 1


def test_worker_ids_fit_the_wire_rules():
    wid = make_worker_id("host-1", "org/Llama 3 8B", 3, 17)
    assert wid == "host-1-org_Llama_3_8B-p3-17"
    long_id = make_worker_id("h", "m" * 300, 7, 123456)
    assert len(long_id) == 128 and long_id.endswith("-p7-123456")


# -- restarts on a fake clock ---------------------------------------------------------------


def test_a_crash_restarts_on_the_same_partition_with_a_new_id_after_backoff():
    f = fleet()
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    actions = f.on_exit(start.worker_id, -signal.SIGKILL, 10.0, POLICY)
    failed, scheduled = actions
    assert failed == ReportFailed(start.worker_id, "tiny", 0, "killed by SIGKILL")
    assert isinstance(scheduled, ScheduleRestart)
    restart = scheduled.restart
    assert (restart.partition, restart.restart_of, restart.due_at) == (0, start.worker_id, 11.0)
    assert restart.worker_id != start.worker_id
    # While the restart is pending its partition is not free.
    up = f.on_decision(decision("scale_up"), 10.5, 1_000_000, MAX_AGE_MS)
    assert [a.partition for a in starts(up)] == [1]
    assert f.on_tick(10.9, drain_timeout_s=60) == []
    (due,) = f.on_tick(11.0, drain_timeout_s=60)
    assert due == StartWorker(
        restart.worker_id, "tiny", 0, f"restart of {start.worker_id}", start.worker_id
    )
    assert f.workers[restart.worker_id].partition == 0


def test_restarts_back_off_then_give_up_and_the_window_slides():
    f = fleet()
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    worker_id, now, delays = start.worker_id, 10.0, []
    for _ in range(3):
        _, scheduled = f.on_exit(worker_id, 1, now, POLICY)
        delays.append(scheduled.restart.due_at - now)
        now = scheduled.restart.due_at
        (restart,) = f.on_tick(now, 60)
        worker_id, now = restart.worker_id, now + 5
    assert delays == [1.0, 2.0, 4.0]
    failed, gave_up = f.on_exit(worker_id, 1, now, POLICY)
    assert isinstance(failed, ReportFailed) and isinstance(gave_up, GiveUp)
    assert "3 restarts" in gave_up.reason
    assert free_partitions(f, "tiny") == [0, 1, 2, 3]
    # Five minutes later the old restarts are out of the window: a crash restarts again.
    (again,) = f.on_decision(decision("scale_up"), now, 1_000_000, MAX_AGE_MS)
    _, scheduled = f.on_exit(again.worker_id, 1, now + 400, POLICY)
    assert isinstance(scheduled, ScheduleRestart) and scheduled.restart.due_at == now + 401


def test_clean_exits_and_released_workers_are_not_restarted():
    f = fleet()
    a, b = f.on_decision(decision("scale_up", count=2), 0.0, 1_000_000, MAX_AGE_MS)
    assert f.on_exit(a.worker_id, 0, 1.0, POLICY) == []
    f.on_decision(decision("release", worker_id=b.worker_id), 1.0, 1_000_000, MAX_AGE_MS)
    (failed,) = f.on_exit(b.worker_id, -signal.SIGKILL, 2.0, POLICY)
    assert isinstance(failed, ReportFailed), "died while draining: reported, not restarted"
    assert f.workers == {} and f.pending == {}


def test_release_cancels_a_pending_restart():
    f = fleet()
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    f.on_exit(start.worker_id, 1, 1.0, POLICY)
    (cancel,) = f.on_decision(
        decision("release", worker_id=start.worker_id), 1.5, 1_000_000, MAX_AGE_MS
    )
    assert isinstance(cancel, CancelRestart)
    assert f.on_tick(100.0, 60) == [] and free_partitions(f, "tiny") == [0, 1, 2, 3]


def test_a_failed_start_goes_through_the_restart_policy():
    f = fleet()
    (start,) = f.on_decision(decision("scale_up"), 0.0, 1_000_000, MAX_AGE_MS)
    failed, scheduled = f.on_exit(start.worker_id, START_FAILED, 0.0, POLICY)
    assert failed.reason == "could not be started" and isinstance(scheduled, ScheduleRestart)


def test_overdue_drains_are_killed_once_and_stop_drains_everything():
    f = fleet()
    a, b = f.on_decision(decision("scale_up", count=2), 0.0, 1_000_000, MAX_AGE_MS)
    f.on_exit(b.worker_id, 1, 1.0, POLICY)  # b's restart is pending
    actions = f.on_stop(2.0)
    assert DrainWorker(a.worker_id, "supervisor stopping") in actions
    assert any(isinstance(x, CancelRestart) for x in actions)
    assert f.on_tick(61.0, drain_timeout_s=60) == []
    assert f.on_tick(62.5, drain_timeout_s=60) == [
        KillWorker(a.worker_id, "still draining after 60 s")
    ]
    assert f.on_tick(70.0, drain_timeout_s=60) == []
    (failed,) = f.on_exit(a.worker_id, -signal.SIGKILL, 70.0, POLICY)
    assert isinstance(failed, ReportFailed), "no restart while stopping"


def test_describe_exit():
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"


# -- the local backend ----------------------------------------------------------------------


def test_worker_argv_is_the_ember_worker_command_line():
    config = WorkerConfig(
        model="org/m", model_dir=Path("/m"), partition=3, worker_id="w-1", max_batch=4,
        dtype="bfloat16", chunk=ChunkPolicy(2, 10), heartbeat_interval_s=0.5,
    )
    argv = worker_argv(config, "/py")
    assert argv[:5] == ["/py", "-m", "infra.cli", "worker", "/m"]
    flags = dict(zip(argv[5::2], argv[6::2], strict=True))
    assert flags == {
        "--model": "org/m", "--partition": "3", "--worker-id": "w-1", "--max-batch": "4",
        "--device": "cpu", "--chunk-tokens": "2", "--chunk-ms": "10", "--heartbeat-s": "0.5",
        "--dtype": "bfloat16",
    }
    from infra.cli import build_parser

    args = build_parser().parse_args(argv[3:])
    assert (args.model, args.partition, args.worker_id, args.dtype) == ("org/m", 3, "w-1",
                                                                          "bfloat16")


def test_local_backend_drains_kills_and_reaps_process_groups(tmp_path):
    """With a stand-in for `ember worker`: drain is SIGTERM to the group, poll reaps the
    worker and kills what it left behind in its group."""
    script = tmp_path / "fake_worker.py"
    script.write_text(
        "import signal, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    backend = LocalProcessBackend(python=sys.executable, log_dir=tmp_path)
    config = WorkerConfig(model="m", model_dir=tmp_path, worker_id="fake-1")
    import infra.supervisor.backends as backends

    real_argv = backends.worker_argv
    backends.worker_argv = lambda config, python: [python, str(script)]
    try:
        worker = backend.start(config)
    finally:
        backends.worker_argv = real_argv
    assert isinstance(worker, LocalWorker) and worker.source == "fresh"
    log_path = tmp_path / "fake-1.log"
    deadline = time.monotonic() + 20
    while not log_path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log_path.read_text().split()[0])
    assert backend.poll(worker).running
    assert os.getpgid(worker.pid) == worker.pid
    backend.drain(worker)  # the group gets SIGTERM: the grandchild dies with it
    deadline = time.monotonic() + 10
    while (status := backend.poll(worker)).running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.exit_code in (0, -signal.SIGTERM)
    assert not _alive(grandchild)


# -- on the real broker ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (not a zombie) per /proc."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _group_members(pgids: set[int]) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) in pgids and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


class Lifecycle:
    """Lifecycle events of one model, read from the topic's end as of `start`."""

    def __init__(self, kafka_settings, model: str) -> None:
        self.kafka_settings, self.model = kafka_settings, model
        self.events: list[LifecycleEvent] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            LIFECYCLE, **self.kafka_settings.aiokafka_kwargs(), auto_offset_reset="latest",
            enable_auto_commit=False,
        )
        await self._consumer.start()
        await self._consumer.getmany(timeout_ms=100)  # position at the end before acting

    async def stop(self) -> None:
        await self._consumer.stop()

    async def wait_for(self, match, timeout_s: float) -> LifecycleEvent:
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                if match(event):
                    return event
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for rec in records:
                    event = decode(LifecycleEvent, rec.value, rec.headers)
                    if event.model == self.model:
                        self.events.append(event)
        raise AssertionError(
            f"no matching lifecycle event in {timeout_s}s; saw "
            f"{[(e.worker_id, e.kind, e.state) for e in self.events if e.kind == 'state']}"
        )


async def _send_decision(kafka_settings, made: ScaleDecision) -> None:
    producer = AIOKafkaProducer(**kafka_settings.aiokafka_kwargs())
    await producer.start()
    try:
        rec = record_for(made, DECISIONS)
        await producer.send_and_wait(rec.topic, rec.value, key=rec.key, headers=rec.headers)
    finally:
        await producer.stop()


def _ready(worker_id: str | None = None, partition: int | None = None):
    def match(e: LifecycleEvent) -> bool:
        return (
            e.kind == "state"
            and e.state == "ready"
            and (worker_id is None or e.worker_id == worker_id)
            and (partition is None or e.partition == partition)
        )

    return match


@pytest.mark.kafka
@pytest.mark.slow
async def test_supervisor_scales_restarts_releases_and_leaves_no_process(
    kafka_settings, tiny_model, tmp_path
):
    model = f"tiny-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [model_topic(model)])
    config = SupervisorConfig(
        catalog=ModelCatalog({model: tiny_model}),
        worker=WorkerOptions(max_batch=2, heartbeat_interval_s=0.5),
        restart=RestartPolicy(max_restarts=2, window_s=60, backoff_s=0.2),
        drain_timeout_s=20,
        supervisor_id=f"sup{uuid.uuid4().hex[:6]}",
    )
    pool = PrestartPool(1, log_dir=tmp_path / "logs")
    backend = LocalProcessBackend(pool=pool, log_dir=tmp_path / "logs")
    supervisor = Supervisor(config, kafka_settings, backend)
    lifecycle = Lifecycle(kafka_settings, model)
    await lifecycle.start()
    children_before = _children(os.getpid())
    task = asyncio.create_task(supervisor.run())
    pgids: set[int] = set()
    try:
        await asyncio.wait_for(supervisor.ready.wait(), 30)
        # Let the pre-started process boot so the first worker comes from the pool.
        deadline = time.monotonic() + 90
        while pool.idle_count < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        pgids.update(pool.pids)

        # scale_up(1) -> a worker on partition 0 becomes ready.
        await _send_decision(kafka_settings, decision("scale_up", model, decided_at=now_ms()))
        first = await lifecycle.wait_for(_ready(partition=0), 60)
        (handle,) = supervisor.workers().values()
        assert handle.worker_id == first.worker_id and handle.source == "prestarted"
        pgids.add(handle.pid)
        process_span = await lifecycle.wait_for(
            lambda e: e.worker_id == first.worker_id and e.span_name == "process", 5
        )
        assert process_span.span_duration_ms < 2000, "the process span starts at assignment"

        # kill -9 -> `failed` from the supervisor, then a new worker on the same partition.
        os.kill(handle.pid, signal.SIGKILL)
        failed = await lifecycle.wait_for(
            lambda e: e.worker_id == first.worker_id and e.state == "failed", 20
        )
        assert "SIGKILL" in (failed.reason or "")
        second = await lifecycle.wait_for(
            lambda e: _ready(partition=0)(e) and e.worker_id != first.worker_id, 90
        )
        (handle,) = supervisor.workers().values()
        assert handle.worker_id == second.worker_id
        pgids.add(handle.pid)
        pgids.update(pool.pids)

        # release -> it drains, says `stopped`, and its process is gone.
        await _send_decision(
            kafka_settings,
            decision("release", model, worker_id=second.worker_id, decided_at=now_ms()),
        )
        await lifecycle.wait_for(
            lambda e: e.worker_id == second.worker_id and e.state == "stopped", 30
        )
        deadline = time.monotonic() + 10
        while supervisor.workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert supervisor.workers() == {}
        assert not _alive(handle.pid)

        # One more worker, then stop the supervisor with it running.
        await _send_decision(kafka_settings, decision("scale_up", model, decided_at=now_ms()))
        third = await lifecycle.wait_for(
            lambda e: _ready()(e) and e.worker_id not in (first.worker_id, second.worker_id), 90
        )
        assert third.partition == 0
        pgids.update(h.pid for h in supervisor.workers().values())
        pgids.update(pool.pids)
    finally:
        supervisor.stop()
        await asyncio.wait_for(task, 60)
        await lifecycle.stop()
    assert supervisor.workers() == {}
    assert _group_members(pgids) == [], "a worker or pre-started process outlived the supervisor"
    assert _children(os.getpid()) <= children_before


def _children(pid: int) -> set[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry.name))
    return children
