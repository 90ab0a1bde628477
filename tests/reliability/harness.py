"""What the reliability tests share: the short/long switch, client traffic with one outcome
per request, greedy references, /proc scans (memory, orphans) and the report rows.

Accounting. Every request a `Traffic` submits through the SDK ends in exactly one of:
`completed` (a Result: stop or length), `rejected` (RequestRejected), `failed`
(RequestFailed), `cancelled` (a Result with finish reason cancelled), or, where Ember gave
no answer, `timeout` (RequestTimeout), `closed` (ClientClosed) or `submit_error` (the
produce itself raised). lost = submitted - (completed + rejected + failed + cancelled): a
time-out counts as lost, never as an answer. Requests are greedy (temperature 0), so a
completed request's text after the SDK's dedup (PROTOCOL §6.2) must equal the tiny model's
greedy text for its prompt; one that differs (a repeated or missing piece of a restarted
stream) counts in `duplicates`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from infra.tail import TopicTail
from schemas.client import (
    ClientClosed,
    EmberClient,
    RequestFailed,
    RequestRejected,
    RequestTimeout,
)

LONG = os.environ.get("EMBER_RELIABILITY", "short").strip().lower() == "long"
MODE = "long" if LONG else "short"
REPORT = os.environ.get("EMBER_RELIABILITY_REPORT")  # JSON lines, one per scenario row

PROMPTS = (
    "the quick brown fox",
    "hello world",
    "once upon a time",
    "café crème et croissant",
    "kafka streams carry tokens",
    "a cold start is a slow start",
)
MAX_TOKENS = 24
LONG_TOKENS = 64  # every fourth request
LENGTHS = (MAX_TOKENS, MAX_TOKENS, MAX_TOKENS, LONG_TOKENS)
# A worker fault's target: one request this long (seconds of decoding, even for the tiny
# model on an idle machine), sent on its own, and the fault lands once its first chunks
# reached the client, so it is caught mid-generation whatever the machine's speed.
FAULT_PROMPT = PROMPTS[0]
FAULT_TOKENS = 768
ANSWERED = ("completed", "rejected", "failed", "cancelled")


def greedy_texts(
    model_dir: Path, prompts: Iterable[str], lengths: Iterable[int]
) -> dict[tuple[str, int], str]:
    """Greedy text of each (prompt, max_tokens) from the engine in this process (batch of
    one)."""
    from gpu_worker.engine import Engine, EngineRequest
    from gpu_worker.sampling import SamplingParams
    from gpu_worker.tokenizer import Tokenizer
    from gpu_worker.weights import load_model

    engine = Engine(load_model(model_dir), Tokenizer.from_dir(model_dir), max_batch=1)
    texts = {}
    for prompt in prompts:
        for max_tokens in set(lengths):
            engine.add_request(
                EngineRequest("ref", prompt=prompt, params=SamplingParams(max_tokens))
            )
            text = ""
            while engine.has_work():
                text += "".join(out.text for out in engine.step())
            texts[prompt, max_tokens] = text
    return texts


# --- traffic -------------------------------------------------------------------------------


@dataclass
class Outcome:
    request_id: str
    prompt: str
    submitted_at: float  # monotonic s
    ended_at: float
    kind: str  # completed, rejected, failed, cancelled, timeout, closed, submit_error
    code: str | None = None
    text_ok: bool | None = None  # completed: text == greedy reference
    first_chunk_at: float | None = None  # monotonic s
    ttft_ms: int | None = None
    restarts: int = 0
    dropped: int = 0  # chunks the SDK dropped as duplicates
    max_tokens: int = MAX_TOKENS


@dataclass
class Traffic:
    """Greedy requests of `model` through one EmberClient, each followed in its own task
    (`stream()` then `result()`, as a backend service would)."""

    client: EmberClient
    model: str
    references: Mapping[tuple[str, int], str]
    timeout_s: float = 120.0
    latency_class: str = "interactive"
    lengths: Sequence[int] = LENGTHS
    submitted: int = 0
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    # request id -> (worker id, max_tokens) while its chunks flow
    streaming: dict[str, tuple[str, int]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _n: int = 0

    async def _one(self, prompt: str, max_tokens: int,
                   sent: asyncio.Future[str] | None = None) -> None:
        t0 = time.monotonic()
        self.submitted += 1
        try:
            handle = await self.client.generate(
                self.model, prompt, max_tokens=max_tokens, temperature=0.0,
                timeout_s=self.timeout_s, latency_class=self.latency_class,  # type: ignore[arg-type]
            )
        except (KafkaError, asyncio.TimeoutError, OSError, RuntimeError) as exc:
            rid = f"unsent-{self._n}-{id(exc)}"
            self.outcomes[rid] = Outcome(rid, prompt, t0, time.monotonic(), "submit_error",
                                         type(exc).__name__, max_tokens=max_tokens)
            if sent is not None and not sent.done():
                sent.set_exception(exc)
            return
        rid = handle.request.request_id
        if sent is not None and not sent.done():
            sent.set_result(rid)
        first = None

        def ended(kind: str, code: str | None = None, **more: Any) -> Outcome:
            return Outcome(rid, prompt, t0, time.monotonic(), kind, code, first_chunk_at=first,
                           max_tokens=max_tokens, **more)

        try:
            async for delta in handle.stream():
                if first is None:
                    first = time.monotonic()
                if delta.chunk.worker_id is not None:
                    self.streaming[rid] = (delta.chunk.worker_id, max_tokens)
            result = await handle.result()
        except RequestRejected as exc:
            outcome = ended("rejected", exc.error_code)
        except RequestFailed as exc:
            outcome = ended("failed", exc.error_code)
        except RequestTimeout as exc:
            outcome = ended("timeout", exc.kind)
        except ClientClosed:
            outcome = ended("closed")
        else:
            kind = "cancelled" if result.finish_reason == "cancelled" else "completed"
            expected = self.references[prompt, max_tokens]
            outcome = ended(
                kind, result.finish_reason,
                text_ok=result.text == expected if kind == "completed" else None,
                ttft_ms=result.ttft_ms, restarts=result.restarts, dropped=result.duplicates,
            )
        finally:
            self.streaming.pop(rid, None)
        assert rid not in self.outcomes, f"two outcomes for {rid}"
        self.outcomes[rid] = outcome

    def submit(self, prompt: str | None = None,
               max_tokens: int | None = None) -> asyncio.Future[str]:
        """Submit one request now (in the background): the next of the rotation, or this
        prompt and length (a greedy reference of them must exist). The future gives its
        request id once it is produced."""
        if prompt is None or max_tokens is None:
            prompt = PROMPTS[self._n % len(PROMPTS)]
            max_tokens = self.lengths[self._n % len(self.lengths)]
            self._n += 1
        sent: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._one(prompt, max_tokens, sent))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return sent

    async def run(self, rate_per_s: float, duration_s: float) -> None:
        """Submit at `rate_per_s` (evenly spaced, with jitter) for `duration_s`."""
        start = time.monotonic()
        sent = 0
        while (elapsed := time.monotonic() - start) < duration_s:
            due = int(elapsed * rate_per_s) + 1
            while sent < due:
                self.submit()
                sent += 1
            await asyncio.sleep(min(0.05, 1 / rate_per_s) * random.uniform(0.5, 1.0))

    async def settle(self, timeout_s: float | None = None) -> None:
        """Wait until every submitted request has its outcome (the SDK's own time-outs end
        the rest, so this returns)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._tasks:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=left)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def between(self, t0: float, t1: float = math.inf) -> list[Outcome]:
        return [o for o in self.outcomes.values() if t0 <= o.submitted_at < t1]

    def counts(self) -> dict[str, int]:
        kinds = [o.kind for o in self.outcomes.values()]
        counts = {k: kinds.count(k) for k in (*ANSWERED, "timeout", "closed", "submit_error")}
        counts["submitted"] = self.submitted
        counts["lost"] = self.submitted - sum(counts[k] for k in ANSWERED)
        counts["duplicates"] = sum(1 for o in self.outcomes.values() if o.text_ok is False)
        counts["restarts"] = sum(o.restarts for o in self.outcomes.values())
        counts["dropped_chunks"] = sum(o.dropped for o in self.outcomes.values())
        return counts

    async def streaming_on(self, request_id: str, timeout_s: float) -> str:
        """Wait until `request_id`'s first chunks reached the client; the worker streaming
        it. AssertionError if it ended first or nothing came within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if request_id in self.streaming:
                return self.streaming[request_id][0]
            if request_id in self.outcomes:
                raise AssertionError(f"{request_id} ended before it was seen streaming: "
                                     f"{self.outcomes[request_id]}")
            await asyncio.sleep(0.01)
        raise AssertionError(f"{request_id}: no chunk within {timeout_s} s")

    def mid_stream(self, at: float) -> int:
        """Requests that had output at `at` and ended after it (caught mid-generation)."""
        return sum(1 for o in self.outcomes.values()
                   if o.first_chunk_at is not None and o.first_chunk_at < at < o.ended_at)

    def codes(self) -> dict[str, int]:
        """`kind:code` of every outcome that is not a completion, counted."""
        found: dict[str, int] = {}
        for o in self.outcomes.values():
            if o.kind != "completed":
                key = f"{o.kind}:{o.code}"
                found[key] = found.get(key, 0) + 1
        return found

    def slow_after_s(self, before: float) -> float:
        """What counts as slow: 3x the p95 latency (submit -> answer) of the requests
        completed before `before`, at least 1 s."""
        base = sorted(o.ended_at - o.submitted_at for o in self.outcomes.values()
                      if o.kind == "completed" and o.ended_at < before)
        p95 = percentile(base, 95)
        return max(1.0, 3 * p95) if p95 is not None else 1.0

    def recovery_s(self, fault_at: float, slow_s: float, until: float = math.inf) -> float:
        """Fault -> the answer of the last slow request (latency > `slow_s`) answered between
        the fault and `until`: how long the fault disturbed the service. 0: nobody noticed."""
        slow = [o.ended_at for o in self.outcomes.values()
                if fault_at <= o.ended_at < until and o.ended_at - o.submitted_at > slow_s]
        return max(slow) - fault_at if slow else 0.0

    def ttfts(self) -> list[int]:
        return sorted(o.ttft_ms for o in self.outcomes.values()
                      if o.kind == "completed" and o.ttft_ms is not None)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted `values` (q in 0..100)."""
    if not values:
        return None
    rank = max(1, math.ceil(q / 100 * len(values)))
    return values[min(rank, len(values)) - 1]


