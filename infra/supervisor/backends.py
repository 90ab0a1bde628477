"""Where workers run. The supervisor speaks to a `WorkerBackend`; `LocalProcessBackend` runs
workers as local processes, taking a pre-started one from a `PrestartPool` when it has one.

Every worker process leads its own process group (session): drain and kill signal the whole
group, and after a worker exits its group is killed too, so nothing it spawned outlives it.
Each child also gets PR_SET_PDEATHSIG=SIGTERM (Linux): if the supervisor itself is killed, its
workers drain and exit instead of running on unowned. Call `start` and `maintain` from one
long-lived thread (the supervisor's event loop): the death signal follows the spawning thread.

Kubernetes (not implemented; the interface is shaped for it):

| WorkerBackend      | Kubernetes                                                              |
|--------------------|-------------------------------------------------------------------------|
| start(config)      | create a Pod named after worker_id, labels `ember.model`,               |
|                    | `ember.partition`; container `ember worker DIR --model M --partition P   |
|                    | --worker-id W ...`; `nvidia.com/gpu: 1`; model dir from a node-local     |
|                    | volume (shard cache); ownerReferences -> the supervisor's own Pod so     |
|                    | garbage collection removes orphans                                      |
| PrestartPool       | a few Pods running `python -m gpu_worker.prestart` with `stdin: true,    |
|                    | stdinOnce: true`; the assignment line is written through the Pod's       |
|                    | `attach` subresource; the Pod is then relabelled with its worker id     |
| drain(handle)      | delete the Pod with gracePeriodSeconds = drain timeout (kubelet sends   |
|                    | SIGTERM, then SIGKILL when the grace period ends)                       |
| kill(handle)       | delete the Pod with gracePeriodSeconds = 0                              |
| poll(handle)       | Pod phase: Pending/Running -> running; Succeeded/Failed -> exited with   |
|                    | containerStatuses[0].state.terminated.exitCode (a deleted Pod: -9)      |
| maintain()         | reconcile the prestart Pods to the pool size                             |
| close()            | delete the prestart Pods                                                 |

`restartPolicy: Never`: restarts stay the supervisor's decision (new worker id, same partition).
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from gpu_worker.prestart import assignment_for
from gpu_worker.worker import WorkerConfig
from infra.logs import get_logger

log = get_logger(__name__)

WorkerSource = Literal["fresh", "prestarted"]


class BackendError(RuntimeError):
    """A worker could not be started; the message says why and what to check."""


@dataclass(frozen=True)
class WorkerStatus:
    running: bool
    exit_code: int | None = None  # set once exited; negative: killed by that signal

    @classmethod
    def exited(cls, code: int) -> WorkerStatus:
        return cls(False, code)


RUNNING = WorkerStatus(True)


class WorkerHandle(Protocol):
    @property
    def worker_id(self) -> str: ...

    @property
    def source(self) -> WorkerSource: ...


class WorkerBackend(Protocol):
    """Starts, drains, kills and watches workers. Calls never block for long (milliseconds)."""

    def start(self, config: WorkerConfig) -> WorkerHandle:
        """Launch a worker serving `config` (model, model_dir, partition, worker_id, ...).
        Raises BackendError when it cannot."""
        ...

    def drain(self, handle: WorkerHandle) -> None:
        """Ask it to finish what it has in flight and exit (SIGTERM)."""
        ...

    def kill(self, handle: WorkerHandle) -> None:
        """Stop it now (SIGKILL)."""
        ...

    def poll(self, handle: WorkerHandle) -> WorkerStatus: ...

    def maintain(self) -> None:
        """Periodic housekeeping, e.g. refill a pre-started pool."""
        ...

    def close(self) -> None:
        """Release what the backend holds besides workers (pre-started processes)."""
        ...


# -- process helpers ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _death_signal_setter() -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when its parent dies (Linux). The
    libc function is resolved here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    sig = int(signal.SIGTERM)

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_death_signal


_SET_DEATH_SIGNAL = _death_signal_setter()


def spawn(
    argv: list[str],
    *,
    env: Mapping[str, str] | None,
    stdin: int | None,
    stdout: int | IO[Any] | None,
    stderr: IO[Any] | None,
) -> subprocess.Popen[bytes]:
    """A child in its own session (its pid is its process group id) that dies with us."""
    return subprocess.Popen(  # noqa: S603 (argv built here, no shell)
        argv,
        env=dict(env) if env is not None else None,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_SET_DEATH_SIGNAL,  # noqa: PLW1509 (pre-resolved libc call only)
        close_fds=True,
    )


def signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's whole process group (no-op once it is gone)."""
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(process: subprocess.Popen[bytes]) -> int | None:
    """Exit code if the child has exited, else None. Before reaping, kills whatever is left of
    its process group: the group id cannot be reused while the exited child is unreaped."""
    if process.returncode is not None:
        return process.returncode
    try:
        exited = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped already (Popen.poll reports it)
        return process.poll()
    if exited is None:
        return None
    signal_group(process, signal.SIGKILL)
    return process.wait()


