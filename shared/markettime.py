"""Market time of UTC instants: trade date, hour and minute of day in a time zone.

A zone's UTC offset is constant between transitions (a few a year), so converting a batch
is one offset lookup per row and integer arithmetic, instead of a calendar conversion per
row. The transitions of each (zone, UTC year) are found once, by asking Arrow's time zone
database for the offset of every hour of the year and then of every second of an hour in
which it changed, so the result is the same as converting each row with Arrow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SECOND_NS = 10**9
MINUTE_NS = 60 * SECOND_NS
HOUR_NS = 60 * MINUTE_NS
DAY_NS = 24 * HOUR_NS
# Whole UTC years that nanosecond timestamps can hold; instants beyond them (1677, 2262) take
# the offset of the nearest year looked up.
FIRST_YEAR, LAST_YEAR = 1678, 2261


@dataclass(frozen=True)
class LocalTime:
    """Market-time components of each row's timestamp (null where the timestamp is null)."""

    trade_date: pa.Array
    hour: pa.Array
    minute_of_day: pa.Array


def local_time(ts: pa.Array, market_tz: str) -> LocalTime:
    """trade_date, hour and minute of day of UTC timestamps (`timestamp[ns, UTC]`) in `market_tz`."""
    if isinstance(ts, pa.ChunkedArray):
        ts = ts.combine_chunks()
    mask = ts.is_null().to_numpy(zero_copy_only=False) if ts.null_count else None
    instants = ts.cast(pa.int64()).fill_null(0).to_numpy()
    known = instants if mask is None else instants[~mask]
    offsets: np.ndarray | int = 0
    day = None
    if len(known):
        first, last = int(known.min()), int(known.max())
        offsets = _offsets_between(instants, market_tz, first, last)
        day = _one_day(first, last, offsets)
    if day is not None:
        # Every row on one local date (a batch of a month in time order, nearly always): the
        # minute of day is one subtraction and one division a row, and the date one value.
        minute = (instants + (offsets - day * DAY_NS)) // MINUTE_NS
        trade_date = pa.array(np.full(len(instants), day, dtype=np.int32), pa.date32(), mask=mask)
    else:
        local = instants + offsets
        days = np.floor_divide(local, DAY_NS)
        minute = np.floor_divide(local - days * DAY_NS, MINUTE_NS)
        trade_date = pa.array(days.astype(np.int32), pa.date32(), mask=mask)
    return LocalTime(trade_date, pa.array(minute // 60, pa.int64(), mask=mask), pa.array(minute, pa.int64(), mask=mask))


def utc_offsets_ns(instants: np.ndarray, market_tz: str, valid: np.ndarray | None = None) -> np.ndarray | int:
    """The zone's UTC offset at each of `instants` (one int when one offset serves them all).

    Only the `valid` instants (all by default) decide the span of periods looked up.
    """
    known = instants if valid is None else instants[valid]
    if len(known) == 0:
        return 0
    return _offsets_between(instants, market_tz, int(known.min()), int(known.max()))


def _offsets_between(instants: np.ndarray, market_tz: str, first: int, last: int) -> np.ndarray | int:
    """`utc_offsets_ns` of `instants` whose valid ones lie from `first` to `last`."""
    if market_tz == "UTC":
        return 0
    starts, offsets = _periods(market_tz, _utc_year(first), _utc_year(last))
    begin = max(0, int(np.searchsorted(starts, first, side="right")) - 1)
    end = int(np.searchsorted(starts, last, side="right"))
    if end - begin == 1:  # the whole batch lies within one offset period
        return int(offsets[begin])
    index = np.searchsorted(starts[begin:end], instants, side="right") - 1
    return offsets[begin:end][np.clip(index, 0, None)]


def shared_day(instants: np.ndarray, market_tz: str) -> int | None:
    """The local day (days since 1970-01-01) on which all of `instants` (UTC ns, at least one)
    fall in `market_tz`, or None when they span more than one day or an offset change."""
    first, last = int(instants.min()), int(instants.max())
    return _one_day(first, last, _offsets_between(np.array([first, last], dtype=np.int64), market_tz, first, last))


def _one_day(first: int, last: int, offset: np.ndarray | int) -> int | None:
    """The local day of instants from `first` to `last` at one `offset`, if they share one."""
    if not isinstance(offset, int):
        return None
    day = (first + offset) // DAY_NS
    return day if (last + offset) // DAY_NS == day else None


def _utc_year(instant_ns: int) -> int:
    year = int(np.datetime64(instant_ns, "ns").astype("datetime64[Y]").astype(np.int64)) + 1970
    return min(max(year, FIRST_YEAR), LAST_YEAR)


def _periods(zone: str, first_year: int, last_year: int) -> tuple[np.ndarray, np.ndarray]:
    """Start instants and UTC offsets of the zone's periods covering the UTC years given."""
    parts = [_year_periods(zone, year) for year in range(first_year, last_year + 1)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@functools.lru_cache(maxsize=4096)
def _year_periods(zone: str, year: int) -> tuple[np.ndarray, np.ndarray]:
    """Offset periods starting within one UTC year: the year's start, then each transition."""
    start = int(np.datetime64(f"{year:04d}-01-01", "ns").astype(np.int64))
    end = int(np.datetime64(f"{year + 1:04d}-01-01", "ns").astype(np.int64))
    hours = np.arange(start, end + HOUR_NS, HOUR_NS, dtype=np.int64)
    by_hour = _arrow_offsets(hours, zone)
    starts, offsets = [start], [int(by_hour[0])]
    for i in np.flatnonzero(np.diff(by_hour)).tolist():
        # The offset changed within (hours[i], hours[i + 1]]: find the second it did.
        seconds = hours[i] + np.arange(1, HOUR_NS // SECOND_NS + 1, dtype=np.int64) * SECOND_NS
        changed = np.flatnonzero(_arrow_offsets(seconds, zone) != by_hour[i])[0]
        if seconds[changed] < end:
            starts.append(int(seconds[changed]))
            offsets.append(int(by_hour[i + 1]))
    return np.asarray(starts, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def _arrow_offsets(instants: np.ndarray, zone: str) -> np.ndarray:
    """UTC offsets (ns) of instants in `zone`, by Arrow's time zone database."""
    utc = pa.array(instants, pa.timestamp("ns", tz=zone))
    local = pc.local_timestamp(utc).cast(pa.int64()).to_numpy()
    return local - instants
