"""Large CSV files read as slices of whole lines.

Discovery cuts an uncompressed CSV file into slices, reads them side by side and records what
each holds (rows, the range of ts and of security codes); a worker's pass over some dates
then reads only the slices that may hold them. Whatever the cuts, the rows that come out are
the file's rows, each once, as reading it whole gives them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest

from producer import discover
from producer.discover import discover_month
from shared.errors import PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    ByteCounter,
    DayWindow,
    FileSlice,
    InputFile,
    csv_reader,
    csv_slices,
    month_files,
    pass_share,
    read_batches,
    sliced_files_json,
    with_stored_slices,
)
from shared.storage import open_storage
from tests.conftest import S3Server, Tickq
from tests.helpers import normalised_rows, read_tables, upload_dir
from tests.reference import assert_tables_equal, reference_tables

MONTH = "2024-03"
TZ = "Australia/Sydney"
HEADER = "ts,security,price,size,side,participant,venue"
SECURITIES = ["BHP", "CBA", "NAB", "WDS"]


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of a few kilobytes and blocks of a few dozen rows: every file here is cut many times."""
    monkeypatch.setattr(csv_reader, "CSV_SLICE_BYTES", 4096)
    monkeypatch.setattr(csv_reader, "CSV_BLOCK_BYTES", 2048)
    monkeypatch.setattr(csv_reader, "CSV_PROBE_BYTES", 512)


def month_rows(n: int = 2000, days: int = 6) -> list[list[str]]:
    """`n` orders in time order over `days` trading days in Sydney (UTC the day before)."""
    rows = []
    for i in range(n):
        day, second = divmod(i * days * 6 * 3600 // n, 6 * 3600)
        at = dt.datetime(2024, 3, 3 + day, 23, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=second, microseconds=i)
        rows.append([at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), SECURITIES[i % 4], f"{10 + i % 17}.{i % 100:02d}",
                     str(1 + i % 500), "BS"[i % 2], f"P{i % 3}", "CP" if i % 5 else "TM"])
    return rows


def write(root: Path, rows: list[list[str]], line_end: str = "\n", header: str = HEADER) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{MONTH}.csv"
    path.write_bytes(line_end.join([header, *(",".join(r) for r in rows)]).encode() + line_end.encode())
    return path


def the_file(root: Path) -> tuple[Any, InputFile]:
    storage = open_storage(str(root))
    (file,) = month_files(storage, MONTH)
    return storage, file


def rows_of(batches: list[pa.RecordBatch]) -> list[dict[str, Any]]:
    return normalised_rows(batches, TZ)


def read(storage: Any, file: InputFile, **kwargs: Any) -> list[pa.RecordBatch]:
    return list(read_batches(storage, file, ALL_COLUMNS, batch_rows=100, **kwargs))


@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
def test_slices_hold_every_row_once_whatever_the_line_ends(tmp_path: Path, line_end: str) -> None:
    rows = month_rows()
    rows[700][2] = "abc"  # a value the typed read cannot take: that slice goes on as text
    rows[1500][0] = "1709596800000000000"  # integer ns after ISO text: the same
    path = write(tmp_path, rows, line_end)
    storage, file = the_file(tmp_path)
    whole = rows_of(read(storage, file))
    assert len(whole) == 2000

    pieces = csv_slices(storage, file)
    assert len(pieces) >= 10
    data = path.read_bytes()
    assert pieces[0].start == len(HEADER) + len(line_end) and pieces[-1].end == len(data)
    for before, after in itertools.pairwise(pieces):
        assert before.end == after.start and data[after.start - 1:after.start] in (b"\n", b"\r")
    one_by_one = [r for piece in pieces for r in rows_of(read(storage, dataclasses.replace(file, slices=(piece,))))]
    assert one_by_one == whole
    assert rows_of(read(storage, dataclasses.replace(file, slices=tuple(pieces)))) == whole


def test_small_compressed_and_headerless_first_line_files_are_read_whole(tmp_path: Path) -> None:
    write(tmp_path / "small", month_rows(50))
    write(tmp_path / "blank", month_rows(), header="\n" + HEADER)  # the header is not the first line
    for name in ("small", "blank"):
        assert csv_slices(*the_file(tmp_path / name)) == []
    storage = open_storage(str(tmp_path))
    assert csv_slices(storage, InputFile("x.csv.gz", 10**9, "csv.gz")) == []
    assert csv_slices(storage, InputFile("x.parquet", 10**9, "parquet")) == []


