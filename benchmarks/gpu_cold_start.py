"""GPU cold-start benchmark: a 7B-shaped random Llama in bf16, built here (no downloads), packed,
then loaded and served. One run, under 8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_cold_start.py                     # CUDA, 7B shape
    python benchmarks/gpu_cold_start.py --shape tiny --device cpu   # the CPU check (tests)

Measures:
  * the machine's paths: page-cache read of the packed shards (dd-like, 16 MiB reads), pinned
    host-to-device copy bandwidth (256 MiB copies), and, with root, a cold-page-cache read;
  * loader GB/s (read, copy, total) for the packed artifact, next to those limits, verified and
    unverified;
  * the cold-start breakdown in this process (torch and the CUDA context already up, as in a
    pre-started worker): snapshot restore, weights, engine build (KV cache + CUDA graph capture,
    graph capture timed on its own), warm-up, ready, first token; and the same for a fresh
    process (`ember cold-start-dry-run --json`), and for the plain HF checkpoint;
  * decode tokens/s at batch 1, 8 and 32 (CUDA graphs), 16-token prompts, 64 new tokens each.

Writes gpu_cold_start.json and gpu_cold_start.md to --out-dir (default: $OUT if set, else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cold_start import read_reused  # noqa: E402  (dd-like read, GB/s)

GB = 1e9
MiB = 1 << 20

SHAPES = {
    # Llama-2-7B: 6.74 B parameters, 13.5 GB in bf16
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}
PROMPT_TOKENS = 16
NEW_TOKENS = 64


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---- a random checkpoint in Hugging Face layout ------------------------------------------------


def write_checkpoint(out: Path, shape: str, device: str, dtype: str, clock: Clock) -> Path:
    """config.json, tokenizer files, safetensors shards (about 4 GB each) of a random Llama."""
    import torch
    from safetensors.torch import save_file

    from gpu_worker.make_model import BOS, EOS, train_tokenizer
    from gpu_worker.model import ModelConfig
    from gpu_worker.weights import build_meta_model, ember_to_hf_name, expected_shapes

    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(512, 3000, seed=0)  # small vocabulary; embedding rows past it are padding
    tok.save(str(out / "tokenizer.json"))
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape],
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": bos, "eos_token_id": eos,
              "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    shapes = expected_shapes(build_meta_model(ModelConfig.from_hf(config)))
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, Any] = {}
    shard_bytes, n = 0, 0
    total = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=torch_dtype).itemsize

    def flush() -> None:
        nonlocal shard, shard_bytes, n
        if shard:
            n += 1
            file = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            clock.log(f"checkpoint shard {file}: {shard_bytes / 1e9:.2f} GB")
            shard, shard_bytes = {}, 0

    for name, s in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(s, dtype=torch_dtype)
        else:
            t = torch.empty(s, dtype=torch_dtype, device=device).normal_(0, 0.02, generator=gen)
            t = t.cpu()
        shard[ember_to_hf_name(name)] = t
        shard_bytes += t.nbytes
        if shard_bytes >= 4 << 30:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


# ---- path limits -------------------------------------------------------------------------------


def h2d_bandwidth(device: str, nbytes: int = 256 * MiB, repeats: int = 8) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes * repeats / (time.perf_counter() - t0) / GB


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# ---- measurements ------------------------------------------------------------------------------


def timed_graph_capture() -> dict[str, float]:
    """Wrap ModelRunner._capture_cuda_graphs to time it on its own."""
    from gpu_worker.engine import ModelRunner

    seen: dict[str, float] = {}
    original = ModelRunner._capture_cuda_graphs

    def capture(self: Any, sizes: Any) -> None:
        t0 = time.perf_counter()
        original(self, sizes)
        seen["seconds"] = time.perf_counter() - t0
        seen["captured"] = len(self._graphs)

    ModelRunner._capture_cuda_graphs = capture  # type: ignore[method-assign]
    return seen


def cold_start_here(path: Path, device: str, max_batch: int, max_seq_len: int,
                    verify: bool = True) -> dict[str, Any]:
    import torch

    from gpu_worker.loader import cold_start
    from gpu_worker.spans import SpanRecorder

    spans = SpanRecorder()
    run = cold_start(path, device=device, max_batch=max_batch, max_seq_len=max_seq_len,
                     spans=spans, verify=verify)
    result = {"ttft_s": run.ttft_s, "spans": [s.to_json() for s in spans.spans],
              "engine": run.runtime.engine}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return result


def decode_throughput(engine: Any, batch: int) -> dict[str, float]:
    from gpu_worker.engine import EngineRequest
    from gpu_worker.sampling import SamplingParams

    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for i in range(batch):
        ids = [(7 * i + j) % 500 + 1 for j in range(PROMPT_TOKENS)]
        engine.add_request(EngineRequest(f"b{batch}-{i}", prompt_ids=ids, params=params))
    engine.step()  # prefill (and first token) for all
    sync(engine.device)
    t0 = time.perf_counter()
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    sync(engine.device)
    seconds = time.perf_counter() - t0
    tokens = batch * (NEW_TOKENS - 1)
    return {"batch": batch, "tokens_per_s": tokens / seconds, "step_ms": seconds / steps * 1e3}


def fresh_process(path: Path, device: str, max_batch: int, max_seq_len: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING", "cold-start-dry-run",
           str(path), "--device", device, "--max-batch", str(max_batch), "--max-seq-len",
           str(max_seq_len), "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    first = next(s for s in result["spans"] if s["name"] == "first_token")
    return {"ttft_s": (first["start_ms"] + first["duration_ms"]) / 1e3, "spans": result["spans"]}


def loader_runs(packed: Path, device: str, repeats: int) -> dict[str, Any]:
    import torch

    from gpu_worker.loader import open_artifact, stream_weights
    from gpu_worker.weights import build_meta_model

    artifact = open_artifact(packed)
    out: dict[str, list[dict[str, float]]] = {"verified": [], "unverified": []}
    for _ in range(repeats):
        for key, verify in (("verified", True), ("unverified", False)):
            model = build_meta_model(artifact.index.config())
            r = stream_weights(artifact, model, device, verify=verify)
            out[key].append({"total_gbps": r.total_gbps, "read_gbps": r.read_gbps,
                             "copy_gbps": r.copy_gbps, "verify_gbps": r.verify_gbps,
                             "seconds": r.seconds["total"]})
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in out.items()}


# ---- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ember-gpu-cold-start"))
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    parser.add_argument("--out-dir", type=Path, default=default_out)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=450, help="skip optional parts after")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and artifact")
    args = parser.parse_args()

    import torch

    from gpu_worker.pack import pack

    clock = Clock(args.budget_s)
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available (use --device cpu --shape tiny)", file=sys.stderr)
        return 2
    if torch.device(device).type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, as a pre-started worker has it
    result: dict[str, Any] = {
        "shape": args.shape, "device": device, "dtype": args.dtype, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "max_batch": args.max_batch, "max_seq_len": args.max_seq_len,
    }
    work = args.work_dir
    hf = write_checkpoint(work / f"hf-{args.shape}", args.shape, device, args.dtype, clock)
    result["checkpoint_s"] = clock.elapsed()
    clock.log("packing")
    t0 = time.perf_counter()
    packed_result = pack(hf, work / f"packed-{args.shape}", args.dtype)
    result["pack"] = {"seconds": time.perf_counter() - t0,
                      "bytes": packed_result.index.total_bytes,
                      "shards": len(packed_result.index.shards),
                      "write_s": packed_result.write_seconds,
                      "verify_s": packed_result.verify_seconds}
    packed = packed_result.out_dir
    shards = [packed / s.file for s in packed_result.index.shards]

    clock.log("path limits")
    read_reused(shards)  # into the page cache (pack's verification dropped it)
    result["limits"] = {
        "page_cache_read_gbps": statistics.median(read_reused(shards) for _ in range(2)),
        "pinned_h2d_gbps": h2d_bandwidth(device),
    }

    clock.log("loader runs")
    result["loader"] = loader_runs(packed, device, args.repeats)

    clock.log("cold start in this process (runtime imported, CUDA context up)")
    capture = timed_graph_capture()
    here = cold_start_here(packed, device, args.max_batch, args.max_seq_len)
    engine = here.pop("engine")
    result["cold_start_here"] = here
    result["graph_capture"] = dict(capture)

    clock.log("decode throughput")
    result["decode"] = [decode_throughput(engine, b) for b in (1, 8, 32) if b <= args.max_batch]
    del engine
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()

    if clock.left() > 90:
        clock.log("fresh process, packed artifact")
        result["cold_start_fresh_process"] = fresh_process(
            packed, device, args.max_batch, args.max_seq_len)
    if clock.left() > 90:
        clock.log("plain HF checkpoint, this process")
        hf_run = cold_start_here(hf, device, args.max_batch, args.max_seq_len)
        hf_run.pop("engine")
        result["cold_start_hf_here"] = hf_run
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    if clock.left() > 60 and drop_page_cache():
        clock.log("packed artifact, page cache dropped")
        result["limits"]["cold_read_gbps"] = read_reused(shards[:2])
        drop_page_cache()
        cold = cold_start_here(packed, device, args.max_batch, args.max_seq_len)
        cold.pop("engine")
        result["cold_start_cold_page_cache"] = cold
    result["seconds"] = clock.elapsed()
    if not args.keep:
        shutil.rmtree(packed, ignore_errors=True)
        shutil.rmtree(hf, ignore_errors=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_cold_start.json").write_text(json.dumps(result, indent=1) + "\n")
    md = render(result, " ".join(sys.argv))
    (args.out_dir / "gpu_cold_start.md").write_text(md)
    print(md)
    return 0


def _span(spans: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((s for s in spans if s["name"] == name), None)


def render(r: dict[str, Any], command: str) -> str:
    lim, L = r["limits"], r["loader"]
    lines = [
        f"# GPU cold start: {r['shape']}-shaped random Llama, {r['dtype']}, {r['device']} "
        f"({r['gpu'] or 'no GPU'})",
        "",
        f"Command: `{command}`; torch {r['torch']}; total {r['seconds']:.0f} s.",
        "",
        f"Packed {r['pack']['bytes'] / 1e9:.2f} GB into {r['pack']['shards']} shards in "
        f"{r['pack']['seconds']:.1f} s (write {r['pack']['write_s']:.1f} s, read-back verify "
        f"{r['pack']['verify_s']:.1f} s).",
        "",
        "## Loader against the path",
        "",
        "| measurement | GB/s |",
        "|---|---|",
        f"| page-cache read, 16 MiB sequential reads | {lim['page_cache_read_gbps']:.2f} |",
    ]
    if lim.get("pinned_h2d_gbps"):
        lines.append(f"| pinned host-to-device copy | {lim['pinned_h2d_gbps']:.2f} |")
    if lim.get("cold_read_gbps"):
        lines.append(f"| cold-page-cache read | {lim['cold_read_gbps']:.2f} |")
    for key in ("verified", "unverified"):
        x = L[key]
        lines.append(f"| loader {key}: total (read {x['read_gbps']:.2f}, copy {x['copy_gbps']:.2f},"
                     f" checksum {x['verify_gbps']:.2f} per worker) | {x['total_gbps']:.2f} |")
    limit = min(v for v in (lim["page_cache_read_gbps"], lim.get("pinned_h2d_gbps")) if v)
    lines += [
        "",
        f"Loader / min(read, H2D) limit: verified **{L['verified']['total_gbps'] / limit:.0%}**, "
        f"unverified **{L['unverified']['total_gbps'] / limit:.0%}**.",
        "",
        "## Cold-start breakdown (ms)",
        "",
    ]
    runs = [("this process (pre-started: runtime + CUDA context up)", "cold_start_here"),
            ("fresh process (`ember cold-start-dry-run`)", "cold_start_fresh_process"),
            ("plain HF checkpoint, this process", "cold_start_hf_here"),
            ("packed, page cache dropped, this process", "cold_start_cold_page_cache")]
    names = ["process_ready", "snapshot_restore", "tokenizer_load", "weights_available",
             "engine_build", "warm_up", "runtime_ready", "first_token"]
    lines.append("| run | " + " | ".join(names) + " | TTFT | weights GB/s |")
    lines.append("|---" * (len(names) + 3) + "|")
    for label, key in runs:
        run = r.get(key)
        if not run or "spans" not in run:
            continue
        cells = []
        for n in names:
            s = _span(run["spans"], n)
            cells.append(f"{s['duration_ms']:.0f}" if s else "")
        w = _span(run["spans"], "weights_available")
        gbps = w["attrs"].get("gbps") if w else None
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {run['ttft_s'] * 1e3:.0f} | "
                     f"{gbps if gbps is not None else ''} |")
    g = r.get("graph_capture") or {}
    lines += [
        "",
        f"CUDA graph capture: {g.get('seconds', 0) * 1e3:.0f} ms for {g.get('captured', 0)} "
        "decode batch sizes (inside engine_build)." if g else "CUDA graphs: none (not CUDA).",
        "",
        "## Decode",
        "",
        "| batch | tokens/s | ms/step |",
        "|---|---|---|",
    ]
    for d in r["decode"]:
        lines.append(f"| {d['batch']} | {d['tokens_per_s']:.1f} | {d['step_ms']:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
