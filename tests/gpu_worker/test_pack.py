"""ember pack: layout (pure), index invariants, layer order, checksums, round-trip logits."""

from __future__ import annotations

import json
import zlib

import pytest
import torch

from gpu_worker.loader import load_runtime, open_artifact, stream_weights
from gpu_worker.pack import (
    INDEX_FILE,
    ArtifactError,
    PackError,
    block_ranges,
    layer_of,
    layer_rank,
    pack,
    plan_layout,
    read_index,
)
from gpu_worker.weights import build_meta_model, load_model


# ---- pure layout ----


def test_layer_of_and_rank():
    assert layer_of("tok_embeddings.weight") == "embed"
    assert layer_of("layers.12.feed_forward.w1.weight") == "layers.12"
    assert layer_of("norm.weight") == "norm"
    assert layer_of("output.weight") == "output"
    order = ["embed", "layers.0", "layers.2", "layers.10", "norm", "output"]
    assert sorted(reversed(order), key=layer_rank) == order
    with pytest.raises(ValueError):
        layer_of("rope.inv_freq")


def test_plan_layout_aligns_and_splits_at_layers():
    tensors = [
        ("tok_embeddings.weight", 100),
        ("layers.0.a.weight", 5000),
        ("layers.0.b.weight", 10),
        ("layers.1.a.weight", 5000),
        ("norm.weight", 8),
        ("output.weight", 9000),
    ]
    placed, layers, sizes = plan_layout(tensors, max_shard_bytes=16384, alignment=4096)
    for _, _, offset, _ in placed:
        assert offset % 4096 == 0
    assert all(size % 4096 == 0 for size in sizes)
    shard_of = {name: shard for name, shard, _, _ in placed}
    # a layer never straddles shards
    assert shard_of["layers.0.a.weight"] == shard_of["layers.0.b.weight"]
    assert [r.layer for r in layers] == ["embed", "layers.0", "layers.1", "norm", "output"]
    # embed 4096 + layers.0 (a: 5000 -> 8192, b: 4096) fill shard 0's 16384 bytes exactly
    assert shard_of["layers.1.a.weight"] == 1 and sizes[0] == 16384
    assert all(size <= 16384 for size in sizes)


def test_plan_layout_gives_an_oversized_layer_its_own_shard():
    placed, _, sizes = plan_layout(
        [("tok_embeddings.weight", 10), ("layers.0.a.weight", 50_000), ("norm.weight", 10)],
        max_shard_bytes=8192,
        alignment=4096,
    )
    assert [shard for _, shard, _, _ in placed] == [0, 1, 2]
    assert sizes[1] == 53248


def test_plan_layout_rejects_out_of_order_layers():
    with pytest.raises(ValueError, match="order"):
        plan_layout([("layers.1.a.weight", 4), ("layers.0.a.weight", 4)])
    with pytest.raises(ValueError, match="consecutive"):
        plan_layout([("layers.0.a.weight", 4), ("layers.1.a.weight", 4), ("layers.0.b.weight", 4)])


def test_block_ranges():
    assert block_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_ranges(8, 4) == [(0, 4), (4, 8)]
    assert block_ranges(0, 4) == []


# ---- the packed artifact ----


def test_index_invariants(packed):
    index = read_index(packed)
    assert len(index.shards) >= 2
    assert index.dtype == "float32" and index.block_digest == "crc32"
    for shard in index.shards:
        assert shard.nbytes % index.alignment == 0
        assert (packed / shard.file).stat().st_size == shard.nbytes
        assert len(shard.blocks) == len(block_ranges(shard.nbytes, index.block_bytes))
    ends: dict[int, int] = {}
    for t in index.tensors:
        assert t.offset % index.alignment == 0
        assert t.offset >= ends.get(t.shard, 0), f"{t.name} overlaps"
        assert t.offset + t.nbytes <= index.shards[t.shard].nbytes
        assert t.nbytes == 4 * torch.Size(t.shape).numel()
        ends[t.shard] = t.offset + t.nbytes
    for r in index.layers:
        members = [t for t in index.tensors if t.layer == r.layer]
        assert {t.shard for t in members} == {r.shard}
        assert r.start == members[0].offset and r.end == members[-1].offset + members[-1].nbytes


