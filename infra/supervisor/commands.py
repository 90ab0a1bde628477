"""`ember supervisor`: run workers for scale decisions until SIGTERM/SIGINT, then drain them.

    ember supervisor --model tiny=models/tiny --prestart 1
    EMBER_MODELS=tiny=models/tiny,llama=/models/llama ember supervisor --log-dir ~/.ember/workers

Exit 0 after a clean stop; 1 with one stderr line when it cannot start (missing topic, bad
catalog entry, no broker).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "supervisor",
        help="start, drain and restart workers as scale decisions say, until SIGTERM (drains)",
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a model it may serve (repeatable; default: EMBER_MODELS, comma-separated)",
    )
    p.add_argument("--prestart", type=int, default=0, metavar="N", help="pre-started processes")
    p.add_argument(
        "--prestart-refill-delay-s",
        type=float,
        default=2.0,
        help="wait before replacing a taken pre-started process (default: 2)",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="worker logs (default: stderr)")
    p.add_argument("--supervisor-id", default=None, help="prefix of worker ids (default: host-pid)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument(
        "--max-decision-age-s",
        type=float,
        default=15.0,
        help="older decisions are stale: not replayed at start, refused (default: 15)",
    )
    p.add_argument("--max-restarts", type=int, default=3, help="per partition, in the window")
    p.add_argument("--restart-window-s", type=float, default=300.0)
    p.add_argument("--restart-backoff-s", type=float, default=1.0, help="doubles per restart")
    w = p.add_argument_group("workers")
    w.add_argument("--max-batch", type=int, default=8)
    w.add_argument("--max-seq-len", type=int, default=None)
    w.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    w.add_argument("--device", default="cpu")
    w.add_argument("--chunk-tokens", type=int, default=8)
    w.add_argument("--chunk-ms", type=int, default=50)
    w.add_argument("--heartbeat-s", type=float, default=1.0)
    p.set_defaults(func=_supervisor)


def _supervisor(args: argparse.Namespace) -> int:
    from gpu_worker.delivery import ChunkPolicy
    from infra.settings import KafkaSettings, SettingsError
    from infra.supervisor import (
        CatalogError,
        LocalProcessBackend,
        ModelCatalog,
        PrestartPool,
        RestartPolicy,
        Supervisor,
        SupervisorConfig,
        SupervisorError,
        WorkerOptions,
    )
    from infra.supervisor.supervisor import default_supervisor_id

    try:
        catalog = ModelCatalog.parse(args.models) if args.models else ModelCatalog.from_env()
        if not catalog.models:
            raise CatalogError("no models: give --model NAME=DIR or set EMBER_MODELS")
        catalog.check()
        kafka = KafkaSettings.from_env()
        restart = RestartPolicy(
            args.max_restarts, args.restart_window_s, args.restart_backoff_s
        )
    except (CatalogError, SettingsError, ValueError) as exc:
        print(f"ember supervisor: {exc}", file=sys.stderr)
        return 1
    config = SupervisorConfig(
        catalog=catalog,
        worker=WorkerOptions(
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            dtype=args.dtype,
            device=args.device,
            chunk=ChunkPolicy(args.chunk_tokens, args.chunk_ms),
            heartbeat_interval_s=args.heartbeat_s,
        ),
        restart=restart,
        drain_timeout_s=args.drain_timeout_s,
        max_decision_age_s=args.max_decision_age_s,
        supervisor_id=args.supervisor_id or default_supervisor_id(),
    )
    pool = None
    if args.prestart > 0:
        pool = PrestartPool(
            args.prestart,
            device=args.device,
            log_dir=args.log_dir,
            refill_delay_s=args.prestart_refill_delay_s,
        )
    backend = LocalProcessBackend(pool=pool, log_dir=args.log_dir)

    async def main() -> int:
        supervisor = Supervisor(config, kafka, backend)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.stop)
        return await supervisor.run()

    try:
        return asyncio.run(main())
    except SupervisorError as exc:
        print(f"ember supervisor: {exc}", file=sys.stderr)
        return 1
