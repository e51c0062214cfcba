"""Parquet input: the row groups a read needs, by their statistics, streamed in bounded
batches; footers and edge row groups kept between passes (`ParquetCache`)."""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.inputs.files import (
    DEFAULT_BATCH_ROWS,
    EPOCH,
    KEY_COLUMNS,
    LABEL_COLUMNS,
    NS_MAX,
    NS_MIN,
    REQUIRED_COLUMNS,
    DayWindow,
    FileId,
    InputFile,
    KeyBatch,
    missing_columns,
    unreadable,
)
from shared.inputs.normalisation import filter_securities
from shared.inputs.streams import ByteCounter, CountingReader
from shared.markettime import shared_day
from shared.storage import Storage

# Small read buffer for streamed Parquet: bounded memory whatever the row-group size.
PARQUET_BUFFER_BYTES = 1 << 20


class ParquetCache:
    """What a reader keeps between passes over the same Parquet files.

    Jobs of one month come in consecutive batches, and two consecutive batches meet inside
    the row group that holds the last job of one and the first of the next: without this,
    that row group is fetched and decoded twice, and every pass parses the file's footer
    again. Keeps the `footers` most recently used parsed footers and the `row_groups` most
    recently decoded row groups (each of at most `max_group_rows` rows; larger ones are
    streamed and never kept), so its memory is bounded whatever the input.

    Entries are keyed by storage, file key and size. Whoever lists the files calls `clear`
    when it lists them again, so a file replaced in place is read afresh.
    """

    def __init__(self, footers: int = 16, row_groups: int = 4, max_group_rows: int = 4 * DEFAULT_BATCH_ROWS) -> None:
        self.max_group_rows = max_group_rows
        self._lock = threading.Lock()
        self._footers: OrderedDict[FileId, pq.FileMetaData] = OrderedDict()
        self._groups: OrderedDict[tuple[FileId, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self._capacity = {"footers": footers, "row_groups": row_groups}
        self.hits = 0  # row groups served without reading them

    @property
    def keeps_row_groups(self) -> bool:
        """Whether this cache keeps any decoded row group."""
        return self._capacity["row_groups"] > 0

    def sharing_footers(self) -> ParquetCache:
        """A cache that shares this one's footers but keeps no row group, for a pass over a
        whole month or a part of one: no later batch reads its first and last row groups again,
        which would otherwise stay decoded (about 20 MB of a worker's peak)."""
        view = ParquetCache(footers=self._capacity["footers"], row_groups=0, max_group_rows=self.max_group_rows)
        view._lock, view._footers = self._lock, self._footers
        return view

    def footer(self, file: FileId) -> pq.FileMetaData | None:
        """The parsed footer of `file`, if kept."""
        with self._lock:
            return self._touch(self._footers, file)

    def keep_footer(self, file: FileId, footer: pq.FileMetaData) -> None:
        """Keep `file`'s parsed footer."""
        with self._lock:
            self._keep(self._footers, file, footer, self._capacity["footers"])

    def row_group(self, file: FileId, index: int, columns: tuple[str, ...], read: Callable[[], pa.Table]) -> pa.Table:
        """Row group `index` of `file` as `columns`, decoded by `read` unless kept."""
        key = (file, index, columns)
        with self._lock:
            table = self._touch(self._groups, key)
            if table is not None:
                self.hits += 1
                return table
        table = read()
        with self._lock:
            self._keep(self._groups, key, table, self._capacity["row_groups"])
        return table

    def clear(self) -> None:
        """Forget everything kept."""
        with self._lock:
            self._footers.clear()
            self._groups.clear()

    @staticmethod
    def _touch(entries: OrderedDict[Any, Any], key: Any) -> Any:
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
        return value

    @staticmethod
    def _keep(entries: OrderedDict[Any, Any], key: Any, value: Any, capacity: int) -> None:
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > capacity:
            entries.popitem(last=False)


def parquet_key_streams(storage: Storage, file: InputFile, market_tz: str, ways: int) -> list[Iterator[KeyBatch]]:
    """`key_streams` of a Parquet file: runs of its row groups of about equal rows."""
    footer = parquet_footer(storage, file, None)
    days = _row_group_days(footer, market_tz)
    return [_key_batches(storage, file, footer, part, days) for part in _split_row_groups(footer, ways)]


def _row_group_days(meta: pq.FileMetaData, market_tz: str) -> list[int | None]:
    """Each row group's one trade date by its statistics: of its own trade_date column where
    the file has one, else of its ts (None: not known without reading its rows: a null date or
    ts, a group over two dates)."""
    days = _RowGroupDays.of(meta.schema.to_arrow_schema())
    return [days.day(meta.row_group(index), market_tz) for index in range(meta.num_row_groups)]


def _split_row_groups(meta: pq.FileMetaData, ways: int) -> list[list[int]]:
    """The file's row groups in up to `ways` consecutive runs of about equal rows."""
    total = meta.num_rows
    parts: list[list[int]] = [[] for _ in range(max(1, ways))]
    seen = 0
    for index in range(meta.num_row_groups):
        # The part where this group's first row falls, so each part holds about total / ways.
        parts[min(len(parts) - 1, seen * len(parts) // total) if total else 0].append(index)
        seen += meta.row_group(index).num_rows
    return [part for part in parts if part] or [[]]


def _key_batches(
    storage: Storage, file: InputFile, footer: pq.FileMetaData, groups: list[int], days: list[int | None]
) -> Iterator[KeyBatch]:
    """Key batches of the given row groups, those of a known day without their ts."""
    source = CountingReader(storage.open_read(file.key))
    try:
        parquet = _open_parquet(storage, file, source, KEY_COLUMNS, footer)
        names = parquet.schema_arrow.names
        missing = [c for c in ("ts", "security") if c not in names]
        if missing:
            raise missing_columns(file, storage, missing)
        present = [c for c in KEY_COLUMNS if c in names]
        try:
            # Consecutive groups of one known day (or of none) are read together.
            for day, run in itertools.groupby(groups, key=days.__getitem__):
                columns = ["security"] if day is not None else present
                for batch in parquet.iter_batches(batch_size=DEFAULT_BATCH_ROWS, row_groups=list(run),
                                                  columns=columns, use_threads=False):
                    yield KeyBatch(batch, day)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(file, storage, exc) from None
    finally:
        source.close()


def parquet_footer(storage: Storage, file: InputFile, cache: ParquetCache | None) -> pq.FileMetaData:
    """`file`'s parsed footer, from `cache` when it holds it (and kept there)."""
    file_id = (storage.uri, file.key, file.size)
    footer = cache.footer(file_id) if cache is not None else None
    if footer is None:
        source = CountingReader(storage.open_read(file.key))
        try:
            footer = pq.ParquetFile(source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES).metadata
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(file, storage, exc) from None
        finally:
            source.close()
        if cache is not None:
            cache.keep_footer(file_id, footer)
    return footer


def parquet_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    window: DayWindow | None,
    batch_rows: int,
    counter: ByteCounter | None,
    cache: ParquetCache | None,
    threads: bool = False,
    security_windows: Mapping[str, DayWindow] | None = None,
) -> Iterator[pa.RecordBatch]:
    """`read_batches` of a Parquet file: the row groups `row_groups_to_read` keeps, the rows of
    the `wanted` securities."""
    source = CountingReader(storage.open_read(file.key))
    file_id = (storage.uri, file.key, file.size)
    try:
        parquet = _open_parquet(storage, file, source, columns, cache.footer(file_id) if cache else None)
        if cache is not None:
            cache.keep_footer(file_id, parquet.metadata)
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c in columns and c not in names]
        if missing:
            raise missing_columns(file, storage, missing)
        present = [c for c in columns if c in names]
        groups = row_groups_to_read(parquet.metadata, parquet.schema_arrow, wanted, window, security_windows)
        try:
            for batch in _row_group_batches(parquet, source, groups, present, batch_rows, file_id, cache,
                                            threads):
                batch = filter_securities(batch, wanted)
                if batch.num_rows:
                    yield batch
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(file, storage, exc) from None
    finally:
        if counter is not None:
            counter.bytes += source.bytes_read
        source.close()


def _open_parquet(
    storage: Storage, file: InputFile, source: CountingReader, columns: tuple[str, ...], footer: pq.FileMetaData | None
) -> pq.ParquetFile:
    """`source` as a Parquet file whose label columns read as dictionaries (no string copied
    per row); its footer is read and parsed unless given."""
    try:
        if footer is None:
            footer = pq.ParquetFile(source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES).metadata
        names = footer.schema.to_arrow_schema().names
        labels = [c for c in LABEL_COLUMNS if c in columns and c in names]
        return pq.ParquetFile(source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES, metadata=footer,
                              read_dictionary=labels or None)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(file, storage, exc) from None


def _row_group_batches(
    parquet: pq.ParquetFile,
    source: CountingReader,
    groups: list[int],
    columns: list[str],
    batch_rows: int,
    file_id: FileId,
    cache: ParquetCache | None,
    threads: bool = False,
) -> Iterator[pa.RecordBatch]:
    """Batches of the given row groups, in order.

    With a `cache`, the first and the last of them go through it (consecutive passes share
    their edge row groups); the others are streamed, so that a pass over many row groups
    (a file not laid out for jobs) neither holds whole row groups nor churns the cache.
    Row groups small enough to cache are fetched in one request each.
    """
    if not groups:
        return
    if cache is None:
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns,
                                        use_threads=threads)
        return
    meta = parquet.metadata
    for position, index in enumerate(groups):
        small = meta.row_group(index).num_rows <= cache.max_group_rows
        if small and cache.keeps_row_groups and position in (0, len(groups) - 1):
            read = functools.partial(_read_row_group, parquet, source, index, columns, threads)
            yield from cache.row_group(file_id, index, tuple(columns), read).to_batches(max_chunksize=batch_rows)
            continue
        if small:
            source.prefetch(*_column_chunks_span(meta, index, columns))
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[index], columns=columns,
                                        use_threads=threads)


