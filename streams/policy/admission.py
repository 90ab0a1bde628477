"""Admission: accept, defer or reject each request, at once and with its reason.

    state, result = admit(spec, state, request, now)

In order, a request is
1. rejected `unknown_model` when its model is not in the catalog;
2. rejected `prompt_too_long` when its prompt (estimated tokens) plus max_tokens exceed the
   model's context;
3. rejected `deadline_exceeded` when its deadline_at has passed;
4. rejected `rate_limited` when its tenant's token bucket is empty (see TenantLimit);
5. checked against the model's queue (ModelLoad, refreshed from placement):
   - interactive (not deferrable): rejected `overloaded` when its class queue is at its bound;
   - batch and eval (deferrable): deferred when their class queue is at its bound or the
     model's whole queue is at `pressure_bound`, so interactive traffic goes first; a deferred
     request is re-queued by the agent and comes back at `retry_at`. Rejected `overloaded`
     when it has waited `max_defer_s` since it was submitted, `deadline_exceeded` when its
     deadline falls before the retry plus the estimated wait;
6. rejected `deadline_exceeded` when the estimated queue wait puts its start past deadline_at;
7. admitted: classified (prompt tokens, power-of-two prompt bucket, latency class) into a
   `schemas.AdmittedRequest`, charged one token of its tenant's bucket and counted in the
   model's queue.

Only an admission charges the tenant: deferred and rejected requests cost nothing.

Error codes are the wire's (schemas.ERROR_CODES) plus `rate_limited`, which the protocol
allows (clients accept codes they do not know): "the tenant sent more than its configured
rate; error_message says when to retry". Nothing is dropped silently: every outcome carries a
reason, and a rejection becomes a lone `rejected` TokenChunk (`AdmissionResult.rejection`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from schemas import LATENCY_CLASSES, AdmittedRequest, LatencyClass, Request, TokenChunk
from streams.policy.scaling import Observation
from streams.policy.windows import SECOND_MS, ms

Outcome = Literal["admit", "defer", "reject"]
RATE_LIMITED = "rate_limited"


@dataclass(frozen=True, slots=True)
class TenantLimit:
    """A token bucket: `rate_per_s` requests per second on average, up to `burst` at once.

    rate 2/s, burst 10: a tenant idle for 5 s or more may send 10 requests at once; the 11th
    is refused; half a second later one more is allowed."""

    rate_per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError(f"need rate_per_s > 0 and burst >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """One tenant's bucket: `tokens` left at `updated_at` (unix ms)."""

    tokens: float
    updated_at: int

    def refilled(self, limit: TenantLimit, now: int) -> TokenBucket:
        """2.5 tokens at t=0, rate 2/s, burst 10: at t=1500 ms -> 2.5 + 1.5 x 2 = 5.5."""
        elapsed_s = max(now - self.updated_at, 0) / SECOND_MS
        return TokenBucket(min(limit.burst, self.tokens + elapsed_s * limit.rate_per_s), now)

    def seconds_until_one(self, limit: TenantLimit) -> float:
        """0.4 tokens at rate 2/s -> 0.3 s until a whole one."""
        return max(1.0 - self.tokens, 0.0) / limit.rate_per_s


@dataclass(frozen=True, slots=True)
class ModelAdmission:
    """Catalog entry of one served model.

    queue_bounds: requests waiting for a worker, per class, at which that class is refused
    (interactive) or deferred (batch, eval). pressure_bound: waiting requests of all classes at
    which deferrable classes are deferred even under their own bound. service_s: time a
    request occupies a slot, used until placement has observed one. cold_start_s: time for a
    new worker to become ready, for the wait estimate when no worker is."""

    context_tokens: int = 4096
    queue_bounds: Mapping[str, int] = field(
        default_factory=lambda: {"interactive": 64, "batch": 256, "eval": 256}
    )
    pressure_bound: int = 32
    service_s: float = 5.0
    cold_start_s: float = 30.0
    slots_per_worker: int = 8


