"""The scheduler driven by hand-written sampled tokens: no model, no torch."""

from __future__ import annotations

import pytest

from gpu_worker.scheduler import (
    DecodeWork,
    DuplicateRequest,
    EmptyPrompt,
    FinishReason,
    InvalidSamplingParams,
    PrefillWork,
    PromptTooLong,
    Request,
    RequestEvent,
    Scheduler,
)

EOS = 99


def req(rid: str, prompt=(1, 2, 3), max_tokens=10, **kw) -> Request:
    return Request(rid, list(prompt), max_tokens, **kw)


def step(s: Scheduler, tokens: dict[str, int]):
    out = s.schedule()
    return out, s.update_from_output({rid: tokens[rid] for rid in out.request_ids})


def test_new_requests_join_at_the_next_step():
    s = Scheduler(max_batch=4, max_seq_len=64, eos_token_ids=[EOS])
    s.add(req("a"))
    out, events = step(s, {"a": 5})
    assert out.prefill == [PrefillWork("a", 0, [1, 2, 3])] and out.decode == []
    assert events == [RequestEvent("a", 5)]

    s.add(req("b", prompt=[7, 8]))  # arrives while "a" is running
    out = s.schedule()
    assert out.prefill == [PrefillWork("b", 1, [7, 8])]
    assert out.decode == [DecodeWork("a", 0, token_id=5, position=3)]
    events = s.update_from_output({"a": 6, "b": 9})
    assert events == [RequestEvent("a", 6), RequestEvent("b", 9)]

    out = s.schedule()
    assert out.prefill == []
    assert out.decode == [DecodeWork("a", 0, 6, 4), DecodeWork("b", 1, 9, 2)]


def test_waits_for_a_slot_and_reuses_the_freed_one():
    s = Scheduler(max_batch=2, max_seq_len=64, eos_token_ids=[EOS])
    for rid in "abc":
        s.add(req(rid))
    out, _ = step(s, {"a": 1, "b": 1})
    assert [w.request_id for w in out.prefill] == ["a", "b"]
    assert s.num_waiting == 1 and s.num_free_slots == 0

    out, events = step(s, {"a": 1, "b": EOS})
    assert events[1] == RequestEvent("b", EOS, FinishReason.STOP)
    assert s.num_free_slots == 1

    out, _ = step(s, {"a": 1, "c": 1})
    assert out.prefill == [PrefillWork("c", 1, [1, 2, 3])]  # b's slot
    assert [w.request_id for w in out.decode] == ["a"]


def test_max_tokens_finishes_with_length():
    s = Scheduler(max_batch=1, max_seq_len=64)
    s.add(req("a", max_tokens=3))
    reasons = [step(s, {"a": 1})[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, FinishReason.LENGTH]
    assert not s.has_work() and s.num_free_slots == 1


def test_eos_finishes_with_stop_unless_ignored():
    s = Scheduler(max_batch=2, max_seq_len=64, eos_token_ids=[EOS])
    s.add(req("a"))
    s.add(req("b", ignore_eos=True))
    s.add(req("c", stop_token_ids=frozenset({42})))
    _, events = step(s, {"a": EOS, "b": EOS})
    assert events == [RequestEvent("a", EOS, FinishReason.STOP), RequestEvent("b", EOS)]
    _, events = step(s, {"b": 3, "c": 42})
    assert events == [RequestEvent("c", 42, FinishReason.STOP), RequestEvent("b", 3)]


def test_context_full_finishes_with_length():
    s = Scheduler(max_batch=1, max_seq_len=6)
    s.add(req("a", prompt=[1, 2, 3, 4], max_tokens=100))
    out, events = step(s, {"a": 5})
    assert events == [RequestEvent("a", 5)]
    out, events = step(s, {"a": 6})
    assert out.decode == [DecodeWork("a", 0, 5, position=4)]
    assert events == [RequestEvent("a", 6, FinishReason.LENGTH)]  # 4 + 2 == 6 tokens


def test_too_long_prompt_is_rejected_with_reason():
    s = Scheduler(max_batch=1, max_seq_len=8)
    with pytest.raises(PromptTooLong) as info:
        s.add(req("a", prompt=range(8)))
    assert info.value.reason == "prompt_too_long" and info.value.request_id == "a"
    assert "at most 7" in str(info.value)
    s.add(req("b", prompt=range(7)))  # the longest that fits: one output token
    _, events = step(s, {"b": 1})
    assert events == [RequestEvent("b", 1, FinishReason.LENGTH)]


def test_other_rejections():
    s = Scheduler(max_batch=1, max_seq_len=8)
    with pytest.raises(EmptyPrompt):
        s.add(req("a", prompt=[]))
    with pytest.raises(InvalidSamplingParams):
        s.add(req("a", max_tokens=0))
    s.add(req("a"))
    with pytest.raises(DuplicateRequest):
        s.add(req("a"))


def test_cancel_running_frees_the_slot_and_reports_next_update():
    s = Scheduler(max_batch=1, max_seq_len=64)
    s.add(req("a"))
    s.add(req("b"))
    step(s, {"a": 1})
    assert s.cancel("a")
    assert s.num_free_slots == 1
    out, events = step(s, {"b": 4})
    assert out.prefill == [PrefillWork("b", 0, [1, 2, 3])] and out.decode == []
    assert events == [RequestEvent("a", None, FinishReason.CANCELLED), RequestEvent("b", 4)]
    assert not s.cancel("a") and not s.cancel("nope")


def test_cancel_waiting_and_cancel_between_schedule_and_update():
    s = Scheduler(max_batch=1, max_seq_len=64)
    s.add(req("a"))
    s.add(req("b"))
    assert s.cancel("b")
    out = s.schedule()
    assert s.cancel("a")  # after schedule: its sampled token is dropped
    events = s.update_from_output({"a": 3})
    assert events == [
        RequestEvent("b", None, FinishReason.CANCELLED),
        RequestEvent("a", None, FinishReason.CANCELLED),
    ]
    assert not s.has_work()


def test_finish_from_outside_frees_the_slot_without_event():
    s = Scheduler(max_batch=1, max_seq_len=64)
    s.add(req("a"))
    step(s, {"a": 1})
    assert s.finish("a", FinishReason.STOP)
    assert s.num_free_slots == 1 and not s.has_work()
    assert s.update_from_output({}) == []


def test_prefill_token_budget_admits_at_least_one():
    s = Scheduler(max_batch=4, max_seq_len=64, max_prefill_tokens=5)
    s.add(req("a", prompt=range(8)))
    s.add(req("b", prompt=range(3)))
    s.add(req("c", prompt=range(3)))
    out, _ = step(s, {"a": 1})
    assert [w.request_id for w in out.prefill] == ["a"]  # over budget alone, still admitted
    out, _ = step(s, {"a": 1, "b": 1})
    assert [w.request_id for w in out.prefill] == ["b"]  # 3 + 3 > 5
    assert s.num_waiting == 1 and s.num_waiting_tokens == 3


def test_slot_count_never_exceeded_under_churn():
    s = Scheduler(max_batch=3, max_seq_len=32, eos_token_ids=[EOS])
    for i in range(20):
        s.add(req(f"r{i}", max_tokens=1 + i % 4))
    finished = set()
    while s.has_work():
        out = s.schedule()
        slots = [w.slot for w in out.prefill] + [w.slot for w in out.decode]
        assert len(slots) == len(set(slots)) <= 3
        for e in s.update_from_output({rid: 7 for rid in out.request_ids}):
            if e.finished:
                finished.add(e.request_id)
    assert len(finished) == 20 and s.num_free_slots == 3
