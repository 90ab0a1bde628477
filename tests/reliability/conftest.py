"""Fixtures of the reliability suite: the tiny model and its greedy texts, a Kafka broker of
the suite's own, and one Ember stack (`infra.stack.LocalStack`: `ember streams` + `ember
supervisor` with two always-on workers) that the fault, fuzz and load tests share. All are
package-scoped: they stop when this package's tests are done, not at the end of the session.

The broker is private (free ports, its own EMBER_HOME, the jar cache shared), not the
session's: the broker-restart scenario restarts it, and every `ember streams` on a broker
reads all of `ember.requests` and rejects the models it does not serve (`unknown_model`), so
another control plane on a shared broker would answer this suite's requests first.

Every process of a stack carries EMBER_RELIABILITY_RUN=<id> in its environment (workers
inherit it from the supervisor), so `harness.pids_with_env` finds all of them, however they
were started, and the stack's teardown fails when one outlives `stop()`.

Short form by default (CI, a few minutes); EMBER_RELIABILITY=long for `make reliability`.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from infra.broker import BrokerSettings, LocalBroker
from infra.settings import KafkaSettings
from infra.stack import LocalStack, StackConfig
from infra.topics import apply_topics
from schemas.client import EmberClient, Timeouts
from schemas.topics import core_topics
from tests.reliability.harness import (
    FAULT_PROMPT,
    FAULT_TOKENS,
    LENGTHS,
    PROMPTS,
    cmdline,
    greedy_texts,
    models_view,
    pids_with_env,
    wait_idle_tables,
)

WORKERS = 2  # always-on pool: a fault on one leaves the other serving
# Placement declares a silent worker dead after this. Its default (5 s) gave false alarms
# here: with the broker, the app, the supervisor, two workers and the client on 2 shared
# cores, a healthy worker's heartbeats (every 0.5 s) went unseen for over 5 s.
DEAD_AFTER_S = 10.0
HEARTBEAT_S = 0.5
# A scale-up no supervisor carried out (it was down) is presumed lost after this and decided
# again; the default (60 s) is sized for 7B cold starts, the tiny model starts in seconds.
LAUNCH_GRACE_S = 20.0


# Ports other brokers on this machine are configured with (the default one and its
# controller, the usual alternatives): free now, they may be bound later, so never ours.
_TAKEN = {9092, 9093, 19092, 19093, 29092, 29093, 39092, 39093}


def _free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _TAKEN:
            return port


@dataclass
class Broker:
    local: LocalBroker
    kafka: KafkaSettings

    async def restart(self, down_s: float = 2.0) -> float:
        """Stop (SIGTERM, clean), wait `down_s`, start; seconds it took."""
        t0 = time.monotonic()
        await asyncio.to_thread(self.local.stop)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.local.start)
        return time.monotonic() - t0


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def broker(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Broker]:
    """A broker of the suite's own, with Ember's core topics."""
    shared = BrokerSettings.from_env()
    settings = BrokerSettings(
        home=tmp_path_factory.mktemp("reliability-broker"), cache=shared.cache,
        port=_free_port(), controller_port=_free_port(), heap="384m", start_timeout_s=120.0,
    )
    local = LocalBroker(settings)
    await asyncio.to_thread(local.start)
    try:
        kafka = settings.kafka_settings()
        await apply_topics(kafka, core_topics())
        yield Broker(local, kafka)
    finally:
        await asyncio.to_thread(local.stop)


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.make_model import make_model

    return make_model("tiny", tmp_path_factory.mktemp("reliability-models") / "tiny")


@pytest.fixture(scope="package")
def references(tiny_model: Path) -> dict[tuple[str, int], str]:
    return {**greedy_texts(tiny_model, PROMPTS, LENGTHS),
            **greedy_texts(tiny_model, [FAULT_PROMPT], [FAULT_TOKENS])}


def stack_config(model: str, model_dir: Path, marker: str, log_dir: Path,
                 **streams: Any) -> StackConfig:
    """Two always-on workers of `model`, fast heartbeats and dead-worker detection."""
    placement = {"dead_after_s": DEAD_AFTER_S, **streams.pop("placement", {})}
    return StackConfig(
        models={model: model_dir},
        policy="always_on",
        streams_config={
            "autoscaler": {"workers": WORKERS},
            "models": {model: {"slots": 8, "placement": placement,
                               "scaling": {"launch_grace_s": LAUNCH_GRACE_S}, **streams}},
        },
        prestart=1,
        max_batch=8,
        drain_timeout_s=15.0,
        supervisor_args=("--heartbeat-s", str(HEARTBEAT_S), "--restart-backoff-s", "0.5"),
        # One torch thread per worker, and OpenMP threads that sleep rather than spin while
        # waiting: two workers on two cores otherwise oversubscribe them (see
        # benchmarks/decode_throughput.py on OMP_WAIT_POLICY).
        env={"EMBER_RELIABILITY_RUN": marker, "OMP_NUM_THREADS": "1",
             "OMP_WAIT_POLICY": "PASSIVE"},
        log_dir=log_dir,
        log_level="INFO",
    )


@dataclass
class Stack:
    """A running LocalStack, what it serves and how to find its processes."""

    local: LocalStack
    model: str
    model_dir: Path
    marker: str  # EMBER_RELIABILITY_RUN=<id>
    kafka: KafkaSettings
    supervisors: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def web(self) -> str:
        return self.local.web_url

    def view(self) -> dict[str, Any] | None:
        return models_view(self.web, self.model)

    def pids(self) -> list[int]:
        return pids_with_env(self.marker)

    def worker_pids(self) -> dict[str, int]:
        """Live workers by worker id: a worker's stderr is `<log_dir>/workers/<id>.log`
        (a pre-started process's log is renamed so when it is assigned)."""
        found = {}
        workers_dir = self.local.log_dir / "workers"
        for pid in self.pids():
            try:
                target = Path(_readlink(f"/proc/{pid}/fd/2"))
            except OSError:
                continue
            if target.parent == workers_dir and not target.name.startswith("prestart-"):
                found[target.stem] = pid
        return found

    async def ready_workers(self, n: int = WORKERS, timeout_s: float = 120.0) -> list[dict]:
        """Wait until the tables show `n` ready workers; their views."""
        deadline = time.monotonic() + timeout_s
        view = None
        while time.monotonic() < deadline:
            view = await asyncio.to_thread(self.view)
            if view is not None:
                ready = [w for w in view["workers"] if w["state"] == "ready"]
                if len(ready) >= n:
                    return ready
            await asyncio.sleep(0.5)
        raise AssertionError(f"{n} ready workers not within {timeout_s} s: "
                             f"{None if view is None else view['warm_pool']}")

    async def steady(self, timeout_s: float = 120.0, hold_s: float = 2.0) -> None:
        """Wait until the pool is whole: at least WORKERS workers, all ready (none starting
        or draining), each a live process, for `hold_s` on end. (After a crash it can be one
        more for a while: the supervisor restarts the crashed worker and the autoscaler,
        seeing one short, starts another; the extra is released once it is idle.)"""
        deadline = time.monotonic() + timeout_s
        since = None
        view = None
        while time.monotonic() < deadline:
            view = await asyncio.to_thread(self.view)
            states = [w["state"] for w in view["workers"]] if view is not None else []
            ok = (len(states) >= WORKERS and set(states) == {"ready"}
                  and len(self.worker_pids()) == len(states))
            if not ok:
                since = None
            elif since is None:
                since = time.monotonic()
            elif time.monotonic() - since >= hold_s:
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"pool not whole ({WORKERS}+ ready) within {timeout_s} s: "
                             f"{None if view is None else view['workers']}, "
                             f"processes {self.worker_pids()}")

    async def idle(self, timeout_s: float = 60.0) -> float:
        return await wait_idle_tables(self.web, self.model, timeout_s)

    def restart_supervisor(self) -> None:
        """A new `ember supervisor` in place of the current one (dead or alive), with a
        supervisor id of its own (worker ids embed it; they must stay unique)."""
        self.supervisors += 1
        argv = self.local.supervisor_argv()
        at = argv.index("--supervisor-id") + 1
        argv[at] = f"{argv[at]}-{self.supervisors}"
        self.local.supervisor = self.local._spawn("supervisor", argv)

    def restart_streams(self) -> None:
        """A new `ember streams` of the same group in place of the current one."""
        self.local.streams = self.local._spawn("streams", self.local.streams_argv())

    def stop_and_check_orphans(self) -> None:
        """Stop the stack; AssertionError naming any process of it still alive after 10 s."""
        self.local.stop()
        deadline = time.monotonic() + 10
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, "orphaned processes: " + "; ".join(
            f"{pid}: {cmdline(pid)}" for pid in left
        )