# --- the report ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of `make reliability`'s table."""

    scenario: str
    submitted: int
    completed: int
    rejected: int
    failed: int
    lost: int
    duplicates: int
    recovery_s: float | None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, traffic: Traffic, recovery_s: float | None, notes: str = "",
           **extra: Any) -> Row:
        c = traffic.counts()
        return cls(scenario, c["submitted"], c["completed"] + c["cancelled"], c["rejected"],
                   c["failed"], c["lost"], c["duplicates"], recovery_s, notes,
                   {"counts": c, "codes": traffic.codes(), "mode": MODE, **extra})


def report(row: Row) -> None:
    """Append `row` to $EMBER_RELIABILITY_REPORT (when set) and print it."""
    line = json.dumps(asdict(row), sort_keys=True, default=str)
    print(f"\nreliability row: {line}")
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as out:
            out.write(line + "\n")


# --- processes -----------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def pids_with_env(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (`NAME=VALUE`): everything a stack
    started, however deep, since children inherit the environment."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        environ = _read(f"/proc/{entry}/environ")
        if environ and (environ + b"\0").find(needle) >= 0 and not _is_zombie(int(entry)):
            found.append(int(entry))
    return found


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return stat is None or stat.rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")


def cmdline(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline") or b""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB (None once it is gone)."""
    status = _read(f"/proc/{pid}/status")
    if status is None:
        return None
    for line in status.decode(errors="replace").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class MemorySampler:
    """VmRSS of some processes every `every_s`, by name: {name: [(t, KiB), ...]}."""

    every_s: float = 2.0
    samples: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self, pids: Any) -> None:
        """`pids()` -> {name: pid}, called at every sample (workers come and go)."""
        self._task = asyncio.create_task(self._run(pids))

    async def _run(self, pids: Any) -> None:
        t0 = time.monotonic()
        while True:
            for name, pid in pids().items():
                kib = rss_kib(pid)
                if kib is not None:
                    self.samples.setdefault(name, []).append((time.monotonic() - t0, kib))
            await asyncio.sleep(self.every_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self, warmup_s: float) -> dict[str, dict[str, float]]:
        """Per process: RSS at the end of warm-up and at the end (MiB), growth between them
        (%) and the least-squares slope after warm-up (MiB/min)."""
        out = {}
        for name, series in self.samples.items():
            after = [(t, kib / 1024) for t, kib in series if t >= warmup_s]
            if len(after) < 3:
                continue
            ts, ms = zip(*after, strict=True)
            mt, mm = sum(ts) / len(ts), sum(ms) / len(ms)
            var = sum((t - mt) ** 2 for t in ts)
            slope = sum((t - mt) * (m - mm) for t, m in after) / var if var else 0.0
            out[name] = {
                "start_mib": round(ms[0], 1),
                "end_mib": round(ms[-1], 1),
                "peak_mib": round(max(ms), 1),
                "growth_pct": round(100 * (ms[-1] - ms[0]) / ms[0], 2),
                "slope_mib_per_min": round(slope * 60, 3),
            }
        return out


