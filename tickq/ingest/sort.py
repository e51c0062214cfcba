"""The external sort behind `tickq ingest`: a month of any size, in bounded memory, sorted by
(security, ts).

Pass 1 counts rows per security; securities are cut, in sort order, into buckets that fit in
memory; pass 2 spills each normalised row to its bucket's temporary Arrow IPC file; then each
bucket in turn is sorted (one too large for memory is sorted in runs that are merged) and
handed on in order. Rows with equal (security, ts) keep their input order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from shared.errors import PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    InputFile,
    normalise_price,
    normalise_side,
    normalise_size,
    normalise_text,
    normalise_trade_date,
    normalise_ts,
    read_batches,
)
from shared.readahead import read_ahead
from shared.storage import Storage
from tickq.ingest.output import OUTPUT_SCHEMA

DEFAULT_MEMORY_BUDGET = 256 << 20
READ_BATCH_ROWS = 65_536
MAX_OPEN_SPILLS = 256  # spill files kept open at once (least recently used are closed)
# A bucket is sorted in memory when its rows take at most budget / SORT_FACTOR bytes. Up to
# three buckets are held at once (one being written, one sorted and waiting, one being sorted:
# see `sorted_buckets`), and the one being sorted needs its sort indices and one sorted column
# at a time besides (see `_sort_releasing`), with room for allocator slack and an estimate of
# the row size that is off.
SORT_FACTOR = 4
RANK = "_rank"
_INT64_MAX = np.iinfo(np.int64).max
_SPILL_SCHEMA = OUTPUT_SCHEMA.append(pa.field(RANK, pa.int32(), nullable=False))
_SORT_KEYS = [(RANK, "ascending"), ("ts", "ascending")]


def _normalised(batch: pa.RecordBatch) -> tuple[pa.Table, bool]:
    """`batch` in `OUTPUT_SCHEMA` (without the rank) and whether it carried a trade_date."""
    n = batch.num_rows
    names = batch.schema.names

    def text(name: str) -> pa.Array:
        if name not in names:
            return pa.nulls(n, pa.string())
        return normalise_text(batch.column(name))

    # A CSV reader hands a column the file lacks on as all null: that is no trade_date.
    has_date = "trade_date" in names and batch.column("trade_date").null_count < n
    arrays = [
        normalise_ts(batch.column("ts")),
        normalise_text(batch.column("security")),
        normalise_price(batch.column("price")),
        normalise_size(batch.column("size")),
        normalise_side(batch.column("side")) if "side" in names else pa.nulls(n, pa.string()),
        text("participant"),
        text("venue"),
        normalise_trade_date(batch.column("trade_date")) if has_date else pa.nulls(n, pa.date32()),
    ]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA), has_date


@dataclass
class Plan:
    """Securities in sort order, their rows, and the bucket of each (null security last)."""

    securities: pa.Array  # sorted distinct non-null securities
    bucket_of_rank: np.ndarray  # bucket per rank; rank len(securities) is the null security
    bucket_rows: list[int]
    rows: int
    row_bytes: float  # estimated in-memory bytes per row

    @property
    def buckets(self) -> int:
        return len(self.bucket_rows)


def count_securities(storage: Storage, files: list[InputFile]) -> tuple[dict[str, int], int]:
    """Pass 1: rows per security (and rows of null security), reading only that column."""
    counts: dict[str, int] = {}
    nulls = 0
    for file in files:
        for batch in read_ahead(read_batches(storage, file, ("security",), batch_rows=READ_BATCH_ROWS * 4)):
            security = normalise_text(batch.column("security"))
            nulls += security.null_count
            for item in pc.value_counts(security.drop_null()).to_pylist():
                counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts, nulls


def plan_buckets(counts: dict[str, int], nulls: int, budget: int, row_group_rows: int) -> Plan:
    """Cut the securities, in sort order, into buckets whose rows sort within `budget` bytes
    (at least a row group's worth each; the null security last)."""
    names = sorted(counts)  # code point order = UTF-8 byte order = Arrow's string order
    rows = sum(counts.values()) + nulls
    mean_len = sum(len(s.encode()) * c for s, c in counts.items()) / max(1, rows - nulls)
    # ts, price, size, trade_date, rank, four string offsets, short side/participant/venue.
    row_bytes = 8 + 8 + 8 + 4 + 4 + 4 * 4 + mean_len + 8 + 1
    capacity = max(row_group_rows, int(budget / SORT_FACTOR / row_bytes))
    bucket_of_rank = np.zeros(len(names) + 1, dtype=np.int32)
    bucket_rows: list[int] = []
    current = 0
    for rank, name in enumerate(names):
        count = counts[name]
        if not bucket_rows or (current and current + count > capacity):
            bucket_rows.append(0)
            current = 0
        bucket_of_rank[rank] = len(bucket_rows) - 1
        bucket_rows[-1] += count
        current += count
    if nulls or not bucket_rows:
        bucket_rows.append(nulls)
    bucket_of_rank[len(names)] = len(bucket_rows) - 1
    return Plan(pa.array(names, pa.string()), bucket_of_rank, bucket_rows, rows, row_bytes)


def _ipc_options() -> ipc.IpcWriteOptions:
    codec = "lz4" if pa.Codec.is_available("lz4") else None
    return ipc.IpcWriteOptions(compression=codec)


@dataclass
class Spill:
    """Per-bucket temporary Arrow IPC files; at most MAX_OPEN_SPILLS writers open at once."""

    directory: Path
    segments: dict[int, list[Path]] = field(default_factory=dict)
    writers: OrderedDict[int, tuple[Any, ipc.RecordBatchStreamWriter]] = field(
        default_factory=OrderedDict
    )
    bytes: int = 0

    def write(self, bucket: int, table: pa.Table) -> None:
        if bucket in self.writers:
            self.writers.move_to_end(bucket)
        else:
            if len(self.writers) >= MAX_OPEN_SPILLS:
                self._close(next(iter(self.writers)))
            paths = self.segments.setdefault(bucket, [])
            path = self.directory / f"bucket-{bucket:06d}-{len(paths):04d}.arrow"
            paths.append(path)
            sink = pa.OSFile(str(path), "wb")
            self.writers[bucket] = (
                sink,
                ipc.new_stream(sink, _SPILL_SCHEMA, options=_ipc_options()),
            )
        self.writers[bucket][1].write_table(table)

    def write_all(self, parts: dict[int, list[pa.Table]]) -> None:
        """Append each bucket's tables to its spill (one IPC batch per table: no copy)."""
        for bucket, tables in sorted(parts.items()):
            self.write(bucket, pa.concat_tables(tables))
        pa.default_memory_pool().release_unused()

    def _close(self, bucket: int) -> None:
        sink, writer = self.writers.pop(bucket)
        writer.close()
        sink.close()

    def close(self) -> None:
        for bucket in list(self.writers):
            self._close(bucket)
        self.bytes = sum(p.stat().st_size for paths in self.segments.values() for p in paths)

    def batches(self, bucket: int) -> Iterator[pa.RecordBatch]:
        for path in self.segments.get(bucket, []):
            with pa.OSFile(str(path), "rb") as source:
                yield from ipc.open_stream(source)

    def drop(self, bucket: int) -> None:
        for path in self.segments.pop(bucket, []):
            path.unlink(missing_ok=True)


def spill_month(
    storage: Storage, files: list[InputFile], plan: Plan, spill: Spill, budget: int
) -> tuple[bool, int, int]:
    """Pass 2: normalise and spill every row to its bucket; (has trade_date, rows, bytes)."""
    pending: dict[int, list[pa.Table]] = {}
    pending_bytes = 0
    flush_bytes = max(1 << 20, budget // 8)  # two such at once: one being written, one filling
    has_date = False
    rows = table_bytes = 0
    # Decoding runs a batch or two ahead on a thread of its own, and spill files are written
    # (and compressed) on another, while the rows are normalised here: both release the
    # interpreter lock.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tickq-spill") as writer:
        writing: Future[None] | None = None
        for file in files:
            for batch in read_ahead(read_batches(storage, file, ALL_COLUMNS, batch_rows=READ_BATCH_ROWS)):
                table, dated = _ranked(batch, plan, storage.describe(file.key))
                has_date = has_date or dated
                rows += table.num_rows
                table_bytes += table.nbytes
                for bucket, part in _by_bucket(table, plan):
                    pending.setdefault(bucket, []).append(part)
                pending_bytes += table.nbytes
                if pending_bytes >= flush_bytes:
                    if writing is not None:
                        writing.result()
                    writing = writer.submit(spill.write_all, pending)
                    pending, pending_bytes = {}, 0
        if writing is not None:
            writing.result()
    spill.write_all(pending)
    spill.close()
    return has_date, rows, table_bytes


def _ranked(batch: pa.RecordBatch, plan: Plan, source: str) -> tuple[pa.Table, bool]:
    """`batch` normalised, with each row's security rank (the null security ranks last), and
    whether it carried a trade_date."""
    try:
        table, dated = _normalised(batch)
    except PermanentError as exc:  # e.g. a ts column of an unusable type
        raise PermanentError(f"{source}: {exc}") from None
    security = table.column("security")
    rank = pc.index_in(security, value_set=plan.securities)
    if rank.null_count != security.null_count:
        raise PermanentError(f"{source} changed while being ingested (new securities)")
    ranks = pc.fill_null(rank, len(plan.securities)).to_numpy().astype(np.int32)
    return table.append_column(pa.field(RANK, pa.int32(), nullable=False), pa.array(ranks)), dated


def _by_bucket(table: pa.Table, plan: Plan) -> Iterator[tuple[int, pa.Table]]:
    """`table`'s rows cut by bucket, each bucket's in their order in `table`."""
    buckets = plan.bucket_of_rank[table.column(RANK).to_numpy()]
    if buckets.size and buckets.min() == buckets.max():
        yield int(buckets[0]), table
        return
    table = table.take(pa.array(_stable_order(buckets)))
    counts = np.bincount(buckets, minlength=plan.buckets)
    start = 0
    for bucket in np.flatnonzero(counts):
        yield int(bucket), table.slice(start, int(counts[bucket]))
        start += int(counts[bucket])


def _sort_order(table: pa.Table) -> pa.Array | np.ndarray:
    """Row order of `table` by (rank, ts), ts nulls last within a rank, ties in input order.

    Market data mostly arrives in time order, so a stable sort by rank alone (a radix sort of
    small integers, much cheaper than a two-key comparison sort) usually leaves each
    security's rows in ts order already; that is checked, and the two-key sort is the fallback.
    Both are stable, so the order is the same either way.
    """
    rank, ts = _keys(table)
    order = _stable_order(rank)
    in_rank = rank[order]
    in_ts = ts[order]
    if np.all((in_ts[1:] >= in_ts[:-1]) | (in_rank[1:] != in_rank[:-1])):
        return order
    return pc.sort_indices(table, sort_keys=_SORT_KEYS)


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """The stable sort order of non-negative integer `keys`: as 16-bit integers when they fit,
    which NumPy sorts by radix, several times faster than its merge sort of wider ones."""
    if keys.size and int(keys.max()) <= np.iinfo(np.uint16).max:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _sort(table: pa.Table) -> pa.Table:
    return table.take(_sort_order(table))


def _sort_releasing(holder: list[pa.Table]) -> pa.Table:
    """The table in `holder` (which is emptied) sorted, column by column: each unsorted column
    is released once taken, so the peak is one table plus one column, not two tables."""
    table = holder.pop()
    order = _sort_order(table)
    schema = table.schema
    columns: list[pa.ChunkedArray | None] = list(table.columns)
    del table
    out = []
    for i, column in enumerate(columns):
        assert column is not None
        columns[i] = None
        out.append(column.take(order))
        del column
    return pa.Table.from_arrays(out, schema=schema)


def sorted_buckets(spill: Spill, plan: Plan, sort_rows: int, directory: Path) -> Iterator[pa.Table]:
    """Every row of the month in (rank, ts) order: each bucket sorted in memory, or, when it
    holds more than `sort_rows` rows, merged from sorted runs."""
    pool = pa.default_memory_pool()
    for bucket in range(plan.buckets):
        if plan.bucket_rows[bucket] <= sort_rows:
            holder = [pa.Table.from_batches(list(spill.batches(bucket)), schema=_SPILL_SCHEMA)]
            spill.drop(bucket)
            yield _sort_releasing(holder)
            pool.release_unused()
        else:
            yield from _merge_sorted(spill, bucket, sort_rows, directory)


def _keys(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    rank = table.column(RANK).to_numpy()
    ts = pc.fill_null(table.column("ts").cast(pa.int64()), _INT64_MAX).to_numpy()
    return rank, ts


def _cut(rank: np.ndarray, ts: np.ndarray, bound: tuple[int, int]) -> int:
    """How many leading rows of a (rank, ts)-sorted buffer are < `bound`."""
    lo = int(np.searchsorted(rank, bound[0], side="left"))
    hi = int(np.searchsorted(rank, bound[0], side="right"))
    return lo + int(np.searchsorted(ts[lo:hi], bound[1], side="left"))


@dataclass
class _Run:
    """A sorted run being merged: its reader and the buffered head."""

    batches: Iterator[pa.RecordBatch]
    table: pa.Table
    rank: np.ndarray
    ts: np.ndarray
    done: bool = False  # every row of the run is in `table` or gone

    @property
    def last_key(self) -> tuple[int, int]:
        return int(self.rank[-1]), int(self.ts[-1])

    def refill(self, rows: int) -> bool:
        """Buffer at least `rows` rows (or what is left); False when the run is exhausted."""
        parts = [self.table] if self.table.num_rows else []
        have = self.table.num_rows
        for batch in self.batches:
            parts.append(pa.Table.from_batches([batch]))
            have += batch.num_rows
            if have >= rows:
                break
        else:
            self.done = True
        if not have:
            return False
        self.table = pa.concat_tables(parts).combine_chunks()
        self.rank, self.ts = _keys(self.table)
        return True

    def take_below(self, bound: tuple[int, int] | None) -> pa.Table:
        """The buffered rows with keys below `bound` (all of them with None), removed."""
        cut = self.table.num_rows if bound is None else _cut(self.rank, self.ts, bound)
        head = self.table.slice(0, cut)
        self.table = self.table.slice(cut)
        self.rank, self.ts = self.rank[cut:], self.ts[cut:]
        return head


def _merge_sorted(spill: Spill, bucket: int, run_rows: int, directory: Path) -> Iterator[pa.Table]:
    """A bucket too large to sort at once: sorted runs of `run_rows`, then a k-way merge."""
    runs: list[Path] = []
    parts: list[pa.RecordBatch] = []
    have = 0

    def write_run(batches: list[pa.RecordBatch]) -> None:
        path = directory / f"run-{bucket:06d}-{len(runs):04d}.arrow"
        holder = [pa.Table.from_batches(batches, schema=_SPILL_SCHEMA)]
        batches.clear()
        ordered = _sort_releasing(holder)
        with (
            pa.OSFile(str(path), "wb") as sink,
            ipc.new_stream(sink, _SPILL_SCHEMA, options=_ipc_options()) as writer,
        ):
            writer.write_table(ordered, max_chunksize=8192)
        runs.append(path)

    for batch in spill.batches(bucket):
        parts.append(batch)
        have += batch.num_rows
        if have >= run_rows:
            write_run(parts)
            have = 0
    if parts:
        write_run(parts)
    spill.drop(bucket)

    def read(path: Path) -> Iterator[pa.RecordBatch]:
        with pa.OSFile(str(path), "rb") as source:
            yield from ipc.open_stream(source)

    # The heads of all runs together hold a third of a run; a merged piece is at most that.
    head_rows = max(8192, run_rows // (3 * max(1, len(runs))))
    empty = _SPILL_SCHEMA.empty_table()
    active = []
    for path in runs:
        run = _Run(read(path), empty, np.empty(0, np.int32), np.empty(0, np.int64))
        if run.refill(head_rows):
            active.append(run)
    # Each round gives the rows below the smallest key that a run still being read has
    # buffered last: rows of that key may follow in that run, and rows of equal keys must come
    # out in input order (run order), so none of that key goes before they are all buffered.
    while active:
        reading = [r for r in active if not r.done]
        bound = min(r.last_key for r in reading) if reading else None
        pieces = [piece for piece in (r.take_below(bound) for r in active) if piece.num_rows]
        if pieces:
            yield _sort(pa.concat_tables(pieces))
        for run in reading:
            if run.table.num_rows and run.last_key == bound:
                run.refill(run.table.num_rows + head_rows)  # the bound's key, and beyond it
        active = [r for r in active if r.table.num_rows or r.refill(head_rows)]
    for path in runs:
        path.unlink(missing_ok=True)
