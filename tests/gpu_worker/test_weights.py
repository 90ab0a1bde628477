"""Checkpoint loading: HF name mapping, single vs sharded files, dtypes, and typed errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from gpu_worker.weights import (
    CheckpointNotFoundError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    UnsupportedModelError,
    WeightsError,
    build_meta_model,
    ember_to_hf_name,
    expected_shapes,
    hf_to_ember_name,
    load_model,
    plan_load,
    read_config,
    read_generation_config,
)

CONFIG = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def save_llama(path, dtype=torch.float32, **save_kwargs):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("single")
    save_llama(path)
    assert (path / "model.safetensors").is_file()
    return path


def test_sharded_and_single_file_load_the_same_tensors(single, tmp_path):
    save_llama(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    a, b = load_model(single), load_model(tmp_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_loaded_model_is_materialised_frozen_and_in_the_requested_dtype(single):
    model = load_model(single, dtype=torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad, name
    model.setup_caches(max_batch=2, max_seq_len=16)
    logits = model(
        torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), torch.tensor([1]), last_only=True
    )
    assert (
        logits.shape == (1, 96) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    )


def test_dtype_defaults_to_the_checkpoint_config(tmp_path):
    save_llama(tmp_path, dtype=torch.bfloat16)
    assert read_config(tmp_path).torch_dtype == torch.bfloat16
    assert load_model(tmp_path).output.weight.dtype == torch.bfloat16


def test_tied_embeddings_share_one_tensor(tmp_path):
    config = transformers.Qwen2Config(**CONFIG, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.output.weight is model.tok_embeddings.weight


def test_name_mapping_round_trips_for_every_parameter(single):
    model = build_meta_model(read_config(single))
    hf_names = set(load_file(single / "model.safetensors"))
    ours = set(model.state_dict())
    assert {ember_to_hf_name(n) for n in ours} == hf_names
    assert {hf_to_ember_name(n) for n in hf_names} == ours
    assert (
        hf_to_ember_name("model.layers.3.mlp.gate_proj.weight") == "layers.3.feed_forward.w1.weight"
    )
    assert hf_to_ember_name("model.layers.0.self_attn.q_norm.weight") is None
    with pytest.raises(KeyError):
        ember_to_hf_name("layers.0.attention.unknown.weight")


def test_meta_build_allocates_nothing(single):
    model = build_meta_model(read_config(single))
    assert all(p.is_meta for p in model.parameters())


def test_plan_is_a_pure_check_of_names_and_shapes():
    expected = {"tok_embeddings.weight": (8, 4), "norm.weight": (4,)}
    available = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,)}
    assert plan_load(expected, available) == {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
    }
    with pytest.raises(MissingTensorError, match="model.norm.weight"):
        plan_load(expected, {"model.embed_tokens.weight": (8, 4)})
    with pytest.raises(ShapeMismatchError, match=r"model.embed_tokens.weight.*\[8, 5\]"):
        plan_load(expected, {**available, "model.embed_tokens.weight": (8, 5)})
    with pytest.raises(UnexpectedTensorError, match="lm_head.weight"):
        plan_load(expected, {**available, "lm_head.weight": (8, 4)})
    assert plan_load(expected, {**available, "lm_head.weight": (8, 4)}, tie_embeddings=True)
    assert plan_load(expected, {**available, "model.layers.0.self_attn.rotary_emb.inv_freq": (2,)})


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_llama(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_bad_shape_is_named(tmp_path):
    save_llama(tmp_path)
    _rewrite(
        tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)})
    )
    with pytest.raises(
        ShapeMismatchError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\[8, 32\].*\[16, 32\]",
    ):
        load_model(tmp_path)


def test_missing_files(tmp_path, single):
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    with pytest.raises(CheckpointNotFoundError, match="model.safetensors"):
        load_model(tmp_path)
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointNotFoundError, match="model-00001-of-00002.safetensors"):
        load_model(tmp_path)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_damaged_files_are_named(tmp_path, single):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path, single):
    config = json.loads((single / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(tmp_path)


def test_read_generation_config(tmp_path):
    assert read_generation_config(tmp_path) == []
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert read_generation_config(tmp_path) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    assert read_generation_config(tmp_path) == [128001, 128009]


def test_expected_shapes_leave_out_a_tied_output():
    from gpu_worker.model import ModelConfig

    tied = ModelConfig(
        vocab_size=16, dim=8, n_layers=1, n_heads=2, intermediate_size=16, tie_embeddings=True
    )
    shapes = expected_shapes(build_meta_model(tied))
    assert "output.weight" not in shapes and shapes["tok_embeddings.weight"] == (16, 8)