def test_discovery_reads_slices_and_records_what_they_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = month_rows()
    rows[10][0] = ""  # no ts: the row is of no day, and bounds no slice
    write(tmp_path, rows)
    storage, file = the_file(tmp_path)
    found = discover_month(storage, MONTH, TZ)
    with monkeypatch.context() as m:  # the same month read whole
        m.setattr(csv_reader, "CSV_SLICE_BYTES", 1 << 30)
        whole = discover_month(storage, MONTH, TZ)
    (read_whole,) = whole.sliced  # a file read whole is recorded too: one slice, the whole file
    assert [(p.start, p.end, p.rows) for p in read_whole.slices] == [(0, file.size, 2000)] and not read_whole.cut
    assert found == whole
    assert found.rows_scanned == 2000 and found.rows_unassigned == 1

    (sliced,) = found.sliced
    assert (sliced.key, sliced.size) == (file.key, file.size)
    assert [(p.start, p.end) for p in sliced.slices] == [(p.start, p.end) for p in csv_slices(storage, file)]
    assert sum(p.rows for p in sliced.slices) == 2000
    for piece in sliced.slices:
        got = rows_of(read(storage, dataclasses.replace(file, slices=(dataclasses.replace(piece, ts=None,
                                                                                        security=None),))))
        instants = [r["ts"].value for r in got if r["ts"] is not None]
        assert piece.ts == (min(instants), max(instants))
        assert piece.security == (min(r["security"] for r in got), max(r["security"] for r in got))


def test_a_read_for_some_dates_or_securities_skips_the_slices_that_cannot_hold_them(tmp_path: Path) -> None:
    rows = month_rows()
    write(tmp_path / "by-time", rows)
    write(tmp_path / "by-security", sorted(rows, key=lambda r: (r[1], r[0])))
    day = dt.date(2024, 3, 6)
    window = DayWindow.of(day, TZ)
    for name, security, within in (("by-time", None, window), ("by-security", ["CBA"], None)):
        storage, file = the_file(tmp_path / name)
        (sliced,) = discover_month(storage, MONTH, TZ).sliced
        whole = rows_of(read(storage, file, security=security))
        counter = ByteCounter()
        some = rows_of(read(storage, sliced, security=security, window=within, counter=counter))
        if name == "by-time":
            assert [r for r in some if r["trade_date"] == day] == [r for r in whole if r["trade_date"] == day]
            assert pass_share(storage, [sliced], ["CBA"], window) < 0.5  # a pass over one date reads a part
        else:
            assert some == whole
            assert pass_share(storage, [sliced], ["CBA"], None) < 0.5
        assert 0 < counter.bytes < file.size / 2
        assert pass_share(storage, [sliced], SECURITIES, None) == 1.0


def test_a_file_with_its_own_trade_dates_is_sliced_by_them(tmp_path: Path) -> None:
    """Where a file carries its own trade_date, its rows' dates (not their ts) place them: each
    slice records the range of its rows' dates, and a read for some dates takes the slices that
    hold them, late reports dated the day before included."""
    rows = month_rows()
    dated = []
    for i, row in enumerate(rows):
        local = dt.datetime.fromisoformat(row[0]).astimezone(ZoneInfo(TZ)).date()
        # Every 50th order is a late report, dated the trading day before its ts (if any).
        own = local - dt.timedelta(days=1) if i % 50 == 49 and local > dt.date(2024, 3, 4) else local
        dated.append([*row, own.isoformat() if i % 7 else ""])  # and every 7th has no date: its ts gives it
    write(tmp_path, dated, header=HEADER + ",trade_date")
    storage, file = the_file(tmp_path)
    (sliced,) = discover_month(storage, MONTH, TZ).sliced
    assert all(piece.ts is None and piece.days is not None for piece in sliced.slices)
    whole = rows_of(read(storage, file))
    for day in (dt.date(2024, 3, 5), dt.date(2024, 3, 8)):
        window = DayWindow.of(day, TZ)
        counter = ByteCounter()
        some = rows_of(read(storage, sliced, window=window, counter=counter))
        assert [r for r in some if r["trade_date"] == day] == [r for r in whole if r["trade_date"] == day]
        assert any(r["ts"].tz_convert(TZ).date() != day for r in some if r["trade_date"] == day)  # late reports
        assert 0 < counter.bytes < file.size / 2
        assert pass_share(storage, [sliced], ["CBA"], window) < 0.5


def test_a_file_changed_since_discovery_fails_in_one_line_rather_than_reading_wrong_rows(tmp_path: Path) -> None:
    path = write(tmp_path, month_rows())
    storage = open_storage(str(tmp_path))
    (sliced,) = discover_month(storage, MONTH, TZ).sliced
    data = path.read_bytes()
    path.write_bytes(data[:len(HEADER) + 1] + b"x" + data[len(HEADER) + 1:-1])  # same size, lines moved by one
    for piece in sliced.slices[0], sliced.slices[3]:  # a slice's end, or its start, is no longer a line's
        with pytest.raises(PermanentError, match=r"2024-03\.csv changed since the run found its jobs .*produce"):
            read(storage, dataclasses.replace(sliced, slices=(piece,)))
    assert len(rows_of(read(storage, sliced))) == 2000  # all of them still read as one span: the file's lines
    # A file of another size is read whole: its stored slices are left aside.
    path.write_bytes(data + data[len(HEADER) + 1:])
    (grown,) = month_files(storage, MONTH)
    assert with_stored_slices([grown], sliced_files_json([sliced])) == [grown]
    assert len(rows_of(read(storage, grown))) == 4000


