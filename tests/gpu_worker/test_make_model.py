"""Generated checkpoints: deterministic, loadable by transformers, with a byte-level tokenizer."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from gpu_worker.make_model import BOS, EOS, SIZES, hf_config, make_model, plan_shards
from gpu_worker.model import ModelConfig
from gpu_worker.weights import build_meta_model, expected_shapes, load_model, read_generation_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"))


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    assert _files(make_model("tiny", tmp_path / "again")) == _files(tiny)
    other = _files(make_model("tiny", tmp_path / "other", seed=1))
    shard = "model-00001-of-00002.safetensors"
    assert other[shard] != _files(tiny)[shard]


def test_layout_is_hugging_face_sharded(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards <= names
    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"


def test_tokenizer_round_trips_multibyte_text_and_has_llama3_specials(tiny):
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    config = json.loads((tiny / "config.json").read_text())
    assert tok.get_vocab_size() == config["vocab_size"] == SIZES["tiny"].vocab_size
    text = "Crème brûlée in Zürich, 東京 and 北京 🚀👍🏽 — 42 items\n\tdef f(x): x"
    ids = tok.encode(text).ids
    assert ids[0] == tok.token_to_id(BOS)  # the post-processor adds BOS, as Llama 3's does
    assert tok.decode(ids) == text
    assert len(tok.encode("🚀", add_special_tokens=False).ids) > 1  # one character, several tokens
    assert read_generation_config(tiny) == [tok.token_to_id(EOS)] == [config["eos_token_id"]]


@torch.no_grad()
def test_transformers_loads_it_and_agrees_with_ours(tiny):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()
    ours = load_model(tiny)
    ours.setup_caches(max_batch=1, max_seq_len=64)
    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode("hello café 你好").ids
    n = len(ids)
    got = ours(torch.tensor([ids]), torch.arange(n)[None], torch.tensor([0]))
    torch.testing.assert_close(got, hf(torch.tensor([ids])).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_tiny_generates_varied_tokens_fast(tiny):
    model = load_model(tiny)
    model.setup_caches(max_batch=1, max_seq_len=128)
    model(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]))  # first call: kernel set-up
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small only loses from threads on a shared machine
    try:
        t0 = time.perf_counter()
        ids, out = [1, 2, 3], []
        logits = model(
            torch.tensor([ids]), torch.arange(3)[None], torch.tensor([0]), last_only=True
        )
        for pos in range(3, 35):
            out.append(int(logits.argmax(-1)))
            logits = model(
                torch.tensor([[out[-1]]]), torch.tensor([[pos]]), torch.tensor([0]), last_only=True
            )
        elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.0, f"32 tokens took {elapsed:.2f} s"
    assert len(set(out)) > 5


def test_medium_preset_is_about_a_gigabyte_in_float32():
    spec = SIZES["medium"]
    config = ModelConfig.from_hf(hf_config(spec, spec.vocab_size, 0, 1))
    n_params = sum(math.prod(s) for s in expected_shapes(build_meta_model(config)).values())
    assert 0.8e9 < 4 * n_params < 1.2e9


def test_shards_keep_layer_order_and_balance():
    shapes = {f"t{i}": (1000,) for i in range(10)}
    shards = plan_shards(shapes, max_shard_bytes=1 << 30)
    assert [n for s in shards for n in s] == list(shapes) and len(shards) == 2
    shards = plan_shards(shapes, max_shard_bytes=12_000)  # 40 kB in 4 shards of about 10 kB
    assert [n for s in shards for n in s] == list(shapes) and [len(s) for s in shards] == [
        3,
        2,
        3,
        2,
    ]


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        make_model("huge", tmp_path)
