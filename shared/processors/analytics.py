"""The default processor: order-flow analytics per security-day and the run's tables.

Per job it keeps mergeable partials: one summary of the day (counts, sums, min/max,
first/last) and (records, volume, notional) per participant, venue, market hour and notional
size bucket. The aggregator merges them into the contract's tables.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.messages import JobParams
from shared.processors.base import JobContext, StoredResult
from shared.tables import TableSink

GROUP_DIMENSIONS = ("participant", "venue", "hour", "size_bucket")
SECURITY_DAILY_FLUSH_ROWS = 8_192
TS_UTC = pa.timestamp("ns", tz="UTC")


@dataclass
class Totals:
    """Mergeable sums of a set of rows: records, volume, notional."""

    records: int = 0
    volume: int = 0
    notional: float = 0.0

    def add(self, records: int, volume: int, notional: float) -> None:
        """Merge another set's sums."""
        self.records += records
        self.volume += volume
        self.notional += notional

    def merge(self, other: Totals) -> None:
        """Merge another `Totals`."""
        self.add(other.records, other.volume, other.notional)

    @property
    def vwap(self) -> float | None:
        """Volume-weighted average price."""
        return self.notional / self.volume if self.volume else None


@dataclass
class DaySummary(Totals):
    """Every analytics column's partial for a set of rows."""

    low: float = float("inf")
    high: float = float("-inf")
    buy_volume: int = 0
    sell_volume: int = 0
    first_ts: int | None = None
    last_ts: int | None = None

    def merge_day(self, other: DaySummary) -> None:
        """Merge another day summary."""
        self.merge(other)
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)
        self.buy_volume += other.buy_volume
        self.sell_volume += other.sell_volume
        if other.first_ts is not None:
            self.first_ts = other.first_ts if self.first_ts is None else min(self.first_ts, other.first_ts)
        if other.last_ts is not None:
            self.last_ts = other.last_ts if self.last_ts is None else max(self.last_ts, other.last_ts)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (floats round-trip exactly through JSON)."""
        return {
            "records": self.records,
            "volume": self.volume,
            "notional": self.notional,
            "low": self.low,
            "high": self.high,
            "buy_volume": self.buy_volume,
            "sell_volume": self.sell_volume,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DaySummary:
        """Inverse of `to_json`."""
        return cls(**data)

    def columns(self) -> dict[str, Any]:
        """The analytics columns of this summary."""
        return {
            "records": self.records,
            "volume": self.volume,
            "notional": self.notional,
            "vwap": self.vwap,
            "avg_size": self.volume / self.records if self.records else None,
            "low": self.low,
            "high": self.high,
            "buy_volume": self.buy_volume,
            "sell_volume": self.sell_volume,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
        }


class AnalyticsJob:
    """Accumulates one job's analytics partials over its accepted rows."""

    def __init__(self, params: JobParams) -> None:
        self._edges = np.asarray(params.size_buckets, dtype=np.float64)
        self._day = DaySummary()
        self._groups: dict[str, dict[Any, Totals]] = {d: {} for d in GROUP_DIMENSIONS}

    def add(self, rows: pa.Table) -> None:
        """Take a batch of accepted rows."""
        accumulate([self], rows, np.zeros(rows.num_rows, dtype=np.int64))

    def finish(self) -> dict[str, Any]:
        """The job's partial result."""
        groups = {
            dim: [[k, t.records, t.volume, t.notional] for k, t in _sorted_items(values)]
            for dim, values in self._groups.items()
        }
        return {"day": self._day.to_json() if self._day.records else None, "groups": groups}


_FLOW_AGGREGATES = [("size", "count"), ("size", "sum"), ("notional", "sum")]
# Above this many (job, group) cells a dimension is grouped by hashing instead of counting
# into a dense table (a participant column with very many distinct values).
DENSE_CELLS = 1 << 20