def _read_row_group(parquet: pq.ParquetFile, source: CountingReader, index: int, columns: list[str],
                    threads: bool) -> pa.Table:
    """Row group `index` whole, its column chunks fetched in one request."""
    source.prefetch(*_column_chunks_span(parquet.metadata, index, columns))
    return parquet.read_row_group(index, columns=columns, use_threads=threads)


def _column_chunks_span(meta: pq.FileMetaData, index: int, columns: list[str]) -> tuple[int, int]:
    """(offset, length) of the bytes holding row group `index`'s chunks of `columns`."""
    group = meta.row_group(index)
    spans = []
    for j in range(group.num_columns):
        chunk = group.column(j)
        if chunk.path_in_schema in columns:
            start = min(chunk.data_page_offset, chunk.dictionary_page_offset or chunk.data_page_offset)
            spans.append((start, start + chunk.total_compressed_size))
    if not spans:
        return 0, 0
    start = min(s for s, _ in spans)
    return start, max(e for _, e in spans) - start


def _is_text(kind: pa.DataType) -> bool:
    """String, or dictionary-encoded string (as label columns are read)."""
    return pa.types.is_string(kind) or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type))


def _stat_range(stats: Any) -> tuple[Any, Any] | None:
    if stats is None or not stats.has_min_max:
        return None
    return stats.min, stats.max


