"""Trailing-window buckets and the hour-of-day profile, with the numbers of their docstrings."""

from __future__ import annotations

import json

import pytest

from streams.policy.windows import HOUR_MS, Buckets, HourOfDayProfile, hour_of_day

T0 = 1_764_403_200_000  # 08:00 UTC, a multiple of 10 s


def counts(*times_s: float, bucket_s: float = 10, keep_s: float = 120) -> Buckets:
    b = Buckets(int(bucket_s * 1000), int(keep_s * 1000))
    for t in times_s:
        b = b.add(T0 + int(t * 1000))
    return b


def test_rate_over_the_time_the_window_covers():
    # 33 events between 70 s and 125 s; now 125 s: window [70 s, 125 s] covers 55 s
    b = counts(*[70 + i * (55 / 33) for i in range(33)], 5, 69.9)
    assert b.sum(T0 + 125_000, 60_000) == 33
    assert b.rate_per_s(T0 + 125_000, 60_000) == pytest.approx(0.6)


def test_sum_before_is_the_previous_window():
    b = counts(15, 25, 69, 70, 125)
    assert b.sum(T0 + 125_000, 60_000) == 2  # 70, 125
    assert b.sum_before(T0 + 125_000, 60_000) == 3  # 15, 25, 69


def test_mean_of_samples():
    b = Buckets(1_000, 60_000)
    for t, v in [(0, 100.0), (55, 4.0), (57, 6.0), (59, 8.0)]:
        b = b.add(T0 + t * 1000, v)
    assert b.mean(T0 + 59_500, 6_000) == 6.0
    assert b.mean(T0 + 59_500, 60_000) == pytest.approx(118 / 4)
    assert b.mean(T0 + 200_000, 6_000) is None


def test_old_buckets_are_dropped_and_late_values_find_their_bucket():
    # keep 120 s: the newest bucket [130, 140) and the 11 before it, from 20 s on
    b = counts(0, 25, 130)
    assert [s - T0 for s, _, _ in b.entries] == [20_000, 130_000]
    b = b.add(T0 + 75_000)  # late, but within keep
    assert [s - T0 for s, _, _ in b.entries] == [20_000, 70_000, 130_000]
    assert b.add(T0 + 15_000) == b  # older than keep: ignored


def test_windows_must_be_whole_buckets():
    b = Buckets(10_000, 120_000)
    for bad in (15_000, 10_000, 130_000):
        with pytest.raises(ValueError):
            b.sum(T0, bad)


def test_buckets_round_trip():
    b = counts(1, 2, 33)
    assert Buckets.from_dict(json.loads(json.dumps(b.to_dict()))) == b


# --- hour-of-day profile -----------------------------------------------------------------


def test_hour_of_day_is_utc():
    assert hour_of_day(T0) == 8 and hour_of_day(T0 + 16 * HOUR_MS) == 0


def feed(profile: HourOfDayProfile, start: int, minutes: int, per_minute: float):
    for m in range(minutes):
        profile = profile.add(start + m * 60_000, per_minute)
    return profile


def test_expected_rate_is_arrivals_over_observed_time():
    # three days of hour 9 at 300 per minute: 54_000 over 10_800 s = 5/s
    p = HourOfDayProfile()
    for day in range(3):
        p = feed(p, T0 + HOUR_MS + day * 24 * HOUR_MS, 61, 300)
    assert p.observed_s[9] == pytest.approx(3 * 3600)
    assert p.expected_rate(9) == pytest.approx(5.0, rel=0.01)
    assert p.expected_rate(8) is None  # never watched


def test_an_hour_is_trusted_only_after_a_whole_hour_of_watching():
    p = feed(HourOfDayProfile(), T0, 30, 60)
    assert p.expected_rate(8) is None
    p = feed(p, T0 + 30 * 60_000, 31, 60)
    assert p.expected_rate(8) == pytest.approx(1.0, rel=0.02)


