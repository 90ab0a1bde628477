"""Continuous-batching engine: scheduler + model runner + sampling, and a thin text layer.

The core works on token ids only: `Scheduler` decides who runs, `ModelRunner` runs the model
on one step's batch, `sample` picks one token per request. Text is a thin layer on top: a
prompt string is encoded at `add_request`, and each request's `TextStream` turns its tokens
into text deltas and matches stop strings (a matched stop string ends the request with
`stop`; the text before it is emitted, the stop string is not). Without a tokenizer the
engine takes prompt ids only and every `text` is "".

One `step()`:
  1. `schedule()`: requests added since the last step are admitted into free KV slots;
  2. prefill the admitted ones (a batch per prompt length: equal lengths run together);
  3. one batched decode for every request admitted in an earlier step (B = running requests);
  4. sample all rows at once, then read the B sampled ids back: the one host sync per step;
  5. `update_from_output`: append tokens, decide stop/length; text layer; outputs.

A request's tokens do not depend on its batch-mates: every model row reads only its own KV slot,
and sampling draws from the request's own generator (see `sampling.py`).

On CUDA the decode step is replayed from CUDA graphs captured for batch sizes 1, 2, 4, 8, ...
max_batch (a batch is padded up to the next captured size; padding rows write into a spare KV
slot that no request owns). Capture happens at construction ("graph prebuild"); if the model
cannot be captured (a host sync in its forward, say) the engine logs why and decodes eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpu_worker.sampling import SamplingParams, make_generator, sample
from gpu_worker.scheduler import (
    DecodeWork,
    FinishReason,
    InvalidSamplingParams,
    PrefillWork,
    Request,
    RequestRejected,
    Scheduler,
    SchedulerOutput,
)
from gpu_worker.tokenizer import TextStream, Tokenizer
from infra.logs import get_logger

__all__ = [
    "DEFAULT_GRAPH_BATCH_SIZES",
    "Engine",
    "EngineRequest",
    "FinishReason",
    "ModelRunner",
    "RequestRejected",
    "SamplingParams",
    "StepOutput",
]

log = get_logger(__name__)

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass(frozen=True)
class EngineRequest:
    """One generation request: a prompt as text or as ids (exactly one of them)."""

    request_id: str
    prompt: str | None = None
    prompt_ids: Sequence[int] | None = None
    params: SamplingParams = SamplingParams()


@dataclass(frozen=True)
class StepOutput:
    """What one request got in one step. Times are seconds on the engine's clock.

    `token_ids` holds every sampled id, the EOS or stop token and the token that completed a
    stop string included; `text` never holds special tokens or the stop string. Joining all
    of a request's `text` gives its output text.
    """

    request_id: str
    token_ids: list[int]  # sampled this step (one, or none for a cancel/error)
    text: str  # text this step ("" while a character or a possible stop string is held back)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error" when finished
    prompt_tokens: int
    completion_tokens: int  # generated so far, this step's included
    queue_s: float | None  # add_request -> admitted into a slot (None before)
    ttft_s: float | None  # add_request -> first token (None before)
    elapsed_s: float  # add_request -> this output
    error: str | None = None  # what failed, when finish_reason is "error"

    @property
    def is_first(self) -> bool:
        """True on the output that carries the request's first token."""
        return bool(self.token_ids) and self.completion_tokens == len(self.token_ids)


@dataclass(eq=False)
class _Live:
    request: Request
    params: SamplingParams
    generator: torch.Generator | None
    text: TextStream | None
    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    seed: int | None = None  # the seed actually used (drawn at random when none was given)


