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
import datetime as dt
import io
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import IO, Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared.dbn import DBN_COLUMNS, DbnError, dbn_batches
from shared.errors import PermanentError
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
DEFAULT_BATCH_ROWS = 65_536
# Small read buffer for streamed Parquet: bounded memory whatever the row-group size.
PARQUET_BUFFER_BYTES = 1 << 20
CSV_BLOCK_BYTES = 4 << 20

NORMALISED_SCHEMA = pa.schema(
    [
        ("ts", TS_UTC),
        ("security", pa.string()),
        ("price", pa.float64()),
        ("size", pa.int64()),
        ("side", pa.string()),
        ("participant", pa.string()),
        ("venue", pa.string()),
        ("trade_date", pa.date32()),
        ("hour", pa.int64()),
        ("minute_of_day", pa.int64()),
    ]
)


@dataclass(frozen=True)
class InputFile:
    """One input file of a month."""

    key: str
    size: int
    format: str


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
            files.append(InputFile(obj.key, obj.size, fmt))
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


class _CountingReader(io.RawIOBase):
    """A seekable reader that counts the bytes read through it (what a job really fetched)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self.bytes_read = 0

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
        self.bytes_read += len(data)
        return len(data)

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
) -> Iterator[pa.RecordBatch]:
    """Batches of `file` holding the wanted `columns` that exist in it.

    With `security` (one code or several), only those securities' rows come out, and
    Parquet row groups whose statistics exclude them, or exclude `window`, are skipped
    without being read. Required columns that the file lacks raise `PermanentError`;
    unreadable files raise it too.
    """
    wanted = _wanted(security)
    if file.format == "parquet":
        yield from _parquet_batches(storage, file, columns, wanted, window, batch_rows, counter)
    elif file.format in ("csv", "csv.gz"):
        yield from _csv_batches(storage, file, columns, wanted, batch_rows, counter)
    elif file.format in ("dbn", "dbn.zst"):
        yield from _dbn_batches(storage, file, columns, wanted, batch_rows, counter)
    else:
        raise PermanentError(
            f"{storage.describe(file.key)}: {file.format} input is not supported by this "
            "version; convert it with `tickq ingest`"
        )


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


def _filter_security(batch: pa.RecordBatch, wanted: tuple[str, ...] | None) -> pa.RecordBatch:
    if wanted is None or batch.num_rows == 0:
        return batch
    column = batch.column("security")
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    match = pc.equal(column, wanted[0]) if len(wanted) == 1 else pc.is_in(column, value_set=pa.array(wanted))
    return batch.filter(pc.fill_null(match, False))


def _parquet_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    window: DayWindow | None,
    batch_rows: int,
    counter: ByteCounter | None,
) -> Iterator[pa.RecordBatch]:
    source = _CountingReader(storage.open_read(file.key))
    try:
        try:
            parquet = pq.ParquetFile(
                source, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES
            )
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(file, storage, exc) from None
        names = parquet.schema_arrow.names
        missing = [c for c in REQUIRED_COLUMNS if c in columns and c not in names]
        if missing:
            raise _missing(file, storage, missing)
        present = [c for c in columns if c in names]
        groups = _row_groups_to_read(parquet, wanted, window)
        if not groups:
            return
        try:
            for batch in parquet.iter_batches(
                batch_size=batch_rows, row_groups=groups, columns=present, use_threads=False
            ):
                batch = _filter_security(batch, wanted)
                if batch.num_rows:
                    yield batch
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(file, storage, exc) from None
    finally:
        if counter is not None:
            counter.bytes += source.bytes_read
        source.close()


def _stat_range(stats: Any) -> tuple[Any, Any] | None:
    if stats is None or not stats.has_min_max:
        return None
    return stats.min, stats.max


def _row_groups_to_read(
    parquet: pq.ParquetFile, wanted: tuple[str, ...] | None, window: DayWindow | None
) -> list[int]:
    """Row groups whose statistics may hold rows of the `wanted` securities within `window`."""
    meta = parquet.metadata
    schema = parquet.schema_arrow
    sec_idx = schema.get_field_index("security") if wanted is not None else -1
    # A file that carries its own trade_date may assign rows to days their ts does not
    # suggest, so ts statistics can only prune when the date is derived from ts.
    derives_date = "trade_date" not in schema.names
    ts_idx = schema.get_field_index("ts") if window is not None and derives_date else -1
    ts_type = schema.field(ts_idx).type if ts_idx >= 0 else None
    ts_scale = 0
    if ts_type is not None and pa.types.is_timestamp(ts_type):
        ts_scale = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[ts_type.unit]
    keep: list[int] = []
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if sec_idx >= 0 and pa.types.is_string(schema.field(sec_idx).type):
            bounds = _stat_range(group.column(sec_idx).statistics)
            if bounds is not None:
                low, high = (b.decode() if isinstance(b, bytes) else b for b in bounds)
                # Any wanted security within [low, high]? (`wanted` is sorted.)
                first = bisect.bisect_left(wanted, low) if wanted is not None else 0
                if wanted is not None and (first == len(wanted) or wanted[first] > high):
                    continue
        if ts_scale and window is not None:
            stats = group.column(ts_idx).statistics
            if stats is not None and stats.has_min_max and stats.physical_type == "INT64":
                low_ns, high_ns = stats.min_raw * ts_scale, stats.max_raw * ts_scale
                if high_ns < window.start_ns or low_ns >= window.end_ns:
                    continue
        keep.append(i)
    return keep


def _open_stream(storage: Storage, file: InputFile) -> IO[bytes]:
    raw = storage.open_read(file.key)
    if isinstance(raw, io.RawIOBase):
        return io.BufferedReader(raw, buffer_size=CSV_BLOCK_BYTES)
    return raw


@contextlib.contextmanager
def _counted_stream(storage: Storage, file: InputFile, counter: ByteCounter | None) -> Iterator[IO[bytes]]:
    """A streamed input file, closed after use, its bytes added to `counter`.

    An uncompressed file counts what was read; a compressed one its whole size (the
    decompressor reads ahead, so the position says little).
    """
    stream = _open_stream(storage, file)
    try:
        yield stream
    finally:
        if counter is not None:
            counter.bytes += stream.tell() if file.format in ("csv", "dbn") else file.size
        stream.close()


def _csv_batches(
    storage: Storage,
    file: InputFile,
    columns: tuple[str, ...],
    wanted: tuple[str, ...] | None,
    batch_rows: int,
    counter: ByteCounter | None,
) -> Iterator[pa.RecordBatch]:
    with _counted_stream(storage, file, counter) as stream:
        source: Any = stream
        if file.format == "csv.gz":
            source = pa.CompressedInputStream(pa.PythonFile(stream, mode="r"), "gzip")
        # Every wanted column is read as text and parsed by `normalise`, so a malformed
        # value rejects its row instead of failing the file.
        convert = pacsv.ConvertOptions(
            column_types={c: pa.string() for c in columns},
            include_columns=list(columns),
            include_missing_columns=True,
            strings_can_be_null=True,
            null_values=[""],
            quoted_strings_can_be_null=False,
        )
        try:
            reader = pacsv.open_csv(
                source,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                convert_options=convert,
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                raise PermanentError(f"{storage.describe(file.key)} is empty (no header)") from None
            raise _unreadable(file, storage, exc) from None
        except (pa.ArrowException, OSError, EOFError) as exc:
            raise _unreadable(file, storage, exc) from None
        missing = [
            c for c in REQUIRED_COLUMNS if c in columns and pa.types.is_null(reader.schema.field(c).type)
        ]
        if missing:
            raise _missing(file, storage, missing)
        present = [c for c in columns if not pa.types.is_null(reader.schema.field(c).type)]
        try:
            for batch in reader:
                batch = _filter_security(batch.select(present), wanted)
                # CSV blocks can be large; hand them on in bounded slices.
                for offset in range(0, batch.num_rows, batch_rows):
                    yield batch.slice(offset, batch_rows)
        except (pa.ArrowException, OSError, EOFError) as exc:
            raise _unreadable(file, storage, exc) from None


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


def _parse_ts_text(values: pa.Array) -> pa.Array:
    """ISO-8601 text (with or without offset; naive = UTC) or integer nanoseconds."""
    values = pc.utf8_trim_whitespace(values)
    try:
        return pc.cast(values, TS_UTC)
    except pa.ArrowInvalid:
        pass
    try:
        return pc.cast(pc.cast(values, pa.timestamp("ns")), TS_UTC)
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
        return pc.cast(values, pa.timestamp("ns", tz=kind.tz or "UTC")).cast(TS_UTC)
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
        values = pc.utf8_trim_whitespace(values.cast(pa.string()))
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
        text = pc.utf8_trim_whitespace(values.cast(pa.string()))
        try:
            return pc.cast(text, pa.int64())
        except pa.ArrowInvalid:
            # "100.0" is an integer size written as a float; "1.5" and "abc" are not sizes.
            return _normalise_size(_cast_or_null(text, pa.float64()))
    return pa.nulls(len(values), pa.int64())


_BUY = pa.array(["B", "BUY"])
_SELL = pa.array(["S", "SELL", "A"])


def _normalise_side(values: pa.Array) -> pa.Array:
    text = pc.utf8_upper(pc.utf8_trim_whitespace(_normalise_text(values)))
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


@dataclass(frozen=True)
class LocalTime:
    """Market-time components of each row's timestamp."""

    trade_date: pa.Array
    hour: pa.Array
    minute_of_day: pa.Array