def open_log(log_dir: Path | None, name: str) -> IO[bytes] | None:
    if log_dir is None:
        return None  # inherit the supervisor's stderr
    log_dir.mkdir(parents=True, exist_ok=True)
    return open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed when the worker is reaped)


def worker_argv(config: WorkerConfig, python: str = sys.executable) -> list[str]:
    """The `ember worker` command line that serves `config`."""
    argv = [
        python, "-m", "infra.cli", "worker", str(config.model_dir),
        "--model", config.model,
        "--partition", str(config.partition),
        "--worker-id", config.worker_id,
        "--max-batch", str(config.max_batch),
        "--device", config.device,
        "--chunk-tokens", str(config.chunk.max_tokens),
        "--chunk-ms", str(config.chunk.max_delay_ms),
        "--heartbeat-s", str(config.heartbeat_interval_s),
    ]  # fmt: skip
    if config.max_seq_len is not None:
        argv += ["--max-seq-len", str(config.max_seq_len)]
    if config.dtype is not None:
        argv += ["--dtype", config.dtype]
    return argv


# -- the pre-started pool ------------------------------------------------------------------


@dataclass
class PrestartProcess:
    """One `python -m gpu_worker.prestart` child and what it has said on stdout."""

    process: subprocess.Popen[bytes]
    spawned_at: float
    log_path: Path | None
    log_file: IO[bytes] | None
    idle: threading.Event = field(default_factory=threading.Event)
    replies: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    boot_ms: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_stdout(self) -> None:
        """Thread body: each JSON line of the child's stdout, until EOF."""
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                log.warning("prestart wrote a line that is not JSON", pid=self.pid)
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "idle":
                self.boot_ms = event.get("boot_ms")
                self.idle.set()
            else:
                self.replies.put(event)

    def assign(self, config: WorkerConfig, timeout_s: float) -> bool:
        """Send the assignment; True once the child acknowledged it."""
        assert self.process.stdin is not None
        line = json.dumps(assignment_for(config)) + "\n"
        try:
            self.process.stdin.write(line.encode())
            self.process.stdin.flush()
            reply = self.replies.get(timeout=timeout_s)
        except (BrokenPipeError, OSError, queue.Empty) as exc:
            log.warning("prestart did not take the assignment", pid=self.pid, error=repr(exc))
            return False
        if reply.get("event") != "assigned":
            log.error("prestart rejected the assignment", pid=self.pid, error=reply.get("error"))
            return False
        self.process.stdin.close()
        if self.log_path is not None:  # its log becomes the worker's log
            self.log_path.rename(self.log_path.with_name(f"{config.worker_id}.log"))
        return True

    def close(self) -> None:
        if self.log_file is not None:
            self.log_file.close()


