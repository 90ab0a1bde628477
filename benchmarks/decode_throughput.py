"""Decode throughput: Ember's `Engine` against Hugging Face `transformers` `generate`, side by side.

One run, one checkpoint (the generated "medium" Llama, ~1 GB in float32, by default), the same
torch threads for both. For each repeat and each batch size the two engines run back to back
(their order alternating between repeats), so both see the same machine noise; the memcpy
bandwidth is sampled in every repeat as well.

What is timed: decode only. Both engines report a timestamp each time a step's tokens are out
(Ember: after `Engine.step()` returns; transformers: a streamer's `put`, called by `generate`
after each step's tokens are picked). The first token comes from the prefill, so
decode tokens/s = batch * (N - 1) / (t[token N] - t[token 1]) for N new tokens per request;
the time from start to token 1 is reported separately as prefill. Both runs are greedy,
fp32, run all N tokens (Ember `ignore_eos=True`; transformers `min_new_tokens=N`) and start
from the same equal-length prompts, so they do the same matmuls.

The bandwidth bound: a batch-1 decode step reads every weight once (the embedding table only
as one row), so tokens/s <= bandwidth / weight bytes. Bandwidth is a ~1 GB `Tensor.copy_`
counted as read + write (2 x size per copy), the median of all samples.

    .venv/bin/python benchmarks/decode_throughput.py                 # medium, ~5-10 min
    .venv/bin/python benchmarks/decode_throughput.py --size tiny     # smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP workers sleep instead of spinning. On a shared,
# oversubscribed machine spinning workers take the cores the working ones need and every parallel
# region waits for a descheduled thread (a decode step ran 3-10x slower). Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ENGINES = ("ember", "transformers")
BANDWIDTH_BYTES = 1 << 30  # source tensor of the copy; as many bytes are written


def progress(msg: str) -> None:
    print(f"[decode-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- one measurement ----------------------------------------------------------------------------


@dataclass
class Run:
    """One generation of N tokens for a batch; `stamps[i]`: seconds after start when token i+1
    of every row was out; `cpu_stamps[i]`: CPU seconds the process had used by then (all threads)."""

    engine: str
    batch: int
    repeat: int
    stamps: list[float]
    cpu_stamps: list[float]
    tokens: list[list[int]] = field(repr=False)

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[0]

    @property
    def decode_tok_s(self) -> float:  # aggregate over the batch
        return self.batch * (len(self.stamps) - 1) / self.decode_s

    @property
    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def steady_tok_s(self) -> float:
        """batch / median step time: tokens/s with bursts of machine noise left out."""
        return self.batch / statistics.median(self.step_s)

    @property
    def cpu_tok_s(self) -> float:
        """Tokens per CPU-second: the work done, whatever share of the cores the machine gave us."""
        return self.batch * (len(self.stamps) - 1) / (self.cpu_stamps[-1] - self.cpu_stamps[0])

    @property
    def cpu_step_s(self) -> float:
        return (self.cpu_stamps[-1] - self.cpu_stamps[0]) / (len(self.stamps) - 1)

    @property
    def prefill_s(self) -> float:
        return self.stamps[0]


class StepClock:
    """Wall and process CPU time at each step, relative to construction; `put` and `end` make it
    a transformers streamer (generate calls `put` with the prompt, then once per step)."""

    def __init__(self, on_step: Callable[[], None] = lambda: None) -> None:
        self.on_step = on_step
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def put(self, value=None) -> None:
        self.stamps.append(time.perf_counter() - self.start)
        self.cpu_stamps.append(time.process_time() - self.cpu_start)
        self.on_step()

    def end(self) -> None:
        pass


def run_ember(
    engine, prompts: list[list[int]], n_tokens: int, on_step: Callable[[], None] = lambda: None
) -> tuple[StepClock, list[list[int]]]:
    from gpu_worker.engine import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=n_tokens, ignore_eos=True)  # greedy
    clock = StepClock(on_step)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"bench-{i}", prompt_ids=prompt, params=params))
    tokens: dict[str, list[int]] = {f"bench-{i}": [] for i in range(len(prompts))}
    while engine.has_work():
        outs = engine.step()
        clock.put()
        for out in outs:
            tokens[out.request_id].extend(out.token_ids)
    return clock, [tokens[f"bench-{i}"] for i in range(len(prompts))]


def run_transformers(
    model, prompts: list[list[int]], n_tokens: int, pad_id: int,
    on_step: Callable[[], None] = lambda: None,
) -> tuple[StepClock, list[list[int]]]:
    ids = torch.tensor(prompts)  # [B, S], equal lengths: no padding
    clock = StepClock(on_step)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            streamer=clock,
        )
    del clock.stamps[0], clock.cpu_stamps[0]  # the prompt's put
    if len(clock.stamps) != n_tokens:
        raise RuntimeError(f"transformers streamed {len(clock.stamps)} steps, expected {n_tokens}")
    return clock, out[:, ids.shape[1]:].tolist()


def copy_bandwidth(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Bytes per second of one `dst.copy_(src)`, counting the read and the write."""
    start = time.perf_counter()
    dst.copy_(src)
    return 2 * src.nbytes / (time.perf_counter() - start)


