"""Node-local shard cache: remote shard sources feeding a verified, size-bounded local cache.

One `ShardCache.get` is a short pipeline:

    pin (flock SH) -> cheap hit check -> single-flight lock (flock EX) -> verified hit check
    -> make room (LRU) -> fetch into a temp file -> fsync -> verify size and sha256
    -> os.replace into place -> write sidecar -> touch (LRU clock) -> unpin

Sources (`ShardSource`) know nothing about caching: they size a shard and write its bytes into a
file descriptor at their offsets. The cache knows nothing about HTTP.

Layout of `cache_dir`:

    objects/<key>             verified shard bytes: the path `get` returns
    meta/<key>.json           sidecar: size, sha256, inode and mtime_ns of the verified bytes;
                              the sidecar's own mtime is the entry's last use (the LRU clock)
    locks/<key>.fetch         flock EX while one process fetches or re-verifies <key>
    locks/<key>.pin           flock SH by every process using <key>; eviction needs EX
    tmp/<key>.<random>.part   downloads in flight, flock EX by their writer
    evict.lock                serializes eviction passes

Keys: `sha256-<digest>` when the caller knows the digest (content addressed: any source and any
name share one copy), else `loc-<sha256(location)[:32]>` (one copy per URL or path; without a
digest the cache trusts the first fetch of that location).

Hit verification, the cheap option: a hit is trusted when the object's size, inode and mtime_ns
equal the sidecar's stamp, which was taken right after the bytes were hashed. Writing a byte
into the file (editing, a partial copy, a `cp` over it) changes the stamp and triggers a full
re-hash; silent media corruption that keeps the mtime is only caught by `verify="full"`. A
missing or unreadable sidecar also means a full re-hash (and without a known digest, a
re-fetch). Sidecar files rather than xattrs because xattrs are missing or limited on tmpfs,
overlayfs and some network file systems.

Concurrency: every mutation of an entry (fetch, re-stamp, sidecar removal) happens under its
fetch lock; every user of an entry holds its pin lock (SH) from the hit check until it returns
(or, with `pinned`, until the caller is done reading). Eviction only removes entries whose pin
it can take EX without waiting, so a shard being fetched, verified or read is never evicted.
flock locks belong to an open file description, so threads of one process exclude each other
like separate processes do. Lock files are empty and never deleted (deleting a lock file races
with processes that opened it); there is one pair per key ever cached.

Units: GB/s is 1e9 bytes per second.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import queue
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote, urlsplit

from infra.logs import get_logger

__all__ = [
    "CacheEntry",
    "CacheFullError",
    "FetchProgress",
    "HttpSource",
    "IntegrityError",
    "LocalDirSource",
    "OnBytes",
    "ProgressFn",
    "ShardCache",
    "ShardCacheError",
    "ShardNotFoundError",
    "ShardSource",
    "SourceError",
    "SourceUnreachableError",
    "check_shard_name",
    "entry_key",
    "measure_fetch",
    "plan_ranges",
]

log = get_logger(__name__)

GB = 1e9
MiB = 1 << 20

OnBytes = Callable[[int], None]
Verify = Literal["cheap", "full"]


# --------------------------------------------------------------------------------------- errors


class ShardCacheError(Exception):
    """A shard could not be made available locally; the message says which one and why."""


class SourceError(ShardCacheError):
    """The source failed. `location` is the URL or path; `status` the HTTP status, if any."""

    def __init__(self, message: str, *, location: str, status: int | None = None) -> None:
        super().__init__(message)
        self.location = location
        self.status = status


class ShardNotFoundError(SourceError, FileNotFoundError):
    """The source has no shard by that name (HTTP 404/410, or no such file)."""


class SourceUnreachableError(SourceError):
    """No answer from the source: connection refused, unknown host or timeout."""


class IntegrityError(ShardCacheError):
    """The bytes do not match the expected size or sha256; nothing was cached."""


class CacheFullError(ShardCacheError):
    """The shard cannot fit in the cache at all."""


# ------------------------------------------------------------------------------ small pure parts


def check_shard_name(name: str) -> str:
    """A shard name is a relative POSIX path ("shard-00001.bin", "llama/shard-00001.bin")."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValueError(
            f"shard name {name!r} must be a relative path such as 'model/shard-00001.bin', "
            "without '.', '..' or empty parts"
        )
    return name


