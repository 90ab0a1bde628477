"""`ember pack MODEL_DIR OUT_DIR`: a Hugging Face checkpoint -> a startup-optimized artifact.

A packed artifact is a directory:

    ember-index.json            the index (JSON, written last: no index, no artifact)
    shard-00000.bin ...         raw weight bytes, no header
    snapshot/runtime.json       runtime snapshot (see gpu_worker.snapshot)
    snapshot/token_bytes.msgpack
    config.json, generation_config.json, tokenizer.json, tokenizer_config.json
                                the checkpoint's own metadata files, verbatim

Shards are raw aligned binary files rather than safetensors: the loader reads byte ranges
straight into the final tensors and needs nothing from a header, so the index carries
everything (name, shard, offset, nbytes, shape, dtype, layer). Layout rules:

  * tensors in layer order: embeddings, layer 0 ... layer N-1, final norm, lm_head (a tied
    lm_head is not stored), each already in the serving dtype;
  * every tensor starts at a multiple of `alignment` (4 KiB: O_DIRECT and mmap friendly; gaps
    are zero bytes) and every shard's size is a multiple of it;
  * shards are split at layer boundaries and hold at most `max_shard_bytes` (512 MiB), except
    that one layer bigger than that gets a shard of its own;
  * each shard is cut into fixed `block_bytes` blocks (16 MiB; the last may be shorter), the
    unit the loader reads, verifies and copies. The index holds each block's checksum and
    each shard's sha256.

Checksums. The shard sha256 is what the node-local shard cache verifies when a shard enters the
node. The per-block checksum is what the loader verifies on every load, on the critical path,
so it must be cheap: `crc32` by default (gpu_worker.checksum: zlib-ng's or ISA-L's
PCLMULQDQ CRC-32 where installed, 10-12 GB/s per core on the 2-core development VM, else zlib's,
about 3 GB/s), `sha256` on request. Both detect the failures that matter here (a flipped
byte, a truncated or zero-filled page); crc32 is not meant to resist tampering, which the
shard sha256 covers.

Packing verifies what it wrote: after an fsync it drops the shard's pages from the page cache
(posix_fadvise DONTNEED) and re-reads the file, recomputing the sha256 and every block checksum.
Pure parts (`layer_of`, `plan_layout`, `block_ranges`) are tested alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_worker.checksum import BLOCK_DIGESTS, block_digest, crc32
from gpu_worker.model import DTYPES, ModelConfig
from gpu_worker.weights import WeightsError

__all__ = [
    "ALIGNMENT",
    "BLOCK_BYTES",
    "BLOCK_DIGESTS",
    "INDEX_FILE",
    "MAX_SHARD_BYTES",
    "ArtifactError",
    "ArtifactIndex",
    "LayerRange",
    "PackError",
    "PackResult",
    "ShardInfo",
    "TensorEntry",
    "block_digest",
    "block_ranges",
    "is_packed_artifact",
    "layer_of",
    "pack",
    "plan_layout",
    "read_index",
]

FORMAT = "ember-packed"
FORMAT_VERSION = 1
INDEX_FILE = "ember-index.json"
ALIGNMENT = 4096
MAX_SHARD_BYTES = 512 << 20
BLOCK_BYTES = 16 << 20
HF_METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
MiB = 1 << 20


class ArtifactError(WeightsError):
    """A packed artifact that cannot be used; the message names the file, shard or tensor."""


class PackError(ArtifactError):
    """Packing failed (or what it wrote did not read back the same)."""


# ---- the index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    name: str  # ours, e.g. "layers.3.attention.wq.weight"
    shard: int
    offset: int  # bytes from the start of the shard, a multiple of the alignment
    nbytes: int
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bfloat16" | "float16"
    layer: str  # "embed" | "layers.<i>" | "norm" | "output"


@dataclass(frozen=True)
class LayerRange:
    layer: str
    shard: int
    start: int  # first byte of the layer's first tensor
    end: int  # one past the last byte of its last tensor


@dataclass(frozen=True)
class ShardInfo:
    file: str
    nbytes: int
    sha256: str
    blocks: tuple[str, ...]  # block checksums, hex, in order


@dataclass(frozen=True)
class ArtifactIndex:
    dtype: str
    alignment: int
    block_bytes: int
    block_digest: str
    model_config: dict[str, Any]  # dataclasses.asdict(ModelConfig)
    shards: tuple[ShardInfo, ...]
    tensors: tuple[TensorEntry, ...]
    layers: tuple[LayerRange, ...]
    snapshot_files: dict[str, dict[str, Any]]  # relative path -> {"nbytes", "sha256"}
    source: dict[str, Any]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def config(self) -> ModelConfig:
        return model_config_from_dict(self.model_config)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": self.dtype,
            "alignment": self.alignment,
            "block_bytes": self.block_bytes,
            "block_digest": self.block_digest,
            "total_bytes": self.total_bytes,
            "model_config": self.model_config,
            "shards": [dataclasses.asdict(s) | {"blocks": list(s.blocks)} for s in self.shards],
            "tensors": [dataclasses.asdict(t) | {"shape": list(t.shape)} for t in self.tensors],
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "snapshot_files": self.snapshot_files,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = INDEX_FILE) -> ArtifactIndex:
        if raw.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not an Ember packed-artifact index")
        if raw.get("version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{where}: format version {raw.get('version')}, this Ember reads "
                f"{FORMAT_VERSION}; repack with `ember pack`"
            )
        try:
            index = cls(
                dtype=str(raw["dtype"]),
                alignment=int(raw["alignment"]),
                block_bytes=int(raw["block_bytes"]),
                block_digest=str(raw["block_digest"]),
                model_config=dict(raw["model_config"]),
                shards=tuple(
                    ShardInfo(str(s["file"]), int(s["nbytes"]), str(s["sha256"]),
                              tuple(str(b) for b in s["blocks"]))
                    for s in raw["shards"]
                ),
                tensors=tuple(
                    TensorEntry(str(t["name"]), int(t["shard"]), int(t["offset"]),
                                int(t["nbytes"]), tuple(int(d) for d in t["shape"]),
                                str(t["dtype"]), str(t["layer"]))
                    for t in raw["tensors"]
                ),
                layers=tuple(
                    LayerRange(str(r["layer"]), int(r["shard"]), int(r["start"]), int(r["end"]))
                    for r in raw["layers"]
                ),
                snapshot_files=dict(raw.get("snapshot_files", {})),
                source=dict(raw.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: malformed index ({type(exc).__name__}: {exc})") from exc
        if index.dtype not in DTYPES or index.block_digest not in BLOCK_DIGESTS:
            raise ArtifactError(f"{where}: unknown dtype or block digest")
        return index


def model_config_from_dict(raw: Mapping[str, Any]) -> ModelConfig:
    from gpu_worker.model import RopeScaling

    fields = dict(raw)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def is_packed_artifact(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / INDEX_FILE).is_file()


def read_index(artifact_dir: str | os.PathLike[str]) -> ArtifactIndex:
    path = Path(artifact_dir) / INDEX_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {artifact_dir} is not a packed artifact")
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable JSON ({exc})") from exc
    return ArtifactIndex.from_json(raw, str(path))


# ---- layout (pure) -----------------------------------------------------------------------------


def layer_of(name: str) -> str:
    """'tok_embeddings.weight' -> 'embed'; 'layers.3.attention.wq.weight' -> 'layers.3';
    'norm.weight' -> 'norm'; 'output.weight' -> 'output'."""
    if name.startswith("tok_embeddings."):
        return "embed"
    if name.startswith("layers."):
        return "layers." + name.split(".", 2)[1]
    if name.startswith("norm."):
        return "norm"
    if name.startswith("output."):
        return "output"
    raise ValueError(f"no layer for tensor {name!r}")


def layer_rank(layer: str) -> tuple[int, int]:
    """Sort key: embed < layers.0 < ... < layers.N-1 < norm < output."""
    if layer == "embed":
        return (0, 0)
    if layer.startswith("layers."):
        return (1, int(layer.split(".", 1)[1]))
    return (2, 0) if layer == "norm" else (3, 0)


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def plan_layout(
    tensors: Sequence[tuple[str, int]],
    max_shard_bytes: int = MAX_SHARD_BYTES,
    alignment: int = ALIGNMENT,
) -> tuple[list[tuple[str, int, int, str]], list[LayerRange], list[int]]:
    """Place (name, nbytes) pairs, in the order given, into aligned shards split at layers.

    Returns (placements [(name, shard, offset, layer)], layer ranges, shard sizes). Example with
    alignment 4096: tensors a (100 B) and b (5000 B) of one layer land at offsets 0 and 4096,
    and the shard is 12288 bytes (4096 + 5000 rounded up).
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    groups: list[tuple[str, list[tuple[str, int]]]] = []
    for name, nbytes in tensors:
        layer = layer_of(name)
        if groups and groups[-1][0] == layer:
            groups[-1][1].append((name, nbytes))
        elif any(g[0] == layer for g in groups):
            raise ValueError(f"tensors of {layer} are not consecutive (at {name})")
        else:
            groups.append((layer, [(name, nbytes)]))
    ranks = [layer_rank(layer) for layer, _ in groups]
    if ranks != sorted(ranks):
        raise ValueError(f"layers not in order: {[layer for layer, _ in groups]}")

    placements: list[tuple[str, int, int, str]] = []
    layers: list[LayerRange] = []
    sizes: list[int] = []
    shard, used = -1, 0
    for layer, members in groups:
        layer_bytes = sum(_align(n, alignment) for _, n in members)
        if shard < 0 or (used > 0 and used + layer_bytes > max_shard_bytes):
            if shard >= 0:
                sizes.append(used)
            shard, used = shard + 1, 0
        start = used
        end = start
        for name, nbytes in members:
            placements.append((name, shard, used, layer))
            end = used + nbytes
            used = _align(end, alignment)
        layers.append(LayerRange(layer, shard, start, end))
    if shard >= 0:
        sizes.append(used)
    return placements, layers, sizes


