"""The Llama-family model against Hugging Face transformers, on tiny random checkpoints (CPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

import gpu_worker.model
from gpu_worker.model import (
    ModelConfig,
    RopeScaling,
    Transformer,
    UnsupportedModelError,
    rope_inv_freq,
)
from gpu_worker.weights import load_model

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so scaling changes most frequencies
}
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "llama2_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3_rope_scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(hidden_size=48, head_dim=16, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "mistral_sliding_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2_bias_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def make_hf_model(family: str, seed: int = 0):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # move biases off zero and norms off one, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None  # always generate the full length
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy(model: Transformer, prompt_ids: list[int], n: int, slot: int = 0) -> list[int]:
    """Prefill the prompt into `slot`, then decode n tokens one step at a time."""
    model.setup_caches(max_batch=4, max_seq_len=64)
    pos = len(prompt_ids)
    logits = model(
        torch.tensor([prompt_ids]), torch.arange(pos)[None], torch.tensor([slot]), last_only=True
    )
    out: list[int] = []
    for _ in range(n):
        out.append(int(logits.argmax(-1)))
        logits = model(
            torch.tensor([[out[-1]]]), torch.tensor([[pos]]), torch.tensor([slot]), last_only=True
        )
        pos += 1
    return out


@torch.no_grad()
def test_prefill_logits_match_transformers(checkpoint):
    path, hf = checkpoint
    ours = load_model(path)
    ours.setup_caches(max_batch=3, max_seq_len=64)
    ids = prompt(20)
    expected = hf(torch.tensor([ids])).logits
    got = ours(torch.tensor([ids]), torch.arange(20)[None], torch.tensor([1]))
    assert got.dtype == torch.float32 and got.shape == (1, 20, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers(checkpoint):
    path, hf = checkpoint
    ids = prompt(9, seed=2)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, 9:].tolist()
    assert greedy(load_model(path), ids, 12, slot=2) == expected


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf_model("mistral_sliding_window").save_pretrained(path)  # GQA and a sliding window
    model = load_model(path)
    model.setup_caches(max_batch=4, max_seq_len=64)
    return model


def prefill_last(model: Transformer, ids: list[int], slot: int) -> torch.Tensor:
    return model(
        torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([slot]), last_only=True
    )[0]


@pytest.mark.parametrize("slots", [(2, 0), (1, 2)], ids=["gathered_rows", "consecutive_rows"])
@torch.no_grad()
def test_batched_decode_at_different_positions_matches_each_alone(llama, slots):
    a, b = prompt(7, seed=3), prompt(11, seed=4)
    prefill_last(llama, a, slots[0])
    prefill_last(llama, b, slots[1])
    for step in range(3):  # decode a few steps together; a is at 7.., b at 11..
        ta, tb = (step * 5 + 1) % VOCAB, (step * 7 + 2) % VOCAB
        got = llama(
            torch.tensor([[ta], [tb]]),
            torch.tensor([[len(a)], [len(b)]]),
            torch.tensor(slots),
            last_only=True,
        )
        a, b = [*a, ta], [*b, tb]
        alone = torch.stack(
            [prefill_last(llama, a, 3), prefill_last(llama, b, 3)]
        )  # slot 3: scratch
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_chunk_with_rows_at_different_start_positions(llama):
    a, b = prompt(12, seed=5), prompt(9, seed=6)
    prefill_last(llama, a[:8], 0)
    prefill_last(llama, b[:5], 3)
    got = llama(
        torch.tensor([a[8:12], b[5:9]]),
        torch.tensor([list(range(8, 12)), list(range(5, 9))]),
        torch.tensor([0, 3]),
    )  # [2, 4, V]
    want_a = llama(torch.tensor([a]), torch.arange(12)[None], torch.tensor([1]))[0, 8:]
    want_b = llama(torch.tensor([b]), torch.arange(9)[None], torch.tensor([1]))[0, 5:]
    torch.testing.assert_close(got, torch.stack([want_a, want_b]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_sync_free_path_for_cuda_graph_capture_gives_the_same_logits(llama, monkeypatch):
    """Under capture the model reads the whole cache and all rows by index, with no host sync."""
    a, b = prompt(6, seed=7), prompt(10, seed=8)
    prefill_last(llama, a, 1)
    prefill_last(llama, b, 2)
    args = torch.tensor([[3], [4]]), torch.tensor([[6], [10]]), torch.tensor([1, 2])
    eager = llama(*args, last_only=True)
    monkeypatch.setattr(gpu_worker.model, "_graph_capturing", lambda t: True)
    torch.testing.assert_close(llama(*args, last_only=True), eager, atol=1e-5, rtol=0)


def test_caches_are_static_and_in_model_dtype(llama):
    cache = llama.layers[0].attention.kv_cache
    c = llama.config
    assert cache.k_cache.shape == (4, c.n_kv_heads, 64, c.head_dim)
    assert cache.k_cache.dtype == llama.tok_embeddings.weight.dtype
    llama.setup_caches(max_batch=2, max_seq_len=32)  # smaller: keeps the buffers it has
    assert llama.layers[0].attention.kv_cache is cache


@torch.no_grad()
def test_forward_errors(llama):
    with pytest.raises(ValueError, match="past the cache length"):
        llama(torch.tensor([[1]]), torch.tensor([[64]]), torch.tensor([0]))
    fresh = Transformer(
        ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, intermediate_size=16)
    )
    with pytest.raises(RuntimeError, match="setup_caches"):
        fresh(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_close_to_transformers(tmp_path, dtype):
    make_hf_model("llama_gqa").save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=dtype)
    assert ours.tok_embeddings.weight.dtype == dtype
    ours.setup_caches(max_batch=1, max_seq_len=32)
    assert ours.layers[0].attention.kv_cache.k_cache.dtype == dtype
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    ids = prompt(16)
    got = ours(torch.tensor([ids]), torch.arange(16)[None], torch.tensor([0]))
    assert got.dtype == torch.float32
    expected = hf(torch.tensor([ids])).logits.float()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=0)


def test_llama3_inv_freq_matches_transformers():
    config = transformers.LlamaConfig(**{**COMMON, **FAMILIES["llama3_rope_scaling"][2]})
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = ModelConfig.from_hf(config.to_dict())
    torch.testing.assert_close(rope_inv_freq(ours), expected, atol=0, rtol=0)
    unscaled = rope_inv_freq(ModelConfig(dim=48, n_heads=4, head_dim=16, rope_theta=500000.0))
    assert not torch.equal(rope_inv_freq(ours), unscaled)


def test_from_hf_reads_transformers_4_spelling():
    config = ModelConfig.from_hf(
        {
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
    )
    assert (config.head_dim, config.n_kv_heads, config.rope_theta) == (128, 8, 500000.0)
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (
        config.torch_dtype == torch.bfloat16
        and not config.qkv_bias
        and config.sliding_window is None
    )
    linear = ModelConfig.from_hf(
        {**_small("llama"), "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert linear.rope_scaling == RopeScaling("linear", 2.0)


def _small(model_type: str) -> dict:
    return {
        "model_type": model_type,
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }


def test_from_hf_family_specifics_and_unsupported_configs():
    qwen = ModelConfig.from_hf({**_small("qwen2"), "tie_word_embeddings": True})
    assert qwen.qkv_bias and not qwen.out_bias and qwen.tie_embeddings and qwen.n_kv_heads == 2
    assert ModelConfig.from_hf({**_small("mistral"), "sliding_window": None}).sliding_window is None
    for bad in (
        {**_small("gpt2")},
        {**_small("llama"), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {**_small("llama"), "hidden_act": "gelu"},
        {**_small("qwen2"), "use_sliding_window": True},
    ):
        with pytest.raises(UnsupportedModelError):
            ModelConfig.from_hf(bad)
