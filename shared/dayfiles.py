"""Day files: one small Parquet file per (security, trade date) of an ingested month.

A job read on its own, or in a small batch, needs a few thousand rows of its month; the
month's parts give it at best one whole row group (128 k rows) and the part's footer, however
few rows the job has. ``tickq ingest --day-files ZONE`` therefore also writes each job's rows
as a file of their own, outside the month's folder (month listings stay short, and these
files are never read as input):

    <output>/_days/<month>/<security>/<YYYY-MM-DD>.parquet
    <output>/_days/<month>/_manifest.json

A day file holds exactly the rows a job of that (security, trade date) reads, in the parts'
columns and order. The trade date is the row's own ``trade_date`` where the input has one,
else the market date of ``ts`` in ZONE (`shared.inputs.job_dates`), as a run with
``--market-tz ZONE`` assigns it. Rows of no job (no security, a code no job can have, no date)
are in none.

The manifest, written last, names ZONE and the parts (key and size) the day files were cut
from. A worker reads day files only for a run in ZONE whose month listing is exactly those
parts; under such a manifest a missing day file means a job without rows. Ingest deletes a
month's manifest before it replaces any of the month's files, and deletes the day files an
earlier ingest left and this one did not write before it writes the new manifest.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared.errors import PermanentError
from shared.inputs import InputFile, job_dates
from shared.layout import security_segment
from shared.messages import is_valid_security
from shared.storage import Storage

DAYS_ROOT = "_days"
MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
EPOCH = dt.date(1970, 1, 1)
_NO_DAY = np.iinfo(np.int32).min
# Measured on 100-row files: lz4 writes in half zstd's time (160 against 320 us a file), and
# the files come out no larger.
COMPRESSION = "lz4"
LABEL_COLUMNS = ("security", "side", "participant", "venue")
DELTA_ENCODED = ("ts", "size")


def month_prefix(month: str) -> str:
    """Where a month's day files and manifest are stored."""
    return f"{DAYS_ROOT}/{month}/"


def day_file_key(month: str, security: str, date: str) -> str:
    """The key of the day file of (`security`, `date`), `date` as ``YYYY-MM-DD``."""
    return f"{month_prefix(month)}{security_segment(security)}/{date}.parquet"


def manifest_key(month: str) -> str:
    """The key of a month's day-file manifest."""
    return f"{month_prefix(month)}{MANIFEST_NAME}"


@dataclass(frozen=True)
class DayFiles:
    """A month's day files, as their manifest describes them."""

    month: str
    market_tz: str
    parts: tuple[tuple[str, int], ...]

    def serve(self, market_tz: str, files: Sequence[InputFile]) -> bool:
        """Whether a run in `market_tz` over the month's input `files` may read these day files."""
        return market_tz == self.market_tz and tuple((f.key, f.size) for f in files) == self.parts

    def manifest(self, files: int) -> bytes:
        """The manifest's body, for `files` day files."""
        body = {"v": MANIFEST_VERSION, "month": self.month, "market_tz": self.market_tz, "files": files,
                "parts": [{"key": key, "size": size} for key, size in self.parts]}
        return json.dumps(body, indent=1).encode()


def read_manifest(storage: Storage, month: str) -> DayFiles | None:
    """The month's day files; None when it has none or its manifest does not parse (the caller
    then reads the month's parts)."""
    raw = _read_if_present(storage, manifest_key(month))
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        if body["v"] != MANIFEST_VERSION or body["month"] != month:
            return None
        parts = tuple((str(p["key"]), int(p["size"])) for p in body["parts"])
        return DayFiles(month, str(body["market_tz"]), parts)
    except (ValueError, KeyError, TypeError):
        return None


def read_day_file(storage: Storage, key: str) -> bytes | None:
    """The body of the day file `key`; None when there is none (its job has no rows)."""
    return _read_if_present(storage, key)


def _read_if_present(storage: Storage, key: str) -> bytes | None:
    # Only a missing object costs a second request: to tell it from one the store refused.
    try:
        return storage.read_bytes(key)
    except PermanentError:
        if storage.exists(key):
            raise
        return None


