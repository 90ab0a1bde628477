"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in plain PyTorch, numerically like Hugging Face.

The runtime owns the KV cache layout: `setup_caches(max_batch, max_seq_len)` allocates one static
[max_batch, n_kv_heads, max_seq_len, head_dim] buffer per layer, and every `forward` names the
cache row ("slot") and the absolute positions of each sequence, so sequences at different
positions share one batch (continuous batching) without any per-step allocation of caches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint's config describes something this model does not implement."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = -1  # -1: n_heads (multi-head attention)
    head_dim: int = -1  # -1: dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: bias on q, k, v
    out_bias: bool = False  # Llama attention_bias: bias on o as well
    tie_embeddings: bool = False
    sliding_window: int | None = None  # Mistral v0.1: attend to the last `sliding_window` positions
    dtype: str = "float32"  # checkpoint's torch_dtype
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.n_kv_heads == -1:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim == -1:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.dtype not in DTYPES:
            raise UnsupportedModelError(f"dtype {self.dtype!r} not one of {sorted(DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x spelling)."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({config.get('architectures')}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"hidden_act {config['hidden_act']!r} is not supported (silu only)"
            )
        if config.get("mlp_bias", False):
            raise UnsupportedModelError("mlp_bias=true is not supported")
        sliding_window = None
        if model_type == "mistral":
            sliding_window = config.get("sliding_window", 4096)
        elif model_type == "qwen2" and config.get("use_sliding_window", False):
            raise UnsupportedModelError("qwen2 use_sliding_window=true is not supported")
        attention_bias = bool(config.get("attention_bias", False))
        n_heads = config["num_attention_heads"]
        max_pos = config.get("max_position_embeddings", 4096)
        # transformers 5 writes rope_parameters (theta inside); 4.x rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            intermediate_size=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(rope, max_pos),
            max_position_embeddings=max_pos,
            qkv_bias=model_type == "qwen2" or attention_bias,
            out_bias=model_type != "qwen2" and attention_bias,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            dtype=config.get("torch_dtype") or config.get("dtype") or "float32",
            model_type=model_type,
        )


