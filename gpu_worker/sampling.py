"""Per-request sampling over a batch of logits, reproducible whatever the batch-mates.

Each request carries `SamplingParams`; temperature 0 is greedy (argmax). Otherwise the row is
divided by its temperature, cut to its top-k, then to its top-p (nucleus: the smallest set of
most likely tokens whose mass reaches p, after top-k), and one token is drawn by inverse CDF:
the row's probabilities, sorted (stably) in decreasing order, are summed and the first token
whose running sum passes u * total is taken, u ~ U[0, 1).

Reproducibility: u comes from the request's own `torch.Generator` (CPU, seeded from the request's
seed, or from a random seed when none is given), one draw per sampled token. Every other step is
row-wise, so a request's tokens depend on its seed and its logits only, not on which other
requests share the batch or on its row in it. The generator lives on the CPU, so a seed gives
the same u sequence on every device; the B uniforms cross to the device in one small copy.

Worked example: probabilities sorted [0.5, 0.3, 0.15, 0.05], top_p = 0.7 keeps [0.5, 0.3]
(0.5 < 0.7, and 0.5 + 0.3 reaches it); running sums [0.5, 0.8]; u = 0.7 -> 0.7 * 0.8 = 0.56,
the first sum above 0.56 is 0.8: the second token.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpu_worker.scheduler import InvalidSamplingParams


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
        return self.temperature == 0


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
    """logits [B, V] float -> token ids [B] int64 on the same device. No host sync."""
    tokens = logits.argmax(dim=-1)  # [B]
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    vocab = logits.shape[-1]
    picked = [params[i] for i in rows]
    sub = logits[rows] if len(rows) < len(params) else logits  # [R, V]
    temps = torch.tensor([p.temperature for p in picked], device=device)
    scaled = sub.float() / temps[:, None]
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True, stable=True)  # [R, V]

    if any(p.top_k for p in picked):
        top_k = torch.tensor([p.top_k or vocab for p in picked], device=device)
        beyond = torch.arange(vocab, device=device)[None, :] >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(beyond, -math.inf)
    probs = sorted_logits.softmax(dim=-1)
    if any(p.top_p < 1 for p in picked):
        top_p = torch.tensor([p.top_p for p in picked], device=device)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above
        probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)

    cdf = probs.cumsum(dim=-1)  # [R, V]
    draws = [torch.rand((), generator=generators[i]) for i in rows]
    u = torch.stack(draws).to(device=device, non_blocking=True)  # [R]
    target = (u * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True)  # [R, 1]
    kept = (probs > 0).sum(dim=-1, keepdim=True)  # float rounding could step past the last one
    pick = torch.minimum(pick, kept - 1)
    chosen = sorted_ids.gather(-1, pick).squeeze(-1)  # [R]
    if len(rows) == len(params):
        return chosen
    return tokens.index_copy(0, torch.tensor(rows, device=device), chosen)
