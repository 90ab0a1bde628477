"""`ember generate`: one request through the client SDK, its text streamed to the terminal.

    ember generate --model tiny "Once upon a time" --max-tokens 64
    ember generate --model tiny "Hi" --direct-partition 0 --timeout 30   # no control plane
    echo "a long prompt" | ember generate --model tiny -

The text goes to stdout as it arrives. When the output restarts (a replacement worker starts
it over, PROTOCOL.md §6.2) a marker goes to stderr and the new text follows. At the end one
line on stderr: finish reason, warm or cold, TTFT, tokens and tokens/s.

Without `--direct-partition` the request goes to `ember.requests` (the streams app must run);
with it, straight to that partition of the model's topic, where a worker serves it.

Exit codes: 0 stop or length; 1 failed (`error`) or could not run; 3 rejected; 4 timed out;
5 cancelled by Ember; 130 interrupted (Ctrl-C or SIGTERM: the request is cancelled first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the SDK imports aiokafka: only when the command runs
    from infra.settings import KafkaSettings
    from schemas.client import RequestHandle

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REJECTED = 3
EXIT_TIMEOUT = 4
EXIT_CANCELLED = 5
EXIT_INTERRUPTED = 130
CANCEL_WAIT_S = 5.0  # after Ctrl-C: how long to wait for the worker's `cancelled` chunk


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="send one request and stream its text to the terminal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", help="prompt text; - reads it from stdin")
    p.add_argument("--model", required=True, help="model name as served, e.g. tiny")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--class",
        dest="latency_class",
        choices=("interactive", "batch", "eval"),
        default="interactive",
    )
    p.add_argument("--tenant", default=None)
    p.add_argument(
        "--deadline", type=float, default=None, metavar="S", help="the request's deadline_at"
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up without a last chunk"
    )
    p.add_argument(
        "--first-chunk-timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up without a first chunk",
    )
    p.add_argument(
        "--direct-partition",
        type=int,
        default=None,
        metavar="P",
        help="produce to partition P of the model topic (no control plane)",
    )
    p.add_argument("--reply-topic", default=None, help="default: ember.replies")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from infra.settings import KafkaSettings, SettingsError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        kafka = KafkaSettings.from_env()
    except SettingsError as exc:
        return _fail(str(exc))
    return asyncio.run(generate(args, prompt, kafka, sys.stdout, sys.stderr))


def _fail(reason: str, code: int = EXIT_FAILED) -> int:
    print(f"ember generate: {reason}", file=sys.stderr, flush=True)
    return code


async def _print(handle: RequestHandle, out: TextIO, err: TextIO) -> None:
    async for delta in handle.stream():
        if delta.restarted:
            err.write("\n[output restarted: the request moved to another worker]\n")
            err.flush()
        out.write(delta.text)
        out.flush()


async def generate(
    args: argparse.Namespace, prompt: str, kafka: KafkaSettings, out: TextIO, err: TextIO
) -> int:
    """Send the request `args` describe, stream it to `out`, report on `err`; the exit code."""
    from aiokafka.errors import KafkaError

    from schemas import SchemaError
    from schemas.client import (
        ClientClosed,
        EmberClient,
        RequestFailed,
        RequestRejected,
        RequestTimeout,
        Timeouts,
    )
    from schemas.topics import REPLIES

    try:
        timeouts = Timeouts(args.first_chunk_timeout, args.timeout)
        client = EmberClient(kafka, args.reply_topic or REPLIES, timeouts=timeouts)
    except ValueError as exc:
        return _fail(str(exc))
    try:
        await client.start()
    except (KafkaError, OSError) as exc:  # KafkaError is a RuntimeError: first
        from infra.handshake import connection_problem  # names the setting to fix

        reason = await connection_problem(kafka)
        return _fail(reason or f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc}")
    except RuntimeError as exc:  # the reply topic is missing
        return _fail(str(exc))
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)
    try:
        try:
            handle = await client.generate(
                args.model,
                prompt,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop=args.stop,
                latency_class=args.latency_class,
                deadline_s=args.deadline,
                tenant=args.tenant,
                partition=args.direct_partition,
            )
        except SchemaError as exc:
            return _fail(f"invalid request: {exc}")
        except KafkaError as exc:
            return _fail(f"could not send the request: {exc}")
        printing = asyncio.create_task(_print(handle, out, err))
        waiting = asyncio.create_task(interrupted.wait())
        await asyncio.wait({printing, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not printing.done():
            await handle.cancel("interrupted")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(printing, CANCEL_WAIT_S)
            out.write("\n")
            return _fail("interrupted: the request was cancelled", EXIT_INTERRUPTED)
        out.write("\n")
        out.flush()
        try:
            printing.result()
            result = await handle.result()
        except RequestRejected as exc:
            return _fail(f"rejected ({exc.error_code}): {exc.error_message}", EXIT_REJECTED)
        except RequestFailed as exc:
            return _fail(f"failed ({exc.error_code}): {exc.error_message}")
        except RequestTimeout as exc:
            hint = "" if args.direct_partition is not None else "; is `ember streams` running?"
            return _fail(f"timed out: {exc}{hint}", EXIT_TIMEOUT)
        except ClientClosed as exc:
            return _fail(str(exc))
        ttft = "-" if result.ttft_ms is None else f"{result.ttft_ms} ms"
        rate = "-" if result.tokens_per_s is None else f"{result.tokens_per_s:.1f}"
        path = {True: "warm", False: "cold"}.get(result.warm, "-")  # type: ignore[arg-type]
        tokens = result.completion_tokens or len(result.token_ids)
        err.write(
            f"finish={result.finish_reason} path={path} ttft={ttft} tokens={tokens} "
            f"tokens/s={rate} worker={result.worker_id}"
            + (f" restarts={result.restarts}" if result.restarts else "")
            + "\n"
        )
        err.flush()
        return EXIT_CANCELLED if result.finish_reason == "cancelled" else EXIT_OK
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.stop()
