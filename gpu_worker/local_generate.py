"""`ember local-generate MODEL_DIR --prompt TEXT`: one prompt through the engine, no Kafka.

Streams the text to stdout as it is generated; with `--json` prints one object instead:
{"token_ids", "text", "finish_reason", "prompt_tokens", "completion_tokens", "seed",
 "timings": {"load_s", "engine_s", "ttft_s", "decode_tokens_per_s", "total_s"}}.
With a temperature above 0 and no `--seed`, a seed is drawn and reported, so any run can be
repeated exactly.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time


def run(args: argparse.Namespace) -> int:
    import torch

    from gpu_worker.engine import Engine, RequestRejected, SamplingParams
    from gpu_worker.model import DTYPES, UnsupportedModelError
    from gpu_worker.tokenizer import Tokenizer, TokenizerError
    from gpu_worker.weights import WeightsError, load_model

    started = time.perf_counter()
    seed = args.seed
    if seed is None and args.temperature > 0:
        seed = secrets.randbits(63)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=seed,
            stop=tuple(args.stop),
        )
        device = torch.device(args.device)
        model = load_model(
            args.model_dir, dtype=DTYPES[args.dtype] if args.dtype else None, device=device
        )
        tokenizer = Tokenizer.from_dir(args.model_dir)
        loaded = time.perf_counter()
        prompt_ids = tokenizer.encode(args.prompt)
        context = model.config.max_position_embeddings
        # Size the KV cache for this one request, not for the model's whole context.
        max_seq_len = min(context, max(2, len(prompt_ids) + args.max_tokens))
        engine = Engine(
            model, tokenizer, max_batch=1, max_seq_len=max_seq_len, cuda_graph_batch_sizes=(1,)
        )
        ready = time.perf_counter()
        outputs = []
        for out in engine.generate(prompt_ids, params):
            outputs.append(out)
            if not args.json and out.text:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    except (RequestRejected, WeightsError, TokenizerError, UnsupportedModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = time.perf_counter()

    last = outputs[-1]
    if last.finish_reason == "error":
        print(f"error: {last.error}", file=sys.stderr)
        return 1
    token_ids = [t for o in outputs for t in o.token_ids]
    if not args.json:
        sys.stdout.write("\n")
        return 0
    decode_s = last.elapsed_s - (last.ttft_s or 0.0)
    result = {
        "token_ids": token_ids,
        "text": "".join(o.text for o in outputs),
        "finish_reason": last.finish_reason,
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "seed": seed,
        "timings": {
            "load_s": round(loaded - started, 4),
            "engine_s": round(ready - loaded, 4),
            "ttft_s": None if last.ttft_s is None else round(last.ttft_s, 4),
            "decode_tokens_per_s": (
                round((len(token_ids) - 1) / decode_s, 2) if len(token_ids) > 1 and decode_s > 0
                else None
            ),
            "total_s": round(done - started, 4),
        },
    }
    print(json.dumps(result, ensure_ascii=False))
    return 0
