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


def _make_model(args: argparse.Namespace) -> int:
    from gpu_worker.make_model import make_model

    out = make_model(args.size, args.out_dir, seed=args.seed)
    print(f"wrote {args.size} model to {out}")
    return 0


def _local_generate(args: argparse.Namespace) -> int:
    from gpu_worker.local_generate import run

    return run(args)