class ModelRunner:
    """Runs one step's prefill and decode work on the model; returns logits in work order."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int,
        max_seq_len: int,
        cuda_graph_batch_sizes: Sequence[int] | None = DEFAULT_GRAPH_BATCH_SIZES,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size
        use_graphs = self.device.type == "cuda" and bool(cuda_graph_batch_sizes)
        # With CUDA graphs one extra KV row takes the padding rows' writes.
        self.pad_slot = max_batch if use_graphs else None
        model.setup_caches(max_batch + (1 if use_graphs else 0), max_seq_len)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        if use_graphs:
            self._capture_cuda_graphs(cuda_graph_batch_sizes)

    @property
    def graph_batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def _tensor(self, data: list) -> Tensor:
        t = torch.tensor(data, dtype=torch.long)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def prefill(self, work: Sequence[PrefillWork]) -> tuple[list[str], Tensor]:
        """Request ids and their last-position logits [n, V], one forward per prompt length."""
        by_len: dict[int, list[PrefillWork]] = {}
        for w in work:
            by_len.setdefault(len(w.token_ids), []).append(w)
        ids: list[str] = []
        parts: list[Tensor] = []
        for n, group in by_len.items():
            tokens = self._tensor([list(w.token_ids) for w in group])  # [B, S]
            pos = torch.arange(n, device=self.device).expand(len(group), n)  # [B, S]
            slots = self._tensor([w.slot for w in group])  # [B]
            parts.append(self.model(tokens, pos, slots, last_only=True))  # [B, V]
            ids.extend(w.request_id for w in group)
        return ids, parts[0] if len(parts) == 1 else torch.cat(parts)

    def decode(self, work: Sequence[DecodeWork]) -> tuple[list[str], Tensor]:
        """Request ids and next-token logits [n, V] for one token per running request."""
        b = len(work)
        tokens = [w.token_id for w in work]
        pos = [w.position for w in work]
        slots = [w.slot for w in work]
        graph_b = next((s for s in self.graph_batch_sizes if s >= b), None)
        if graph_b is None:
            logits = self.model(
                self._tensor(tokens)[:, None], self._tensor(pos)[:, None], self._tensor(slots),
                last_only=True,
            )
        else:
            pad = graph_b - b
            host = torch.tensor(
                [tokens + [0] * pad, pos + [0] * pad, slots + [self.pad_slot] * pad],
                dtype=torch.long,
            ).pin_memory()  # [3, graph_b]
            self._graph_inputs[:, :graph_b].copy_(host, non_blocking=True)
            graph, out = self._graphs[graph_b]
            graph.replay()
            logits = out[:b]
        return [w.request_id for w in work], logits

    def execute(self, out: SchedulerOutput) -> tuple[list[str], Tensor]:
        ids: list[str] = []
        parts: list[Tensor] = []
        for run, work in ((self.prefill, out.prefill), (self.decode, out.decode)):
            if work:
                part_ids, logits = run(work)
                ids.extend(part_ids)
                parts.append(logits)
        return ids, parts[0] if len(parts) == 1 else torch.cat(parts)

    # -- CUDA graphs (CUDA only) ------------------------------------------------------------------

    def _capture_cuda_graphs(self, sizes: Sequence[int]) -> None:
        sizes = sorted({s for s in sizes if 1 <= s <= self.max_batch} | {self.max_batch})
        biggest = sizes[-1]
        d = self.device
        # Static inputs the graphs read: rows tokens, positions, slots; [3, biggest].
        self._graph_inputs = torch.zeros(3, biggest, dtype=torch.long, device=d)
        self._graph_inputs[2].fill_(self.pad_slot)
        self._in_tokens = self._graph_inputs[0].unsqueeze(-1)  # [biggest, 1] view
        self._in_pos = self._graph_inputs[1].unsqueeze(-1)  # [biggest, 1] view
        self._in_slots = self._graph_inputs[2]  # [biggest] view
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(device=d)
                side.wait_stream(torch.cuda.current_stream(d))
                with torch.cuda.stream(side):  # warm-up: kernels chosen, workspaces allocated
                    for _ in range(2):
                        self.model(self._in_tokens, self._in_pos, self._in_slots, last_only=True)
                torch.cuda.current_stream(d).wait_stream(side)
                pool = torch.cuda.graph_pool_handle()
                graphs = {}
                for b in reversed(sizes):  # largest first: smaller graphs reuse its memory
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        out = self.model(
                            self._in_tokens[:b], self._in_pos[:b], self._in_slots[:b],
                            last_only=True,
                        )
                    graphs[b] = (graph, out)
                torch.cuda.synchronize(d)
                self._check_graph(graphs[biggest], biggest)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: decode eagerly
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(d)
            log.warning("cuda_graphs_disabled", error=f"{type(exc).__name__}: {exc}")
            return
        self._graphs = graphs
        log.info(
            "cuda_graphs_captured", batch_sizes=sizes,
            seconds=round(time.perf_counter() - started, 3),
        )

    def _check_graph(self, entry: tuple[torch.cuda.CUDAGraph, Tensor], b: int) -> None:
        """Replay against eager at a late position: catches graphs that baked in a shape."""
        graph, out = entry
        pos = min(self.max_seq_len - 1, 17)
        self._in_tokens[:b].fill_(1)
        self._in_pos[:b].fill_(pos)
        self._in_slots[:b].fill_(self.pad_slot)
        graph.replay()
        replayed = out[:b].clone()
        eager = self.model(
            self._in_tokens[:b], self._in_pos[:b], self._in_slots[:b], last_only=True
        )
        if not torch.allclose(replayed, eager, rtol=1e-3, atol=1e-3):
            raise RuntimeError("graph replay differs from eager decode")


class Engine:
    """Continuous batching over a model that follows the `Transformer` contract.

    Typical loop (the Kafka worker's):

        engine.add_request(EngineRequest("r1", prompt="Hello", params=SamplingParams(32)))
        while engine.has_work():
            for out in engine.step():
                publish(out)   # out.text, out.token_ids, out.finished, out.finish_reason

    `add_request` raises `RequestRejected` (with `.reason`) for a request that cannot run:
    prompt too long for the context, empty, unknown token ids, bad sampling params.

    Not thread-safe: call `add_request`, `cancel` and `step` from one thread (an asyncio loop
    that runs `step` in an executor queues its adds and cancels for between steps).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        max_prefill_tokens: int | None = None,
        cuda_graph_batch_sizes: Sequence[int] | None = DEFAULT_GRAPH_BATCH_SIZES,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`max_seq_len`: tokens of context per request (prompt + output), default the model's
        `max_position_embeddings`. `eos_token_ids`: default the tokenizer's.
        `cuda_graph_batch_sizes`: None or () disables CUDA graphs."""
        context = model.config.max_position_embeddings
        max_seq_len = max_seq_len or context
        if max_seq_len > context:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's context {context}")
        if eos_token_ids is None:
            eos_token_ids = sorted(tokenizer.eos_token_ids) if tokenizer else []
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.scheduler = Scheduler(max_batch, max_seq_len, eos_token_ids, max_prefill_tokens)
        self.runner = ModelRunner(model, max_batch, max_seq_len, cuda_graph_batch_sizes)
        self.device = self.runner.device
        self._clock = clock
        self._live: dict[str, _Live] = {}

    # -- requests ---------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; it joins the batch at the next `step()`. Raises `RequestRejected`."""
        rid = request.request_id
        params = request.params
        if (request.prompt is None) == (request.prompt_ids is None):
            raise RequestRejected("give exactly one of prompt (text) and prompt_ids", rid)
        if request.prompt is not None:
            if self.tokenizer is None:
                raise RequestRejected("this engine has no tokenizer: send prompt_ids", rid)
            prompt_ids = self.tokenizer.encode(request.prompt)
        else:
            prompt_ids = list(request.prompt_ids)
            vocab = self.runner.vocab_size
            if prompt_ids and not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
                raise RequestRejected(f"prompt_ids must be integers in [0, {vocab})", rid)
        if params.stop and self.tokenizer is None:
            raise InvalidSamplingParams("stop strings need a tokenizer; use stop_token_ids", rid)
        sched_request = Request(
            rid,
            prompt_ids,
            params.max_tokens,
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
        )
        self.scheduler.add(sched_request)  # raises PromptTooLong, DuplicateRequest, ...
        generator, seed = make_generator(params.seed) if not params.greedy else (None, None)
        text = TextStream(self.tokenizer, prompt_ids, params.stop) if self.tokenizer else None
        self._live[rid] = _Live(sched_request, params, generator, text, self._clock(), seed=seed)

    def cancel(self, request_id: str) -> bool:
        """Stop a queued or running request; its slot is free at once and the next `step()`
        reports it with finish_reason "cancelled". False if unknown or already finished."""
        return self.scheduler.cancel(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- capacity (heartbeats) --------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def free_slots(self) -> int:
        """Slots a new request would get at the next step (free slots not already claimed)."""
        return max(0, self.scheduler.num_free_slots - self.scheduler.num_waiting)

    @property
    def queued_tokens(self) -> int:
        return self.scheduler.num_waiting_tokens

    # -- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Admit, prefill, decode and sample once; one output per request that changed."""
        scheduled = self.scheduler.schedule()
        started = self._clock()
        for w in scheduled.prefill:
            self._live[w.request_id].admitted = started
        sampled: dict[str, int] = {}
        failed: list[tuple[str, str]] = []
        if scheduled.num_requests:
            try:
                ids, logits = self.runner.execute(scheduled)
                lives = [self._live[i] for i in ids]
                tokens = sample(
                    logits, [x.params for x in lives], [x.generator for x in lives]
                ).tolist()  # host sync: the sampled ids
                sampled = dict(zip(ids, tokens))
            except Exception as exc:  # noqa: BLE001 - fail this step's requests, keep serving
                message = f"{type(exc).__name__}: {exc}"
                log.error("engine_step_failed", error=message, requests=scheduled.num_requests)
                for rid in scheduled.request_ids:
                    self.scheduler.finish(rid, FinishReason.ERROR)
                    failed.append((rid, message))
        events = self.scheduler.update_from_output(sampled)
        now = self._clock()
        outputs = []
        for event in events:
            live = self._live[event.request_id]
            tokens_out: list[int] = []
            text = ""
            reason = event.finish_reason
            if event.token_id is not None:
                tokens_out.append(event.token_id)
                if live.first_token is None:
                    live.first_token = now
                if live.text is not None:
                    delta = live.text.add(event.token_id)
                    text = delta.text
                    if delta.stop is not None:
                        self.scheduler.finish(event.request_id, FinishReason.STOP)
                        reason = FinishReason.STOP
            if reason is not None and live.text is not None:
                text += live.text.finish()
            outputs.append(self._output(live, tokens_out, text, reason, now))
        for rid, message in failed:
            outputs.append(self._output(self._live[rid], [], "", FinishReason.ERROR, now, message))
        return outputs

    def _output(
        self,
        live: _Live,
        tokens: list[int],
        text: str,
        reason: FinishReason | None,
        now: float,
        error: str | None = None,
    ) -> StepOutput:
        request = live.request
        if reason is not None:
            del self._live[request.request_id]
        return StepOutput(
            request_id=request.request_id,
            token_ids=tokens,
            text=text,
            finished=reason is not None,
            finish_reason=reason.value if reason is not None else None,
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=len(request.output_ids),
            queue_s=None if live.admitted is None else live.admitted - live.arrival,
            ttft_s=None if live.first_token is None else live.first_token - live.arrival,
            elapsed_s=now - live.arrival,
            error=error,
        )

    def warm_up(self, prompt_len: int = 16) -> float:
        """Run every kernel once (prefill, decode, greedy and cut sampling) so the first user
        request pays no first-call costs. Returns the seconds it took."""
        if self.has_work():
            raise RuntimeError("warm_up() needs an idle engine")
        started = time.perf_counter()
        ids = [0] * max(1, min(prompt_len, self.max_seq_len - 2))
        for rid, params in (
            ("warm-up-greedy", SamplingParams(max_tokens=2, ignore_eos=True)),
            (
                "warm-up-sampled",
                SamplingParams(2, temperature=1.0, top_k=50, top_p=0.9, seed=0, ignore_eos=True),
            ),
        ):
            self.add_request(EngineRequest(rid, prompt_ids=ids, params=params))
        while self.has_work():
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # -- single prompt ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str = "generate",
    ) -> Iterator[StepOutput]:
        """Run one prompt on an idle engine, yielding its outputs step by step. Closing the
        generator early cancels the request."""
        if self.has_work():
            raise RuntimeError("generate() needs an idle engine; use add_request() and step()")
        params = params or SamplingParams()
        if isinstance(prompt, str):
            request = EngineRequest(request_id, prompt=prompt, params=params)
        else:
            request = EngineRequest(request_id, prompt_ids=prompt, params=params)
        self.add_request(request)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    finished = finished or out.finished
                    yield out
        finally:
            if not finished:
                self.cancel(request_id)
                while self.has_work():
                    self.step()