# --- the streams app's tables ----------------------------------------------------------------


def models_view(web: str, model: str) -> dict[str, Any] | None:
    """The model's view from `/ember/models/` (None: not served right now)."""
    try:
        with urllib.request.urlopen(f"{web}/ember/models/?model={model}", timeout=5) as resp:
            body = json.loads(resp.read())
    except (OSError, urllib.error.HTTPError, ValueError):
        return None
    view: dict[str, Any] | None = body.get("models", {}).get(model)
    return view


def queue_depth(view: Mapping[str, Any]) -> int:
    return int(sum(view["queue"]["depth"].values()))


async def wait_idle_tables(web: str, model: str, timeout_s: float) -> float:
    """Seconds until the model's queue depth (pending + in flight) is 0 in the streams
    app's tables; AssertionError with the last view when it is not within `timeout_s`."""
    t0 = time.monotonic()
    view = None
    while time.monotonic() - t0 < timeout_s:
        view = await asyncio.to_thread(models_view, web, model)
        if view is not None and queue_depth(view) == 0:
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    queue = None if view is None else view.get("queue")
    raise AssertionError(f"{model}: queue not back to 0 within {timeout_s} s: {queue}")


# --- reading topics ----------------------------------------------------------------------------


class Tail(TopicTail):
    """Every record appended to some topics after `start()` (all partitions, from their
    end), kept as (topic, partition, offset, key, value) in arrival order."""

    def __init__(self, kafka: Any, topics: Sequence[str]) -> None:
        super().__init__(
            kafka, topics, lambda r: (r.topic, r.partition, r.offset, r.key, r.value),
            max_records=5000, max_partition_fetch_bytes=4 << 20,
        )

    @property
    def records(self) -> list[tuple[str, int, int, bytes | None, bytes | None]]:
        return self.items
