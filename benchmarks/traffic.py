"""Traffic profiles end to end, each under each autoscaler policy, in one run.

    .venv/bin/python benchmarks/traffic.py               # 4 profiles x 4 policies, ~25 min
    .venv/bin/python benchmarks/traffic.py --smoke       # shortened, ~10 min, writes nothing
    .venv/bin/python benchmarks/traffic.py --profiles sawtooth --policies ember_predictive,always_on

Every run is the production path: a fresh `ember streams` (admission, placement, the policy
under test) and `ember supervisor` (two pre-started processes, workers on the tiny model) started
by infra.stack.LocalStack on the broker of EMBER_BOOTSTRAP_SERVERS, and one SDK client
(`EmberClient.private`) submitting the profile's requests to `ember.requests` on schedule.

Time compression. A profile is written in profile seconds and played `compress` times faster:
1 real second = 30 profile seconds for idle-to-burst, sawtooth and mixed (`--compress`), and
1200 for diurnal, whose 24 h day then lasts 72 s, a 3 s hour (`--day-s`). Rates stay requests
per real second: compression shortens time, it cannot make the model faster. The policies'
time constants are profile time too, so `policy_config` divides them by the same factor in the
streams config (`ember streams --config`, EMBER_STREAMS_CONFIG); production value, key, at
30x, at 1200x:

    keep-alive 300 s        models.tiny.scaling.keep_alive_s     10 s       0.5 s*
    Ember window / bucket   autoscaler.window_s / bucket_s       2 / 0.5 s  0.5 / 0.25 s*
      60 s / 10 s
    Ember stabilization     autoscaler.stabilization_s           4 s        0.5 s*
      120 s
    Ember lookahead 600 s   autoscaler.lookahead_s               20 s       0.5 s
    Ember hour 3600 s       autoscaler.hour_s                    120 s      3 s
    Ember profile max gap   autoscaler.profile_max_gap_s         20 s       1 s*
      600 s
    Knative stable / panic  autoscaler.stable_window_s /         2 / 0.5 s* 0.5 / 0.5 s*
      window 60 s / 6 s       panic_window_s
    Knative grace / sample  autoscaler.scale_to_zero_grace_s /   1 / 0.25 s* 0.5 / 0.25 s*
      bucket 30 s / 1 s       sample_bucket_s

(*) raised to a floor: no window under 2 ticks (0.5 s; the streams timer runs every 0.25 s and
a shorter window holds no sample), buckets whole ticks, windows whole buckets, the profile's
max gap at least 4 ticks. What describes the machine is not compressed: service time
(`default_service_s` 1 s, the tiny model's, for every policy), launch grace, heartbeats and
dead-worker timeouts, and the cold start itself (1-2 s here: 30-60 profile seconds at 30x, a
7B-like cold start; at 1200x it is most of a profile hour).

Fairness: every policy serves the same arrivals (seeded, per profile), on the same stack
(ceiling 2 workers, 8 slots each, two pre-started processes), started fresh per run.
Always-on keeps the ceiling's 2 workers (the best latency this stack gives; on 2 cores one
worker carries every profile's peak, so always-on at 1 would cost half); they are ready before
its clock starts, and the other policies start from an empty pool (their idle state). Ember's
diurnal run plays one compressed day first to learn its hour-of-day profile (learning is the
point of the policy) and is measured on the second; the baselines keep no memory across days
and are measured on one day. Diurnal runs start at a night hour, so every measured day holds
the same arrivals. Profiles are run one after the other, the policies' order rotated per
profile.

Measured per (profile, policy), in real milliseconds: TTFT (submit -> first token at the
client) p50/p95 of warm, cold and all requests, median decode tokens/s per request, workers
started, hit rate (warm / served), worker-seconds (each worker from its first lifecycle event
to `stopped`, within the measured window), rejected, lost (no or more than one terminal chunk
read from the reply topic) and timed out. Writes results/traffic.md, results/traffic.json
and results/traffic_<profile>.png (TTFT over time with the worker count; needs matplotlib:
`pip install -e '.[bench]'`).

Run it on a broker no other Ember control plane uses: each one reads `ember.requests` and
rejects the models it does not serve.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402

from infra.settings import KafkaSettings  # noqa: E402
from infra.stack import LocalStack, StackConfig  # noqa: E402
from infra.tail import TopicTail  # noqa: E402
from schemas import LifecycleEvent, TokenChunk, decode  # noqa: E402
from schemas.client import (  # noqa: E402
    EmberClient,
    RequestFailed,
    RequestRejected,
    RequestTimeout,
)
from schemas.topics import LIFECYCLE  # noqa: E402

MODEL = "tiny"
POLICIES = ("fully_cold", "always_on", "knative_reactive", "ember_predictive")
PROFILES = ("idle_to_burst", "sawtooth", "mixed", "diurnal")
TICK_S = 0.25
SLOTS = 8
CEILING = 2  # two CPU cores: a third CPU-bound worker adds contention, not capacity
ALWAYS_ON_WORKERS = 2  # the ceiling: the best latency this stack can give
SERVICE_S = 1.0  # ScalingSpec.default_service_s for the tiny model here (5 s is a 7B's)
HOUR = 3600.0
WORDS = "the a fox river light stone garden city winter music paper window road".split()

# --- profiles -------------------------------------------------------------------------------

# A stream of one profile: latency class, max tokens, and rate (requests per real second) as a
# function of profile seconds since the start.
Stream = tuple[str, int, Callable[[float], float]]


@dataclass(frozen=True)
class Profile:
    """Traffic in profile seconds; `compress` profile seconds pass per real second."""

    name: str
    compress: float
    duration_s: float  # profile seconds, the quiet tail included
    streams: tuple[Stream, ...]
    about: str
    daily: bool = False  # rates are functions of the hour of day (duration_s is one day)

    @property
    def real_s(self) -> float:
        return self.duration_s / self.compress


def _steps(*steps: tuple[float, float, float, float]) -> Callable[[float], float]:
    """Piecewise linear: (from s, to s, rate at from, rate at to); 0 elsewhere."""

    def rate(t: float) -> float:
        for a, b, ra, rb in steps:
            if a <= t < b:
                return ra + (rb - ra) * (t - a) / (b - a)
        return 0.0

    return rate


def _diurnal(peak: float) -> Callable[[float], float]:
    """Business hours: 0 at night, sin^2 from 06:00 to 21:00 with `peak` at 13:30."""

    def rate(t: float) -> float:
        h = (t / HOUR) % 24
        return peak * math.sin(math.pi * (h - 6) / 15) ** 2 if 6 <= h < 21 else 0.0

    return rate


def profiles(compress: float, day_s: float, scale: float = 1.0) -> dict[str, Profile]:
    """The four profiles; `scale` < 1 shortens them (smoke mode)."""
    s = scale
    tooth, ramp = 600 * s, 360 * s
    teeth = [(i * tooth, i * tooth + ramp, 0.3, 4.0) for i in range(3)]
    bursts = [(150 * s, 390 * s, 3.0, 3.0), (600 * s, 840 * s, 3.0, 3.0)]
    day_compress = 24 * HOUR / day_s
    return {
        p.name: p
        for p in (
            Profile(
                "idle_to_burst", compress, (180 + 600 + 300 + 90) * s,
                (("interactive", 24, _steps(
                    (0, 180 * s, 0.3, 0.3), (780 * s, 1080 * s, 4.0, 4.0))),),
                "0.3 req/s for 180 s, idle 600 s (longer than keep-alive + stabilization), "
                "4 req/s for 300 s, 90 s quiet",
            ),
            Profile(
                "sawtooth", compress, 3 * tooth + 60 * s,
                (("interactive", 24, _steps(*teeth)),),
                "3 teeth of 600 s: 0.3 -> 4 req/s over 360 s, then 240 s quiet; 60 s quiet",
            ),
            Profile(
                "mixed", compress, 1200 * s + 90 * s,
                (("batch", 64, _steps((0, 1200 * s, 1.0, 1.0))),
                 ("interactive", 16, _steps(*bursts))),
                "batch 1 req/s (64 tokens) for 1200 s under interactive bursts of 3 req/s "
                "(16 tokens) at 150-390 and 600-840 s; 90 s quiet",
            ),
            Profile(
                "diurnal", day_compress, 24 * HOUR,
                (("interactive", 24, _diurnal(3.0 * 0.8)),
                 ("batch", 48, _diurnal(3.0 * 0.2))),
                "business hours: none at night, sin^2 from 06:00 to 21:00 peaking at 3 req/s "
                "at 13:30 (80 % interactive 24 tokens, 20 % batch 48 tokens)",
                daily=True,
            ),
        )
    }


@dataclass(frozen=True)
class Arrival:
    at_s: float  # profile seconds since the start (since midnight for a daily profile)
    latency_class: str
    max_tokens: int
    prompt: str


def arrivals(profile: Profile, seed: int) -> list[Arrival]:
    """Poisson arrivals of each stream, by thinning at 0.1 profile-second resolution of the
    rate's maximum: the same list for every policy."""
    rng = random.Random(f"{profile.name}-{seed}")
    out = []
    for latency_class, max_tokens, rate in profile.streams:
        step = profile.duration_s / 20000
        top = max(rate(i * step) for i in range(20000)) or 0.0
        if top <= 0:
            continue
        t = 0.0
        while True:
            # rate is per real second; in profile seconds it is rate / compress
            t += rng.expovariate(top / profile.compress)
            if t >= profile.duration_s:
                break
            if rng.random() * top <= rate(t):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
                out.append(Arrival(t, latency_class, max_tokens, words))
    return sorted(out, key=lambda a: a.at_s)


