"""Deterministic random Llama checkpoints in Hugging Face layout, for tests and benchmarks.

`make_model("tiny", out)` writes config.json, generation_config.json, sharded safetensors with
model.safetensors.index.json, and a byte-level BPE tokenizer (Llama 3 style: the Llama 3 split
regex, ByteLevel bytes, `<|begin_of_text|>` / `<|end_of_text|>` as BOS / EOS, BOS added by the
post-processor) trained here on a generated corpus that includes accented Latin, CJK and emoji,
so multi-byte characters span tokens. Same size and seed -> the same bytes in every file.
Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)

from gpu_worker.model import ModelConfig
from gpu_worker.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    build_meta_model,
    ember_to_hf_name,
    expected_shapes,
)

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer split pattern (tiktoken cl100k style).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
INIT_STD = 0.02


@dataclass(frozen=True)
class Size:
    vocab_size: int  # tokenizer and embedding rows, specials included
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    corpus_lines: int
    max_shard_bytes: int


SIZES = {
    # ~0.2 M params: a whole generation takes milliseconds on a CPU.
    "tiny": Size(512, 64, 2, 4, 2, 256, 2048, 3_000, 1 << 30),
    # ~242 M params, ~0.97 GB in float32: for loader and decode benchmarks.
    "medium": Size(8192, 1024, 20, 16, 4, 2816, 4096, 60_000, 400 << 20),
}


def hf_config(size: Size, vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": size.dim,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.n_layers,
        "num_attention_heads": size.n_heads,
        "num_key_value_heads": size.n_kv_heads,
        "head_dim": size.dim // size.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": size.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


# ---- corpus and tokenizer ----

_WORDS = (
    "the of and to in is that for it as with was on be by at this from or an are have not which "
    "one all were when we there can more if out so what up about into than them some time could "
    "model token worker kafka stream request reply batch cache weight shard layer warm cold start "
    "server queue topic partition offset latency first second minute hour day night light water"
).split()
_NON_ASCII = (
    "café naïve über São Paulo Ångström façade résumé piñata Zürich crème brûlée "
    "jalapeño déjà vu Straße Ærø Łódź čeština Ελληνικά русский язык עברית العربية हिन्दी "
    "你好世界 東京 日本語 北京欢迎你 中文字符 漢字 "
    "한국어 안녕하세요 ひらがな カタカナ "
    "🙂 🚀 👍🏽 ❤️ 🎉 👨‍👩‍👧 🌍 🔥 ✨ 🤖"
).split()
_SYLLABLES = (
    "ka ke ki ko ku ra re ri ro ru ta te ti to tu na ne ni no nu ma me mi mo mu sa se si so su "
    "la le li lo lu va ve vi vo vu ba be bi bo bu da de di do du ga ge gi go gu an en in on un "
    "ar er ir or ur al el il ol ul str pl tr gr br sh ch th qu"
).split()


def make_corpus(n_lines: int, seed: int) -> Iterator[str]:
    """Deterministic text: Zipf-ish words, made-up words, numbers, code, non-ASCII and emoji."""
    rng = random.Random(seed)
    made_up = sorted(
        {"".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(n_lines)}
    )
    vocab = _WORDS + made_up
    cum_weights = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(len(vocab))))
    for i in range(n_lines):
        words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(4, 16))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), rng.choice(_NON_ASCII))
        line = " ".join(words)
        kind = i % 10
        if kind == 0:
            price = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
            line = f"{line.capitalize()}, {rng.randint(0, 99999)} items at {price}."
        elif kind == 1:
            line = f"def {words[0]}(x, y={rng.randint(0, 9)}):\n    return x + y  # {words[-1]}"
        elif kind == 2:
            line = (
                f'"{words[0]}": {rng.randint(-500, 500)}, '
                + " ".join(rng.choices(_NON_ASCII, k=3))
                + "!"
            )
        yield line + "\n"


def train_tokenizer(vocab_size: int, n_lines: int, seed: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # the two specials are added after, at the end (as in Llama 3)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_corpus(n_lines, seed), trainer=trainer)
    tok.add_special_tokens(
        [
            AddedToken(BOS, special=True, normalized=False),
            AddedToken(EOS, special=True, normalized=False),
        ]
    )
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


# ---- weights ----


def _generator(seed: int, name: str) -> torch.Generator:
    """One generator per tensor, so each tensor's values do not depend on write order."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.empty(shape).normal_(0.0, INIT_STD, generator=_generator(seed, name))


def plan_shards(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive names (layer order) grouped into at least 2 shards of about equal bytes."""
    sizes = {name: 4 * math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    n_shards = max(2, math.ceil(total / max_shard_bytes))
    target = total / n_shards
    shards: list[list[str]] = [[]]
    done = 0
    for name, nbytes in sizes.items():
        if shards[-1] and done + nbytes / 2 > target * len(shards) and len(shards) < n_shards:
            shards.append([])
        shards[-1].append(name)
        done += nbytes
    return shards


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(
        json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def make_model(size: str, out_dir: Path, seed: int = 0, *, progress: bool | None = None) -> Path:
    """Write a random Llama checkpoint of a preset size to out_dir; returns out_dir."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    spec = SIZES[size]
    show = size != "tiny" if progress is None else progress
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def report(msg: str) -> None:
        if show:
            print(
                f"make-model {size}: {msg} [{time.perf_counter() - t0:.1f}s]",
                file=sys.stderr,
                flush=True,
            )

    tok = train_tokenizer(spec.vocab_size, spec.corpus_lines, seed)
    tok.save(str(out_dir / "tokenizer.json"))
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    report(f"tokenizer trained, vocab {vocab_size}")

    config = hf_config(spec, vocab_size, bos_id, eos_id)
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False},
    )
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": spec.max_position_embeddings,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )

    shapes = {
        ember_to_hf_name(n): s
        for n, s in expected_shapes(build_meta_model(ModelConfig.from_hf(config))).items()
    }
    shards = plan_shards(shapes, spec.max_shard_bytes)
    # New inodes, never rewritten in place: a process may still map the old shards.
    # The index goes first and comes back last, so a half-written directory does not load.
    for stale in [
        out_dir / INDEX_FILE,
        *out_dir.glob("model-*-of-*.safetensors"),
        out_dir / SINGLE_FILE,
    ]:
        stale.unlink(missing_ok=True)
    total_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: init_tensor(name, shapes[name], seed) for name in names}
        save_file(tensors, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        shard_mb = sum(t.nbytes for t in tensors.values()) / 1e6
        report(f"wrote shard {i}/{len(shards)} ({shard_mb:.0f} MB)")
        del tensors
    _write_json(
        out_dir / INDEX_FILE, {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    )
    n_params = sum(math.prod(s) for s in shapes.values())
    report(f"done: {n_params / 1e6:.1f} M params, {total_bytes / 1e9:.2f} GB")
    return out_dir
