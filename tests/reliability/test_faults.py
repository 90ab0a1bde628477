"""Faults under traffic: every request gets exactly one answer, nothing duplicated, tables and
processes recover.

Each scenario sends greedy requests through the SDK at a steady rate, injects its fault
while they flow, keeps sending, then waits for every outcome and checks: lost = 0 (no
time-outs, every request answered once), duplicates = 0 (completed text equals the greedy
reference after the SDK's dedup), the model's queue depth back to 0 in the streams app's
tables, the worker pool back to its size, and no stray process (everything carrying the
stack's marker descends from the live streams app or supervisor). The stack is stopped at
the end with no process left (conftest).

    pytest -m fault                                   # the short form (CI)
    EMBER_RELIABILITY=long pytest -m fault -s         # repeated faults, longer traffic

Everything runs on the suite's own broker (conftest), so the broker restart never touches
the session's.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from schemas.client import EmberClient
from tests.reliability.conftest import DEAD_AFTER_S, WORKERS, Broker, Stack
from tests.reliability.harness import (
    FAULT_PROMPT,
    FAULT_TOKENS,
    LONG,
    Row,
    Traffic,
    cmdline,
    report,
)

pytestmark = [pytest.mark.kafka, pytest.mark.reliability, pytest.mark.fault,
              pytest.mark.timeout(1500 if LONG else 400)]

RATE = 4.0  # requests/s: keeps both workers busy without queueing on 2 shared cores
# A request's client-side time-out: a lost request shows as one. Generous, since a streams
# app killed with SIGKILL gives up its partitions only when its group session expires.
TIMEOUT_S = 240.0
SETTLE_S = TIMEOUT_S + 30.0  # the SDK's time-out ends every request before this


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except OSError:
            break
        chain.append(pid)
    return chain


def strays(stack: Stack) -> list[int]:
    """The stack's processes that descend from neither live component."""
    roots = {c.process.pid for c in (stack.local.streams, stack.local.supervisor)
             if c is not None and c.process.poll() is None}
    return [p for p in stack.pids() if p not in roots and not roots & set(_ancestors(p))]