def block_ranges(shard_bytes: int, block_bytes: int) -> list[tuple[int, int]]:
    """[start, end) of each block of a shard. Example: (10, 4) -> [(0, 4), (4, 8), (8, 10)]."""
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be positive, got {block_bytes}")
    return [(s, min(s + block_bytes, shard_bytes)) for s in range(0, shard_bytes, block_bytes)]


# ---- checksums ---------------------------------------------------------------------------------


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


class _ShardHasher:
    """sha256 of a whole shard plus the checksum of each `block_bytes` block, fed as a stream."""

    def __init__(self, block_bytes: int, algorithm: str) -> None:
        self.block_bytes = block_bytes
        self.algorithm = algorithm
        self.sha256 = hashlib.sha256()
        self.blocks: list[str] = []
        self._block = self._new()
        self._filled = 0

    def _new(self) -> Any:
        return _Crc32() if self.algorithm == "crc32" else hashlib.sha256()

    def update(self, data: memoryview) -> None:
        self.sha256.update(data)
        while len(data):
            take = min(len(data), self.block_bytes - self._filled)
            self._block.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.block_bytes:
                self.blocks.append(self._block.hexdigest())
                self._block, self._filled = self._new(), 0

    def finish(self) -> tuple[str, list[str]]:
        if self._filled:
            self.blocks.append(self._block.hexdigest())
            self._block, self._filled = self._new(), 0
        return self.sha256.hexdigest(), self.blocks