def test_tensors_are_in_layer_order(packed, tiny_dir):
    index = read_index(packed)
    config = index.config()
    layers = [t.layer for t in index.tensors]
    expected = ["embed"] + [f"layers.{i}" for i in range(config.n_layers)] + ["norm", "output"]
    assert list(dict.fromkeys(layers)) == expected
    positions = [(t.shard, t.offset) for t in index.tensors]
    assert positions == sorted(positions)
    assert {t.name for t in index.tensors} == set(load_model(tiny_dir).state_dict())


def test_bytes_and_checksums_match_the_checkpoint(packed, tiny_dir):
    index = read_index(packed)
    ref = load_model(tiny_dir).state_dict()
    for t in index.tensors:
        raw = (packed / index.shards[t.shard].file).read_bytes()[t.offset : t.offset + t.nbytes]
        assert raw == ref[t.name].contiguous().numpy().tobytes(), t.name
    for shard in index.shards:
        data = (packed / shard.file).read_bytes()
        for (start, end), digest in zip(block_ranges(len(data), index.block_bytes), shard.blocks):
            assert f"{zlib.crc32(data[start:end]):08x}" == digest


def test_snapshot_and_metadata_files_are_listed_with_checksums(packed):
    index = read_index(packed)
    assert {"snapshot/runtime.json", "snapshot/tokenizer.json"} <= set(index.snapshot_files)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (packed / name).is_file()
    text = (packed / INDEX_FILE).read_text()
    assert "pickle" not in text
    json.loads(text)  # plain JSON


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_logits_identical(tiny_dir, tmp_path, dtype):
    pack(tiny_dir, tmp_path / "p", dtype, progress=None)
    ref = load_model(tiny_dir, dtype=getattr(torch, dtype))
    model = build_meta_model(open_artifact(tmp_path / "p").index.config())
    stream_weights(tmp_path / "p", model, "cpu")
    assert model.tok_embeddings.weight.dtype == getattr(torch, dtype)
    for m in (ref, model):
        m.setup_caches(1, 32)
    tokens = torch.tensor([[1, 7, 42, 99, 3]])
    pos = torch.arange(5)[None]
    with torch.inference_mode():
        a = ref(tokens, pos, torch.tensor([0]))
        b = model(tokens, pos, torch.tensor([0]))
    assert torch.equal(a, b)


def test_packed_and_hf_engines_generate_the_same(tiny_dir, packed):
    from gpu_worker.sampling import SamplingParams

    params = SamplingParams(max_tokens=12, ignore_eos=True)
    texts = []
    for path in (tiny_dir, packed):
        engine = load_runtime(path, max_seq_len=64).engine
        outs = list(engine.generate("Hello café 你好", params))
        texts.append(([t for o in outs for t in o.token_ids], "".join(o.text for o in outs)))
    assert texts[0] == texts[1]


def test_pack_refuses_bad_arguments(tiny_dir, tmp_path):
    with pytest.raises(PackError):
        pack(tiny_dir, tiny_dir, progress=None)
    with pytest.raises(PackError):
        pack(tiny_dir, tmp_path, "int8", progress=None)
    with pytest.raises(PackError):
        pack(tiny_dir, tmp_path, block_digest_name="md5", progress=None)


def test_repacking_replaces_the_artifact(tiny_dir, tmp_path):
    pack(tiny_dir, tmp_path, max_shard_bytes=300_000, progress=None)
    assert len(list(tmp_path.glob("shard-*.bin"))) >= 2
    pack(tiny_dir, tmp_path, progress=None)
    assert len(list(tmp_path.glob("shard-*.bin"))) == 1 == len(read_index(tmp_path).shards)


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(ArtifactError, match="not a packed artifact"):
        read_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text('{"format": "ember-packed", "version": 99}')
    with pytest.raises(ArtifactError, match="version 99"):
        read_index(tmp_path)


def test_pack_cli(tiny_dir, tmp_path, capsys):
    from infra.cli import main

    assert main(["pack", str(tiny_dir), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert "packed" in capsys.readouterr().out
    assert read_index(tmp_path / "out").dtype == "bfloat16"
