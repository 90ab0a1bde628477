"""Pure bookkeeping of the worker's Kafka loop: which offset is safe to commit, and when a
request's pending tokens become a chunk. No Kafka, no clock: time is an argument.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field


class OffsetTracker:
    """At-least-once commits for one partition whose records finish out of order.

    A record's offset is committed only when it and every record before it are done, so a
    crash re-delivers every unfinished request. Example: records 10, 11, 12 consumed; 11 and 12
    finish -> committable stays 10 (10 still running); 10 finishes -> committable 13.
    """

    def __init__(self) -> None:
        self._open: set[int] = set()
        self._heap: list[int] = []  # offsets that may still be open (lazy deletion)
        self._next = -1  # one past the highest offset seen
        self._committed = -1

    def consumed(self, offset: int) -> None:
        self._open.add(offset)
        heapq.heappush(self._heap, offset)
        self._next = max(self._next, offset + 1)

    def done(self, offset: int) -> None:
        self._open.discard(offset)

    def skipped(self, offset: int) -> None:
        """A record that needed no work (e.g. sent to dead letters): done at once."""
        self._next = max(self._next, offset + 1)

    @property
    def open_count(self) -> int:
        return len(self._open)

    def committable(self) -> int | None:
        """The offset to commit now (Kafka's 'next offset to read'), or None if unchanged."""
        while self._heap and self._heap[0] not in self._open:
            heapq.heappop(self._heap)
        target = self._heap[0] if self._heap else self._next
        if target <= self._committed:
            return None
        return target

    def mark_committed(self, offset: int) -> None:
        self._committed = max(self._committed, offset)


@dataclass
class _Pending:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    first_pending_at_ms: int | None = None


@dataclass(frozen=True)
class ChunkPolicy:
    """First token goes out at once (TTFT); later ones in chunks of up to `max_tokens` tokens
    or `max_delay_ms` after the oldest unsent token, whichever comes first."""

    max_tokens: int = 8
    max_delay_ms: int = 50


@dataclass(frozen=True)
class ChunkOut:
    request_id: str
    seq: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


class ChunkBatcher:
    """Turns a request's token stream into numbered chunks (seq 0, 1, 2, ...)."""

    def __init__(self, policy: ChunkPolicy) -> None:
        self.policy = policy
        self._pending: dict[str, _Pending] = {}
        self._seq: dict[str, int] = {}

    def _emit(self, request_id: str, finish_reason: str | None) -> ChunkOut:
        pending = self._pending.pop(request_id, _Pending())
        seq = self._seq.get(request_id, 0)
        self._seq[request_id] = seq + 1
        return ChunkOut(request_id, seq, pending.text, pending.token_ids, finish_reason)

    def add(self, request_id: str, text: str, token_ids: list[int], now_ms: int) -> ChunkOut | None:
        pending = self._pending.setdefault(request_id, _Pending())
        pending.text += text
        pending.token_ids.extend(token_ids)
        if pending.first_pending_at_ms is None:
            pending.first_pending_at_ms = now_ms
        if self._seq.get(request_id, 0) == 0 or len(pending.token_ids) >= self.policy.max_tokens:
            return self._emit(request_id, None)
        return None

    def finish(self, request_id: str, finish_reason: str) -> ChunkOut:
        """The terminal chunk: whatever is pending plus the finish reason. Forgets the request."""
        chunk = self._emit(request_id, finish_reason)
        self._seq.pop(request_id, None)
        return chunk

    def due(self, now_ms: int) -> list[ChunkOut]:
        """Chunks whose oldest pending token has waited `max_delay_ms`."""
        late = [
            rid
            for rid, p in self._pending.items()
            if p.token_ids and p.first_pending_at_ms is not None
            and now_ms - p.first_pending_at_ms >= self.policy.max_delay_ms
        ]
        return [self._emit(rid, None) for rid in late]

    def next_deadline_ms(self) -> int | None:
        times = [
            p.first_pending_at_ms + self.policy.max_delay_ms
            for p in self._pending.values()
            if p.token_ids and p.first_pending_at_ms is not None
        ]
        return min(times) if times else None
