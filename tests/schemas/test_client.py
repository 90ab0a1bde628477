"""The client's pure parts, without Kafka: assembly, result accumulation, time-outs, and a
handle fed by hand (the client's reader does the same with consumed records)."""

from __future__ import annotations

import asyncio

import pytest

from infra.settings import KafkaSettings
from schemas import Request, TokenChunk
from schemas.client import (
    EmberClient,
    ReplyAssembler,
    ReplyState,
    RequestFailed,
    RequestHandle,
    RequestRejected,
    RequestTimeout,
    Timeouts,
    direct,
)


def chunk(
    seq: int,
    *,
    attempt: int = 1,
    worker: str | None = "w1",
    last: str | None = None,
    text: str | None = None,
    tokens: tuple[int, ...] = (7,),
    **extra,
) -> TokenChunk:
    return TokenChunk(
        request_id="r", seq=seq, attempt=attempt,
        text=f"{worker}:{seq} " if text is None else text, token_ids=tokens,
        finish_reason=last, submitted_at=1_000, first_token_at=1_100 if worker else None,
        emitted_at=2_000, worker_id=worker, warm=True if worker else None, **extra,
    )


def seqs(chunks: list[TokenChunk]) -> list[int]:
    return [c.seq for c in chunks]


def request(**fields) -> Request:
    return Request(**{"request_id": "r", "model": "tiny", "prompt": "hi", "submitted_at": 1_000,
                      **fields})


# --- ReplyAssembler ----------------------------------------------------------------------


def test_orders_by_seq_and_drops_duplicates():
    a = ReplyAssembler()
    assert seqs(a.add(chunk(0))) == [0]
    assert seqs(a.add(chunk(2))) == []
    assert seqs(a.add(chunk(1))) == [1, 2]
    assert seqs(a.add(chunk(1))) == []
    assert seqs(a.add(chunk(3, last="stop"))) == [3]
    assert a.done and a.duplicates == 1
    assert a.add(chunk(3, last="stop")) == [] and a.duplicates == 2


def test_a_new_worker_restarting_at_seq_0_replaces_the_dead_one():
    a = ReplyAssembler()
    a.add(chunk(0, worker="dead"))
    a.add(chunk(1, worker="dead"))
    restarted = a.add(chunk(0, worker="next"))
    assert seqs(restarted) == [0] and a.restarts == 1
    assert a.add(chunk(2, worker="dead")) == [], "the replaced stream is dropped"
    assert seqs(a.add(chunk(1, worker="next", last="stop"))) == [1]
    assert a.done


def test_an_older_attempt_never_replaces_a_newer_one():
    a = ReplyAssembler()
    a.add(chunk(0, attempt=2, worker="b"))
    assert a.add(chunk(0, attempt=1, worker="a")) == []
    assert a.restarts == 0 and a.stream == (2, "b")


# --- ReplyState: text, usage, timing, outcome ---------------------------------------------


def test_result_joins_the_text_and_carries_usage_and_timing():
    state = ReplyState("r", submitted_at=1_000)
    state.add(chunk(0, text="Kafka", tokens=(1,)), received_at=1_200)
    state.add(chunk(2, text="!", tokens=(3,), last="stop", prompt_tokens=4,
                    completion_tokens=5), received_at=1_900)
    assert not state.done, "seq 1 is missing: the terminal chunk waits for it"
    state.add(chunk(1, text=" streams", tokens=(2, 9, 9)), received_at=1_500)
    assert state.done
    result = state.result()
    assert result.text == "Kafka streams!"
    assert result.token_ids == (1, 2, 9, 9, 3)
    assert (result.finish_reason, result.prompt_tokens, result.completion_tokens) == ("stop", 4, 5)
    assert result.ttft_ms == 200 and result.server_ttft_ms == 100
    assert result.total_ms == 500, "finished when the gap before the terminal chunk closed"
    assert result.tokens_per_s == pytest.approx(4 / 0.3)  # 5 tokens: 4 after the first
    assert (result.worker_id, result.warm, result.restarts, result.duplicates) == ("w1", True, 0, 0)


def test_a_restart_clears_the_text_and_is_marked_on_its_first_delta():
    state = ReplyState("r", submitted_at=1_000)
    state.add(chunk(0, worker="dead", text="abc"), received_at=1_100)
    state.add(chunk(1, worker="dead", text="def"), received_at=1_150)
    deltas = state.add(chunk(0, worker="next", text="ab"), received_at=1_300)
    assert [(d.text, d.restarted) for d in deltas] == [("ab", True)]
    deltas = state.add(chunk(1, worker="next", text="x", last="length"), received_at=1_400)
    assert [(d.text, d.restarted, d.finish_reason) for d in deltas] == [("x", False, "length")]
    result = state.result()
    assert result.text == "abx" and result.restarts == 1
    assert result.ttft_ms == 100, "TTFT counts the first token this client ever received"


