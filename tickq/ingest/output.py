"""What `tickq ingest` writes for a month: its Parquet parts (sorted, in whole row groups,
encoded for cheap per-job reads) and the ``_index.json`` that lists their row groups."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shared.inputs.files import ORDERS_SCHEMA
from shared.storage import Storage

INDEX_NAME = "_index.json"
INDEX_VERSION = 1
DEFAULT_ROW_GROUP_ROWS = 128 * 1024
DEFAULT_MAX_FILE_ROWS = 64 << 20  # rows per output Parquet file (~1 GB), whole row groups
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
PART_RE = re.compile(r"^part-\d{5}\.parquet$")

OUTPUT_SCHEMA = ORDERS_SCHEMA


@dataclass
class OutputFile:
    """One Parquet part being written: its key in the store, its local file, its rows."""

    key: str
    path: Path
    rows: int = 0


class Output:
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
        self.files: list[OutputFile] = []
        self._writer: pq.ParquetWriter | None = None
        self._carry: list[pa.Table] = []
        self._carry_rows = 0

    def _new_writer(self) -> pq.ParquetWriter:
        part = OutputFile(
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

    def close(self) -> list[OutputFile]:
        if self._carry_rows:
            self._write_group(pa.concat_tables(self._carry).combine_chunks())
        self._carry, self._carry_rows = [], 0
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self.files:  # an empty month still gets one (empty) file
            self._new_writer().close()
        return self.files


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


def file_entry(part: OutputFile, month: str) -> dict[str, Any]:
    """The index entry of a written part: its rows, bytes and row groups."""
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
