"""`ember demo`: the whole path on the local broker and the tiny model, in about a minute.

    make demo                               # venv, broker, topics, tiny model, then this
    ember demo --model-dir models/tiny

1. Starts the stack (infra.stack): `ember streams` with Ember's predictive autoscaler and
   `ember supervisor` with one pre-started process, and waits until both work.
2. Sends two requests (interactive, batch) through the SDK to `ember.requests`: admission
   accepts them, placement finds no worker, they wait while the autoscaler decides `scale_up`
   and the supervisor hands the model to the pre-started process: *cold* requests.
3. Once those are done, sends three more: a ready worker has room, so they are *warm*.
4. Streams the first request of each round to the terminal as it arrives, prints a table per
   request (warm or cold, TTFT, tokens/s) and the scale decisions read from `ember.decisions`,
   lingers (up to `--linger-s`) until the autoscaler releases the idle workers, and stops
   everything. Ctrl-C (or SIGTERM) at any point stops the stack and every worker too.

The autoscaler's time constants are shortened so a release is seen within the minute (a 10 s
rate window, 5 s stabilization, 5 s keep-alive; the defaults are 60 s, 120 s, 300 s): see
`demo_config`. The text is gibberish: the tiny model's weights are random.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.settings import KafkaSettings
from infra.stack import LocalStack, StackConfig, StackError
from infra.tail import TopicTail
from schemas import ScaleDecision, decode
from schemas.client import EmberClient, EmberError, RequestHandle
from schemas.topics import DECISIONS

# round, latency class, prompt, max tokens
PLAN = [
    ("cold", "interactive", "the quick brown fox", 24),
    ("cold", "batch", "once upon a time", 48),
    ("warm", "interactive", "café crème et croissant", 24),
    ("warm", "interactive", "hello world", 16),
    ("warm", "batch", "a summary of the day", 48),
]


def demo_config(model: str) -> dict[str, Any]:
    """EMBER_STREAMS_CONFIG of the demo: Ember's predictive policy on demo time."""
    return {
        "models": {
            model: {
                "slots": 8,
                "scaling": {"floor": 0, "ceiling": 2, "keep_alive_s": 5},
            }
        },
        "autoscaler": {"window_s": 10, "bucket_s": 5, "stabilization_s": 5},
    }


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="start streams + supervisor, send cold and warm requests, show TTFT and decisions",
    )
    p.add_argument("--model-dir", type=Path, default=Path("models/tiny"))
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--linger-s", type=float, default=25.0,
        help="wait this long at most for the idle workers' release (default: 25)",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="component logs (default: a tmp dir)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    return asyncio.run(_guarded(run_demo(args.model_dir, args.model, args.linger_s, args.log_dir)))


