"""Pre-started processes: the assignment channel, and on the real broker a pre-started process
that becomes a ready worker with a shorter `process` span than a fresh `ember worker`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.prestart import (
    AssignmentError,
    assignment_for,
    at_idle_priority,
    config_from_assignment,
    parse_assignment,
    wait_for_assignment,
)
from gpu_worker.worker import WorkerConfig
from infra.topics import apply_topics
from schemas import LifecycleEvent, decode
from schemas.topics import LIFECYCLE, model_topic


def line(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_an_assignment_becomes_the_worker_config_with_the_span_starting_at_it(tmp_path):
    config = parse_assignment(
        line(model="tiny", model_dir=str(tmp_path), partition=3, worker_id="w-1", chunk_tokens=2),
        assigned_at_ms=1234,
    )
    assert config == WorkerConfig(
        model="tiny",
        model_dir=tmp_path,
        partition=3,
        worker_id="w-1",
        chunk=ChunkPolicy(2, ChunkPolicy.max_delay_ms),
        started_at_ms=1234,
    )


def test_assignment_for_round_trips_every_field(tmp_path):
    config = WorkerConfig(
        model="org/m", model_dir=tmp_path, partition=1, worker_id="w", max_batch=3,
        max_seq_len=64, dtype="bfloat16", device="cpu", chunk=ChunkPolicy(4, 20),
        heartbeat_interval_s=0.25, idle_poll_ms=7,
    )
    sent = json.loads(json.dumps(assignment_for(config)))
    assert config_from_assignment(sent, 99) == WorkerConfig(
        **{**config.__dict__, "started_at_ms": 99}
    )


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"partition": -1}, "partition: must be an integer >= 0"),
        ({"partition": "1"}, "partition: must be int"),
        ({"partition": True}, "partition: must be int"),
        ({"max_batch": 0}, "max_batch"),
        ({"dtype": "int8"}, "dtype: must be one of float32"),
        ({"model_dir": "/no/such/dir"}, "model_dir: /no/such/dir is not a directory"),
        ({"weights": "x"}, "unknown field"),
        ({"worker_id": None}, "missing required field"),
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
    ],
)
def test_bad_assignments_name_the_field(tmp_path, fields, problem):
    value = {"model": "m", "model_dir": str(tmp_path), "partition": 0, "worker_id": "w", **fields}
    with pytest.raises(AssignmentError, match=problem):
        config_from_assignment(value, 0)


@pytest.mark.parametrize(
    ("raw", "problem"), [(b"{not json", "not a JSON object"), (b"[1]", "must be a JSON object")]
)
def test_lines_that_are_not_json_objects_are_refused(raw, problem):
    with pytest.raises(AssignmentError, match=problem):
        parse_assignment(raw, 0)


def test_the_channel_answers_each_line_and_stops_at_eof(tmp_path):
    good = line(model="m", model_dir=str(tmp_path), partition=0, worker_id="w")
    out = io.StringIO()
    config = wait_for_assignment(io.BytesIO(b"\n" + line(partition=0) + good), out)
    assert config is not None and config.worker_id == "w"
    replies = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["event"] for r in replies] == ["rejected", "assigned"]
    assert "missing required field" in replies[0]["error"]
    assert wait_for_assignment(io.BytesIO(b""), io.StringIO()) is None


def _thread_policy(tid: int, pid: int | str = "self") -> int:
    """A thread's scheduling policy (0 normal, 5 idle), from /proc (field 41 of its stat)."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[38])