# --- policy configuration under compression ----------------------------------------------


def _scaled(seconds: float, compress: float, floor: float, step: float | None = None) -> float:
    value = max(seconds / compress, floor)
    if step is not None:  # a whole number of `step`s, rounded up
        value = math.ceil(round(value / step, 6)) * step
    return round(value, 6)


# Ember's settings in profile time (EmberPolicy and ScalingSpec defaults); `--ember-set`
# changes them for a run, before compression.
EMBER_DEFAULTS: dict[str, float] = {
    "keep_alive_s": 300.0,
    "window_s": 60.0,
    "bucket_s": 10.0,
    "stabilization_s": 120.0,
    "lookahead_s": 600.0,
    "hit_rate_target": 0.9,
}


def policy_config(
    policy: str, compress: float, tick_s: float = TICK_S, ember: dict[str, float] | None = None
) -> dict[str, Any]:
    """The EMBER_STREAMS_CONFIG of one run: the policies' profile-time constants / compress."""
    e = {**EMBER_DEFAULTS, **(ember or {})}
    floor = 2 * tick_s
    keep_alive = e["keep_alive_s"] if policy == "ember_predictive" else 300.0
    scaling: dict[str, Any] = {
        "floor": 0,
        "ceiling": CEILING,
        "keep_alive_s": _scaled(keep_alive, compress, floor),
        "default_service_s": SERVICE_S,
    }
    autoscaler: dict[str, Any] = {}
    if policy == "ember_predictive":
        bucket = _scaled(e["bucket_s"], compress, tick_s, tick_s)
        autoscaler = {
            "bucket_s": bucket,
            "window_s": _scaled(e["window_s"], compress, max(floor, 2 * bucket), bucket),
            "stabilization_s": _scaled(e["stabilization_s"], compress, floor),
            "lookahead_s": _scaled(e["lookahead_s"], compress, floor),
            "hour_s": round(HOUR / compress, 6),
            "profile_max_gap_s": _scaled(600, compress, 4 * tick_s),
            "hit_rate_target": e["hit_rate_target"],
        }
    elif policy == "knative_reactive":
        bucket = _scaled(1, compress, tick_s, tick_s)
        autoscaler = {
            "sample_bucket_s": bucket,
            "stable_window_s": _scaled(60, compress, floor, bucket),
            "panic_window_s": _scaled(6, compress, max(floor, bucket), bucket),
            "scale_to_zero_grace_s": _scaled(30, compress, floor),
        }
    elif policy == "always_on":
        autoscaler = {"workers": ALWAYS_ON_WORKERS}
    return {
        "models": {MODEL: {"slots": SLOTS, "scaling": scaling}},
        "autoscaler": {"policy": policy, **autoscaler},
    }