def day_file_table(storage: Storage, key: str, body: bytes) -> pa.Table:
    """A day file's rows, text columns as dictionaries (as the worker reads parts)."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(body))
        labels = [c for c in LABEL_COLUMNS if c in parquet.schema_arrow.names]
        return pq.ParquetFile(pa.BufferReader(body), metadata=parquet.metadata,
                              read_dictionary=labels).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).partition("\n")[0]
        raise PermanentError(f"{storage.describe(key)} is not a readable day file ({type(exc).__name__}: "
                             f"{reason}); ingest the month again") from None


class DayFilesWriter:
    """Cuts an ingested month's rows, as ingest emits them (sorted by security, then ts), into
    day files under a local `directory`, holding one job's rows at a time.

    Within a security, rows of one trade date are consecutive when the date comes from ts. An
    input ``trade_date`` that goes back in time breaks that; the month then gets no day files
    (`abandoned` says why), as one job's rows would be split over two files.
    """

    def __init__(self, directory: Path, schema: pa.Schema, market_tz: str) -> None:
        self.directory = directory
        self.schema = schema
        self.market_tz = market_tz
        self.written: list[tuple[str, str]] = []  # (security, YYYY-MM-DD) of each day file
        self.abandoned: str | None = None
        self._pending: list[pa.Table] = []
        self._pending_key: tuple[str, int] | None = None
        self._security: str | None = None
        self._days_seen: set[int] = set()
        self._usable: dict[str, bool] = {}

    def add(self, table: pa.Table) -> None:
        """Take the next rows of the month (any columns of `schema` and more)."""
        if self.abandoned is not None or not table.num_rows:
            return
        table = table.select(self.schema.names).cast(self.schema)
        given = table.column("trade_date") if "trade_date" in self.schema.names else None
        days = job_dates(table.column("ts").combine_chunks(),
                         None if given is None else given.combine_chunks(), self.market_tz)
        day = days.cast(pa.int32()).fill_null(_NO_DAY).to_numpy(zero_copy_only=False)
        encoded = pc.dictionary_encode(table.column("security").combine_chunks())
        values = encoded.dictionary.to_pylist()
        codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False)
        # The last entry answers for null securities (code -1).
        usable = np.array([self._usable_code(v) for v in values] + [False], dtype=bool)
        job_rows = usable[codes] & (day != _NO_DAY)
        bounds = np.flatnonzero((codes[1:] != codes[:-1]) | (day[1:] != day[:-1])) + 1
        starts = np.concatenate(([0], bounds)).tolist()
        ends = np.concatenate((bounds, [len(codes)])).tolist()
        for begin, end in zip(starts, ends, strict=True):
            if job_rows[begin]:
                self._take((values[codes[begin]], int(day[begin])), table.slice(begin, end - begin))
                if self.abandoned is not None:
                    return
        if self._pending:  # a copy, so that the large table the rows came from can be released
            held = pa.concat_tables(self._pending)
            self._pending = [held.take(pa.array(np.arange(held.num_rows)))]

    def path(self, security: str, date: str) -> Path:
        """Where the day file of (`security`, `date`) is written."""
        return self.directory / security_segment(security) / f"{date}.parquet"

    def close(self) -> list[tuple[str, str]]:
        """(security, date) of each day file written (`path`); none when abandoned."""
        if self.abandoned is None:
            self._flush()
        return [] if self.abandoned is not None else self.written

    def _usable_code(self, code: str) -> bool:
        known = self._usable.get(code)
        if known is None:
            known = self._usable[code] = is_valid_security(code)
        return known

    def _take(self, key: tuple[str, int], rows: pa.Table) -> None:
        if key == self._pending_key:
            self._pending.append(rows)
            return
        self._flush()
        security, day = key
        if security != self._security:
            self._security, self._days_seen = security, set()
        if day in self._days_seen:
            date = EPOCH + dt.timedelta(days=day)
            self.abandoned = (f"rows of {security} on {date} are not consecutive in (security, ts) order "
                              "(the input's trade_date goes back in time)")
            self._pending, self._pending_key = [], None
            return
        self._days_seen.add(day)
        self._pending_key, self._pending = key, [rows]

    def _flush(self) -> None:
        if self._pending_key is None:
            return
        security, day = self._pending_key
        date = str(EPOCH + dt.timedelta(days=day))
        path = self.path(security, date)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = self.schema.names
        pq.write_table(pa.concat_tables(self._pending), str(path), compression=COMPRESSION, write_statistics=False,
                       column_encoding={c: "DELTA_BINARY_PACKED" for c in DELTA_ENCODED if c in names},
                       use_dictionary=[c for c in names if c not in DELTA_ENCODED], store_schema=False)
        self.written.append((security, date))
        self._pending, self._pending_key = [], None