def read_bandwidth(src: torch.Tensor) -> float:
    """Bytes per second of one `src.sum()`: a read-only stream, for comparison."""
    start = time.perf_counter()
    src.sum()
    return src.nbytes / (time.perf_counter() - start)


# What one decode step spends its time on, by op (self time). The rest of the wall time is
# outside tensor ops: Python in the engine or in generate, module calls, dispatch, the profiler.
OP_GROUPS = (
    ("matmul (aten::mm, addmm, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention (scaled_dot_product_attention kernels)", ("scaled_dot_product",)),
    ("KV cache write / grow (index_put_, cat)", ("index_put", "aten::cat")),
)


def profile_decode(run: Callable[[Callable[[], None]], StepClock], skip_first: int, steps: int) -> dict:
    """Profile only the decode steps of one run: `run(on_step)` calls `on_step` once per token
    (after `skip_first` setup calls); the prefill step is warm-up, the next `steps` are recorded."""
    from torch.profiler import ProfilerActivity, profile, schedule

    captured = {}

    def ready(prof) -> None:
        captured["events"] = prof.key_averages()

    with profile(
        activities=[ProfilerActivity.CPU],
        schedule=schedule(skip_first=skip_first, wait=0, warmup=1, active=steps, repeat=1),
        on_trace_ready=ready,
    ) as prof:
        clock = run(prof.step)
    wall_us = (clock.stamps[-1] - clock.stamps[0]) * 1e6
    cpu_us = (clock.cpu_stamps[-1] - clock.cpu_stamps[0]) * 1e6
    groups = {name: 0.0 for name, _ in OP_GROUPS}
    groups["other tensor ops (norms, rope, silu, mul, add, views, argmax, ...)"] = 0.0
    ops_us = 0.0
    top: list[tuple[str, float]] = []
    for evt in captured.get("events", []):
        if evt.key.startswith("ProfilerStep"):
            continue
        self_us = evt.self_cpu_time_total
        ops_us += self_us
        top.append((evt.key, self_us))
        for name, keys in OP_GROUPS:
            if any(k in evt.key for k in keys):
                groups[name] += self_us
                break
        else:
            groups["other tensor ops (norms, rope, silu, mul, add, views, argmax, ...)"] += self_us
    groups["outside tensor ops (Python: engine / generate loop, module calls, profiler)"] = max(0.0, wall_us - ops_us)
    return {
        "step_ms": wall_us / steps / 1e3,
        "cpu_step_ms": cpu_us / steps / 1e3,
        "groups_ms": {k: v / steps / 1e3 for k, v in groups.items()},
        "ops_ms": {k: v / steps / 1e3 for k, v in top},
    }