def local_time(ts: pa.Array, market_tz: str) -> LocalTime:
    """trade_date, hour and minute of day of UTC timestamps in `market_tz`."""
    local = ts if market_tz == "UTC" else pc.local_timestamp(ts.cast(pa.timestamp("ns", tz=market_tz)))
    if market_tz == "UTC":
        local = ts.cast(pa.timestamp("ns"))
    hour = pc.cast(pc.hour(local), pa.int64())
    minute = pc.add(pc.multiply(hour, 60), pc.cast(pc.minute(local), pa.int64()))
    return LocalTime(pc.cast(local, pa.date32()), hour, minute)


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
    security = _normalise_text(batch.column("security"))
    price = _normalise_price(batch.column("price"))
    size = _normalise_size(batch.column("size"))
    side_raw, participant_raw = _column(batch, "side"), _column(batch, "participant")
    venue_raw, date_raw = _column(batch, "venue"), _column(batch, "trade_date")
    side = _normalise_side(side_raw) if side_raw is not None else pa.nulls(n, pa.string())
    participant = _normalise_text(participant_raw) if participant_raw is not None else pa.nulls(n, pa.string())
    venue = _normalise_text(venue_raw) if venue_raw is not None else pa.nulls(n, pa.string())
    local = local_time(ts, market_tz)
    trade_date = local.trade_date
    if date_raw is not None:
        trade_date = pc.coalesce(_normalise_trade_date(date_raw), trade_date)
    valid = pc.and_(
        pc.and_(pc.is_valid(ts), pc.greater(pc.utf8_length(security), 0)),
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


def trade_dates(batch: pa.RecordBatch, market_tz: str) -> pa.Array:
    """Each row's trade date: the file's ``trade_date`` where given, else ts in market time.

    Used by discovery, which reads only the key columns.
    """
    ts = _normalise_ts(batch.column("ts"))
    derived = local_time(ts, market_tz).trade_date
    given = _column(batch, "trade_date")
    return pc.coalesce(_normalise_trade_date(given), derived) if given is not None else derived