def file_sha256(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- packing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackResult:
    out_dir: Path
    index: ArtifactIndex
    seconds: float
    write_seconds: float
    verify_seconds: float

    @property
    def gbps(self) -> float:
        return self.index.total_bytes / self.seconds / 1e9 if self.seconds else 0.0


Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"pack: {message}", file=sys.stderr, flush=True)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach().contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


_ZEROS = memoryview(bytes(ALIGNMENT * 16))


def _write_shard(
    path: Path,
    members: Sequence[tuple[int, torch.Tensor]],
    size: int,
    block_bytes: int,
    algorithm: str,
) -> tuple[str, list[str]]:
    """Write tensors at their offsets (zero gaps) to `path`; return (sha256, block checksums)."""
    hasher = _ShardHasher(block_bytes, algorithm)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos = 0
        for offset, tensor in [*members, (size, None)]:
            while pos < offset:  # zero padding up to the next aligned offset
                pad = _ZEROS[: min(len(_ZEROS), offset - pos)]
                _write_all(fd, pad)
                hasher.update(pad)
                pos += len(pad)
            if tensor is None:
                break
            data = _tensor_bytes(tensor)
            for start in range(0, len(data), 64 * MiB):  # hash in cache-sized slices
                part = data[start : start + 64 * MiB]
                _write_all(fd, part)
                hasher.update(part)
            pos += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hasher.finish()


def _reread(path: Path, block_bytes: int, algorithm: str) -> tuple[int, str, list[str]]:
    """Re-read a written shard from the device (page cache dropped first), rehashing it."""
    hasher = _ShardHasher(block_bytes, algorithm)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = memoryview(bytearray(16 * MiB))
        total = 0
        while n := os.readv(fd, [buf]):
            hasher.update(buf[:n])
            total += n
    finally:
        os.close(fd)
    sha, blocks = hasher.finish()
    return total, sha, blocks


