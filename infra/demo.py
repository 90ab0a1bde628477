"""`ember demo`: the main job on the embedded default (local broker, tiny model, CPU).

Starts a worker process for the model, sends one request before the worker is ready (it
waits in Kafka: a cold request) and a few once it is (warm), streams their text, prints a table
per request (warm or cold, TTFT, tokens/s) and drains the worker. Ctrl-C stops everything it
started. Requests go straight to the model topic here; the admission and placement layer sits
in front of that topic when the streams app runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from infra.settings import KafkaSettings
from infra.topics import apply_topics
from schemas import AdmittedRequest, LifecycleEvent, Request, decode
from schemas.client import EmberClient, RequestHandle
from schemas.topics import WORKERS, model_topic

PROMPTS = [
    ("interactive", "the quick brown fox", 24),
    ("interactive", "café crème et croissant", 24),
    ("batch", "once upon a time", 48),
    ("interactive", "hello world", 16),
]


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a worker on the tiny model and stream a few requests")
    p.add_argument("--model-dir", type=Path, default=Path("models/tiny"))
    p.add_argument("--model", default="tiny")
    p.set_defaults(func=lambda args: asyncio.run(run_demo(args.model_dir, args.model)))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _request(model: str, prompt: str, max_tokens: int, latency_class: str) -> AdmittedRequest:
    now = _now_ms()
    request = Request(
        request_id=f"demo-{uuid.uuid4().hex[:8]}",
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.8,
        top_p=0.95,
        seed=7,
        latency_class=latency_class,  # type: ignore[arg-type]
        submitted_at=now,
    )
    return AdmittedRequest(
        request=request,
        latency_class=request.latency_class,
        prompt_tokens=len(prompt.split()),
        prompt_bucket=128,
        admitted_at=now,
    )


async def _wait_ready(kafka: KafkaSettings, worker_id: str, proc: subprocess.Popen) -> None:
    consumer = AIOKafkaConsumer(
        WORKERS, **kafka.aiokafka_kwargs(), auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        while proc.poll() is None:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for rec in records:
                    event = decode(LifecycleEvent, rec.value)
                    if event.worker_id != worker_id:
                        continue
                    print(f"  worker {worker_id}: {event.state}", flush=True)
                    if event.state == "ready":
                        return
                    if event.state == "failed":
                        raise RuntimeError(f"worker failed: {event.reason}")
        raise RuntimeError(f"worker exited with code {proc.returncode} before it was ready")
    finally:
        await consumer.stop()


async def _stream(handle: RequestHandle, label: str) -> dict[str, object]:
    text, tokens, first = "", 0, None
    warm, reason = None, None
    async for chunk in handle:
        if first is None and chunk.token_ids:
            first = _now_ms()
        if chunk.seq == 0:  # the (re)start of the output
            text, tokens = "", 0
        text += chunk.text
        tokens += len(chunk.token_ids)
        warm = chunk.warm
        reason = chunk.finish_reason
    done = _now_ms()
    print(f"\n[{label}] {handle.request.prompt!r} ->{text!r}", flush=True)
    submitted = handle.request.submitted_at
    gen_s = max((done - (first or done)) / 1000, 1e-3)
    return {
        "request": label,
        "class": handle.request.latency_class,
        "path": "warm" if warm else "cold",
        "ttft_ms": (first - submitted) if first else None,
        "tokens": tokens,
        "tok_s": (tokens - 1) / gen_s if tokens > 1 else 0.0,
        "finish": reason,
    }


def _table(rows: list[dict[str, object]]) -> str:
    head = f"{'request':<10}{'class':<13}{'path':<6}{'TTFT ms':>9}{'tokens':>8}{'tok/s':>9}  finish"
    lines = [head, "-" * len(head)]
    for r in rows:
        ttft = "-" if r["ttft_ms"] is None else f"{r['ttft_ms']:.0f}"
        lines.append(
            f"{r['request']:<10}{r['class']:<13}{r['path']:<6}{ttft:>9}{r['tokens']:>8}"
            f"{r['tok_s']:>9.1f}  {r['finish']}"
        )
    return "\n".join(lines)


async def run_demo(model_dir: Path, model: str) -> int:
    kafka = KafkaSettings.from_env()
    if not (model_dir / "config.json").exists():
        print(f"no model at {model_dir}: run `ember make-model --size tiny {model_dir}`")
        return 2
    await apply_topics(kafka, [model_topic(model)])
    worker_id = f"demo-worker-{os.getpid()}"
    cmd = [sys.executable, "-m", "infra.cli", "--log-level", "WARNING", "worker", str(model_dir),
           "--model", model, "--partition", "0", "--worker-id", worker_id]
    print(f"starting worker {worker_id} on {model_dir} (partition 0 of {model_topic(model).name})")
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        async with EmberClient(kafka) as client:
            topic = model_topic(model).name
            # Sent before the worker is ready: it waits in Kafka, a cold request.
            cold = await client.submit(_request(model, *PROMPTS[0][1:], PROMPTS[0][0]), topic, 0)
            await _wait_ready(kafka, worker_id, proc)
            warm = [
                await client.submit(_request(model, p, n, c), topic, 0) for c, p, n in PROMPTS[1:]
            ]
            rows = await asyncio.gather(
                *(_stream(h, f"r{i}") for i, h in enumerate([cold, *warm]))
            )
        print("\n" + _table(list(rows)))
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # drain: finish in flight, then stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        print(f"worker stopped (exit code {proc.returncode})")