async def _guarded(main: Any) -> int:
    """Run `main`, turning SIGTERM into the same cancellation Ctrl-C causes."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return int(await task)
    except asyncio.CancelledError:
        print("\nstopped: everything the demo started is gone", flush=True)
        return 130


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Row:
    label: str
    latency_class: str
    round: str
    path: str = "-"
    ttft_ms: int | None = None
    tokens: int = 0
    tok_s: float | None = None
    finish: str = "-"
    worker: str = "-"


def decision_log(kafka: KafkaSettings, model: str) -> TopicTail:
    """Every scale decision for `model` appended to ember.decisions after start(), in
    `items`."""

    def keep(record: Any) -> ScaleDecision | None:
        decision = decode(ScaleDecision, record.value, record.headers)
        return decision if decision.model == model else None

    return TopicTail(kafka, DECISIONS, keep)


def printable(text: str) -> str:
    """`text` for one terminal line: control characters shown as `·`."""
    return "".join(c if c.isprintable() else "·" for c in text)


async def _run_request(handle: RequestHandle, row: Row, live: bool) -> str:
    """Stream one request into `row`; print its text as it comes when `live`. Its text."""
    text = ""
    if live:
        print(f"  [{row.label}] ", end="", flush=True)
    try:
        async for delta in handle.stream():
            if delta.restarted:
                text = ""
            text += delta.text
            if live:
                print(printable(delta.text), end="", flush=True)
        result = await handle.result()
    except EmberError as exc:
        row.finish = type(exc).__name__
        return f"({exc})"
    finally:
        if live:
            print(flush=True)
    row.path = "warm" if result.warm else "cold"
    row.ttft_ms = result.ttft_ms
    row.tokens = result.completion_tokens or len(result.token_ids)
    row.tok_s = result.tokens_per_s
    row.finish = result.finish_reason
    row.worker = result.worker_id or "-"
    return text


async def _round(client: EmberClient, model: str, name: str, first: int) -> list[Row]:
    plan = [p for p in PLAN if p[0] == name]
    handles, rows = [], []
    for i, (_, latency_class, prompt, max_tokens) in enumerate(plan):
        rows.append(Row(f"r{first + i}", latency_class, name))
        handles.append(
            await client.generate(
                model, prompt, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=7 + i,
                latency_class=latency_class,  # type: ignore[arg-type]
                first_chunk_timeout_s=60, timeout_s=120,
            )
        )
    # The first one streams to the terminal as it comes; the others print when it is done.
    runs = [_run_request(h, r, live=i == 0) for i, (h, r) in enumerate(zip(handles, rows))]
    texts = await asyncio.gather(*runs)
    for row, text in list(zip(rows, texts))[1:]:
        print(f"  [{row.label}] {printable(text)}", flush=True)
    return rows


def request_table(rows: list[Row]) -> str:
    head = (
        f"{'request':<9}{'class':<13}{'path':<6}{'TTFT ms':>9}{'tokens':>8}{'tok/s':>8}  "
        f"{'finish':<8}worker"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ttft = "-" if r.ttft_ms is None else str(r.ttft_ms)
        tok_s = "-" if r.tok_s is None else f"{r.tok_s:.0f}"
        lines.append(
            f"{r.label:<9}{r.latency_class:<13}{r.path:<6}{ttft:>9}{r.tokens:>8}{tok_s:>8}  "
            f"{r.finish:<8}{r.worker}"
        )
    return "\n".join(lines)


def decision_table(decisions: list[ScaleDecision], t0: int) -> str:
    head = f"{'at s':>6}  {'action':<9}{'count':>5}  reason"
    lines = [head, "-" * 78]
    for d in decisions:
        lines.append(f"{(d.decided_at - t0) / 1000:>6.1f}  {d.action:<9}{d.count:>5}  {d.reason}")
    return "\n".join(lines)


async def _linger(stack: LocalStack, log: TopicTail, model: str, seconds: float) -> None:
    """Until the model has no ready or booting worker (all released) or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        try:
            page = await asyncio.to_thread(stack.get_json, "/ember/models/")
        except OSError:
            continue
        workers = page.get("models", {}).get(model, {}).get("workers", [])
        live = [w for w in workers if w["state"] not in ("stopped", "failed", "draining")]
        if any(d.action == "release" for d in log.items) and not live:
            return


async def run_demo(model_dir: Path, model: str, linger_s: float, log_dir: Path | None) -> int:
    kafka = KafkaSettings.from_env()
    if not (model_dir / "config.json").exists():
        print(f"no model at {model_dir}: run `ember make-model --size tiny {model_dir}`")
        return 2
    config = StackConfig(
        models={model: model_dir},
        policy="ember_predictive",
        streams_config=demo_config(model),
        prestart=1,
        log_dir=log_dir,
    )
    stack = LocalStack(config, kafka)
    print(f"starting the stack: ember streams (policy ember_predictive) + ember supervisor "
          f"(1 pre-started process); logs in {stack.log_dir}", flush=True)
    t_start = time.monotonic()
    log = decision_log(kafka, model)
    await log.start()
    try:
        async with stack:
            print(f"stack ready in {time.monotonic() - t_start:.1f} s; control plane at "
                  f"{stack.web_url}/ember/models/", flush=True)
            t0 = _now_ms()
            async with EmberClient(kafka) as client:
                print("\nround 1: no worker is running yet (these requests wait: cold)", flush=True)
                rows = await _round(client, model, "cold", 0)
                print("\nround 2: a worker is ready (warm)", flush=True)
                rows += await _round(client, model, "warm", len(rows))
            print(f"\nwaiting up to {linger_s:.0f} s for the autoscaler to release idle "
                  "workers ...", flush=True)
            await _linger(stack, log, model, linger_s)
            print("\n" + request_table(rows))
            print("\nscale decisions (ember.decisions, seconds after the first request):")
            print(decision_table(log.items, t0), flush=True)
            print("\nstopping the stack ...", flush=True)
    except StackError as exc:
        print(f"the stack did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        await log.stop()
    print(f"stopped; everything took {time.monotonic() - t_start:.0f} s")
    return 0 if all(r.finish in ("stop", "length") for r in rows) else 1
