"""The key sidecar of an ingested month: row counts per (security, UTC quarter hour).

`tickq ingest` writes ``<output>/M/_keys.parquet`` beside a month's parts (files starting with
``_`` are not input). Job discovery reads this small file instead of the ``security`` and
``ts`` columns of every row of the month.

Format: one Parquet file with the columns

- ``security`` (string): as stored in the parts, null for rows without one;
- ``quarter`` (``timestamp[ns, tz=UTC]``): the start of the UTC quarter hour of the rows'
  ``ts`` (floored to 15 minutes since the epoch), null for rows without ``ts``;
- ``trade_date`` (date32): the rows' own trade date, only when the parts carry that column
  (null where a row has none, so its date comes from ``ts``);
- ``rows`` (int64 > 0): how many rows of the month have that key. The writer streams, so a
  key may appear in more than one row of the sidecar: counts of equal keys add up.

The file's key-value metadata ``tickq.keys`` is JSON: ``version``, ``month``, ``rows`` (the
sum of ``rows``) and ``parts``, one ``{"key", "size", "rows", "footer_sha256"}`` per part
the counts describe. A reader uses the sidecar only when the month's input files are exactly
those parts: same keys, same sizes, and the same Parquet footer (it holds every row group's
statistics and byte offsets, so rewritten data almost surely changes it). Anything else, or
a sidecar that does not parse, makes `read_keys` answer None and the caller scans the rows.

Why quarter hours: every UTC offset of every zone in modern use is a multiple of 15 minutes
and their transitions happen at instants aligned to 15 minutes, so all rows of one UTC
quarter hour share one market date. That holds for today's zones, not for every zone at every
time (local mean time before standard time, Newfoundland's 00:01 transitions until 2011), so
`quarters_share_dates` checks it for the month and zone at hand.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.errors import PermanentError
from shared.inputs import TS_UTC, InputFile
from shared.storage import Storage

__all__ = [
    "KEYS_NAME",
    "KeysWriter",
    "PartRecord",
    "keys_schema",
    "part_record",
    "quarter_starts",
    "quarters_share_dates",
    "read_keys",
]

KEYS_NAME = "_keys.parquet"
KEYS_VERSION = 1
METADATA_KEY = b"tickq.keys"
QUARTER_MINUTES = 15
QUARTER_S = QUARTER_MINUTES * 60
QUARTER_NS = QUARTER_S * 10**9
# Rows of counts buffered before the writer merges equal keys and writes a row group.
FLUSH_ROWS = 64 * 1024
# Quarters within this many ns of the epoch (years 1823 to 2116) cannot overflow when a
# zone's offset is added to them.
SAFE_NS = 1 << 62
# Rows of data counted at a time.
ADD_SLICE_ROWS = 256 * 1024
_PARQUET_MAGIC = b"PAR1"
_COUNT = "rows"


def keys_schema(with_trade_date: bool) -> pa.Schema:
    """The sidecar's columns; ``trade_date`` only for data that carries one."""
    fields = [pa.field("security", pa.string()), pa.field("quarter", TS_UTC)]
    if with_trade_date:
        fields.append(pa.field("trade_date", pa.date32()))
    fields.append(pa.field(_COUNT, pa.int64(), nullable=False))
    return pa.schema(fields)


@dataclass(frozen=True)
class PartRecord:
    """One part file the sidecar's counts describe."""

    key: str
    size: int
    rows: int
    footer_sha256: str

    def as_json(self) -> dict[str, Any]:
        """The part as stored in the sidecar's metadata."""
        return {"key": self.key, "size": self.size, "rows": self.rows, "footer_sha256": self.footer_sha256}


def quarter_starts(ts: pa.Array) -> pa.Array:
    """The start of the UTC quarter hour of each timestamp (``timestamp[ns, tz=UTC]``).

    Integer arithmetic (floor division, also before 1970) rather than `floor_temporal`,
    which does calendar arithmetic and is several times slower.
    """
    ns = ts.cast(pa.int64())
    quotient = pc.divide(ns, QUARTER_NS)  # truncates toward zero
    below = pc.and_(pc.less(ns, 0), pc.not_equal(pc.multiply(quotient, QUARTER_NS), ns))
    floored = pc.subtract(quotient, pc.cast(below, pa.int64()))
    return pc.multiply(floored, QUARTER_NS).cast(TS_UTC)


def _differs_from_previous(values: pa.Array) -> np.ndarray:
    """For each element but the first, whether it differs from the one before (null = null)."""
    later, earlier = values.slice(1), values.slice(0, len(values) - 1)
    unequal = pc.fill_null(pc.not_equal(later, earlier), False)
    one_null = pc.xor(pc.is_null(later), pc.is_null(earlier))
    return np.asarray(pc.or_(unequal, one_null).to_numpy(zero_copy_only=False), dtype=bool)