@dataclass(frozen=True, slots=True)
class AdmissionSpec:
    """The served-model catalog and the admission rules.

    tenant_limits: per tenant; others get `default_tenant_limit` (None: unlimited); requests
    without a tenant share the bucket of tenant "" under the default limit. chars_per_token:
    the estimate for text prompts. min_bucket_tokens: the smallest prompt-length bucket."""

    models: Mapping[str, ModelAdmission]
    deferrable: frozenset[str] = frozenset({"batch", "eval"})
    defer_s: float = 5.0
    max_defer_s: float = 300.0
    tenant_limits: Mapping[str, TenantLimit] = field(default_factory=dict)
    default_tenant_limit: TenantLimit | None = None
    chars_per_token: float = 4.0
    min_bucket_tokens: int = 16

    def limit_for(self, tenant: str) -> TenantLimit | None:
        return self.tenant_limits.get(tenant, self.default_tenant_limit)


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """What admission knows of a model's queue: refreshed from placement (`from_observation`)
    and counted up by each admission in between, so a burst between two refreshes still meets
    the bounds."""

    queued: Mapping[str, int] = field(default_factory=dict)
    ready_slots: int = 0
    free_slots: int = 0
    mean_service_s: float | None = None

    @classmethod
    def from_observation(cls, observation: Observation) -> ModelLoad:
        return cls(
            dict(observation.pending),
            observation.ready_slots,
            observation.free_slots,
            observation.mean_service_s,
        )

    def waiting_ahead(self, latency_class: str) -> int:
        """Requests that start before one of this class: its own class and those above it."""
        rank = LATENCY_CLASSES.index(latency_class)
        return sum(self.queued.get(c, 0) for c in LATENCY_CLASSES[: rank + 1])

    def wait_s(self, latency_class: str, model: ModelAdmission) -> float:
        """Estimated seconds until a new request of this class gets a slot.

        A slot frees every service_s / slots seconds. 24 ready slots, 0 free, 40 ahead,
        service 4 s -> (40 + 1) x 4 / 24 = 6.8 s. No ready worker: a cold start first, then
        one new worker's slots: 30 s + (12 + 1 - 8) x 4 / 8 = 32.5 s."""
        ahead = self.waiting_ahead(latency_class)
        service_s = self.mean_service_s or model.service_s
        if self.free_slots > ahead:
            return 0.0
        if self.ready_slots > 0:
            return (ahead - self.free_slots + 1) * service_s / self.ready_slots
        slots = model.slots_per_worker
        return model.cold_start_s + max(ahead + 1 - slots, 0) * service_s / slots

    def counted(self, latency_class: str) -> ModelLoad:
        queued = {**self.queued, latency_class: self.queued.get(latency_class, 0) + 1}
        return replace(self, queued=queued)

    def to_dict(self) -> dict[str, Any]:
        return {
            "queued": dict(self.queued),
            "ready_slots": self.ready_slots,
            "free_slots": self.free_slots,
            "mean_service_s": self.mean_service_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelLoad:
        return cls(
            {c: int(n) for c, n in data["queued"].items()},
            int(data["ready_slots"]),
            int(data["free_slots"]),
            data.get("mean_service_s"),
        )


@dataclass(frozen=True, slots=True)
class AdmissionState:
    """Token buckets per tenant and the last known load per model."""

    buckets: Mapping[str, TokenBucket] = field(default_factory=dict)
    loads: Mapping[str, ModelLoad] = field(default_factory=dict)

    def with_load(self, model: str, load: ModelLoad) -> AdmissionState:
        """The agent calls this when placement publishes a model's queue."""
        return replace(self, loads={**self.loads, model: load})

    def without_full_buckets(self, spec: AdmissionSpec, now: int) -> AdmissionState:
        """Drop buckets that have refilled: a full bucket is the same as none. Call it now
        and then to keep the state as small as the set of recently active tenants."""
        kept = {}
        for tenant, bucket in self.buckets.items():
            limit = spec.limit_for(tenant)
            if limit is not None and bucket.refilled(limit, now).tokens < limit.burst:
                kept[tenant] = bucket
        return replace(self, buckets=kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "buckets": {t: [b.tokens, b.updated_at] for t, b in self.buckets.items()},
            "loads": {m: load.to_dict() for m, load in self.loads.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdmissionState:
        return cls(
            {t: TokenBucket(float(x), int(at)) for t, (x, at) in data["buckets"].items()},
            {m: ModelLoad.from_dict(d) for m, d in data["loads"].items()},
        )


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    """One request's outcome. admit: `admitted` is what to produce on `ember.admitted`.
    defer: re-queue the request until `retry_at` (unix ms). reject: send `rejection(now)` on
    the request's reply topic. `inputs` are the numbers the outcome was decided on, for logs."""

    outcome: Outcome
    reason: str
    request: Request
    admitted: AdmittedRequest | None = None
    retry_at: int | None = None
    error_code: str | None = None
    inputs: Mapping[str, float | int | str | None] = field(default_factory=dict)

    def rejection(self, now: int) -> TokenChunk:
        """The lone terminal chunk that tells the client why (rejections only)."""
        if self.outcome != "reject" or self.error_code is None:
            raise ValueError(f"only a rejection has a rejection chunk, this is {self.outcome}")
        return TokenChunk(
            request_id=self.request.request_id,
            seq=0,
            finish_reason="rejected",
            error_code=self.error_code,
            error_message=self.reason[:1024],
            submitted_at=self.request.submitted_at,
            emitted_at=now,
        )


def estimate_prompt_tokens(request: Request, chars_per_token: float) -> int:
    """Token ids count exactly; text is estimated: 300 chars / 4 -> 75 tokens."""
    if request.prompt_token_ids is not None:
        return len(request.prompt_token_ids)
    return math.ceil(len(request.prompt or "") / chars_per_token)


def prompt_bucket(tokens: int, min_bucket: int) -> int:
    """The power of two at or above `tokens`, at least `min_bucket`: 75 -> 128, 3 -> 16."""
    return max(min_bucket, 1 << max(tokens - 1, 0).bit_length())


def _label(text: str) -> str:
    """An identifier as it may appear in a reason: printable, at most 80 chars."""
    return text[:80] + ("..." if len(text) > 80 else "")


def admit(
    spec: AdmissionSpec, state: AdmissionState, request: Request, now: int
) -> tuple[AdmissionState, AdmissionResult]:
    """Admit, defer or reject `request` at `now` (unix ms); see the module docstring."""
    model = spec.models.get(request.model)
    if model is None:
        served = ", ".join(sorted(_label(m) for m in spec.models)[:10]) or "none"
        why = f"model {_label(request.model)!r} is not served here (served: {served})"
        return state, _reject(request, "unknown_model", why)

    cls: LatencyClass = request.latency_class
    tokens = estimate_prompt_tokens(request, spec.chars_per_token)
    if tokens + request.max_tokens > model.context_tokens:
        why = (
            f"prompt of about {tokens} tokens plus max_tokens {request.max_tokens} exceeds the "
            f"model's context of {model.context_tokens} tokens"
        )
        return state, _reject(request, "prompt_too_long", why, prompt_tokens=tokens)

    deadline = request.deadline_at
    if deadline is not None and now >= deadline:
        why = f"deadline_at passed {(now - deadline) / SECOND_MS:.1f} s before admission"
        return state, _reject(request, "deadline_exceeded", why)

    tenant = request.tenant or ""
    limit = spec.limit_for(tenant)
    bucket = None
    if limit is not None:
        bucket = state.buckets.get(tenant, TokenBucket(limit.burst, now)).refilled(limit, now)
        if bucket.tokens < 1:
            why = (
                f"tenant {_label(tenant) or '(none)'} is over its rate limit of "
                f"{limit.rate_per_s:g} requests/s (burst {limit.burst:g}); retry in "
                f"{bucket.seconds_until_one(limit):.1f} s"
            )
            return state, _reject(request, RATE_LIMITED, why, tokens_left=bucket.tokens)

    load = state.loads.get(request.model, ModelLoad())
    queued = load.queued.get(cls, 0)
    total = sum(load.queued.values())
    bound = model.queue_bounds.get(cls, 0)
    wait_s = load.wait_s(cls, model)
    inputs: dict[str, float | int | str | None] = {
        "queued_class": queued,
        "queued_total": total,
        "bound": bound,
        "pressure_bound": model.pressure_bound,
        "wait_s": round(wait_s, 3),
        "prompt_tokens": tokens,
    }

    if cls not in spec.deferrable:
        if queued >= bound:
            why = f"{cls} queue of {_label(request.model)} is full ({queued} of {bound})"
            return state, _reject(request, "overloaded", why, **inputs)
    elif queued >= bound or total >= model.pressure_bound:
        return state, _defer(spec, request, now, cls, queued, bound, total, model, wait_s, inputs)

    if deadline is not None and now + ms(wait_s) >= deadline:
        why = (
            f"estimated wait {wait_s:.1f} s ({load.waiting_ahead(cls)} queued ahead, "
            f"{load.ready_slots} ready slots) starts it after its deadline in "
            f"{(deadline - now) / SECOND_MS:.1f} s"
        )
        return state, _reject(request, "deadline_exceeded", why, **inputs)

    admitted = AdmittedRequest(
        request=request,
        latency_class=cls,
        prompt_tokens=tokens,
        prompt_bucket=prompt_bucket(tokens, spec.min_bucket_tokens),
        admitted_at=now,
    )
    buckets = state.buckets
    if limit is not None and bucket is not None:
        buckets = {**buckets, tenant: TokenBucket(bucket.tokens - 1, now)}
    loads = {**state.loads, request.model: load.counted(cls)}
    why = f"{cls} admitted: {queued} queued in class (bound {bound}), wait ~{wait_s:.1f} s"
    result = AdmissionResult("admit", why, request, admitted=admitted, inputs=inputs)
    return AdmissionState(buckets, loads), result


def _reject(request: Request, code: str, why: str, **inputs: Any) -> AdmissionResult:
    return AdmissionResult("reject", why, request, error_code=code, inputs=inputs)


def _defer(
    spec: AdmissionSpec,
    request: Request,
    now: int,
    cls: str,
    queued: int,
    bound: int,
    total: int,
    model: ModelAdmission,
    wait_s: float,
    inputs: dict[str, float | int | str | None],
) -> AdmissionResult:
    """Batch under pressure: come back in defer_s, unless waiting cannot help."""
    pressure = (
        f"{cls} queue at its bound ({queued} of {bound})"
        if queued >= bound
        else f"model queue under pressure ({total} waiting, bound {model.pressure_bound})"
    )
    retry_at = now + ms(spec.defer_s)
    waited_s = (now - request.submitted_at) / SECOND_MS
    if retry_at - request.submitted_at > ms(spec.max_defer_s):
        why = f"{pressure}, and it has waited {waited_s:.0f} s of at most {spec.max_defer_s:.0f} s"
        return _reject(request, "overloaded", why, **inputs)
    deadline = request.deadline_at
    if deadline is not None and retry_at + ms(wait_s) >= deadline:
        why = (
            f"{pressure}; deferring {spec.defer_s:.0f} s plus a wait of ~{wait_s:.1f} s passes "
            f"its deadline in {(deadline - now) / SECOND_MS:.1f} s"
        )
        return _reject(request, "deadline_exceeded", why, **inputs)
    why = f"{pressure}: deferred {spec.defer_s:.0f} s so interactive traffic goes first"
    return AdmissionResult("defer", why, request, retry_at=retry_at, inputs=inputs)
