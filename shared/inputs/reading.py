"""Reading any input file in bounded batches of the columns asked for, pre-filtered to the
wanted securities; what a read of a month would take; and the key columns discovery reads."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from shared.dbn import DBN_COLUMNS, DbnError, dbn_batches
from shared.errors import PermanentError
from shared.inputs.csv_reader import csv_batches
from shared.inputs.files import (
    DEFAULT_BATCH_ROWS,
    KEY_COLUMNS,
    DayWindow,
    FileSlice,
    InputFile,
    KeyBatch,
    slice_spans,
    unreadable,
)
from shared.inputs.normalisation import column_of, filter_securities, normalise_ts, wanted_securities
from shared.inputs.parquet_reader import (
    ParquetCache,
    parquet_batches,
    parquet_footer,
    parquet_key_streams,
    row_groups_to_read,
)
from shared.inputs.streams import ByteCounter, counted_stream
from shared.storage import Storage


def read_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    *,
    security: str | Collection[str] | None = None,
    window: DayWindow | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    counter: ByteCounter | None = None,
    cache: ParquetCache | None = None,
    threads: bool = False,
    security_windows: Mapping[str, DayWindow] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Batches of `file` holding the wanted `columns` that exist in it.

    With `security` (one code or several), only those securities' rows come out, and
    Parquet row groups whose statistics exclude them, or exclude `window`, are skipped
    without being read. Required columns that the file lacks raise `PermanentError`;
    unreadable files raise it too. A `cache` serves Parquet footers and row groups that
    an earlier call already read. With `threads`, a Parquet file's columns are decoded side by
    side on Arrow's pool of threads (for a caller with cores to spare). `security_windows`:
    narrower windows of some wanted securities, for a Parquet row group holding only one of
    them (`row_groups_to_read`).
    """
    wanted = wanted_securities(security)
    if file.format == "parquet":
        yield from parquet_batches(storage, file, columns, wanted, window, batch_rows, counter, cache, threads,
                                   security_windows)
    elif file.slices and not slice_spans(file, wanted, window):
        return  # discovery found none of the wanted rows here
    elif file.cut:
        for span in slice_spans(file, wanted, window):
            yield from csv_batches(storage, file, columns, wanted, batch_rows, counter, span)
    elif file.format in ("csv", "csv.gz"):
        yield from csv_batches(storage, file, columns, wanted, batch_rows, counter)
    elif file.format in ("dbn", "dbn.zst"):
        yield from _dbn_batches(storage, file, columns, wanted, batch_rows, counter)
    else:
        raise PermanentError(
            f"{storage.describe(file.key)}: {file.format} input is not supported by this "
            "version; convert it with `tickq ingest`"
        )


def pass_share(
    storage: Storage,
    files: list[InputFile],
    security: Collection[str],
    window: DayWindow | None,
    cache: ParquetCache | None = None,
) -> float:
    """The share of a month's bytes that `read_batches` reads for `security` within `window`:
    for Parquet, the row groups its statistics cannot exclude; for a CSV file with slices, the
    slices that may hold them; every other file whole.

    Near 1 on a month not laid out by security (any subset of its jobs reads all of it), small
    on an ingested one.
    """
    wanted = wanted_securities(security)
    read = total = 0
    for file in files:
        if file.slices:
            read += sum(end - start for start, end in slice_spans(file, wanted, window))
            total += file.slices[-1].end - file.slices[0].start
            continue
        if file.format != "parquet":
            read, total = read + file.size, total + file.size
            continue
        meta = parquet_footer(storage, file, cache)
        schema = meta.schema.to_arrow_schema()
        groups = set(row_groups_to_read(meta, schema, wanted, window))
        for index in range(meta.num_row_groups):
            group = meta.row_group(index)
            size = sum(group.column(j).total_compressed_size for j in range(group.num_columns))
            total += size
            read += size if index in groups else 0
    return read / total if total else 0.0


