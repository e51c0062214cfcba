"""Reading monthly input: discovery of a month's files, streaming reads, normalisation.

A month M's input is every file under ``<input>/M/`` (recursively) plus any ``<input>/M.<ext>``.
Files are streamed in bounded record batches; Parquet row groups whose statistics exclude
the wanted security (or time range) are never fetched. Normalisation turns whatever the file
holds into one schema (see `NORMALISED_SCHEMA`), derives ``trade_date`` and ``hour`` in the
market time zone, and marks rows the contract rejects. Everything is vectorised with
pyarrow compute; no per-row Python on the normal path.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import io
import itertools
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import IO, Any
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared.dbn import DBN_COLUMNS, DbnError, dbn_batches
from shared.errors import PermanentError
from shared.markettime import local_time, shared_day
from shared.storage import Storage

REQUIRED_COLUMNS = ("ts", "security", "price", "size")
OPTIONAL_COLUMNS = ("side", "participant", "venue", "trade_date")
ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
KEY_COLUMNS = ("ts", "security", "trade_date")

FORMAT_BY_SUFFIX = (
    (".csv.gz", "csv.gz"),
    (".dbn.zst", "dbn.zst"),
    (".parquet", "parquet"),
    (".csv", "csv"),
    (".dbn", "dbn"),
)

TS_UTC = pa.timestamp("ns", tz="UTC")
_NS_MIN, _NS_MAX = -(2**63), 2**63 - 1  # the instants a ts holds
DEFAULT_BATCH_ROWS = 65_536
# Small read buffer for streamed Parquet: bounded memory whatever the row-group size.
PARQUET_BUFFER_BYTES = 1 << 20
# Arrow's streaming CSV reader reads up to 32 blocks ahead of the batch handed out: 1 MB blocks
# bound that to about 32 MB per file being read. Its batches are joined again into batches of
# `batch_rows` (`_Coalescer`), the size the rest of a pass is quick with.
CSV_BLOCK_BYTES = 1 << 20
# An uncompressed CSV file of at least two of these is cut into slices of whole lines about
# this long (`csv_slices`): discovery reads them side by side, and records what each holds,
# so that a worker's pass over some dates reads only their slices (as Parquet row groups).
CSV_SLICE_BYTES = 16 << 20
# How far past a cut discovery looks for the end of a line before it gives up on that cut.
CSV_LINE_SEARCH_BYTES = 1 << 20

# Text columns of normalised rows are labels: dictionary-encoded strings, so that each
# distinct value is normalised, matched and grouped once per batch rather than once per row.
LABEL = pa.dictionary(pa.int32(), pa.string())
LABEL_COLUMNS = ("security", "side", "participant", "venue")
NORMALISED_SCHEMA = pa.schema(
    [
        ("ts", TS_UTC),
        ("security", LABEL),
        ("price", pa.float64()),
        ("size", pa.int64()),
        ("side", LABEL),
        ("participant", LABEL),
        ("venue", LABEL),
        ("trade_date", pa.date32()),
        ("hour", pa.int64()),
        ("minute_of_day", pa.int64()),
    ]
)


@dataclass(frozen=True)
class FileSlice:
    """Bytes [start, end) of an input file that a read can take or skip on its own, and what
    discovery found in them: how many `rows`, the range of their `ts` (UTC ns) and of their
    `security` codes as the file writes them. A range that is None is unknown: the slice may
    hold anything.

    An uncompressed CSV file that discovery cut has several, of whole lines after its header
    (`csv_slices`). Any other file that is not Parquet has one, the whole file, [0, size): a
    read takes it whole or skips it, so that a pass over some dates of a month of daily files
    reads only theirs (Parquet's row groups carry such ranges themselves)."""

    start: int
    end: int
    rows: int = 0
    ts: tuple[int, int] | None = None
    security: tuple[str, str] | None = None

    def may_hold(self, wanted: tuple[str, ...] | None, window: DayWindow | None) -> bool:
        """Whether rows of the `wanted` securities (sorted) within `window` may be here."""
        if wanted is not None and self.security is not None:
            first = bisect.bisect_left(wanted, self.security[0])
            if first == len(wanted) or wanted[first] > self.security[1]:
                return False
        if window is not None and self.ts is not None:
            return self.ts[1] >= window.start_ns and self.ts[0] < window.end_ns
        return True

    def as_json(self) -> list[Any]:
        """JSON-ready form: [start, end, rows, ts or null, security or null]."""
        return [self.start, self.end, self.rows, list(self.ts) if self.ts else None,
                list(self.security) if self.security else None]

    @classmethod
    def from_json(cls, data: list[Any]) -> FileSlice:
        """Inverse of `as_json`."""
        start, end, rows, ts, security = data
        return cls(int(start), int(end), int(rows), (int(ts[0]), int(ts[1])) if ts else None,
                   (str(security[0]), str(security[1])) if security else None)


@dataclass(frozen=True)
class InputFile:
    """One input file of a month, with the `slices` the run's discovery recorded of it where
    it did (they cover the file's rows, in order; `FileSlice`), which reads then skip where
    they can."""

    key: str
    size: int
    format: str
    slices: tuple[FileSlice, ...] = ()
    version: str = ""  # the store's `ObjectInfo.version` of the file, as listed

    @property
    def cut(self) -> bool:
        """Whether reads take the file slice by slice (an uncompressed CSV file that discovery
        cut: its slices start after the header), not whole."""
        return bool(self.slices) and self.slices[0].start > 0


def format_of(key: str) -> str | None:
    """The input format a file name implies, or None for files tickq ignores."""
    lower = key.lower()
    for suffix, fmt in FORMAT_BY_SUFFIX:
        if lower.endswith(suffix):
            return fmt
    return None


def month_files(storage: Storage, month: str) -> list[InputFile]:
    """Every input file of `month`, in key order; `PermanentError` when there is none."""
    files: list[InputFile] = []
    for obj in storage.list(month):
        inside = obj.key.startswith(month + "/")
        beside = "/" not in obj.key and obj.key.startswith(month + ".")
        fmt = format_of(obj.key)
        if (inside or beside) and fmt is not None and not obj.key.rsplit("/", 1)[-1].startswith((".", "_")):
            files.append(InputFile(obj.key, obj.size, fmt, version=obj.version))
    if not files:
        raise PermanentError(
            f"no input for month {month} under {storage.describe()} "
            f"(expected {month}/… or {month}.parquet|csv|csv.gz|dbn|dbn.zst)"
        )
    return files


@dataclass(frozen=True)
class DayWindow:
    """The UTC nanosecond range [start, end) of a market-time calendar day."""

    start_ns: int
    end_ns: int

    @classmethod
    def of(cls, day: dt.date, market_tz: str) -> DayWindow:
        """The window of `day` in `market_tz`."""
        zone = ZoneInfo(market_tz)
        start = dt.datetime.combine(day, dt.time(), zone)
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
        return cls(int(start.timestamp()) * 10**9, int(end.timestamp()) * 10**9)


# ---------------------------------------------------------------------------------------
# Raw reading: bounded batches of the columns asked for, pre-filtered to one security.
# ---------------------------------------------------------------------------------------


class ByteCounter:
    """Counts the bytes a reader pulled from storage."""

    def __init__(self) -> None:
        self.bytes = 0


_FileId = tuple[str, str, int]  # storage URI, key, size
_Span = tuple[int, int]  # bytes [start, end) of a file


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
        self._footers: OrderedDict[_FileId, pq.FileMetaData] = OrderedDict()
        self._groups: OrderedDict[tuple[_FileId, int, tuple[str, ...]], pa.Table] = OrderedDict()
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

    def footer(self, file: _FileId) -> pq.FileMetaData | None:
        """The parsed footer of `file`, if kept."""
        with self._lock:
            return self._touch(self._footers, file)

    def keep_footer(self, file: _FileId, footer: pq.FileMetaData) -> None:
        """Keep `file`'s parsed footer."""
        with self._lock:
            self._keep(self._footers, file, footer, self._capacity["footers"])

    def row_group(self, file: _FileId, index: int, columns: tuple[str, ...], read: Callable[[], pa.Table]) -> pa.Table:
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


class _CountingReader(io.RawIOBase):
    """A seekable reader that counts the bytes read through it (what a job really fetched)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self._read_through = 0

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage: the inner reader's count where it keeps one (reads it
        served from a prefetched span were counted when the span was fetched)."""
        fetched = getattr(self._inner, "bytes_read", None)
        return fetched if isinstance(fetched, int) else self._read_through

    def prefetch(self, start: int, length: int) -> None:
        """Tell a reader that fetches over the network the span about to be read (else nothing)."""
        prefetch = getattr(self._inner, "prefetch", None)
        if prefetch is not None:
            prefetch(start, length)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        self._read_through += len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        # Arrow reads a Python file with `read`: the inner reader's bytes as they come, not
        # io.RawIOBase's way through a new buffer and `readinto` (two more copies of each).
        data = self._inner.read(-1 if size is None else size)
        self._read_through += len(data)
        return data

    def close(self) -> None:
        self._inner.close()
        super().close()


def _unreadable(file: InputFile, storage: Storage, exc: BaseException) -> PermanentError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return PermanentError(f"unreadable {file.format} file {storage.describe(file.key)}: {reason}")


def _missing(file: InputFile, storage: Storage, missing: list[str]) -> PermanentError:
    return PermanentError(
        f"{storage.describe(file.key)} lacks required column(s) {', '.join(missing)}"
    )


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
) -> Iterator[pa.RecordBatch]:
    """Batches of `file` holding the wanted `columns` that exist in it.

    With `security` (one code or several), only those securities' rows come out, and
    Parquet row groups whose statistics exclude them, or exclude `window`, are skipped
    without being read. Required columns that the file lacks raise `PermanentError`;
    unreadable files raise it too. A `cache` serves Parquet footers and row groups that
    an earlier call already read. With `threads`, a Parquet file's columns are decoded side by
    side on Arrow's pool of threads (for a caller with cores to spare).
    """
    wanted = _wanted(security)
    if file.format == "parquet":
        yield from _parquet_batches(storage, file, columns, wanted, window, batch_rows, counter, cache, threads)
    elif file.slices and not _slice_spans(file, wanted, window):
        return  # discovery found none of the wanted rows here
    elif file.cut:
        for span in _slice_spans(file, wanted, window):
            yield from _csv_batches(storage, file, columns, wanted, batch_rows, counter, span)
    elif file.format in ("csv", "csv.gz"):
        yield from _csv_batches(storage, file, columns, wanted, batch_rows, counter)
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
    wanted = _wanted(security)
    read = total = 0
    for file in files:
        if file.slices:
            read += sum(end - start for start, end in _slice_spans(file, wanted, window))
            total += file.slices[-1].end - file.slices[0].start
            continue
        if file.format != "parquet":
            read, total = read + file.size, total + file.size
            continue
        meta = _footer(storage, file, cache)
        schema = meta.schema.to_arrow_schema()
        groups = set(_row_groups_to_read(meta, schema, wanted, window))
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
            footer = _footer(storage, file, cache)
            units, rows = units + footer.num_row_groups, rows + footer.num_rows
        else:
            units, rows = units + max(1, len(file.slices)), rows + sum(piece.rows for piece in file.slices)
    return units, rows


