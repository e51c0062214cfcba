"""Writing result tables as Parquet and CSV side by side, streaming in bounded chunks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shared.storage import Storage


class TableStream:
    """One table being written as ``NAME.parquet`` and ``NAME.csv``; upload on `close`."""

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
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append rows (already in key order)."""
        table = table.select(self._schema.names).cast(self._schema)
        self._parquet.write_table(table)
        self._csv.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        """Finish both files and store them."""
        self._parquet.close()
        self._csv.close()
        try:
            self._storage.write_file(f"{self._prefix}/{self._name}.parquet", self._parquet_path)
            self._storage.write_file(f"{self._prefix}/{self._name}.csv", self._csv_path, "text/csv")
        finally:
            self._dir.cleanup()

    def __enter__(self) -> TableStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self._parquet.close()
            self._csv.close()
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