class PrestartPool:
    """Keeps `size` pre-started processes booting or idle. `take` hands out an idle one and
    `maintain` spawns its replacement `refill_delay_s` later, so the replacement's imports
    (CPU-bound, seconds) do not compete with the taken one while it loads its model: on 2
    shared cores a tiny model's assignment-to-ready went from 0.2 s to 2.2 s with an immediate
    refill. The replacement imports the runtime at idle priority
    (`gpu_worker.prestart.preload`), so it does not slow the steps of serving workers either.
    A process that dies before it is idle is replaced after a back-off (1 s, doubling to 60 s)
    so a broken environment does not spin."""

    def __init__(
        self,
        size: int,
        *,
        device: str = "cpu",
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
        refill_delay_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size < 0:
            raise ValueError(f"prestart pool size must be >= 0, got {size}")
        self.size = size
        self.device = device
        self.refill_delay_s = refill_delay_s
        self._python = python
        self._env = env
        self._log_dir = log_dir
        self._clock = clock
        self._members: list[PrestartProcess] = []
        self._failures = 0
        self._next_spawn_at = 0.0

    @property
    def idle_count(self) -> int:
        return sum(1 for m in self._members if m.idle.is_set() and m.process.poll() is None)

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self._members]

    def maintain(self) -> None:
        """Reap members that died, then spawn up to `size`."""
        now = self._clock()
        for member in list(self._members):
            code = reap(member.process)
            if code is None:
                continue
            self._members.remove(member)
            member.close()
            if not member.idle.is_set():
                self._failures += 1
                self._next_spawn_at = now + min(60.0, 2.0 ** (self._failures - 1))
            log.warning(
                "prestart process exited",
                pid=member.pid,
                code=code,
                booted=member.idle.is_set(),
                log=str(member.log_path) if member.log_path else None,
            )
        while len(self._members) < self.size and now >= self._next_spawn_at:
            self._members.append(self._spawn(now))

    def _spawn(self, now: float) -> PrestartProcess:
        argv = [self._python, "-m", "gpu_worker.prestart", "--device", self.device]
        log_file = open_log(self._log_dir, f"prestart-{time.time_ns()}")
        process = spawn(
            argv, env=self._env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file
        )
        log_path = None
        if log_file is not None:  # name it after the pid, now that there is one
            old = Path(log_file.name)
            log_path = old.with_name(f"prestart-{process.pid}.log")
            old.rename(log_path)
        member = PrestartProcess(process, now, log_path, log_file)
        threading.Thread(
            target=member.read_stdout, name=f"prestart-{process.pid}", daemon=True
        ).start()
        log.info("prestart process spawned", pid=process.pid, device=self.device)
        return member

    def take(self, config: WorkerConfig, timeout_s: float = 5.0) -> PrestartProcess | None:
        """An idle member assigned `config`, or None (none idle, other device, or it failed to
        take the assignment: that member is killed)."""
        if config.device != self.device:
            return None
        for member in list(self._members):
            if not member.idle.is_set() or member.process.poll() is not None:
                continue
            self._members.remove(member)
            if member.assign(config, timeout_s):
                self._failures = 0
                refill_at = self._clock() + self.refill_delay_s
                self._next_spawn_at = max(self._next_spawn_at, refill_at)
                return member
            signal_group(member.process, signal.SIGKILL)
            member.process.wait()
            member.close()
        return None

    def close(self, timeout_s: float = 10.0) -> None:
        """SIGTERM to every member (unassigned, even while booting, it exits 0), then SIGKILL
        what is left after `timeout_s`."""
        for member in self._members:
            signal_group(member.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for member in self._members:
            try:
                member.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("prestart process ignored SIGTERM; killing it", pid=member.pid)
            if member.process.stdin is not None:
                try:
                    member.process.stdin.close()
                except OSError:
                    pass
            signal_group(member.process, signal.SIGKILL)
            member.process.wait()
            member.close()
        self._members.clear()


# -- local processes -------------------------------------------------------------------------


@dataclass
class LocalWorker:
    worker_id: str
    process: subprocess.Popen[bytes]
    source: WorkerSource
    log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalProcessBackend:
    """Workers as local processes: a pre-started one when the pool has one idle for the
    device, else a fresh `ember worker`. Worker logs go to `log_dir/<worker_id>.log`, or to
    the supervisor's stderr when `log_dir` is None."""

    def __init__(
        self,
        *,
        pool: PrestartPool | None = None,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.pool = pool
        self._python = python
        self._env = env
        self._log_dir = log_dir

    def start(self, config: WorkerConfig) -> LocalWorker:
        if self.pool is not None:
            member = self.pool.take(config)
            if member is not None:
                log.info(
                    "worker from the prestart pool", worker_id=config.worker_id, pid=member.pid
                )
                return LocalWorker(config.worker_id, member.process, "prestarted", member.log_file)
        log_file = open_log(self._log_dir, config.worker_id)
        try:
            process = spawn(
                worker_argv(config, self._python),
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        except OSError as exc:
            if log_file is not None:
                log_file.close()
            raise BackendError(
                f"cannot start `ember worker` with {self._python}: {exc}; check that the "
                "interpreter exists and has ember installed"
            ) from exc
        log.info("worker spawned", worker_id=config.worker_id, pid=process.pid)
        return LocalWorker(config.worker_id, process, "fresh", log_file)

    def drain(self, handle: WorkerHandle) -> None:
        signal_group(_local(handle).process, signal.SIGTERM)

    def kill(self, handle: WorkerHandle) -> None:
        signal_group(_local(handle).process, signal.SIGKILL)

    def poll(self, handle: WorkerHandle) -> WorkerStatus:
        worker = _local(handle)
        code = reap(worker.process)
        if code is None:
            return RUNNING
        if worker.log_file is not None:
            worker.log_file.close()
        return WorkerStatus.exited(code)

    def maintain(self) -> None:
        if self.pool is not None:
            self.pool.maintain()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _local(handle: WorkerHandle) -> LocalWorker:
    if not isinstance(handle, LocalWorker):
        raise TypeError(f"LocalProcessBackend got a {type(handle).__name__} handle")
    return handle