def mean_profile(profiles: Sequence[dict]) -> dict:
    """Per-step figures averaged over profiled runs; the 8 ops with the most self time."""
    n = len(profiles)
    ops: dict[str, float] = {}
    for p in profiles:
        for k, v in p["ops_ms"].items():
            ops[k] = ops.get(k, 0.0) + v / n
    return {
        "runs": n,
        "step_ms": sum(p["step_ms"] for p in profiles) / n,
        "cpu_step_ms": sum(p["cpu_step_ms"] for p in profiles) / n,
        "groups_ms": {k: sum(p["groups_ms"][k] for p in profiles) / n for k in profiles[0]["groups_ms"]},
        "top_ops_ms": sorted(ops.items(), key=lambda kv: -kv[1])[:8],
    }


# ---- model facts ---------------------------------------------------------------------------------


def weight_bytes_per_step(model) -> dict[str, int]:
    """Bytes of weights one batch-1 decode step reads: every parameter once, except the
    embedding table, of which only the looked-up row is read (unless it is tied to lm_head)."""
    params = {id(p): p for p in model.parameters()}  # tied weights once
    total = sum(p.numel() * p.element_size() for p in params.values())
    emb = model.tok_embeddings.weight
    tied = model.output.weight is emb
    emb_bytes = emb.numel() * emb.element_size()
    row = emb.shape[1] * emb.element_size()
    per_step = total if tied else total - emb_bytes + row
    return {
        "parameters": sum(p.numel() for p in params.values()),
        "parameter_bytes": total,
        "embedding_bytes": emb_bytes,
        "per_step_bytes": per_step,
    }