def accumulate(jobs: list[AnalyticsJob], rows: pa.Table, slots: np.ndarray) -> None:
    """Add accepted rows to the jobs they belong to (`slots[i]` indexes `jobs` for row i).

    One vectorised pass serves every job of a batch: per-job sums, minima and maxima are
    scattered into arrays indexed by job (and by group, for the grouped dimensions), so the
    cost per job is a few dictionary updates, not a pass over its rows.
    """
    if rows.num_rows == 0:
        return
    count = len(jobs)
    price = rows.column("price").to_numpy()
    size = rows.column("size").to_numpy()
    notional = price * size
    ts = rows.column("ts").cast(pa.int64()).to_numpy()
    side = rows.column("side")
    buy = pc.fill_null(pc.equal(side, "B"), False).to_numpy(zero_copy_only=False)
    sell = pc.fill_null(pc.equal(side, "S"), False).to_numpy(zero_copy_only=False)

    records = np.bincount(slots, minlength=count)
    volume = _int_sums(slots, size, count)
    notional_sum = np.bincount(slots, weights=notional, minlength=count)
    buy_volume = _int_sums(slots[buy], size[buy], count)
    sell_volume = _int_sums(slots[sell], size[sell], count)
    low, high = np.full(count, np.inf), np.full(count, -np.inf)
    np.minimum.at(low, slots, price)
    np.maximum.at(high, slots, price)
    first, last = np.full(count, np.iinfo(np.int64).max), np.full(count, np.iinfo(np.int64).min)
    np.minimum.at(first, slots, ts)
    np.maximum.at(last, slots, ts)
    for slot in np.flatnonzero(records).tolist():
        jobs[slot]._day.merge_day(
            DaySummary(int(records[slot]), int(volume[slot]), float(notional_sum[slot]), float(low[slot]),
                       float(high[slot]), int(buy_volume[slot]), int(sell_volume[slot]), int(first[slot]),
                       int(last[slot]))
        )

    edges = jobs[0]._edges
    coded: dict[str, tuple[np.ndarray, list[Any]]] = {
        "participant": _codes(rows.column("participant")),
        "venue": _codes(rows.column("venue")),
        "hour": (rows.column("hour").to_numpy(), list(range(24))),
        "size_bucket": (np.searchsorted(edges, notional, side="right"), list(range(len(edges) + 1))),
    }
    for dim, (codes, values) in coded.items():
        if count * len(values) > DENSE_CELLS:
            _accumulate_hashed(jobs, dim, slots, codes, values, size, notional)
            continue
        cells = slots * len(values) + codes
        cell_records = np.bincount(cells, minlength=count * len(values))
        cell_volume = _int_sums(cells, size, count * len(values))
        cell_notional = np.bincount(cells, weights=notional, minlength=count * len(values))
        for cell in np.flatnonzero(cell_records).tolist():
            slot, code = divmod(cell, len(values))
            _add_to(jobs[slot]._groups[dim], values[code], int(cell_records[cell]), int(cell_volume[cell]),
                    float(cell_notional[cell]))


def _add_to(totals: dict[Any, Totals], key: Any, records: int, volume: int, notional: float) -> None:
    """Add sums to `totals[key]` (the hottest loop of aggregation: no object made when the key exists)."""
    found = totals.get(key)
    if found is None:
        totals[key] = Totals(records, volume, notional)
    else:
        found.records += records
        found.volume += volume
        found.notional += notional


