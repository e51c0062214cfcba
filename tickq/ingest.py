"""`tickq ingest`: rewrite raw monthly files into the layout that makes per-job reads cheap.

For each month M, every input file of M (anything `shared.inputs.read_batches` reads: Parquet,
CSV, CSV.gz, DBN) is rewritten as Parquet under ``<output>/M/part-NNNNN.parquet``:

- rows sorted by (security, ts) across the whole month (null securities last, null ts last
  within a security), so a job's rows sit in a few consecutive row groups;
- ``security`` as a plain ``string`` column (an Arrow dictionary column would defeat row-group
  pruning by statistics), statistics on the columns rows are pruned by (security, ts,
  trade_date), row groups of `row_group_rows` rows, lz4, ts and size delta-encoded, the text
  columns and price dictionary-encoded;
- a sidecar ``<output>/M/_index.json`` (ignored by the input reader, like every ``_`` file)
  listing per file and per row group: rows, byte offset and size, security min/max and ts
  min/max, so that a reader can go straight to the row groups of a security;
- a key sidecar ``<output>/M/_keys.parquet`` (`shared.monthkeys`): rows per (security, UTC
  quarter hour of ts[, trade_date]), null keys included, and the parts it describes, so that
  job discovery reads it instead of the key columns of every row. It is counted from the
  sorted output as it is written, never from the whole month in memory;
- with ``--day-files ZONE``, one small Parquet file per (security, trade date in ZONE) under
  ``<output>/_days/M/`` (`shared.dayfiles`), cut from the sorted output as it is written, so
  that a job read on its own reads about its own rows.

Values. Ingest never drops a row and never changes what a run computes: every column goes
through the same element-wise normalisation a worker applies (`shared.inputs`), and that
normalisation is idempotent, so a run over ingested data yields exactly the tables, and the
same read / accepted / rejected counts, as a run over the raw data. Concretely the columns are
``ts`` (``timestamp[ns, tz=UTC]``; unparseable text becomes null), ``security`` (string,
as is: empty and null stay so), ``price`` (float64; text that is not a number becomes null),
``size`` (int64; values that are not integers become null), ``side`` (``B``/``S``/null: ``A``,
``BUY``, ``SELL`` in any case are mapped as the worker maps them), ``participant`` and
``venue`` (string, as is) and ``trade_date`` (date32, only when some input file of the month
has that column; unparseable dates become null, so the worker derives them from ts, as it
would have). Rows that the contract rejects stay in the data and are rejected by the worker.
Other columns are not kept.

Memory stays bounded whatever the month's size (an external sort):

1. pass 1 reads only the ``security`` column and counts rows per security;
2. securities are cut, in sort order, into contiguous ranges ("buckets") small enough to sort
   in memory within `memory_budget_bytes`;
3. pass 2 reads the month in bounded batches, normalises them and spills each row to its
   bucket's temporary Arrow IPC file (lz4) on local disk (decoding and spill writes run on
   threads of their own);
4. each bucket in turn is loaded and sorted, on a thread of its own, while the previous one
   is appended to the output; a bucket that would not fit (one security with more rows than
   a bucket holds) is sorted in runs that are merged. Rows with equal (security, ts) keep
   their input order either way.

The distinct securities of a month are held in memory (pass 1), and local temporary disk
must hold the month's spill and one output file. Writing a month replaces the ingest output
(``part-*.parquet``, ``_index.json``, ``_keys.parquet``, day files) of an earlier ingest of that month;
do not run jobs on a month while it is being ingested.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
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
import pyarrow.parquet as pq

from shared.dayfiles import DayFiles, DayFilesWriter, day_file_key, manifest_key, month_prefix
from shared.errors import ConfigError, PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    InputFile,
    month_files,
    normalise_price,
    normalise_side,
    normalise_size,
    normalise_text,
    normalise_trade_date,
    normalise_ts,
    read_batches,
)
from shared.messages import JobParams
from shared.monthkeys import KEYS_NAME, KeysWriter, part_record
from shared.readahead import read_ahead
from shared.storage import Storage, open_storage

__all__ = ["INDEX_NAME", "OUTPUT_SCHEMA", "add_arguments", "ingest", "main", "read_index"]

INDEX_NAME = "_index.json"
INDEX_VERSION = 1
DEFAULT_ROW_GROUP_ROWS = 128 * 1024
DEFAULT_MEMORY_BUDGET = 256 << 20
DEFAULT_MAX_FILE_ROWS = 64 << 20  # rows per output Parquet file (~1 GB), whole row groups
READ_BATCH_ROWS = 65_536
MAX_OPEN_SPILLS = 256  # spill files kept open at once (least recently used are closed)
# A bucket is sorted in memory when its rows take at most budget / SORT_FACTOR bytes. Up to
# three buckets are held at once (one being written, one sorted and waiting, one being sorted:
# see `_sorted_buckets`), and the one being sorted needs its sort indices and one sorted column
# at a time besides (see `_sort_releasing`), with room for allocator slack and an estimate of
# the row size that is off.
SORT_FACTOR = 4
# Decoding, not reading, is most of a worker's pass over its row groups. Measured on a 20 M-row
# month's row groups (`bench/run.py encodings`, bench/RESULTS.md, sixth session): zstd over
# plain values took 6.4 ms per 128 k-row group and 1,391 KB; delta-encoded ts and size,
# dictionary-encoded price and lz4 take 3.5 ms and 1,159 KB. (ts, sorted within a security,
# and size are small deltas; prices repeat on their tick grid: a dictionary that outgrows its
# page falls back to plain.)
COMPRESSION = "lz4"
DELTA_ENCODED = ("ts", "size")
DICTIONARY_ENCODED = ("security", "side", "participant", "venue", "price", "trade_date")
STATISTICS = ("security", "ts", "trade_date")
RANK = "_rank"
_PART_RE = re.compile(r"^part-\d{5}\.parquet$")
_INT64_MAX = np.iinfo(np.int64).max

OUTPUT_SCHEMA = pa.schema(
    [
        ("ts", pa.timestamp("ns", tz="UTC")),
        ("security", pa.string()),
        ("price", pa.float64()),
        ("size", pa.int64()),
        ("side", pa.string()),
        ("participant", pa.string()),
        ("venue", pa.string()),
        ("trade_date", pa.date32()),
    ]
)
_SPILL_SCHEMA = OUTPUT_SCHEMA.append(pa.field(RANK, pa.int32(), nullable=False))
_SORT_KEYS = [(RANK, "ascending"), ("ts", "ascending")]


# ---------------------------------------------------------------------------------------
# Normalisation (the worker's element-wise functions) and bucket planning.
# ---------------------------------------------------------------------------------------


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
class _Plan:
    """Securities in sort order, their rows, and the bucket of each (null security last)."""

    securities: pa.Array  # sorted distinct non-null securities
    bucket_of_rank: np.ndarray  # bucket per rank; rank len(securities) is the null security
    bucket_rows: list[int]
    rows: int
    row_bytes: float  # estimated in-memory bytes per row

    @property
    def buckets(self) -> int:
        return len(self.bucket_rows)


def _count_securities(storage: Storage, files: list[InputFile]) -> tuple[dict[str, int], int]:
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


def _plan(counts: dict[str, int], nulls: int, budget: int, row_group_rows: int) -> _Plan:
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
    return _Plan(pa.array(names, pa.string()), bucket_of_rank, bucket_rows, rows, row_bytes)


# ---------------------------------------------------------------------------------------
# Spilling (pass 2) and sorted output.
# ---------------------------------------------------------------------------------------


def _ipc_options() -> ipc.IpcWriteOptions:
    codec = "lz4" if pa.Codec.is_available("lz4") else None
    return ipc.IpcWriteOptions(compression=codec)


@dataclass
class _Spill:
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


def _spill_month(
    storage: Storage, files: list[InputFile], plan: _Plan, spill: _Spill, budget: int
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


def _ranked(batch: pa.RecordBatch, plan: _Plan, source: str) -> tuple[pa.Table, bool]:
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


def _by_bucket(table: pa.Table, plan: _Plan) -> Iterator[tuple[int, pa.Table]]:
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


def _sorted_buckets(spill: _Spill, plan: _Plan, sort_rows: int, directory: Path) -> Iterator[pa.Table]:
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


def _merge_sorted(spill: _Spill, bucket: int, run_rows: int, directory: Path) -> Iterator[pa.Table]:
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


@dataclass
class _OutputFile:
    key: str
    path: Path
    rows: int = 0


class _Output:
    """Writes sorted tables as full row groups into Parquet parts under the month's folder."""

    def __init__(
        self, month: str, directory: Path, schema: pa.Schema, row_group_rows: int,
        max_file_rows: int,
    ) -> None:  # fmt: skip
        self.month = month
        self.directory = directory
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.max_file_rows = max(row_group_rows, max_file_rows // row_group_rows * row_group_rows)
        self.files: list[_OutputFile] = []
        self._writer: pq.ParquetWriter | None = None
        self._carry: list[pa.Table] = []
        self._carry_rows = 0

    def _new_writer(self) -> pq.ParquetWriter:
        part = _OutputFile(
            f"{self.month}/part-{len(self.files):05d}.parquet",
            self.directory / f"part-{len(self.files):05d}.parquet",
        )
        self.files.append(part)
        names = self.schema.names
        return pq.ParquetWriter(
            str(part.path),
            self.schema,
            compression=COMPRESSION,
            # Statistics on the columns that row groups are pruned by only: on all the others
            # together they cost a quarter of the encoding time, and nothing reads them.
            write_statistics=[c for c in STATISTICS if c in names],
            # Parquet dictionary *encoding* keeps the Arrow type a plain string (and its
            # statistics); it only makes the sorted, repetitive columns smaller.
            use_dictionary=[c for c in DICTIONARY_ENCODED if c in names],
            column_encoding={c: "DELTA_BINARY_PACKED" for c in DELTA_ENCODED if c in names},
            sorting_columns=[
                pq.SortingColumn(names.index("security"), nulls_first=False),
                pq.SortingColumn(names.index("ts"), nulls_first=False),
            ],
        )

    def _write_group(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = self._new_writer()
        self._writer.write_table(table, row_group_size=self.row_group_rows)
        part = self.files[-1]
        part.rows += table.num_rows
        if part.rows >= self.max_file_rows:
            self._writer.close()
            self._writer = None

    def append(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._carry.append(table)
        self._carry_rows += table.num_rows
        if self._carry_rows < self.row_group_rows:
            return
        whole = pa.concat_tables(self._carry)
        full = self._carry_rows // self.row_group_rows * self.row_group_rows
        for start in range(0, full, self.row_group_rows):
            self._write_group(whole.slice(start, self.row_group_rows).combine_chunks())
        # Copy the remainder, so that the (large) tables it came from can be released.
        rest = whole.slice(full).take(pa.array(np.arange(self._carry_rows - full)))
        self._carry, self._carry_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[_OutputFile]:
        if self._carry_rows:
            self._write_group(pa.concat_tables(self._carry).combine_chunks())
        self._carry, self._carry_rows = [], 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.files:  # an empty month still gets one (empty) file
            self._new_writer().close()
        return self.files


# ---------------------------------------------------------------------------------------
# The index.
# ---------------------------------------------------------------------------------------


def _iso_ns(ns: int | None) -> str | None:
    if ns is None:
        return None
    text = np.datetime_as_string(np.datetime64(ns, "ns"), unit="ns")
    return f"{text}Z"


def _row_group_entry(meta: pq.FileMetaData, index: int) -> dict[str, Any]:
    group = meta.row_group(index)
    names = meta.schema.to_arrow_schema().names
    starts, ends = [], []
    for j in range(group.num_columns):
        column = group.column(j)
        start = column.data_page_offset
        if column.has_dictionary_page and column.dictionary_page_offset:
            start = min(start, column.dictionary_page_offset)
        starts.append(start)
        ends.append(start + column.total_compressed_size)
    sec = group.column(names.index("security")).statistics
    ts = group.column(names.index("ts")).statistics
    sec_bounds = (sec.min, sec.max) if sec is not None and sec.has_min_max else (None, None)
    ts_bounds = (ts.min_raw, ts.max_raw) if ts is not None and ts.has_min_max else (None, None)
    return {
        "index": index,
        "rows": group.num_rows,
        "offset": min(starts),
        "bytes": max(ends) - min(starts),
        "security_min": sec_bounds[0],
        "security_max": sec_bounds[1],
        "ts_min": _iso_ns(ts_bounds[0]),
        "ts_max": _iso_ns(ts_bounds[1]),
        "ts_min_ns": ts_bounds[0],
        "ts_max_ns": ts_bounds[1],
        "null_securities": sec.null_count if sec is not None else None,
    }


def _file_entry(part: _OutputFile, month: str) -> dict[str, Any]:
    meta = pq.ParquetFile(str(part.path)).metadata
    return {
        "key": part.key,
        "name": part.key[len(month) + 1 :],
        "rows": meta.num_rows,
        "bytes": part.path.stat().st_size,
        "row_groups": [_row_group_entry(meta, i) for i in range(meta.num_row_groups)],
    }


def read_index(storage: Storage, month: str) -> dict[str, Any] | None:
    """The ``_index.json`` of an ingested month, or None when there is none."""
    key = f"{month}/{INDEX_NAME}"
    if not storage.exists(key):
        return None
    result: dict[str, Any] = json.loads(storage.read_bytes(key))
    return result


# ---------------------------------------------------------------------------------------
# One month, then the command.
# ---------------------------------------------------------------------------------------


def _publish_day_files(target: Storage, month: str, days: DayFilesWriter | None) -> tuple[int, int]:
    """Store the day files `days` wrote (several requests in flight where the store waits on the
    network), then delete the month's day files this ingest did not write; how many were
    stored, and their bytes."""
    stored, keep = 0, set()
    if days is not None:
        written = days.close()
        local_path = days.path

        def store(key: tuple[str, str]) -> int:
            path = local_path(*key)
            size = path.stat().st_size
            target.write_file(day_file_key(month, *key), path, content_type="application/vnd.apache.parquet")
            path.unlink()
            return size

        with ThreadPoolExecutor(max_workers=max(1, target.parallel_requests)) as pool:
            stored = sum(pool.map(store, written))
        keep = {day_file_key(month, *key) for key in written}
        shutil.rmtree(days.directory, ignore_errors=True)
    for obj in list(target.list(month_prefix(month))):
        if obj.key not in keep:
            target.delete(obj.key)
    return len(keep), stored


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ingest_month(
    source: Storage,
    target: Storage,
    month: str,
    tmp: Path,
    row_group_rows: int,
    budget: int,
    max_file_rows: int,
    day_files_tz: str | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    files = month_files(source, month)
    counts, nulls = _count_securities(source, files)
    plan = _plan(counts, nulls, budget, row_group_rows)
    counted = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix=f"{month}-", dir=tmp))
    spill = _Spill(work)
    has_date, rows, table_bytes = _spill_month(source, files, plan, spill, budget)
    if rows != plan.rows:
        raise PermanentError(f"input of {month} changed while being ingested")
    spilled = time.perf_counter()

    schema = OUTPUT_SCHEMA
    if not has_date:
        schema = schema.remove(schema.get_field_index("trade_date"))
    out = _Output(month, work, schema, row_group_rows, max_file_rows)
    row_bytes = table_bytes / rows if rows else plan.row_bytes
    sort_rows = max(row_group_rows, int(budget / SORT_FACTOR / row_bytes))
    keys = KeysWriter(work / KEYS_NAME, with_trade_date=has_date)
    keys_s = days_s = 0.0
    days = DayFilesWriter(work / "days", schema, day_files_tz) if day_files_tz else None

    def emit(table: pa.Table) -> None:
        nonlocal keys_s, days_s
        counted_at = time.perf_counter()
        keys.add(table)
        cut_at = time.perf_counter()
        keys_s += cut_at - counted_at
        if days is not None:
            days.add(table)
            days_s += time.perf_counter() - cut_at
        out.append(table)

    # Buckets are sorted on a thread of their own while the main thread writes the previous
    # one: sorting and Parquet encoding both release the interpreter lock.
    for table in read_ahead(_sorted_buckets(spill, plan, sort_rows, work), depth=1):
        emit(table)
        del table
    parts = out.close()
    entries = [_file_entry(part, month) for part in parts]
    keys.close(month, [part_record(p.key, p.path, e["rows"]) for p, e in zip(parts, entries, strict=True)])
    sorted_at = time.perf_counter()

    # No day file may be read against parts it was not cut from: the manifest goes first.
    target.delete(manifest_key(month))
    written = set()
    for part in parts:
        target.write_file(part.key, part.path, content_type="application/vnd.apache.parquet")
        written.add(part.key)
        part.path.unlink()
    index = {
        "version": INDEX_VERSION,
        "month": month,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sorted_by": ["security", "ts"],
        "rows": rows,
        "row_group_rows": row_group_rows,
        "columns": schema.names,
        "inputs": [{"key": f.key, "size": f.size, "format": f.format} for f in files],
        "files": entries,
    }
    target.write_bytes(
        f"{month}/{INDEX_NAME}", json.dumps(index, indent=1).encode(), "application/json"
    )
    # Written after the parts it describes; a reader checks them before trusting it.
    target.write_file(f"{month}/{KEYS_NAME}", keys.path, content_type="application/vnd.apache.parquet")
    keys_bytes = keys.path.stat().st_size
    keys.path.unlink()
    day_count, day_bytes = _publish_day_files(target, month, days)
    if days is not None and days.abandoned is None:
        day_files = DayFiles(month, days.market_tz, tuple((e["key"], e["bytes"]) for e in entries))
        target.write_bytes(manifest_key(month), day_files.manifest(day_count), "application/json")
    removed, foreign = [], []
    for obj in target.list(f"{month}/"):
        name = obj.key[len(month) + 1 :]
        if obj.key in written or name == INDEX_NAME:
            continue
        if _PART_RE.match(name):
            target.delete(obj.key)
            removed.append(target.describe(obj.key))
        elif not name.rsplit("/", 1)[-1].startswith((".", "_")):
            foreign.append(target.describe(obj.key))
    os.rmdir(work)
    done = time.perf_counter()
    return {
        "rows": rows,
        "securities": len(counts) + (1 if nulls else 0),
        "input_files": len(files),
        "input_bytes": sum(f.size for f in files),
        "files": [target.describe(p.key) for p in parts],
        "bytes": sum(e["bytes"] for e in entries),
        "row_groups": sum(len(e["row_groups"]) for e in entries),
        "buckets": plan.buckets,
        "merged_buckets": sum(1 for n in plan.bucket_rows if n > sort_rows),
        "spill_bytes": spill.bytes,
        "keys_bytes": keys_bytes,
        "day_files": day_count,
        "day_files_bytes": day_bytes,
        "day_files_skipped": days.abandoned if days is not None else None,
        "removed": removed,
        "other_files": foreign,
        "seconds": {
            "count": round(counted - started, 3),
            "spill": round(spilled - counted, 3),
            "sort_write": round(sorted_at - spilled, 3),
            "keys": round(keys_s, 3),
            "day_files": round(days_s, 3),
            "upload": round(done - sorted_at, 3),
            "total": round(done - started, 3),
        },
    }


def ingest(
    input_uri: str,
    output_uri: str,
    months: list[str] | tuple[str, ...],
    endpoint_url: str | None = None,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    max_file_rows: int = DEFAULT_MAX_FILE_ROWS,
    tmp_dir: str | Path | None = None,
    day_files_tz: str | None = None,
) -> dict[str, Any]:
    """Rewrite `months` of `input_uri` under `output_uri` (see the module doc); a summary.

    The summary has ``input``, ``output``, ``rows`` (total), ``seconds``, ``peak_rss_mb`` and
    ``months``: per month ``rows``, ``securities``, ``input_files``, ``input_bytes``, ``files``
    (URIs written), ``bytes``, ``row_groups``, ``buckets``, ``merged_buckets``,
    ``spill_bytes``, ``keys_bytes`` (the key sidecar), ``day_files`` and ``day_files_bytes``
    (with `day_files_tz`: the day files written, `shared.dayfiles`), ``day_files_skipped`` (why
    a month got none although asked, else null), ``removed`` (stale parts deleted),
    ``other_files`` (files in the output month that are not ingest output: a run would read
    them too) and ``seconds`` per stage (``keys``, counting the key sidecar, is part of
    ``sort_write``, and so is ``day_files``, cutting the day files).
    Raises `PermanentError` for unreadable or missing input, `ValueError` for bad arguments.
    """
    if row_group_rows < 1:
        raise ValueError("row_group_rows must be at least 1")
    if memory_budget_bytes < 1 << 20:
        raise ValueError("memory_budget_bytes must be at least 1 MiB")
    months = list(dict.fromkeys(months))
    if not months:
        raise ValueError("give at least one month")
    if day_files_tz is not None:
        try:
            JobParams(market_tz=day_files_tz)
        except ValueError:
            raise ValueError(f"--day-files: unknown time zone {day_files_tz!r} (e.g. UTC, Australia/Sydney)") from None
    source = open_storage(input_uri, endpoint_url=endpoint_url)
    target = open_storage(output_uri, endpoint_url=endpoint_url)
    if source.describe() == target.describe():
        raise ValueError("the output location must differ from the input location")
    started = time.perf_counter()
    per_month: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tickq-ingest-", dir=tmp_dir) as tmp:
        for month in months:
            per_month[month] = _ingest_month(
                source, target, month, Path(tmp), row_group_rows, memory_budget_bytes,
                max_file_rows, day_files_tz,
            )  # fmt: skip
    return {
        "input": source.describe(),
        "output": target.describe(),
        "rows": sum(m["rows"] for m in per_month.values()),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "months": per_month,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tickq ingest`` (the connection options are the caller's)."""
    from tickq.cli import positive_int

    parser.add_argument("--input", required=True, help="raw input (s3://bucket/prefix or a path)")
    parser.add_argument("--output", required=True, help="where ingested months go (not --input)")
    parser.add_argument("--months", required=True, help="YYYY-MM, YYYY-MM..YYYY-MM or a comma list")
    parser.add_argument(
        "--row-group-rows", type=positive_int, default=DEFAULT_ROW_GROUP_ROWS,
        help=f"rows per Parquet row group (default {DEFAULT_ROW_GROUP_ROWS})",
    )  # fmt: skip
    parser.add_argument(
        "--memory-mb", type=positive_int, default=DEFAULT_MEMORY_BUDGET >> 20,
        help="memory for sorting, in MiB (default 256); the rest spills to local disk",
    )  # fmt: skip
    parser.add_argument(
        "--day-files", metavar="ZONE",
        help="also write one small file per (security, trade date in ZONE, the runs' --market-tz), "
        "so that jobs read on their own or in small batches read about their own rows",
    )  # fmt: skip
    parser.add_argument("--tmp-dir", help="local directory for spill files (default: system temp)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def main(args: argparse.Namespace) -> int:
    """Run ``tickq ingest``; raises `shared.errors.TickqError` for expected failures."""
    from shared.metrics import configure, get_logger
    from tickq.cli import _month_list

    metrics_file = getattr(args, "metrics_file", None)
    configure("ingest", metrics_file, stream=sys.stderr, quiet=getattr(args, "quiet", False))
    endpoint = getattr(args, "s3_endpoint_url", None) or os.environ.get("TICKQ_S3_ENDPOINT_URL")
    months = list(_month_list(args.months))
    try:
        summary = ingest(
            args.input, args.output, months, endpoint_url=endpoint or None,
            row_group_rows=args.row_group_rows, memory_budget_bytes=args.memory_mb << 20,
            tmp_dir=args.tmp_dir, day_files_tz=args.day_files,
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, pa.ArrowException):
            raise
        raise ConfigError(str(exc)) from None
    log = get_logger()
    for month, info in summary["months"].items():
        log.info(
            "ingest.month", month=month, rows=info["rows"], files=len(info["files"]),
            row_groups=info["row_groups"], bytes=info["bytes"], buckets=info["buckets"], day_files=info["day_files"],
            seconds=info["seconds"]["total"],
        )  # fmt: skip
        if info["day_files_skipped"]:
            log.warning("ingest.day_files_skipped", month=month, reason=info["day_files_skipped"])
        for uri in info["other_files"]:
            log.warning("ingest.other_file", month=month, uri=uri,
                        note="not ingest output: a run over the output reads it too")  # fmt: skip
    log.info("ingest.done", rows=summary["rows"], seconds=summary["seconds"],
             peak_rss_mb=summary["peak_rss_mb"])  # fmt: skip
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        files = sum(len(m["files"]) for m in summary["months"].values())
        print(
            f"ingested {len(months)} month(s), {summary['rows']} rows into {files} file(s) "
            f"under {summary['output']} in {summary['seconds']:.1f}s"
        )
    return 0
