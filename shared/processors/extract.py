"""The ``extract`` processor: writes each job's accepted rows (after the run's filters).

The classic "pull every Centre Point order of these securities" run. Each job writes one
Parquet file, ``runs/<run>/extract/security=<S>/trade_date=<D>/<month>.parquet`` (Hive-style
partitions that pyarrow, DuckDB and Spark read as a dataset); the aggregate is a row-count
table per (security, trade_date).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.inputs import LABEL, LABEL_COLUMNS, NORMALISED_SCHEMA
from shared.layout import RunLayout, security_segment
from shared.messages import JobParams
from shared.processors.base import JobContext, StoredResult
from shared.tables import TableSink

# security and trade_date live in the partition path, as Hive-style readers expect.
EXTRACT_COLUMNS = ("ts", "price", "size", "side", "participant", "venue")
# Labels are written as plain strings: the extract's readers should not meet dictionary types.
EXTRACT_SCHEMA = pa.schema(
    [pa.field(name, LABEL.value_type) if name in LABEL_COLUMNS else NORMALISED_SCHEMA.field(name)
     for name in EXTRACT_COLUMNS]
)
COUNTS_SCHEMA = pa.schema(
    [("security", pa.string()), ("trade_date", pa.date32()), ("rows", pa.int64()), ("path", pa.string())]
)


def extract_key(run_id: str, security: str, date: str, month: str) -> str:
    """Where a job's extracted rows go, relative to the output location."""
    return (f"{RunLayout(run_id).root}/extract/security={security_segment(security)}/trade_date={date}/"
            f"{month}.parquet")


class ExtractJob:
    """Streams a job's accepted rows into a local Parquet file, uploaded by `finish`."""

    def __init__(self, context: JobContext) -> None:
        self._context = context
        self._dir = tempfile.TemporaryDirectory(prefix="tickq-extract-")
        self._path = Path(self._dir.name) / "rows.parquet"
        self._writer: pq.ParquetWriter | None = None
        self._rows = 0

    def add(self, rows: pa.Table) -> None:
        """Append a batch of accepted rows."""
        rows = rows.select(list(EXTRACT_COLUMNS)).cast(EXTRACT_SCHEMA)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path, EXTRACT_SCHEMA, compression="zstd")
        self._writer.write_table(rows)
        self._rows += rows.num_rows

    def finish(self) -> dict[str, Any]:
        """Upload the rows (even none: an empty extract is an answer) and describe them."""
        job = self._context.job
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._path, EXTRACT_SCHEMA, compression="zstd")
            self._writer.close()
            key = extract_key(job.run_id, job.security, job.date, job.month)
            self._context.output.write_file(key, self._path)
        finally:
            self._dir.cleanup()
        return {"rows": self._rows, "path": key}


class ExtractProcessor:
    """Writes the accepted rows of every job; aggregates a row count per security-day."""

    name = "extract"

    def start_job(self, context: JobContext) -> ExtractJob:
        """A fresh extractor for one job."""
        return ExtractJob(context)

    def aggregate(self, results: Iterable[StoredResult], params: JobParams, sink: TableSink) -> dict[str, Any]:
        """The ``extract_counts`` table: rows extracted per (security, trade_date)."""
        import datetime as dt

        total = 0
        with sink.stream("extract_counts", COUNTS_SCHEMA) as out:
            batch: dict[str, list[Any]] = {name: [] for name in COUNTS_SCHEMA.names}
            for result in results:
                rows = int(result.data["rows"])
                total += rows
                batch["security"].append(result.security)
                batch["trade_date"].append(dt.date.fromisoformat(result.date))
                batch["rows"].append(rows)
                batch["path"].append(result.data["path"])
                if len(batch["rows"]) >= 50_000:
                    out.write(pa.table(batch, schema=COUNTS_SCHEMA))
                    batch = {name: [] for name in COUNTS_SCHEMA.names}
            out.write(pa.table(batch, schema=COUNTS_SCHEMA))
        return {"records": total}