def _layer_ordered(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("output.weight", None)
    items = list(state.items())
    # stable: keeps the module's own order inside a layer
    return sorted(items, key=lambda item: layer_rank(layer_of(item[0])))


def pack(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str | None = None,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    alignment: int = ALIGNMENT,
    block_bytes: int = BLOCK_BYTES,
    block_digest_name: str = "crc32",
    graph_batch_sizes: Sequence[int] | None = None,
    progress: Progress | None = _stderr_progress,
) -> PackResult:
    """Pack the Hugging Face checkpoint in `model_dir` into `out_dir` (created; an existing
    artifact there is replaced). `dtype`: the serving dtype, default the checkpoint's."""
    from gpu_worker.snapshot import SNAPSHOT_DIR, build_snapshot
    from gpu_worker.weights import load_model, read_config

    report = progress or (lambda message: None)
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if block_digest_name not in BLOCK_DIGESTS:
        raise PackError(f"block digest {block_digest_name!r} not one of {BLOCK_DIGESTS}")
    if block_bytes % alignment:
        raise PackError(f"block_bytes {block_bytes} must be a multiple of {alignment}")
    if model_dir.resolve() == out_dir.resolve():
        raise PackError("OUT_DIR must differ from MODEL_DIR")
    config = read_config(model_dir)
    dtype = dtype or config.dtype
    if dtype not in DTYPES:
        raise PackError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
    config = dataclasses.replace(config, dtype=dtype)  # the serving dtype from here on
    model = load_model(model_dir, dtype=DTYPES[dtype])  # mmap where no cast is needed
    tensors = _layer_ordered(model)
    placements, layers, sizes = plan_layout(
        [(name, t.nbytes) for name, t in tensors], max_shard_bytes, alignment
    )
    by_name = dict(tensors)
    entries = tuple(
        TensorEntry(name, shard, off, by_name[name].nbytes, tuple(by_name[name].shape), dtype, lay)
        for name, shard, off, lay in placements
    )
    total = sum(sizes)
    report(
        f"{model_dir} -> {out_dir}: {len(tensors)} tensors in {len(layers)} layers, "
        f"{dtype}, {total / 1e9:.2f} GB in {len(sizes)} shard(s)"
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_FILE).unlink(missing_ok=True)  # half-written artifacts have no index
    for stale in out_dir.glob("shard-*.bin"):
        stale.unlink()

    shards: list[ShardInfo] = []
    write_s = verify_s = 0.0
    for shard, size in enumerate(sizes):
        file = f"shard-{shard:05d}.bin"
        members = [(off, by_name[name]) for name, s, off, _ in placements if s == shard]
        t0 = time.perf_counter()
        sha, blocks = _write_shard(out_dir / file, members, size, block_bytes, block_digest_name)
        t1 = time.perf_counter()
        read_size, reread_sha, reread_blocks = _reread(
            out_dir / file, block_bytes, block_digest_name
        )
        t2 = time.perf_counter()
        if (read_size, reread_sha, reread_blocks) != (size, sha, blocks):
            raise PackError(
                f"{out_dir / file}: read back {read_size} bytes with sha256 {reread_sha}, "
                f"wrote {size} bytes with sha256 {sha}: the disk did not keep what was written"
            )
        write_s += t1 - t0
        verify_s += t2 - t1
        shards.append(ShardInfo(file, size, sha, tuple(blocks)))
        names = [r.layer for r in layers if r.shard == shard]
        report(
            f"shard {shard + 1}/{len(sizes)} {file}: {size / 1e6:.0f} MB, "
            f"{names[0]}..{names[-1]}, written {size / (t1 - t0) / 1e9:.2f} GB/s, "
            f"verified {size / max(t2 - t1, 1e-9) / 1e9:.2f} GB/s"
        )
    del model, by_name, tensors

    for name in HF_METADATA:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    snapshot_files = build_snapshot(
        model_dir, out_dir / SNAPSHOT_DIR, config, graph_batch_sizes=graph_batch_sizes
    )
    report(f"snapshot: {', '.join(sorted(snapshot_files))}")

    index = ArtifactIndex(
        dtype=dtype,
        alignment=alignment,
        block_bytes=block_bytes,
        block_digest=block_digest_name,
        model_config=dataclasses.asdict(config),
        shards=tuple(shards),
        tensors=entries,
        layers=tuple(layers),
        snapshot_files={
            f"{SNAPSHOT_DIR}/{name}": info for name, info in sorted(snapshot_files.items())
        },
        source={"model_dir": str(model_dir.resolve()), "packed_at_unix": int(time.time())},
    )
    _write_json_atomic(out_dir / INDEX_FILE, index.to_json())
    seconds = time.perf_counter() - started
    report(f"done in {seconds:.1f} s ({total / seconds / 1e9:.2f} GB/s overall)")
    return PackResult(out_dir, index, seconds, write_s, verify_s)


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