# --- one run ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    at_s: float  # real seconds since the measured window began (submit time)
    latency_class: str
    request_id: str = ""
    outcome: str = "pending"  # ok, rejected, timeout, error
    ttft_ms: float | None = None
    warm: bool | None = None
    tok_s: float | None = None
    tokens: int = 0
    worker: str | None = None
    measured: bool = True  # False on Ember's diurnal learning day


@dataclass
class RunResult:
    profile: str
    policy: str
    compress: float
    window_s: float
    wall_s: float
    requests: list[Outcome]
    workers: dict[str, list[tuple[float, str]]]  # worker id -> [(s since window start, state)]
    lost: int
    duplicate_terminals: int
    config: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _one(client: EmberClient, arrival: Arrival, rec: Outcome, seed: int) -> None:
    try:
        handle = await client.generate(
            MODEL, arrival.prompt, max_tokens=arrival.max_tokens, temperature=0.8, seed=seed,
            latency_class=arrival.latency_class,  # type: ignore[arg-type]
            first_chunk_timeout_s=90, timeout_s=150,
        )
        rec.request_id = handle.request_id
        result = await handle.result()
    except RequestRejected as exc:
        rec.outcome = f"rejected:{exc.error_code}"
        return
    except RequestTimeout:
        rec.outcome = "timeout"
        return
    except RequestFailed:
        rec.outcome = "error"
        return
    rec.outcome = "ok"
    rec.ttft_ms = result.ttft_ms
    rec.warm = result.warm
    rec.tok_s = result.tokens_per_s
    rec.tokens = result.completion_tokens or len(result.token_ids)
    rec.worker = result.worker_id