def test_rejected_and_error_outcomes_raise_typed_errors():
    rejected = ReplyState("r", submitted_at=1_000)
    rejected.add(
        chunk(0, worker=None, text="", tokens=(), last="rejected", error_code="overloaded",
              error_message="queue full"),
        received_at=1_010,
    )
    with pytest.raises(RequestRejected) as exc:
        rejected.result()
    assert (exc.value.error_code, exc.value.error_message) == ("overloaded", "queue full")

    failed = ReplyState("r", submitted_at=1_000)
    failed.add(chunk(0), received_at=1_100)
    failed.add(chunk(1, last="error", error_code="worker_failed", error_message="gone"),
               received_at=1_200)
    with pytest.raises(RequestFailed) as exc:
        failed.result()
    assert exc.value.error_code == "worker_failed" and exc.value.worker_id == "w1"


def test_cancelled_is_a_result_with_the_text_so_far():
    state = ReplyState("r", submitted_at=1_000)
    state.add(chunk(0, text="par"), received_at=1_100)
    state.add(chunk(1, text="tial", last="cancelled", completion_tokens=2), received_at=1_300)
    result = state.result()
    assert (result.finish_reason, result.text) == ("cancelled", "partial")


# --- Timeouts ----------------------------------------------------------------------------


def test_timeouts_first_chunk_then_total():
    t = Timeouts(first_chunk_s=2, total_s=30)
    assert t.next_deadline(100.0, None) == (102.0, "first_chunk")
    assert t.expired(100.0, None, 101.9) is None
    assert t.expired(100.0, None, 102.0) == "first_chunk"
    assert t.next_deadline(100.0, 100.4) == (130.0, "total")
    assert t.expired(100.0, 100.4, 129.9) is None
    assert t.expired(100.0, 100.4, 130.0) == "total"
    assert Timeouts().next_deadline(100.0, None) is None
    with pytest.raises(ValueError):
        Timeouts(total_s=0)


def test_a_deadline_gives_a_total_timeout_a_little_beyond_it():
    t = Timeouts(first_chunk_s=1).with_deadline(request(deadline_at=11_000))
    assert t == Timeouts(first_chunk_s=1, total_s=15.0)  # 10 s deadline + 5 s grace
    assert Timeouts(total_s=3).with_deadline(request(deadline_at=11_000)).total_s == 3


# --- a handle fed by hand ----------------------------------------------------------------


async def test_handle_streams_deltas_and_its_result():
    handle = RequestHandle(request(), submitted_mono=0.0)
    handle._deliver(chunk(1, worker="a", text="lost"), 1_200, 0.2)
    handle._deliver(chunk(0, worker="a", text="x"), 1_100, 0.1)
    handle._deliver(chunk(0, worker="b", text="y"), 1_300, 0.3)
    handle._deliver(chunk(1, worker="b", text="z", last="stop"), 1_400, 0.4)
    deltas = [(d.text, d.restarted) async for d in handle.stream()]
    assert deltas == [("x", False), ("lost", False), ("y", True), ("z", False)]
    assert (await handle.result()).text == "yz"


async def test_handle_stream_raises_rejected():
    handle = RequestHandle(request(), submitted_mono=0.0)
    handle._deliver(
        chunk(0, worker=None, text="", tokens=(), last="rejected", error_code="unknown_model",
              error_message="no such model"),
        1_010, 0.01,
    )
    with pytest.raises(RequestRejected):
        [d async for d in handle.stream()]
    with pytest.raises(RequestRejected):
        await handle.result()


async def test_the_client_times_out_and_cancels_expired_requests_on_a_fake_clock():
    client = EmberClient(KafkaSettings(), timeouts=Timeouts(first_chunk_s=1, total_s=5))
    sent: list[str | None] = []

    async def cancel(reason: str | None) -> None:
        sent.append(reason)

    silent = RequestHandle(request(), client.timeouts, submitted_mono=10.0, cancel=cancel)
    slow = RequestHandle(request(request_id="s"), client.timeouts, submitted_mono=10.0,
                         cancel=cancel)
    client._handles = {"r": silent, "s": slow}
    slow._deliver(chunk(0), 1_100, 10.5)

    client._expire(10.9)
    assert client.pending == 2
    client._expire(11.0)
    assert client.pending == 1 and silent.done and not slow.done
    with pytest.raises(RequestTimeout) as exc:
        await silent.result()
    assert (exc.value.kind, exc.value.after_s) == ("first_chunk", 1)
    with pytest.raises(RequestTimeout):
        [c async for c in silent]

    client._expire(15.0)
    assert client.pending == 0
    with pytest.raises(RequestTimeout) as exc:
        await slow.result()
    assert exc.value.kind == "total"
    await asyncio.sleep(0)  # the cancels run as background tasks
    assert sent == ["timeout first_chunk", "timeout total"]


async def test_a_late_chunk_after_a_timeout_is_ignored():
    handle = RequestHandle(request(), Timeouts(total_s=1), submitted_mono=0.0)
    handle._fail(RequestTimeout("r", "total", 1))
    handle._deliver(chunk(0, last="stop"), 5_000, 5.0)
    with pytest.raises(RequestTimeout):
        await handle.result()


def test_direct_submission_wraps_the_request_for_a_model_topic():
    admitted = direct(request())
    assert admitted.request.request_id == "r" and admitted.prompt_bucket == 128
    long = Request(request_id="l", model="m", prompt_token_ids=tuple(range(300)),
                   submitted_at=1)
    assert direct(long).prompt_tokens == 300 and direct(long).prompt_bucket == 512