def _int_sums(index: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """Exact integer sums of `values` per `index`."""
    sums = np.zeros(length, dtype=np.int64)
    np.add.at(sums, index, values)
    return sums


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Each row's code for a text column, and the value of each code (null is the last)."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    values: list[Any] = [*encoded.dictionary.to_pylist(), None]
    codes = pc.fill_null(encoded.indices, len(values) - 1).to_numpy()
    return codes.astype(np.int64, copy=False), values


def _accumulate_hashed(
    jobs: list[AnalyticsJob],
    dim: str,
    slots: np.ndarray,
    codes: np.ndarray,
    values: list[Any],
    size: np.ndarray,
    notional: np.ndarray,
) -> None:
    """One dimension grouped by hashing (job, code) pairs, for dimensions with very many values."""
    keyed = pa.table({"slot": slots, "code": codes, "size": size, "notional": notional})
    grouped = keyed.group_by(["slot", "code"], use_threads=False).aggregate(_FLOW_AGGREGATES)
    for slot, code, records, volume, notional_sum in zip(
        grouped.column("slot").to_pylist(),
        grouped.column("code").to_pylist(),
        grouped.column("size_count").to_pylist(),
        grouped.column("size_sum").to_pylist(),
        grouped.column("notional_sum").to_pylist(),
        strict=True,
    ):
        _add_to(jobs[slot]._groups[dim], values[code], records, volume, notional_sum)


def _sort_key(key: Any) -> tuple[int, Any]:
    # Null is its own group and sorts last.
    return (1, "") if key is None else (0, key)


def _sorted_items(values: dict[Any, Totals]) -> list[tuple[Any, Totals]]:
    return sorted(values.items(), key=lambda item: _sort_key(item[0]))


# ---------------------------------------------------------------------------------------
# Aggregation: the contract's tables from job results in (security, date, month) order.
# ---------------------------------------------------------------------------------------

ANALYTICS_FIELDS = [
    ("records", pa.int64()),
    ("volume", pa.int64()),
    ("notional", pa.float64()),
    ("vwap", pa.float64()),
    ("avg_size", pa.float64()),
    ("low", pa.float64()),
    ("high", pa.float64()),
    ("buy_volume", pa.int64()),
    ("sell_volume", pa.int64()),
    ("first_ts", TS_UTC),
    ("last_ts", TS_UTC),
]
FLOW_FIELDS = [("records", pa.int64()), ("volume", pa.int64()), ("notional", pa.float64())]
VWAP_FIELDS = [*FLOW_FIELDS, ("vwap", pa.float64())]

SCHEMAS = {
    "security_daily": pa.schema([("security", pa.string()), ("trade_date", pa.date32()), *ANALYTICS_FIELDS]),
    "by_security": pa.schema([("security", pa.string()), *ANALYTICS_FIELDS, ("days", pa.int64())]),
    "by_date": pa.schema([("trade_date", pa.date32()), *ANALYTICS_FIELDS, ("securities", pa.int64())]),
    "by_participant": pa.schema(
        [("participant", pa.string()), *VWAP_FIELDS, ("notional_share", pa.float64())]
    ),
    "by_hour": pa.schema([("hour", pa.int64()), *VWAP_FIELDS]),
    "by_size_bucket": pa.schema(
        [
            ("size_bucket", pa.int64()),
            ("bucket_lower", pa.float64()),
            ("bucket_upper", pa.float64()),
            *FLOW_FIELDS,
        ]
    ),
    "by_venue": pa.schema([("venue", pa.string()), *FLOW_FIELDS, ("notional_share", pa.float64())]),
    "timeseries_hourly": pa.schema([("trade_date", pa.date32()), ("hour", pa.int64()), *VWAP_FIELDS]),
    "timeseries_daily": pa.schema([("trade_date", pa.date32()), *VWAP_FIELDS]),
}
TABLES = tuple(SCHEMAS)


@dataclass
class _Rows:
    """Column-wise row buffer for one table."""

    schema: pa.Schema
    columns: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = {name: [] for name in self.schema.names}
        self._count = 0

    def append(self, row: dict[str, Any]) -> None:
        for name, values in self.columns.items():
            values.append(row[name])
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def take(self) -> pa.Table:
        table = pa.table({n: pa.array(v, self.schema.field(n).type) for n, v in self.columns.items()})
        self.__post_init__()
        return table


def _day_date(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


def _security_days(results: Iterable[StoredResult]) -> Iterator[tuple[str, str, DaySummary, list[StoredResult]]]:
    """Results merged per (security, date): a day seen in two months' files is one day."""
    current: tuple[str, str] | None = None
    day = DaySummary()
    parts: list[StoredResult] = []
    for result in results:
        key = (result.security, result.date)
        if key != current:
            if current is not None:
                yield current[0], current[1], day, parts
            current, day, parts = key, DaySummary(), []
        if result.data.get("day"):
            day.merge_day(DaySummary.from_json(result.data["day"]))
        parts.append(result)
    if current is not None:
        yield current[0], current[1], day, parts


class AnalyticsProcessor:
    """Order-flow analytics: the contract's default processor."""

    name = "analytics"

    def start_job(self, context: JobContext) -> AnalyticsJob:
        """A fresh accumulator for one job."""
        return AnalyticsJob(context.job.params)

    def add_many(self, accumulators: list[Any], rows: pa.Table, slots: np.ndarray) -> None:
        """Rows of many jobs at once (see `accumulate`)."""
        accumulate(accumulators, rows, slots)

    def aggregate(self, results: Iterable[StoredResult], params: JobParams, sink: TableSink) -> dict[str, Any]:
        """Write every analytics table; memory stays bounded by dates, not by jobs."""
        by_date: dict[str, DaySummary] = {}
        securities_per_date: dict[str, int] = {}
        groups: dict[str, dict[Any, Totals]] = {d: {} for d in GROUP_DIMENSIONS}
        hourly: dict[tuple[str, int], Totals] = {}
        total = Totals()
        daily_rows = _Rows(SCHEMAS["security_daily"])
        security_rows = _Rows(SCHEMAS["by_security"])
        current_security: str | None = None
        security_day = DaySummary()
        security_days = 0

        def close_security() -> None:
            if current_security is not None and security_days:
                security_rows.append(
                    {"security": current_security, **security_day.columns(), "days": security_days}
                )

        with (
            sink.stream("security_daily", SCHEMAS["security_daily"]) as daily_out,
            sink.stream("by_security", SCHEMAS["by_security"]) as security_out,
        ):
            for security, date, day, parts in _security_days(results):
                if security != current_security:
                    close_security()
                    current_security, security_day, security_days = security, DaySummary(), 0
                for part in parts:
                    for dim in GROUP_DIMENSIONS:
                        target = groups[dim]
                        for key, records, volume, notional in part.data["groups"][dim]:
                            _add_to(target, key, records, volume, notional)
                            if dim == "hour":
                                _add_to(hourly, (date, key), records, volume, notional)
                if not day.records:
                    continue
                daily_rows.append({"security": security, "trade_date": _day_date(date), **day.columns()})
                security_day.merge_day(day)
                security_days += 1
                by_date.setdefault(date, DaySummary()).merge_day(day)
                securities_per_date[date] = securities_per_date.get(date, 0) + 1
                total.merge(day)
                if len(daily_rows) >= SECURITY_DAILY_FLUSH_ROWS:
                    daily_out.write(daily_rows.take())
                if len(security_rows) >= SECURITY_DAILY_FLUSH_ROWS:
                    security_out.write(security_rows.take())
            close_security()
            daily_out.write(daily_rows.take())
            security_out.write(security_rows.take())

        self._write_small_tables(sink, params, by_date, securities_per_date, groups, hourly, total)
        return {"records": total.records, "volume": total.volume, "notional": total.notional}

    @staticmethod
    def _write_small_tables(
        sink: TableSink,
        params: JobParams,
        by_date: dict[str, DaySummary],
        securities_per_date: dict[str, int],
        groups: dict[str, dict[Any, Totals]],
        hourly: dict[tuple[str, int], Totals],
        total: Totals,
    ) -> None:
        def share(t: Totals) -> float | None:
            return t.notional / total.notional if total.notional else None

        def flow(t: Totals) -> dict[str, Any]:
            return {"records": t.records, "volume": t.volume, "notional": t.notional}

        def rows(name: str, items: Iterable[dict[str, Any]]) -> None:
            buffer = _Rows(SCHEMAS[name])
            for item in items:
                buffer.append(item)
            sink.write(name, buffer.take())

        dates = sorted(by_date)
        rows(
            "by_date",
            ({"trade_date": _day_date(d), **by_date[d].columns(), "securities": securities_per_date[d]} for d in dates),
        )
        rows(
            "by_participant",
            (
                {"participant": k, **flow(t), "vwap": t.vwap, "notional_share": share(t)}
                for k, t in _sorted_items(groups["participant"])
            ),
        )
        rows("by_hour", ({"hour": k, **flow(t), "vwap": t.vwap} for k, t in _sorted_items(groups["hour"])))
        edges = list(params.size_buckets)
        rows(
            "by_size_bucket",
            (
                {
                    "size_bucket": k,
                    "bucket_lower": edges[k - 1] if k > 0 else None,
                    "bucket_upper": edges[k] if k < len(edges) else None,
                    **flow(t),
                }
                for k, t in _sorted_items(groups["size_bucket"])
            ),
        )
        rows(
            "by_venue",
            ({"venue": k, **flow(t), "notional_share": share(t)} for k, t in _sorted_items(groups["venue"])),
        )
        rows(
            "timeseries_hourly",
            (
                {"trade_date": _day_date(d), "hour": h, **flow(t), "vwap": t.vwap}
                for (d, h), t in sorted(hourly.items())
                if t.records
            ),
        )
        rows(
            "timeseries_daily",
            ({"trade_date": _day_date(d), **flow(by_date[d]), "vwap": by_date[d].vwap} for d in dates),
        )