def _policies(pid: int) -> set[int]:
    """The scheduling policies of a process's live threads."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found.add(_thread_policy(int(tid), pid))
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return found


NORMAL, IDLE = 0, 5
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread policy")


@linux_only
def test_the_boot_runs_at_idle_priority_and_leaves_the_caller_as_it_was():
    import threading

    seen: list[int] = []
    assert at_idle_priority(lambda: seen.append(_thread_policy(threading.get_native_id()))) == (
        "idle"
    )
    assert seen == [IDLE]
    assert _thread_policy(threading.get_native_id()) == NORMAL


def test_the_boot_hands_its_failure_to_the_caller():
    def broken() -> None:
        raise ImportError("no torch here")

    with pytest.raises(ImportError, match="no torch here"):
        at_idle_priority(broken)


# -- on the real broker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


async def _spawn(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


async def _reply(proc: asyncio.subprocess.Process, timeout_s: float) -> dict:
    raw = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    assert raw, f"process {proc.pid} closed stdout (exit code {proc.returncode})"
    return json.loads(raw)


async def _wait_lifecycle(consumer: AIOKafkaConsumer, events: list, match, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in events:
            if match(event):
                return event
        for records in (await consumer.getmany(timeout_ms=200)).values():
            events.extend(decode(LifecycleEvent, r.value, r.headers) for r in records)
    raise AssertionError(f"no matching lifecycle event within {timeout_s}s")


@pytest.mark.kafka
@pytest.mark.slow
async def test_a_prestarted_process_serves_with_a_shorter_process_span_than_a_fresh_worker(
    kafka_settings, tiny_model
):
    model = f"tiny-{uuid.uuid4().hex[:8]}"
    await apply_topics(kafka_settings, [model_topic(model)])
    consumer = AIOKafkaConsumer(
        LIFECYCLE, **kafka_settings.aiokafka_kwargs(), auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    events: list[LifecycleEvent] = []
    procs = [await _spawn("-m", "gpu_worker.prestart") for _ in range(3)]
    served, by_eof, by_signal = procs
    try:
        for proc in procs:
            idle = await _reply(proc, 120)
            assert idle["event"] == "idle" and idle["pid"] == proc.pid
            assert idle["cuda_context"] is False
            if sys.platform.startswith("linux"):
                # the imports ran at idle priority; every thread left to serve runs normal
                # (the finished boot thread may take a moment to leave the task list)
                assert idle["boot_policy"] == "idle"
                for _ in range(50):
                    if _policies(proc.pid) == {NORMAL}:
                        break
                    await asyncio.sleep(0.1)
                assert _policies(proc.pid) == {NORMAL}

        # Unassigned: a bad line is answered and the process stays usable; EOF and SIGTERM
        # end it cleanly.
        by_eof.stdin.write(line(model=model, partition=0))
        assert (await _reply(by_eof, 10))["event"] == "rejected"
        by_eof.stdin.close()
        by_signal.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(by_eof.wait(), 10) == 0
        assert await asyncio.wait_for(by_signal.wait(), 10) == 0

        # Assigned: it runs the worker; its `process` span starts at the assignment.
        worker_id = f"pre-{uuid.uuid4().hex[:6]}"
        t0 = time.monotonic()
        served.stdin.write(
            line(model=model, model_dir=str(tiny_model), partition=0, worker_id=worker_id)
        )
        assert (await _reply(served, 10))["event"] == "assigned"
        await _wait_lifecycle(
            consumer, events, lambda e: e.worker_id == worker_id and e.state == "ready", 60
        )
        prestarted_ready_s = time.monotonic() - t0

        fresh_id = f"fresh-{uuid.uuid4().hex[:6]}"
        t0 = time.monotonic()
        fresh = await _spawn(
            "-m", "infra.cli", "worker", str(tiny_model), "--model", model,
            "--partition", "1", "--worker-id", fresh_id,
        )  # fmt: skip
        procs.append(fresh)
        await _wait_lifecycle(
            consumer, events, lambda e: e.worker_id == fresh_id and e.state == "ready", 120
        )
        fresh_ready_s = time.monotonic() - t0

        def span(wid: str) -> LifecycleEvent:
            return next(e for e in events if e.worker_id == wid and e.span_name == "process")

        prestarted_ms = span(worker_id).span_duration_ms
        fresh_ms = span(fresh_id).span_duration_ms
        print(
            f"\nready after launch: prestarted {prestarted_ready_s:.2f} s, fresh "
            f"{fresh_ready_s:.2f} s; process span: prestarted {prestarted_ms:.0f} ms, fresh "
            f"{fresh_ms:.0f} ms"
        )
        assert prestarted_ms < fresh_ms
        assert prestarted_ready_s < fresh_ready_s

        for proc in (served, fresh):  # assigned: SIGTERM drains, like `ember worker`
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(served.wait(), 30) == 0
        assert await asyncio.wait_for(fresh.wait(), 30) == 0
        await _wait_lifecycle(
            consumer, events, lambda e: e.worker_id == worker_id and e.state == "stopped", 10
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        await consumer.stop()