def test_slices_on_s3_are_read_with_ranged_requests_as_on_a_local_disk(tmp_path: Path, s3_server: S3Server) -> None:
    write(tmp_path / "local", month_rows(), "\r\n")
    bucket = s3_server.new_bucket()
    upload_dir(tmp_path / "local", s3_server.client(), bucket, "raw")
    local = the_file(tmp_path / "local")
    remote = open_storage(f"s3://{bucket}/raw", s3_server.endpoint)
    (sliced_here,) = discover_month(local[0], MONTH, TZ).sliced
    found = discover_month(remote, MONTH, TZ)
    # The same slices (the files' versions differ: a modification time here, an ETag there).
    assert [(f.key, f.size, f.slices) for f in found.sliced] == [
        (sliced_here.key, sliced_here.size, sliced_here.slices)]
    window = DayWindow.of(dt.date(2024, 3, 5), TZ)
    assert rows_of(read(remote, found.sliced[0], window=window)) == rows_of(read(local[0], sliced_here, window=window))
    assert rows_of(read(remote, found.sliced[0])) == rows_of(read(*local))


def test_stored_slices_round_trip_and_a_damaged_record_is_a_clear_error() -> None:
    pieces = (FileSlice(10, 20, 3, (1, 2), ("A", "B")), FileSlice(20, 35, 0, None, None, (19_783, 19_790)))
    files = [InputFile("2024-03.csv", 35, "csv", pieces), InputFile("2024-03/b.csv", 7, "csv")]
    bare = [dataclasses.replace(f, slices=()) for f in files]
    assert with_stored_slices(bare, sliced_files_json(files[:1])) == [files[0], bare[1]]
    # A record of the version before whole-file slices (a run produced before an upgrade) reads.
    version_1 = sliced_files_json(files[:1]).replace(b'"v":2', b'"v":1')
    assert version_1 != sliced_files_json(files[:1]) and with_stored_slices(bare, version_1) == [files[0], bare[1]]
    # A slice recorded without its days (by a version before them) has none.
    assert FileSlice.from_json([10, 20, 3, [1, 2], ["A", "B"]]) == pieces[0]
    # A file written again since discovery (its listed version differs) is read whole; a
    # listing or a record without versions matches by key and size.
    versioned = [dataclasses.replace(f, version="v1") for f in files]
    assert with_stored_slices([dataclasses.replace(bare[0], version="v2"), bare[1]],
                              sliced_files_json(versioned[:1])) == [dataclasses.replace(bare[0], version="v2"), bare[1]]
    assert with_stored_slices([dataclasses.replace(bare[0], version="v1")], sliced_files_json(versioned[:1])) == [
        versioned[0]]
    assert with_stored_slices(bare[:1], sliced_files_json(versioned[:1])) == files[:1]
    for damaged in (b"{", b'{"v": 9, "files": []}', b'{"v": 1, "files": [{"key": "a"}]}'):
        with pytest.raises(PermanentError, match="slices of input files do not parse"):
            with_stored_slices(bare, damaged)


def test_a_run_over_a_sliced_csv_month_equals_the_independent_computation(
    tickq: Tickq, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.layout import RunLayout
    from tickq.cli import main

    data, out = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "30000", "--securities", "6",
              "--format", "csv")
    monkeypatch.setattr(discover, "MAX_SCAN_STREAMS", 2)
    for name, value in tickq.env.items():
        monkeypatch.setenv(name, value)
    # Produced in this process, where slices are a few kilobytes; the workers follow them.
    assert main(["produce", "--input", str(data), "--output", str(out), "--months", MONTH, "--run-id", "run1",
                 "--market-tz", TZ, "--quiet"]) == 0
    stored = open_storage(str(out)).read_bytes(RunLayout("run1").month_slices(MONTH))
    (file,) = with_stored_slices(month_files(open_storage(str(data)), MONTH), stored)
    assert len(file.slices) > 100
    tickq.wait_all(tickq.workers(2))
    tickq.run("aggregate", "--run", "run1", "--output", str(out), "--wait", "120")
    assert_tables_equal(read_tables(str(out), "run1"), reference_tables(str(data), [MONTH], market_tz=TZ))