def row_groups_to_read(
    meta: pq.FileMetaData, schema: pa.Schema, wanted: tuple[str, ...] | None, window: DayWindow | None,
    security_windows: Mapping[str, DayWindow] | None = None,
) -> list[int]:
    """Row groups whose statistics may hold rows of the `wanted` securities within `window`
    (`schema`: the file's, as read, text columns possibly as dictionaries).

    A row group of one security only, as a large security's are in a month sorted by security,
    must also hold rows within that security's own window in `security_windows` (a narrower
    span of days than `window`, which covers every security wanted): a batch that holds some
    of a security's days then reads only the row groups of those days.
    """
    sec_idx = schema.get_field_index("security") if wanted is not None else -1
    days = _RowGroupDays.of(schema)
    keep: list[int] = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        group_window = window
        if sec_idx >= 0 and _is_text(schema.field(sec_idx).type):
            bounds = _stat_range(group.column(sec_idx).statistics)
            if bounds is not None:
                low, high = (b.decode() if isinstance(b, bytes) else b for b in bounds)
                # Any wanted security within [low, high]? (`wanted` is sorted.)
                first = bisect.bisect_left(wanted, low) if wanted is not None else 0
                if wanted is not None and (first == len(wanted) or wanted[first] > high):
                    continue
                if low == high and security_windows is not None:
                    group_window = security_windows.get(low, window)
        if group_window is not None and not days.may_hold(group, group_window):
            continue
        keep.append(i)
    return keep