@dataclass(frozen=True, slots=True)
class KeyBatch:
    """Rows' key columns, read to discover a month's jobs.

    `day` is the trade date (days since 1970-01-01) all the rows share when the file's
    statistics tell it; their ts is then not read, and `batch` holds only the security.
    """

    batch: pa.RecordBatch
    day: int | None


def key_streams(storage: Storage, file: InputFile, market_tz: str, ways: int) -> list[Iterator[KeyBatch]]:
    """`file`'s key columns as up to `ways` streams over disjoint parts of it (of Parquet, runs
    of row groups of about equal rows), each to be read on a thread of its own.

    A Parquet row group whose ts statistics put all its rows on one trade date (a month in
    time order, nearly every group) is read without its ts: decoding the securities alone
    takes about half the time. Errors are raised as `read_batches` raises them.
    """
    if file.format != "parquet":
        return [(KeyBatch(batch, None) for batch in read_batches(storage, file, KEY_COLUMNS))]
    footer = _footer(storage, file, None)
    days = _row_group_days(footer, market_tz)
    return [_key_batches(storage, file, footer, part, days) for part in _split_row_groups(footer, ways)]


def _row_group_days(meta: pq.FileMetaData, market_tz: str) -> list[int | None]:
    """Each row group's one trade date by its ts statistics (None: not known without reading
    its rows: a file with its own trade_date column, a null ts, a group over two dates)."""
    schema = meta.schema.to_arrow_schema()
    if "trade_date" in schema.names or "ts" not in schema.names:
        return [None] * meta.num_row_groups
    ts_idx = schema.get_field_index("ts")
    scale = _ts_scale(schema.field(ts_idx).type)
    days: list[int | None] = []
    for index in range(meta.num_row_groups):
        stats = meta.row_group(index).column(ts_idx).statistics
        bounds = _ts_bounds_ns(stats, scale)
        # Instants beyond nanoseconds' range (years 1677-2262) are left to the rows' reading,
        # which reports them.
        known = (bounds is not None and stats.has_null_count and stats.null_count == 0
                 and bounds[0] >= _NS_MIN and bounds[1] <= _NS_MAX)
        days.append(shared_day(np.array(bounds, dtype=np.int64), market_tz) if known else None)
    return days


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
    source = _CountingReader(storage.open_read(file.key))
    try:
        parquet = _open_parquet(storage, file, source, KEY_COLUMNS, footer)
        names = parquet.schema_arrow.names
        missing = [c for c in ("ts", "security") if c not in names]
        if missing:
            raise _missing(file, storage, missing)
        present = [c for c in KEY_COLUMNS if c in names]
        try:
            # Consecutive groups of one known day (or of none) are read together.
            for day, run in itertools.groupby(groups, key=days.__getitem__):
                columns = ["security"] if day is not None else present
                for batch in parquet.iter_batches(batch_size=DEFAULT_BATCH_ROWS, row_groups=list(run),
                                                  columns=columns, use_threads=False):
                    yield KeyBatch(batch, day)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(file, storage, exc) from None
    finally:
        source.close()


