"""The default processor: order-flow analytics per security-day and the run's tables.

Per job it keeps mergeable partials: one summary of the day (counts, sums, min/max,
first/last) and (records, volume, notional) per participant, venue, market hour and notional
size bucket. The aggregator merges them into the contract's tables.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.inputs import label_codes
from shared.messages import JobParams
from shared.processors.base import JobContext, StoredResult
from shared.tables import TableSink

GROUP_DIMENSIONS = ("participant", "venue", "hour", "size_bucket")
HOURS = list(range(24))
# Up to this many (job, group) cells a dimension sums rows straight into a table of every cell
# (24 bytes each); above it, into the cells present, found by sorting (a participant column
# with very many distinct values, or a pass computing thousands of jobs).
DENSE_CELLS = 1 << 20
# Cells a batch buffers per dimension before merging them into one cell per (job, value).
COMPACT_CELLS = 1 << 18
TS_UTC = pa.timestamp("ns", tz="UTC")

# A job's partial result as columns (one row per job in a batch's result object): the day's
# summary, then per dimension its cells as lists (keys, records, volume, notional).
DAY_FIELDS = [
    ("records", pa.int64()),
    ("volume", pa.int64()),
    ("notional", pa.float64()),
    ("low", pa.float64()),
    ("high", pa.float64()),
    ("buy_volume", pa.int64()),
    ("sell_volume", pa.int64()),
    ("first_ts", pa.int64()),
    ("last_ts", pa.int64()),
]
_UNSET_WHEN_EMPTY = frozenset({"low", "high", "first_ts", "last_ts"})
GROUP_KEY_TYPES = {"participant": pa.string(), "venue": pa.string(), "hour": pa.int64(), "size_bucket": pa.int64()}
RESULT_SCHEMA = pa.schema([
    *DAY_FIELDS,
    *((f"{dim}_{name}", pa.list_(kind)) for dim in GROUP_DIMENSIONS for name, kind in (
        ("keys", GROUP_KEY_TYPES[dim]), ("records", pa.int64()), ("volume", pa.int64()),
        ("notional", pa.float64()))),
])


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
        # Each dimension sums into a table of every (value, job) cell while it is small enough.
        self._tables: dict[str, _CellTable | None] = {d: _CellTable(count) for d in GROUP_DIMENSIONS}
        self._groups: dict[str, _SlotGroups] | None = None
        self.accumulators: list[AnalyticsJob] = []  # the jobs' views, when made by `start_batch`

    def add(self, rows: pa.Table, slots: np.ndarray) -> None:
        """Take accepted rows; `slots[i]` is the slot of row i's job."""
        if rows.num_rows == 0:
            return
        if self._groups is not None:
            raise RuntimeError("rows added after results were taken")
        jobs = _RowJobs.of(slots, self.count)
        price = rows.column("price").to_numpy()
        size = rows.column("size").to_numpy()
        notional = price * size
        self._add_day(rows, jobs, price, size, notional)
        self._add_groups("participant", jobs, *_codes(rows.column("participant")), size, notional)
        self._add_groups("venue", jobs, *_codes(rows.column("venue")), size, notional)
        self._add_groups("hour", jobs, rows.column("hour").to_numpy(), HOURS, size, notional)
        buckets = list(range(len(self._edges) + 1))
        self._add_groups("size_bucket", jobs, _bucket_of(notional, self._edges), buckets, size, notional)

    def _add_day(self, rows: pa.Table, jobs: _RowJobs, price: np.ndarray, size: np.ndarray,
                 notional: np.ndarray) -> None:
        at, index, n = jobs.present, jobs.index, len(jobs.present)
        self.records[at] += jobs.rows
        # Volume by (job, side): buy, sell, and neither (another or no side).
        sides = np.zeros(3 * n, dtype=np.int64)
        np.add.at(sides, index * 3 + _side_codes(rows.column("side")), size)
        by_side = sides.reshape(n, 3)
        self.volume[at] += by_side.sum(axis=1)
        self.buy_volume[at] += by_side[:, 0]
        self.sell_volume[at] += by_side[:, 1]
        # Notional is added row by row, in input order: a floating-point sum that does not
        # depend on which other jobs shared the batch or how the rows were split into
        # batches, so a job run again gives the same result to the last bit.
        _scatter(np.add, self.notional, _Cells(at, index), notional)
        ts = rows.column("ts").cast(pa.int64()).to_numpy()
        # Rows of one job usually come in runs (input sorted by security and time): the
        # extremes of each run first, then of the runs per job.
        runs = jobs.runs()
        for ufunc, target, values in ((np.minimum, self.low, price), (np.maximum, self.high, price),
                                      (np.minimum, self.first, ts), (np.maximum, self.last, ts)):
            if runs is None:
                _scatter(ufunc, target, _Cells(at, index), values)
            else:
                _scatter(ufunc, target, _Cells(at, index[runs]), ufunc.reduceat(values, runs))

    def _add_groups(self, dim: str, jobs: _RowJobs, codes: np.ndarray, values: list[Any], size: np.ndarray,
                    notional: np.ndarray) -> None:
        """Sums per (slot, group) cell of one dimension; `codes` index `values` (this batch's)."""
        known = self._codes[dim]
        seen = self._values[dim]
        width = len(values)
        to_code = np.fromiter((known.setdefault(v, len(known)) for v in values), dtype=np.int64, count=width)
        before = len(seen)
        seen.extend(values[i] for i in range(width) if to_code[i] >= before)
        table = self._tables[dim]
        if table is not None and self.count * len(seen) <= DENSE_CELLS:
            table.add(to_code[codes], jobs, size, notional, len(seen))
            return
        parts = self._cells[dim]
        if table is not None:  # too many cells for a table now: its sums become cells
            parts.append(table.cells())
            self._tables[dim] = None
        present, index = np.unique(jobs.slot * width + codes, return_inverse=True)
        records = np.bincount(index, minlength=len(present))
        volume = np.zeros(len(present), dtype=np.int64)
        np.add.at(volume, index, size)
        amount = np.bincount(index, weights=notional, minlength=len(present))
        parts.append((present // width, to_code[present % width], records, volume, amount))
        if sum(len(part[0]) for part in parts) > COMPACT_CELLS:
            # Unsorted input spreads every job over every batch of rows: keep one cell per
            # (job, group value), not one per batch of rows, so memory stays bounded.
            self._cells[dim] = [_merged_cells(parts, len(seen))]

    def _slot_groups(self) -> dict[str, _SlotGroups]:
        if self._groups is None:
            for dim, table in self._tables.items():
                if table is not None:
                    self._cells[dim].append(table.cells())
            self._tables = {d: None for d in GROUP_DIMENSIONS}
            self._groups = {d: _SlotGroups.of(self._cells[d], self._values[d], self.count) for d in GROUP_DIMENSIONS}
            self._cells = {d: [] for d in GROUP_DIMENSIONS}
        return self._groups

    def result(self, slot: int) -> dict[str, Any]:
        """One job's partial result (JSON-ready)."""
        groups = self._slot_groups()
        records = int(self.records[slot])
        day = None
        if records:
            day = DaySummary(records, int(self.volume[slot]), float(self.notional[slot]), float(self.low[slot]),
                             float(self.high[slot]), int(self.buy_volume[slot]), int(self.sell_volume[slot]),
                             int(self.first[slot]), int(self.last[slot])).to_json()
        return {"day": day, "groups": {d: g.of_slot(slot) for d, g in groups.items()}}

    def result_table(self) -> pa.Table:
        """Every job's partial result as one row of `RESULT_SCHEMA`, in slot order."""
        empty = self.records == 0  # a job without rows has no low, high, first or last
        day = {"records": self.records, "volume": self.volume, "notional": self.notional, "low": self.low,
               "high": self.high, "buy_volume": self.buy_volume, "sell_volume": self.sell_volume,
               "first_ts": self.first, "last_ts": self.last}
        columns = {name: pa.array(day[name], kind, mask=empty if name in _UNSET_WHEN_EMPTY else None)
                   for name, kind in DAY_FIELDS}
        for dim, groups in self._slot_groups().items():
            columns.update(groups.columns(dim))
        return pa.table(columns, schema=RESULT_SCHEMA)


@dataclass(frozen=True)
class _RowJobs:
    """The jobs of a batch of rows: each row's `slot`; the slots `present` (ascending), each
    row's position among them (`index`) and each one's number of `rows`."""

    slot: np.ndarray
    present: np.ndarray
    index: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, slot: np.ndarray, count: int) -> _RowJobs:
        """The jobs of rows whose slots (all below `count`) are `slot`."""
        per_slot = np.bincount(slot, minlength=count)
        present = np.flatnonzero(per_slot)
        position = np.zeros(count, dtype=np.int64)
        position[present] = np.arange(len(present))
        return cls(slot, present, position[slot], per_slot[present])

    def runs(self) -> np.ndarray | None:
        """Where each run of rows of one job starts, if rows come in long runs; else None."""
        changes = np.count_nonzero(self.slot[1:] != self.slot[:-1])
        if changes >= len(self.slot) // 4:
            return None
        return np.concatenate(([0], np.flatnonzero(np.diff(self.slot)) + 1))


@dataclass(frozen=True)
class _Cells:
    """Where row i adds: ``target[cells[index[i]]]``, or ``target[index[i]]`` without `cells`."""

    cells: np.ndarray | None
    index: np.ndarray


def _scatter(ufunc: np.ufunc, target: np.ndarray, at: _Cells, values: np.ndarray | int) -> None:
    """``ufunc.at`` of every row's value into its place in `target`, row by row in order (a
    floating-point sum is the same whichever way the places are given)."""
    if at.cells is None:
        ufunc.at(target, at.index, values)
        return
    # Through a copy of the few places rows touch: random access to it stays in cache.
    local = target[at.cells]
    ufunc.at(local, at.index, values)
    target[at.cells] = local


def _side_codes(side: pa.ChunkedArray) -> np.ndarray:
    """Each row's side as 0 (buy), 1 (sell) or 2 (another, or none)."""
    codes, values = label_codes(side)
    per_value = np.array([{"B": 0, "S": 1}.get(v, 2) for v in values.to_pylist()] + [2], dtype=np.int64)
    side_code: np.ndarray = per_value[codes]
    return side_code


class _CellTable:
    """One dimension's sums for every (group code, slot) cell, at code * count + slot: rows add
    into it one by one in input order (through a copy of a batch's cells when they are few), and
    it grows by whole codes as values appear."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.records = np.zeros(0, dtype=np.int64)
        self.volume = np.zeros(0, dtype=np.int64)
        self.notional = np.zeros(0, dtype=np.float64)

    def add(self, codes: np.ndarray, jobs: _RowJobs, size: np.ndarray, notional: np.ndarray, width: int) -> None:
        """Add rows (their group `codes`, all below `width`, and jobs)."""
        more = width * self.count - len(self.records)
        if more > 0:
            self.records = np.concatenate((self.records, np.zeros(more, dtype=np.int64)))
            self.volume = np.concatenate((self.volume, np.zeros(more, dtype=np.int64)))
            self.notional = np.concatenate((self.notional, np.zeros(more)))
        n = len(jobs.present)
        if width * n <= len(codes):
            # The batch's (code, job) cells, code by code: rows add into these few, which
            # stay in the processor's cache, and they into the table once.
            cells = _Cells((np.arange(width)[:, None] * self.count + jobs.present).reshape(-1), codes * n + jobs.index)
        else:
            cells = _Cells(None, codes * self.count + jobs.slot)
        _scatter(np.add, self.records, cells, 1)
        _scatter(np.add, self.volume, cells, size)
        _scatter(np.add, self.notional, cells, notional)

    def cells(self) -> tuple[np.ndarray, ...]:
        """The cells holding rows, as (slot, code, records, volume, notional)."""
        present = np.flatnonzero(self.records)
        return (present % self.count, present // self.count, self.records[present], self.volume[present],
                self.notional[present])


@dataclass
class _SlotGroups:
    """One dimension's merged cells, ordered by slot and then by group value (null last)."""

    bounds: np.ndarray  # slot s holds cells bounds[s] to bounds[s + 1]
    values: list[Any]  # the dimension's values, sorted
    codes: np.ndarray  # each cell's position in `values`
    records: np.ndarray
    volume: np.ndarray
    notional: np.ndarray

    @classmethod
    def of(cls, parts: list[tuple[np.ndarray, ...]], values: list[Any], count: int) -> _SlotGroups:
        if not parts:
            none = np.zeros(0, dtype=np.int64)
            return cls(np.zeros(count + 1, dtype=np.int64), [], none, none, none, np.zeros(0))
        # Codes renumbered in the order of their values, so cells sort by slot, then value.
        by_rank = sorted(range(len(values)), key=lambda i: _sort_key(values[i]))
        rank = np.empty(len(values), dtype=np.int64)
        rank[by_rank] = np.arange(len(values))
        slot, code, records, volume, amount = _merged_cells([(p[0], rank[p[1]], *p[2:]) for p in parts], len(values))
        return cls(np.searchsorted(slot, np.arange(count + 1)), [values[i] for i in by_rank], code, records, volume,
                   amount)

    def of_slot(self, slot: int) -> dict[str, list[Any]]:
        begin, end = int(self.bounds[slot]), int(self.bounds[slot + 1])
        return {"keys": [self.values[c] for c in self.codes[begin:end].tolist()],
                "records": self.records[begin:end].tolist(), "volume": self.volume[begin:end].tolist(),
                "notional": self.notional[begin:end].tolist()}

    def columns(self, dim: str) -> dict[str, pa.Array]:
        """Every slot's cells as list columns (one list per slot)."""
        offsets = pa.array(self.bounds, pa.int32())
        keys = pa.array(self.values, GROUP_KEY_TYPES[dim]).take(pa.array(self.codes, pa.int64()))
        return {f"{dim}_{name}": pa.ListArray.from_arrays(offsets, values) for name, values in (
            ("keys", keys), ("records", pa.array(self.records, pa.int64())),
            ("volume", pa.array(self.volume, pa.int64())), ("notional", pa.array(self.notional, pa.float64())))}


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
    """(records, volume, notional) summed per group key.

    Cells are added with `numpy.add.at`, which adds in cell order, one cell at a time: every
    sum (floating point included) is the one that adding the cells in turn gives, so tables
    do not depend on how results were cut into chunks.
    """

    def __init__(self) -> None:
        self._codes: dict[Any, int] = {}  # key -> its row in the sums, in order of first sight
        self._sums: tuple[np.ndarray, ...] = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def add(self, codes: np.ndarray, keys: list[Any], records: np.ndarray, volume: np.ndarray,
            notional: np.ndarray) -> None:
        """Add cells in order; cell i's key is ``keys[codes[i]]``."""
        known = self._codes
        rows = np.fromiter((known.setdefault(k, len(known)) for k in keys), np.int64, len(keys))
        grown = len(known) - len(self._sums[0])
        if grown:  # keys seen for the first time start at zero
            self._sums = tuple(np.concatenate((total, np.zeros(grown, total.dtype))) for total in self._sums)
        index = rows[codes]
        for total, column in zip(self._sums, (records, volume, notional), strict=True):
            np.add.at(total, index, column)

    def totals(self) -> dict[Any, Totals]:
        """The sums per key."""
        records: list[int] = self._sums[0].tolist()
        volume: list[int] = self._sums[1].tolist()
        notional: list[float] = self._sums[2].tolist()
        return {key: Totals(records[i], volume[i], notional[i]) for key, i in self._codes.items()}


_NO_TS_LOW, _NO_TS_HIGH = np.iinfo(np.int64).max, np.iinfo(np.int64).min


@dataclass
class _Days:
    """Day summaries as arrays (one element per day, security or date), merged with ``ufunc.at``
    in element order: the sums are those of merging `DaySummary`s one at a time."""

    records: np.ndarray
    volume: np.ndarray
    notional: np.ndarray
    low: np.ndarray
    high: np.ndarray
    buy_volume: np.ndarray
    sell_volume: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray

    @classmethod
    def empty(cls, n: int) -> _Days:
        """`n` summaries of nothing."""
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n), np.full(n, np.inf),
                   np.full(n, -np.inf), np.zeros(n, np.int64), np.zeros(n, np.int64), np.full(n, _NO_TS_LOW),
                   np.full(n, _NO_TS_HIGH))

    @classmethod
    def of(cls, jobs: pa.Table) -> _Days:
        """The day summaries of job result rows (`DAY_FIELDS`; unset values are null)."""
        def column(name: str, unset: Any) -> np.ndarray:
            values = jobs.column(name)
            return (values.fill_null(unset) if values.null_count else values).to_numpy()

        return cls(column("records", 0), column("volume", 0), column("notional", 0.0), column("low", np.inf),
                   column("high", -np.inf), column("buy_volume", 0), column("sell_volume", 0),
                   column("first_ts", _NO_TS_LOW), column("last_ts", _NO_TS_HIGH))

    def merge_into(self, target: _Days, index: np.ndarray) -> None:
        """Merge element i into ``target[index[i]]``, in element order."""
        for name in ("records", "volume", "notional", "buy_volume", "sell_volume"):
            np.add.at(getattr(target, name), index, getattr(self, name))
        np.minimum.at(target.low, index, self.low)
        np.maximum.at(target.high, index, self.high)
        np.minimum.at(target.first_ts, index, self.first_ts)
        np.maximum.at(target.last_ts, index, self.last_ts)

    def take(self, index: np.ndarray | slice) -> _Days:
        """The summaries at `index`."""
        return _Days(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list[_Days]) -> _Days:
        """The summaries of `parts`, one after another."""
        return cls(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(cls)))

    def summary(self, i: int) -> DaySummary:
        """Summary `i` as a `DaySummary`."""
        first, last = int(self.first_ts[i]), int(self.last_ts[i])
        return DaySummary(int(self.records[i]), int(self.volume[i]), float(self.notional[i]), float(self.low[i]),
                          float(self.high[i]), int(self.buy_volume[i]), int(self.sell_volume[i]),
                          None if first == _NO_TS_LOW else first, None if last == _NO_TS_HIGH else last)

    def columns(self) -> dict[str, pa.Array]:
        """The analytics columns (`ANALYTICS_FIELDS`), as `DaySummary.columns` gives them."""
        volume, records = self.volume.astype(np.float64), self.records.astype(np.float64)
        vwap = np.divide(self.notional, volume, out=np.zeros(len(volume)), where=self.volume != 0)
        avg_size = np.divide(volume, records, out=np.zeros(len(volume)), where=self.records != 0)
        return {
            "records": pa.array(self.records), "volume": pa.array(self.volume), "notional": pa.array(self.notional),
            "vwap": pa.array(vwap, mask=self.volume == 0), "avg_size": pa.array(avg_size, mask=self.records == 0),
            "low": pa.array(self.low), "high": pa.array(self.high), "buy_volume": pa.array(self.buy_volume),
            "sell_volume": pa.array(self.sell_volume),
            "first_ts": pa.array(self.first_ts, mask=self.first_ts == _NO_TS_LOW).view(TS_UTC),
            "last_ts": pa.array(self.last_ts, mask=self.last_ts == _NO_TS_HIGH).view(TS_UTC),
        }


