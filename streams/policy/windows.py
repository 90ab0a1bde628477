"""Trailing windows and the hour-of-day profile: pure aggregations over time.

Time is unix milliseconds (an int), always passed in; nothing here reads a clock. Every
structure is a frozen value: `add` returns a new one. `to_dict` / `from_dict` give plain maps
(str keys, lists, numbers) for a Faust table with a JSON or msgpack codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SECOND_MS = 1_000
HOUR_MS = 3_600_000
DAY_HOURS = 24


def ms(seconds: float) -> int:
    """Seconds (how specs are written) to milliseconds (how time is passed): 1.5 -> 1500."""
    return round(seconds * SECOND_MS)


@dataclass(frozen=True, slots=True)
class Buckets:
    """A hopping window: values summed into fixed buckets of `bucket_ms`, kept for `keep_ms`.

    Each entry is (bucket start ms, sum of values, number of values), oldest first. Used two
    ways: as event counts (`add(at, n)`, read `rate_per_s`) and as gauge samples (`add(at,
    value)` once per observation, read `mean`).

    A window of `window_ms` ending at `now` is the bucket holding `now` plus the
    `window_ms / bucket_ms - 1` buckets before it; missing buckets count as zero. The current
    bucket is partial, so the window covers between `window_ms - bucket_ms` and `window_ms` of
    time and `rate_per_s` divides by the time actually covered.

        bucket 10 s, window 60 s, now = 125 s: current bucket starts at 120 s, the window's
        first at 70 s, covered = 125 - 70 = 55 s; 33 events in it -> 33 / 55 = 0.6 per s.
    """

    bucket_ms: int = 10 * SECOND_MS
    keep_ms: int = 120 * SECOND_MS
    entries: tuple[tuple[int, float, int], ...] = ()

    def __post_init__(self) -> None:
        if self.bucket_ms <= 0 or self.keep_ms < self.bucket_ms:
            raise ValueError(f"need 0 < bucket_ms <= keep_ms, got {self.bucket_ms}, {self.keep_ms}")

    def bucket_start(self, at: int) -> int:
        return at - at % self.bucket_ms

    def add(self, at: int, value: float = 1.0) -> Buckets:
        """Add `value` at time `at`. Buckets older than `keep_ms` before `at` are dropped; a value
        older than that is ignored."""
        start = self.bucket_start(at)
        newest = max(start, self.entries[-1][0]) if self.entries else start
        oldest = newest - self.keep_ms + self.bucket_ms
        if start < oldest:
            return self
        kept = [e for e in self.entries if e[0] >= oldest]
        for i, (s, total, count) in enumerate(kept):
            if s == start:
                kept[i] = (s, total + value, count + 1)
                break
            if s > start:  # a late value: its bucket goes before this one
                kept.insert(i, (start, value, 1))
                break
        else:
            kept.append((start, value, 1))
        return Buckets(self.bucket_ms, self.keep_ms, tuple(kept))

    def window_start(self, now: int, window_ms: int) -> int:
        """Start of the oldest bucket in the window of `window_ms` ending at `now`."""
        if window_ms % self.bucket_ms or window_ms < 2 * self.bucket_ms:
            raise ValueError(
                f"window_ms must be a multiple of bucket_ms ({self.bucket_ms}) and at least two "
                f"buckets, got {window_ms}"
            )
        if window_ms > self.keep_ms:
            raise ValueError(f"window_ms {window_ms} is longer than keep_ms {self.keep_ms}")
        return self.bucket_start(now) - window_ms + self.bucket_ms

    def _in_window(self, now: int, window_ms: int) -> tuple[float, int]:
        first = self.window_start(now, window_ms)
        last = self.bucket_start(now)
        total, count = 0.0, 0
        for start, s, c in self.entries:
            if first <= start <= last:
                total += s
                count += c
        return total, count

    def sum(self, now: int, window_ms: int) -> float:
        return self._in_window(now, window_ms)[0]

    def count(self, now: int, window_ms: int) -> int:
        return self._in_window(now, window_ms)[1]

    def rate_per_s(self, now: int, window_ms: int) -> float:
        """Sum per second over the time the window covers (see the class example)."""
        covered_ms = max(now - self.window_start(now, window_ms), 1)
        return self.sum(now, window_ms) * SECOND_MS / covered_ms

    def mean(self, now: int, window_ms: int) -> float | None:
        """Mean of the values added in the window; None when nothing was added.

        samples 4, 6, 8 in the last 6 s -> 6.0"""
        total, count = self._in_window(now, window_ms)
        return total / count if count else None

    def sum_before(self, now: int, window_ms: int) -> float:
        """Sum over the window that ends where the current window starts: the previous one.

        bucket 10 s, window 60 s, now = 125 s: the current window is [70, 130), the previous
        one [10, 70)."""
        first = self.window_start(now, window_ms)
        return self._in_window(first - 1, window_ms)[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "bucket_ms": self.bucket_ms,
            "keep_ms": self.keep_ms,
            "entries": [list(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Buckets:
        return cls(
            int(data["bucket_ms"]),
            int(data["keep_ms"]),
            tuple((int(s), float(t), int(c)) for s, t, c in data["entries"]),
        )


def hour_of_day(at: int, hour_ms: int = HOUR_MS) -> int:
    """0..23, UTC: 1_764_403_200_000 (2025-11-29 08:00 UTC) -> 8. With a shorter `hour_ms` (a
    time-compressed day, for benchmarks) the hours count from the unix epoch the same way."""
    return (at // hour_ms) % DAY_HOURS


@dataclass(frozen=True, slots=True)
class HourOfDayProfile:
    """Expected request rate per hour of day, learned from arrivals over days.

    For each hour of the day it keeps the arrivals seen in that hour and how many seconds of
    that hour were observed; the expected rate is their ratio. `add(at, n)` first credits the
    time since the previous `add` to the hours it spans (so quiet hours count as observed at
    rate zero), then counts `n` arrivals in the hour of `at`. Calling it once per autoscaler
    tick with the arrivals since the last tick is enough; so is calling it per arrival.

        hour 9 observed on three days (3 x 3600 s = 10_800 s) with 54_000 arrivals in all
        -> expected_rate(9) = 54_000 / 10_800 = 5.0 per s.

    An hour is trusted once it has been watched for `min_observed_s` (a whole hour by default:
    the 9 o'clock hour is predicted from earlier days' 9 o'clocks, not from its first minutes). A
    gap longer than `max_gap_s` between two adds (the control plane was down) is not
    credited: nobody watched. When an hour has more than `max_observed_s` of history both of
    its sums are halved, so old days fade (with a week of history that is a half-life of
    about a week). Hours are UTC; the daily pattern shifts with daylight saving for an hour.

    `hour_ms` is the length of an hour (3_600_000). A benchmark that compresses a day into
    minutes shortens it, and `min_observed_s`, `max_observed_s` and `max_gap_s` with it (they
    are real seconds): hour_ms 4_000 -> a 96 s day, an hour trusted after 4 s of watching.
    """

    arrivals: tuple[float, ...] = (0.0,) * DAY_HOURS
    observed_s: tuple[float, ...] = (0.0,) * DAY_HOURS
    last_at: int | None = None
    max_gap_s: float = 600.0
    max_observed_s: float = 7 * 3600.0
    min_observed_s: float = 3600.0
    hour_ms: int = HOUR_MS

    def add(self, at: int, arrivals: float = 1.0) -> HourOfDayProfile:
        counts, observed = list(self.arrivals), list(self.observed_s)
        last = self.last_at
        if last is not None and last < at <= last + ms(self.max_gap_s):
            t = last
            while t < at:  # credit [last, at) to the hours it spans
                next_hour = (t // self.hour_ms + 1) * self.hour_ms
                end = min(next_hour, at)
                observed[hour_of_day(t, self.hour_ms)] += (end - t) / SECOND_MS
                t = end
        hour = hour_of_day(at, self.hour_ms)
        counts[hour] += arrivals
        for h in range(DAY_HOURS):
            if observed[h] > self.max_observed_s:
                counts[h] /= 2
                observed[h] /= 2
        new_last = at if last is None else max(last, at)
        return HourOfDayProfile(
            tuple(counts),
            tuple(observed),
            new_last,
            self.max_gap_s,
            self.max_observed_s,
            self.min_observed_s,
            self.hour_ms,
        )

    def expected_rate(self, hour: int) -> float | None:
        """Arrivals per second expected in `hour` (0..23); None until that hour has been
        observed for `min_observed_s`."""
        seen = self.observed_s[hour % DAY_HOURS]
        if seen < self.min_observed_s:
            return None
        return self.arrivals[hour % DAY_HOURS] / seen

    def peak_ahead(self, now: int, lookahead_ms: int) -> tuple[float | None, int]:
        """The highest expected rate of the hours from `now` to `now + lookahead_ms` (what the
        pool should be ready for in the coming minutes; None before any hour is trusted), and
        when the hour it comes from starts (unix ms; at or before `now` when it is the current
        hour's, the earliest of equal rates).

        now 08:52, lookahead 10 min, rate(9) > rate(8) -> (rate(9), 09:00): a 9 o'clock peak
        is seen 8 minutes before it starts."""
        hour_ms = self.hour_ms
        times = [*range(now, now + lookahead_ms + 1, hour_ms), now + lookahead_ms]
        best: float | None = None
        starts = now
        for t in times:
            rate = self.expected_rate(hour_of_day(t, hour_ms))
            if rate is not None and (best is None or rate > best):
                best, starts = rate, t - t % hour_ms
        return best, starts

    def to_dict(self) -> dict[str, Any]:
        return {
            "arrivals": list(self.arrivals),
            "observed_s": list(self.observed_s),
            "last_at": self.last_at,
            "max_gap_s": self.max_gap_s,
            "max_observed_s": self.max_observed_s,
            "min_observed_s": self.min_observed_s,
            "hour_ms": self.hour_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HourOfDayProfile:
        last_at = data.get("last_at")
        return cls(
            tuple(float(x) for x in data["arrivals"]),
            tuple(float(x) for x in data["observed_s"]),
            None if last_at is None else int(last_at),
            float(data["max_gap_s"]),
            float(data["max_observed_s"]),
            float(data["min_observed_s"]),
            int(data.get("hour_ms", HOUR_MS)),
        )