def _footer(storage: Storage, file: InputFile, cache: ParquetCache | None) -> pq.FileMetaData:
    """`file`'s parsed footer, from `cache` when it holds it (and kept there)."""
    file_id = (storage.uri, file.key, file.size)
    footer = cache.footer(file_id) if cache is not None else None
    if footer is None:
        source = _CountingReader(storage.open_read(file.key))
        try:
            footer = pq.ParquetFile(source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES).metadata
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(file, storage, exc) from None
        finally:
            source.close()
        if cache is not None:
            cache.keep_footer(file_id, footer)
    return footer


def _dbn_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    counter: ByteCounter | None,
) -> Iterator[pa.RecordBatch]:
    """DBN / zstd DBN through `shared.dbn` (which always yields every tickq column)."""
    with _counted_stream(storage, file, counter) as stream:
        try:
            compressed = file.format == "dbn.zst"
            for batch in dbn_batches(stream, compressed=compressed, batch_rows=batch_rows):
                batch = _filter_security(batch, wanted)
                if batch.num_rows:
                    yield batch.select([c for c in columns if c in DBN_COLUMNS])
        except (DbnError, OSError, EOFError) as exc:
            raise _unreadable(file, storage, exc) from None


def _wanted(security: str | Collection[str] | None) -> tuple[str, ...] | None:
    """The wanted securities, sorted (None: all of them)."""
    if security is None:
        return None
    return (security,) if isinstance(security, str) else tuple(sorted(set(security)))


@functools.lru_cache(maxsize=4)
def _value_set(wanted: tuple[str, ...]) -> pa.Array:
    """`wanted` as an array, made once per read (a few hundred strings take most of a
    millisecond, once per batch otherwise)."""
    return pa.array(wanted, pa.string())


def _filter_security(batch: pa.RecordBatch, wanted: tuple[str, ...] | None) -> pa.RecordBatch:
    if wanted is None or batch.num_rows == 0:
        return batch
    column = batch.column("security")

    def wanted_ones(values: pa.Array) -> pa.Array:
        text = values if pa.types.is_string(values.type) else values.cast(pa.string())
        return pc.equal(text, wanted[0]) if len(wanted) == 1 else pc.is_in(text, value_set=_value_set(wanted))

    if pa.types.is_dictionary(column.type):
        per_value = wanted_ones(column.dictionary)
        if column.null_count == 0 and pc.all(per_value).as_py():
            # Every value is wanted (a pass over a whole month in time order): no row to drop,
            # and no per-row mask to build.
            return batch
        match = label_mask(column, lambda _dictionary: per_value)
    else:
        match = pc.fill_null(wanted_ones(column), False).to_numpy(zero_copy_only=False)
    return batch if match.all() else batch.filter(pa.array(match))


def _parquet_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    window: DayWindow | None,
    batch_rows: int,
    counter: ByteCounter | None,
    cache: ParquetCache | None,
    threads: bool = False,
) -> Iterator[pa.RecordBatch]:
    source = _CountingReader(storage.open_read(file.key))
    file_id = (storage.uri, file.key, file.size)
    try:
        parquet = _open_parquet(storage, file, source, columns, cache.footer(file_id) if cache else None)
        if cache is not None:
            cache.keep_footer(file_id, parquet.metadata)
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c in columns and c not in names]
        if missing:
            raise _missing(file, storage, missing)
        present = [c for c in columns if c in names]
        groups = _row_groups_to_read(parquet.metadata, parquet.schema_arrow, wanted, window)
        try:
            for batch in _row_group_batches(parquet, source, groups, present, batch_rows, file_id, cache,
                                            threads):
                batch = _filter_security(batch, wanted)
                if batch.num_rows:
                    yield batch
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(file, storage, exc) from None
    finally:
        if counter is not None:
            counter.bytes += source.bytes_read
        source.close()