async def _play(
    client: EmberClient, schedule: list[tuple[float, Arrival]], start: float,
    window_start: float, measured: bool,
) -> list[Outcome]:
    """Submit each arrival at `start + offset` (monotonic seconds); wait for all."""
    tasks, outcomes = [], []
    for i, (offset, arrival) in enumerate(schedule):
        delay = start + offset - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        rec = Outcome(time.monotonic() - window_start, arrival.latency_class, measured=measured)
        outcomes.append(rec)
        tasks.append(asyncio.create_task(_one(client, arrival, rec, i)))
    await asyncio.gather(*tasks)
    return outcomes


async def _wait_workers_ready(workers: TopicTail, prefix: str, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state: dict[str, str] = {}
        for e in workers.items:
            if e.worker_id.startswith(prefix) and e.kind == "state":
                state[e.worker_id] = e.state
        if sum(1 for s in state.values() if s == "ready") >= count:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{count} always-on workers not ready within {timeout_s:.0f} s")


def _night_start_offset(profile: Profile) -> float:
    """Real seconds to wait until a night hour (21:00-06:00) of the compressed day, at an hour
    boundary; and the profile second of day it will be then."""
    hour_real = HOUR / profile.compress
    now_s = time.time()
    hour_index = math.floor(now_s / hour_real)
    for k in range(1, 25):
        h = (hour_index + k) % 24
        if h >= 21 or h < 5:  # starting by 05:00 leaves an hour of night before traffic
            return (hour_index + k) * hour_real - now_s
    raise AssertionError("unreachable")


def _day_schedule(profile: Profile, items: list[Arrival], start_hour: float) -> list[
    tuple[float, Arrival]
]:
    """A day's arrivals as real-second offsets from `start_hour` (a night hour)."""
    day = 24 * HOUR
    out = [(((a.at_s - start_hour * HOUR) % day) / profile.compress, a) for a in items]
    return sorted(out, key=lambda x: x[0])


async def run_one(
    profile: Profile, policy: str, items: list[Arrival], kafka: KafkaSettings,
    client: EmberClient, replies: TopicTail, args: argparse.Namespace,
) -> RunResult:
    wall0 = time.monotonic()
    config = policy_config(policy, profile.compress, args.tick_s, args.ember_set)
    log_dir = args.log_dir / f"{profile.name}-{policy}"
    shutil.rmtree(log_dir, ignore_errors=True)  # this run's logs only
    stack = LocalStack(
        StackConfig(
            models={MODEL: args.model_dir}, policy=policy, streams_config=config,
            prestart=args.prestart, tick_s=args.tick_s, max_batch=SLOTS,
            log_dir=log_dir, log_level="INFO",
        ),
        kafka,
    )
    prefix = f"stack-{stack.run_id}-"
    workers = TopicTail(
        kafka, LIFECYCLE,
        lambda r: (e if (e := decode(LifecycleEvent, r.value, r.headers)).worker_id.startswith(
            prefix) and e.kind == "state" else None),
    )
    await workers.start()
    learning: list[Outcome] = []
    try:
        async with stack:
            if policy == "always_on":
                await _wait_workers_ready(workers, prefix, ALWAYS_ON_WORKERS, 120)
            if profile.daily:
                wait = _night_start_offset(profile)
                await asyncio.sleep(wait)
                hour = round((time.time() / (HOUR / profile.compress)) % 24)
                schedule = _day_schedule(profile, items, hour)
                if policy == "ember_predictive" and not args.no_learning_day:
                    day_start = time.monotonic()
                    learning = await _play(client, schedule, day_start, day_start, False)
                    while time.monotonic() < day_start + profile.real_s:
                        await asyncio.sleep(0.05)
            else:
                schedule = [(a.at_s / profile.compress, a) for a in items]
            t0_ms, t0 = _now_ms(), time.monotonic()
            outcomes = await _play(client, schedule, t0, t0, True)
            while time.monotonic() < t0 + profile.real_s:
                await asyncio.sleep(0.05)
            window_s = time.monotonic() - t0
            await asyncio.sleep(1.0)  # the last lifecycle events
    finally:
        await workers.stop()
    await asyncio.sleep(1.0)  # the last reply records
    events: dict[str, list[tuple[float, str]]] = {}
    for e in workers.items:
        events.setdefault(e.worker_id, []).append(((e.at - t0_ms) / 1000, e.state))
    for timeline in events.values():
        timeline.sort()
    terminals: dict[str, dict[tuple[int, int], TokenChunk]] = {}
    for chunk in replies.items:  # distinct terminal chunks: a redelivered copy is one
        terminals.setdefault(chunk.request_id, {})[(chunk.attempt, chunk.seq)] = chunk
    submitted = [o for o in (*learning, *outcomes) if o.request_id]
    lost_ones = [o for o in submitted if len(terminals.get(o.request_id, ())) != 1]
    lost = len(lost_ones) + sum(1 for o in (*learning, *outcomes) if not o.request_id)
    dup = sum(1 for o in submitted if len(terminals.get(o.request_id, ())) > 1)
    for o in lost_ones:
        seen = [
            f"attempt {c.attempt} seq {c.seq} {c.finish_reason} from {c.worker_id}"
            for c in terminals.get(o.request_id, {}).values()
        ]
        print(f"    lost: {o.request_id} ({o.latency_class}, client outcome {o.outcome}, "
              f"{'warm' if o.warm else 'cold'}, worker {o.worker}): "
              f"{len(seen)} terminal chunks: {'; '.join(seen) or 'none'}", flush=True)
    result = RunResult(
        profile.name, policy, profile.compress, window_s, time.monotonic() - wall0,
        [*learning, *outcomes], events, lost, dup, config,
    )
    result.summary = summarize(result)
    return result


# --- numbers ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def worker_seconds(events: dict[str, list[tuple[float, str]]], window_s: float) -> float:
    """Sum over workers of their lifetime (first event to stopped/failed, or the end of the
    window) clipped to [0, window_s]."""
    total = 0.0
    for timeline in events.values():
        start = timeline[0][0]
        end = next((t for t, s in timeline if s in ("stopped", "failed")), window_s)
        total += max(min(end, window_s) - max(start, 0.0), 0.0)
    return total


def workers_over_time(
    events: dict[str, list[tuple[float, str]]], window_s: float
) -> tuple[list[float], list[int], list[int]]:
    """Step series (times, ready workers, live workers) over the window."""
    changes = sorted((t, w, s) for w, tl in events.items() for t, s in tl)
    state: dict[str, str] = {}
    times, ready, live = [0.0], [0], [0]
    for t, w, s in changes:
        state[w] = s
        times.append(max(t, 0.0))
        ready.append(sum(1 for v in state.values() if v == "ready"))
        live.append(sum(1 for v in state.values() if v not in ("stopped", "failed")))
    times.append(window_s)
    ready.append(ready[-1])
    live.append(live[-1])
    return times, ready, live


def summarize(run: RunResult) -> dict[str, Any]:
    measured = [o for o in run.requests if o.measured]
    ok = [o for o in measured if o.outcome == "ok" and o.ttft_ms is not None]
    warm = [o.ttft_ms for o in ok if o.warm]
    cold = [o.ttft_ms for o in ok if not o.warm]
    blended = [o.ttft_ms for o in ok]
    started = sum(1 for tl in run.workers.values() if 0 <= tl[0][0] <= run.window_s)
    by_class = {}
    for c in sorted({o.latency_class for o in measured}):
        values = [o.ttft_ms for o in ok if o.latency_class == c]
        by_class[c] = {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95)}
    learning = [o for o in run.requests if not o.measured]
    return {
        "requests": len(measured),
        "served": len(ok),
        "rejected": sum(1 for o in measured if o.outcome.startswith("rejected")),
        "timed_out": sum(1 for o in measured if o.outcome == "timeout"),
        "errors": sum(1 for o in measured if o.outcome == "error"),
        "lost": run.lost,
        "duplicate_terminals": run.duplicate_terminals,
        "warm_p50": pct(warm, 50), "warm_p95": pct(warm, 95),
        "cold_p50": pct(cold, 50), "cold_p95": pct(cold, 95),
        "blended_p50": pct(blended, 50), "blended_p95": pct(blended, 95),
        "tok_s": statistics.median([o.tok_s for o in ok if o.tok_s]) if ok else None,
        "workers_started": started,
        "hit_rate": len(warm) / len(ok) if ok else None,
        "worker_s": worker_seconds(run.workers, run.window_s),
        "window_s": run.window_s,
        "by_class": by_class,
        "learning_day": None if not learning else {
            "requests": len(learning),
            "hit_rate": (sum(1 for o in learning if o.warm) / len(learning)),
        },
    }


