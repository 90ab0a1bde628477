"""Shard sources and the node-local cache, against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_worker.shard_cache import (
    CacheFullError,
    FetchProgress,
    HttpSource,
    IntegrityError,
    LocalDirSource,
    ShardCache,
    ShardNotFoundError,
    SourceError,
    SourceUnreachableError,
    check_shard_name,
    entry_key,
    measure_fetch,
    plan_ranges,
)
from tests.gpu_worker.http_server import ShardServer, closed_port_url, fetch_in_child

KiB = 1024
MiB = 1024 * KiB
SHARD = "model/shard-00001.bin"


def write_shard(root: Path, name: str, size: int, seed: int = 0) -> tuple[bytes, str]:
    data = hashlib.shake_256(f"{name}:{seed}".encode()).digest(size)
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data, hashlib.sha256(data).hexdigest()


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def http(server: ShardServer, **overrides: object) -> HttpSource:
    settings: dict[str, object] = {
        "parallel_streams": 4,
        "chunk_bytes": 256 * KiB,
        "timeout_s": 5.0,
        "retries": 2,
        "retry_backoff_s": 0.01,
        "block_bytes": 64 * KiB,
    }
    settings.update(overrides)
    return HttpSource(server.url, **settings)  # type: ignore[arg-type]


def cached_files(cache: ShardCache) -> list[str]:
    return sorted(p.name for p in (cache.root / "objects").iterdir()) + sorted(
        p.name for p in (cache.root / "tmp").iterdir()
    )


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    root = tmp_path / "remote"
    root.mkdir()
    return root


@pytest.fixture
def server(remote: Path) -> Iterator[ShardServer]:
    with ShardServer(remote) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path: Path) -> ShardCache:
    return ShardCache(tmp_path / "cache", 64 * MiB, durable=False)


# ------------------------------------------------------------------------------ pure parts


def test_plan_ranges_covers_the_file_in_order() -> None:
    assert plan_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_ranges(8, 4) == [(0, 4), (4, 8)]
    assert plan_ranges(0, 4) == []
    with pytest.raises(ValueError):
        plan_ranges(10, 0)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "a/../b", "../x", "a//b", "./a", "a\\b"])
def test_shard_names_must_be_plain_relative_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        check_shard_name(bad)
    assert check_shard_name("llama/shard-00001.bin") == "llama/shard-00001.bin"


def test_keys_are_content_addressed_when_the_digest_is_known() -> None:
    digest = "AB" * 32
    assert entry_key(digest, "http://a/x") == entry_key(digest.lower(), "http://b/y")
    assert entry_key(None, "http://a/x") != entry_key(None, "http://b/x")
    with pytest.raises(ValueError, match="64 hex"):
        entry_key("abc", "http://a/x")


# ------------------------------------------------------------------------------ fetch and hits


def test_fetch_verifies_and_the_second_get_is_a_hit_without_http(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 3 * MiB + 123)
    source = http(server)

    path = cache.get(source, SHARD, sha, len(data))
    assert path.read_bytes() == data
    first = server.counts(SHARD)
    assert first.bytes_sent == len(data)
    assert first.heads == 0  # expected_size given: no need to ask

    assert cache.get(source, SHARD, sha, len(data)) == path
    assert server.counts(SHARD) == first


def test_without_size_or_digest_the_source_is_asked_and_the_sidecar_protects_hits(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, _ = write_shard(remote, SHARD, 300 * KiB)
    source = http(server)

    path = cache.get(source, SHARD)
    assert path.read_bytes() == data
    assert server.counts(SHARD).heads == 1
    assert cache.get(source, SHARD) == path
    assert server.counts(SHARD).gets == 2  # 300 KiB in two 256 KiB ranges, once

    flip_byte(path, 10)  # caught against the digest recorded at fetch time
    assert cache.get(source, SHARD).read_bytes() == data
    assert server.counts(SHARD).gets == 4


def test_server_without_head_is_sized_with_a_one_byte_range(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, _ = write_shard(remote, SHARD, 700 * KiB)
    server.faults.refuse_head = True
    assert http(server).size(SHARD) == len(data)
    assert cache.get(http(server), SHARD).read_bytes() == data


def test_parallel_range_streams_produce_identical_bytes(
    server: ShardServer, remote: Path, tmp_path: Path
) -> None:
    data, sha = write_shard(remote, SHARD, 3 * MiB + 7)
    one = ShardCache(tmp_path / "one", 64 * MiB, durable=False)
    four = ShardCache(tmp_path / "four", 64 * MiB, durable=False)

    single = one.get(http(server, parallel_streams=1, chunk_bytes=64 * MiB), SHARD, sha)
    gets_single = server.counts(SHARD).gets
    parallel = four.get(http(server, parallel_streams=4), SHARD, sha)

    assert single.read_bytes() == parallel.read_bytes() == data
    assert gets_single == 1
    assert server.counts(SHARD).gets - gets_single == len(plan_ranges(len(data), 256 * KiB))


def test_server_that_ignores_ranges_gets_one_stream(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 2 * MiB)
    server.faults.ignore_range = True
    reports: list[FetchProgress] = []

    path = cache.get(http(server), SHARD, sha, len(data), progress=reports.append)
    assert path.read_bytes() == data
    assert reports[-1].done_bytes == reports[-1].total_bytes == len(data)


def test_local_dir_source_feeds_the_cache(remote: Path, cache: ShardCache) -> None:
    data, sha = write_shard(remote, SHARD, 5 * MiB + 1)
    source = LocalDirSource(remote, block_bytes=1 * MiB)
    assert source.size(SHARD) == len(data)
    assert cache.get(source, SHARD, sha).read_bytes() == data


def test_progress_is_monotonic_and_ends_at_the_total(remote: Path, cache: ShardCache) -> None:
    data, sha = write_shard(remote, SHARD, 4 * MiB)
    reports: list[FetchProgress] = []
    cache.get(LocalDirSource(remote, block_bytes=256 * KiB), SHARD, sha, progress=reports.append)
    done = [r.done_bytes for r in reports]
    assert done == sorted(done)
    assert reports[-1].done_bytes == len(data) and reports[-1].fraction == 1.0
    assert reports[-1].gbps > 0


# ------------------------------------------------------------------------------ corruption


def test_corrupt_cached_shard_is_detected_and_refetched(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    source = http(server)
    path = cache.get(source, SHARD, sha)
    sent = server.counts(SHARD).bytes_sent

    flip_byte(path, 1234)
    assert cache.get(source, SHARD, sha).read_bytes() == data
    assert server.counts(SHARD).bytes_sent == 2 * sent


def test_bit_rot_that_keeps_the_mtime_needs_a_full_verify(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    source = http(server)
    path = cache.get(source, SHARD, sha)
    st = path.stat()

    flip_byte(path, 99)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.get(source, SHARD, sha).read_bytes() != data  # the cheap check trusts the stamp
    assert cache.get(source, SHARD, sha, verify="full").read_bytes() == data


def test_missing_sidecar_means_a_rehash_not_a_refetch(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    _, sha = write_shard(remote, SHARD, 1 * MiB)
    source = http(server)
    path = cache.get(source, SHARD, sha)
    before = server.counts(SHARD)

    (cache.root / "meta" / f"{path.name}.json").unlink()
    assert cache.get(source, SHARD, sha) == path
    assert server.counts(SHARD) == before
    assert (cache.root / "meta" / f"{path.name}.json").exists()


def test_checksum_mismatch_from_the_source_caches_nothing(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    server.faults.corrupt = True

    with pytest.raises(IntegrityError, match=f"{server.url}/{SHARD} has sha256 .*expected {sha}"):
        cache.get(http(server), SHARD, sha, len(data))
    assert cached_files(cache) == []


def test_size_that_differs_from_the_index_is_refused(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, _ = write_shard(remote, SHARD, 1 * MiB)
    with pytest.raises(SourceError, match=f"has {len(data)} bytes, expected {len(data) + 1}"):
        cache.get(http(server), SHARD, expected_size=len(data) + 1)
    assert cached_files(cache) == []


# ------------------------------------------------------------------------------ bad sources


def test_partial_download_is_resumed(server: ShardServer, remote: Path, cache: ShardCache) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    server.faults.truncate = 2  # two ranges drop their connection halfway

    assert cache.get(http(server), SHARD, sha).read_bytes() == data
    counts = server.counts(SHARD)
    assert counts.gets == 4 + 2
    assert counts.bytes_sent == len(data)  # each retry resumed where its range stopped


def test_partial_download_that_keeps_failing_gives_a_clear_error_and_no_file(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    server.faults.truncate = 1000

    with pytest.raises(SourceError, match=f"fetching {server.url}/{SHARD} failed after 3 attempts"):
        cache.get(http(server, parallel_streams=1, chunk_bytes=64 * MiB), SHARD, sha, len(data))
    assert cached_files(cache) == []


def test_server_errors_are_retried(server: ShardServer, remote: Path, cache: ShardCache) -> None:
    data, sha = write_shard(remote, SHARD, 512 * KiB)
    server.faults.fail_count = 2
    assert cache.get(http(server), SHARD, sha).read_bytes() == data


def test_missing_shard_names_the_url(server: ShardServer, cache: ShardCache) -> None:
    with pytest.raises(ShardNotFoundError, match=f"shard not found at {server.url}/nope.bin"):
        cache.get(http(server), "nope.bin")
    with pytest.raises(ShardNotFoundError, match="HTTP 404"):
        cache.get(http(server), "nope.bin", expected_size=10)
    assert cached_files(cache) == []


def test_access_denied_is_not_retried(server: ShardServer, remote: Path, cache: ShardCache) -> None:
    write_shard(remote, SHARD, 1000)
    server.faults.fail_status, server.faults.fail_count = 403, 1
    with pytest.raises(SourceError, match="access denied .*HTTP 403"):
        cache.get(http(server), SHARD, expected_size=1000)
    assert server.counts(SHARD).gets == 1


def test_unreachable_source_names_the_url(cache: ShardCache) -> None:
    url = closed_port_url()
    with pytest.raises(
        SourceUnreachableError, match=f"cannot reach {url}/x.bin: connection refused"
    ):
        cache.get(HttpSource(url, retries=1, retry_backoff_s=0.01), "x.bin", expected_size=5)
    assert cached_files(cache) == []


def test_missing_local_shard_names_the_path(remote: Path, cache: ShardCache) -> None:
    with pytest.raises(ShardNotFoundError, match=f"shard not found at {remote}/none.bin"):
        cache.get(LocalDirSource(remote), "none.bin")


# ------------------------------------------------------------------------------ eviction


def test_lru_eviction_keeps_the_cache_under_max_bytes(remote: Path, tmp_path: Path) -> None:
    size = 1 * MiB
    shards = {n: write_shard(remote, n, size) for n in ("a", "b", "c", "d")}
    cache = ShardCache(tmp_path / "cache", 3 * size, durable=False)
    source = LocalDirSource(remote)

    for n in ("a", "b", "c"):
        cache.get(source, n, shards[n][1])
    cache.get(source, "a", shards["a"][1])  # a is now the most recently used
    cache.get(source, "d", shards["d"][1])

    kept = {e.key for e in cache.entries()}
    assert kept == {entry_key(shards[n][1], "") for n in ("a", "c", "d")}
    assert cache.used_bytes() <= cache.max_bytes


def test_pinned_entries_are_never_evicted(remote: Path, tmp_path: Path) -> None:
    size = 1 * MiB
    shards = {n: write_shard(remote, n, size) for n in ("a", "b", "c")}
    cache = ShardCache(tmp_path / "cache", 2 * size, durable=False)
    source = LocalDirSource(remote)

    with cache.pinned(source, "a", shards["a"][1]) as a:
        cache.get(source, "b", shards["b"][1])
        cache.get(source, "c", shards["c"][1])  # evicts b, the least recently used unpinned
        assert a.read_bytes() == shards["a"][0]
    assert {e.key for e in cache.entries()} == {entry_key(shards[n][1], "") for n in ("a", "c")}


def test_shard_larger_than_the_cache_is_refused(remote: Path, tmp_path: Path) -> None:
    write_shard(remote, "big", 2 * MiB)
    cache = ShardCache(tmp_path / "cache", 1 * MiB, durable=False)
    with pytest.raises(CacheFullError, match="larger than the whole cache"):
        cache.get(LocalDirSource(remote), "big")


# ------------------------------------------------------------------------------ single flight


def test_single_flight_across_threads(server: ShardServer, remote: Path, cache: ShardCache) -> None:
    data, sha = write_shard(remote, SHARD, 1 * MiB)
    server.faults.delay_s = 0.05
    source = http(server)
    paths: list[Path] = []

    threads = [
        threading.Thread(target=lambda: paths.append(cache.get(source, SHARD, sha)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(set(paths)) == 1 and len(paths) == 6
    assert server.counts(SHARD).bytes_sent == len(data)


def test_single_flight_across_processes(server: ShardServer, remote: Path, tmp_path: Path) -> None:
    data, sha = write_shard(remote, SHARD, 2 * MiB)
    server.faults.delay_s = 0.1  # every range takes a while: the others arrive mid-fetch
    ctx = multiprocessing.get_context("spawn")
    start_together = ctx.Barrier(3)
    results = ctx.Queue()
    cache_dir = str(tmp_path / "cache")
    args = (cache_dir, 64 * MiB, server.url, SHARD, sha, len(data), start_together, results)
    procs = [ctx.Process(target=fetch_in_child, args=args) for _ in range(3)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)

    assert [status for status, _ in outcomes] == ["ok"] * 3, outcomes
    assert len({path for _, path in outcomes}) == 1
    assert Path(outcomes[0][1]).read_bytes() == data
    assert server.counts(SHARD).bytes_sent == len(data)


# ------------------------------------------------------------------------------ measurement


def test_measure_fetch_times_a_cold_fetch_and_a_hit(
    server: ShardServer, remote: Path, cache: ShardCache
) -> None:
    data, sha = write_shard(remote, SHARD, 2 * MiB)
    source = http(server)
    cold = measure_fetch(source, SHARD, cache, expected_sha256=sha)
    again = measure_fetch(source, SHARD, cache, expected_sha256=sha)
    hit = measure_fetch(source, SHARD, cache, expected_sha256=sha, cold=False)

    assert cold["bytes"] == again["bytes"] == hit["bytes"] == len(data)
    assert float(cold["gbps"]) > 0 and float(cold["transfer_gbps"]) > 0
    assert hit["transfer_gbps"] == 0.0
    assert server.counts(SHARD).bytes_sent == 2 * len(data)
