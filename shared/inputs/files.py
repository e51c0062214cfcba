"""What a month's input is: its files, the slices discovery recorded of them, the columns and
the normalised schema every reader yields."""

from __future__ import annotations

import bisect
import dataclasses
import datetime as dt
import functools
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa

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
NS_MIN, NS_MAX = -(2**63), 2**63 - 1  # the instants a ts holds
DEFAULT_BATCH_ROWS = 65_536

# The input's columns as tickq writes them (`tickq ingest`'s parts; `tickq gen` writes all but
# trade_date): plain strings, whose row-group statistics prune reads.
ORDERS_SCHEMA = pa.schema(
    [
        ("ts", TS_UTC),
        ("security", pa.string()),
        ("price", pa.float64()),
        ("size", pa.int64()),
        ("side", pa.string()),
        ("participant", pa.string()),
        ("venue", pa.string()),
        ("trade_date", pa.date32()),
    ]
)

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
    `security` codes as the file writes them, and, where the file carries its own trade_date
    (whose rows their ts then do not place), the range of their trade `days` (since
    1970-01-01). A range that is None is unknown: the slice may hold anything.

    An uncompressed CSV file that discovery cut has several, of whole lines after its header
    (`csv_slices`). Any other file that is not Parquet has one, the whole file, [0, size): a
    read takes it whole or skips it, so that a pass over some dates of a month of daily files
    reads only theirs (Parquet's row groups carry such ranges themselves)."""

    start: int
    end: int
    rows: int = 0
    ts: tuple[int, int] | None = None
    security: tuple[str, str] | None = None
    days: tuple[int, int] | None = None

    def may_hold(self, wanted: tuple[str, ...] | None, window: DayWindow | None) -> bool:
        """Whether rows of the `wanted` securities (sorted) within `window` may be here."""
        if wanted is not None and self.security is not None:
            first = bisect.bisect_left(wanted, self.security[0])
            if first == len(wanted) or wanted[first] > self.security[1]:
                return False
        if window is not None and self.days is not None and window.days is not None:
            return self.days[1] >= window.days[0] and self.days[0] <= window.days[1]
        if window is not None and self.ts is not None:
            return self.ts[1] >= window.start_ns and self.ts[0] < window.end_ns
        return True

    def as_json(self) -> list[Any]:
        """JSON-ready form: [start, end, rows, ts or null, security or null, days or null]."""
        return [self.start, self.end, self.rows, list(self.ts) if self.ts else None,
                list(self.security) if self.security else None, list(self.days) if self.days else None]

    @classmethod
    def from_json(cls, data: list[Any]) -> FileSlice:
        """Inverse of `as_json` (a record without days, as earlier versions wrote, has none)."""
        start, end, rows, ts, security, *rest = data
        days = rest[0] if rest else None
        return cls(int(start), int(end), int(rows), (int(ts[0]), int(ts[1])) if ts else None,
                   (str(security[0]), str(security[1])) if security else None,
                   (int(days[0]), int(days[1])) if days else None)


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


# Trade dates are counted in days since this one, as Arrow's date32 counts them.
EPOCH = dt.date(1970, 1, 1)


@dataclass(frozen=True)
class DayWindow:
    """The UTC nanosecond range [start, end) of market-time calendar days; and, where known,
    those days themselves (`days`: the first and the last, as days since 1970-01-01), which
    place the rows of a file that carries its own trade_date."""

    start_ns: int
    end_ns: int
    days: tuple[int, int] | None = None

    @classmethod
    def of(cls, day: dt.date, market_tz: str) -> DayWindow:
        """The window of `day` in `market_tz`."""
        return cls.spanning(day, day, market_tz)

    @classmethod
    def spanning(cls, first: dt.date, last: dt.date, market_tz: str) -> DayWindow:
        """The window from the start of `first` to the end of `last` in `market_tz`."""
        return _spanning(first, last, market_tz)


# A pass over a month of thousands of securities asks for the same few windows thousands of
# times (one per security of each batch); a window is immutable.
@functools.lru_cache(maxsize=4096)
def _spanning(first: dt.date, last: dt.date, market_tz: str) -> DayWindow:
    zone = ZoneInfo(market_tz)
    start = dt.datetime.combine(first, dt.time(), zone)
    end = dt.datetime.combine(last + dt.timedelta(days=1), dt.time(), zone)
    return DayWindow(int(start.timestamp()) * 10**9, int(end.timestamp()) * 10**9,
                     ((first - EPOCH).days, (last - EPOCH).days))


FileId = tuple[str, str, int]  # storage URI, key, size
Span = tuple[int, int]  # bytes [start, end) of a file


def unreadable(file: InputFile, storage: Storage, exc: BaseException) -> PermanentError:
    """The one-line error of a file that does not read as its format."""
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return PermanentError(f"unreadable {file.format} file {storage.describe(file.key)}: {reason}")


def missing_columns(file: InputFile, storage: Storage, missing: list[str]) -> PermanentError:
    """The one-line error of a file that lacks required columns."""
    return PermanentError(
        f"{storage.describe(file.key)} lacks required column(s) {', '.join(missing)}"
    )


@dataclass(frozen=True, slots=True)
class KeyBatch:
    """Rows' key columns, read to discover a month's jobs.

    `day` is the trade date (days since 1970-01-01) all the rows share when the file's
    statistics tell it; their ts is then not read, and `batch` holds only the security.
    """

    batch: pa.RecordBatch
    day: int | None


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


def slice_spans(file: InputFile, wanted: tuple[str, ...] | None, window: DayWindow | None) -> list[Span]:
    """The bytes of `file`'s slices that may hold rows of the `wanted` securities within
    `window`, adjacent slices joined into one span."""
    spans: list[Span] = []
    for piece in file.slices:
        if not piece.may_hold(wanted, window):
            continue
        if spans and spans[-1][1] == piece.start:
            spans[-1] = (spans[-1][0], piece.end)
        else:
            spans.append((piece.start, piece.end))
    return spans
