"""Continuous-batching scheduler: which requests run this step, in which KV slot. Plain Python.

The KV cache has `max_batch` rows ("slots"); a running request owns one slot for its lifetime
and writes its keys/values at positions 0 .. context_len - 1 of that row. One engine step is

    out = scheduler.schedule()            # admit waiting requests into free slots
    ... run out.prefill and out.decode on the model, sample one token per request ...
    events = scheduler.update_from_output({request_id: token_id, ...})

- A request added with `add()` waits; the next `schedule()` admits it (FIFO) if a slot is
  free, and it is *prefilled* in that step: its whole prompt at positions 0..P-1. The token
  sampled from the prefill logits is its first output token.
- Every request admitted in an earlier step is *decoded*: its last token is fed at its
  position, one new token out. So each running request gains exactly one token per step.
- `update_from_output` appends the sampled tokens and finishes requests: `stop` on an EOS
  or stop-token id, `length` on max_tokens or when the context is full
  (prompt + output == max_seq_len). A finished request frees its slot at once; the next
  `schedule()` can hand it to a waiting request.
- `cancel()` frees the slot at once and reports `cancelled` in the next update.
- Stop *strings* are text, so the scheduler does not see them: the engine's text layer
  matches them and calls `finish(request_id, FinishReason.STOP)`.
- A prompt that leaves no room in the context is rejected by `add()` with `PromptTooLong`.

Worked example, max_batch=2: add A, B, C. Step 1 prefills A (slot 0) and B (slot 1); C waits.
Step 2 decodes A and B; B samples EOS and finishes, freeing slot 1. Step 3 prefills C into
slot 1 and decodes A.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens reached or context full
    CANCELLED = "cancelled"
    ERROR = "error"


class RequestRejected(ValueError):
    """A request that cannot be served as sent. `reason` is a stable code for the reply."""

    reason = "invalid_request"

    def __init__(self, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class PromptTooLong(RequestRejected):
    reason = "prompt_too_long"


class EmptyPrompt(RequestRejected):
    reason = "empty_prompt"


class DuplicateRequest(RequestRejected):
    reason = "duplicate_request_id"


class InvalidSamplingParams(RequestRejected):
    reason = "invalid_sampling_params"


class RequestStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """The scheduler's view of one request: ids and limits, no text."""

    request_id: str
    prompt_ids: Sequence[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class PrefillWork:
    """Run `token_ids` at positions 0..len-1 into KV row `slot`; sample from the last one."""

    request_id: str
    slot: int
    token_ids: Sequence[int]


@dataclass(frozen=True)
class DecodeWork:
    """Run `token_id` at `position` into KV row `slot`; sample the next token."""

    request_id: str
    slot: int
    token_id: int
    position: int


@dataclass(frozen=True)
class SchedulerOutput:
    prefill: list[PrefillWork]
    decode: list[DecodeWork]

    @property
    def num_requests(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def request_ids(self) -> list[str]:
        return [w.request_id for w in self.prefill] + [w.request_id for w in self.decode]


@dataclass(frozen=True)
class RequestEvent:
    """What happened to one request in a step: a new token, an end, or both."""

    request_id: str
    token_id: int | None
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(
        self,
        max_batch: int,
        max_seq_len: int,
        eos_token_ids: Iterable[int] = (),
        max_prefill_tokens: int | None = None,
    ) -> None:
        """`max_prefill_tokens` caps the prompt tokens prefilled in one step (at least one
        request is always admitted), so a burst of long prompts does not stall decoding."""
        if max_batch < 1 or max_seq_len < 2:
            raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {max_batch}, "
                             f"{max_seq_len}")
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_prefill_tokens = max_prefill_tokens
        self._free_slots = list(range(max_batch))  # a heap: the lowest free slot goes first
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}
        self._live: dict[str, Request] = {}  # waiting or running
        self._pending: list[RequestEvent] = []  # reported by the next update_from_output

    # -- intake ---------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; it is admitted by the next `schedule()` that has a free slot."""
        rid = request.request_id
        n = len(request.prompt_ids)
        if rid in self._live:
            raise DuplicateRequest(f"request {rid!r} is already queued or running", rid)
        if n == 0:
            raise EmptyPrompt("the prompt has no tokens", rid)
        if n >= self.max_seq_len:
            raise PromptTooLong(
                f"the prompt has {n} tokens; this worker's context holds {self.max_seq_len} "
                f"tokens for prompt and output together, so prompts may have at most "
                f"{self.max_seq_len - 1}",
                rid,
            )
        if request.max_tokens < 1:
            raise InvalidSamplingParams(f"max_tokens must be >= 1, got {request.max_tokens}", rid)
        request.status = RequestStatus.WAITING
        self._waiting.append(request)
        self._live[rid] = request

    def cancel(self, request_id: str) -> bool:
        """Drop a waiting or running request; `cancelled` comes out of the next update.
        False if the id is unknown or already finished."""
        request = self._live.get(request_id)
        if request is None:
            return False
        self._finish(request, FinishReason.CANCELLED)
        self._pending.append(RequestEvent(request_id, None, FinishReason.CANCELLED))
        return True

    def finish(self, request_id: str, reason: FinishReason) -> bool:
        """End a request for a reason decided outside (stop string, error), freeing its slot
        now. No event is queued: the caller reports it. False if not live."""
        request = self._live.get(request_id)
        if request is None:
            return False
        self._finish(request, reason)
        return True

    # -- one step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        decode = [
            DecodeWork(r.request_id, r.slot, r.output_ids[-1], r.num_tokens - 1)
            for r in self._running.values()
            if r.output_ids
        ]
        prefill: list[PrefillWork] = []
        budget = self.max_prefill_tokens
        used = 0
        while self._waiting and self._free_slots:
            n = len(self._waiting[0].prompt_ids)
            if prefill and budget is not None and used + n > budget:
                break
            request = self._waiting.popleft()
            request.slot = heapq.heappop(self._free_slots)
            request.status = RequestStatus.RUNNING
            self._running[request.request_id] = request
            prefill.append(PrefillWork(request.request_id, request.slot, request.prompt_ids))
            used += n
        return SchedulerOutput(prefill=prefill, decode=decode)

    def update_from_output(self, sampled: Mapping[str, int]) -> list[RequestEvent]:
        """Append each request's sampled token and decide which requests finished.

        Tokens for requests no longer running (cancelled since `schedule()`) are ignored.
        """
        events, self._pending = self._pending, []
        for rid, token in sampled.items():
            request = self._running.get(rid)
            if request is None:
                continue
            request.output_ids.append(token)
            reason = None
            if token in request.stop_token_ids or (
                token in self.eos_token_ids and not request.ignore_eos
            ):
                reason = FinishReason.STOP
            elif len(request.output_ids) >= request.max_tokens:
                reason = FinishReason.LENGTH
            elif request.num_tokens >= self.max_seq_len:
                reason = FinishReason.LENGTH  # no position left for the next token
            if reason is not None:
                self._finish(request, reason)
            events.append(RequestEvent(rid, token, reason))
        return events

    # -- state ----------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def get(self, request_id: str) -> Request | None:
        return self._live.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens not yet prefilled (heartbeat capacity: queued tokens)."""
        return sum(len(r.prompt_ids) for r in self._waiting)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            del self._running[request.request_id]
            heapq.heappush(self._free_slots, request.slot)
        elif request.status is RequestStatus.WAITING:
            self._waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.slot = None
        del self._live[request.request_id]
