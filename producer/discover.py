"""Discovering a month's jobs from the data itself, reading only the key columns.

A month written by `tickq ingest` carries a key sidecar (`shared.monthkeys`): row counts per
(security, UTC quarter hour), which give the same jobs and counts as the rows themselves in a
fraction of the time. Discovery uses it when it matches the month's files and the market time
zone keeps every quarter hour of the month on one date; otherwise it scans the key columns.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.errors import PermanentError
from shared.inputs import (
    KEY_COLUMNS,
    FileSlice,
    InputFile,
    KeyBatch,
    SliceSeen,
    csv_slices,
    key_streams,
    label_codes,
    month_files,
    read_batches,
    shared_trade_date,
    trade_dates,
    whole_file_slice,
)
from shared.markettime import local_time
from shared.messages import is_valid_security
from shared.monthkeys import quarters_share_dates, read_keys
from shared.readahead import read_ahead
from shared.resources import available
from shared.storage import Storage

# Streams a file's key columns are read in at most, side by side: one per core.
MAX_SCAN_STREAMS = 4


@dataclass
class MonthDiscovery:
    """The (security, trade_date) pairs of one month and their row counts."""

    month: str
    rows: Counter[tuple[str, str]] = field(default_factory=Counter)
    files: int = 0
    rows_scanned: int = 0
    # Rows no job can own: no security, an unusable security code, or no trade date.
    rows_unassigned: int = 0
    invalid_securities: set[str] = field(default_factory=set)
    # Where the counts came from: "keys" (the ingest key sidecar) or "scan" (every row). Not
    # part of the result's value: both give the same discovery.
    source: str = field(default="scan", compare=False)
    # The files a scan read other than Parquet, each with what its slices hold (`FileSlice`).
    sliced: list[InputFile] = field(default_factory=list, compare=False)


def discover_month(
    storage: Storage,
    month: str,
    market_tz: str,
    securities: set[str] | None = None,
    dates: set[dt.date] | None = None,
) -> MonthDiscovery:
    """Every (security, trade_date) of `month`'s input, after the run's key filters.

    Reads the month's key sidecar when it is usable, else the key columns of every row.
    Raises `PermanentError` when the month has no input or a file is unreadable.
    """
    files = month_files(storage, month)
    sliced: list[InputFile] = []
    source, counted = "keys", _counts_from_keys(storage, month, files, market_tz)
    if counted is None:
        source, counted = "scan", _counts_from_rows(storage, files, market_tz, sliced)
    found = MonthDiscovery(month, files=len(files), source=source, sliced=sliced)
    for rows_seen, counts in counted:
        found.rows_scanned += rows_seen
        _tally(found, counts, securities, dates)
    return found


# Rows seen, and their counts per (security, trade_date) as columns security, trade_date, count.
_Counted = Iterable[tuple[int, pa.Table]]


def _tally(
    found: MonthDiscovery,
    counts: pa.Table,
    securities: set[str] | None,
    dates: set[dt.date] | None,
) -> None:
    """Add grouped counts (columns security, trade_date, count) to `found`, after the filters."""
    for sec, day, n in zip(
        counts.column(0).to_pylist(),
        counts.column(1).to_pylist(),
        counts.column(2).to_pylist(),
        strict=True,
    ):
        if sec is None or day is None or not is_valid_security(sec):
            found.rows_unassigned += n
            if sec:
                found.invalid_securities.add(sec[:40])
            continue
        if securities is not None and sec not in securities:
            continue
        if dates is not None and day not in dates:
            continue
        found.rows[(sec, day.isoformat())] += n


def _counts_from_keys(storage: Storage, month: str, files: list[InputFile], market_tz: str) -> _Counted | None:
    """Counts from the month's key sidecar; None when there is none or it is not usable."""
    keys = read_keys(storage, month, files)
    if keys is None or not quarters_share_dates(month, market_tz, keys.column("quarter")):
        return None
    # Every instant of a quarter hour has the date of its start (checked above), and a
    # row's own trade_date wins over the derived one, as in `shared.inputs.trade_dates`.
    derived = local_time(keys.column("quarter").combine_chunks(), market_tz).trade_date
    day = pc.coalesce(keys.column("trade_date").combine_chunks(), derived)
    table = pa.table({"security": keys.column("security"), "trade_date": day, "rows": keys.column("rows")})
    counts = table.group_by(["security", "trade_date"], use_threads=False).aggregate([("rows", "sum")])
    rows_seen = pc.sum(keys.column("rows")).as_py() or 0
    return [(rows_seen, counts.select(["security", "trade_date", "rows_sum"]))]


