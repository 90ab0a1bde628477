"""Streaming loader for packed artifacts (see gpu_worker.pack), and the cold path around it.

`stream_weights(artifact, model, device)` is a named pipeline with an explicit state:

    plan      (pure) index + expected shapes -> LoadPlan: every tensor's place checked, the
              blocks to read in layer order                             NEW -> PLANNED
    allocate  one uint8 slab per shard on the target device (torch.empty, nothing zeroed),
              shard files opened and their sizes checked                    -> ALLOCATED
    copy      blocks streamed into the slabs, each block's checksum verified -> COPIED
    restore   each parameter becomes a typed view into its slab, assigned to the meta-built
              model (no copy)                                              -> RESTORED
    confirm   device synchronized, every block accounted for              -> CONFIRMED
              (any failure: FAILED, and the error names the shard, bytes and tensors)

The copy step is `run_blocks`, one loop for both devices, with the device part injected:

  * CPU, `cpu_mode="mmap"` (the default): each shard is mapped (MAP_PRIVATE, never written)
    and the parameters are views into the mapping: no copy at all, the pages are the page
    cache's own, shared by every worker on the node. Verifying a block reads it through the
    mapping, which also maps it in; without verification pages map in at first use. On the
    development VM faulting in fresh anonymous memory costs ~1.4 s/GB, more than the read, so
    any copy loses to the mapping. The shard files must not be truncated in place while
    mapped (SIGBUS): the shard cache and `ember pack` replace files, never rewrite them.
  * CPU, `cpu_mode="read"` (or with an `arena`): read straight into the final memory. Each
    block is `preadv`'d into its place in the shard's slab (the slab *is* the parameters'
    storage), then its checksum verified. No staging buffer and no second copy.
  * CUDA: a ring of pinned host buffers. A worker takes a free buffer (waiting until the copy
    that last used it has finished), reads the next block into it, starts its host-to-device
    copy on a side stream, and verifies the block's checksum while the DMA runs. With W worker
    threads and W + 2 buffers, block k + 1 is being read while block k is copying.

A fresh process can hand the CPU mmap path a `prefetch` (gpu_worker.prefetch.ShardPrefetch,
torch-free), started before `import torch`: its threads map the shards and checksum every block
during the import, and the loader then uses those mappings as the slabs and checks the
prefetch's digests against the index instead of recomputing them.

`workers` threads take blocks in order (layer order), so reading, checksumming and copying of
neighbouring blocks overlap; `preadv`, zlib/hashlib and CUDA copies all release the GIL.

Checksums are verified on every load by default. `verify=False` skips them: the bytes were
verified when the shard entered the node (the shard cache checks each shard's sha256) and the
per-load check is CPU work on the critical path (gpu_worker.checksum: zlib-ng's CRC-32 runs at
~10 GB/s per core on the development VM, faster than the page cache can be read; the fallback,
zlib's, at ~3 GB/s), so skipping is for a node that trusts its local disk and wants the last
fraction of a second. Benchmarks report both.

`load_runtime(path, ...)` is the worker's cold path on either a packed artifact (snapshot
restore + streamed weights) or a plain Hugging Face checkpoint (weights.load_model +
Tokenizer.from_dir, the slower path), recording spans (gpu_worker.spans) as it goes.
"""

from __future__ import annotations

import enum
import itertools
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from gpu_worker.model import DTYPES, Transformer
from gpu_worker.pack import (
    INDEX_FILE,
    ArtifactError,
    ArtifactIndex,
    TensorEntry,
    block_digest,
    block_ranges,
    is_packed_artifact,
    layer_of,
    layer_rank,
    read_index,
)
from gpu_worker.prefetch import ShardPrefetch, fetch_artifact_files
from gpu_worker.spans import SpanRecorder
from gpu_worker.weights import (
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
    assign_weights,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "Block",
    "CorruptShardError",
    "LoadPlan",
    "LoadReport",
    "LoadState",
    "Runtime",
    "TruncatedShardError",
    "WeightStream",
    "fetch_artifact",
    "is_packed_artifact",
    "load_runtime",
    "make_arena",
    "open_artifact",
    "plan_stream",
    "run_blocks",
    "stream_weights",
]

GB = 1e9


class CorruptShardError(ArtifactError):
    """A block's checksum differs from the index: the shard file is damaged."""


