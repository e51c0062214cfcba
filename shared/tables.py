"""Writing result tables as Parquet and CSV side by side, streaming in bounded chunks."""

from __future__ import annotations

import contextlib
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared.storage import Storage


class TableStream:
    """One table being written as ``NAME.parquet`` and ``NAME.csv``; upload on `close`.

    A chunk's CSV is written on a thread of the stream's own while its Parquet is written by
    the caller: Arrow formats time-zone-aware timestamps as text about fifteen times slower
    than numbers (a table's two timestamp columns were most of its CSV's cost), and both
    writers release the interpreter lock. One chunk's CSV at most is in flight.
    """

    def __init__(self, storage: Storage, prefix: str, name: str, schema: pa.Schema) -> None:
        self._storage = storage
        self._prefix = prefix
        self._name = name
        self._schema = schema
        self._dir = tempfile.TemporaryDirectory(prefix="tickq-table-")
        base = Path(self._dir.name)
        self._parquet_path = base / f"{name}.parquet"
        self._csv_path = base / f"{name}.csv"
        self._parquet = pq.ParquetWriter(self._parquet_path, schema)
        self._csv = pacsv.CSVWriter(self._csv_path, schema)
        self._csv_writing = ThreadPoolExecutor(1, thread_name_prefix="tickq-csv")
        self._csv_chunk: Future[None] | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows (already in key order)."""
        table = table.select(self._schema.names).cast(self._schema)
        self._csv_written()
        self._csv_chunk = self._csv_writing.submit(self._csv.write_table, table)
        self._parquet.write_table(table)
        self.rows += table.num_rows

    def _csv_written(self) -> None:
        """Wait for the chunk whose CSV is being written; raise what failed it."""
        chunk, self._csv_chunk = self._csv_chunk, None
        if chunk is not None:
            chunk.result()

    def close(self) -> None:
        """Finish both files and store them."""
        try:
            self._finish_files()
            self._storage.write_file(f"{self._prefix}/{self._name}.parquet", self._parquet_path)
            self._storage.write_file(f"{self._prefix}/{self._name}.csv", self._csv_path, "text/csv")
        finally:
            self._dir.cleanup()

    def _finish_files(self) -> None:
        try:
            self._csv_written()
        finally:
            self._csv_writing.shutdown()
            self._parquet.close()
            self._csv.close()

    def __enter__(self) -> TableStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
            return
        try:
            with contextlib.suppress(Exception):  # what ended the block is the error to report
                self._finish_files()
        finally:
            self._dir.cleanup()


class TableSink:
    """Writes named tables under one prefix of a storage."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self.storage = storage
        self.prefix = prefix
        self.written: list[str] = []

    def stream(self, name: str, schema: pa.Schema) -> TableStream:
        """A streaming writer for table `name`."""
        self.written.append(name)
        return TableStream(self.storage, self.prefix, name, schema)

    def write(self, name: str, table: pa.Table) -> None:
        """Write a whole (small) table."""
        with self.stream(name, table.schema) as out:
            out.write(table)