def footer_sha256(stream: IO[bytes], size: int) -> str:
    """SHA-256 of a Parquet file's footer (its serialised metadata); `ValueError` if it has none.

    Reads only the file's tail: two small reads (ranged GETs on S3).
    """
    if size < 12:
        raise ValueError("too small to be a Parquet file")
    stream.seek(size - 8)
    tail = stream.read(8)
    if len(tail) != 8 or tail[4:] != _PARQUET_MAGIC:
        raise ValueError("no Parquet footer")
    (length,) = struct.unpack("<I", tail[:4])
    if length > size - 12:
        raise ValueError("Parquet footer longer than the file")
    stream.seek(size - 8 - length)
    footer = stream.read(length)
    if len(footer) != length:
        raise ValueError("short read of the Parquet footer")
    return hashlib.sha256(footer).hexdigest()


def part_record(key: str, path: Path, rows: int) -> PartRecord:
    """The record of a part written locally at `path`, to be stored under `key`."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        return PartRecord(key, size, rows, footer_sha256(stream, size))


class KeysWriter:
    """Builds a month's sidecar at a local path from the month's rows, in bounded memory.

    `add` takes the rows in any number of tables; only their counts per key are kept (merged
    and written every `FLUSH_ROWS` keys), never the rows.
    """

    def __init__(self, path: Path, with_trade_date: bool) -> None:
        self.path = path
        self.with_trade_date = with_trade_date
        self.schema = keys_schema(with_trade_date)
        self.rows = 0
        self._keys = self.schema.names[:-1]
        self._writer = pq.ParquetWriter(str(path), self.schema, compression="zstd")
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, table: pa.Table) -> None:
        """Count `table`'s rows by key; it needs ``ts`` (UTC), ``security`` and, when the
        sidecar keeps dates, ``trade_date``."""
        # In slices: the caller's table may be as large as its memory budget allows, and the
        # quarter column and grouping temporaries should not grow with it.
        for start in range(0, table.num_rows, ADD_SLICE_ROWS):
            self._add(table.slice(start, ADD_SLICE_ROWS))

    def _add(self, table: pa.Table) -> None:
        n = table.num_rows
        columns = {
            "security": table.column("security").combine_chunks(),
            "quarter": quarter_starts(table.column("ts").combine_chunks()),
        }
        if self.with_trade_date:
            columns["trade_date"] = table.column("trade_date").combine_chunks()
        # Runs of equal keys, counted by their lengths: ingest hands rows over sorted by
        # security and ts, so a run is usually a whole key (much cheaper than hashing every
        # row); keys split over several runs are merged by `_flush`.
        starts = np.zeros(n, dtype=bool)
        starts[0] = True
        for column in columns.values():
            starts[1:] |= _differs_from_previous(column)
        first = np.flatnonzero(starts)
        index = pa.array(first)
        runs = {name: column.take(index) for name, column in columns.items()}
        runs[_COUNT] = pa.array(np.diff(first, append=n))
        self._pending.append(pa.table(runs))
        self._pending_rows += len(first)
        self.rows += n
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        merged = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        # Equal keys from consecutive tables (a security's rows cut between two) become one.
        merged = merged.group_by(self._keys, use_threads=False).aggregate([(_COUNT, "sum")])
        merged = merged.select([*self._keys, f"{_COUNT}_sum"]).rename_columns([*self._keys, _COUNT])
        merged = merged.sort_by([(k, "ascending") for k in self._keys])
        self._writer.write_table(merged.select(self.schema.names).cast(self.schema))

    def close(self, month: str, parts: Sequence[PartRecord]) -> None:
        """Write what is left and the metadata naming the `parts` the counts describe."""
        self._flush()
        if sum(p.rows for p in parts) != self.rows:
            self._writer.close()
            raise PermanentError(
                f"{month}: the key sidecar counted {self.rows} rows but the parts hold "
                f"{sum(p.rows for p in parts)}"
            )
        meta = {
            "version": KEYS_VERSION,
            "month": month,
            "rows": self.rows,
            "parts": [p.as_json() for p in parts],
        }
        self._writer.add_key_value_metadata({METADATA_KEY: json.dumps(meta).encode()})
        self._writer.close()


def read_keys(storage: Storage, month: str, files: Sequence[InputFile]) -> pa.Table | None:
    """The sidecar of `month` as ``security``, ``quarter``, ``trade_date``, ``rows``, or None.

    None when there is no sidecar, it does not parse, or `files` (the month's input, from
    `shared.inputs.month_files`) are not exactly the parts it describes. ``trade_date`` is
    all null when the parts carry none. Storage outages (`TransientError`) are raised.
    """
    key = f"{month}/{KEYS_NAME}"
    if not storage.exists(key):
        return None
    try:
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(key)))
        raw = (parquet.metadata.metadata or {}).get(METADATA_KEY)
        if raw is None:
            return None
        meta = json.loads(raw)
        if meta.get("version") != KEYS_VERSION or meta.get("month") != month:
            return None
        parts = [PartRecord(p["key"], int(p["size"]), int(p["rows"]), str(p["footer_sha256"])) for p in meta["parts"]]
        if [(p.key, p.size) for p in parts] != [(f.key, f.size) for f in files]:
            return None
        if any(f.format != "parquet" for f in files):
            return None
        for part in parts:
            with storage.open_read(part.key) as stream:
                if footer_sha256(stream, part.size) != part.footer_sha256:
                    return None
        schema = parquet.schema_arrow
        with_date = "trade_date" in schema.names
        if not schema.remove_metadata().equals(keys_schema(with_date)):
            return None
        table = parquet.read()
    except PermanentError:
        return None
    except (pa.ArrowException, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    counts = table.column(_COUNT)
    total = pc.sum(counts).as_py() or 0
    smallest = pc.min(counts).as_py()
    if counts.null_count or (smallest is not None and smallest <= 0):
        return None
    if total != meta.get("rows") or total != sum(p.rows for p in parts):
        return None
    if not with_date:
        table = table.add_column(2, "trade_date", pa.nulls(table.num_rows, pa.date32()))
    return table


def _offset_s(zone: ZoneInfo, instant_s: int) -> int:
    offset = dt.datetime.fromtimestamp(instant_s, zone).utcoffset()
    assert offset is not None  # a ZoneInfo always has one
    return int(offset.total_seconds())


def _quarter_keeps_date(zone: ZoneInfo, start_s: int) -> bool:
    """Whether the UTC quarter hour starting at `start_s` falls on one local date in `zone`.

    It does when one offset, a multiple of 15 minutes, holds all through it: the local times
    then fill one local quarter hour, which never straddles midnight. Transitions are whole
    seconds (that is what time zone files hold), so the offset at the quarter's last second
    shows whether one happens inside it; two within one quarter hour would be missed, and no
    zone has had such.
    """
    try:
        first = _offset_s(zone, start_s)
        last = _offset_s(zone, start_s + QUARTER_S - 1)
    except (OverflowError, OSError, ValueError):
        return False
    return first == last and first % QUARTER_S == 0


def _month_window_s(month: str) -> tuple[int, int]:
    """`month` in UTC, and a day either side, as [start, end) seconds since the epoch."""
    year, mon = (int(p) for p in month.split("-"))
    start = dt.datetime(year, mon, 1, tzinfo=dt.UTC) - dt.timedelta(days=1)
    following = dt.datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=dt.UTC)
    end = following + dt.timedelta(days=1)
    return int(start.timestamp()), int(end.timestamp())


@functools.lru_cache(maxsize=256)
def _month_keeps_dates(month: str, market_tz: str) -> bool:
    try:
        zone = ZoneInfo(market_tz)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    start, end = _month_window_s(month)
    return all(_quarter_keeps_date(zone, q) for q in range(start, end, QUARTER_S))


def quarters_share_dates(month: str, market_tz: str, quarters: pa.Array | pa.ChunkedArray) -> bool:
    """Whether, in `market_tz`, all instants of each UTC quarter hour in `quarters` have one date.

    Checked for all of `month` and a day either side (every offset a multiple of 15 minutes,
    every transition on a quarter hour), and for each quarter in `quarters` outside that
    window (rows of a month's files may lie outside it). Quarters beyond `SAFE_NS` of the
    epoch also answer False: near the ends of the nanosecond range, date arithmetic on a
    quarter's start and on its rows overflows differently. When this is False, dates derived
    from the sidecar could be wrong and the caller must read the rows.
    """
    try:
        if not _month_keeps_dates(month, market_tz):
            return False
    except ValueError:  # not a YYYY-MM month
        return False
    start, end = _month_window_s(month)
    starts = pc.unique(pc.drop_null(quarters).cast(pa.int64()))
    if len(starts) and not (pc.min(starts).as_py() >= -SAFE_NS and pc.max(starts).as_py() <= SAFE_NS):
        return False
    outside = pc.filter(
        starts, pc.or_(pc.less(starts, start * 10**9), pc.greater_equal(starts, end * 10**9))
    )
    zone = ZoneInfo(market_tz)
    return all(_quarter_keeps_date(zone, q // 10**9) for q in outside.to_pylist())
