"""Map and verify a packed artifact's shards while the process is still importing torch.

A fresh worker spends seconds importing torch before the loader can run (2.6 s on the 2-core
development VM), on one core. Nothing in mapping a shard and checking its block checksums needs
torch, so a process that knows its artifact at start can do that work on the other cores during
the import:

    from gpu_worker.prefetch import ShardPrefetch     # torch-free: import it first
    prefetch = ShardPrefetch(artifact_dir)            # threads start mapping and verifying
    import torch                                      # ... seconds, on one core
    cold_start(artifact_dir, prefetch=prefetch)       # the loader takes the mappings and digests

`ShardPrefetch` reads the index JSON itself (gpu_worker.pack imports torch), maps every shard
(MAP_PRIVATE, never written; MADV_WILLNEED starts readahead on a cold page cache) and lets
`workers` threads compute each block's checksum through the mapping in layer order; the page
faults and the checksum (gpu_worker.checksum) run with the GIL released. The loader
(`stream_weights(..., prefetch=...)`) then builds the parameters on the very same mappings and
compares each block's digest with the index as usual, waiting only for blocks not done yet: the
bytes checked are the bytes served. It never trusts the prefetch for anything else: the index
is re-read and fully planned, sizes re-checked, and a shard the prefetch could not map is
mapped and verified by the loader itself.

`fetch_artifact_files` is the node-cache lookup (gpu_worker.loader.fetch_artifact) without
torch, so that the cache lookup too can precede the import.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_worker.checksum import block_digest

__all__ = ["INDEX_FILE", "ShardPrefetch", "fetch_artifact_files"]

INDEX_FILE = "ember-index.json"  # = gpu_worker.pack.INDEX_FILE (pack imports torch)


def _read_raw_index(root: Path) -> dict[str, Any]:
    return json.loads((root / INDEX_FILE).read_text())


def fetch_artifact_files(source: Any, cache: Any, workdir: str | os.PathLike[str]) -> Path:
    """Make the artifact at `source` local through the node cache: the index, the snapshot files
    and every shard are fetched once per node (verified against the index's sha256 and size);
    `workdir` gets symlinks to the cached files. Returns `workdir`. Torch-free."""
    workdir = Path(workdir)
    (workdir / "snapshot").mkdir(parents=True, exist_ok=True)
    _link(cache.get(source, INDEX_FILE), workdir / INDEX_FILE)
    raw = _read_raw_index(workdir)
    for name, info in dict(raw.get("snapshot_files", {})).items():
        _link(cache.get(source, name, info["sha256"], info["nbytes"]), workdir / name)
    for shard in raw["shards"]:
        path = cache.get(source, shard["file"], shard["sha256"], int(shard["nbytes"]))
        _link(path, workdir / shard["file"])
    return workdir


def _link(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.{os.getpid()}.lnk")
    tmp.unlink(missing_ok=True)
    os.symlink(Path(target).resolve(), tmp)
    os.replace(tmp, link)


class ShardPrefetch:
    """Maps an artifact's shards and verifies their blocks on background threads (see the
    module doc). Never raises from the constructor: anything it cannot do (no index, a missing
    or short shard) is left to the loader, which reports it properly."""

    def __init__(
        self, root: str | os.PathLike[str], *, workers: int | None = None, verify: bool = True
    ) -> None:
        self.root = Path(root)
        self.started = time.perf_counter()
        self.finished: float | None = None
        self.error: BaseException | None = None
        self.algorithm = ""
        self.block_bytes = 0
        self._maps: dict[int, tuple[str, int, mmap.mmap]] = {}  # shard -> (real path, size, map)
        self._blocks: list[tuple[int, int, int]] = []  # (shard, start, end) in layer order
        self._digests: dict[tuple[int, int, int], str] = {}
        self._done: dict[tuple[int, int, int], threading.Event] = {}
        self._lock = threading.Lock()
        self._next = 0
        self._completed = 0
        self._threads: list[threading.Thread] = []
        try:
            raw = _read_raw_index(self.root)
            self.algorithm = str(raw["block_digest"])
            self.block_bytes = int(raw["block_bytes"])
            shards: Sequence[dict[str, Any]] = raw["shards"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.error = exc
            shards = []
        for i, shard in enumerate(shards):
            try:
                self._map(i, self.root / str(shard["file"]), int(shard["nbytes"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.error = self.error or exc
        for i, (_, size, _) in sorted(self._maps.items()):
            for start in range(0, size, self.block_bytes):
                key = (i, start, min(start + self.block_bytes, size))
                self._blocks.append(key)
                self._done[key] = threading.Event()
        if not verify:
            self._blocks = []
        n = max(1, min(workers or min(4, os.cpu_count() or 1), len(self._blocks)))
        if self._blocks:
            self._threads = [
                threading.Thread(target=self._work, name=f"prefetch-{k}", daemon=True)
                for k in range(n)
            ]
            for t in self._threads:
                t.start()
        else:
            self.finished = time.perf_counter()

    def _map(self, shard: int, path: Path, nbytes: int) -> None:
        real = os.path.realpath(path)
        fd = os.open(real, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != nbytes or nbytes == 0:
                return  # the loader reports the size mismatch
            prot = mmap.PROT_READ | mmap.PROT_WRITE  # writable for torch; MAP_PRIVATE: never written
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=prot)
        finally:
            os.close(fd)
        mapping.madvise(mmap.MADV_WILLNEED)
        self._maps[shard] = (real, nbytes, mapping)

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._next >= len(self._blocks) or self.error is not None:
                    return
                key = self._blocks[self._next]
                self._next += 1
            shard, start, end = key
            try:
                with memoryview(self._maps[shard][2]) as whole, whole[start:end] as view:
                    self._digests[key] = block_digest(self.algorithm, view)
            except BaseException as exc:  # noqa: BLE001 - reported through digest()
                with self._lock:
                    self.error = self.error or exc
                for event in self._done.values():
                    event.set()
                return
            self._done[key].set()
            with self._lock:
                self._completed += 1
                if self._completed == len(self._blocks):
                    self.finished = time.perf_counter()

    # ---- what the loader asks ----------------------------------------------------------------

    def mapping(self, shard: int, path: str | os.PathLike[str], nbytes: int) -> mmap.mmap | None:
        """The prefetch's mapping of shard `shard` if it maps the same file (symlinks resolved)
        with the same size, else None (the loader maps it itself)."""
        entry = self._maps.get(shard)
        if entry is None or entry[0] != os.path.realpath(path) or entry[1] != nbytes:
            return None
        return entry[2]

    def digest(self, algorithm: str, shard: int, start: int, end: int) -> str | None:
        """The block's checksum computed through the prefetch's mapping (waiting for it), or
        None where the prefetch has none (another algorithm or block size, not verifying, or
        it failed): the caller computes it itself."""
        key = (shard, start, end)
        event = self._done.get(key)
        if algorithm != self.algorithm or event is None or not self._blocks:
            return None
        event.wait()
        return self._digests.get(key)

    def wait(self) -> float:
        """Block until every block is verified; the seconds the prefetch took."""
        for t in self._threads:
            t.join()
        end = self.finished or time.perf_counter()
        return end - self.started

    def attrs(self) -> dict[str, Any]:
        done = self.finished is not None
        return {
            "prefetch_shards": len(self._maps),
            "prefetch_blocks": len(self._blocks),
            "prefetch_s": round((self.finished or time.perf_counter()) - self.started, 4),
            "prefetch_done": done,
        }
