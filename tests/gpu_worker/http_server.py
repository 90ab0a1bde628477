"""A real HTTP shard server for tests: serves a directory, honours Range, injects faults.

`ShardServer(root)` runs a ThreadingHTTPServer on 127.0.0.1:<free port> in a background thread,
speaking HTTP/1.1 with keep-alive. Per file it counts HEADs, GETs and body bytes sent.
`faults` switches on one misbehaviour at a time:

    ignore_range        answer every GET with 200 and the whole file
    truncate            the next N GET bodies stop halfway and the connection drops
    corrupt             flip one byte in every body
    fail_status/count   the next N requests answer that status
    delay_s             sleep before each GET body (widens races for single-flight tests)
    refuse_head         answer HEAD with 405

`fetch_in_child` is the entry point of the spawn-started processes of the single-flight test.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Faults:
    ignore_range: bool = False
    truncate: int = 0
    corrupt: bool = False
    fail_status: int = 503
    fail_count: int = 0
    delay_s: float = 0.0
    refuse_head: bool = False


@dataclass
class Counts:
    heads: int = 0
    gets: int = 0
    bytes_sent: int = 0


class ShardServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults = Faults()
        self.lock = threading.Lock()
        self._counts: defaultdict[str, Counts] = defaultdict(Counts)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.shard_server = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}/shards"

    def counts(self, name: str) -> Counts:
        with self.lock:
            c = self._counts[name]
            return Counts(c.heads, c.gets, c.bytes_sent)

    def __enter__(self) -> ShardServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    shard_server: ShardServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        shards = self.server.shard_server
        faults = shards.faults
        name = unquote(urlsplit(self.path).path).removeprefix("/shards/")
        with shards.lock:
            counts = shards._counts[name]
            if head:
                counts.heads += 1
            else:
                counts.gets += 1
            fail = faults.fail_count > 0
            if fail:
                faults.fail_count -= 1
            truncate = not head and faults.truncate > 0
            if truncate:
                faults.truncate -= 1
        if fail:
            self._empty(faults.fail_status)
            return
        if head and faults.refuse_head:
            self._empty(405)
            return
        path = shards.root / name
        if ".." in name.split("/") or not path.is_file():
            self._empty(404)
            return
        total = path.stat().st_size
        first, last = 0, total - 1
        requested = self.headers.get("Range")
        if requested and not faults.ignore_range:
            match = _RANGE.fullmatch(requested)
            first = int(match.group(1)) if match else total
            last = min(int(match.group(2)) if match and match.group(2) else total - 1, total - 1)
            if first > last:
                self._empty(416, {"Content-Range": f"bytes */{total}"})
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{last}/{total}")
        else:
            self.send_response(200)
        if not faults.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(last + 1 - first))
        self.end_headers()
        if head:
            return
        count = last + 1 - first
        send = count // 2 if truncate else count
        if truncate:
            self.close_connection = True
        if faults.delay_s:
            time.sleep(faults.delay_s)
        with shards.lock:  # counted first: the client may finish before the send returns
            counts.bytes_sent += send
        with open(path, "rb") as f:
            if faults.corrupt:
                body = bytearray(os.pread(f.fileno(), send, first))
                if body:
                    body[len(body) // 2] ^= 0xFF
                self.wfile.write(body)
            else:
                self.request.sendfile(f, first, send)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def closed_port_url() -> str:
    """A URL on a local port where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/shards"


def fetch_in_child(
    cache_dir: str,
    max_bytes: int,
    base_url: str,
    name: str,
    sha256: str,
    size: int,
    start_together: Barrier,
    results: Queue[tuple[str, str]],
) -> None:
    """One worker process on the node: wait until all are up, then get the shard."""
    from gpu_worker.shard_cache import HttpSource, ShardCache

    cache = ShardCache(cache_dir, max_bytes, durable=False)
    source = HttpSource(base_url, parallel_streams=2, chunk_bytes=256 * 1024, retry_backoff_s=0.01)
    start_together.wait(30)
    try:
        path = cache.get(source, name, sha256, size)
        results.put(("ok", str(path)))
    except Exception as exc:  # reported to the parent, which asserts on it
        results.put(("error", repr(exc)))