def read_units(storage: Storage, files: list[InputFile], cache: ParquetCache | None = None) -> tuple[int, int]:
    """How many pieces a read of `files` can pick from (Parquet row groups, CSV slices, every
    other file whole), and how many rows they hold that are known without reading them."""
    units = rows = 0
    for file in files:
        if file.format == "parquet":
            footer = parquet_footer(storage, file, cache)
            units, rows = units + footer.num_row_groups, rows + footer.num_rows
        else:
            units, rows = units + max(1, len(file.slices)), rows + sum(piece.rows for piece in file.slices)
    return units, rows


def key_streams(storage: Storage, file: InputFile, market_tz: str, ways: int) -> list[Iterator[KeyBatch]]:
    """`file`'s key columns as up to `ways` streams over disjoint parts of it (of Parquet, runs
    of row groups of about equal rows), each to be read on a thread of its own.

    A Parquet row group whose ts statistics put all its rows on one trade date (a month in
    time order, nearly every group) is read without its ts: decoding the securities alone
    takes about half the time. Errors are raised as `read_batches` raises them.
    """
    if file.format == "parquet":
        return parquet_key_streams(storage, file, market_tz, ways)
    return [(KeyBatch(batch, None) for batch in read_batches(storage, file, KEY_COLUMNS))]


def _dbn_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    counter: ByteCounter | None,
) -> Iterator[pa.RecordBatch]:
    """DBN / zstd DBN through `shared.dbn` (which always yields every tickq column)."""
    with counted_stream(storage, file, counter) as stream:
        try:
            compressed = file.format == "dbn.zst"
            for batch in dbn_batches(stream, compressed=compressed, batch_rows=batch_rows):
                batch = filter_securities(batch, wanted)
                if batch.num_rows:
                    yield batch.select([c for c in columns if c in DBN_COLUMNS])
        except (DbnError, OSError, EOFError) as exc:
            raise unreadable(file, storage, exc) from None


class SliceSeen:
    """What discovery sees of the rows of a slice (`FileSlice`), batch by batch: how many, and
    the range of their ts and of their security codes; or, where the file carries its own
    trade_date (a row's own trade date, not its ts, places it in a day), the range of the
    dates its counts give."""

    def __init__(self, piece: FileSlice) -> None:
        self._piece = piece
        self._rows = 0
        self._ts: tuple[int, int] | None = None
        self._ts_decides = True
        self._security: tuple[str, str] | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        """Take a batch of the slice's key columns (ts, security, and trade_date where present)."""
        self._rows += batch.num_rows
        if column_of(batch, "trade_date") is not None:
            self._ts_decides = False
        else:
            self._ts = _widened(self._ts, pc.min_max(normalise_ts(batch.column("ts")).cast(pa.int64())))
        security = batch.column("security")
        if pa.types.is_dictionary(security.type):
            security = security.dictionary  # a few more values than the rows hold, at most
        if pa.types.is_string(security.type) or pa.types.is_large_string(security.type):
            self._security = _widened(self._security, pc.min_max(security))

    def seen(self, counts: pa.Table) -> FileSlice:
        """The slice with what its rows hold; `counts` are its rows per (security, trade_date)."""
        days = None
        if not self._ts_decides:
            dated = pc.min_max(counts.column("trade_date").cast(pa.int32()))
            days = None if dated["min"].as_py() is None else (dated["min"].as_py(), dated["max"].as_py())
        return FileSlice(self._piece.start, self._piece.end, self._rows, self._ts if self._ts_decides else None,
                         self._security, days)


def _widened(bounds: tuple[Any, Any] | None, more: pa.StructScalar) -> tuple[Any, Any] | None:
    """`bounds` widened by the `min_max` of more values (nulls only: unchanged)."""
    low, high = more["min"].as_py(), more["max"].as_py()
    if low is None:
        return bounds
    return (low, high) if bounds is None else (min(bounds[0], low), max(bounds[1], high))