def _segments(*keys: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """For rows sorted by `keys`: each row's segment (rows with equal keys, in a run) and the
    first row of each segment."""
    n = len(keys[0])
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= pc.not_equal(key.slice(1), key.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.cumsum(np.concatenate(([0], change))), np.flatnonzero(np.concatenate(([True], change)))


def _local_codes(values: pa.Array) -> tuple[np.ndarray, list[Any]]:
    """Each value's code and the value of each code (null is a value of its own)."""
    encoded = pc.dictionary_encode(values, null_encoding="encode")
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def _day_dates(text: pa.Array) -> pa.Array:
    return pc.cast(text, pa.date32())


class _RunFold:
    """The run's tables from chunks of job results in (security, date, month) order.

    A chunk never splits a (security, date): a day seen in two months' files is merged within
    one chunk. A security may continue into the next chunk: its summary is carried over.
    Memory holds the dates, the group keys and one security's summary, not the jobs.
    """

    def __init__(self) -> None:
        self.groups = {dim: _GroupSums() for dim in GROUP_DIMENSIONS}
        self.hourly = _GroupSums()
        self._date_rows: dict[str, int] = {}
        self._by_date = _Days.empty(0)
        self._securities_per_date = np.zeros(0, np.int64)
        self._total = _Days.empty(1)
        self._carried: tuple[str, _Days, int] | None = None  # security, its summary so far, its days

    def add(self, jobs: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Fold a chunk of job results; its ``security_daily`` rows and the ``by_security`` rows
        of the securities it finished."""
        jobs = jobs.combine_chunks()
        for dim in GROUP_DIMENSIONS:
            self._add_cells(dim, jobs)
        self._add_hourly(jobs)
        with_rows = jobs.filter(pc.greater(jobs.column("records"), 0))
        security, date = with_rows.column("security").combine_chunks(), with_rows.column("date").combine_chunks()
        day_of_row, first_rows = _segments(security, date)
        days = _Days.empty(len(first_rows))
        _Days.of(with_rows).merge_into(days, day_of_row)
        day_security, day_date = security.take(pa.array(first_rows)), date.take(pa.array(first_rows))
        self._add_dates(days, day_date)
        days.merge_into(self._total, np.zeros(len(first_rows), np.int64))
        daily = pa.table({"security": day_security, "trade_date": _day_dates(day_date), **days.columns()})
        return daily, self._add_securities(days, day_security)

    def _add_cells(self, dim: str, jobs: pa.Table) -> None:
        codes, keys = _local_codes(pc.list_flatten(jobs.column(f"{dim}_keys").combine_chunks()))
        self.groups[dim].add(codes, keys, *self._cell_values(dim, jobs))

    @staticmethod
    def _cell_values(dim: str, jobs: pa.Table) -> tuple[np.ndarray, ...]:
        return tuple(pc.list_flatten(jobs.column(f"{dim}_{name}").combine_chunks()).to_numpy()
                     for name in ("records", "volume", "notional"))

    def _add_hourly(self, jobs: pa.Table) -> None:
        """Hour cells keyed by (date, hour)."""
        hours = jobs.column("hour_keys").combine_chunks()
        date_codes, dates = _local_codes(jobs.column("date").combine_chunks())
        hour_codes, hour_values = _local_codes(pc.list_flatten(hours))
        row = pc.list_parent_indices(hours).to_numpy()
        pairs, codes = np.unique(date_codes[row] * len(hour_values) + hour_codes, return_inverse=True)
        keys = [(dates[p // len(hour_values)], hour_values[p % len(hour_values)]) for p in pairs.tolist()]
        self.hourly.add(codes.reshape(-1), keys, *self._cell_values("hour", jobs))

    def _add_dates(self, days: _Days, day_date: pa.Array) -> None:
        known = self._date_rows
        rows = np.fromiter((known.setdefault(d, len(known)) for d in day_date.to_pylist()), np.int64, len(day_date))
        grown = len(known) - len(self._securities_per_date)
        if grown:
            self._by_date = _Days.concat([self._by_date, _Days.empty(grown)])
            self._securities_per_date = np.concatenate((self._securities_per_date, np.zeros(grown, np.int64)))
        days.merge_into(self._by_date, rows)
        np.add.at(self._securities_per_date, rows, 1)

    def _add_securities(self, days: _Days, day_security: pa.Array) -> pa.Table:
        """Merge days into their securities' summaries; the rows of the securities finished."""
        if len(day_security) == 0:  # the carried security may still go on
            return _security_rows([])
        security_of_day, first_days = _segments(day_security)
        names: list[str] = day_security.take(pa.array(first_days)).to_pylist()
        summaries = _Days.empty(len(names))
        day_counts = np.zeros(len(names), np.int64)
        finished: list[tuple[str, _Days, int]] = []
        if self._carried is not None:
            name, carried, count = self._carried
            if names[0] == name:  # the carried security goes on: its sums start from what it had
                summaries = _Days.concat([carried, summaries.take(slice(1, None))])
                day_counts[0] = count
            else:
                finished.append(self._carried)
            self._carried = None
        days.merge_into(summaries, security_of_day)
        np.add.at(day_counts, security_of_day, 1)
        last = len(names) - 1  # the last security may go on in the next chunk
        self._carried = (names[last], summaries.take(slice(last, None)), int(day_counts[last]))
        finished += [(names[i], summaries.take(slice(i, i + 1)), int(day_counts[i])) for i in range(last)]
        return _security_rows(finished)

    def finish(self) -> pa.Table:
        """The ``by_security`` row of the last security."""
        finished, self._carried = [self._carried] if self._carried else [], None
        return _security_rows(finished)

    def by_date(self) -> tuple[dict[str, DaySummary], dict[str, int]]:
        """Each date's summary and how many securities traded on it."""
        return ({d: self._by_date.summary(i) for d, i in self._date_rows.items()},
                {d: int(self._securities_per_date[i]) for d, i in self._date_rows.items()})

    def total(self) -> Totals:
        """The run's totals."""
        total = self._total.summary(0)
        return Totals(total.records, total.volume, total.notional)


def _security_rows(finished: list[tuple[str, _Days, int]]) -> pa.Table:
    if not finished:
        return SCHEMAS["by_security"].empty_table()
    merged = _Days.concat([days for _, days, _ in finished])
    return pa.table({"security": pa.array([name for name, _, _ in finished], pa.string()), **merged.columns(),
                     "days": pa.array([count for _, _, count in finished], pa.int64())})


def results_table(datas: list[dict[str, Any]]) -> pa.Table:
    """Partial results in their JSON form (`AnalyticsJob.finish`, results of earlier versions)
    as rows of `RESULT_SCHEMA`."""
    columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    for data in datas:
        day = data.get("day") or {}
        for name, _ in DAY_FIELDS:
            columns[name].append(day.get(name, None if name in _UNSET_WHEN_EMPTY else 0))
        for dim in GROUP_DIMENSIONS:
            cells = _group_columns(data["groups"][dim])
            for name in ("keys", "records", "volume", "notional"):
                columns[f"{dim}_{name}"].append(cells[name])
    return pa.table(columns, schema=RESULT_SCHEMA)


def _day_date(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


# Job results folded at a time when they come one by one (`AnalyticsProcessor.aggregate`).
RESULT_CHUNK_JOBS = 4_096


def _chunks_of(results: Iterable[StoredResult]) -> Iterator[pa.Table]:
    """Results, in key order, as tables of at most about `RESULT_CHUNK_JOBS` jobs, each ending
    where a (security, date) does."""
    pending: list[StoredResult] = []

    def table() -> pa.Table:
        keys = {name: pa.array([getattr(r, name) for r in pending], pa.string())
                for name in ("month", "security", "date")}
        data = results_table([r.data for r in pending])
        return pa.table({**keys, **{name: data.column(name) for name in data.column_names}})

    for result in results:
        if len(pending) >= RESULT_CHUNK_JOBS and (result.security, result.date) != (pending[-1].security,
                                                                                   pending[-1].date):
            yield table()
            pending = []
        pending.append(result)
    if pending:
        yield table()


class AnalyticsProcessor:
    """Order-flow analytics: the contract's default processor."""

    name = "analytics"

    def start_job(self, context: JobContext) -> AnalyticsJob:
        """A fresh accumulator for one job."""
        return AnalyticsJob(BatchPartials(context.job.params, 1), 0)

    def start_batch(self, contexts: list[JobContext]) -> list[AnalyticsJob]:
        """Accumulators for the jobs of one batch, sharing one set of arrays."""
        batch = BatchPartials(contexts[0].job.params, len(contexts))
        batch.accumulators = [AnalyticsJob(batch, slot) for slot in range(len(contexts))]
        return batch.accumulators

    def add_many(self, accumulators: list[AnalyticsJob], rows: pa.Table, slots: np.ndarray) -> None:
        """Rows of many jobs at once; `accumulators` come from one `start_batch`, in its order."""
        self._batch_of(accumulators).add(rows, slots)

    @staticmethod
    def _batch_of(accumulators: list[AnalyticsJob]) -> BatchPartials:
        batch = accumulators[0].batch
        # The list `start_batch` returned needs no check (a pass adds thousands of batches of
        # rows to thousands of jobs); any other is checked job by job.
        if accumulators is not batch.accumulators and (
                batch.count != len(accumulators)
                or any(a.batch is not batch or a.slot != slot for slot, a in enumerate(accumulators))):
            raise ValueError("expected the accumulators of one start_batch, in its order")
        return batch

    def finish_batch(self, accumulators: list[AnalyticsJob]) -> pa.Table:
        """Every job's partial result as a row of `RESULT_SCHEMA`, in the accumulators' order."""
        return self._batch_of(accumulators).result_table()

    def results_table(self, datas: list[dict[str, Any]]) -> pa.Table:
        """Partial results in their JSON form (earlier versions stored them so) as rows of `RESULT_SCHEMA`."""
        return results_table(datas)

    def aggregate(self, results: Iterable[StoredResult], params: JobParams, sink: TableSink) -> dict[str, Any]:
        """`aggregate_tables` over results given one by one."""
        return self.aggregate_tables(_chunks_of(results), params, sink)

    def aggregate_tables(self, chunks: Iterable[pa.Table], params: JobParams, sink: TableSink) -> dict[str, Any]:
        """Write every analytics table from chunks of job results (month, security, date, then
        `RESULT_SCHEMA`) in (security, date, month) order; memory stays bounded by dates, not by jobs."""
        fold = _RunFold()
        with (
            sink.stream("security_daily", SCHEMAS["security_daily"]) as daily_out,
            sink.stream("by_security", SCHEMAS["by_security"]) as security_out,
        ):
            for chunk in chunks:
                daily, securities = fold.add(chunk)
                for out, rows in ((daily_out, daily), (security_out, securities)):
                    if rows.num_rows:
                        out.write(rows)
            security_out.write(fold.finish())
        by_date, securities_per_date = fold.by_date()
        total = fold.total()
        self._write_small_tables(sink, params, by_date, securities_per_date,
                                 {d: sums.totals() for d, sums in fold.groups.items()}, fold.hourly.totals(), total)
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