class TruncatedShardError(ArtifactError):
    """A shard file is shorter (or longer) than the index says: a partial copy or download."""


class LoadState(enum.Enum):
    NEW = "new"
    PLANNED = "planned"
    ALLOCATED = "allocated"
    COPIED = "copied"
    RESTORED = "restored"
    CONFIRMED = "confirmed"
    FAILED = "failed"


# ---- artifacts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A packed artifact ready to load: its directory, index and where each shard lives."""

    root: Path
    index: ArtifactIndex
    shard_paths: tuple[Path, ...]


def open_artifact(root: str | os.PathLike[str]) -> Artifact:
    root = Path(root)
    index = read_index(root)
    return Artifact(root, index, tuple(root / s.file for s in index.shards))


def fetch_artifact(source: Any, cache: Any, workdir: str | os.PathLike[str]) -> Artifact:
    """Make the artifact at `source` (a gpu_worker.shard_cache.ShardSource) local through the
    node cache (a ShardCache): the index, the snapshot files and every shard are fetched once
    per node (verified against the index's sha256 and size); `workdir` gets symlinks to the
    cached files, so it opens like any artifact directory. (The torch-free part is
    gpu_worker.prefetch.fetch_artifact_files.)"""
    workdir = fetch_artifact_files(source, cache, workdir)
    index = read_index(workdir)
    paths = tuple((workdir / s.file).resolve() for s in index.shards)
    return Artifact(workdir, index, paths)


# ---- plan (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One read unit: bytes [start, end) of shard `shard`, and their expected checksum."""

    shard: int
    start: int
    end: int
    digest: str

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class LoadPlan:
    dtype: str
    shard_files: tuple[str, ...]
    shard_bytes: tuple[int, ...]
    blocks: tuple[Block, ...]  # in stream order: shard by shard, front to back (= layer order)
    tensors: tuple[TensorEntry, ...]  # in layer order
    digest: str
    block_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes)

    @property
    def max_block_bytes(self) -> int:
        return max((b.nbytes for b in self.blocks), default=0)

    def tensors_in(self, block: Block) -> list[str]:
        """Names of the tensors with bytes in `block` (for error messages)."""
        return [
            t.name
            for t in self.tensors
            if t.shard == block.shard and t.offset < block.end and t.offset + t.nbytes > block.start
        ]


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def plan_stream(
    index: ArtifactIndex, expected: Mapping[str, tuple[int, ...]] | None = None
) -> LoadPlan:
    """Check the index (and, given `expected` name -> shape, that it fits the model) and list
    the blocks to stream. Pure: touches no file.

    Example: one 40 KiB shard with block_bytes 16 KiB -> blocks [0, 16K), [16K, 32K), [32K, 40K).
    """
    shards = index.shards
    where = f"{INDEX_FILE}"
    prev: dict[int, tuple[int, str]] = {}
    last_rank: tuple[int, int] | None = None
    last_pos = (-1, -1)
    for t in index.tensors:
        if not 0 <= t.shard < len(shards):
            raise ArtifactError(f"{where}: {t.name} names shard {t.shard}, there are {len(shards)}")
        shard = shards[t.shard]
        if t.dtype != index.dtype:
            raise ArtifactError(f"{where}: {t.name} is {t.dtype}, the artifact is {index.dtype}")
        if t.nbytes != _ITEMSIZE[t.dtype] * math.prod(t.shape):
            raise ArtifactError(f"{where}: {t.name} has {t.nbytes} bytes for shape {list(t.shape)}")
        if t.offset % index.alignment:
            raise ArtifactError(f"{where}: {t.name} at offset {t.offset} is not aligned")
        if t.offset + t.nbytes > shard.nbytes:
            raise ArtifactError(f"{where}: {t.name} runs past the end of {shard.file}")
        end, other = prev.get(t.shard, (0, ""))
        if t.offset < end:
            raise ArtifactError(f"{where}: {t.name} overlaps {other} in {shard.file}")
        prev[t.shard] = (t.offset + t.nbytes, t.name)
        if layer_of(t.name) != t.layer:
            raise ArtifactError(f"{where}: {t.name} filed under layer {t.layer}")
        rank = layer_rank(t.layer)
        if (last_rank is not None and rank < last_rank) or (t.shard, t.offset) < last_pos:
            raise ArtifactError(f"{where}: {t.name} is out of layer order")
        last_rank, last_pos = rank, (t.shard, t.offset)

    if expected is not None:
        have = {t.name: t.shape for t in index.tensors}
        for name, shape in expected.items():
            if name not in have:
                raise MissingTensorError(f"{where}: artifact has no tensor {name!r}")
            if tuple(have[name]) != tuple(shape):
                raise ShapeMismatchError(
                    f"{where}: {name} has shape {list(have[name])}, the model needs {list(shape)}"
                )
        extra = sorted(set(have) - set(expected))
        if extra:
            raise UnexpectedTensorError(f"{where}: tensors the model does not use: {extra[:5]}")

    blocks: list[Block] = []
    for i, shard in enumerate(shards):
        ranges = block_ranges(shard.nbytes, index.block_bytes)
        if len(ranges) != len(shard.blocks):
            raise ArtifactError(
                f"{where}: {shard.file} has {len(shard.blocks)} block checksums for "
                f"{len(ranges)} blocks"
            )
        blocks.extend(Block(i, s, e, d) for (s, e), d in zip(ranges, shard.blocks))
    return LoadPlan(
        dtype=index.dtype,
        shard_files=tuple(s.file for s in shards),
        shard_bytes=tuple(s.nbytes for s in shards),
        blocks=tuple(blocks),
        tensors=tuple(index.tensors),
        digest=index.block_digest,
        block_bytes=index.block_bytes,
    )