class _RowGroupDays:
    """What a file's row group statistics say of the market days of its rows: a row's own
    trade_date places it where the file carries one, else its ts.

    Of a trade_date column, dates say their range; ISO text (YYYY-MM-DD, which sorts as the
    dates do) says the range of the values that read as dates, and a value that does not
    takes its ts's day, as a null does. Other types say nothing by their statistics."""

    def __init__(self, ts_idx: int, ts_scale: int, date_idx: int, date_kind: pa.DataType | None) -> None:
        self._ts_idx, self._ts_scale = ts_idx, ts_scale
        self._date_idx = date_idx
        self._dates = date_kind is not None and pa.types.is_date32(date_kind)
        self._text = date_kind is not None and (pa.types.is_string(date_kind) or pa.types.is_large_string(date_kind))

    @classmethod
    def of(cls, schema: pa.Schema) -> _RowGroupDays:
        """For a file of `schema` (as read)."""
        ts_idx = schema.get_field_index("ts")
        date_idx = schema.get_field_index("trade_date")
        return cls(ts_idx, _ts_scale(schema.field(ts_idx).type) if ts_idx >= 0 else 0, date_idx,
                   schema.field(date_idx).type if date_idx >= 0 else None)

    def may_hold(self, group: Any, window: DayWindow) -> bool:
        """Whether row group `group` (its metadata) may hold rows of `window`'s days."""
        if self._date_idx < 0:
            return self._ts_may_hold(group, window)
        stats = group.column(self._date_idx).statistics
        if not (self._dates or self._text) or window.days is None or stats is None or not stats.has_null_count:
            return True
        dates = self._date_range(stats)
        if dates is None and stats.has_min_max:  # text that is not ISO dates: nothing to tell
            return True
        if dates is not None and dates[1] >= window.days[0] and dates[0] <= window.days[1]:
            return True
        # Rows without a trade_date of their own (null, or text that is no date) take the day
        # of their ts.
        return (stats.null_count > 0 or self._text) and self._ts_may_hold(group, window)

    def day(self, group: Any, market_tz: str) -> int | None:
        """The one trade date (days since 1970-01-01) of every row of `group`, when its
        statistics tell it; else None."""
        if self._date_idx >= 0:
            stats = group.column(self._date_idx).statistics
            one_date = (self._dates and stats is not None and stats.has_min_max and stats.has_null_count
                        and stats.null_count == 0 and stats.min_raw == stats.max_raw)
            return int(stats.min_raw) if one_date else None
        if self._ts_idx < 0:
            return None
        stats = group.column(self._ts_idx).statistics
        bounds = _ts_bounds_ns(stats, self._ts_scale)
        # Instants beyond nanoseconds' range (years 1677-2262) are left to the rows' reading,
        # which reports them.
        known = (bounds is not None and stats.has_null_count and stats.null_count == 0
                 and bounds[0] >= NS_MIN and bounds[1] <= NS_MAX)
        return shared_day(np.array(bounds, dtype=np.int64), market_tz) if known else None

    def _date_range(self, stats: Any) -> tuple[int, int] | None:
        """The [first, last] trade date (days since 1970-01-01) of a trade_date column chunk
        by its statistics, when they hold one."""
        if not stats.has_min_max:
            return None
        if self._dates:
            return int(stats.min_raw), int(stats.max_raw)
        bounds = [_iso_day(value) for value in (stats.min, stats.max)]
        return (bounds[0], bounds[1]) if bounds[0] is not None and bounds[1] is not None else None

    def _ts_may_hold(self, group: Any, window: DayWindow) -> bool:
        bounds = _ts_bounds_ns(group.column(self._ts_idx).statistics, self._ts_scale) if self._ts_idx >= 0 else None
        return bounds is None or (bounds[1] >= window.start_ns and bounds[0] < window.end_ns)


def _iso_day(value: Any) -> int | None:
    """`value` (a text statistic) as days since 1970-01-01 when it is an ISO date, YYYY-MM-DD."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    if not isinstance(text, str) or len(text) != 10:
        return None
    try:
        return (dt.date.fromisoformat(text) - EPOCH).days
    except ValueError:
        return None


def _ts_scale(kind: pa.DataType) -> int:
    """Nanoseconds per unit of a ts column's stored values: of a timestamp type by its unit,
    of an integer type 1 (nanoseconds since the epoch, as `normalise_ts` reads them); 0 for any
    other type, whose statistics say nothing of time."""
    if pa.types.is_integer(kind):
        return 1
    if not pa.types.is_timestamp(kind):
        return 0
    return {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[kind.unit]


def _ts_bounds_ns(stats: Any, scale: int) -> tuple[int, int] | None:
    """The [min, max] instant (UTC ns) of a ts column chunk by its statistics, when they hold
    it (`scale`: `_ts_scale` of the column's type)."""
    if not scale or stats is None or not stats.has_min_max or stats.physical_type != "INT64":
        return None
    return stats.min_raw * scale, stats.max_raw * scale
