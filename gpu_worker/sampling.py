"""Per-request sampling over a batch of logits, reproducible whatever the batch-mates.

Each request carries `SamplingParams`; temperature 0 (or below 1e-5) is greedy (argmax).
Otherwise the row is divided by its temperature, cut to its top-k, then to its top-p (nucleus:
the smallest set of most likely tokens whose mass reaches p, after top-k; never empty), and one
token is drawn by inverse CDF: the kept probabilities are summed in vocabulary order and the
first token whose running sum passes u * total is taken, u ~ U[0, 1). The cuts are value thresholds, so ties are kept
together and no index sort is needed.

Reproducibility: u comes from the request's own `torch.Generator` (CPU, seeded from the request's
seed, or from a random seed when none is given), one draw per sampled token. Every other step is
row-wise, so a request's tokens depend on its seed and its logits only, not on which other
requests share the batch or on its row in it. The generator lives on the CPU, so a seed gives
the same u sequence on every device; the B uniforms cross to the device in one small copy.

Worked example: probabilities [0.15, 0.5, 0.05, 0.3], top_p = 0.7: sorted values 0.5, 0.3,
... reach 0.7 at 0.3, so tokens with p >= 0.3 are kept: [0, 0.5, 0, 0.3]; running sums
[0, 0.5, 0.5, 0.8]; u = 0.7 -> 0.7 * 0.8 = 0.56, the first sum above 0.56 is token 3.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_worker.scheduler import InvalidSamplingParams


# Temperatures below this are greedy: logits are scaled in float32, where dividing by a
# smaller one overflows to inf (or the temperature itself rounds to 0) and sampling breaks.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None  # None: a random seed per request
    stop: tuple[str, ...] = ()  # stop strings; not included in the output text
    stop_token_ids: tuple[int, ...] = ()  # ids that end the request besides EOS
    ignore_eos: bool = False  # benchmarks: run to max_tokens

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise InvalidSamplingParams("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator for one request, and the seed it got (random when `seed` is None)."""
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator, seed


@torch.inference_mode()
def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """logits [B, V] float -> token ids [B] int64 on the same device. No host sync on CUDA."""
    tokens = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    vocab = logits.shape[-1]
    picked = [params[i] for i in rows]
    sub = logits[rows] if len(rows) < len(params) else logits  # [R, V]
    temps = _on(device, [p.temperature for p in picked])
    scaled = sub.float() / temps[:, None]  # [R, V]
    top_k = [min(p.top_k, vocab) if p.top_k else vocab for p in picked]
    top_p = [p.top_p for p in picked]
    if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
        threshold = _top_k_top_p_threshold(scaled, top_k, top_p)  # [R, 1]
        scaled = scaled.masked_fill(scaled < threshold, -math.inf)
    probs = scaled.softmax(dim=-1)  # [R, V], 0 where cut

    cdf = probs.cumsum(dim=-1)  # [R, V], in vocabulary order: no index sort
    draws = [torch.rand((), generator=generators[i]) for i in rows]
    u = _on(device, torch.stack(draws))  # [R]
    total = cdf[:, -1:].contiguous()  # [R, 1]
    pick = torch.searchsorted(cdf, u[:, None] * total, right=True)  # [R, 1]
    # The first index where cdf > target is a kept token (cdf is flat over cut ones); float
    # rounding can push the target to the total, so clamp to the first index reaching it.
    last_kept = torch.searchsorted(cdf, total, right=False)
    chosen = torch.minimum(pick, last_kept).squeeze(-1)
    if len(rows) == len(params):
        return chosen
    return tokens.index_copy(0, _on(device, rows), chosen)


def _on(device: torch.device, data: list | torch.Tensor) -> torch.Tensor:
    """A small host list/tensor on `device`. On CUDA it goes through pinned memory, so the
    copy queues behind the model's kernels instead of waiting for them (a pageable copy syncs)."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _top_k_top_p_threshold(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """The smallest logit each row keeps [R, 1]: the k-th largest, raised to the smallest
    logit of the nucleus (top-p taken over what top-k left).

    Both are read from the row's sorted *values*, which do not depend on how ties are
    ordered, so neither does the result: a tie at the threshold keeps all its members. On
    CUDA the whole row is sorted (fast there, and no host sync); on CPU, where a full sort is
    the slowest part of a step, only the head is taken with topk and widened until it holds
    every row's nucleus.
    """
    vocab = scaled.shape[-1]
    device = scaled.device
    k = _on(device, top_k)[:, None]  # [R, 1], vocab where off
    p = _on(device, top_p)[:, None]  # [R, 1], 1 where off
    no_k = k == vocab
    open_nucleus = any(pv < 1 and kv == vocab for kv, pv in zip(top_k, top_p))
    width = max([kv for kv in top_k if kv < vocab], default=1)
    if open_nucleus:
        width = vocab if device.type == "cuda" else max(width, 64)
    while True:
        width = min(width, vocab)
        if width < vocab:
            head = scaled.topk(width, dim=-1).values  # [R, W], descending
        else:
            head = scaled.sort(dim=-1, descending=True).values
        kth = head.gather(-1, torch.clamp(k, max=width) - 1)  # [R, 1]
        threshold = torch.where(no_k, -math.inf, kth)
        if not any(pv < 1 for pv in top_p):
            return threshold
        head = head.masked_fill(torch.arange(width, device=device) >= k, -math.inf)
        log_total = torch.where(  # normalizer over what top-k kept
            no_k, scaled.logsumexp(dim=-1, keepdim=True), head.logsumexp(dim=-1, keepdim=True)
        )
        in_head = (head - log_total).exp()  # [R, W] probabilities, descending
        mass = in_head.cumsum(dim=-1)
        if width < vocab and bool(((mass[:, -1:] < p) & no_k).any()):  # CPU only: widen
            width *= 4
            continue
        # [R, 1]; at least the most likely token, whatever p (a tiny one rounds to 0 in fp32)
        count = ((mass - in_head) < p).sum(dim=-1, keepdim=True).clamp(min=1)
        tau = torch.where(p < 1, head.gather(-1, count - 1), -math.inf)
        return torch.maximum(threshold, tau)