def _open_parquet(
    storage: Storage, file: InputFile, source: _CountingReader, columns: tuple[str, ...], footer: pq.FileMetaData | None
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
        raise _unreadable(file, storage, exc) from None


def _row_group_batches(
    parquet: pq.ParquetFile,
    source: _CountingReader,
    groups: list[int],
    columns: list[str],
    batch_rows: int,
    file_id: _FileId,
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


def _read_row_group(parquet: pq.ParquetFile, source: _CountingReader, index: int, columns: list[str],
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


def _row_groups_to_read(
    meta: pq.FileMetaData, schema: pa.Schema, wanted: tuple[str, ...] | None, window: DayWindow | None
) -> list[int]:
    """Row groups whose statistics may hold rows of the `wanted` securities within `window`
    (`schema`: the file's, as read, text columns possibly as dictionaries)."""
    sec_idx = schema.get_field_index("security") if wanted is not None else -1
    # A file that carries its own trade_date may assign rows to days their ts does not
    # suggest, so ts statistics can only prune when the date is derived from ts.
    derives_date = "trade_date" not in schema.names
    ts_idx = schema.get_field_index("ts") if window is not None and derives_date else -1
    ts_scale = _ts_scale(schema.field(ts_idx).type) if ts_idx >= 0 else 0
    keep: list[int] = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if sec_idx >= 0 and _is_text(schema.field(sec_idx).type):
            bounds = _stat_range(group.column(sec_idx).statistics)
            if bounds is not None:
                low, high = (b.decode() if isinstance(b, bytes) else b for b in bounds)
                # Any wanted security within [low, high]? (`wanted` is sorted.)
                first = bisect.bisect_left(wanted, low) if wanted is not None else 0
                if wanted is not None and (first == len(wanted) or wanted[first] > high):
                    continue
        if ts_scale and window is not None:
            bounds = _ts_bounds_ns(group.column(ts_idx).statistics, ts_scale)
            if bounds is not None and (bounds[1] < window.start_ns or bounds[0] >= window.end_ns):
                continue
        keep.append(i)
    return keep


def _ts_scale(kind: pa.DataType) -> int:
    """Nanoseconds per unit of a timestamp type's stored values; 0 for any other type."""
    if not pa.types.is_timestamp(kind):
        return 0
    return {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[kind.unit]


def _ts_bounds_ns(stats: Any, scale: int) -> tuple[int, int] | None:
    """The [min, max] instant (UTC ns) of a ts column chunk by its statistics, when they hold
    it (`scale`: `_ts_scale` of the column's type)."""
    if not scale or stats is None or not stats.has_min_max or stats.physical_type != "INT64":
        return None
    return stats.min_raw * scale, stats.max_raw * scale


def _open_stream(storage: Storage, file: InputFile) -> IO[bytes]:
    raw = storage.open_read(file.key)
    if isinstance(raw, io.RawIOBase):
        return io.BufferedReader(raw, buffer_size=CSV_BLOCK_BYTES)
    return raw


@contextlib.contextmanager
def _counted_stream(
    storage: Storage, file: InputFile, counter: ByteCounter | None, span: _Span | None = None
) -> Iterator[IO[bytes]]:
    """A streamed input file, closed after use, its bytes added to `counter`.

    An uncompressed file counts what was read (of a `span`, from its start on); a compressed
    one its whole size (the decompressor reads ahead, so the position says little).
    """
    stream = _open_stream(storage, file)
    try:
        yield stream
    finally:
        if counter is not None:
            start = span[0] if span is not None else 0
            counter.bytes += max(0, stream.tell() - start) if file.format in ("csv", "dbn") else file.size
        stream.close()


class _Borrowed(io.RawIOBase):
    """A stream lent to an Arrow reader: closing this view leaves the stream open.

    Arrow closes the Python file it reads when it drops the reader, which may be before
    the stream's owner is done with it (after a fallback, the position is still counted).
    """

    def __init__(self, inner: IO[bytes], end: int | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._end = end  # no byte at or past this offset is read (a slice of a CSV file)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def read(self, size: int = -1) -> bytes:
        # Arrow asks for whole blocks through read(); no copy through readinto.
        if self._end is not None:
            left = max(0, self._end - self._inner.tell())
            size = left if size is None or size < 0 else min(size, left)
        return self._inner.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)


# Columns that Arrow's CSV reader can convert itself when their text is clean, in the order
# tried. Arrow's CSV converters take a subset of the text `normalise` takes, with the same
# values (tests/test_inputs_csv.py checks this), and fail the whole block on anything else;
# the read then goes on as text, so a bad value still rejects only its own row.
_CSV_TYPES: dict[str, tuple[pa.DataType, ...]] = {
    "ts": (TS_UTC, pa.timestamp("ns")),
    "price": (pa.float64(),),
    "size": (pa.int64(),),
}
# What the header probe parses: enough for the header and a sample of rows.
CSV_PROBE_BYTES = 64 << 10


@dataclass(frozen=True)
class _CsvHeader:
    """A CSV file's column names and its first rows (the wanted columns as text)."""

    names: list[str]
    sample: pa.Table


class _CsvFallback(Exception):
    """The typed read stopped at something only the text read handles, after `rows` rows."""

    def __init__(self, rows: int) -> None:
        super().__init__(rows)
        self.rows = rows


def _csv_source(stream: IO[bytes], file: InputFile, span: _Span | None = None) -> Any:
    """What Arrow reads `stream` through (up to the end of `span`, when given); closing it
    leaves `stream` to its owner."""
    source = pa.PythonFile(_Borrowed(stream, span[1] if span is not None else None), mode="r")
    return pa.CompressedInputStream(source, "gzip") if file.format == "csv.gz" else source


def _csv_convert(
    types: dict[str, pa.DataType], include: list[str], include_missing: bool
) -> pacsv.ConvertOptions:
    # An empty field is null in every column; a quoted empty string is text, not null.
    return pacsv.ConvertOptions(
        column_types=types,
        include_columns=include,
        include_missing_columns=include_missing,
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )


def _open_csv(source: Any, convert: pacsv.ConvertOptions, block_bytes: int, names: list[str] | None = None) -> Any:
    # Conversion on the calling thread (Arrow's IO thread still reads ahead): workers already
    # run a job per core, and conversion threads cost CPU in hand-offs without shortening a
    # streamed read of one file. A slice of a file has no header: its `names` are given.
    return pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(block_size=block_bytes, use_threads=False, column_names=names),
        convert_options=convert,
    )


def _csv_header(stream: IO[bytes], file: InputFile, columns: tuple[str, ...]) -> _CsvHeader | None:
    """The header and first rows of a CSV file, from its first bytes; the stream is rewound.

    None when they cannot be parsed (an empty or corrupt file): the text read then meets
    the same trouble and reports it. A header longer than the probe gets a second try
    with the block size of the real read.
    """
    as_text = _csv_convert({c: pa.string() for c in columns}, [], include_missing=False)
    for size in (CSV_PROBE_BYTES, CSV_BLOCK_BYTES):
        text = _csv_prefix(stream, file, size)
        if text is None:
            continue
        try:
            # Parsed from memory: a reader on the stream itself would read ahead from it
            # in the background, racing the real read.
            sample = pacsv.read_csv(
                pa.BufferReader(text),
                read_options=pacsv.ReadOptions(block_size=size, use_threads=False),
                convert_options=as_text,
            )
        except (pa.ArrowException, OSError, EOFError):
            return None
        return _CsvHeader(sample.schema.names, sample)
    return None


def _csv_prefix(stream: IO[bytes], file: InputFile, size: int) -> bytes | None:
    """The file's first `size` bytes of text, cut after the last whole line in them; the
    stream is rewound. None when they hold no whole line or do not decompress."""
    start = stream.tell()
    try:
        raw = stream.read(size)
    finally:
        stream.seek(start)
    whole = len(raw) < size
    if file.format == "csv.gz":
        text = b""
        try:
            while raw and len(text) < size:  # member after member (bgzip writes many)
                member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                text += member.decompress(raw, size - len(text))
                if not member.eof:
                    break
                raw = member.unused_data
        except zlib.error:
            return None
        whole = whole and not raw
        raw = text[:size]
    if whole:
        return raw
    end = max(raw.rfind(b"\n"), raw.rfind(b"\r"))
    return raw[: end + 1] if end >= 0 else None


def csv_slices(storage: Storage, file: InputFile) -> list[FileSlice]:
    """Where to cut an uncompressed CSV file into slices of whole lines of about
    `CSV_SLICE_BYTES`, the first starting after the header (nothing counted yet); none for a
    file smaller than two slices, another format, or lines too long to find an end of.

    Lines end at a line feed, a carriage return, or both, as for Arrow's reader, which does
    not take line breaks inside quoted values either (its `newlines_in_values` is off).
    """
    slice_bytes = CSV_SLICE_BYTES
    if file.format != "csv" or file.size < 2 * slice_bytes:
        return []
    try:
        with storage.open_read(file.key) as stream:
            header_end = _line_end(stream, 0)
            stream.seek(0)
            if header_end is None or not stream.read(header_end).strip():
                return []  # the header is not the first line: the file is read whole
            cuts = [header_end]
            for target in range(slice_bytes, file.size, slice_bytes):
                cut = _line_end(stream, target - 1) if target > cuts[-1] else None
                if cut is not None and cut < file.size:
                    cuts.append(cut)
    except OSError as exc:
        raise _unreadable(file, storage, exc) from None
    if len(cuts) < 2:
        return []
    return [FileSlice(start, end) for start, end in itertools.pairwise([*cuts, file.size])]


def _line_end(stream: IO[bytes], at: int) -> int | None:
    """The offset just past the first line break at or after offset `at` (CR LF counts as
    one), or None when none is within `CSV_LINE_SEARCH_BYTES` or before the end."""
    stream.seek(at)
    offset = at
    while offset - at < CSV_LINE_SEARCH_BYTES:
        chunk = stream.read(64 << 10)
        if not chunk:
            return None
        breaks = [i for i in (chunk.find(b"\n"), chunk.find(b"\r")) if i >= 0]
        if breaks:
            i = min(breaks)
            end = offset + i + 1
            if chunk[i:i + 1] == b"\r":
                after = chunk[i + 1:i + 2]
                if not after:
                    stream.seek(end)
                    after = stream.read(1)
                end += after == b"\n"
            return end
        offset += len(chunk)
    return None


# Version 2 added the whole-file slices of files other than cut CSV, which workers of version 1
# would take for CSV slices: they find the version unknown and read those files whole.
SLICES_VERSION = 2
_SLICES_VERSIONS_READ = (1, 2)


def whole_file_slice(file: InputFile) -> FileSlice:
    """The one slice of a file read whole (not Parquet, not cut), before discovery sees it."""
    return FileSlice(0, file.size)


def sliced_files_json(files: list[InputFile]) -> bytes:
    """The slices of input files as a run stores them for its workers: ``{"v": 2, "files":
    [{"key", "size", "version", "slices": [FileSlice.as_json(), …]}, …]}``."""
    return orjson.dumps({"v": SLICES_VERSION, "files": [
        {"key": f.key, "size": f.size, "version": f.version, "slices": [piece.as_json() for piece in f.slices]}
        for f in files]})


def with_stored_slices(files: list[InputFile], stored: bytes) -> list[InputFile]:
    """`files` with the slices `stored` for them (`sliced_files_json`): only where key, size
    and version (where both the record and the listing give one) still match. A file written
    again since is read whole: a pass must not skip it by what it held before. `PermanentError`
    when `stored` does not parse."""
    try:
        data = orjson.loads(stored)
        if data.get("v") not in _SLICES_VERSIONS_READ:
            raise ValueError(f"version {data.get('v')!r}")
        recorded = {(f["key"], int(f["size"])): (str(f.get("version", "")),
                                                 tuple(FileSlice.from_json(p) for p in f["slices"]))
                    for f in data["files"]}
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PermanentError(f"the run's slices of input files do not parse ({exc})") from None

    def slices_of(file: InputFile) -> tuple[FileSlice, ...]:
        version, slices = recorded.get((file.key, file.size), ("", ()))
        return () if version and file.version and version != file.version else slices

    return [dataclasses.replace(f, slices=slices_of(f)) for f in files]


def _slice_spans(file: InputFile, wanted: tuple[str, ...] | None, window: DayWindow | None) -> list[_Span]:
    """The bytes of `file`'s slices that may hold rows of the `wanted` securities within
    `window`, adjacent slices joined into one span."""
    spans: list[_Span] = []
    for piece in file.slices:
        if not piece.may_hold(wanted, window):
            continue
        if spans and spans[-1][1] == piece.start:
            spans[-1] = (spans[-1][0], piece.end)
        else:
            spans.append((piece.start, piece.end))
    return spans


def _seek_span(stream: IO[bytes], file: InputFile, storage: Storage, span: _Span) -> None:
    """Position `stream` at the start of `span`, checking that lines start and end there (the
    file's end ends a line)."""
    for edge in (span[0], span[1]) if span[1] < file.size else (span[0],):
        stream.seek(edge - 1)
        if stream.read(1) not in (b"\n", b"\r"):
            raise _changed(file, storage)
    stream.seek(span[0])


def _changed(file: InputFile, storage: Storage) -> PermanentError:
    return PermanentError(
        f"{storage.describe(file.key)} changed since the run found its jobs (its slices no longer fall on "
        "line ends): run `tickq produce` again for the new input"
    )


class SliceSeen:
    """What discovery sees of the rows of a slice (`FileSlice`), batch by batch: how many, and
    the range of their ts and of their security codes."""

    def __init__(self, piece: FileSlice) -> None:
        self._piece = piece
        self._rows = 0
        self._ts: tuple[int, int] | None = None
        self._ts_decides = True
        self._security: tuple[str, str] | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        """Take a batch of the slice's key columns (ts, security, and trade_date where present)."""
        self._rows += batch.num_rows
        if _column(batch, "trade_date") is not None:
            self._ts_decides = False  # a row's own trade date, not its ts, places it in a day
        else:
            self._ts = _widened(self._ts, pc.min_max(_normalise_ts(batch.column("ts")).cast(pa.int64())))
        security = batch.column("security")
        if pa.types.is_dictionary(security.type):
            security = security.dictionary  # a few more values than the rows hold, at most
        if pa.types.is_string(security.type) or pa.types.is_large_string(security.type):
            self._security = _widened(self._security, pc.min_max(security))

    def seen(self) -> FileSlice:
        """The slice with what its rows hold."""
        return FileSlice(self._piece.start, self._piece.end, self._rows, self._ts if self._ts_decides else None,
                        self._security)


def _widened(bounds: tuple[Any, Any] | None, more: pa.StructScalar) -> tuple[Any, Any] | None:
    """`bounds` widened by the `min_max` of more values (nulls only: unchanged)."""
    low, high = more["min"].as_py(), more["max"].as_py()
    if low is None:
        return bounds
    return (low, high) if bounds is None else (min(bounds[0], low), max(bounds[1], high))


def _csv_types(header: _CsvHeader, present: list[str]) -> dict[str, pa.DataType]:
    """The type to read each present column as: typed where the sample rows convert."""
    types: dict[str, pa.DataType] = {}
    for name in present:
        # Text columns come as labels straight from the reader (normalise encodes them anyway).
        types[name] = LABEL if name in LABEL_COLUMNS else pa.string()
        for kind in _CSV_TYPES.get(name, ()):
            if header.sample.num_rows == 0 or _converts(header.sample.column(name), kind):
                types[name] = kind
                break
    return types


def _converts(text: pa.ChunkedArray, kind: pa.DataType) -> bool:
    """Whether the CSV reader should take `text` as `kind` (a guess: a wrong one costs a
    second read of the file's start, never a different result)."""
    if not pa.types.is_timestamp(kind):
        text = pc.utf8_trim_whitespace(text)  # as the CSV number converters do
    try:
        pc.cast(text, kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _csv_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    counter: ByteCounter | None,
    span: _Span | None = None,
) -> Iterator[pa.RecordBatch]:
    """CSV, converted by Arrow's reader where the text allows, else as text; with a `span`
    (whole lines of the file, `FileSlice`), only the rows in it.

    The header comes first, from a probe of the file's start: a missing required column
    is a permanent error, columns the file lacks are left out. The typed read is the fast
    path; at the first value it cannot convert (or any other trouble) the file is read
    again as text from the row the typed read had reached, so every row comes out once,
    malformed values reject only their rows, and errors are the text read's, as before.
    """
    names: list[str] | None = None
    with _counted_stream(storage, file, counter, span) as stream:
        header = _csv_header(stream, file, columns)
        present: list[str] | None = None
        types: dict[str, pa.DataType] = {}
        # A header with repeated names is left to the text read, which reads it as it always did.
        if header is not None and len(set(header.names)) == len(header.names):
            missing = [c for c in REQUIRED_COLUMNS if c in columns and c not in header.names]
            if missing:
                raise _missing(file, storage, missing)
            present = [c for c in columns if c in header.names]
            types = _csv_types(header, present)
        if span is not None:
            if header is None or present is None:  # discovery cut it with a header it could read
                raise _changed(file, storage)
            names = header.names
            _seek_span(stream, file, storage, span)
        if present is None or all(t in (pa.string(), LABEL) for t in types.values()):
            yield from _csv_text(storage, file, stream, columns, present, wanted, batch_rows, 0, span, names)
            return
        try:
            yield from _csv_typed(stream, file, types, wanted, batch_rows, span, names)
            return
        except _CsvFallback as fallback:
            done = fallback.rows
    with _counted_stream(storage, file, counter, span) as stream:
        if span is not None:
            _seek_span(stream, file, storage, span)
        yield from _csv_text(storage, file, stream, columns, present, wanted, batch_rows, done, span, names)


def _csv_typed(
    stream: IO[bytes],
    file: InputFile,
    types: dict[str, pa.DataType],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    span: _Span | None = None,
    names: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The columns of `types`, converted by the reader; `_CsvFallback` when it cannot go on."""
    rows = 0
    joined = _Coalescer(batch_rows)
    try:
        convert = _csv_convert(types, list(types), include_missing=False)
        reader = _open_csv(_csv_source(stream, file, span), convert, CSV_BLOCK_BYTES, names)
        for batch in reader:
            rows += batch.num_rows
            yield from joined.add(_filter_security(batch, wanted))
    except (pa.ArrowException, OSError, EOFError):
        # Every row counted is handed out before the fallback, which goes on after them: it
        # repeats no row and loses none.
        yield from joined.flush()
        raise _CsvFallback(rows) from None
    yield from joined.flush()


class _Coalescer:
    """Joins small record batches into batches of up to `batch_rows` rows."""

    def __init__(self, batch_rows: int) -> None:
        self._batch_rows = batch_rows
        self._parts: list[pa.RecordBatch] = []
        self._rows = 0

    def add(self, batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
        """Take `batch`; hand out full batches."""
        if batch.num_rows:
            self._parts.append(batch)
            self._rows += batch.num_rows
        if self._rows >= self._batch_rows:
            yield from self.flush()

    def flush(self) -> Iterator[pa.RecordBatch]:
        """Hand out every row taken."""
        parts, self._parts, self._rows = self._parts, [], 0
        if len(parts) == 1:
            whole = parts[0]
        elif parts:  # differing dictionaries of label columns are unified
            whole = pa.Table.from_batches(parts).combine_chunks().to_batches()[0]
        else:
            return
        for offset in range(0, whole.num_rows, self._batch_rows):
            yield whole.slice(offset, self._batch_rows)


def _csv_text(
    storage: Storage,
    file: InputFile,
    stream: IO[bytes],
    columns: tuple[str, ...],
    present: list[str] | None,
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    skip: int,
    span: _Span | None = None,
    names: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The `present` columns as text, from data row `skip` on (rows before it were yielded),
    of the whole file or of its `span` (whose column `names` are given).

    `present` None (header unknown): every wanted column, a lacking one as nulls. Text is
    parsed by `normalise`, so a malformed value rejects its row instead of failing the file.
    """
    include = list(columns) if present is None else present
    convert = _csv_convert({c: pa.string() for c in include}, include, include_missing=present is None)
    try:
        reader = _open_csv(_csv_source(stream, file, span), convert, CSV_BLOCK_BYTES, names)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc) and span is not None:
            return  # a slice of blank lines
        if "Empty CSV file" in str(exc):
            raise PermanentError(f"{storage.describe(file.key)} is empty (no header)") from None
        raise _unreadable(file, storage, exc) from None
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise _unreadable(file, storage, exc) from None
    joined = _Coalescer(batch_rows)
    try:
        for batch in reader:
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch, skip = batch.slice(skip), 0
            yield from joined.add(_filter_security(batch, wanted))
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise _unreadable(file, storage, exc) from None
    yield from joined.flush()
    if skip:
        raise PermanentError(f"{storage.describe(file.key)} changed while being read")


# ---------------------------------------------------------------------------------------
# Normalisation: one schema, derived trade_date and hour, rejected rows marked.
# ---------------------------------------------------------------------------------------

_ISO_WITH_OFFSET = r"(Z|z|[+-]\d\d(:?\d\d)?)$"
_INTEGER_TEXT = r"^\s*[+-]?\d+\s*$"


def _cast_or_null(values: pa.Array, target: pa.DataType) -> pa.Array:
    """Cast `values`; elements that cannot be cast become null (the row is rejected later)."""
    try:
        return pc.cast(values, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    # Rare path (malformed input): cast element by element and keep what parses.
    out = []
    for value in values:
        try:
            out.append(pc.cast(pa.array([value.as_py()], values.type), target)[0].as_py())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
            out.append(None)
    return pa.array(out, target)


def _cast_clean(text: pa.Array, target: pa.DataType) -> pa.Array | None:
    """`text` cast to `target` when every value parses as it stands, else None.

    Arrow's parsers reject surrounding whitespace, so where this succeeds, trimming first
    would have given the same values: clean text (the usual case) skips the trim.
    """
    try:
        return pc.cast(text, target)
    except pa.ArrowInvalid:
        return None


def _parse_ts_text(values: pa.Array) -> pa.Array:
    """ISO-8601 text (with or without offset; naive = UTC) or integer nanoseconds."""
    clean = _cast_clean(values, TS_UTC)
    if clean is not None:
        return clean
    values = pc.utf8_trim_whitespace(values)
    try:
        return pc.cast(values, TS_UTC)
    except pa.ArrowInvalid:
        pass
    try:
        return pc.cast(pc.cast(values, pa.timestamp("ns")), TS_UTC)
    except pa.ArrowInvalid:
        pass
    # All integers: Arrow's integer parser takes [-]digits, which the rule below takes with
    # the same value, and hexadecimal, which the rule below rejects (hence the "x" check).
    if not pc.any(pc.match_substring(values, "x", ignore_case=True)).as_py():
        try:
            return pc.cast(values, pa.int64()).view(TS_UTC)
        except pa.ArrowInvalid:
            pass
    is_int = pc.fill_null(pc.match_substring_regex(values, _INTEGER_TEXT), False)
    has_offset = pc.fill_null(pc.match_substring_regex(values, _ISO_WITH_OFFSET), False)
    null_text = pa.nulls(len(values), pa.string())
    as_int = _cast_or_null(pc.if_else(is_int, values, null_text), pa.int64()).view(TS_UTC)
    plain = pc.and_(pc.invert(is_int), pc.invert(has_offset))
    with_offset = _cast_or_null(pc.if_else(has_offset, values, null_text), TS_UTC)
    naive = _cast_or_null(pc.if_else(plain, values, null_text), pa.timestamp("ns")).cast(TS_UTC)
    return pc.if_else(is_int, as_int, pc.if_else(has_offset, with_offset, naive))


def _normalise_ts(values: pa.Array) -> pa.Array:
    kind = values.type
    if pa.types.is_timestamp(kind):
        # Naive timestamps are UTC by contract; aware ones are stored as UTC instants.
        try:
            return pc.cast(values, pa.timestamp("ns", tz=kind.tz or "UTC")).cast(TS_UTC)
        except pa.ArrowInvalid:
            raise PermanentError(
                f"column ts has instants outside the years 1677-2262 (type {kind}), which tickq cannot represent"
            ) from None
    if pa.types.is_integer(kind):
        return pc.cast(values, pa.int64()).view(TS_UTC)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _parse_ts_text(values.cast(pa.string()))
    if pa.types.is_dictionary(kind):
        return _normalise_ts(values.dictionary_decode())
    if pa.types.is_date(kind):
        return pc.cast(pc.cast(values, pa.timestamp("ns")), TS_UTC)
    raise PermanentError(f"column ts has unsupported type {kind}")


def _normalise_text(values: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.string())
    return _cast_or_null(values, pa.string())


def _normalise_price(values: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
        clean = _cast_clean(values, pa.float64())
        if clean is not None:
            return clean
        values = pc.utf8_trim_whitespace(values)
    return _cast_or_null(values, pa.float64())


def _normalise_size(values: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    kind = values.type
    if pa.types.is_integer(kind):
        return _cast_or_null(values, pa.int64())
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        as_float = pc.cast(values, pa.float64())
        integral = pc.and_(pc.equal(pc.floor(as_float), as_float), pc.less(pc.abs(as_float), 2.0**62))
        kept = pc.if_else(pc.fill_null(integral, False), as_float, pa.scalar(None, pa.float64()))
        return pc.cast(kept, pa.int64(), safe=False)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = values.cast(pa.string())
        clean = _cast_clean(text, pa.int64())
        if clean is not None:
            return clean
        text = pc.utf8_trim_whitespace(text)
        try:
            return pc.cast(text, pa.int64())
        except pa.ArrowInvalid:
            # "100.0" is an integer size written as a float; "1.5" and "abc" are not sizes.
            return _normalise_size(_cast_or_null(text, pa.float64()))
    return pa.nulls(len(values), pa.int64())


_BUY = pa.array(["B", "BUY"])
_SELL = pa.array(["S", "SELL", "A"])


_CANONICAL_SIDES = pa.array(["B", "S", None], pa.string())


def _normalise_side(values: pa.Array) -> pa.Array:
    text = _normalise_text(values)
    # Many feeds write B and S already, which map to themselves: nothing to do.
    if pc.all(pc.is_in(text, value_set=_CANONICAL_SIDES)).as_py() is not False:
        return text
    # Otherwise a side column still holds a handful of spellings: map each distinct one
    # once and look every row up, rather than upper-casing and matching every row.
    encoded = pc.dictionary_encode(text)
    return pc.take(_side_of(encoded.dictionary), encoded.indices)


def _side_of(values: pa.Array) -> pa.Array:
    """B or S for each spelling of a side (any case, surrounding blanks), else null."""
    text = pc.utf8_upper(pc.utf8_trim_whitespace(values))
    null = pa.scalar(None, pa.string())
    return pc.if_else(
        pc.is_in(text, value_set=_BUY),
        pa.scalar("B"),
        pc.if_else(pc.is_in(text, value_set=_SELL), pa.scalar("S"), null),
    )


def _normalise_trade_date(values: pa.Array) -> pa.Array:
    kind = values.type
    if pa.types.is_dictionary(kind):
        return _normalise_trade_date(values.dictionary_decode())
    if pa.types.is_date32(kind):
        return values
    if pa.types.is_date(kind) or pa.types.is_timestamp(kind):
        return pc.cast(values, pa.date32())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = pc.utf8_trim_whitespace(values.cast(pa.string()))
        return _cast_or_null(text, pa.date32())
    return pa.nulls(len(values), pa.date32())


def job_dates(ts: pa.Array, given: pa.Array | None, market_tz: str) -> pa.Array:
    """Each row's trade date as a job sees it: the row's own `given` trade date where it has
    one, else the market date of its UTC `ts` in `market_tz` (null: the row is of no day)."""
    return _job_date(given, local_time(ts, market_tz).trade_date)


def _job_date(given: pa.Array | None, derived: pa.Array) -> pa.Array:
    return derived if given is None else pc.coalesce(_normalise_trade_date(given), derived)


def _column(batch: pa.RecordBatch, name: str) -> pa.Array | None:
    index = batch.schema.get_field_index(name)
    return batch.column(index) if index >= 0 else None


def normalise(batch: pa.RecordBatch, market_tz: str) -> tuple[pa.Table, pa.Array]:
    """`batch` in `NORMALISED_SCHEMA` and a boolean mask of the rows the contract accepts.

    A row is rejected when a required value is null or unparseable, its security is empty,
    its price is not finite or <= 0, or its size is not an integer > 0.
    """
    n = batch.num_rows
    ts = _normalise_ts(batch.column("ts"))
    security = _labels(batch.column("security"), _normalise_text)
    price = _normalise_price(batch.column("price"))
    size = _normalise_size(batch.column("size"))
    side, participant, venue = (
        _labels(raw, _normalise_side if name == "side" else _normalise_text) if raw is not None else _no_labels(n)
        for name, raw in (("side", _column(batch, "side")), ("participant", _column(batch, "participant")),
                          ("venue", _column(batch, "venue")))
    )
    local = local_time(ts, market_tz)
    trade_date = _job_date(_column(batch, "trade_date"), local.trade_date)
    named = label_mask(security, lambda values: pc.greater(pc.utf8_length(values), 0))
    valid = pc.and_(
        pc.and_(pc.is_valid(ts), pa.array(named)),
        pc.and_(
            pc.and_(pc.is_finite(price), pc.greater(price, 0.0)),
            pc.greater(size, 0),
        ),
    )
    table = pa.Table.from_arrays(
        [ts, security, price, size, side, participant, venue, trade_date, local.hour, local.minute_of_day],
        schema=NORMALISED_SCHEMA,
    )
    return table, pc.fill_null(valid, False)


def _labels(values: pa.Array, normalise_values: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """A text column as labels (`LABEL`): each distinct value normalised once.

    The dictionary holds distinct, non-null values; a value that normalises to null makes
    its rows null.
    """
    if pa.types.is_null(values.type):
        return _no_labels(len(values))
    encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
    normalised = normalise_values(encoded.dictionary)
    clean = normalised.null_count == 0 and normalised.equals(encoded.dictionary)
    if clean and pc.count_distinct(normalised).as_py() == len(normalised):  # already distinct and normalised
        return pa.DictionaryArray.from_arrays(encoded.indices.cast(pa.int32()), normalised)
    distinct = pc.dictionary_encode(normalised)
    indices = pc.take(distinct.indices, encoded.indices)
    return pa.DictionaryArray.from_arrays(indices.cast(pa.int32()), distinct.dictionary.cast(pa.string()))


def _no_labels(n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.nulls(n, pa.int32()), pa.array([], pa.string()))


def label_codes(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """Each row's index into a dictionary column's values (-1 for null), and the values.

    `lookup[codes]` then maps every row through a per-value `lookup` array with one extra,
    last, entry for null.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.unify_dictionaries().combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    indices = column.indices
    codes = (indices.fill_null(-1) if indices.null_count else indices).to_numpy().astype(np.int64, copy=False)
    return codes, column.dictionary


def label_mask(column: pa.Array | pa.ChunkedArray, predicate: Callable[[pa.Array], pa.Array]) -> np.ndarray:
    """`predicate` of each row's label, evaluated once per distinct value (null rows: False)."""
    codes, values = label_codes(column)
    per_value = pc.fill_null(predicate(values), False).to_numpy(zero_copy_only=False)
    mask: np.ndarray = np.append(per_value, False)[codes]
    return mask


def shared_trade_date(batch: pa.RecordBatch, market_tz: str) -> int | None:
    """The trade date (days since 1970-01-01) of every row of `batch`, when they all have the
    same one from their ts (no ``trade_date`` column, no null ts); else None.

    A month in time order has one date per batch, nearly always: this costs a min and a max
    where `trade_dates` converts every row.
    """
    if batch.num_rows == 0 or _column(batch, "trade_date") is not None:
        return None
    ts = _normalise_ts(batch.column("ts"))
    if ts.null_count:
        return None
    return shared_day(ts.cast(pa.int64()).to_numpy(), market_tz)


def trade_dates(batch: pa.RecordBatch, market_tz: str) -> pa.Array:
    """Each row's trade date: the file's ``trade_date`` where given, else ts in market time.

    Used by discovery, which reads only the key columns.
    """
    ts = _normalise_ts(batch.column("ts"))
    derived = local_time(ts, market_tz).trade_date
    given = _column(batch, "trade_date")
    return pc.coalesce(_normalise_trade_date(given), derived) if given is not None else derived