# ---- the block pipeline (device-independent) ---------------------------------------------------


class Completion(Protocol):
    """An asynchronous copy; `wait()` returns once its source buffer may be reused."""

    def wait(self) -> None: ...


class _Done:
    def wait(self) -> None:
        return None


DONE: Completion = _Done()


@dataclass
class PipelineStats:
    blocks: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    read_s: float = 0.0  # summed over workers
    verify_s: float = 0.0
    copy_issue_s: float = 0.0
    buffer_wait_s: float = 0.0  # waiting for a ring buffer's previous copy
    workers: int = 1

    def gbps(self, seconds: float) -> float:
        return self.bytes / seconds / GB if seconds > 0 else 0.0


def run_blocks(
    blocks: Sequence[Block],
    *,
    read: Callable[[Block, memoryview], None],
    verify: Callable[[Block, memoryview], None] | None = None,
    target: Callable[[Block], memoryview] | None = None,
    ring: Sequence[memoryview] | None = None,
    copy: Callable[[Block, int, memoryview], Completion] | None = None,
    workers: int = 1,
) -> PipelineStats:
    """Stream `blocks` in order with `workers` threads.

    Direct mode (`target`): read each block into `target(block)` (its final place), verify.
    Ring mode (`ring` + `copy`): take a free ring buffer, wait for the copy that used it last,
    read into it, start `copy(block, slot, buffer)` (asynchronous), verify while it runs.
    The first error stops all workers; every started copy is waited for before returning or
    raising, so no buffer is released while a copy still reads it.
    """
    if (target is None) == (ring is None):
        raise ValueError("give exactly one of target (direct) and ring + copy (staged)")
    if ring is not None and (copy is None or not ring):
        raise ValueError("ring mode needs a non-empty ring and a copy function")
    workers = max(1, workers)
    stats = PipelineStats(workers=workers)
    lock = threading.Lock()
    next_block = iter(blocks)
    failed: list[BaseException] = []
    free: queue.Queue[int] = queue.Queue()
    pending: list[Completion] = [DONE] * (len(ring) if ring is not None else 0)
    for slot in range(len(pending)):
        free.put(slot)

    def take() -> Block | None:
        with lock:
            if failed:
                return None
            return next(next_block, None)

    def work() -> None:
        local = PipelineStats()
        try:
            while (block := take()) is not None:
                if ring is None:
                    view = target(block)  # type: ignore[misc]
                    t0 = time.perf_counter()
                    read(block, view)
                    t1 = time.perf_counter()
                    if verify is not None:
                        verify(block, view)
                    local.read_s += t1 - t0
                    local.verify_s += time.perf_counter() - t1
                else:
                    slot = free.get()
                    try:
                        t0 = time.perf_counter()
                        pending[slot].wait()
                        t1 = time.perf_counter()
                        view = ring[slot][: block.nbytes]
                        read(block, view)
                        t2 = time.perf_counter()
                        pending[slot] = copy(block, slot, view)  # type: ignore[misc]
                        t3 = time.perf_counter()
                        if verify is not None:
                            verify(block, view)
                        local.buffer_wait_s += t1 - t0
                        local.read_s += t2 - t1
                        local.copy_issue_s += t3 - t2
                        local.verify_s += time.perf_counter() - t3
                    finally:
                        free.put(slot)
                local.blocks += 1
                local.bytes += block.nbytes
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller thread
            with lock:
                failed.append(exc)
        finally:
            with lock:
                for name in ("blocks", "bytes", "read_s", "verify_s", "copy_issue_s"):
                    setattr(stats, name, getattr(stats, name) + getattr(local, name))
                stats.buffer_wait_s += local.buffer_wait_s

    started = time.perf_counter()
    if workers == 1:
        work()
    else:
        threads = [
            threading.Thread(target=work, name=f"weights-{i}", daemon=True) for i in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    try:
        for completion in pending:
            completion.wait()
    finally:
        stats.wall_s = time.perf_counter() - started
    if failed:
        raise failed[0]
    return stats


# ---- device parts ------------------------------------------------------------------------------


def _read_exact(fd: int, view: memoryview, offset: int, file: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise TruncatedShardError(
                f"{file}: ends at byte {offset + done}, the index says it holds bytes up to "
                f"{offset + len(view)} (truncated or partial download); re-fetch or repack it"
            )
        done += n


def _host_view(t: Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU uint8 tensor (shares its memory)."""
    return memoryview(t.numpy()).cast("B")


class _CudaCopier:
    """Host-to-device copies on one side stream; each copy returns a CUDA event to wait on."""

    def __init__(self, slabs: Sequence[Tensor], ring: Sequence[Tensor], device: torch.device):
        self.slabs = slabs
        self.ring = ring
        self.stream = torch.cuda.Stream(device=device)
        self.timed: list[tuple[Any, Any, int]] = []
        self._lock = threading.Lock()

    def __call__(self, block: Block, slot: int, view: memoryview) -> Completion:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            self.slabs[block.shard][block.start : block.end].copy_(
                self.ring[slot][: block.nbytes], non_blocking=True
            )
            end.record(self.stream)
        with self._lock:
            self.timed.append((start, end, block.nbytes))
        return _EventDone(end)

    def busy_seconds(self) -> float:
        """Time the copy engine spent on the copies (after they have all finished)."""
        return sum(s.elapsed_time(e) for s, e, _ in self.timed) / 1e3


class _EventDone:
    def __init__(self, event: Any) -> None:
        self.event = event

    def wait(self) -> None:
        self.event.synchronize()


# ---- the pipeline object -----------------------------------------------------------------------


@dataclass
class LoadReport:
    device: str
    bytes: int  # bytes streamed (tensor bytes plus alignment padding)
    tensor_bytes: int
    blocks: int
    workers: int
    verified: bool
    digest: str
    seconds: dict[str, float] = field(default_factory=dict)  # plan, allocate, copy, restore, ...
    read_gbps: float = 0.0  # bytes / (read seconds per worker)
    verify_gbps: float = 0.0
    copy_gbps: float = 0.0  # CUDA: host-to-device busy time; CPU: 0 (no copy)
    total_gbps: float = 0.0  # bytes / whole stream_weights wall time
    stream_gbps: float = 0.0  # bytes / the copy step's wall time

    def attrs(self) -> dict[str, float | int | str | bool]:
        return {
            "bytes": self.bytes,
            "gbps": round(self.total_gbps, 3),
            "stream_gbps": round(self.stream_gbps, 3),
            "read_gbps": round(self.read_gbps, 3),
            "verify_gbps": round(self.verify_gbps, 3),
            "copy_gbps": round(self.copy_gbps, 3),
            "verified": self.verified,
            "workers": self.workers,
        }


class WeightStream:
    """plan -> allocate -> copy -> restore -> confirm for one artifact onto one device."""

    def __init__(
        self,
        artifact: Artifact,
        device: str | torch.device = "cpu",
        *,
        verify: bool = True,
        workers: int | None = None,
        ring_buffers: int | None = None,
        spans: SpanRecorder | None = None,
        arena: Tensor | None = None,
        cpu_mode: str = "mmap",
        prefetch: ShardPrefetch | None = None,
    ) -> None:
        if cpu_mode not in ("mmap", "read"):
            raise ValueError(f"cpu_mode must be 'mmap' or 'read', got {cpu_mode!r}")
        self.artifact = artifact
        self.arena = arena
        self.mapped = self.device_is_cpu(device) and cpu_mode == "mmap" and arena is None
        self.device = torch.device(device)
        self.verify = verify
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.ring_buffers = ring_buffers or self.workers + 2
        self.spans = spans
        self.state = LoadState.NEW
        self.plan: LoadPlan | None = None
        self.slabs: list[Tensor] = []
        self.tensors: dict[str, Tensor] = {}
        self.stats: PipelineStats | None = None
        self._fds: list[int] = []
        self._copier: _CudaCopier | None = None
        self._ring: list[Tensor] = []
        self.seconds: dict[str, float] = {}
        self.prefetch = prefetch if self.mapped else None
        self._prefetched: set[int] = set()  # shards mapped (and verified) by the prefetch

    # each step: check the state, time it, record a span, move the state on

    def _step(self, name: str, want: LoadState, to: LoadState, fn: Callable[[], Any]) -> Any:
        if self.state is not want:
            raise RuntimeError(
                f"{name}() needs state {want.value}, the loader is {self.state.value}"
            )
        t0 = time.perf_counter()
        span_start = self.spans.now() if self.spans else 0.0
        try:
            result = fn()
        except BaseException:
            self.state = LoadState.FAILED
            self._close()
            raise
        self.seconds[name] = time.perf_counter() - t0
        if self.spans is not None:
            self.spans.add(f"weights.{name}", span_start, self.spans.now(), **self._attrs(name))
        self.state = to
        return result

    def _attrs(self, name: str) -> dict[str, Any]:
        if name == "copy" and self.stats is not None and self.plan is not None:
            s = self.stats
            attrs: dict[str, Any] = {
                "gbps": round(s.gbps(s.wall_s), 3),
                "read_gbps": round(s.gbps(s.read_s / s.workers), 3),
                "verify_gbps": round(s.gbps(s.verify_s / s.workers), 3) if self.verify else 0.0,
                "blocks": s.blocks,
            }
            if self._copier is not None:
                attrs["copy_gbps"] = round(s.gbps(self._copier.busy_seconds()), 3)
            if self.prefetch is not None:
                attrs |= self.prefetch.attrs() | {"prefetched_shards": len(self._prefetched)}
            return attrs
        if name == "plan" and self.plan is not None:
            return {
                "bytes": self.plan.total_bytes,
                "blocks": len(self.plan.blocks),
                "mode": "cuda-ring" if self._is_cuda() else ("mmap" if self.mapped else "read"),
            }
        return {}

    def _is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def run(self, model: Transformer, expected: Mapping[str, tuple[int, ...]] | None) -> LoadReport:
        t0 = time.perf_counter()
        self._step("plan", LoadState.NEW, LoadState.PLANNED, lambda: self._plan(expected))
        self._step("allocate", LoadState.PLANNED, LoadState.ALLOCATED, self._allocate)
        self._step("copy", LoadState.ALLOCATED, LoadState.COPIED, self._copy)
        self._step("restore", LoadState.COPIED, LoadState.RESTORED, lambda: self._restore(model))
        self._step("confirm", LoadState.RESTORED, LoadState.CONFIRMED, self._confirm)
        return self._report(time.perf_counter() - t0)

    def _plan(self, expected: Mapping[str, tuple[int, ...]] | None) -> None:
        self.plan = plan_stream(self.artifact.index, expected)

    def _allocate(self) -> None:
        plan = self.plan
        assert plan is not None
        for path, nbytes in zip(self.artifact.shard_paths, plan.shard_bytes):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise TruncatedShardError(f"{path}: shard file missing") from None
            self._fds.append(fd)
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise TruncatedShardError(
                    f"{path}: {size} bytes, the index says {nbytes} (truncated or partial "
                    "download); re-fetch or repack it"
                )
            if hasattr(os, "posix_fadvise"):  # sequential: bigger kernel readahead
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        if self.mapped:
            self.slabs = []
            for i, (fd, path, n) in enumerate(
                zip(self._fds, self.artifact.shard_paths, plan.shard_bytes)
            ):
                mapping = self.prefetch.mapping(i, path, n) if self.prefetch else None
                if mapping is None:
                    self.slabs.append(self._map(fd, n))
                else:  # the prefetch's own mapping: its digests are of these very pages
                    self.slabs.append(torch.frombuffer(mapping, dtype=torch.uint8))
                    self._prefetched.add(i)
        else:
            self.slabs = self._slabs(plan)
        if self.device.type == "cuda":
            self._ring = [
                torch.empty(plan.block_bytes, dtype=torch.uint8, pin_memory=True)
                for _ in range(min(self.ring_buffers, max(1, len(plan.blocks))))
            ]
            self._copier = _CudaCopier(self.slabs, self._ring, self.device)

    @staticmethod
    def device_is_cpu(device: str | torch.device) -> bool:
        return torch.device(device).type == "cpu"

    @staticmethod
    def _map(fd: int, nbytes: int) -> Tensor:
        prot = mmap.PROT_READ | mmap.PROT_WRITE  # writable for torch; MAP_PRIVATE: never written
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=prot)
        mapping.madvise(mmap.MADV_WILLNEED)  # start readahead now (a cold page cache)
        return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive

    def _slabs(self, plan: LoadPlan) -> list[Tensor]:
        if self.arena is None:
            return [torch.empty(n, dtype=torch.uint8, device=self.device) for n in plan.shard_bytes]
        arena = self.arena
        if arena.dtype != torch.uint8 or arena.dim() != 1 or arena.device != self.device:
            raise ValueError(f"the arena must be a 1-D uint8 tensor on {self.device}")
        if arena.numel() < plan.total_bytes:
            raise ValueError(f"the arena holds {arena.numel()} bytes, {plan.total_bytes} needed")
        offsets = [0, *itertools.accumulate(plan.shard_bytes)]
        return [arena[a:b] for a, b in itertools.pairwise(offsets)]

    def _copy(self) -> None:
        plan = self.plan
        assert plan is not None
        files = [str(p) for p in self.artifact.shard_paths]
        fds = self._fds

        def read(block: Block, view: memoryview) -> None:
            if not mapped:  # mapped: the bytes are already there
                _read_exact(fds[block.shard], view, block.start, files[block.shard])

        mapped = self.mapped

        prefetch, prefetched = self.prefetch, self._prefetched

        def verify(block: Block, view: memoryview) -> None:
            actual = None
            if prefetch is not None and block.shard in prefetched:
                actual = prefetch.digest(plan.digest, block.shard, block.start, block.end)
            if actual is None:
                actual = block_digest(plan.digest, view)
            if actual != block.digest:
                names = plan.tensors_in(block)
                shown = ", ".join(names[:4])
                if len(names) > 4:
                    shown += f" and {len(names) - 4} more"
                raise CorruptShardError(
                    f"{files[block.shard]}: bytes [{block.start}, {block.end}) have {plan.digest} "
                    f"{actual}, the index says {block.digest} "
                    f"(tensors: {shown or 'padding only'}); "
                    "the shard is damaged: re-fetch or repack it"
                )

        if self._copier is not None:
            ring = [_host_view(t) for t in self._ring]
            self.stats = run_blocks(
                plan.blocks, read=read, verify=verify if self.verify else None, ring=ring,
                copy=self._copier, workers=self.workers,
            )
        else:
            views = [_host_view(s) for s in self.slabs]
            self.stats = run_blocks(
                plan.blocks, read=read, verify=verify if self.verify else None,
                target=lambda b: views[b.shard][b.start : b.end], workers=self.workers,
            )

    def _restore(self, model: Transformer) -> None:
        plan = self.plan
        assert plan is not None
        dtype = DTYPES[plan.dtype]
        for t in plan.tensors:
            raw = self.slabs[t.shard][t.offset : t.offset + t.nbytes]
            self.tensors[t.name] = raw.view(dtype).view(t.shape)
        assign_weights(model, self.tensors)

    def _confirm(self) -> None:
        plan, stats = self.plan, self.stats
        assert plan is not None and stats is not None
        if self.device.type == "cuda":
            assert self._copier is not None
            torch.cuda.current_stream(self.device).wait_stream(self._copier.stream)
            torch.cuda.synchronize(self.device)
        if stats.blocks != len(plan.blocks) or stats.bytes != plan.total_bytes:
            raise ArtifactError(
                f"streamed {stats.blocks} blocks ({stats.bytes} bytes) of {len(plan.blocks)} "
                f"({plan.total_bytes} bytes)"
            )
        self._close()

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._ring = []

    def _report(self, total_s: float) -> LoadReport:
        plan, s = self.plan, self.stats
        assert plan is not None and s is not None
        copy_gbps = s.gbps(self._copier.busy_seconds()) if self._copier is not None else 0.0
        return LoadReport(
            device=str(self.device),
            bytes=plan.total_bytes,
            tensor_bytes=sum(t.nbytes for t in plan.tensors),
            blocks=s.blocks,
            workers=s.workers,
            verified=self.verify,
            digest=plan.digest,
            seconds=dict(self.seconds) | {"total": total_s},
            read_gbps=s.gbps(s.read_s / s.workers),
            verify_gbps=s.gbps(s.verify_s / s.workers) if self.verify else 0.0,
            copy_gbps=copy_gbps,
            total_gbps=s.gbps(total_s),
            stream_gbps=s.gbps(s.wall_s),
        )


def stream_weights(
    artifact: Artifact | str | os.PathLike[str],
    model: Transformer,
    device: str | torch.device = "cpu",
    *,
    verify: bool = True,
    workers: int | None = None,
    ring_buffers: int | None = None,
    spans: SpanRecorder | None = None,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    arena: Tensor | None = None,
    cpu_mode: str = "mmap",
    prefetch: ShardPrefetch | None = None,
) -> LoadReport:
    """Stream a packed artifact's weights into `model` (built on the meta device) on `device`.

    `expected`: our name -> shape the artifact must match; default: the model's own shapes.
    `arena`: memory to load into instead of fresh allocations (`make_arena`): a pre-started
    process can fault it in while idle, which is most of a CPU load's cost on a VM.
    `prefetch`: a gpu_worker.prefetch.ShardPrefetch of the same artifact started earlier (before
    torch was imported): on CPU (mmap) its mappings become the parameters' storage and its block
    digests are checked against the index instead of being recomputed.
    Raises CorruptShardError / TruncatedShardError / ArtifactError naming the shard and tensors.
    """
    from gpu_worker.weights import expected_shapes

    if not isinstance(artifact, Artifact):
        artifact = open_artifact(artifact)
    if expected is None:
        expected = expected_shapes(model)
    stream = WeightStream(
        artifact, device, verify=verify, workers=workers, ring_buffers=ring_buffers, spans=spans,
        arena=arena, cpu_mode=cpu_mode, prefetch=prefetch,
    )
    return stream.run(model, expected)


def make_arena(nbytes: int, device: str | torch.device = "cpu") -> Tensor:
    """`nbytes` of memory, touched once so a later load pays no page faults (CPU) or
    allocator growth (CUDA). Slabs are carved from its front; tensors are views into it."""
    arena = torch.empty(nbytes, dtype=torch.uint8, device=device)
    arena.fill_(0)
    return arena


# ---- the cold path -----------------------------------------------------------------------------


@dataclass
class Runtime:
    """What `load_runtime` built: the engine, how the weights came in, and the spans."""

    engine: Any  # gpu_worker.engine.Engine
    spans: SpanRecorder
    packed: bool
    load: LoadReport | None = None  # packed artifacts only
    state: Any = None  # gpu_worker.snapshot.RuntimeState for packed artifacts


def _graph_sizes(device: torch.device, sizes: Sequence[int]) -> Sequence[int] | None:
    return tuple(sizes) if device.type == "cuda" else None


def load_runtime(
    path: str | os.PathLike[str] | Artifact,
    *,
    device: str | torch.device = "cpu",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    dtype: str | None = None,
    verify: bool = True,
    workers: int | None = None,
    spans: SpanRecorder | None = None,
    arena: Tensor | None = None,
    prefetch: ShardPrefetch | None = None,
) -> Runtime:
    """Model, tokenizer and engine from a packed artifact (snapshot restore + streamed weights)
    or from a plain Hugging Face checkpoint directory (the slower path). Blocking."""
    from gpu_worker.engine import DEFAULT_GRAPH_BATCH_SIZES, Engine

    spans = spans or SpanRecorder()
    device = torch.device(device)
    packed = isinstance(path, Artifact) or is_packed_artifact(path)
    if packed:
        from gpu_worker.snapshot import restore_snapshot
        from gpu_worker.weights import build_meta_model

        artifact = path if isinstance(path, Artifact) else open_artifact(path)
        if dtype is not None and dtype != artifact.index.dtype:
            raise ArtifactError(
                f"{artifact.root} is packed in {artifact.index.dtype}, {dtype} was asked for; "
                f"repack with `ember pack MODEL_DIR OUT_DIR --dtype {dtype}`"
            )
        with spans.span("snapshot_restore") as attrs:
            state = restore_snapshot(artifact.root)
            attrs["source"] = state.source
        weights_start = spans.now()
        model = build_meta_model(state.config)
        # The Rust tokenizer parse holds the GIL: run it while the loader's threads wait in
        # reads, checksums and copies, which release it.
        state.tokenizer.start_parse()
        report = stream_weights(
            artifact, model, device, verify=verify, workers=workers, spans=spans,
            expected=state.shape_plan, arena=arena, prefetch=prefetch,
        )
        spans.add("weights_available", weights_start, spans.now(), **report.attrs())
        tokenizer, eos = state.tokenizer, list(state.eos_token_ids)
        graph_sizes = state.graph_batch_sizes
    else:
        from gpu_worker.tokenizer import Tokenizer
        from gpu_worker.weights import load_model

        weights_start = spans.now()
        model = load_model(Path(path), dtype=DTYPES[dtype] if dtype else None, device=device)
        nbytes = sum(p.nbytes for p in model.parameters())
        seconds = spans.now() - weights_start
        spans.add(
            "weights_available", weights_start, spans.now(), bytes=nbytes,
            gbps=round(nbytes / seconds / GB, 3) if seconds > 0 else 0.0, path="hf_safetensors",
        )
        with spans.span("tokenizer_load"):
            tokenizer = Tokenizer.from_dir(path)
        report, state, eos, graph_sizes = None, None, None, DEFAULT_GRAPH_BATCH_SIZES
    with spans.span("engine_build") as attrs:
        engine = Engine(
            model, tokenizer, max_batch=max_batch, max_seq_len=max_seq_len, eos_token_ids=eos,
            cuda_graph_batch_sizes=_graph_sizes(device, graph_sizes),
        )
        attrs["graph_batch_sizes"] = ",".join(map(str, engine.runner.graph_batch_sizes)) or "none"
    return Runtime(engine=engine, spans=spans, packed=packed, load=report, state=state)


@dataclass
class ColdStart:
    """One cold start run to its first token: the spans and what was generated."""

    runtime: Runtime
    spans: SpanRecorder
    first_token_ids: list[int]
    first_text: str

    @property
    def ttft_s(self) -> float:
        return self.spans.get("first_token").end_s


def cold_start(
    path: str | os.PathLike[str] | Artifact,
    *,
    prompt: str = "The quick brown fox",
    device: str | torch.device = "cpu",
    max_batch: int = 8,
    max_seq_len: int | None = None,
    dtype: str | None = None,
    verify: bool = True,
    workers: int | None = None,
    spans: SpanRecorder | None = None,
    arena: Tensor | None = None,
    prefetch: ShardPrefetch | None = None,
) -> ColdStart:
    """The worker's cold path without Kafka: `process_ready` (the origin to now: interpreter
    and imports), load, warm-up, `runtime_ready`, then one greedy request to its first token."""
    from gpu_worker.sampling import SamplingParams

    spans = spans or SpanRecorder()
    spans.add("process_ready", 0.0, spans.now())
    runtime = load_runtime(
        path, device=device, max_batch=max_batch, max_seq_len=max_seq_len, dtype=dtype,
        verify=verify, workers=workers, spans=spans, arena=arena, prefetch=prefetch,
    )
    engine = runtime.engine
    with spans.span("warm_up"):
        engine.warm_up()
    ready = spans.now()
    spans.add("runtime_ready", 0.0, ready)
    ids: list[int] = []
    text = ""
    for out in engine.generate(prompt, SamplingParams(max_tokens=1)):
        ids += out.token_ids
        text += out.text
    spans.add("first_token", ready, spans.now(), ttft_from_origin_ms=round(spans.now() * 1e3, 1))
    return ColdStart(runtime, spans, ids, text)
