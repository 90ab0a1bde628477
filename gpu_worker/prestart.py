"""A pre-started worker process: the runtime imported (and on CUDA its context created) before
any model is known, waiting for one assignment. The semi-warm tier between a cold `ember worker`
(interpreter start + `import torch` + runtime imports, seconds) and a ready worker.

    python -m gpu_worker.prestart [--device cpu|cuda[:N]] [--log-level INFO]

The channel is JSON lines, one object per line (no pickle):

    stdout  {"event": "idle", "pid": 4242, "device": "cpu", "cuda_context": false,
             "boot_ms": 4810.3, "boot_policy": "idle", "protocol": 1}  # usable: assign it
    stdin   {"model": "tiny", "model_dir": "/models/tiny", "partition": 3,
             "worker_id": "node1-tiny-p3-7", "max_batch": 8}     # the other WorkerConfig
                                                                 # fields are optional
    stdout  {"event": "assigned", "worker_id": "node1-tiny-p3-7", ...}
       or   {"event": "rejected", "error": "partition: must be an integer >= 0, got -1"}

A rejected assignment leaves the process idle, waiting for the next line. Once assigned it runs
`gpu_worker.worker.run_worker` exactly like `ember worker`, except that its `process` span
starts at the assignment, so the span shows what pre-starting saved. Stdout and stdin are
closed (pointed at /dev/null) once the assignment is acknowledged; logs go to stderr.

Unassigned, it exits 0 on EOF of stdin, SIGTERM or SIGINT. Assigned, SIGTERM drains (finish in
flight, then stop), as for `ember worker`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, TextIO

from gpu_worker.delivery import ChunkPolicy
from gpu_worker.worker import WorkerConfig, now_ms
from infra.logs import configure_logging, get_logger

log = get_logger(__name__)

PROTOCOL_VERSION = 1
MAX_ASSIGNMENT_BYTES = 64 * 1024
DTYPES = ("float32", "bfloat16", "float16")

# Assignment fields: (JSON type(s), may be null). `chunk_tokens` and `chunk_ms` are the two
# fields of WorkerConfig.chunk; every other field has the name of its WorkerConfig field.
REQUIRED = ("model", "model_dir", "partition", "worker_id")
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], bool]] = {
    "model": ((str,), False),
    "model_dir": ((str,), False),
    "partition": ((int,), False),
    "worker_id": ((str,), False),
    "max_batch": ((int,), False),
    "max_seq_len": ((int,), True),
    "dtype": ((str,), True),
    "device": ((str,), False),
    "chunk_tokens": ((int,), False),
    "chunk_ms": ((int,), False),
    "heartbeat_interval_s": ((int, float), False),
    "idle_poll_ms": ((int,), False),
}


class AssignmentError(ValueError):
    """An assignment line that cannot become a WorkerConfig; the message names the field."""


def assignment_for(config: WorkerConfig) -> dict[str, Any]:
    """The assignment (a JSON-ready map) that makes a pre-started process run `config`."""
    return {
        "model": config.model,
        "model_dir": str(Path(config.model_dir).resolve()),
        "partition": config.partition,
        "worker_id": config.worker_id,
        "max_batch": config.max_batch,
        "max_seq_len": config.max_seq_len,
        "dtype": config.dtype,
        "device": config.device,
        "chunk_tokens": config.chunk.max_tokens,
        "chunk_ms": config.chunk.max_delay_ms,
        "heartbeat_interval_s": config.heartbeat_interval_s,
        "idle_poll_ms": config.idle_poll_ms,
    }


def _check_types(value: Mapping[str, Any]) -> None:
    unknown = sorted(set(value) - set(_FIELD_TYPES))
    if unknown:
        raise AssignmentError(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(_FIELD_TYPES)}"
        )
    missing = [name for name in REQUIRED if value.get(name) is None]
    if missing:
        raise AssignmentError(f"missing required field(s) {', '.join(missing)}")
    for name, given in value.items():
        types, nullable = _FIELD_TYPES[name]
        if given is None and nullable:
            continue
        if isinstance(given, bool) or not isinstance(given, types):
            wanted = " or ".join(t.__name__ for t in types) + (" or null" if nullable else "")
            raise AssignmentError(f"{name}: must be {wanted}, got {json.dumps(given)}")


def config_from_assignment(value: Mapping[str, Any], assigned_at_ms: int) -> WorkerConfig:
    """Validate an assignment map; the WorkerConfig whose `process` span starts at
    `assigned_at_ms`."""
    _check_types(value)
    rules = (
        ("partition", value["partition"] >= 0, "an integer >= 0"),
        ("max_batch", value.get("max_batch", 1) >= 1, "an integer >= 1"),
        ("max_seq_len", (value.get("max_seq_len") or 1) >= 1, "an integer >= 1 or null"),
        ("dtype", value.get("dtype") in (None, *DTYPES), f"one of {', '.join(DTYPES)} or null"),
        ("chunk_tokens", value.get("chunk_tokens", 1) >= 1, "an integer >= 1"),
        ("chunk_ms", value.get("chunk_ms", 0) >= 0, "an integer >= 0"),
        ("heartbeat_interval_s", value.get("heartbeat_interval_s", 1) > 0, "a number > 0"),
        ("idle_poll_ms", value.get("idle_poll_ms", 1) >= 1, "an integer >= 1"),
        ("model", value["model"] != "", "a non-empty string"),
        ("worker_id", value["worker_id"] != "", "a non-empty string"),
    )
    for name, ok, wanted in rules:
        if not ok:
            raise AssignmentError(f"{name}: must be {wanted}, got {json.dumps(value.get(name))}")
    model_dir = Path(value["model_dir"])
    if not model_dir.is_dir():
        raise AssignmentError(f"model_dir: {model_dir} is not a directory on this node")
    defaults = {f.name: f.default for f in fields(WorkerConfig)}
    chunk = ChunkPolicy(
        value.get("chunk_tokens", ChunkPolicy.max_tokens),
        value.get("chunk_ms", ChunkPolicy.max_delay_ms),
    )
    return WorkerConfig(
        model=value["model"],
        model_dir=model_dir,
        partition=value["partition"],
        worker_id=value["worker_id"],
        max_batch=value.get("max_batch", defaults["max_batch"]),
        max_seq_len=value.get("max_seq_len"),
        dtype=value.get("dtype"),
        device=value.get("device", defaults["device"]),
        chunk=chunk,
        heartbeat_interval_s=float(value.get("heartbeat_interval_s", 1.0)),
        idle_poll_ms=value.get("idle_poll_ms", defaults["idle_poll_ms"]),
        started_at_ms=assigned_at_ms,
    )


def parse_assignment(line: bytes | str, assigned_at_ms: int) -> WorkerConfig:
    """One line of the channel -> WorkerConfig, or AssignmentError saying what is wrong."""
    if len(line) > MAX_ASSIGNMENT_BYTES:
        raise AssignmentError(f"assignment longer than {MAX_ASSIGNMENT_BYTES} bytes")
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AssignmentError(f"not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise AssignmentError(f"must be a JSON object, got {type(value).__name__}")
    return config_from_assignment(value, assigned_at_ms)


def at_idle_priority(fun: Callable[[], None]) -> str:
    """Run `fun` in a thread of its own scheduled SCHED_IDLE, and wait for it: it runs on CPU
    nobody else wants, and any normal thread that wakes up takes the core from it at once.
    Returns the policy it ran under: "idle", or "normal" where that is not possible (not
    Linux, whose scheduling attributes are per thread, or refused). Exceptions of `fun` are
    raised here. Threads `fun` starts inherit the policy."""
    policy, failure = ["normal"], []

    def run() -> None:
        if sys.platform.startswith("linux") and hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE,
                                      os.sched_param(0))
                policy[0] = "idle"
            except OSError as exc:
                log.warning("could not lower the boot thread's priority", error=str(exc))
        try:
            fun()
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)

    # a daemon: a signal that ends an unassigned process does not wait for the imports
    thread = threading.Thread(target=run, name="prestart-boot", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return policy[0]


def preload(device: str, idle_boot: bool = True) -> tuple[bool, str | None, str]:
    """Import torch and the runtime; on CUDA create the context. Returns (cuda_context, why
    not, the imports' scheduling policy) so a machine without CUDA still gets a usable
    (CPU-warm) process.

    With `idle_boot` the imports (seconds of CPU) run at idle priority (`at_idle_priority`):
    a pool refilled while workers serve takes the CPU they leave over instead of slowing their
    steps. What serving uses later is started here, at this thread's priority: numpy's BLAS
    threads (started by its import, so numpy is imported first), torch's thread pool (the
    first op) and the CUDA context."""
    import numpy  # noqa: F401

    def imports() -> None:
        import torch  # noqa: F401

        from gpu_worker.worker import import_runtime

        import_runtime()

    if idle_boot:
        policy = at_idle_priority(imports)
    else:
        imports()
        policy = "normal"
    import torch

    (torch.ones(4, 4) @ torch.ones(4, 4)).sum().item()  # first op: dispatcher, thread pool
    if not device.startswith("cuda"):
        return False, None, policy
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is false", policy
    try:
        torch.zeros(1, device=device)  # creates the context on that device
        torch.cuda.synchronize(device)
    except (RuntimeError, AssertionError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:300], policy
    return True, None, policy


def _announce(out: TextIO, event: str, **fields: Any) -> None:
    out.write(json.dumps({"event": event, **fields}) + "\n")
    out.flush()


def _exit_unassigned(signum: int, _frame: Any) -> NoReturn:
    log.info("prestart stopped while unassigned", signal=signal.Signals(signum).name)
    raise SystemExit(0)


def wait_for_assignment(source: BinaryIO, out: TextIO) -> WorkerConfig | None:
    """Read lines until one is a valid assignment (None at EOF). Each line is answered with
    `assigned` or `rejected` on `out`."""
    while True:
        line = source.readline(MAX_ASSIGNMENT_BYTES + 1)
        if not line:
            return None
        if not line.strip():
            continue
        try:
            config = parse_assignment(line, now_ms())
        except AssignmentError as exc:
            log.warning("assignment rejected", error=str(exc))
            _announce(out, "rejected", error=str(exc))
            continue
        _announce(
            out,
            "assigned",
            worker_id=config.worker_id,
            model=config.model,
            partition=config.partition,
        )
        return config


def _detach_channel() -> None:
    """Point stdin and stdout at /dev/null: the owner stops reading once we are assigned."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    from gpu_worker.worker import process_started_at_ms, run_worker
    from infra.settings import KafkaSettings

    parser = argparse.ArgumentParser(prog="python -m gpu_worker.prestart", description=__doc__)
    parser.add_argument("--device", default="cpu", help="preload for this device (default: cpu)")
    parser.add_argument(
        "--normal-boot", action="store_true",
        help="import the runtime at normal priority (default: idle priority, on Linux)",
    )
    parser.add_argument("--log-level", default=os.environ.get("EMBER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    configure_logging("prestart", args.log_level)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_unassigned)
    kafka = KafkaSettings.from_env()  # a bad setting fails now, not after the assignment

    cuda_context, why_not, boot_policy = preload(args.device, not args.normal_boot)
    boot_ms = time.time() * 1000 - process_started_at_ms()
    if why_not:
        log.warning("no CUDA context pre-created", device=args.device, reason=why_not)
    log.info("prestart idle", device=args.device, cuda_context=cuda_context, boot_ms=boot_ms,
             boot_policy=boot_policy)
    _announce(
        sys.stdout,
        "idle",
        pid=os.getpid(),
        device=args.device,
        cuda_context=cuda_context,
        boot_ms=round(boot_ms, 1),
        boot_policy=boot_policy,
        protocol=PROTOCOL_VERSION,
    )

    config = wait_for_assignment(sys.stdin.buffer, sys.stdout)
    if config is None:
        log.info("prestart stopped while unassigned", reason="end of input")
        return 0
    _detach_channel()
    log.info(
        "prestart assigned",
        worker_id=config.worker_id,
        model=config.model,
        partition=config.partition,
    )
    # From here on this is `ember worker`: run_worker replaces the signal handlers (SIGTERM
    # drains). A signal in the few ms before it does still exits 0, before any event is sent.
    return run_worker(config, kafka)


if __name__ == "__main__":
    sys.exit(main())
