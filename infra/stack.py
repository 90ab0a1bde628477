"""A local Ember stack for the demo, the benchmarks and end-to-end tests: `ember streams` and
`ember supervisor` as child processes, started, probed until they really work, and stopped
with nothing left behind.

One control plane per broker: every `ember streams` reads `ember.requests`, and one that does
not serve a request's model rejects it (`unknown_model`); point EMBER_BOOTSTRAP_SERVERS at a
broker of your own when others run Ember on the shared one.

    config = StackConfig(models={"tiny": Path("models/tiny")}, policy="ember_predictive",
                         streams_config={"models": {"tiny": {"slots": 8}}}, prestart=1)
    async with LocalStack(config) as stack:     # returns once both components run
        print(stack.web_url)                    # http://127.0.0.1:<port>
        ...                                     # EmberClient(...).generate("tiny", ...)
    # both stopped: SIGTERM, wait, then SIGKILL of each process group and of what they started

Ready means: the streams app's consumers read `ember.requests` from its end (a request for a
model nobody serves gets its `rejected` chunk back, the probe of tests/streams/test_app_kafka.py,
and the app's /metrics counted it)
and the supervisor logged `supervisor ready` (it reads `ember.decisions`), and (by default) its
pre-started processes are idle with the runtime imported.

Each component runs in its own session (process group) and gets SIGKILL when this process
dies (Linux: PR_SET_PDEATHSIG, as the supervisor does for its workers). `stop()` is
synchronous and idempotent: SIGTERM to each component (the supervisor drains its workers, the
streams app leaves its group), a bounded wait, then SIGKILL to the group and to every
descendant seen before the SIGTERM (workers live in sessions of their own). It runs from
`__aexit__` whether the body finished, raised or was cancelled (Ctrl-C under asyncio.run), and
from `atexit` as a last resort. Spawn the stack from the main thread: a death signal fires
when the spawning thread exits.

Each stack uses a fresh Faust group (`ember-stack-<run>`, reading from the topics' ends), so
nothing a previous run left in ember.requests is replayed; its Faust topics (changelogs,
`<group>-deferred`) are deleted at stop unless `keep_group_topics`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from infra.settings import KafkaSettings
from infra.supervisor.backends import spawn

ROOT = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """The stack could not start; the message names the component and ends with its log."""


@dataclass(frozen=True)
class StackConfig:
    """What to run.

    models: served models, name -> checkpoint directory (the supervisor's catalog; the
    streams app serves the same names). policy: the autoscaler policy. streams_config: the
    EMBER_STREAMS_CONFIG document (per-model slots, admission / placement / scaling fields,
    autoscaler tuning), written to `<log_dir>/streams.json`. prestart: the supervisor's
    pre-started pool (`wait_prestart`: start() also waits until each has imported the runtime
    and is idle, so the first cold start takes one). tick_s: the streams timer (placement and
    autoscaler). max_batch: batch slots of each worker. supervisor_args: more `ember
    supervisor` options. env: more environment for both components. log_dir: where the logs
    go (a fresh temporary directory when None)."""

    models: Mapping[str, Path]
    policy: str = "ember_predictive"
    streams_config: Mapping[str, Any] = field(default_factory=dict)
    prestart: int = 1
    tick_s: float = 0.5
    max_batch: int = 8
    drain_timeout_s: float = 15.0
    max_decision_age_s: float = 3.0
    supervisor_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    log_level: str = "INFO"
    group: str | None = None
    web_port: int | None = None
    keep_group_topics: bool = False
    wait_prestart: bool = True
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0


@dataclass
class _Component:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalStack:
    """`ember streams` + `ember supervisor` for `config`; see the module docstring."""

    def __init__(self, config: StackConfig, kafka: KafkaSettings | None = None) -> None:
        self.config = config
        self.kafka = kafka or KafkaSettings.from_env()
        self.run_id = uuid.uuid4().hex[:8]
        self.group = config.group or f"ember-stack-{self.run_id}"
        self.web_port = config.web_port or free_port()
        self.web_url = f"http://127.0.0.1:{self.web_port}"
        if config.log_dir is None:
            import tempfile

            self.log_dir = Path(tempfile.mkdtemp(prefix=f"ember-stack-{self.run_id}-"))
        else:
            self.log_dir = config.log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.streams: _Component | None = None
        self.supervisor: _Component | None = None
        self._stopped = False
        self._earlier_logs: set[Path] = set()
        self.started_at: float | None = None
        self.ready_at: float | None = None

    # -- start -------------------------------------------------------------------------------

    async def __aenter__(self) -> LocalStack:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if not self.config.keep_group_topics:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.delete_group_topics(), 15)

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "EMBER_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "EMBER_LOG_LEVEL": self.config.log_level,
            "PYTHONUNBUFFERED": "1",
            **self.config.env,
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        return env

    def _spawn(self, name: str, argv: list[str]) -> _Component:
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")
        process = spawn(argv, env=self._env(), stdin=subprocess.DEVNULL, stdout=log_file,
                        stderr=log_file)
        return _Component(name, process, log_path, log_file)

    def streams_argv(self) -> list[str]:
        config_path = self.log_dir / "streams.json"
        config_path.write_text(json.dumps(self.config.streams_config, indent=1))
        argv = [sys.executable, "-m", "infra.cli", "--log-level", self.config.log_level,
                "streams", "--policy", self.config.policy, "--config", str(config_path),
                "--group", self.group, "--store", "memory://", "--web-port", str(self.web_port),
                "--tick-s", str(self.config.tick_s), "--offset-reset", "latest"]
        for model in self.config.models:
            argv += ["--model", model]
        return argv

    def supervisor_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "infra.cli", "--log-level", self.config.log_level,
                "supervisor", "--prestart", str(self.config.prestart),
                "--log-dir", str(self.log_dir / "workers"),
                "--supervisor-id", f"stack-{self.run_id}",
                "--max-batch", str(self.config.max_batch),
                "--drain-timeout-s", str(self.config.drain_timeout_s),
                "--max-decision-age-s", str(self.config.max_decision_age_s),
                *self.config.supervisor_args]
        for model, model_dir in self.config.models.items():
            argv += ["--model", f"{model}={Path(model_dir).resolve()}"]
        return argv

    async def start(self) -> None:
        """Start both components and return once they work; StackError (everything stopped)
        when one exits or is not ready within `start_timeout_s`."""
        from infra.topics import apply_topics
        from schemas.topics import all_topics

        self.started_at = time.monotonic()
        self._earlier_logs = set((self.log_dir / "workers").glob("prestart-*.log"))  # a reused dir
        # Before either starts: the supervisor refuses to start without its model topics.
        await apply_topics(self.kafka, all_topics(tuple(self.config.models)))
        atexit.register(self.stop)
        try:
            self.streams = self._spawn("streams", self.streams_argv())
            self.supervisor = self._spawn("supervisor", self.supervisor_argv())
            deadline = time.monotonic() + self.config.start_timeout_s
            await self._wait_supervisor(deadline)
            await self._probe_streams(deadline)
            if self.config.wait_prestart:
                await self._wait_prestart(deadline)
        except BaseException:
            self.stop()
            raise
        self.ready_at = time.monotonic()

    def _check_alive(self) -> None:
        for c in (self.streams, self.supervisor):
            if c is not None and c.process.poll() is not None:
                raise StackError(
                    f"ember {c.name} exited with code {c.process.returncode} while starting "
                    f"({c.log_path}):\n{tail(c.log_path)}"
                )

    def _timeout(self, what: str, component: _Component | None) -> StackError:
        log = "" if component is None else f" ({component.log_path}):\n{tail(component.log_path)}"
        return StackError(f"{what} not within {self.config.start_timeout_s:.0f} s{log}")

    async def _wait_supervisor(self, deadline: float) -> None:
        assert self.supervisor is not None
        while b'"supervisor ready"' not in self.supervisor.log_path.read_bytes():
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._timeout("ember supervisor ready", self.supervisor)
            await asyncio.sleep(0.2)

    async def _wait_prestart(self, deadline: float) -> None:
        workers = self.log_dir / "workers"
        while True:
            idle = [
                p
                for p in workers.glob("prestart-*.log")
                if p not in self._earlier_logs and b'"prestart idle"' in p.read_bytes()
            ]
            if len(idle) >= self.config.prestart:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise self._timeout(f"{self.config.prestart} pre-started process(es)", None)
            await asyncio.sleep(0.2)

    async def _probe_streams(self, deadline: float) -> None:
        """Until a request for an unserved model comes back `rejected` and this app's /metrics
        counted the rejection (another control plane on the broker would reject it too):
        admission's consumer has its partitions and reads from their end (requests sent
        earlier are skipped)."""
        from schemas.client import EmberClient, RequestRejected

        probe_model = f"ember-stack-probe-{self.run_id}"
        async with EmberClient(self.kafka, client_id=f"stack-probe-{self.run_id}") as client:
            while True:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise self._timeout("ember streams reading its topics", self.streams)
                before = await asyncio.to_thread(self._unknown_model_rejections)
                handle = await client.generate(probe_model, "probe", max_tokens=1)
                try:  # no client time-out: it would log and send a cancel
                    await asyncio.wait_for(handle.result(), 2.0)
                except RequestRejected:
                    if await asyncio.to_thread(self._unknown_model_rejections) > before:
                        return
                except asyncio.TimeoutError:
                    continue  # sent before admission read from the end; the client drops it

    def _unknown_model_rejections(self) -> float:
        """This app's count of `unknown_model` rejections (/metrics); -1 when unreachable."""
        import urllib.request

        try:
            with urllib.request.urlopen(self.web_url + "/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return -1.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ember_admission_total{") and 'code="unknown_model"' in line
        )

    # -- while running -----------------------------------------------------------------------

    def running(self) -> bool:
        return all(
            c is not None and c.process.poll() is None for c in (self.streams, self.supervisor)
        )

    def get_json(self, path: str, timeout_s: float = 5.0) -> Any:
        """GET the streams app's `path` (e.g. /ember/models/) as JSON."""
        import urllib.request

        with urllib.request.urlopen(self.web_url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop both components and everything they started: the streams app first, so no
        decision is published after the supervisor is gone (a supervisor started within its
        `max_decision_age_s` would act on it), then the supervisor, which drains its workers
        (requests already placed finish). Safe to call twice and from atexit."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        components = [c for c in (self.streams, self.supervisor) if c is not None]
        seen = {c.name: _descendants(c.process.pid) for c in components}
        for c in components:
            _terminate(c, self.config.stop_timeout_s, seen[c.name])

    async def delete_group_topics(self) -> None:
        """The Faust topics of this stack's group: changelogs and `<group>-deferred`."""
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(**self.kafka.aiokafka_kwargs())
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(f"{self.group}-")]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()


def _terminate(c: _Component, timeout_s: float, descendants: list[tuple[int, str]]) -> None:
    """SIGTERM the component, wait up to `timeout_s`, then SIGKILL its group; then SIGKILL
    whatever is left of `descendants` (pid, start time) and their groups."""
    if c.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            c.process.send_signal(signal.SIGTERM)
        try:
            c.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(c.process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        c.process.wait(5)
    for pid, started in descendants:
        if _start_time(pid) != started:  # gone (or the pid was reused)
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    c.log_file.close()


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if fields[0] != "Z" else None


def _descendants(root: int) -> list[tuple[int, str]]:
    """Every live process under `root` as (pid, start time), from /proc (empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is not None:
            found.append((pid, started))
        todo += children.get(pid, [])
    return found
