"""ShardPrefetch: torch-free mapping and verification before the import; the loader builds the
parameters on its mappings, checks its digests against the index, and reports corruption and
truncation exactly as without it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpu_worker.loader import CorruptShardError, TruncatedShardError, WeightStream, cold_start
from gpu_worker.loader import open_artifact
from gpu_worker.pack import read_index
from gpu_worker.prefetch import ShardPrefetch, fetch_artifact_files
from gpu_worker.weights import build_meta_model, expected_shapes, load_model


def _meta(path):
    return build_meta_model(read_index(path).config())


def test_prefetch_module_does_not_import_torch(packed):
    code = (
        "import sys; from gpu_worker.prefetch import ShardPrefetch; "
        f"p = ShardPrefetch({str(packed)!r}); p.wait(); "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert p.error is None and p.finished is not None; print(p.attrs()['prefetch_blocks'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    index = read_index(packed)
    assert int(out.stdout) == sum(len(s.blocks) for s in index.shards)


def test_loader_uses_the_prefetched_mappings_and_digests(packed, tiny_dir, monkeypatch):
    prefetch = ShardPrefetch(packed, workers=2)
    prefetch.wait()
    import gpu_worker.loader as loader

    calls = []
    real = loader.block_digest
    monkeypatch.setattr(loader, "block_digest", lambda *a: calls.append(a) or real(*a))
    model = _meta(packed)
    stream = WeightStream(open_artifact(packed), "cpu", prefetch=prefetch)
    stream.run(model, expected_shapes(model))
    assert calls == []  # every digest came from the prefetch
    assert stream._prefetched == set(range(len(read_index(packed).shards)))
    mapped = {s.untyped_storage().data_ptr() for s in stream.slabs}
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() in mapped
    ref = load_model(tiny_dir).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_corruption_found_by_the_prefetch_is_reported_by_the_loader(damaged):
    index = read_index(damaged)
    target = index.tensors[3]
    path = damaged / index.shards[target.shard].file
    data = bytearray(path.read_bytes())
    data[target.offset + 5] ^= 0x40
    path.write_bytes(bytes(data))
    prefetch = ShardPrefetch(damaged)
    stream = WeightStream(open_artifact(damaged), "cpu", prefetch=prefetch)
    with pytest.raises(CorruptShardError) as err:
        stream.run(_meta(damaged), None)
    assert target.name in str(err.value)


def test_a_short_shard_is_left_to_the_loader(damaged):
    index = read_index(damaged)
    path = damaged / index.shards[0].file
    path.write_bytes(path.read_bytes()[:-4096])
    prefetch = ShardPrefetch(damaged)
    prefetch.wait()
    assert prefetch.mapping(0, path, index.shards[0].nbytes) is None
    with pytest.raises(TruncatedShardError):
        WeightStream(open_artifact(damaged), "cpu", prefetch=prefetch).run(_meta(damaged), None)


def test_no_index_is_not_an_error_until_the_loader_runs(tmp_path):
    prefetch = ShardPrefetch(tmp_path)
    assert prefetch.error is not None
    assert prefetch.wait() >= 0
    assert prefetch.digest("crc32", 0, 0, 16384) is None


def test_prefetch_of_another_artifact_is_not_trusted(packed, damaged):
    index = read_index(damaged)
    path = damaged / index.shards[0].file
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    prefetch = ShardPrefetch(packed)  # the intact copy: other files
    with pytest.raises(CorruptShardError):
        WeightStream(open_artifact(damaged), "cpu", prefetch=prefetch).run(_meta(damaged), None)


def test_cold_start_through_the_cache_with_a_prefetch(packed, tmp_path):
    from gpu_worker.shard_cache import HttpSource, ShardCache
    from tests.gpu_worker.http_server import ShardServer

    with ShardServer(packed) as server:
        cache = ShardCache(tmp_path / "cache", 1 << 30, durable=False)
        workdir = fetch_artifact_files(HttpSource(server.url), cache, tmp_path / "work")
    prefetch = ShardPrefetch(workdir)
    run = cold_start(workdir, max_seq_len=64, prefetch=prefetch)
    attrs = run.spans.get("weights.copy").attrs
    assert attrs["prefetched_shards"] == len(read_index(packed).shards)
    reference = cold_start(packed, max_seq_len=64)
    assert run.first_token_ids == reference.first_token_ids
