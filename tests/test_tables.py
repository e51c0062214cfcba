"""Result tables written as Parquet and CSV side by side, a chunk at a time."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from shared.storage import LocalStorage
from shared.tables import TableSink

SCHEMA = pa.schema([("security", pa.string()), ("records", pa.int64()),
                    ("first_ts", pa.timestamp("ns", tz="UTC"))])


def _chunk(start: int, rows: int) -> pa.Table:
    first = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
    return pa.table({
        "security": [f"S{i:05d}" for i in range(start, start + rows)],
        "records": list(range(start, start + rows)),
        "first_ts": [first + dt.timedelta(seconds=i) for i in range(start, start + rows)],
    }, schema=SCHEMA)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the tables' scratch files go in this test."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_table_written_in_chunks_is_stored_whole_and_in_order_as_parquet_and_csv(
    tmp_path: Path, scratch: Path
) -> None:
    with TableSink(LocalStorage(tmp_path), "t").stream("daily", SCHEMA) as out:
        for start in range(0, 50_000, 5_000):
            out.write(_chunk(start, 5_000))
    expected = _chunk(0, 50_000)
    assert pq.read_table(tmp_path / "t" / "daily.parquet").equals(expected)
    from_csv = pacsv.read_csv(tmp_path / "t" / "daily.csv",
                              convert_options=pacsv.ConvertOptions(column_types=SCHEMA))
    assert from_csv.equals(expected)
    assert (tmp_path / "t" / "daily.csv").read_text().splitlines()[1] == '"S00000",0,2024-03-01 00:00:00.000000000Z'
    assert list(scratch.iterdir()) == []


def test_a_table_whose_writing_fails_stores_nothing_and_leaves_no_scratch_files(tmp_path: Path, scratch: Path) -> None:
    sink = TableSink(LocalStorage(tmp_path), "t")
    with pytest.raises(RuntimeError, match="the fold failed"), sink.stream("daily", SCHEMA) as out:
        out.write(_chunk(0, 5_000))
        assert list(scratch.iterdir())  # the chunk is in the scratch files
        raise RuntimeError("the fold failed")
    assert not (tmp_path / "t").exists()
    assert list(scratch.iterdir()) == []