def plan_ranges(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split [0, size) into half-open ranges of at most `chunk_bytes`, in order.

    Example: size=10, chunk_bytes=4 -> [(0, 4), (4, 8), (8, 10)].
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    return [(start, min(start + chunk_bytes, size)) for start in range(0, size, chunk_bytes)]


def entry_key(expected_sha256: str | None, location: str) -> str:
    """Cache key: content addressed when the digest is known, else derived from the location."""
    if expected_sha256 is not None:
        return f"sha256-{_normalize_digest(expected_sha256)}"
    return "loc-" + hashlib.sha256(location.encode()).hexdigest()[:32]


def _normalize_digest(digest: str) -> str:
    normalized = digest.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", normalized):
        raise ValueError(f"expected_sha256 must be 64 hex digits, got {digest!r}")
    return normalized


@dataclass(frozen=True)
class FetchProgress:
    """One progress report: `done_bytes` of `total_bytes` after `elapsed_s` seconds."""

    name: str
    done_bytes: int
    total_bytes: int
    elapsed_s: float

    @property
    def gbps(self) -> float:
        return self.done_bytes / self.elapsed_s / GB if self.elapsed_s > 0 else 0.0

    @property
    def fraction(self) -> float:
        return self.done_bytes / self.total_bytes if self.total_bytes else 1.0


ProgressFn = Callable[[FetchProgress], None]


class _ProgressMeter:
    """Thread-safe byte counter; calls `report` at most every `interval_s` and once at the end.

    `add` takes a negative count when a source restarts from scratch.
    """

    def __init__(
        self,
        name: str,
        total: int,
        report: ProgressFn | None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = 0.25,
    ) -> None:
        self.name = name
        self.total = total
        self.done = 0
        self._report = report
        self._clock = clock
        self._interval_s = interval_s
        self._start = clock()
        self._last_report = float("-inf")
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = self._clock()
            if self._report is not None and now - self._last_report >= self._interval_s:
                self._last_report = now
                self._report(self._snapshot(now))

    def finish(self) -> FetchProgress:
        with self._lock:
            final = self._snapshot(self._clock())
            if self._report is not None:
                self._report(final)
            return final

    def _snapshot(self, now: float) -> FetchProgress:
        return FetchProgress(self.name, self.done, self.total, now - self._start)


# -------------------------------------------------------------------------------------- sources


class ShardSource(Protocol):
    """Where shards come from. Implementations: `HttpSource`, `LocalDirSource`.

    `fetch` writes bytes [0, size) of the shard into `fd` at the same offsets (`os.pwrite`, in any
    order, from any number of threads), calls `on_bytes(n)` after each write (a negative n when
    it restarts and rewrites bytes it already counted), and raises `SourceError` when it cannot
    deliver exactly `size` bytes. It never truncates, syncs or closes `fd`.

    Object storage plugs in here. An `S3Source(bucket, prefix, region, credentials)` would
    answer `size` with HeadObject (ContentLength) and `fetch` with ranged GetObject requests
    (`Range: bytes=a-b`, the same header and 206 semantics as HTTP), signing each request with
    SigV4; it reuses `plan_ranges` and the parallel-range loop of `HttpSource`, which is why that
    loop takes a path and headers per request. GCS's XML API is the same shape (HMAC or OAuth
    bearer header). Public buckets and GCS public objects already work through `HttpSource`
    (base_url="https://storage.googleapis.com/BUCKET/PREFIX").
    """

    def location(self, name: str) -> str:
        """The URL or path of `name`, for errors, logs and location-derived cache keys."""
        ...

    def size(self, name: str) -> int: ...

    def fetch(self, name: str, fd: int, size: int, on_bytes: OnBytes) -> None: ...


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class LocalDirSource:
    """Shards as files under a directory (a mounted volume, NFS, a packed artifact on disk)."""

    root: Path
    block_bytes: int = 16 * MiB

    def location(self, name: str) -> str:
        return str(Path(self.root) / check_shard_name(name))

    def size(self, name: str) -> int:
        path = self.location(name)
        try:
            return os.stat(path).st_size
        except OSError as exc:
            raise self._error(path, exc) from exc

    def fetch(self, name: str, fd: int, size: int, on_bytes: OnBytes) -> None:
        path = self.location(name)
        try:
            src = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self._error(path, exc) from exc
        try:
            actual = os.fstat(src).st_size
            if actual != size:
                raise SourceError(f"{path} has {actual} bytes, expected {size}", location=path)
            offset = 0
            buf: memoryview | None = None  # set once the kernel refuses copy_file_range
            while offset < size:
                count = min(self.block_bytes, size - offset)
                if buf is None:
                    try:
                        n = os.copy_file_range(src, fd, count, offset, offset)
                    except OSError as exc:
                        if exc.errno not in _NO_COPY_RANGE:
                            raise
                        buf = memoryview(bytearray(self.block_bytes))
                        continue
                else:
                    n = os.preadv(src, [buf[:count]], offset)
                    _pwrite_all(fd, buf[:n], offset)
                if n == 0:
                    raise SourceError(
                        f"{path} shrank while being read: ended at {offset} of {size} bytes",
                        location=path,
                    )
                offset += n
                on_bytes(n)
        finally:
            os.close(src)

    @staticmethod
    def _error(path: str, exc: OSError) -> SourceError:
        if isinstance(exc, FileNotFoundError):
            return ShardNotFoundError(f"shard not found at {path}", location=path)
        return SourceError(f"cannot read {path}: {exc.strerror or exc}", location=path)


class _Transient(Exception):
    """A failure worth retrying; `reason` reads well after "failed: "."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


class _RangesIgnored(Exception):
    """The server answered a partial range with the whole file (200): use one stream."""


class _Stopped(Exception):
    """Another stream failed; this one stops early."""


@dataclass
class _Span:
    start: int
    end: int
    pos: int  # next byte to write; retries resume here


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class HttpSource:
    """Shards at `base_url`/`name` over HTTP(S), with range requests and parallel streams.

    A shard larger than `chunk_bytes` is split into ranges (`plan_ranges`) that
    `parallel_streams` threads fetch on their own keep-alive connections and write at their
    offsets. A server that ignores `Range` (answers 200) gets one stream. Each range is retried
    up to `retries` times on connection errors, timeouts, truncated bodies, 429 and 5xx,
    resuming where it stopped; 4xx answers fail at once. Redirects are not followed.
    `headers` (e.g. Authorization) go on every request and never into logs or repr.
    """

    base_url: str
    parallel_streams: int = 4
    chunk_bytes: int = 16 * MiB
    timeout_s: float = 30.0
    retries: int = 3
    retry_backoff_s: float = 0.2
    block_bytes: int = 1 * MiB
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url must be http(s)://host[:port]/prefix, got {self.base_url!r}"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"base_url must not carry a query or fragment: {self.base_url!r}")
        for name in ("parallel_streams", "chunk_bytes", "block_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.retries < 0 or self.timeout_s <= 0:
            raise ValueError("retries must be >= 0 and timeout_s > 0")

    # -- addressing

    def location(self, name: str) -> str:
        return self.base_url.rstrip("/") + "/" + quote(check_shard_name(name))

    def _request_path(self, name: str) -> str:
        prefix = urlsplit(self.base_url).path.rstrip("/")
        return f"{prefix}/{quote(check_shard_name(name))}"

    def _connect(self) -> http.client.HTTPConnection:
        parts = urlsplit(self.base_url)
        host = parts.hostname
        assert host is not None  # checked in __post_init__
        if parts.scheme == "https":
            context = self.ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(
                host, parts.port, timeout=self.timeout_s, context=context
            )
        return http.client.HTTPConnection(host, parts.port, timeout=self.timeout_s)

    # -- size

    def size(self, name: str) -> int:
        url = self.location(name)
        path = self._request_path(name)
        attempt = 0
        while True:
            conn = self._connect()
            try:
                return self._size_once(conn, url, path)
            except _Transient as exc:
                attempt += 1
                self._retry_or_raise(url, exc, attempt, resume_at=None)
            finally:
                conn.close()

    def _size_once(self, conn: http.client.HTTPConnection, url: str, path: str) -> int:
        resp = self._send(conn, "HEAD", url, path, {})
        _drain(resp)
        if resp.status == 200:
            length = resp.getheader("Content-Length")
            if length is None or not length.isdigit():
                raise SourceError(
                    f"{url} gave no Content-Length on HEAD; cannot size the shard "
                    "(pass expected_size)",
                    location=url,
                )
            return int(length)
        if resp.status in (405, 501):  # no HEAD: ask for one byte instead
            resp = self._send(conn, "GET", url, path, {"Range": "bytes=0-0"})
            header = "Content-Range" if resp.status == 206 else "Content-Length"
            value = resp.getheader(header) or ""
            if resp.status == 206 and (match := _CONTENT_RANGE.fullmatch(value)):
                value = match.group(3)
            if resp.status in (200, 206):
                resp.close()  # a 200 carries the whole file: do not read it
                if value.isdigit():
                    return int(value)
                raise SourceError(
                    f"{url} refuses HEAD and its GET gives no size; pass expected_size",
                    location=url,
                )
        raise self._status_error(url, resp)

    # -- fetch

    def fetch(self, name: str, fd: int, size: int, on_bytes: OnBytes) -> None:
        url = self.location(name)
        path = self._request_path(name)
        spans = [_Span(start, end, start) for start, end in plan_ranges(size, self.chunk_bytes)]
        if self.parallel_streams > 1 and len(spans) > 1:
            written = _Counter(on_bytes)
            try:
                self._fetch_spans(url, path, fd, size, spans, written.add, self.parallel_streams)
                return
            except _RangesIgnored:
                log.info("shard_source.ranges_ignored", url=url, fallback_streams=1)
                on_bytes(-written.total)  # the single stream rewrites everything
        self._fetch_spans(url, path, fd, size, [_Span(0, size, 0)], on_bytes, 1)

    def _fetch_spans(
        self,
        url: str,
        path: str,
        fd: int,
        size: int,
        spans: list[_Span],
        on_bytes: OnBytes,
        streams: int,
    ) -> None:
        todo: queue.SimpleQueue[_Span] = queue.SimpleQueue()
        for span in spans:
            todo.put(span)
        stop = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            conn: http.client.HTTPConnection | None = None
            buf = memoryview(bytearray(self.block_bytes))
            try:
                while not stop.is_set():
                    try:
                        span = todo.get_nowait()
                    except queue.Empty:
                        return
                    conn = self._fetch_span(conn, url, path, fd, size, span, buf, on_bytes, stop)
            except _Stopped:
                pass
            except BaseException as exc:  # handed to the caller's thread below
                errors.append(exc)
                stop.set()
            finally:
                if conn is not None:
                    conn.close()

        if streams == 1:
            stream()
        else:
            threads = [
                threading.Thread(target=stream, name=f"shard-fetch-{i}", daemon=True)
                for i in range(min(streams, len(spans)))
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        if errors:
            real = [e for e in errors if not isinstance(e, _RangesIgnored)]
            raise (real or errors)[0]

    def _fetch_span(
        self,
        conn: http.client.HTTPConnection | None,
        url: str,
        path: str,
        fd: int,
        size: int,
        span: _Span,
        buf: memoryview,
        on_bytes: OnBytes,
        stop: threading.Event,
    ) -> http.client.HTTPConnection | None:
        """Fetch one span, retrying from `span.pos`; returns the connection for reuse."""
        attempt = 0
        while True:
            if conn is None:
                conn = self._connect()
            try:
                read_to_end = self._read_span(conn, url, path, fd, size, span, buf, on_bytes, stop)
            except _Transient as exc:
                conn.close()
                conn = None
                attempt += 1
                self._retry_or_raise(url, exc, attempt, resume_at=span.pos)
                continue
            except BaseException:
                conn.close()
                raise
            if read_to_end:
                return conn
            conn.close()  # body left unread: the connection cannot be reused
            return None

    def _read_span(
        self,
        conn: http.client.HTTPConnection,
        url: str,
        path: str,
        fd: int,
        size: int,
        span: _Span,
        buf: memoryview,
        on_bytes: OnBytes,
        stop: threading.Event,
    ) -> bool:
        """One GET for [span.pos, span.end). Returns whether the response was read to its end."""
        wanted = {"Range": f"bytes={span.pos}-{span.end - 1}"} if span.end > span.pos else {}
        resp = self._send(conn, "GET", url, path, wanted)
        skip = 0
        if resp.status == 206:
            match = _CONTENT_RANGE.fullmatch(resp.getheader("Content-Range") or "")
            if match is None:
                raise SourceError(
                    f"{url} answered 206 without a usable Content-Range", location=url
                )
            first, last, total = int(match.group(1)), int(match.group(2)), match.group(3)
            if total != "*" and int(total) != size:
                raise _size_changed(url, int(total), size)
            if (first, last) != (span.pos, span.end - 1):
                raise SourceError(
                    f"{url} answered bytes {first}-{last} to a request for "
                    f"{span.pos}-{span.end - 1}",
                    location=url,
                )
        elif resp.status == 200:
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) != size:
                raise _size_changed(url, int(length), size)
            if (span.start, span.end) != (0, size):
                raise _RangesIgnored()
            skip = span.pos  # a resumed single stream: discard what we already have
        else:
            raise self._status_error(url, resp)

        want = span.end - span.pos
        while skip or span.pos < span.end:
            if stop.is_set():
                raise _Stopped()
            limit = skip if skip else span.end - span.pos
            n = _read_into(resp, buf[: min(len(buf), limit)], url)
            if n == 0:
                got = want - (span.end - span.pos)
                raise _Transient(f"connection closed after {got} of {want} bytes of a range")
            if skip:
                skip -= n
                continue
            _pwrite_all(fd, buf[:n], span.pos)
            span.pos += n
            on_bytes(n)
        return resp.isclosed() or resp.length == 0

    # -- HTTP helpers

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        url: str,
        path: str,
        extra: Mapping[str, str],
    ) -> http.client.HTTPResponse:
        try:
            conn.request(method, path, headers={**self.headers, **extra})
            return conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(
                f"TLS verification failed for {url}: {exc.verify_message}", location=url
            ) from exc
        except ConnectionRefusedError as exc:
            raise _Transient("connection refused", unreachable=True) from exc
        except socket.gaierror as exc:
            raise _Transient(f"unknown host ({exc.strerror})", unreachable=True) from exc
        except TimeoutError as exc:
            raise _Transient(f"no answer within {self.timeout_s:g} s", unreachable=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc

    def _status_error(self, url: str, resp: http.client.HTTPResponse) -> Exception:
        status = resp.status
        _drain(resp)
        if status in (404, 410):
            return ShardNotFoundError(
                f"shard not found at {url} (HTTP {status})", location=url, status=status
            )
        if status in (401, 403):
            return SourceError(
                f"access denied to {url} (HTTP {status}): check the credentials in "
                "HttpSource.headers",
                location=url,
                status=status,
            )
        if 300 <= status < 400:
            return SourceError(
                f"{url} redirects (HTTP {status}) to {resp.getheader('Location')!r}: "
                "set base_url to the final location (redirects are not followed)",
                location=url,
                status=status,
            )
        if status == 416:
            return SourceError(
                f"{url} refused the byte range (HTTP 416): the remote file is smaller than "
                "expected",
                location=url,
                status=status,
            )
        if status == 429 or status >= 500:
            return _Transient(f"HTTP {status} {resp.reason}")
        return SourceError(
            f"{url} answered HTTP {status} {resp.reason}", location=url, status=status
        )

    def _retry_or_raise(
        self, url: str, exc: _Transient, attempt: int, resume_at: int | None
    ) -> None:
        if attempt > self.retries:
            tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
            if exc.unreachable:
                raise SourceUnreachableError(
                    f"cannot reach {url}: {exc.reason} ({tries})", location=url
                ) from exc
            raise SourceError(
                f"fetching {url} failed after {tries}: {exc.reason}", location=url
            ) from exc
        log.warning(
            "shard_source.retry", url=url, attempt=attempt, reason=exc.reason, resume_at=resume_at
        )
        time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))


class _Counter:
    """Forwards byte counts and remembers their sum (thread-safe)."""

    def __init__(self, forward: OnBytes) -> None:
        self.total = 0
        self._forward = forward
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n
        self._forward(n)


def _read_into(resp: http.client.HTTPResponse, buf: memoryview, url: str) -> int:
    try:
        return resp.readinto(buf)
    except TimeoutError as exc:
        raise _Transient("the connection stalled mid-body (read timeout)") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__} mid-body: {exc}") from exc


def _drain(resp: http.client.HTTPResponse) -> None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        resp.read()


def _size_changed(url: str, actual: int, expected: int) -> SourceError:
    return SourceError(
        f"{url} has {actual} bytes, expected {expected}: the remote file differs from the one "
        "the index describes",
        location=url,
    )


# ---------------------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CacheEntry:
    """One cached shard as `ShardCache.entries` lists it."""

    key: str
    path: Path
    size: int
    last_used_ns: int  # since the epoch
    sha256: str | None
    location: str | None


@dataclass(frozen=True)
class _Stamp:
    """The sidecar: what the verified bytes looked like right after they were hashed."""

    size: int
    sha256: str
    ino: int
    mtime_ns: int
    name: str
    location: str

    def matches(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_ino, st.st_mtime_ns) == (self.size, self.ino, self.mtime_ns)


@contextlib.contextmanager
def _flock(path: Path, operation: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation)
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_flock(path: Path, operation: int) -> int | None:
    """Take a lock without waiting; the fd to close, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sha256_file(path: Path) -> str:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardCache:
    """A node-local directory of verified shards, at most `max_bytes` big, shared by processes.

    `get` returns the path of a verified local copy, fetching it once per node. The returned
    path stays valid until the entry is evicted; hold `pinned(...)` instead while reading from
    it if other workers may fill the cache meanwhile (on Linux an already open or mmapped file
    stays readable after eviction anyway). Entries pinned or in flight are never evicted, so the
    bound is soft while they alone exceed it (a warning is logged). `durable=False` skips the
    fsyncs (tests, throwaway caches).
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str], max_bytes: int, *, durable: bool = True
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(cache_dir)
        self.max_bytes = max_bytes
        self.durable = durable
        self._objects = self.root / "objects"
        self._meta = self.root / "meta"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        for directory in (self._objects, self._meta, self._locks, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)

    # -- public

    def get(
        self,
        source: ShardSource,
        name: str,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        *,
        verify: Verify = "cheap",
        progress: ProgressFn | None = None,
    ) -> Path:
        """The path of a verified local copy of `name`, fetched from `source` on a miss."""
        with self.pinned(
            source, name, expected_sha256, expected_size, verify=verify, progress=progress
        ) as path:
            return path

    @contextlib.contextmanager
    def pinned(
        self,
        source: ShardSource,
        name: str,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        *,
        verify: Verify = "cheap",
        progress: ProgressFn | None = None,
    ) -> Iterator[Path]:
        """Like `get`, and the entry cannot be evicted until the block exits."""
        check_shard_name(name)
        digest = None if expected_sha256 is None else _normalize_digest(expected_sha256)
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        if verify not in ("cheap", "full"):
            raise ValueError(f"verify must be 'cheap' or 'full', got {verify!r}")
        location = source.location(name)
        key = entry_key(digest, location)
        with _flock(self._pin_path(key), fcntl.LOCK_SH):
            path = self._cheap_hit(key, digest, expected_size) if verify == "cheap" else None
            if path is None:
                with _flock(self._locks / f"{key}.fetch", fcntl.LOCK_EX):
                    path = self._verified_hit(
                        key, name, location, digest, expected_size, full=verify == "full"
                    )
                    if path is None:
                        path = self._fetch(
                            source, name, location, key, digest, expected_size, progress
                        )
            else:
                log.debug("shard_cache.hit", key=key, shard=name)
            self._touch(key)
            yield path

    def entries(self) -> list[CacheEntry]:
        """Cached shards, least recently used first."""
        found: list[CacheEntry] = []
        for item in os.scandir(self._objects):
            try:
                st = item.stat()
            except FileNotFoundError:
                continue
            size, last_used_ns = st.st_size, st.st_mtime_ns
            stamp = self._read_stamp(item.name)
            with contextlib.suppress(FileNotFoundError):
                last_used_ns = os.stat(self._meta_path(item.name)).st_mtime_ns
            found.append(
                CacheEntry(
                    key=item.name,
                    path=Path(item.path),
                    size=size,
                    last_used_ns=last_used_ns,
                    sha256=stamp.sha256 if stamp else None,
                    location=stamp.location if stamp else None,
                )
            )
        return sorted(found, key=lambda e: e.last_used_ns)

    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def discard(self, source: ShardSource, name: str, expected_sha256: str | None = None) -> bool:
        """Drop the cached copy of `name`; False when it is pinned or being fetched."""
        key = entry_key(expected_sha256, source.location(name))
        return self._evict(key)

    # -- hit checks

    def _cheap_hit(self, key: str, digest: str | None, expected_size: int | None) -> Path | None:
        obj = self._objects / key
        stamp = self._read_stamp(key)
        if stamp is None:
            return None
        try:
            st = os.stat(obj)
        except FileNotFoundError:
            return None
        if not stamp.matches(st):
            return None
        if digest is not None and stamp.sha256 != digest:
            return None
        if expected_size is not None and st.st_size != expected_size:
            return None
        return obj

    def _verified_hit(
        self,
        key: str,
        name: str,
        location: str,
        digest: str | None,
        expected_size: int | None,
        *,
        full: bool,
    ) -> Path | None:
        """Under the fetch lock: a cheap hit, else a full re-hash (re-stamping a good file)."""
        if not full and (hit := self._cheap_hit(key, digest, expected_size)) is not None:
            return hit  # another process fetched it while we waited
        obj = self._objects / key
        try:
            st = os.stat(obj)
        except FileNotFoundError:
            return None
        stamp = self._read_stamp(key)
        want = digest or (stamp.sha256 if stamp else None)
        if want is None:
            log.info("shard_cache.unverifiable", key=key, reason="no sidecar and no digest")
            return None
        if expected_size is not None and st.st_size != expected_size:
            log.warning(
                "shard_cache.corrupt",
                key=key,
                reason="size",
                size=st.st_size,
                expected=expected_size,
            )
            self._forget(key)
            return None
        actual = _sha256_file(obj)
        if actual != want:
            log.warning(
                "shard_cache.corrupt", key=key, reason="sha256", sha256=actual, expected=want
            )
            self._forget(key)
            return None
        self._write_stamp(key, obj, actual, name, location)
        log.info("shard_cache.reverified", key=key, bytes=st.st_size)
        return obj

    # -- fetch

    def _fetch(
        self,
        source: ShardSource,
        name: str,
        location: str,
        key: str,
        digest: str | None,
        expected_size: int | None,
        progress: ProgressFn | None,
    ) -> Path:
        size = expected_size if expected_size is not None else source.size(name)
        if size > self.max_bytes:
            raise CacheFullError(
                f"shard {name} ({size} bytes) is larger than the whole cache "
                f"(max_bytes={self.max_bytes}); raise max_bytes for {self.root}"
            )
        self._forget(key)  # any old copy is stale: nobody may trust it while we fetch
        self._make_room(size, keep=key)
        tmp = self._tmp / f"{key}.{secrets.token_hex(4)}.part"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells the stale-temp sweeper we are alive
            if size:
                with contextlib.suppress(OSError):  # reserve the space up front where supported
                    os.posix_fallocate(fd, 0, size)
            log.info("shard_cache.fetch", key=key, shard=name, location=location, bytes=size)
            meter = _ProgressMeter(name, size, progress)
            source.fetch(name, fd, size, meter.add)
            transfer = meter.finish()
            if meter.done != size or os.fstat(fd).st_size != size:
                raise IntegrityError(
                    f"{location} delivered {meter.done} bytes into a {os.fstat(fd).st_size}-byte "
                    f"file, expected {size}; nothing was cached"
                )
            if self.durable:
                os.fsync(fd)
            t0 = time.monotonic()
            actual = _sha256_file(tmp)
            verify_s = time.monotonic() - t0
            if digest is not None and actual != digest:
                raise IntegrityError(
                    f"{location} has sha256 {actual}, expected {digest}: the source holds "
                    "different bytes than the index names (re-pack or fix the source); "
                    "nothing was cached"
                )
            obj = self._objects / key
            os.replace(tmp, obj)
            if self.durable:
                _fsync_dir(self._objects)
            self._write_stamp(key, obj, actual, name, location)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        log.info(
            "shard_cache.fetched",
            key=key,
            shard=name,
            bytes=size,
            transfer_s=round(transfer.elapsed_s, 4),
            transfer_gbps=round(transfer.gbps, 3),
            verify_s=round(verify_s, 4),
        )
        self._make_room(0, keep=key)  # concurrent fetches may have overshot together
        return obj

    # -- eviction

    def _make_room(self, incoming: int, keep: str) -> None:
        """Evict least recently used, unpinned entries until used + incoming <= max_bytes.

        Bytes counted: committed objects plus downloads in flight (their temp files are
        preallocated to full size), so concurrent fetches do not overshoot together.
        """
        with _flock(self.root / "evict.lock", fcntl.LOCK_EX):
            in_flight = self._sweep_temps()
            entries = self.entries()
            used = sum(e.size for e in entries) + in_flight
            budget = self.max_bytes - incoming
            for entry in entries:
                if used <= budget:
                    return
                if entry.key != keep and self._evict(entry.key):
                    used -= entry.size
            if used > budget:
                log.warning(
                    "shard_cache.over_budget",
                    used_bytes=used,
                    incoming_bytes=incoming,
                    max_bytes=self.max_bytes,
                    reason="remaining entries are pinned or in flight",
                )

    def _evict(self, key: str) -> bool:
        fd = _try_flock(self._pin_path(key), fcntl.LOCK_EX)
        if fd is None:
            return False
        try:
            removed = False
            for path in (self._objects / key, self._meta_path(key)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed = True
            if removed:
                log.info("shard_cache.evicted", key=key)
            return removed
        finally:
            os.close(fd)

    def _sweep_temps(self, min_age_s: float = 60.0) -> int:
        """Remove temp files whose writer died; return the bytes of downloads still in flight."""
        in_flight = 0
        now = time.time()
        for item in os.scandir(self._tmp):
            try:
                st = item.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= min_age_s:
                fd = _try_flock(Path(item.path), fcntl.LOCK_EX)
                if fd is not None:
                    try:
                        os.unlink(item.path)
                        log.info("shard_cache.stale_temp_removed", file=item.name)
                        continue
                    finally:
                        os.close(fd)
            in_flight += st.st_size
        return in_flight

    # -- sidecars and paths

    def _pin_path(self, key: str) -> Path:
        return self._locks / f"{key}.pin"

    def _meta_path(self, key: str) -> Path:
        return self._meta / f"{key}.json"

    def _read_stamp(self, key: str) -> _Stamp | None:
        try:
            raw: Any = json.loads(self._meta_path(key).read_text())
            return _Stamp(
                size=int(raw["size"]),
                sha256=str(raw["sha256"]),
                ino=int(raw["ino"]),
                mtime_ns=int(raw["mtime_ns"]),
                name=str(raw["name"]),
                location=str(raw["location"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_stamp(self, key: str, obj: Path, sha256: str, name: str, location: str) -> None:
        st = os.stat(obj)
        stamp = {
            "version": 1,
            "size": st.st_size,
            "sha256": sha256,
            "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns,
            "name": name,
            "location": location,
        }
        tmp = self._meta / f"{key}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w") as f:
            json.dump(stamp, f)
            if self.durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self._meta_path(key))

    def _touch(self, key: str) -> None:
        """Advance the entry's LRU clock. Explicit nanoseconds: the kernel's own file timestamps
        tick only every few milliseconds, too coarse to order back-to-back uses."""
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._meta_path(key), ns=(now, now))

    def _forget(self, key: str) -> None:
        """Drop the sidecar so cheap checks stop trusting the object (under the fetch lock)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._meta_path(key))


# ---------------------------------------------------------------------------------- measurement


def measure_fetch(
    source: ShardSource,
    name: str,
    cache: ShardCache,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    cold: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float | int | str | bool]:
    """Time one `cache.get` of `name`: remote -> cache when `cold` (any cached copy dropped
    first), the hit path otherwise.

    `seconds`/`gbps` cover the whole get (fetch, fsync, sha256, rename); `transfer_gbps` only the
    bytes moving from the source (0 on a hit). Example: 1e9 bytes in 0.5 s -> gbps 2.0.
    """
    if cold:
        cache.discard(source, name, expected_sha256)
    reports: list[FetchProgress] = []
    start = clock()
    path = cache.get(source, name, expected_sha256, expected_size, progress=reports.append)
    seconds = clock() - start
    size = path.stat().st_size
    if cold and not reports:
        raise ShardCacheError(
            f"{name} was served from the cache (pinned elsewhere?); not a cold fetch"
        )
    return {
        "name": name,
        "location": source.location(name),
        "cold": cold,
        "bytes": size,
        "seconds": seconds,
        "gbps": size / seconds / GB if seconds > 0 else 0.0,
        "transfer_gbps": reports[-1].gbps if reports else 0.0,
    }
