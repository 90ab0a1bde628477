"""CLI commands of the GPU worker package: make-model, local-generate, worker."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-model",
        help="write a deterministic random Llama checkpoint in Hugging Face layout",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--size", choices=("tiny", "medium"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_model)

    p = sub.add_parser("local-generate", help="run the engine on one prompt, without Kafka")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print token ids and text as JSON")
    p.set_defaults(func=_local_generate)

    p = sub.add_parser(
        "worker", help="serve one partition of a model's request topic until SIGTERM (drains)"
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--model", default=None, help="served model name (default: the dir name)")
    p.add_argument("--partition", type=int, default=0)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--max-batch", type=int, default=8, help="KV-cache slots (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-tokens", type=int, default=8, help="tokens per chunk after the first")
    p.add_argument("--chunk-ms", type=int, default=50, help="max wait before a partial chunk")
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.set_defaults(func=_worker)


def _make_model(args: argparse.Namespace) -> int:
    from gpu_worker.make_model import make_model

    out = make_model(args.size, args.out_dir, seed=args.seed)
    print(f"wrote {args.size} model to {out}")
    return 0


def _local_generate(args: argparse.Namespace) -> int:
    from gpu_worker.local_generate import run

    return run(args)


def _worker(args: argparse.Namespace) -> int:
    from gpu_worker.delivery import ChunkPolicy
    from gpu_worker.worker import WorkerConfig, default_worker_id, run_worker
    from infra.settings import KafkaSettings

    config = WorkerConfig(
        model=args.model or args.model_dir.resolve().name,
        model_dir=args.model_dir,
        partition=args.partition,
        worker_id=args.worker_id or default_worker_id(),
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        dtype=args.dtype,
        device=args.device,
        chunk=ChunkPolicy(args.chunk_tokens, args.chunk_ms),
        heartbeat_interval_s=args.heartbeat_s,
    )
    return run_worker(config, KafkaSettings.from_env())