async def no_strays(stack: Stack, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := strays(stack)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    assert not left, "stray processes: " + "; ".join(f"{p}: {cmdline(p)}" for p in left)


async def long_request_streaming(stack: Stack, traffic: Traffic,
                                 timeout_s: float = 120.0) -> tuple[str, str, int]:
    """Send one FAULT_TOKENS-long request and wait until its first chunks reached the client:
    (its request id, the worker streaming it, that worker's pid). It has seconds of decoding
    left, so a fault on that worker now lands mid-generation, whatever the machine's speed."""
    rid = await asyncio.wait_for(traffic.submit(FAULT_PROMPT, FAULT_TOKENS), timeout_s)
    worker_id = await traffic.streaming_on(rid, timeout_s)
    pids = stack.worker_pids()
    assert worker_id in pids, f"{rid} streams from {worker_id}, not a live worker: {pids}"
    return rid, worker_id, pids[worker_id]


# A fault: inject it under traffic; (what it did, when it landed: monotonic s).
Fault = Callable[[Traffic], Awaitable[tuple[str, float]]]


async def run_scenario(
    name: str, stack: Stack, client: EmberClient, references: dict[str, str], faults: list[Fault],
    *, warmup_s: float = 2.5, every_s: float = 10.0, after_s: float = 6.0,
    targets: list[str] | None = None,
) -> Row:
    """Traffic at RATE; `faults` one after another, `every_s` apart and each once the pool
    is whole again, starting after `warmup_s`; traffic goes on until `after_s` past the
    last. Then every outcome, the tables back to idle, the pool back to size, no strays; the
    row is reported (whatever those checks found) and checked. `targets`: the requests the
    faults aimed at (see `caught`)."""
    await stack.steady(timeout_s=120)
    traffic = Traffic(client, stack.model, references, timeout_s=TIMEOUT_S)
    sending = asyncio.create_task(traffic.run(RATE, 24 * 3600))  # until cancelled below
    notes: list[str] = []
    fault_times: list[float] = []
    try:
        await asyncio.sleep(warmup_s)
        for i, fault in enumerate(faults):
            if i:
                await asyncio.sleep(every_s)
                await stack.steady(timeout_s=120)  # the pool is whole again
            note, at = await fault(traffic)
            notes.append(note)
            fault_times.append(at)
        await asyncio.sleep(after_s)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await traffic.settle(SETTLE_S)
    slow_s = traffic.slow_after_s(fault_times[0])
    ends = [*fault_times[1:], math.inf]
    recoveries = [round(traffic.recovery_s(t, slow_s, end), 2)
                  for t, end in zip(fault_times, ends, strict=True)]
    t_idle = time.monotonic()
    recovered: list[str] = []  # what did not recover
    idle_s = None
    try:
        idle_s = round(await stack.idle(timeout_s=90), 2)
        await stack.steady(timeout_s=120)
        await no_strays(stack)
    except AssertionError as exc:
        recovered.append(str(exc))
    extra = {"targets_streamed_again": caught(traffic, targets)} if targets else {}
    row = Row.of(name, traffic, max(recoveries), "; ".join(notes), faults=len(faults),
                 recoveries_s=recoveries, slow_s=round(slow_s, 2),
                 mid_stream=[traffic.mid_stream(t) for t in fault_times],
                 idle_after_traffic_s=idle_s, idle_checked_at=round(t_idle - fault_times[0], 2),
                 not_recovered=recovered, **extra)
    report(row)
    counts = row.extra["counts"]
    assert counts["submitted"] > 0
    assert row.lost == 0, f"{name}: lost {row.lost}: {counts}"
    assert row.duplicates == 0, f"{name}: {row.duplicates} texts differ from greedy: {counts}"
    assert not recovered, f"{name}: did not recover: {recovered}"
    return row


def caught(traffic: Traffic, targets: list[str]) -> list[int]:
    """For each fault's target request: how many times its output started over or came
    again (a replacement worker's stream: restarted, or repeated chunks the SDK dropped)."""
    found = [traffic.outcomes.get(rid) for rid in targets]
    return [-1 if o is None else o.restarts + o.dropped for o in found]


async def test_worker_sigkill_mid_generation(stack: Stack, client, references) -> None:
    targets: list[str] = []

    async def kill(traffic: Traffic) -> tuple[str, float]:
        rid, worker_id, pid = await long_request_streaming(stack, traffic)
        os.kill(pid, signal.SIGKILL)
        at = time.monotonic()
        targets.append(rid)
        return f"SIGKILL {worker_id}", at

    row = await run_scenario("worker SIGKILL mid-generation" + (" x5" if LONG else ""),
                             stack, client, references, [kill] * (5 if LONG else 1),
                             every_s=15.0, targets=targets)
    # Each target was streaming at the client when its worker died (long_request_streaming)
    # and still ended with exactly its greedy text (run_scenario): served again, deduplicated.
    assert min(row.extra["mid_stream"]) >= 1, "a kill caught no request mid-generation"
    again = row.extra["targets_streamed_again"]
    assert all(n >= 1 for n in again), \
        f"a killed request's output did not come again from a replacement: {again}"


async def test_worker_stalls_past_its_heartbeat(stack: Stack, client, references) -> None:
    stall_s = DEAD_AFTER_S + 3.0  # past placement's dead_after_s

    targets: list[str] = []

    async def stall(traffic: Traffic) -> tuple[str, float]:
        rid, worker_id, pid = await long_request_streaming(stack, traffic)
        targets.append(rid)
        os.kill(pid, signal.SIGSTOP)
        at = time.monotonic()
        try:
            await asyncio.sleep(stall_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return f"SIGSTOP {worker_id} {stall_s:g} s, SIGCONT", at

    await run_scenario("worker stalls past heartbeat" + (" x3" if LONG else ""),
                       stack, client, references, [stall] * (3 if LONG else 1), every_s=20.0,
                       after_s=4.0, targets=targets)


async def test_supervisor_sigkill_then_a_new_one(stack: Stack, client, references) -> None:
    async def kill_supervisor(traffic: Traffic) -> tuple[str, float]:
        old = stack.local.supervisor
        assert old is not None
        workers = stack.worker_pids()
        old.process.send_signal(signal.SIGKILL)
        at = time.monotonic()
        await asyncio.to_thread(old.process.wait, 10)
        await asyncio.sleep(1.0)
        stack.restart_supervisor()
        # Its workers got SIGTERM from the kernel (PR_SET_PDEATHSIG): they drain and exit.
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        left = {w: p for w, p in workers.items() if _alive(p)}
        assert not left, f"workers of the killed supervisor still run: {left}"
        return f"SIGKILL supervisor; its {len(workers)} workers drained; a new supervisor", at

    await run_scenario("supervisor SIGKILL + new one" + (" x2" if LONG else ""),
                       stack, client, references, [kill_supervisor] * (2 if LONG else 1),
                       every_s=40.0, after_s=10.0)


async def test_streams_app_restart_under_traffic(stack: Stack, client, references) -> None:
    """SIGTERM (it leaves its group); in the long form also SIGKILL (its partitions move
    only when its group session times out)."""

    def restart(sig: signal.Signals) -> Fault:
        async def fault(traffic: Traffic) -> tuple[str, float]:
            old = stack.local.streams
            assert old is not None
            old.process.send_signal(sig)
            at = time.monotonic()
            await asyncio.to_thread(old.process.wait, 60)
            stack.restart_streams()
            return f"{sig.name} streams app; restarted", at

        return fault

    faults = [restart(signal.SIGTERM), restart(signal.SIGKILL)] if LONG else [
        restart(signal.SIGTERM)]
    await run_scenario("streams app restart" + (" (TERM, KILL)" if LONG else " (TERM)"),
                       stack, client, references, faults, every_s=90.0, after_s=8.0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


async def test_broker_restart_under_traffic(broker: Broker, stack: Stack, client,
                                            references) -> None:
    """Stop the suite's own broker (SIGTERM, clean) under traffic and start it again."""

    async def restart_broker(traffic: Traffic) -> tuple[str, float]:
        at = time.monotonic()
        return f"broker stopped and started in {await broker.restart():.1f} s", at

    await run_scenario("broker restart" + (" x2" if LONG else ""), stack, client, references,
                       [restart_broker] * (2 if LONG else 1), every_s=45.0, after_s=10.0)