# --- report ----------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(runs: list[RunResult]) -> str:
    head = (
        "| profile | policy | requests | warm p50 / p95 | cold p50 / p95 | blended p50 / p95 "
        "| tok/s | workers started | hit rate | worker-s | rejected | lost |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in runs:
        s = r.summary
        hit = "-" if s["hit_rate"] is None else f"{100 * s['hit_rate']:.0f} %"
        tok = "-" if s["tok_s"] is None else f"{s['tok_s']:.0f}"
        lost = f"{s['lost']}" + (f" ({s['timed_out']} timed out)" if s["timed_out"] else "")
        lines.append(
            f"| {r.profile} | {r.policy} | {s['requests']} | {_ms(s['warm_p50'])} / "
            f"{_ms(s['warm_p95'])} | {_ms(s['cold_p50'])} / {_ms(s['cold_p95'])} | "
            f"{_ms(s['blended_p50'])} / **{_ms(s['blended_p95'])}** | {tok} | "
            f"{s['workers_started']} | {hit} | {s['worker_s']:.0f} | {s['rejected']} | {lost} |"
        )
    return "\n".join(lines)


def pooled(runs: list[RunResult], policy: str) -> dict[str, Any]:
    """All profiles' measured requests of `policy` together."""
    mine = [r for r in runs if r.policy == policy]
    ok = [o for r in mine for o in r.requests if o.measured and o.outcome == "ok"]
    blended = [o.ttft_ms for o in ok if o.ttft_ms is not None]
    return {
        "blended_p50": pct(blended, 50),
        "blended_p95": pct(blended, 95),
        "hit_rate": sum(1 for o in ok if o.warm) / len(ok) if ok else None,
        "worker_s": sum(r.summary["worker_s"] for r in mine),
        "lost": sum(r.summary["lost"] for r in mine),
        "profiles": len(mine),
    }


TARGETS_READ = (
    "The p95 and worker-second targets are read on the pooled row (Ember's blended view of "
    "the whole benchmark), the hit rate on sawtooth and diurnal, the profiles the issue names "
    "for it; the per-profile rows are the split view."
)


def targets(runs: list[RunResult]) -> list[str]:
    """The issue's targets, per profile and pooled, with the measured margins."""
    lines = []

    def get(profile: str | None, policy: str) -> dict[str, Any] | None:
        if profile is None:
            return pooled(runs, policy) if any(r.policy == policy for r in runs) else None
        found = [r for r in runs if r.profile == profile and r.policy == policy]
        return found[0].summary if found else None

    scopes = [*dict.fromkeys(r.profile for r in runs), None]
    lines.append("| scope | Ember p95 vs fully cold (>= 5x lower) | Ember p95 vs always-on "
                 "(<= 1.5x) | Ember worker-s vs always-on (<= 50 %) | Ember hit rate |")
    lines.append("|---|---|---|---|---|")
    for scope in scopes:
        e, c, a = (get(scope, p) for p in ("ember_predictive", "fully_cold", "always_on"))
        if e is None:
            continue
        cells = [scope or "all profiles pooled"]
        if c and e["blended_p95"] and c["blended_p95"]:
            x = c["blended_p95"] / e["blended_p95"]
            cells.append(f"{x:.1f}x lower {'✅' if x >= 5 else '❌'}")
        else:
            cells.append("-")
        if a and e["blended_p95"] and a["blended_p95"]:
            x = e["blended_p95"] / a["blended_p95"]
            cells.append(f"{x:.2f}x {'✅' if x <= 1.5 else '❌'}")
        else:
            cells.append("-")
        if a and a["worker_s"]:
            x = e["worker_s"] / a["worker_s"]
            cells.append(f"{100 * x:.0f} % {'✅' if x <= 0.5 else '❌'}")
        else:
            cells.append("-")
        hit = e["hit_rate"]
        need = scope in ("sawtooth", "diurnal")
        mark = (" ✅" if hit >= 0.9 else " ❌") if need and hit is not None else ""
        cells.append("-" if hit is None else f"{100 * hit:.0f} %{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(runs: list[RunResult], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots", flush=True)
        return []
    paths = []
    for name in dict.fromkeys(r.profile for r in runs):
        mine = [r for r in runs if r.profile == name]
        fig, axes = plt.subplots(len(mine), 1, figsize=(10, 2.4 * len(mine) + 0.6), sharex=True,
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], mine):
            ok = [o for o in r.requests if o.measured and o.outcome == "ok"]
            for warm, color, marker, label in ((True, "tab:blue", ".", "warm"),
                                               (False, "tab:red", "x", "cold")):
                pts = [(o.at_s, o.ttft_ms) for o in ok if bool(o.warm) == warm]
                if pts:
                    ax.scatter(*zip(*pts), s=10, c=color, marker=marker, label=label)
            bad = [o.at_s for o in r.requests if o.measured and o.outcome != "ok"]
            if bad:
                ax.scatter(bad, [20] * len(bad), s=14, c="black", marker="v", label="rejected")
            ax.set_yscale("log")
            ax.set_ylim(20, 30000)
            ax.set_ylabel("TTFT ms")
            s = r.summary
            ax.set_title(
                f"{r.policy}: p95 {_ms(s['blended_p95'])} ms, hit "
                f"{100 * (s['hit_rate'] or 0):.0f} %, {s['worker_s']:.0f} worker-s",
                fontsize=9, loc="left",
            )
            twin = ax.twinx()
            times, ready, live = workers_over_time(r.workers, r.window_s)
            twin.step(times, live, where="post", color="tab:gray", lw=1, label="workers")
            twin.step(times, ready, where="post", color="tab:green", lw=1.5, label="ready")
            twin.set_ylim(0, CEILING + 0.5)
            twin.set_ylabel("workers")
            if ax is axes[0, 0]:
                handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
                labels = ax.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
                ax.legend(handles, labels, fontsize=7, loc="upper right", ncol=5)
        compress = mine[0].compress
        axes[-1, 0].set_xlabel(f"real seconds (x{compress:g} = profile seconds)")
        fig.suptitle(f"{name}: TTFT per request and workers over time", fontsize=11)
        fig.tight_layout()
        path = out / f"traffic_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(runs: list[RunResult], args: argparse.Namespace, all_profiles: dict[str, Profile],
                 started: float) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, out)
    used = list(dict.fromkeys(r.profile for r in runs))
    lines = [
        "# Traffic profiles under four autoscaler policies",
        "",
        f"`{' '.join(['python', *sys.argv])}` on {platform.node()} ({os.cpu_count()} CPUs, "
        f"{platform.machine()}, Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"{(time.monotonic() - started) / 60:.1f} min. One stack per run (streams + supervisor "
        f"+ workers on the tiny model, CPU), {args.prestart} pre-started process, ceiling "
        f"{CEILING}, {SLOTS} slots per worker, always-on {ALWAYS_ON_WORKERS} workers, streams tick "
        f"{args.tick_s} s. TTFT in real ms at the client; worker-s in real seconds over the "
        "measured window. See benchmarks/README.md for how it is compressed and measured.",
        "",
        "| profile | compression | real s | what |",
        "|---|---|---|---|",
    ]
    for name in used:
        p = all_profiles[name]
        lines.append(f"| {name} | 1 s = {p.compress:g} s | {p.real_s:.0f} | {p.about} |")
    lines += ["", "## Per profile and policy", "", table(runs), ""]
    lines += ["## Targets (issue 6)", "", *targets(runs), "", TARGETS_READ, ""]
    mixed = [r for r in runs if r.profile == "mixed"]
    if mixed:
        lines += ["## Mixed priority: TTFT by class (p50 / p95 ms)", "",
                  "| policy | interactive | batch |", "|---|---|---|"]
        for r in mixed:
            bc = r.summary["by_class"]
            cell = {c: f"{_ms(v['p50'])} / {_ms(v['p95'])} (n={v['n']})" for c, v in bc.items()}
            lines.append(f"| {r.policy} | {cell.get('interactive', '-')} | "
                         f"{cell.get('batch', '-')} |")
        lines.append("")
    learn = [r for r in runs if r.summary.get("learning_day")]
    for r in learn:
        d = r.summary["learning_day"]
        lines += [f"Ember's diurnal learning day (not in the table): {d['requests']} requests, "
                  f"hit rate {100 * d['hit_rate']:.0f} %.", ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    (out / "traffic.md").write_text("\n".join(lines))
    data = [
        {
            "profile": r.profile, "policy": r.policy, "compress": r.compress,
            "window_s": r.window_s, "wall_s": r.wall_s, "config": r.config,
            "summary": r.summary,
            "requests": [[round(o.at_s, 3), o.latency_class, o.outcome, o.ttft_ms, o.warm,
                          None if o.tok_s is None else round(o.tok_s, 1), o.measured]
                         for o in r.requests],
            "workers": {w: [[round(t, 3), s] for t, s in tl] for w, tl in r.workers.items()},
        }
        for r in runs
    ]
    (out / "traffic.json").write_text(json.dumps(data, separators=(",", ":")))
    print(f"wrote {out / 'traffic.md'}, traffic.json and {len(pngs)} plot(s)", flush=True)


# --- main ------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    kafka = KafkaSettings.from_env()
    started = time.monotonic()
    day_s = min(args.day_s, 24.0) if args.smoke else args.day_s
    all_profiles = profiles(args.compress, day_s, 0.3 if args.smoke else 1.0)
    chosen = [all_profiles[p] for p in args.profiles]
    client_id = f"traffic-{os.getpid()}"
    runs: list[RunResult] = []
    client = EmberClient.private(kafka, client_id=client_id)
    await client.start()
    replies = TopicTail(
        kafka, client.reply_topic,
        lambda r: (c if (c := decode(TokenChunk, r.value, r.headers)).finish_reason is not None
                   else None),
    )
    await replies.start()
    try:
        for n, profile in enumerate(chosen):
            items = arrivals(profile, args.seed)
            order = args.policies[n % len(args.policies):] + args.policies[: n % len(args.policies)]
            for policy in order:
                print(f"[{(time.monotonic() - started) / 60:5.1f} min] {profile.name} / {policy}: "
                      f"{len(items)} requests over {profile.real_s:.0f} s", flush=True)
                run = await run_one(profile, policy, items, kafka, client, replies, args)
                s = run.summary
                print(f"    p50 {_ms(s['blended_p50'])} p95 {_ms(s['blended_p95'])} ms, hit "
                      f"{100 * (s['hit_rate'] or 0):.0f} %, {s['worker_s']:.0f} worker-s, "
                      f"{s['workers_started']} started, {s['rejected']} rejected, "
                      f"{s['lost']} lost ({run.wall_s:.0f} s)", flush=True)
                runs.append(run)
                await asyncio.sleep(4.0)  # past the supervisor's max decision age
    finally:
        await replies.stop()
        await client.stop()
        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(**kafka.aiokafka_kwargs())
            await admin.start()
            await admin.delete_topics([client.reply_topic])
            await admin.close()
        if runs and not args.smoke:
            write_report(runs, args, all_profiles, started)
    if runs and args.smoke:
        print(table(runs))
        print("\n".join(targets(runs)))
    return 0 if all(r.summary["lost"] == 0 for r in runs) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated")
    p.add_argument("--compress", type=float, default=30.0,
                   help="profile seconds per real second, except diurnal (default: 30)")
    p.add_argument("--day-s", type=float, default=72.0,
                   help="real seconds of diurnal's 24 h day (default: 72, i.e. x1200)")
    p.add_argument("--no-learning-day", action="store_true",
                   help="measure Ember's diurnal run on its first day")
    p.add_argument("--smoke", action="store_true",
                   help="profiles at 30 %% of their length, a 24 s day; prints, writes nothing")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prestart", type=int, default=2)
    p.add_argument("--tick-s", type=float, default=TICK_S)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--log-dir", type=Path, default=Path("/tmp/ember-traffic"))
    p.add_argument("--ember-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an Ember setting in profile time, before compression: "
                   f"{', '.join(EMBER_DEFAULTS)} (repeatable)")
    args = p.parse_args(argv)
    try:
        args.ember_set = {k: float(v) for k, v in (x.split("=", 1) for x in args.ember_set)}
    except ValueError:
        p.error("--ember-set takes KEY=NUMBER")
    for key in args.ember_set:
        if key not in EMBER_DEFAULTS:
            p.error(f"--ember-set {key}: expected one of {', '.join(EMBER_DEFAULTS)}")
    args.profiles = [x for x in args.profiles.split(",") if x]
    args.policies = [x for x in args.policies.split(",") if x]
    for name in args.profiles:
        if name not in PROFILES:
            p.error(f"unknown profile {name!r}: expected some of {', '.join(PROFILES)}")
    for name in args.policies:
        if name not in POLICIES:
            p.error(f"unknown policy {name!r}: expected some of {', '.join(POLICIES)}")
    if not (args.model_dir / "config.json").exists():
        p.error(f"no model at {args.model_dir}: run `ember make-model --size tiny "
                f"{args.model_dir}`")
    return args


async def _guarded(args: argparse.Namespace) -> int:
    """main, with SIGTERM cancelling it as Ctrl-C does: every stack stops on the way out."""
    import signal

    task = asyncio.ensure_future(main(args))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("interrupted: every stack stopped, nothing written", flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(asyncio.run(_guarded(parse_args())))
