"""Loader: the pure plan, the block pipeline (ring logic with an injected copy), the pipeline
states, damaged shards, the cache path, the cold-start dry run and its spans."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch

from gpu_worker.loader import (
    Artifact,
    Block,
    CorruptShardError,
    LoadState,
    TruncatedShardError,
    WeightStream,
    cold_start,
    fetch_artifact,
    load_runtime,
    make_arena,
    open_artifact,
    plan_stream,
    run_blocks,
    stream_weights,
)
from gpu_worker.pack import ArtifactError, read_index
from gpu_worker.spans import SpanRecorder
from gpu_worker.weights import (
    MissingTensorError,
    ShapeMismatchError,
    build_meta_model,
    expected_shapes,
    load_model,
)


def _meta(path):
    return build_meta_model(read_index(path).config())


# ---- plan (pure) ----


def test_plan_lists_every_block_in_shard_order(packed):
    index = read_index(packed)
    plan = plan_stream(index, expected_shapes(_meta(packed)))
    assert plan.total_bytes == index.total_bytes
    assert sum(b.nbytes for b in plan.blocks) == plan.total_bytes
    positions = [(b.shard, b.start) for b in plan.blocks]
    assert positions == sorted(positions)
    assert all(b.nbytes <= index.block_bytes for b in plan.blocks)
    first = plan.blocks[0]
    assert plan.tensors_in(first) == ["tok_embeddings.weight"]


def test_plan_checks_the_model_against_the_index(packed):
    index = read_index(packed)
    expected = expected_shapes(_meta(packed))
    with pytest.raises(MissingTensorError, match="bogus"):
        plan_stream(index, {**expected, "bogus.weight": (1,)})
    bad = dict(expected)
    bad["norm.weight"] = (3,)
    with pytest.raises(ShapeMismatchError, match="norm.weight"):
        plan_stream(index, bad)


def _with_tensor(index, i, **changes):
    tensors = list(index.tensors)
    tensors[i] = dataclasses.replace(tensors[i], **changes)
    return dataclasses.replace(index, tensors=tuple(tensors))


def test_plan_rejects_a_broken_index(packed):
    index = read_index(packed)
    with pytest.raises(ArtifactError, match="aligned"):
        plan_stream(_with_tensor(index, 1, offset=index.tensors[1].offset + 8))
    with pytest.raises(ArtifactError, match="overlaps"):
        plan_stream(_with_tensor(index, 2, offset=index.tensors[1].offset))
    with pytest.raises(ArtifactError, match="past the end"):
        plan_stream(_with_tensor(index, 0, offset=index.shards[0].nbytes))
    shards = list(index.shards)
    shards[0] = dataclasses.replace(shards[0], blocks=shards[0].blocks[:-1])
    with pytest.raises(ArtifactError, match="block checksums"):
        plan_stream(dataclasses.replace(index, shards=tuple(shards)))
    swapped = list(index.tensors)
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    with pytest.raises(ArtifactError):
        plan_stream(dataclasses.replace(index, tensors=tuple(swapped)))


# ---- the block pipeline, CPU-only, copy injected ----


class FakeCopy:
    """An asynchronous 'device copy' into a bytearray that finishes after `delay_s`, and
    checks that no ring buffer is rewritten while a copy from it is still in flight."""

    def __init__(self, size, delay_s=0.002):
        self.device = bytearray(size)
        self.delay_s = delay_s
        self.in_flight: dict[int, threading.Event] = {}
        self.order: list[int] = []
        self.lock = threading.Lock()
        self.max_in_flight = 0

    def __call__(self, block, slot, view):
        done = threading.Event()
        data = bytes(view)  # what the DMA would read...
        with self.lock:
            assert slot not in self.in_flight or self.in_flight[slot].is_set(), "buffer reused"
            self.in_flight[slot] = done
            self.order.append(block.start)
            self.max_in_flight = max(
                self.max_in_flight, sum(not e.is_set() for e in self.in_flight.values())
            )

        def finish():
            time.sleep(self.delay_s)
            self.device[block.start : block.end] = data
            done.set()

        threading.Thread(target=finish, daemon=True).start()

        class Handle:
            def wait(self):
                done.wait()

        return Handle()


def _blocks(size, block):
    return [Block(0, s, min(s + block, size), "") for s in range(0, size, block)]


@pytest.mark.parametrize("workers,slots", [(1, 1), (1, 3), (3, 2), (4, 6)])
def test_ring_pipeline_copies_every_block_without_reusing_a_busy_buffer(workers, slots):
    source = os.urandom(100_003)
    blocks = _blocks(len(source), 4096)
    copy = FakeCopy(len(source))
    ring = [memoryview(bytearray(4096)) for _ in range(slots)]
    reads: list[int] = []

    def read(block, view):
        reads.append(block.start)
        view[:] = source[block.start : block.end]

    stats = run_blocks(blocks, read=read, ring=ring, copy=copy, workers=workers)
    assert bytes(copy.device) == source  # every copy finished before run_blocks returned
    assert stats.blocks == len(blocks) and stats.bytes == len(source)
    assert sorted(reads) == [b.start for b in blocks]
    if workers == 1:
        assert reads == [b.start for b in blocks]  # strictly in layer order
        if slots > 1:
            assert copy.max_in_flight > 1  # block k+1 read while block k copies


def test_direct_pipeline_reads_into_the_targets_and_verifies():
    source = os.urandom(50_000)
    target = bytearray(len(source))
    verified: list[int] = []
    stats = run_blocks(
        _blocks(len(source), 8192),
        read=lambda b, v: v.__setitem__(slice(None), source[b.start : b.end]),
        verify=lambda b, v: verified.append(b.start),
        target=lambda b: memoryview(target)[b.start : b.end],
        workers=2,
    )
    assert bytes(target) == source and len(verified) == stats.blocks == 7


def test_pipeline_stops_at_the_first_error_and_waits_for_started_copies():
    source = os.urandom(40_000)
    copy = FakeCopy(len(source), delay_s=0.01)

    def verify(block, view):
        if block.start == 8192:
            raise CorruptShardError("bad block")

    with pytest.raises(CorruptShardError, match="bad block"):
        run_blocks(
            _blocks(len(source), 4096),
            read=lambda b, v: v.__setitem__(slice(None), source[b.start : b.end]),
            verify=verify,
            ring=[memoryview(bytearray(4096)) for _ in range(2)],
            copy=copy,
        )
    assert all(e.is_set() for e in copy.in_flight.values())
    assert len(copy.order) < 10  # did not go on to the end


def test_pipeline_argument_checks():
    with pytest.raises(ValueError):
        run_blocks([], read=lambda b, v: None)
    with pytest.raises(ValueError):
        run_blocks([], read=lambda b, v: None, ring=[memoryview(bytearray(1))])


# ---- the whole pipeline on CPU ----


def test_states_and_phases(packed, tiny_dir):
    model = _meta(packed)
    spans = SpanRecorder()
    stream = WeightStream(open_artifact(packed), "cpu", spans=spans, workers=2)
    assert stream.state is LoadState.NEW
    report = stream.run(model, expected_shapes(model))
    assert stream.state is LoadState.CONFIRMED
    assert [s.name for s in spans.spans] == [
        f"weights.{n}" for n in ("plan", "allocate", "copy", "restore", "confirm")
    ]
    assert report.bytes == read_index(packed).total_bytes and report.verified
    assert report.read_gbps > 0 and report.verify_gbps > 0 and report.total_gbps > 0
    ref = load_model(tiny_dir).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name
    with pytest.raises(RuntimeError, match="needs state"):
        stream.run(model, None)


@pytest.mark.parametrize("cpu_mode", ["mmap", "read"])
def test_parameters_share_the_shard_slab(packed, tiny_dir, cpu_mode):
    """No extra copy: parameters are views into the mapping or the memory read into."""
    model = _meta(packed)
    stream = WeightStream(open_artifact(packed), "cpu", cpu_mode=cpu_mode)
    stream.run(model, expected_shapes(model))
    slab_ptrs = {s.untyped_storage().data_ptr() for s in stream.slabs}
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() in slab_ptrs
    ref = load_model(tiny_dir).state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_arena_is_used_when_given(packed):
    model = _meta(packed)
    arena = make_arena(read_index(packed).total_bytes + 4096)
    stream_weights(packed, model, "cpu", arena=arena)
    assert model.norm.weight.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="arena holds"):
        stream_weights(packed, _meta(packed), "cpu", arena=make_arena(10))


@pytest.mark.parametrize("cpu_mode", ["mmap", "read"])
def test_corrupt_shard_is_named_with_its_tensors(damaged, cpu_mode):
    index = read_index(damaged)
    target = index.tensors[3]  # inside a layer, not the first block
    path = damaged / index.shards[target.shard].file
    data = bytearray(path.read_bytes())
    data[target.offset + 5] ^= 0x40
    path.write_bytes(bytes(data))
    model = _meta(damaged)
    stream = WeightStream(open_artifact(damaged), "cpu", cpu_mode=cpu_mode)
    with pytest.raises(CorruptShardError) as err:
        stream.run(model, None)
    message = str(err.value)
    assert index.shards[target.shard].file in message and target.name in message
    assert stream.state is LoadState.FAILED


def test_corruption_passes_unseen_only_without_verification(damaged):
    index = read_index(damaged)
    path = damaged / index.shards[-1].file
    data = bytearray(path.read_bytes())
    data[-index.alignment - 1] ^= 0x01  # a padding or tensor byte near the end
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError):
        stream_weights(damaged, _meta(damaged), "cpu")
    stream_weights(damaged, _meta(damaged), "cpu", verify=False)  # the documented opt-out


def test_truncated_and_missing_shards(damaged):
    index = read_index(damaged)
    path = damaged / index.shards[1].file
    path.write_bytes(path.read_bytes()[: index.shards[1].nbytes // 2])
    with pytest.raises(TruncatedShardError, match=index.shards[1].file):
        stream_weights(damaged, _meta(damaged), "cpu")
    path.unlink()
    with pytest.raises(TruncatedShardError, match="missing"):
        stream_weights(damaged, _meta(damaged), "cpu")


def test_short_read_mid_stream_is_a_truncation(damaged):
    """A shard that shrinks after the size check (a concurrent truncation) still fails cleanly."""
    artifact = open_artifact(damaged)
    stream = WeightStream(artifact, "cpu", cpu_mode="read")  # a mapped file would SIGBUS
    model = _meta(damaged)
    stream._step("plan", LoadState.NEW, LoadState.PLANNED, lambda: stream._plan(None))
    stream._step("allocate", LoadState.PLANNED, LoadState.ALLOCATED, stream._allocate)
    os.truncate(artifact.shard_paths[0], 100)
    with pytest.raises(TruncatedShardError, match="ends at byte"):
        stream._step("copy", LoadState.ALLOCATED, LoadState.COPIED, stream._copy)
    assert stream.state is LoadState.FAILED
    del model


# ---- through the node cache, and the cold path ----


def test_fetch_artifact_through_the_shard_cache_over_http(packed, tmp_path):
    from gpu_worker.shard_cache import HttpSource, ShardCache
    from tests.gpu_worker.http_server import ShardServer

    with ShardServer(packed) as server:
        cache = ShardCache(tmp_path / "cache", 1 << 30, durable=False)
        artifact = fetch_artifact(HttpSource(server.url), cache, tmp_path / "work")
        assert isinstance(artifact, Artifact)
        assert all(str(p).startswith(str(tmp_path / "cache")) for p in artifact.shard_paths)
        run = cold_start(artifact, max_seq_len=64)
        again = fetch_artifact(HttpSource(server.url), cache, tmp_path / "work2")
        shard = read_index(packed).shards[0].file
        assert server.counts(shard).gets >= 1
        gets = server.counts(shard).gets
        fetch_artifact(HttpSource(server.url), cache, tmp_path / "work3")
        assert server.counts(shard).gets == gets  # cached: not fetched again
    assert again.shard_paths == artifact.shard_paths
    assert run.first_token_ids


def test_hf_checkpoint_still_loads(tiny_dir):
    runtime = load_runtime(tiny_dir, max_seq_len=64)
    assert not runtime.packed and runtime.load is None
    assert "weights_available" in runtime.spans.names()


def test_dtype_mismatch_is_refused(packed):
    with pytest.raises(ArtifactError, match="--dtype bfloat16"):
        load_runtime(packed, dtype="bfloat16")


@pytest.mark.parametrize("kind", ["packed", "hf"])
def test_dry_run_prints_all_spans(kind, packed, tiny_dir, capsys):
    from infra.cli import main

    path = packed if kind == "packed" else tiny_dir
    assert main(["cold-start-dry-run", str(path), "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    names = ["process_ready", "weights_available", "engine_build", "warm_up", "runtime_ready",
             "first_token"]
    if kind == "packed":
        names += ["snapshot_restore"] + [
            f"weights.{n}" for n in ("plan", "allocate", "copy", "restore", "confirm")
        ]
    else:
        names += ["tokenizer_load"]
    for name in names:
        assert f"\n{name} " in out, name
    assert "GB/s" in out and "first token after" in out


def test_dry_run_json(packed, capsys):
    import json

    from infra.cli import main

    assert main(["cold-start-dry-run", str(packed), "--max-seq-len", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    spans = {s["name"]: s for s in result["spans"]}
    assert spans["weights.copy"]["attrs"]["gbps"] > 0
    assert spans["first_token"]["start_ms"] >= spans["runtime_ready"]["duration_ms"] - 1e-3
    assert result["first_token_ids"]


def test_worker_load_engine_uses_the_packed_path(packed, tiny_dir):
    from gpu_worker.worker import WorkerConfig, load_engine

    for path in (packed, tiny_dir):
        engine = load_engine(WorkerConfig(model="tiny", model_dir=path, max_seq_len=64))
        names = [s.name for s in engine.cold_start_spans]
        assert "weights_available" in names
        assert ("snapshot_restore" in names) == (path == packed)
