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

from shared.inputs import label_codes, label_mask
from shared.messages import JobParams
from shared.processors.base import JobContext, StoredResult
from shared.tables import TableSink

GROUP_DIMENSIONS = ("participant", "venue", "hour", "size_bucket")
SECURITY_DAILY_FLUSH_ROWS = 8_192
HOURS = list(range(24))
# Above this many (job, group) cells a dimension is grouped by sorting the cells present
# instead of counting into a dense table (a participant column with very many distinct values).
DENSE_CELLS = 1 << 20
# Cells a batch buffers per dimension before merging them into one cell per (job, value).
COMPACT_CELLS = 1 << 18
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


class BatchPartials:
    """The analytics partials of every job of one batch, as arrays indexed by the job's slot.

    Rows of many jobs arrive together (`add`); the day columns are reduced into per-slot
    arrays and the grouped dimensions into (slot, group) cells, all vectorised, so the cost
    per job is a few array slices when its result is asked for, not work per row or per batch.
    """

    def __init__(self, params: JobParams, count: int) -> None:
        self.count = count
        self._edges = np.asarray(params.size_buckets, dtype=np.float64)
        self.records = np.zeros(count, dtype=np.int64)
        self.volume = np.zeros(count, dtype=np.int64)
        self.notional = np.zeros(count, dtype=np.float64)
        self.low = np.full(count, np.inf)
        self.high = np.full(count, -np.inf)
        self.buy_volume = np.zeros(count, dtype=np.int64)
        self.sell_volume = np.zeros(count, dtype=np.int64)
        self.first = np.full(count, np.iinfo(np.int64).max)
        self.last = np.full(count, np.iinfo(np.int64).min)
        # Per dimension: its group values seen so far (a group's code is its position) and
        # the (slot, code, records, volume, notional) cells of each added batch of rows.
        self._values: dict[str, list[Any]] = {d: [] for d in GROUP_DIMENSIONS}
        self._codes: dict[str, dict[Any, int]] = {d: {} for d in GROUP_DIMENSIONS}
        self._cells: dict[str, list[tuple[np.ndarray, ...]]] = {d: [] for d in GROUP_DIMENSIONS}
        self._groups: dict[str, _SlotGroups] | None = None

    def add(self, rows: pa.Table, slots: np.ndarray) -> None:
        """Take accepted rows; `slots[i]` is the slot of row i's job."""
        if rows.num_rows == 0:
            return
        if self._groups is not None:
            raise RuntimeError("rows added after results were taken")
        price = rows.column("price").to_numpy()
        size = rows.column("size").to_numpy()
        notional = price * size
        self._add_day(rows, slots, price, size, notional)
        self._add_groups("participant", slots, *_codes(rows.column("participant")), size, notional)
        self._add_groups("venue", slots, *_codes(rows.column("venue")), size, notional)
        self._add_groups("hour", slots, rows.column("hour").to_numpy(), HOURS, size, notional)
        buckets = list(range(len(self._edges) + 1))
        self._add_groups("size_bucket", slots, _bucket_of(notional, self._edges), buckets, size, notional)

    def _add_day(self, rows: pa.Table, slots: np.ndarray, price: np.ndarray, size: np.ndarray,
                 notional: np.ndarray) -> None:
        ts = rows.column("ts").cast(pa.int64()).to_numpy()
        side = rows.column("side")
        buy = np.where(label_mask(side, lambda sides: pc.equal(sides, "B")), size, 0)
        sell = np.where(label_mask(side, lambda sides: pc.equal(sides, "S")), size, 0)
        # Rows of one job usually come in runs (input sorted by security and time): reduce
        # each run first, then scatter the runs' partials to their slots. Unsorted rows are
        # scattered one by one.
        starts = np.flatnonzero(np.diff(slots)) + 1
        in_runs = len(starts) < len(slots) // 4
        if in_runs:
            starts = np.concatenate(([0], starts))

        def per_run(reduce: np.ufunc, values: np.ndarray) -> np.ndarray:
            return reduce.reduceat(values, starts) if in_runs else values

        owner = slots[starts] if in_runs else slots
        np.add.at(self.records, owner, np.diff(np.append(starts, len(slots))) if in_runs else 1)
        for target, values in ((self.volume, size), (self.buy_volume, buy), (self.sell_volume, sell)):
            np.add.at(target, owner, per_run(np.add, values))
        # Notional is added row by row, in input order: a floating-point sum that does not
        # depend on which other jobs shared the batch (runs or not) or how the rows were split
        # into batches, so a job run again gives the same result to the last bit.
        np.add.at(self.notional, slots, notional)
        np.minimum.at(self.low, owner, per_run(np.minimum, price))
        np.maximum.at(self.high, owner, per_run(np.maximum, price))
        np.minimum.at(self.first, owner, per_run(np.minimum, ts))
        np.maximum.at(self.last, owner, per_run(np.maximum, ts))

    def _add_groups(self, dim: str, slots: np.ndarray, codes: np.ndarray, values: list[Any], size: np.ndarray,
                    notional: np.ndarray) -> None:
        """Sums per (slot, group) cell of one dimension; `codes` index `values` (this batch's)."""
        width = len(values)
        cells = slots * width + codes
        dense = self.count * width <= DENSE_CELLS
        if dense:
            index, length = cells, self.count * width
        else:  # very many distinct values: number the cells present by sorting, not a dense table
            present, index = np.unique(cells, return_inverse=True)
            length = len(present)
        records = np.bincount(index, minlength=length)
        volume = np.zeros(length, dtype=np.int64)
        np.add.at(volume, index, size)
        amount = np.bincount(index, weights=notional, minlength=length)
        if dense:
            present = np.flatnonzero(records)
            records, volume, amount = records[present], volume[present], amount[present]
        known = self._codes[dim]
        seen = self._values[dim]
        to_code = np.fromiter((known.setdefault(v, len(known)) for v in values), dtype=np.int64, count=width)
        before = len(seen)
        seen.extend(values[i] for i in range(width) if to_code[i] >= before)
        parts = self._cells[dim]
        parts.append((present // width, to_code[present % width], records, volume, amount))
        if sum(len(part[0]) for part in parts) > COMPACT_CELLS:
            # Unsorted input spreads every job over every batch of rows: keep one cell per
            # (job, group value), not one per batch of rows, so memory stays bounded.
            self._cells[dim] = [_merged_cells(parts, len(seen))]

    def result(self, slot: int) -> dict[str, Any]:
        """One job's partial result (JSON-ready)."""
        if self._groups is None:
            self._groups = {d: _SlotGroups.of(self._cells[d], self._values[d], self.count) for d in GROUP_DIMENSIONS}
            self._cells = {d: [] for d in GROUP_DIMENSIONS}
        records = int(self.records[slot])
        day = None
        if records:
            day = DaySummary(records, int(self.volume[slot]), float(self.notional[slot]), float(self.low[slot]),
                             float(self.high[slot]), int(self.buy_volume[slot]), int(self.sell_volume[slot]),
                             int(self.first[slot]), int(self.last[slot])).to_json()
        return {"day": day, "groups": {d: groups.of_slot(slot) for d, groups in self._groups.items()}}


@dataclass
class _SlotGroups:
    """One dimension's merged cells, ordered by slot and then by group value (null last)."""

    bounds: np.ndarray
    keys: list[Any]
    records: list[int]
    volume: list[int]
    notional: list[float]

    @classmethod
    def of(cls, parts: list[tuple[np.ndarray, ...]], values: list[Any], count: int) -> _SlotGroups:
        if not parts:
            return cls(np.zeros(count + 1, dtype=np.int64), [], [], [], [])
        # Codes renumbered in the order of their values, so cells sort by slot, then value.
        rank = np.empty(len(values), dtype=np.int64)
        rank[sorted(range(len(values)), key=lambda i: _sort_key(values[i]))] = np.arange(len(values))
        slot, code, records, volume, amount = _merged_cells([(p[0], rank[p[1]], *p[2:]) for p in parts], len(values))
        by_rank = np.argsort(rank)
        return cls(
            np.searchsorted(slot, np.arange(count + 1)),
            [values[i] for i in by_rank[code].tolist()],
            records.tolist(),
            volume.tolist(),
            amount.tolist(),
        )

    def of_slot(self, slot: int) -> dict[str, list[Any]]:
        begin, end = int(self.bounds[slot]), int(self.bounds[slot + 1])
        return {"keys": self.keys[begin:end], "records": self.records[begin:end],
                "volume": self.volume[begin:end], "notional": self.notional[begin:end]}


def _bucket_of(notional: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each notional's bucket: how many edges are at or below it."""
    if len(edges) > 8:
        return np.searchsorted(edges, notional, side="right")
    # Few edges (the usual case): one comparison per edge beats a binary search per row.
    bucket = np.zeros(len(notional), dtype=np.int64)
    for edge in edges:
        bucket += notional >= edge
    return bucket


def _merged_cells(parts: list[tuple[np.ndarray, ...]], width: int) -> tuple[np.ndarray, ...]:
    """(slot, code, records, volume, notional) cells with one cell per (slot, code), in that order."""
    slot, code, records, volume, amount = (np.concatenate(column) for column in zip(*parts, strict=True))
    cells, index = np.unique(slot * width + code, return_inverse=True)
    merged_records = np.zeros(len(cells), dtype=np.int64)
    merged_volume = np.zeros(len(cells), dtype=np.int64)
    np.add.at(merged_records, index, records)
    np.add.at(merged_volume, index, volume)
    merged_amount = np.bincount(index, weights=amount, minlength=len(cells))
    return cells // width, cells % width, merged_records, merged_volume, merged_amount


class AnalyticsJob:
    """One job's view of a `BatchPartials`: its slot's rows in, its partial result out."""

    def __init__(self, batch: BatchPartials, slot: int) -> None:
        self.batch, self.slot = batch, slot

    def add(self, rows: pa.Table) -> None:
        """Take a batch of this job's accepted rows."""
        self.batch.add(rows, np.full(rows.num_rows, self.slot, dtype=np.int64))

    def finish(self) -> dict[str, Any]:
        """The job's partial result."""
        return self.batch.result(self.slot)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Each row's code for a label column, and the value of each code (null is the last)."""
    codes, values = label_codes(column)
    labels: list[Any] = [*values.to_pylist(), None]
    return np.where(codes < 0, len(labels) - 1, codes), labels


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


def _group_columns(groups: dict[str, list[Any]] | list[list[Any]]) -> dict[str, list[Any]]:
    """A job's groups of one dimension as columns (results of earlier versions hold rows)."""
    if isinstance(groups, dict):
        return groups
    keys, records, volume, notional = (list(column) for column in zip(*groups, strict=True)) if groups else ([],) * 4
    return {"keys": keys, "records": records, "volume": volume, "notional": notional}


class _GroupSums:
    """(records, volume, notional) summed per group key, taken a job's cells at a time.

    The aggregator's hottest loop: 10 k jobs bring about 300 k cells. Cells are gathered as
    columns and added up with `numpy.add.at` every `FOLD_CELLS` cells and at the end. It adds
    in cell order, one cell at a time, so every sum (floating point included) is the one that
    adding the cells in turn gives, with a bounded number of cells held.
    """

    FOLD_CELLS = 65_536

    def __init__(self) -> None:
        self._codes: dict[Any, int] = {}  # key -> its row in the sums, in order of first sight
        self._sums: tuple[np.ndarray, ...] = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
        self._keys: list[Any] = []
        self._columns: tuple[list[Any], list[Any], list[Any]] = ([], [], [])

    def extend(self, cells: dict[str, list[Any]], keys: list[Any] | None = None) -> None:
        """Add a job's cells (columns keys, records, volume, notional); `keys` replaces theirs."""
        self._keys.extend(cells["keys"] if keys is None else keys)
        records, volume, notional = self._columns
        records.extend(cells["records"])
        volume.extend(cells["volume"])
        notional.extend(cells["notional"])
        if len(self._keys) >= self.FOLD_CELLS:
            self._fold()

    def _fold(self) -> None:
        codes_of = self._codes
        codes = np.fromiter((codes_of.setdefault(k, len(codes_of)) for k in self._keys), np.int64, len(self._keys))
        grown = len(codes_of) - len(self._sums[0])
        if grown:  # keys seen for the first time start at zero
            self._sums = tuple(np.concatenate((total, np.zeros(grown, total.dtype))) for total in self._sums)
        for total, column in zip(self._sums, self._columns, strict=True):
            np.add.at(total, codes, np.array(column, dtype=total.dtype))
            column.clear()
        self._keys.clear()

    def totals(self) -> dict[Any, Totals]:
        """The sums per key."""
        self._fold()
        records: list[int] = self._sums[0].tolist()
        volume: list[int] = self._sums[1].tolist()
        notional: list[float] = self._sums[2].tolist()
        return {key: Totals(records[i], volume[i], notional[i]) for key, i in self._codes.items()}


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
        return AnalyticsJob(BatchPartials(context.job.params, 1), 0)

    def start_batch(self, contexts: list[JobContext]) -> list[AnalyticsJob]:
        """Accumulators for the jobs of one batch, sharing one set of arrays."""
        batch = BatchPartials(contexts[0].job.params, len(contexts))
        return [AnalyticsJob(batch, slot) for slot in range(len(contexts))]

    def add_many(self, accumulators: list[AnalyticsJob], rows: pa.Table, slots: np.ndarray) -> None:
        """Rows of many jobs at once; `accumulators` come from one `start_batch`, in its order."""
        batch = accumulators[0].batch
        if batch.count != len(accumulators) or any(a.batch is not batch for a in accumulators):
            raise ValueError("add_many takes the accumulators of one start_batch")
        batch.add(rows, slots)

    def aggregate(self, results: Iterable[StoredResult], params: JobParams, sink: TableSink) -> dict[str, Any]:
        """Write every analytics table; memory stays bounded by dates, not by jobs."""
        by_date: dict[str, DaySummary] = {}
        securities_per_date: dict[str, int] = {}
        groups = {d: _GroupSums() for d in GROUP_DIMENSIONS}
        hourly = _GroupSums()
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
                        cells = _group_columns(part.data["groups"][dim])
                        groups[dim].extend(cells)
                        if dim == "hour":
                            hourly.extend(cells, [(date, hour) for hour in cells["keys"]])
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

        self._write_small_tables(sink, params, by_date, securities_per_date,
                                 {d: sums.totals() for d, sums in groups.items()}, hourly.totals(), total)
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
