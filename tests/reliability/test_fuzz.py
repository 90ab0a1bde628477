"""Fuzzed input: property-based bad records to `ember.requests` (admission) and to a worker's
partition of the model topic, with valid traffic flowing alongside.

Cases are drawn by Hypothesis (tests/reliability/fuzzcases.py: malformed msgpack, wrong
types, huge prompts and max_tokens, unknown models, bad reply topics, negative / NaN / huge
sampling parameters, bad versions and headers, non-UTF-8 or missing keys, deep nesting,
unknown fields), produced in batches, and each is held to what its consumer must do
(`fuzzcases.expect`, from the protocol): a dead letter with its reason for every record that
cannot be decoded or validated (matched one to one by source partition and offset), a lone
`rejected` chunk wherever `reply_route` finds a reply topic, the policy's answer to a valid
one (unknown_model, prompt_too_long, deadline_exceeded...). No component may die, and the
valid requests sent meanwhile all complete with their greedy text.

    pytest tests/reliability/test_fuzz.py                       # 400 cases (CI)
    EMBER_RELIABILITY=long pytest tests/reliability/test_fuzz.py   # 10,000 cases
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from infra.topics import apply_topics
from schemas import DeadLetter, TokenChunk, decode
from schemas.client import ReplyAssembler
from schemas.topics import DEADLETTERS, REPLIES, REQUESTS, TopicSpec, model_topic_name
from tests.reliability.conftest import Stack
from tests.reliability.fuzzcases import (
    ADMISSION,
    WORKER,
    Expect,
    Record,
    admission_cases,
    expect,
    materialize,
    worker_cases,
)
from tests.reliability.harness import LONG, Row, Tail, Traffic, report

pytestmark = [pytest.mark.kafka, pytest.mark.reliability,
              pytest.mark.timeout(1800 if LONG else 300)]

# Cases per target: 10,000 in all in the long form.
CASES = {ADMISSION: 6000, WORKER: 4000} if LONG else {ADMISSION: 250, WORKER: 150}
SEED = int(os.environ.get("EMBER_FUZZ_SEED", "20261129"))
BATCH = 250
VALID_RATE = 2.0  # valid requests/s alongside


def draw_cases(strategy: st.SearchStrategy[Any], n: int, seed: int) -> list[Any]:
    """`n` examples of `strategy`, drawn by Hypothesis (generation only: reproducible from
    `seed`, no shrinking, no example database)."""
    drawn: list[Any] = []

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Any) -> None:
        drawn.append(case)

    collect()
    return drawn


async def produce(kafka: Any, topic: str, partition: int | None,
                  records: list[Record]) -> list[tuple[int, int]]:
    """Produce in batches; (partition, offset) of each record, in order."""
    producer = AIOKafkaProducer(**kafka.aiokafka_kwargs(), acks="all", linger_ms=5,
                                max_request_size=4 << 20)
    await producer.start()
    placed: list[tuple[int, int]] = []
    try:
        for i in range(0, len(records), BATCH):
            futures = [
                await producer.send(topic, r.value, key=r.key, partition=partition,
                                    headers=list(r.headers) or None)
                for r in records[i:i + BATCH]
            ]
            for meta in await asyncio.gather(*futures):
                placed.append((meta.partition, meta.offset))
    finally:
        await producer.stop()
    return placed


async def fuzz(stack: Stack, client: Any, references: Any, target: str) -> Row:
    run = uuid.uuid4().hex[:6]
    reply, nowhere = f"ember.replies.fuzz-{run}", f"ember.replies.nowhere-{run}"
    unknown = f"fuzz-unknown-{run}"
    await apply_topics(stack.kafka, [TopicSpec(reply, 4)])
    if target == ADMISSION:
        topic, partition = REQUESTS, None
        strategy = admission_cases(stack.model, unknown, reply, nowhere)
        alive = {}
    else:
        view = await asyncio.to_thread(stack.view)
        assert view is not None
        worker = next(w for w in view["workers"] if w["state"] == "ready")
        topic, partition = model_topic_name(stack.model), worker["partition"]
        strategy = worker_cases(stack.model, unknown, reply, nowhere)
        alive = {worker["worker_id"]: stack.worker_pids()[worker["worker_id"]]}
    n = CASES[target]
    t0 = time.monotonic()
    cases = await asyncio.to_thread(draw_cases, strategy, n, SEED + (target == WORKER))
    drawn_s = time.monotonic() - t0
    now = time.time_ns() // 1_000_000
    records = [materialize(c, f"fz-{run}-{i}", now) for i, c in enumerate(cases)]
    expects = [expect(target, r, stack.model, reply, nowhere) for r in records]

    traffic = Traffic(client, stack.model, references)
    tail = Tail(stack.kafka, [DEADLETTERS, reply, REPLIES])
    await tail.start()
    queue = asyncio.create_task(_queue_peaks(stack))
    sending = asyncio.create_task(traffic.run(VALID_RATE, 3600))
    try:
        t1 = time.monotonic()
        placed = await produce(stack.kafka, topic, partition, records)
        produced_s = time.monotonic() - t1
        letters, chunks = await _answers(tail, topic, placed, expects, reply,
                                         timeout_s=60 + 0.15 * n)
        answered_s = time.monotonic() - t1
    finally:
        sending.cancel()
        await traffic.settle(180)
        await tail.stop()
        queue.cancel()
        peaks = (await asyncio.gather(queue, return_exceptions=True))[0]
    # The tables recover: nothing the fuzz sent stays counted in the model's queue.
    idle_s = await stack.idle(timeout_s=90)

    # -- the dead letters: one per bad record, none for the others ---------------------------
    want = {p for p, e in zip(placed, expects, strict=True) if e.dead_letter}
    got = Counter((d.source_partition, d.source_offset) for d in letters.values())
    missing = want - set(got)
    extra = set(got) - want
    twice = {k for k, c in got.items() if c > 1}
    bad_letters = [d for d in letters.values() if not d.error or (d.reason == "invalid"
                                                                  and not d.problems)]
    reasons = Counter(d.reason for d in letters.values())

    # -- the chunks: exactly one answer where a reply topic is known ---------------------------
    wanted = {e.request_id: e for e in expects if e.request_id is not None}
    wrong, unanswered, duplicated = [], [], []
    for rid, e in wanted.items():
        raw = chunks.get(rid, [])
        if not raw:
            unanswered.append(rid)
            continue
        assembler = ReplyAssembler()
        ends = [c for chunk in raw for c in assembler.add(chunk) if c.is_last]
        terminals = [c for c in raw if c.is_last]
        if len(ends) != 1 or (ends[0].finish_reason == "rejected" and len(terminals) != 1):
            duplicated.append(rid)
        last = ends[0] if ends else None
        if last is None or last.finish_reason not in e.finish or (
                e.codes and last.error_code not in e.codes):
            wrong.append((rid, last and (last.finish_reason, last.error_code), e))
    strangers = [rid for rid in chunks if rid.startswith(f"fz-{run}-") and rid not in wanted]
    codes = Counter(f"{chunks[r][-1].finish_reason}:{chunks[r][-1].error_code}"
                    for r in wanted if chunks.get(r))

    # -- nothing died, valid traffic unaffected ------------------------------------------------
    assert stack.local.running(), "a stack component died"
    dead = {w: p for w, p in alive.items() if stack.worker_pids().get(w) != p}
    c = traffic.counts()
    unmet = {i for i, (p, e) in enumerate(zip(placed, expects, strict=True))
             if p in missing or e.request_id in unanswered}
    lost = len(unmet) + c["lost"]
    row = Row(
        f"fuzz: {topic if target == ADMISSION else 'model topic'} ({target}), "
        f"{n} cases + valid traffic",
        submitted=n + c["submitted"], completed=c["completed"],
        rejected=n - len(unmet),  # every bad record answered as the protocol says
        failed=c["failed"], lost=lost,
        duplicates=len(extra) + len(twice) + len(duplicated) + len(strangers) + c["duplicates"],
        recovery_s=None,
        notes=f"{len(want)} dead letters expected, {len(want & set(got))} matched; "
              f"{len(wanted)} chunks expected; valid: {c['completed']}/{c['submitted']}",
        extra={"counts": c, "seed": SEED, "reasons": dict(reasons), "answers": dict(codes),
               "kinds": dict(Counter(r.kind for r in records)), "draw_s": round(drawn_s, 1),
               "produce_s": round(produced_s, 1), "answered_s": round(answered_s, 1),
               "queue_peaks": peaks if isinstance(peaks, dict) else None,
               "idle_after_s": round(idle_s, 2),
               "mode": "long" if LONG else "short"},
    )
    report(row)
    assert not dead, f"the worker under fuzz died or was replaced: {dead}"
    assert not missing, f"{len(missing)} bad records without a dead letter, e.g. " + str(
        [(records[placed.index(p)].kind, records[placed.index(p)].value[:80]
          if records[placed.index(p)].value else None) for p in sorted(missing)[:5]])
    assert not extra, f"{len(extra)} dead letters for valid records: {sorted(extra)[:5]}"
    assert not twice, f"records dead-lettered twice: {sorted(twice)[:5]}"
    assert not bad_letters, f"dead letters without a reason: {bad_letters[:3]}"
    assert not unanswered, f"{len(unanswered)} requests with a known reply topic got no " \
        f"chunk, e.g. {[(r, records[int(r.rsplit('-', 1)[1])].kind) for r in unanswered[:5]]}"
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    assert not duplicated, f"answered more than once: {duplicated[:5]}"
    assert not strangers, f"chunks for requests with no known reply topic: {strangers[:5]}"
    assert c["lost"] == 0 and c["duplicates"] == 0, f"valid traffic affected: {c}"
    assert c["completed"] == c["submitted"], \
        f"valid traffic affected: {traffic.codes()}; placement queue peaks {peaks}"
    return row


async def _queue_peaks(stack: Stack) -> dict[str, int]:
    """Until cancelled: the highest placement queue seen in the streams app's tables
    (pending, waiting for a worker; in flight), returned on cancellation."""
    peaks = {"pending": 0, "in_flight": 0}
    try:
        while True:
            view = await asyncio.to_thread(stack.view)
            if view is not None:
                for k in peaks:
                    peaks[k] = max(peaks[k], sum(view["queue"][k].values()))
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        return peaks


async def _answers(
    tail: Tail, topic: str, placed: list[tuple[int, int]], expects: list[Expect],
    reply: str, timeout_s: float,
) -> tuple[dict[tuple[int, int, int], DeadLetter], dict[str, list[TokenChunk]]]:
    """Dead letters of `topic` within the produced offsets, by (partition, offset, position
    in the tail), and chunks by request id, once every expected one arrived (or time is up;
    then 3 s more for anything unexpected)."""
    want = {p for p, e in zip(placed, expects, strict=True) if e.dead_letter}
    want_chunks = {e.request_id for e in expects if e.request_id is not None}
    low = {}
    for p, o in placed:
        low[p] = min(low.get(p, o), o)
    letters: dict[tuple[int, int, int], DeadLetter] = {}
    chunks: dict[str, list[TokenChunk]] = {}
    seen = 0
    deadline = time.monotonic() + timeout_s
    settled_at = None
    while True:
        records = tail.records[seen:]
        for i, (t, _part, _off, _key, value) in enumerate(records, start=seen):
            if t == DEADLETTERS:
                d = decode(DeadLetter, value)
                if d.source_topic == topic and d.source_offset >= low.get(d.source_partition,
                                                                          1 << 62):
                    letters[d.source_partition, d.source_offset, i] = d
            elif t in (reply, REPLIES):
                chunk = decode(TokenChunk, value)
                chunks.setdefault(chunk.request_id, []).append(chunk)
        seen += len(records)
        have = {(p, o) for p, o, _ in letters}
        done = want <= have and all(
            any(c.is_last for c in chunks.get(rid, ())) for rid in want_chunks)
        if done and settled_at is None:
            settled_at = time.monotonic()
        if settled_at is not None and time.monotonic() - settled_at > 3:
            break
        if time.monotonic() > deadline + (3 if settled_at is None else 0):
            break
        await asyncio.sleep(0.2)
    return letters, chunks


async def test_fuzzed_requests_through_admission(stack: Stack, client, references) -> None:
    await fuzz(stack, client, references, ADMISSION)


async def test_fuzzed_records_on_a_workers_partition(stack: Stack, client, references) -> None:
    await fuzz(stack, client, references, WORKER)