def _counts_from_rows(storage: Storage, files: list[InputFile], market_tz: str, sliced: list[InputFile]) -> _Counted:
    """Counts from the key columns of every row of the month; each file other than Parquet is
    added to `sliced`, with what its slices hold (the slices of a CSV file it cut, or the
    whole file).

    The month is read as several streams side by side, one per core this process may use: a
    Parquet file in runs of row groups (`key_streams`), a large CSV file in its slices, files
    read whole (DBN, `.csv.gz`, small CSV: a month of daily files) several at a time. Decoding
    releases the interpreter lock, so a scan uses every core of a small machine while the
    workers still wait for their first jobs. Each stream's batches are grouped on their
    security codes (as read, a dictionary) and day numbers, not on text, or only on their codes
    when all their rows have one trade date; its counts are folded together as they come, and
    the streams' counts once more at the end (a month has hundreds of batches, and each repeats
    most of the month's jobs)."""
    ways = min(MAX_SCAN_STREAMS, max(1, math.ceil(available().cpus)))
    folded = _FoldedCounts()
    read_whole: list[InputFile] = []
    for file in files:
        pieces = csv_slices(storage, file)
        if pieces:
            sliced.append(_count_slices(storage, file, pieces, market_tz, ways, folded))
        elif file.format != "parquet":
            read_whole.append(file)
        else:
            count = functools.partial(_stream_counts, market_tz=market_tz, where=storage.describe(file.key))
            streams = key_streams(storage, file, market_tz, ways)
            with ThreadPoolExecutor(len(streams), thread_name_prefix="tickq-scan") as pool:
                for rows_seen, counts in pool.map(count, streams):
                    folded.add(rows_seen, counts)
    if read_whole:
        sliced.extend(_count_whole_files(storage, read_whole, market_tz, ways, folded))
    return [folded.result()]


def _count_whole_files(storage: Storage, files: list[InputFile], market_tz: str, ways: int,
                       folded: _FoldedCounts) -> list[InputFile]:
    """Count the rows of files read whole into `folded`, `ways` files at a time; each file with
    its one slice, the whole file, and what it holds."""

    def count(file: InputFile) -> tuple[int, pa.Table, InputFile]:
        seen = SliceSeen(whole_file_slice(file))
        (stream,) = key_streams(storage, file, market_tz, 1)
        # The file's decoding overlaps its counting.
        rows_seen, counts = _stream_counts(read_ahead(_seen_by(seen, stream)), market_tz, storage.describe(file.key))
        return rows_seen, counts, dataclasses.replace(file, slices=(seen.seen(counts),))

    recorded: list[InputFile] = []
    with ThreadPoolExecutor(min(ways, len(files)), thread_name_prefix="tickq-scan") as pool:
        for rows_seen, counts, file in pool.map(count, files):
            folded.add(rows_seen, counts)
            recorded.append(file)
    return recorded


def _seen_by(seen: SliceSeen, stream: Iterator[KeyBatch]) -> Iterator[KeyBatch]:
    """`stream`, each batch shown to `seen` on its way. Its securities are coded here, once:
    `seen` takes the range of the few distinct values, and the counting takes the codes."""
    for key in stream:
        batch = key.batch
        security = batch.column("security")
        if not pa.types.is_dictionary(security.type):
            batch = batch.set_column(batch.schema.get_field_index("security"), "security",
                                     pc.dictionary_encode(security))
        seen.add(batch)
        yield KeyBatch(batch, key.day)


def _count_slices(storage: Storage, file: InputFile, pieces: list[FileSlice], market_tz: str, ways: int,
                  folded: _FoldedCounts) -> InputFile:
    """Count the rows of a CSV file's slices into `folded`, `ways` slices at a time; the file
    with what each of its slices holds."""
    count = functools.partial(_slice_counts, storage, file, market_tz=market_tz)
    seen: list[FileSlice] = []
    with ThreadPoolExecutor(min(ways, len(pieces)), thread_name_prefix="tickq-scan") as pool:
        for rows_seen, counts, piece in pool.map(count, pieces):
            folded.add(rows_seen, counts)
            seen.append(piece)
    return dataclasses.replace(file, slices=tuple(seen))


def _slice_counts(storage: Storage, file: InputFile, piece: FileSlice,
                  market_tz: str) -> tuple[int, pa.Table, FileSlice]:
    """Rows seen in one slice of a CSV file, their counts, and the slice with what it holds."""
    seen = SliceSeen(piece)

    def keys() -> Iterator[KeyBatch]:
        for batch in read_batches(storage, dataclasses.replace(file, slices=(piece,)), KEY_COLUMNS):
            seen.add(batch)
            yield KeyBatch(batch, None)

    rows_seen, counts = _stream_counts(keys(), market_tz, storage.describe(file.key))
    return rows_seen, counts, seen.seen(counts)


