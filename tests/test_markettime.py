"""Market time by offset periods agrees with pandas' own time zone conversion."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shared.markettime import local_time, shared_day

TS = pa.timestamp("ns", tz="UTC")
ZONES = ["Australia/Sydney", "America/New_York", "Europe/London", "Asia/Kathmandu", "Australia/Lord_Howe",
         "America/St_Johns", "Pacific/Chatham", "UTC"]


def _instants(first: str, last: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low, high = (int(np.datetime64(t, "ns").astype(np.int64)) for t in (first, last))
    spread = rng.integers(low, high, n)
    # Seconds on either side of whole hours: where transitions happen.
    hours = (spread[: n // 4] // 3_600_000_000_000) * 3_600_000_000_000
    return np.concatenate([spread, hours + rng.integers(-2, 2, len(hours)) * 1_000_000_000])


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize(
    ("first", "last"),
    [("2024-03-01", "2024-04-30"), ("2024-10-01", "2025-04-30"), ("1965-01-01", "2035-01-01"),
     ("2024-04-06T14:00", "2024-04-06T18:00"), ("2024-03-04T00:00", "2024-03-04T06:00")],
)
def test_local_time_matches_pandas(zone: str, first: str, last: str) -> None:
    instants = _instants(first, last, 20_000, seed=len(zone))
    nulls = np.random.default_rng(7).random(len(instants)) < 0.02
    got = local_time(pa.array(instants, TS, mask=nulls), zone)

    local = pd.Series(pd.to_datetime(instants, utc=True)).dt.tz_convert(zone).dt.tz_localize(None)
    expected_date = local.dt.date.to_numpy()
    expected_minute = (local.dt.hour * 60 + local.dt.minute).to_numpy()
    dates = np.array(got.trade_date.to_pylist(), dtype=object)
    minutes = np.array(got.minute_of_day.to_pylist(), dtype=object)
    hours = np.array(got.hour.to_pylist(), dtype=object)
    assert all(d is None for d in dates[nulls]) and all(m is None for m in minutes[nulls])
    assert list(dates[~nulls]) == list(expected_date[~nulls])
    assert list(minutes[~nulls]) == list(expected_minute[~nulls])
    assert list(hours[~nulls]) == list(expected_minute[~nulls] // 60)


def test_sydney_daylight_saving_ends_on_the_hour() -> None:
    # 2024-04-07 03:00 AEDT (+11) becomes 02:00 AEST (+10) at 16:00 UTC on the 6th.
    instants = np.array(["2024-04-06T15:59:59", "2024-04-06T16:00:00", "2024-04-06T13:00:00"],
                        dtype="datetime64[ns]").astype(np.int64)
    got = local_time(pa.array(instants, TS), "Australia/Sydney")
    assert got.minute_of_day.to_pylist() == [2 * 60 + 59, 2 * 60, 0]
    assert [str(d) for d in got.trade_date.to_pylist()] == ["2024-04-07", "2024-04-07", "2024-04-07"]


def test_empty_and_all_null_batches() -> None:
    assert len(local_time(pa.array([], TS), "Australia/Sydney").trade_date) == 0
    got = local_time(pa.array([None, None], TS), "Australia/Sydney")
    assert got.trade_date.null_count == 2 and got.hour.null_count == 2


def test_shared_day_only_for_one_local_day_of_one_offset() -> None:
    def day_of(*texts: str, zone: str = "Australia/Sydney") -> str | None:
        instants = np.array(texts, dtype="datetime64[ns]").astype(np.int64)
        day = shared_day(instants, zone)
        return None if day is None else str(np.datetime64(day, "D"))

    # Sydney is UTC+11 in March: its 2024-03-05 runs from 13:00 UTC on the 4th.
    assert day_of("2024-03-04T13:00:00", "2024-03-05T12:59:59") == "2024-03-05"
    assert day_of("2024-03-04T12:59:59", "2024-03-04T13:00:00") is None
    assert day_of("2024-03-04T13:00:00", "2024-03-04T13:00:00", "2024-03-04T12:00:00") is None
    # Both instants fall on 2024-04-07 in Sydney, but daylight saving ends between them.
    assert day_of("2024-04-06T15:59:59", "2024-04-06T16:00:00") is None
    assert day_of("2024-04-06T16:00:00", "2024-04-07T13:59:59") == "2024-04-07"
    assert day_of("2024-03-04T23:59:59", "2024-03-04T00:00:00", zone="UTC") == "2024-03-04"
