"""Passes over the same Parquet file share its footer and the row groups at their edges."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.inputs import ALL_COLUMNS, ByteCounter, DayWindow, InputFile, ParquetCache, month_files, read_batches
from shared.inputs.parquet_reader import _row_group_days, row_groups_to_read
from shared.storage import Storage, open_storage

MONTH = "2024-03"
TS = pa.timestamp("ns", tz="UTC")
EPOCH = dt.date(1970, 1, 1)


def _month(tmp_path: Path, securities: list[str], group_rows: int) -> tuple[Storage, InputFile]:
    """One sorted file of 100 rows per security, in row groups of `group_rows` rows."""
    rows = [(s, i) for s in securities for i in range(100)]
    table = pa.table({
        "ts": pa.array([1_709_251_200_000_000_000 + i * 10**9 for _, i in rows], pa.int64()).cast(TS),
        "security": [s for s, _ in rows],
        "price": [1.0 + i for _, i in rows],
        "size": [1 + i for _, i in rows],
        "side": ["B" if i % 2 else "S" for _, i in rows],
    })
    (tmp_path / MONTH).mkdir()
    pq.write_table(table, tmp_path / MONTH / "part.parquet", row_group_size=group_rows)
    storage = open_storage(str(tmp_path))
    [file] = month_files(storage, MONTH)
    return storage, file


def _read(storage: Storage, file: InputFile, securities: list[str], cache: ParquetCache | None) -> tuple[pa.Table, int]:
    counter = ByteCounter()
    batches = list(read_batches(storage, file, ALL_COLUMNS, security=securities, counter=counter, cache=cache))
    return pa.Table.from_batches(batches).combine_chunks(), counter.bytes


def test_consecutive_passes_read_their_shared_row_group_once(tmp_path: Path) -> None:
    # Row groups of 150 rows: the first holds A and B's start, the second B's end and C.
    storage, file = _month(tmp_path, ["A", "B", "C", "D"], group_rows=150)
    cache = ParquetCache()

    first, _ = _read(storage, file, ["A"], cache)
    second, second_bytes = _read(storage, file, ["B", "C"], cache)

    uncached_second, uncached_bytes = _read(storage, file, ["B", "C"], None)
    assert second.equals(uncached_second)  # the same rows, cached or not
    assert first.column("security").to_pylist() == ["A"] * 100
    assert second.column("security").to_pylist() == ["B"] * 100 + ["C"] * 100
    assert cache.hits == 1  # the group holding A and B's start is not read again
    # Neither the footer nor the shared group is fetched again: only the second group.
    assert 0 < second_bytes < uncached_bytes


def test_clear_reads_again(tmp_path: Path) -> None:
    storage, file = _month(tmp_path, ["A", "B"], group_rows=150)
    cache = ParquetCache()
    _, cold = _read(storage, file, ["A"], cache)
    _, warm = _read(storage, file, ["A"], cache)
    cache.clear()
    _, again = _read(storage, file, ["A"], cache)
    assert warm == 0 and again == cold


def test_large_row_groups_are_streamed_not_kept(tmp_path: Path) -> None:
    storage, file = _month(tmp_path, ["A", "B"], group_rows=200)
    cache = ParquetCache(max_group_rows=100)  # smaller than every group: none is kept
    first, cold = _read(storage, file, ["A", "B"], cache)
    second, warm = _read(storage, file, ["A", "B"], cache)
    assert first.equals(second) and first.num_rows == 200
    assert cache.hits == 0 and 0 < warm < cold  # the footer is kept, the rows are read again


def test_kept_row_groups_are_bounded(tmp_path: Path) -> None:
    storage, file = _month(tmp_path, ["A", "B", "C", "D"], group_rows=100)  # one group each
    cache = ParquetCache(row_groups=2)
    for security in ("A", "B", "C"):  # each pass keeps its group; C's pushes A out
        _read(storage, file, [security], cache)
    _, again = _read(storage, file, ["A"], cache)
    _, kept = _read(storage, file, ["C"], cache)
    assert again > 0 and kept == 0 and cache.hits == 1


def test_a_pass_keeps_only_its_edge_row_groups(tmp_path: Path) -> None:
    # The middle of a long pass is streamed: a file not laid out for jobs (every pass reads
    # every row group) does not hold whole row groups, nor push the edges out.
    storage, file = _month(tmp_path, ["A", "B", "C", "D"], group_rows=100)
    cache = ParquetCache()
    whole, _ = _read(storage, file, ["A", "B", "C", "D"], cache)
    _, middle = _read(storage, file, ["B"], cache)
    _, last = _read(storage, file, ["D"], cache)
    assert whole.num_rows == 400 and middle > 0 and last == 0 and cache.hits == 1


def test_a_row_group_is_split_into_the_same_batches_kept_or_streamed(tmp_path: Path) -> None:
    # A job's sums over batches must not depend on its batch mates: B's row group is streamed
    # in the middle of the first pass and read whole through the cache in the second.
    storage, file = _month(tmp_path, ["A", "B", "C", "D"], group_rows=100)

    def b_batches(securities: list[str]) -> list[int]:
        batches = read_batches(storage, file, ALL_COLUMNS, security=securities, batch_rows=32, cache=ParquetCache())
        return [b.num_rows for b in batches if b.column("security")[0].as_py() == "B"]

    assert b_batches(["A", "B", "C", "D"]) == b_batches(["B"]) == [32, 32, 32, 4]


def test_a_view_sharing_footers_keeps_no_row_group(tmp_path: Path) -> None:
    # A worker's pass over a part of a month reads through such a view: no later batch reads
    # that pass's edge row groups again, which would otherwise stay decoded.
    storage, file = _month(tmp_path, ["A", "B", "C", "D"], group_rows=100)
    cache = ParquetCache()
    view = cache.sharing_footers()
    whole, _ = _read(storage, file, ["A", "B", "C", "D"], view)
    _, last = _read(storage, file, ["D"], view)
    _, first = _read(storage, file, ["A"], cache)
    _, footer_and_first = _read(storage, file, ["A"], ParquetCache())

    assert whole.num_rows == 400
    assert last > 0 and view.hits == cache.hits == 0  # the edges were not kept
    assert 0 < first < footer_and_first  # the footer the view read is the cache's


def test_a_row_group_of_one_security_is_read_only_for_that_securitys_own_days(tmp_path: Path) -> None:
    """A batch holding all of one security's days and the last day of another (as where a
    batch's jobs end inside a large security) reads the second one's row groups of that day
    only, although the batch as a whole spans every day."""

    day_ns, rows_per_day = 86_400 * 10**9, 1_000
    start = 1_709_251_200_000_000_000  # 2024-03-01T00:00Z
    keys = [(s, d, i) for s in ("AAA", "BBB") for d in range(4) for i in range(rows_per_day)]
    table = pa.table({
        "ts": pa.array([start + d * day_ns + i * 10**6 for _, d, i in keys], pa.int64()).cast(TS),
        "security": [s for s, _, _ in keys],
        "price": [1.0] * len(keys),
        "size": [1] * len(keys),
        "side": ["B"] * len(keys),
    })
    (tmp_path / MONTH).mkdir()
    # A row group per (security, day): eight, each of one security.
    pq.write_table(table, tmp_path / MONTH / "part.parquet", row_group_size=rows_per_day)
    storage = open_storage(str(tmp_path))
    [file] = month_files(storage, MONTH)
    days = [DayWindow(start + d * day_ns, start + (d + 1) * day_ns) for d in range(4)]
    batch = DayWindow(days[0].start_ns, days[3].end_ns)

    def read(own: dict[str, DayWindow] | None) -> tuple[pa.Table, int]:
        counter = ByteCounter()
        batches = read_batches(storage, file, ALL_COLUMNS, security=["AAA", "BBB"], window=batch, counter=counter,
                               security_windows=own)
        return pa.Table.from_batches(list(batches)), counter.bytes

    everything, everything_bytes = read(None)
    own, own_bytes = read({"AAA": batch, "BBB": days[3]})
    # Every row of the batch's jobs is there: all of AAA's, and BBB's of its last day.
    assert own.filter(pa.compute.equal(own["security"], "AAA")).num_rows == 4 * rows_per_day
    bbb = own.filter(pa.compute.equal(own["security"], "BBB"))
    assert bbb.num_rows == rows_per_day and pa.compute.all(
        pa.compute.greater_equal(bbb["ts"], pa.scalar(days[3].start_ns, pa.int64()).cast(TS))).as_py()
    # Five row groups of eight read (rows are filtered by security only: whole row groups come
    # out), where the batch's span alone read all of them.
    assert own.num_rows == 5 * rows_per_day
    assert everything.num_rows == 8 * rows_per_day
    assert own_bytes < everything_bytes


@pytest.mark.parametrize("kind", ["date", "iso-text"])
def test_a_file_with_its_own_trade_date_is_read_by_the_days_its_statistics_give(tmp_path: Path, kind: str) -> None:
    """A row's own trade_date places it, not its ts: a pass over some days reads the row groups
    whose trade_date statistics hold them, and a group with undated rows where their ts fall
    too. Discovery takes a group's one trade date from the same statistics. Dates written as
    ISO text are read by their statistics too; as any of them might not read as a date (and
    take its ts's day), a group is also read where its ts fall."""
    day_ns, rows_per_day = 86_400 * 10**9, 500
    start = 1_709_251_200_000_000_000  # 2024-03-01T00:00Z
    first = 19_783  # 2024-03-01, in days since 1970-01-01
    # A row group per day of ts. Group 1's rows are reported late, dated the day before;
    # group 3's even rows carry no trade date (their ts gives it: day 3).
    dates: list[int | None] = [first] * (2 * rows_per_day)
    dates.extend([first + 2] * rows_per_day)
    dates.extend(None if i % 2 == 0 else first + 3 for i in range(rows_per_day))
    ts = [start + d * day_ns + i * 10**6 for d in range(4) for i in range(rows_per_day)]
    table = pa.table({"ts": pa.array(ts, pa.int64()).cast(TS), "security": ["AAA"] * len(ts),
                      "price": [1.0] * len(ts), "size": [1] * len(ts), "trade_date": pa.array(dates, pa.date32())})
    if kind == "iso-text":
        table = table.set_column(4, "trade_date", table.column("trade_date").cast(pa.string()))
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=rows_per_day)
    meta = pq.ParquetFile(tmp_path / "part.parquet").metadata
    schema = meta.schema.to_arrow_schema()

    def groups_of(first_day: int, last_day: int) -> list[int]:
        window = DayWindow.spanning(EPOCH + dt.timedelta(first_day),
                                    EPOCH + dt.timedelta(last_day), "UTC")
        return row_groups_to_read(meta, schema, ("AAA",), window)

    assert groups_of(first, first) == [0, 1]  # group 1's ts say day 1, its trade dates day 0
    assert groups_of(first + 2, first + 2) == [2]
    assert groups_of(first + 3, first + 3) == [3]
    if kind == "date":
        assert groups_of(first + 1, first + 1) == []
        assert groups_of(first + 1, first + 3) == [2, 3]
        assert _row_group_days(meta, "UTC") == [first, first, first + 2, None]
    else:
        assert groups_of(first + 1, first + 1) == [1]
        assert groups_of(first + 1, first + 3) == [1, 2, 3]
        assert _row_group_days(meta, "UTC") == [None] * 4
