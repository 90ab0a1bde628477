"""CLI commands of the GPU worker package: make-model, pack, local-generate, cold-start-dry-run,
worker."""

from __future__ import annotations

import argparse
import sys
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

    p = sub.add_parser(
        "pack", help="turn a Hugging Face checkpoint into a startup-optimized packed artifact"
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default=None,
        help="serving dtype the weights are cast to (default: the checkpoint's)",
    )
    p.add_argument("--max-shard-mb", type=int, default=512, help="shard size bound (MiB)")
    p.add_argument(
        "--block-digest", choices=("crc32", "sha256"), default="crc32",
        help="per-block checksum the loader verifies on every load (default: crc32)",
    )
    p.set_defaults(func=_pack)

    p = sub.add_parser(
        "cold-start-dry-run",
        help="run a worker's cold path locally (no Kafka) to a first token; print its spans",
    )
    p.add_argument("path", type=Path, help="packed artifact or Hugging Face checkpoint dir")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--no-verify", action="store_true", help="skip per-block checksums")
    p.add_argument("--json", action="store_true", help="print the spans as JSON")
    p.set_defaults(func=_cold_start_dry_run)

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


def _pack(args: argparse.Namespace) -> int:
    from gpu_worker.pack import pack
    from gpu_worker.weights import WeightsError

    try:
        result = pack(
            args.model_dir, args.out_dir, args.dtype, max_shard_bytes=args.max_shard_mb << 20,
            block_digest_name=args.block_digest,
        )
    except WeightsError as exc:  # ArtifactError, PackError, a bad checkpoint
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index = result.index
    print(
        f"packed {len(index.tensors)} tensors ({index.dtype}, {index.total_bytes / 1e9:.2f} GB, "
        f"{len(index.shards)} shards) to {result.out_dir} in {result.seconds:.1f} s"
    )
    return 0


def _cold_start_dry_run(args: argparse.Namespace) -> int:
    from gpu_worker.spans import SpanRecorder, process_start_unix_s

    spans = SpanRecorder(origin_unix_s=process_start_unix_s())
    import json

    from gpu_worker.loader import cold_start
    from gpu_worker.tokenizer import TokenizerError
    from gpu_worker.weights import WeightsError

    try:
        run = cold_start(
            args.path, prompt=args.prompt, device=args.device, dtype=args.dtype,
            max_batch=args.max_batch, max_seq_len=args.max_seq_len, verify=not args.no_verify,
            spans=spans,
        )
    except (WeightsError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({
            "path": str(args.path), "packed": run.runtime.packed,
            "first_token_ids": run.first_token_ids,
            "spans": [s.to_json() for s in spans.spans],
        }))
        return 0
    kind = "packed artifact" if run.runtime.packed else "Hugging Face checkpoint"
    print(f"cold start of {args.path} ({kind}) on {args.device}, origin: process start")
    print(spans.table())
    print(f"first token after {run.ttft_s * 1e3:.1f} ms")
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