def kv_bytes_per_position(config, elt: int) -> int:
    """K and V bytes read per cached position and request, all layers."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * elt


# ---- statistics ----------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def slow_p95_rate(xs: Sequence[float]) -> float:
    """The p95 of a rate: 95% of samples are at least this fast (the 5th percentile)."""
    return float(np.percentile(xs, 5))


def p95(xs: Sequence[float]) -> float:
    return float(np.percentile(xs, 95))


# ---- machine -------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    import transformers

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "torch_threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _display_path(path: Path) -> str:
    """Relative to the repository root when inside it (results are committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---- the benchmark -------------------------------------------------------------------------------


def ensure_model(size: str, model_dir: Path) -> Path:
    if (model_dir / "config.json").is_file():
        return model_dir
    from gpu_worker.make_model import make_model

    progress(f"generating the {size} model into {model_dir} (once; later runs reuse it)")
    return make_model(size, model_dir, progress=True)


def make_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Equal-length prompts of random ids below the special tokens (the last two ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab - 2, (batch, prompt_len), generator=g).tolist()


def benchmark(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from gpu_worker.engine import Engine
    from gpu_worker.weights import load_model, read_generation_config

    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > default_threads():
        progress(
            f"warning: load average {load:.1f} on {default_threads()} cores: the machine is "
            "oversubscribed, absolute figures will be noisy (ratios are paired per repeat)"
        )
    model_dir = ensure_model(args.size, args.model_dir)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    progress(f"loading {model_dir} for Ember and for transformers; torch threads {threads}")
    ember_model = load_model(model_dir)
    dtype = ember_model.tok_embeddings.weight.dtype
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    config = ember_model.config
    eos = read_generation_config(model_dir)
    pad_id = eos[0] if eos else 0
    batches = sorted(set(args.batch_sizes))
    engine = Engine(
        ember_model, max_batch=max(batches), max_seq_len=args.prompt_len + args.tokens,
        eos_token_ids=eos,
    )
    prompts = {b: make_prompts(b, args.prompt_len, config.vocab_size) for b in batches}
    weights = weight_bytes_per_step(ember_model)

    def measure(name: str, b: int, n: int) -> tuple[StepClock, list[list[int]]]:
        gc.collect()
        if name == "ember":
            return run_ember(engine, prompts[b], n)
        return run_transformers(hf_model, prompts[b], n, pad_id)

    progress("warm-up: every engine and batch size once")
    for b in batches:
        for name in ENGINES:
            measure(name, b, min(args.tokens, 4))

    n_elems = max(1, (BANDWIDTH_BYTES if args.size != "tiny" else 1 << 26) // 4)
    src = torch.ones(n_elems, dtype=torch.float32)
    dst = torch.zeros_like(src)  # written once: no page faults in the timed copies
    copy_bw: list[float] = [copy_bandwidth(src, dst)]  # warm-up sample, dropped below
    read_bw: list[float] = [read_bandwidth(src)]
    copy_bw.clear()
    read_bw.clear()

    runs: list[Run] = []
    load_before = load_average()
    started = time.perf_counter()
    for r in range(args.repeats):
        order = ENGINES if r % 2 == 0 else ENGINES[::-1]
        for b in batches:
            for name in order:
                clock, tokens = measure(name, b, args.tokens)
                run = Run(name, b, r, clock.stamps, clock.cpu_stamps, tokens)
                runs.append(run)
                progress(
                    f"repeat {r + 1}/{args.repeats} batch {b:>2} {name:<12} "
                    f"{run.decode_tok_s:8.1f} tok/s  {median(run.step_s) * 1e3:7.1f} ms/step  "
                    f"{run.cpu_step_s * 1e3:7.1f} CPU-ms/step"
                )
        for _ in range(args.bandwidth_samples):
            copy_bw.append(copy_bandwidth(src, dst))
            read_bw.append(read_bandwidth(src))
        progress(f"repeat {r + 1}/{args.repeats} memcpy {median(copy_bw[-args.bandwidth_samples:]) / 1e9:.2f} GB/s")
    elapsed = time.perf_counter() - started
    del src, dst

    profiles: dict[str, dict[str, dict]] = {}
    if args.profile:
        steps = min(args.tokens, 9) - 1
        for b in batches:
            progress(f"profiling {steps} decode steps at batch {b}, twice per engine (E T T E)")
            profile_runs: dict[str, list[dict]] = {name: [] for name in ENGINES}
            for name in (*ENGINES, *ENGINES[::-1]):
                if name == "ember":
                    run = lambda on_step, b=b: run_ember(engine, prompts[b], steps + 1, on_step)[0]  # noqa: E731
                    skip = 0
                else:
                    run = lambda on_step, b=b: run_transformers(  # noqa: E731
                        hf_model, prompts[b], steps + 1, pad_id, on_step)[0]
                    skip = 1  # the prompt's put comes before the prefill
                gc.collect()
                profile_runs[name].append(profile_decode(run, skip, steps))
            profiles[str(b)] = {name: mean_profile(rs) for name, rs in profile_runs.items()}

    res = summarize(args, runs, copy_bw, read_bw, weights, config, dtype, threads, model_dir,
                    load_before, elapsed)
    res["profiles"] = profiles
    return res


# Three ways to rate a run: wall clock as asked for, wall clock with bursts of load left out,
# and CPU time (the work itself, whatever share of the cores other processes left us).
BASES = {
    "aggregate": ("decode_tok_s", "wall clock: batch x steps / decode time"),
    "median_step": ("steady_tok_s", "wall clock: batch / median step time"),
    "cpu": ("cpu_tok_s", "CPU time: batch x steps / process CPU-seconds"),
}


def paired(xs: Sequence[float], ys: Sequence[float]) -> dict:
    ratios = [x / y for x, y in zip(xs, ys)]
    return {"per_repeat": ratios, "median": median(ratios), "p95": slow_p95_rate(ratios)}


def summarize(args, runs, copy_bw, read_bw, weights, config, dtype, threads, model_dir,
              load_before, elapsed) -> dict:
    batches = sorted({r.batch for r in runs})
    by = {(r.engine, r.batch, r.repeat): r for r in runs}
    repeats = range(args.repeats)

    def rates(name: str, b: int, basis: str) -> list[float]:
        return [getattr(by[name, b, i], BASES[basis][0]) for i in repeats]

    per_batch = []
    for b in batches:
        row: dict = {"batch": b}
        for name in ENGINES:
            rs = [by[name, b, i] for i in repeats]
            tok_s = rates(name, b, "aggregate")
            steps = [s for r in rs for s in r.step_s]
            row[name] = {
                "tok_s": tok_s,
                "tok_s_median": median(tok_s),
                "tok_s_p95": slow_p95_rate(tok_s),
                "step_ms_median": median(steps) * 1e3,
                "step_ms_p95": p95(steps) * 1e3,
                "cpu_step_ms_median": median([r.cpu_step_s for r in rs]) * 1e3,
                "prefill_ms_median": median([r.prefill_s for r in rs]) * 1e3,
            }
        row["ember_over_transformers"] = {
            basis: paired(rates("ember", b, basis), rates("transformers", b, basis)) for basis in BASES
        }
        same = sum(
            e == t for i in repeats
            for e, t in zip(by["ember", b, i].tokens, by["transformers", b, i].tokens)
        )
        row["identical_outputs"] = f"{same}/{b * args.repeats}"
        per_batch.append(row)

    lo, hi = batches[0], batches[-1]
    targets = []
    for basis in BASES:
        scale = paired(rates("ember", hi, basis), rates("ember", lo, basis))
        targets.append({"ratio": f"Ember batch-{hi} / Ember batch-{lo}", "basis": basis, "target": 4.0,
                        "median": scale["median"], "p95": scale["p95"]})
    for basis in BASES:
        vs = per_batch[0]["ember_over_transformers"][basis]
        targets.append({"ratio": f"Ember / transformers at batch {lo}", "basis": basis, "target": 1.0,
                        "median": vs["median"], "p95": vs["p95"]})

    bw = median(copy_bw)
    bound = bw / weights["per_step_bytes"]
    ember_b1 = rates("ember", lo, "aggregate")
    ember_b1_steady = rates("ember", lo, "median_step")
    kv = kv_bytes_per_position(config, torch.finfo(dtype).bits // 8)
    mean_len = args.prompt_len + args.tokens / 2
    return {
        "command": "",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(threads),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "measure_seconds": round(elapsed, 1),
        "model": {
            "size": args.size,
            "dir": _display_path(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            **weights,
            "kv_bytes_per_step_b1_mean": int(kv * mean_len),
        },
        "settings": {
            "prompt_len": args.prompt_len,
            "new_tokens": args.tokens,
            "decode_steps": args.tokens - 1,
            "repeats": args.repeats,
            "batch_sizes": batches,
            "bandwidth_samples": len(copy_bw),
        },
        "per_batch": per_batch,
        "targets": targets,
        "runs": [
            {"engine": r.engine, "batch": r.batch, "repeat": r.repeat, "stamps_s": r.stamps,
             "cpu_stamps_s": r.cpu_stamps}
            for r in runs
        ],
        "bandwidth": {
            "copy_bytes": 2 * (BANDWIDTH_BYTES if args.size != "tiny" else 1 << 26),
            "copy_gb_s_median": bw / 1e9,
            "copy_gb_s_p95": slow_p95_rate(copy_bw) / 1e9,
            "copy_gb_s_best": max(copy_bw) / 1e9,
            "read_gb_s_median": median(read_bw) / 1e9,
            "bound_b1_tok_s": bound,
            "ember_b1_tok_s_median": median(ember_b1),
            "ember_b1_pct_of_bound": 100 * median(ember_b1) / bound,
            "ember_b1_steady_tok_s_median": median(ember_b1_steady),
            "ember_b1_steady_pct_of_bound": 100 * median(ember_b1_steady) / bound,
        },
    }


# ---- report --------------------------------------------------------------------------------------


def _met(value: float, target: float) -> str:
    return "met" if value >= target else "**not met**"


def render_markdown(res: dict) -> str:
    m, s, mod, bw = res["machine"], res["settings"], res["model"], res["bandwidth"]
    lines = [
        "# Decode throughput: Ember vs transformers",
        "",
        f"Reproduce: `{res['command']}`",
        "",
        f"- Date: {res['date_utc']}; measuring took {res['measure_seconds']:.0f} s",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB, CPU capability {m['cpu_capability']}",
        f"- torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}; "
        f"torch threads: **{m['torch_threads']}** (both engines), OMP_WAIT_POLICY={m['omp_wait_policy']}",
        f"- Load average (1/5/15 min) before: {res['load_average_before']}, after: "
        f"{res['load_average_after']} (a shared machine: read the ratios, not the absolute figures)",
        f"- Model: {mod['size']} ({mod['dir']}), {mod['dtype']}, "
        f"{mod['parameters'] / 1e6:.1f} M parameters, {mod['parameter_bytes'] / 1e9:.3f} GB",
        f"- Work: prompts of {s['prompt_len']} tokens (equal lengths), {s['new_tokens']} new tokens "
        f"per request = {s['decode_steps']} timed decode steps, greedy; {s['repeats']} repeats, "
        "Ember and transformers interleaved (order alternating per repeat)",
        "",
        "## Decode tokens/s (aggregate over the batch, prefill excluded)",
        "",
        "Wall clock. p95 of tokens/s is the slow tail: 95% of repeats were at least this fast; "
        "ms/step over every decode step of every repeat. CPU-ms/step: process CPU time (all "
        "threads) per decode step, median of repeats: the work done, not counting time other "
        "processes held the cores.",
        "",
        "| batch | Ember tok/s median | Ember tok/s p95 | transformers tok/s median | "
        "transformers tok/s p95 | Ember ms/step median (p95) | transformers ms/step median (p95) | "
        "Ember CPU-ms/step | transformers CPU-ms/step | prefill ms Ember / transformers | "
        "identical outputs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in res["per_batch"]:
        e, t = row["ember"], row["transformers"]
        lines.append(
            f"| {row['batch']} | {e['tok_s_median']:.2f} | {e['tok_s_p95']:.2f} | "
            f"{t['tok_s_median']:.2f} | {t['tok_s_p95']:.2f} | "
            f"{e['step_ms_median']:.1f} ({e['step_ms_p95']:.1f}) | "
            f"{t['step_ms_median']:.1f} ({t['step_ms_p95']:.1f}) | "
            f"{e['cpu_step_ms_median']:.1f} | {t['cpu_step_ms_median']:.1f} | "
            f"{e['prefill_ms_median']:.0f} / {t['prefill_ms_median']:.0f} | {row['identical_outputs']} |"
        )
    lines += [
        "",
        "## Ember / transformers, paired per repeat",
        "",
        "Each repeat's Ember run divided by the transformers run next to it; median (slow-tail p95) "
        "of the repeats. " + "; ".join(f"{k}: {v[1]}" for k, v in BASES.items()) + ".",
        "",
        "| batch | " + " | ".join(BASES) + " |",
        "|---:|" + "---:|" * len(BASES),
    ]
    for row in res["per_batch"]:
        cells = [f"{row['ember_over_transformers'][k]['median']:.2f}x "
                 f"({row['ember_over_transformers'][k]['p95']:.2f}x)" for k in BASES]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ratios against targets (per-repeat paired ratios)",
        "",
        "| ratio | basis | median | p95 (slow tail) | target | |",
        "|---|---|---:|---:|---:|---|",
    ]
    for t in res["targets"]:
        lines.append(
            f"| {t['ratio']} | {t['basis']} | {t['median']:.2f}x | {t['p95']:.2f}x | "
            f">= {t['target']:.1f}x | {_met(t['median'], t['target'])} |"
        )
    lines += [
        "",
        "## Memory-bandwidth bound at batch 1",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| weight bytes read per decode step (all matmul weights + lm_head + norms; one embedding row) "
        f"| {mod['per_step_bytes'] / 1e9:.4f} GB |",
        f"| (not counted) KV cache bytes read per step at the mean position | {mod['kv_bytes_per_step_b1_mean'] / 1e6:.2f} MB |",
        f"| memcpy bandwidth, `Tensor.copy_` of {bw['copy_bytes'] / 2 / 1e9:.2f} GB, read + write counted, "
        f"median of {s['bandwidth_samples']} (p95 slow tail) | {bw['copy_gb_s_median']:.2f} GB/s "
        f"({bw['copy_gb_s_p95']:.2f}); best {bw['copy_gb_s_best']:.2f} GB/s |",
        f"| read-only bandwidth, `Tensor.sum` of the same tensor, median (for comparison) | {bw['read_gb_s_median']:.2f} GB/s |",
        f"| bound: memcpy bandwidth / weight bytes per step | {bw['bound_b1_tok_s']:.2f} tok/s |",
        f"| Ember batch 1, median | {bw['ember_b1_tok_s_median']:.2f} tok/s |",
        f"| Ember batch 1 as a share of the bound | **{bw['ember_b1_pct_of_bound']:.0f}%** |",
        f"| Ember batch 1 from median steps (1 / median ms per step), share of the bound | "
        f"{bw['ember_b1_steady_tok_s_median']:.2f} tok/s, **{bw['ember_b1_steady_pct_of_bound']:.0f}%** |",
        "",
    ]
    if res.get("profiles"):
        lines += render_profiles(res["profiles"])
    return "\n".join(lines)


def render_profiles(profiles: dict) -> list[str]:
    lines = [
        "## Where a decode step's time goes (torch.profiler, after the timed repeats)",
        "",
        "Self time of tensor ops per decode step, prefill excluded, mean of two profiled runs per "
        "engine and batch size (order Ember, transformers, transformers, Ember). The profiler adds "
        "per-op overhead, and op times are wall clock, so time other processes held the core lands "
        "in whichever op was running: compare wall with CPU time before reading the split.",
        "",
    ]
    batches = list(profiles)
    head = " | ".join(f"b{b} Ember | b{b} transformers" for b in batches)
    lines += [f"| ms per decode step | {head} |", "|---|" + "---:|" * (2 * len(batches))]
    groups = list(profiles[batches[0]]["ember"]["groups_ms"])
    for g in ["step (wall)", "step (process CPU time)", *groups]:
        cells = []
        for b in batches:
            for name in ENGINES:
                p = profiles[b][name]
                value = {"step (wall)": p["step_ms"], "step (process CPU time)": p["cpu_step_ms"]}.get(g)
                cells.append(f"{p['groups_ms'][g] if value is None else value:.1f}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "Top ops by self time, Ember (ms per step):", ""]
    for b in batches:
        top = ", ".join(f"{k} {v:.1f}" for k, v in profiles[b]["ember"]["top_ops_ms"])
        lines.append(f"- batch {b}: {top}")
    lines.append("")
    return lines


def write_results(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render_markdown(res))
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")


# ---- command line --------------------------------------------------------------------------------


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("tiny", "medium"), default="medium", help="make_model preset (default medium)")
    p.add_argument("--model-dir", type=Path, help="checkpoint dir (default models/<size>; generated if absent)")
    p.add_argument("--tokens", type=int, help="new tokens per request (default 32; tiny 16)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default 16)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every measurement (default 5)")
    p.add_argument("--batch-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                   help="comma-separated (default 1,4,16)")
    p.add_argument("--threads", type=int, default=default_threads(), help="torch threads for both engines (default: all cores)")
    p.add_argument("--bandwidth-samples", type=int, default=3, help="memcpy samples per repeat (default 3)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed repeats, profile 8 decode steps per engine and batch size")
    p.add_argument("--out", type=Path,
                   help="results path without suffix; .md and .json are written "
                        "(default benchmarks/results/decode_throughput for medium; tiny writes nothing)")
    args = p.parse_args(argv)
    args.model_dir = args.model_dir or ROOT / "models" / args.size
    args.tokens = args.tokens or (16 if args.size == "tiny" else 32)
    if args.out is None and args.size == "medium":
        args.out = RESULTS / "decode_throughput"
    if args.tokens < 2 or args.repeats < 1 or min(args.batch_sizes) < 1 or args.threads < 1:
        p.error("need --tokens >= 2, --repeats >= 1, batch sizes >= 1, --threads >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = benchmark(args)
    cmd = [".venv/bin/python", "benchmarks/decode_throughput.py", *(sys.argv[1:] if argv is None else argv)]
    res["command"] = shlex.join(cmd)
    print(render_markdown(res))
    if args.out is not None:
        write_results(res, args.out)
        progress(f"wrote {args.out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