def _stream_counts(stream: Iterator[KeyBatch], market_tz: str, where: str) -> tuple[int, pa.Table]:
    """Rows seen in one key stream (of the file `where` names) and their counts."""
    folded = _FoldedCounts()
    for key in stream:
        try:
            counts = _batch_counts(key, market_tz)
        except PermanentError as exc:  # rows the file holds but tickq cannot take: say which file
            raise PermanentError(f"{where}: {exc}") from None
        folded.add(key.batch.num_rows, counts)
    return folded.result()


def _batch_counts(key: KeyBatch, market_tz: str) -> pa.Table:
    """The batch's rows per (security, trade_date), as columns security, trade_date, count."""
    batch = key.batch
    security = batch.column("security")
    if not pa.types.is_dictionary(security.type):
        security = pc.dictionary_encode(security)
    codes, values = label_codes(security)
    day = key.day if key.day is not None else shared_trade_date(batch, market_tz)
    if day is not None:
        return _one_day_counts(codes, values, day)
    dates = trade_dates(batch, market_tz)
    counted = _few_days_counts(codes, values, dates)
    if counted is not None:
        return counted
    keys = pa.table({"code": pa.array(codes.astype(np.int32, copy=False)), "trade_date": dates})
    counts = keys.group_by(["code", "trade_date"], use_threads=False).aggregate([([], "count_all")])
    # Code -1 (a null security) takes the extra null at the end of the values.
    lookup = pa.concat_arrays([values.cast(pa.string()), pa.nulls(1, pa.string())])
    code = pc.if_else(pc.less(counts.column("code"), 0), len(values), counts.column("code"))
    return pa.table({"security": lookup.take(code), "trade_date": counts.column("trade_date"),
                     "count": counts.column("count_all")})


def _few_days_counts(codes: np.ndarray, values: pa.Array, dates: pa.Array) -> pa.Table | None:
    """`_batch_counts` of rows of several trade `dates` (a month in no time order, or by
    security): counts per (code, date) cell in one pass, or None when the dates span too many
    days for a table of every cell (hashing them is then cheaper)."""
    valid = dates.is_valid().to_numpy(zero_copy_only=False)
    days = dates.cast(pa.int32()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    dated = days[valid]
    first = int(dated.min()) if len(dated) else 0
    span = (int(dated.max()) - first + 1 if len(dated) else 0) + 1  # and a last column for no date
    width = len(values) + 1  # and a first row for no security (code -1)
    if width * span > max(4 * len(codes), 1 << 16):
        return None
    per_cell = np.bincount((codes + 1) * span + np.where(valid, days - first, span - 1), minlength=width * span)
    seen = np.flatnonzero(per_cell)
    lookup = pa.concat_arrays([pa.nulls(1, pa.string()), values.cast(pa.string())])
    column = seen % span
    day = pa.array((first + column).astype(np.int32), pa.date32(), mask=column == span - 1)
    return pa.table({"security": lookup.take(pa.array(seen // span)), "trade_date": day,
                     "count": pa.array(per_cell[seen], pa.int64())})


def _one_day_counts(codes: np.ndarray, values: pa.Array, day: int) -> pa.Table:
    """`_batch_counts` of rows all of trade date `day` (days since 1970-01-01): counts per code."""
    # Position 0 counts the rows of no security (code -1), position i + 1 those of values[i].
    per_code = np.bincount(codes + 1, minlength=len(values) + 1)
    seen = np.flatnonzero(per_code)
    lookup = pa.concat_arrays([pa.nulls(1, pa.string()), values.cast(pa.string())])
    return pa.table({"security": lookup.take(pa.array(seen)),
                     "trade_date": pa.array(np.full(len(seen), day, dtype=np.int32), pa.date32()),
                     "count": pa.array(per_code[seen], pa.int64())})


class _FoldedCounts:
    """Per-batch counts summed into one table, folding whenever enough rows have gathered."""

    FOLD_ROWS = 1 << 18

    def __init__(self) -> None:
        self.rows_seen = 0
        self._tables: list[pa.Table] = []
        self._gathered = 0

    def add(self, rows_seen: int, counts: pa.Table) -> None:
        """Add one batch's counts (columns security, trade_date, count)."""
        self.rows_seen += rows_seen
        self._tables.append(counts)
        self._gathered += counts.num_rows
        if self._gathered > self.FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if len(self._tables) > 1:
            table = pa.concat_tables(self._tables)
            summed = table.group_by(["security", "trade_date"], use_threads=False).aggregate([("count", "sum")])
            self._tables = [summed.select(["security", "trade_date", "count_sum"]).rename_columns(
                ["security", "trade_date", "count"])]
        self._gathered = sum(t.num_rows for t in self._tables)

    def result(self) -> tuple[int, pa.Table]:
        """Rows seen, and the counts of all of them."""
        self._fold()
        empty = pa.table({"security": pa.array([], pa.string()), "trade_date": pa.array([], pa.date32()),
                          "count": pa.array([], pa.int64())})
        return self.rows_seen, self._tables[0] if self._tables else empty