def test_gaps_longer_than_max_gap_are_not_watched_time():
    p = HourOfDayProfile().add(T0, 0).add(T0 + 2 * HOUR_MS, 10)  # down for two hours
    assert sum(p.observed_s) == 0 and p.arrivals[10] == 10


def test_time_is_split_across_hour_boundaries():
    p = HourOfDayProfile().add(T0 + HOUR_MS - 120_000, 0).add(T0 + HOUR_MS + 180_000, 0)
    assert (p.observed_s[8], p.observed_s[9]) == (120.0, 180.0)


def test_old_days_fade():
    p = HourOfDayProfile(max_observed_s=2 * 3600)
    p = feed(p, T0, 61, 600)  # 10/s
    p = feed(p, T0 + 24 * HOUR_MS, 61, 600)
    assert p.observed_s[8] <= 2 * 3600
    p = feed(p, T0 + 48 * HOUR_MS, 61, 60)  # then 1/s
    p = feed(p, T0 + 72 * HOUR_MS, 61, 60)
    assert 1.0 < p.expected_rate(8) < 4.0  # the old 10/s weighs less and less


def test_peak_ahead_looks_into_the_coming_hour():
    p = HourOfDayProfile(min_observed_s=0)
    p = feed(p, T0, 121, 6)  # hour 8: 0.1/s, hour 9: 0.1/s
    p = feed(p, T0 + 24 * HOUR_MS + HOUR_MS, 61, 600)  # hour 9 another day: busier
    at_0830, at_0852 = T0 + 30 * 60_000, T0 + 52 * 60_000
    assert p.peak_ahead(at_0830, 10 * 60_000)[0] == pytest.approx(p.expected_rate(8))
    assert p.peak_ahead(at_0852, 10 * 60_000)[0] == pytest.approx(p.expected_rate(9))
    assert p.expected_rate(9) > 4 * p.expected_rate(8)
    # ... and says when that hour starts: 09:00 ahead, or the current hour's start (08:00)
    assert p.peak_ahead(at_0852, 10 * 60_000) == (p.expected_rate(9), T0 + HOUR_MS)
    assert p.peak_ahead(at_0830, 10 * 60_000) == (p.expected_rate(8), T0)


def test_profile_round_trip():
    p = feed(HourOfDayProfile(), T0, 5, 3)
    assert HourOfDayProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_a_compressed_day_has_hours_of_hour_ms():
    # a 96 s day: 4 s hours; T0 is a multiple of 96 s, so it starts hour 0
    hour = 4_000
    assert T0 % (24 * hour) == 0
    assert hour_of_day(T0 + 9 * hour + 10, hour) == 9
    p = HourOfDayProfile(max_gap_s=1.0, min_observed_s=4.0, max_observed_s=28.0, hour_ms=hour)
    for tick in range(24 * 4 * 4):  # one day in 0.25 s ticks; hour 9: 2 arrivals a tick
        at = T0 + tick * 250
        p = p.add(at, 2 if hour_of_day(at, hour) == 9 else 0)
    assert p.observed_s[9] == pytest.approx(4.0)
    assert p.expected_rate(9) == pytest.approx(8.0)  # 32 arrivals over 4 s
    assert p.expected_rate(8) == 0.0
    assert p.peak_ahead(T0 + 8 * hour + 3_000, 2_000)[0] == pytest.approx(8.0)
    assert p.peak_ahead(T0 + 8 * hour, 2_000)[0] == 0.0
    assert p.peak_ahead(T0 + 8 * hour + 3_000, 2_000) == (8.0, T0 + 9 * hour)
    assert p.peak_ahead(T0 + 9 * hour + 3_000, 2_000) == (8.0, T0 + 9 * hour)
    assert HourOfDayProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_a_row_without_hour_ms_has_real_hours():
    row = HourOfDayProfile().to_dict()
    del row["hour_ms"]
    assert HourOfDayProfile.from_dict(row).hour_ms == HOUR_MS