def _rope_scaling(rope: Mapping[str, Any], max_pos: int) -> RopeScaling | None:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            float(rope["factor"]),
            float(rope["low_freq_factor"]),
            float(rope["high_freq_factor"]),
            int(rope.get("original_max_position_embeddings", max_pos)),
        )
    raise UnsupportedModelError(
        f"rope type {rope_type!r} is not supported (default, linear, llama3)"
    )


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies [head_dim // 2] in float32, as transformers' ROPE_INIT_FUNCTIONS."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def precompute_rope(
    config: ModelConfig, seq_len: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos, sin tables [seq_len, head_dim], computed in float32 then cast (as HF does)."""
    inv_freq = rope_inv_freq(config).to(device)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [B, S, H, D]; cos, sin [B, S, 1, D]; HF "rotate_half" convention
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Step(NamedTuple):
    """Per-forward inputs every layer shares, computed once in `Transformer.forward`."""

    input_pos: Tensor  # [B, S] absolute positions
    slots: Tensor  # [B] cache row of each sequence
    rows: Tensor | slice  # cache rows to read: a slice (a view, no copy) when slots are consecutive
    kv_len: int  # cache positions read: 0 .. kv_len - 1
    cos: Tensor  # [B, S, 1, D]
    sin: Tensor  # [B, S, 1, D]
    mask: Tensor  # [B, 1, S, L] additive, in the model's dtype: 0 = attend, -inf = not


class KVCache(nn.Module):
    def __init__(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()  # shape [max_batch, n_kv_heads, max_seq_len, head_dim]
        self.register_buffer(
            "k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer(
            "v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False
        )

    def update(self, step: Step, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v [B, S, Hkv, D] -> cache[slots[b], :, input_pos[b, s]]
        self.k_cache[step.slots[:, None], :, step.input_pos] = k
        self.v_cache[step.slots[:, None], :, step.input_pos] = v
        # slice to the live length, then gather the rows
        k_all = self.k_cache[:, :, : step.kv_len][step.rows]  # [B, Hkv, L, D]
        v_all = self.v_cache[:, :, : step.kv_len][step.rows]
        return k_all, v_all


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.out_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, step: Step) -> Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim)  # [B, S, H, D]
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim)  # [B, S, Hkv, D]
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, step.cos, step.sin), apply_rope(k, step.cos, step.sin)
        k, v = self.kv_cache.update(step, k, v)  # [B, Hkv, L, D]
        if S == 1:  # decode: a kv head's query heads become query rows, so K/V are read once
            q = q.view(
                B, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
            )  # [B, Hkv, H/Hkv, D]
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=step.mask
            )  # mask [B, 1, 1, L] broadcasts
        else:
            q = q.transpose(1, 2)  # [B, H, S, D]
            gqa = self.n_heads != self.n_kv_heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, enable_gqa=gqa)
            y = y.transpose(1, 2)  # [B, S, H, D]
        return self.wo(y.reshape(B, S, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.intermediate_size, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: Tensor, step: Step) -> Tensor:
        h = x + self.attention(self.attention_norm(x), step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch = self.max_seq_len = -1
        self.register_buffer(
            "rope_cos", None, persistent=False
        )  # [max_seq_len, D], by setup_caches
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("positions", None, persistent=False)  # [max_seq_len]: 0, 1, 2, ...

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        if self.max_batch >= max_batch and self.max_seq_len >= max_seq_len:
            return
        weight = self.tok_embeddings.weight
        shape = (max_batch, self.config.n_kv_heads, max_seq_len, self.config.head_dim)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(shape, weight.dtype, weight.device)
        self.rope_cos, self.rope_sin = precompute_rope(
            self.config, max_seq_len, weight.dtype, weight.device
        )
        self.positions = torch.arange(max_seq_len, device=weight.device)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def forward(
        self, tokens: Tensor, input_pos: Tensor, slots: Tensor, last_only: bool = False
    ) -> Tensor:
        # tokens, input_pos [B, S]; slots [B] -> logits [B, S, V] (or [B, V] if last_only), float32
        if self.rope_cos is None:
            raise RuntimeError("call setup_caches(max_batch, max_seq_len) before forward")
        if _graph_capturing(tokens):
            # no host sync allowed: read the whole cache, the mask does the rest
            kv_len, rows = self.max_seq_len, slots
        else:
            kv_len = int(input_pos.max()) + 1  # host sync
            if kv_len > self.max_seq_len:
                raise ValueError(
                    f"position {kv_len - 1} is past the cache length {self.max_seq_len}"
                )
            rows = _slot_rows(slots)  # host sync
        k_pos = self.positions[:kv_len]  # [L]
        q_pos = input_pos.unsqueeze(-1)  # [B, S, 1]
        attend = k_pos <= q_pos  # [B, S, L]: causal within each slot
        if self.config.sliding_window is not None:
            attend &= k_pos > q_pos - self.config.sliding_window
        # Additive mask made once per forward; given a bool mask, sdpa converts it in every layer.
        mask = torch.zeros(attend.shape, dtype=self.rope_cos.dtype, device=attend.device)
        mask.masked_fill_(~attend, float("-inf"))
        cos = self.rope_cos[input_pos].unsqueeze(2)  # [B, S, 1, D]
        sin = self.rope_sin[input_pos].unsqueeze(2)
        step = Step(input_pos, slots, rows, kv_len, cos, sin, mask.unsqueeze(1))

        x = self.tok_embeddings(tokens)  # [B, S, dim]
        for layer in self.layers:
            x = layer(x, step)
        if last_only:
            x = x[:, -1]  # [B, dim]
        return self.output(self.norm(x)).float()


def _graph_capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _slot_rows(slots: Tensor) -> Tensor | slice:
    """Cache rows to read: a slice (a view, no copy) when slots are consecutive, else the index."""
    s = slots.tolist()  # host sync
    if s == list(range(s[0], s[0] + len(s))):
        return slice(s[0], s[0] + len(s))
    return slots