def _readlink(path: str) -> str:
    import os

    return os.readlink(path)


async def start_stack(kafka: KafkaSettings, model_dir: Path, log_dir: Path,
                      name: str) -> Stack:
    run = uuid.uuid4().hex[:8]
    model = f"rel-{name}-{run}"
    marker = f"rel-{run}"
    local = LocalStack(stack_config(model, model_dir, marker, log_dir), kafka)
    await local.start()
    stack = Stack(local, model, model_dir, f"EMBER_RELIABILITY_RUN={marker}", kafka)
    try:
        await stack.ready_workers()
    except BaseException:
        local.stop()
        raise
    return stack


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def stack(
    broker: Broker, tiny_model: Path, references: dict[tuple[str, int], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """The shared stack on the suite's broker; stopped at the end with no process left.
    (The greedy references are computed first: torch here competes with the workers.)"""
    s = await start_stack(broker.kafka, tiny_model,
                          tmp_path_factory.mktemp("reliability-stack"), "main")
    try:
        yield s
    finally:
        s.stop_and_check_orphans()
        await s.local.delete_group_topics()


@pytest_asyncio.fixture(scope="package", loop_scope="session")
async def client(stack: Stack) -> AsyncIterator[EmberClient]:
    """One client with a private reply topic for the suite's valid traffic."""
    async with EmberClient.private(
        stack.kafka, f"rel-{uuid.uuid4().hex[:8]}", Timeouts(total_s=120.0)
    ) as c:
        yield c
