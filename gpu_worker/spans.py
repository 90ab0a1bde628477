"""Cold-start spans: named, timed phases of one worker start, with numbers attached.

Times are seconds since the recorder's origin (by default when the OS process started, so the
first span, `process_ready`, shows interpreter start and imports). A recorder reads one
monotonic clock; the wall clock is read once, to place the origin and to give the unix ms that
lifecycle events carry.

The cold path records, in order (top-level spans; `weights.*` are the loader's steps):

    process_ready      origin -> runtime imported
    snapshot_restore   runtime state restored (packed artifact) | tokenizer_load (HF checkpoint)
    weights_available  weights on the device, checksums verified; attrs bytes, gbps, ...
      weights.plan | weights.allocate | weights.copy | weights.restore | weights.confirm
    engine_build       KV cache allocated; on CUDA, decode graphs captured
    warm_up            every kernel run once
    runtime_ready      origin -> ready to serve
    first_token        ready -> first token of the first request
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Span", "SpanRecorder", "format_span_table", "process_start_unix_s"]

Attr = str | int | float | bool | None


def process_start_unix_s() -> float:
    """When this OS process started (Linux /proc), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


@dataclass(frozen=True)
class Span:
    name: str
    start_s: float  # since the recorder's origin
    end_s: float
    origin_unix_s: float
    attrs: dict[str, Attr] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return (self.end_s - self.start_s) * 1e3

    @property
    def start_unix_ms(self) -> int:
        return int((self.origin_unix_s + self.start_s) * 1e3)

    @property
    def end_unix_ms(self) -> int:
        return max(self.start_unix_ms, int((self.origin_unix_s + self.end_s) * 1e3))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start_ms": round(self.start_s * 1e3, 3),
            "duration_ms": round(self.duration_ms, 3),
            "attrs": dict(self.attrs),
        }


class SpanRecorder:
    """Collects spans of one start. Not thread-safe: record from one thread."""

    def __init__(
        self,
        origin_unix_s: float | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._perf0 = clock()
        wall0 = wall()
        self.origin_unix_s = wall0 if origin_unix_s is None else origin_unix_s
        self._offset = wall0 - self.origin_unix_s  # seconds from the origin to _perf0
        self.spans: list[Span] = []

    def now(self) -> float:
        """Seconds since the origin."""
        return self._offset + self._clock() - self._perf0

    def add(self, name: str, start_s: float, end_s: float, **attrs: Attr) -> Span:
        span = Span(name, start_s, max(end_s, start_s), self.origin_unix_s, dict(attrs))
        self.spans.append(span)
        return span

    @contextlib.contextmanager
    def span(self, name: str, **attrs: Attr) -> Iterator[dict[str, Attr]]:
        """Time the block; the yielded dict takes attrs known only at the end."""
        start = self.now()
        extra: dict[str, Attr] = dict(attrs)
        try:
            yield extra
        finally:
            self.add(name, start, self.now(), **extra)

    def get(self, name: str) -> Span:
        for span in self.spans:
            if span.name == name:
                return span
        raise KeyError(f"no span {name!r}; have {[s.name for s in self.spans]}")

    def names(self) -> list[str]:
        return [s.name for s in self.spans]

    def table(self) -> str:
        return format_span_table(self.spans)


def _fmt_attr(value: Attr) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_span_table(spans: list[Span]) -> str:
    """A fixed-width table: name, start offset ms, duration ms, GB/s, other attrs."""
    rows = [("span", "start ms", "duration ms", "GB/s", "attrs")]
    for s in sorted(spans, key=lambda s: (s.start_s, -s.end_s)):
        gbps = s.attrs.get("gbps")
        other = " ".join(f"{k}={_fmt_attr(v)}" for k, v in s.attrs.items() if k != "gbps")
        rows.append(
            (
                s.name,
                f"{s.start_s * 1e3:.1f}",
                f"{s.duration_ms:.1f}",
                f"{gbps:.2f}" if isinstance(gbps, int | float) else "",
                other,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[c].rjust(widths[c]) for c in (1, 2, 3)]
        lines.append("  ".join(cells + [row[4]]).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  -----")
    return "\n".join(lines)
