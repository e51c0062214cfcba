"""`tickq ingest`: sorted, prunable Parquet plus an index, with exactly the rows of the input."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shared.inputs import ALL_COLUMNS, ByteCounter, month_files, normalise, read_batches
from shared.storage import LocalStorage, open_storage
from tests.conftest import S3Server
from tests.helpers import decoded
from tickq.gen import generate
from tickq.ingest import INDEX_NAME, add_arguments, ingest, main, read_index

MONTH = "2024-03"
RG = 8192


def ingested_files(out: Path, month: str = MONTH) -> list[Path]:
    return sorted((out / month).glob("part-*.parquet"))


def read_normalised(root: Path, month: str = MONTH, security: str | None = None) -> pd.DataFrame:
    """What a worker sees: every file of the month through read_batches + normalise."""
    storage = open_storage(str(root))
    frames = []
    for file in month_files(storage, month):
        for batch in read_batches(storage, file, ALL_COLUMNS, security=security, batch_rows=5000):
            table, valid = normalise(batch, "Australia/Sydney")
            frames.append(decoded(table).append_column("valid", valid).to_pandas())
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(list(frame.columns), ignore_index=True, na_position="last")


def assert_sorted(out: Path) -> pa.Table:
    table = pa.concat_tables(pq.read_table(p) for p in ingested_files(out))
    keys = list(
        zip(
            table.column("security").to_pylist(),
            pc.fill_null(table.column("ts").cast(pa.int64()), 2**63 - 1).to_pylist(),
            strict=True,
        )
    )
    non_null = [k for k in keys if k[0] is not None]
    assert non_null == sorted(non_null)
    assert all(k[0] is None for k in keys[len(non_null) :])  # null securities last
    return table


def assert_index_matches(out: Path, row_group_rows: int, month: str = MONTH) -> dict[str, Any]:
    index = json.loads((out / month / INDEX_NAME).read_text())
    assert index == read_index(open_storage(str(out)), month)
    assert index["month"] == month and index["sorted_by"] == ["security", "ts"]
    files = ingested_files(out, month)
    assert [f["key"] for f in index["files"]] == [f"{month}/{p.name}" for p in files]
    total = 0
    for entry, path in zip(index["files"], files, strict=True):
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        assert entry["bytes"] == path.stat().st_size
        assert entry["rows"] == meta.num_rows
        assert len(entry["row_groups"]) == meta.num_row_groups
        sec_i = parquet.schema_arrow.get_field_index("security")
        ts_i = parquet.schema_arrow.get_field_index("ts")
        data = path.read_bytes()
        # The encodings that make row groups cheap to decode (bench/RESULTS.md).
        if meta.num_row_groups:  # an empty month's file has none
            first = meta.row_group(0)
            chunks = {first.column(j).path_in_schema: first.column(j) for j in range(first.num_columns)}
            assert {"ts", "size"} <= {name for name, c in chunks.items() if "DELTA_BINARY_PACKED" in c.encodings}
            assert "RLE_DICTIONARY" in chunks["security"].encodings
            assert {c.compression for c in chunks.values()} == {"LZ4"}  # pyarrow's name for LZ4_RAW
        for i, group in enumerate(entry["row_groups"]):
            rg = meta.row_group(i)
            assert group["index"] == i and group["rows"] == rg.num_rows
            assert rg.num_rows <= row_group_rows
            if i < meta.num_row_groups - 1:
                assert rg.num_rows == row_group_rows
            sec, ts = rg.column(sec_i).statistics, rg.column(ts_i).statistics
            assert (group["security_min"], group["security_max"]) == (sec.min, sec.max)
            assert (group["ts_min_ns"], group["ts_max_ns"]) == (ts.min_raw, ts.max_raw)
            assert group["ts_min"].endswith("Z")
            starts = [
                min(rg.column(j).data_page_offset, rg.column(j).dictionary_page_offset or 2**62)
                for j in range(rg.num_columns)
            ]
            assert group["offset"] == min(starts)
            end = max(s + rg.column(j).total_compressed_size for j, s in enumerate(starts))
            assert group["offset"] + group["bytes"] == end <= len(data)
            total += rg.num_rows
    assert total == index["rows"]
    return index


@pytest.mark.parametrize("fmt", ["parquet", "csv.gz"])
def test_ingest_sorts_indexes_and_keeps_every_row(tmp_path: Path, fmt: str) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    gen = generate(str(raw), [MONTH], securities=25, rows=150_000, fmt=fmt, files_per_month=2)
    # A 4 MiB budget forces several buckets (and the merge of the biggest security).
    summary = ingest(str(raw), str(out), [MONTH], row_group_rows=RG, memory_budget_bytes=4 << 20)
    info = summary["months"][MONTH]
    assert info["rows"] == summary["rows"] == gen["rows"] == 150_000
    assert info["buckets"] > 1 and info["merged_buckets"] >= 1
    assert info["other_files"] == [] and info["input_files"] == 2

    table = assert_sorted(out)
    schema = pq.read_schema(ingested_files(out)[0])
    assert schema.field("security").type == pa.string()  # not dictionary: prunable
    assert schema.field("ts").type == pa.timestamp("ns", tz="UTC")
    assert "trade_date" not in schema.names  # the raw data has none: workers derive it
    assert table.num_rows == 150_000
    assert_index_matches(out, RG)

    # The same multiset of rows, as a worker normalises them (values, validity, dates).
    pd.testing.assert_frame_equal(read_normalised(raw), read_normalised(out))

    # ...and as pandas reads the raw file independently.
    if fmt == "parquet":
        raw_df = pd.concat(pd.read_parquet(p) for p in sorted((raw / MONTH).glob("*.parquet")))
    else:
        raw_df = pd.concat(
            pd.read_csv(p, keep_default_na=False, na_values=[""])
            for p in sorted((raw / MONTH).glob("*.csv.gz"))
        )
        raw_df["ts"] = pd.to_datetime(raw_df["ts"], utc=True, format="ISO8601")
    cols = ["security", "ts", "price", "size", "side", "participant", "venue"]
    want = raw_df[cols].sort_values(cols, ignore_index=True)
    got = table.to_pandas()[cols].sort_values(cols, ignore_index=True)
    want["ts"] = want["ts"].astype("datetime64[ns, UTC]")
    pd.testing.assert_frame_equal(want, got, check_dtype=False)


@pytest.mark.parametrize("order", ["time order", "no order"])
def test_rows_come_out_by_security_and_ts_with_ties_in_input_order(tmp_path: Path, order: str) -> None:
    """Market data in time order takes a cheaper sort than data in no order; both give each
    security's rows by ts, null ts last, and rows with equal keys in their input order, in
    buckets sorted whole and in buckets merged from runs alike."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    rng = np.random.default_rng(7)
    n = 40_000
    # Few distinct instants, so that many rows tie on (security, ts); one security holds
    # half the rows, so that its bucket is merged from sorted runs.
    ts = np.sort(rng.integers(0, 2_000, n)) * 1_000_000_000 + 1_709_251_200_000_000_000
    security = np.where(rng.random(n) < 0.5, "BIG", rng.choice([f"S{i:02d}" for i in range(30)], n))
    frame = pd.DataFrame(
        {
            "ts": pd.to_datetime(ts, utc=True).where(rng.random(n) > 0.01),  # some null ts
            "security": security,
            "price": np.arange(n, dtype=np.float64) + 1,  # tells rows with equal keys apart
            "size": np.ones(n, dtype=np.int64),
        }
    )
    if order == "no order":
        frame = frame.sample(frac=1, random_state=3, ignore_index=True)
    (raw / MONTH).mkdir(parents=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), raw / MONTH / "a.parquet", row_group_size=5000)

    summary = ingest(str(raw), str(out), [MONTH], row_group_rows=1024, memory_budget_bytes=2 << 20)
    info = summary["months"][MONTH]
    assert info["buckets"] > 1 and info["merged_buckets"] >= 1

    got = pa.concat_tables(pq.read_table(p) for p in ingested_files(out)).to_pandas()
    want = frame.sort_values(["security", "ts"], kind="stable", na_position="last", ignore_index=True)
    pd.testing.assert_frame_equal(got[["security", "ts", "price"]], want[["security", "ts", "price"]],
                                  check_dtype=False)


class CountingFile(io.FileIO):
    """A local file that counts the bytes read from it (as the S3 range reader does)."""

    bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer) or 0
        self.bytes_read += n
        return n


class CountingStorage(LocalStorage):
    def open_read(self, key: str) -> IO[bytes]:
        return CountingFile(self._path(key), "rb")


def test_one_security_reads_a_small_part_of_the_ingested_file(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [MONTH], securities=40, rows=200_000, fmt="parquet")
    ingest(str(raw), str(out), [MONTH], row_group_rows=RG)
    (path,) = ingested_files(out)
    counts = pq.read_table(path, columns=["security"]).column("security").value_counts()
    # A security with about 1/40 of the rows (shares are Zipf-like).
    by_rows = sorted((c["counts"], c["values"]) for c in counts.to_pylist())
    share, security = by_rows[len(by_rows) // 2]
    assert share < 0.05 * 200_000

    def read(root: Path) -> tuple[int, int]:
        storage = CountingStorage(root)
        counter = ByteCounter()
        rows = 0
        for file in month_files(storage, MONTH):
            for batch in read_batches(
                storage, file, ALL_COLUMNS, security=security, counter=counter
            ):
                rows += batch.num_rows
        return rows, counter.bytes

    raw_rows, raw_bytes = read(raw)
    rows, read_bytes = read(out)
    assert rows == raw_rows > 0
    size = path.stat().st_size
    assert read_bytes < 0.1 * size, (read_bytes, size)
    assert read_bytes < 0.1 * raw_bytes, (read_bytes, raw_bytes)


def test_bad_rows_are_kept_as_the_worker_would_reject_them(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    lines = [
        "ts,security,price,size,side,participant,venue,trade_date,extra",
        "2024-03-04T00:00:01Z,BHP,10.5,100,b,P1,CP,,x",
        "2024-03-04T00:00:02Z,BHP,,100,S,,TM,,x",  # null price
        "2024-03-04T00:00:03Z,BHP,abc,1.5,SELL,P1,,2024-03-05,x",  # bad price and size
        "2024-03-04T00:00:04Z,,10,5,A,P2,CP,,x",  # empty security -> null in CSV
        "not a time,CBA,10,5,BUY,P2,CP,garbage,x",  # bad ts
        "1709510400000000000,CBA,-1,5,X,P3,CP,2024-03-01,x",  # integer ns; price <= 0
        "2024-03-04 10:00:00,AAA,1e3,100.0,s,P3,TM,,x",  # naive ts = UTC; size 100.0 is 100
    ]
    (raw / MONTH).mkdir(parents=True)
    with gzip.open(raw / MONTH / "a.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    summary = ingest(str(raw), str(out), [MONTH], row_group_rows=3)
    assert summary["rows"] == 7
    table = assert_sorted(out)
    assert "trade_date" in table.schema.names and "extra" not in table.schema.names
    assert table.column("security").to_pylist()[-1] is None
    assert_index_matches(out, 3)
    before, after = read_normalised(raw), read_normalised(out)
    pd.testing.assert_frame_equal(before, after)
    assert before["valid"].sum() == 2


def test_reingest_replaces_parts_and_empty_month(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [MONTH], securities=5, rows=30_000, fmt="csv")
    first = ingest(str(raw), str(out), [MONTH], row_group_rows=1000, max_file_rows=8000)
    assert len(first["months"][MONTH]["files"]) == 4
    assert_index_matches(out, 1000)
    (out / MONTH / "notes.csv").write_text("ts,security,price,size\n")
    second = ingest(str(raw), str(out), [MONTH], row_group_rows=RG)
    info = second["months"][MONTH]
    assert len(info["files"]) == 1 and len(info["removed"]) == 3
    assert info["other_files"] == [str(out / MONTH / "notes.csv")]
    assert len(ingested_files(out)) == 1
    assert_index_matches(out, RG)

    generate(str(raw), ["2024-04"], securities=5, rows=0, fmt="parquet")
    empty = ingest(str(raw), str(out), ["2024-04"])
    assert empty["rows"] == 0
    assert pq.read_table(ingested_files(out, "2024-04")[0]).num_rows == 0
    assert assert_index_matches(out, RG, "2024-04")["rows"] == 0


def test_cli_main_and_argument_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [MONTH, "2024-04"], securities=5, rows=5000, fmt="parquet")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--input", str(raw), "--output", str(out), "--months", "2024-03..2024-04", "--json",
         "--row-group-rows", "1000"]
    )  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 10_000 and set(summary["months"]) == {MONTH, "2024-04"}
    assert_index_matches(out, 1000, "2024-04")
    with pytest.raises(ValueError, match="differ"):
        ingest(str(raw), str(raw), [MONTH])


def test_a_failed_month_leaves_the_others_ingested_and_no_spill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A month without input, and one whose input fails half-way through its spill, are
    reported in `failed`, one line each; the months after them are still ingested, and the
    failed month's spill files do not stay on the scratch disk for the months after it."""
    import tickq.ingest as ingest_module
    from shared.errors import PermanentError

    raw, out, scratch = tmp_path / "raw", tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    generate(str(raw), ["2024-01", "2024-03", "2024-04"], securities=3, rows=900, fmt="parquet")
    spill_month = ingest_module.spill_month
    work_folders: list[list[str]] = []  # the months' work folders as each spill begins

    def spill_failing_in_march(source: Any, files: Any, plan: Any, spill: Any, budget: int) -> Any:
        work_folders.append(sorted(p.name[:7] for p in scratch.glob("tickq-ingest-*/*")))
        if files[0].key.startswith("2024-03"):
            spill_month(source, files, plan, spill, budget)
            raise PermanentError("2024-03/part-0000.parquet: unreadable (injected)")
        return spill_month(source, files, plan, spill, budget)

    monkeypatch.setattr(ingest_module, "spill_month", spill_failing_in_march)
    summary = ingest(str(raw), str(out), ["2024-01", "2024-02", "2024-03", "2024-04"], tmp_dir=scratch)
    assert sorted(summary["months"]) == ["2024-01", "2024-04"]
    assert summary["failed"] == {
        "2024-02": f"no input for month 2024-02 under {raw} (expected 2024-02/… or "
                   "2024-02.parquet|csv|csv.gz|dbn|dbn.zst)",
        "2024-03": "2024-03/part-0000.parquet: unreadable (injected)",
    }
    assert summary["rows"] == 1800
    for month in ("2024-01", "2024-04"):
        assert_index_matches(out, 131_072, month)
    assert not (out / "2024-03").exists()
    # April's spill began with March's work folder gone.
    assert work_folders == [["2024-01"], ["2024-03"], ["2024-04"]]
    assert list(scratch.iterdir()) == []


def test_cli_exit_status_says_whether_every_month_was_ingested(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), ["2024-01"], securities=3, rows=500, fmt="parquet")

    def ingest_cli(months: str, *extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tickq", "ingest", "--input", str(raw), "--output", str(out),
                "--months", months, "--json", "--quiet", *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    some = ingest_cli("2024-01..2024-02")
    assert some.returncode == 3
    assert list(json.loads(some.stdout)["failed"]) == ["2024-02"]
    [line] = some.stderr.splitlines()
    assert line.startswith("tickq ingest: 2024-02: no input for month 2024-02")
    # Nothing in place: the command failed, one line on stderr as every command's failure.
    none = ingest_cli("2024-02")
    assert none.returncode == 2 and none.stdout == ""
    assert none.stderr.splitlines() == [f"tickq ingest: no input for month 2024-02 under {raw} "
                                        "(expected 2024-02/… or 2024-02.parquet|csv|csv.gz|dbn|dbn.zst)"]
    two = ingest_cli("2024-02,2024-04")
    assert two.returncode == 2 and two.stderr.strip().endswith("(and 1 more month(s) failed)")
    assert ingest_cli("2024-01").returncode == 0
    # A month left unchanged is in place too: the other month's failure is partial.
    unchanged = ingest_cli("2024-01..2024-02", "--skip-unchanged")
    assert unchanged.returncode == 3 and list(json.loads(unchanged.stdout)["skipped"]) == ["2024-01"]


def test_skip_unchanged_leaves_only_months_ingested_as_asked_from_the_same_input(tmp_path: Path) -> None:
    """`skip_unchanged` leaves a month whose output was made from the same input files with the
    same options and is whole; a month whose input was written again, asked with other row
    groups or day files, or whose output is not whole (a part written again, a stray part) is
    ingested again."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    months = ["2024-01", "2024-02"]
    generate(str(raw), months, securities=3, rows=2000, fmt="parquet")
    first = ingest(str(raw), str(out), months, row_group_rows=500)
    assert sorted(first["months"]) == months and first["skipped"] == {}
    january = ingested_files(out, "2024-01")
    stamps = [p.stat().st_mtime_ns for p in january]

    again = ingest(str(raw), str(out), months, row_group_rows=500, skip_unchanged=True)
    assert again["months"] == {} and sorted(again["skipped"]) == months
    assert [p.stat().st_mtime_ns for p in ingested_files(out, "2024-01")] == stamps  # not written again
    assert ingest(str(raw), str(out), months, row_group_rows=1000, skip_unchanged=True)["skipped"] == {}

    # February's input written again, the same rows at the same size: only its version (on a
    # local disk its modification time, set a second on to be sure) tells.
    generate(str(raw), ["2024-02"], securities=3, rows=2000, fmt="parquet")
    for path in (raw / "2024-02").iterdir():
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    changed = ingest(str(raw), str(out), months, row_group_rows=1000, skip_unchanged=True)
    assert list(changed["skipped"]) == ["2024-01"] and list(changed["months"]) == ["2024-02"]

    # A part written again since, at the same size (a byte of its footer's text changed).
    part = ingested_files(out, "2024-02")[0]
    body = bytearray(part.read_bytes())
    at = body.rfind(b"parquet-cpp")
    body[at] = ord("P")
    part.write_bytes(bytes(body))
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    rewritten = ingest(str(raw), str(out), months, row_group_rows=1000, skip_unchanged=True)
    assert list(rewritten["skipped"]) == ["2024-01"] and list(rewritten["months"]) == ["2024-02"]

    # A part no index names (left by an ingest stopped half-way) would be read by runs.
    stray = out / "2024-01" / "part-00009.parquet"
    stray.write_bytes(january[0].read_bytes())
    mended = ingest(str(raw), str(out), months, row_group_rows=1000, skip_unchanged=True)
    assert list(mended["months"]) == ["2024-01"] and not stray.exists()
    assert_index_matches(out, 1000, "2024-01")

    with_days = ingest(str(raw), str(out), months, row_group_rows=1000, day_files_tz="UTC", skip_unchanged=True)
    assert sorted(with_days["months"]) == months, "day files asked where none were cut"
    assert sorted(ingest(str(raw), str(out), months, row_group_rows=1000, day_files_tz="UTC",
                         skip_unchanged=True)["skipped"]) == months
    assert ingest(str(raw), str(out), months, row_group_rows=1000, day_files_tz="Australia/Sydney",
                  skip_unchanged=True)["skipped"] == {}, "day files of another zone"


def test_skip_unchanged_on_s3_goes_by_the_inputs_etags(tmp_path: Path, s3_server: S3Server) -> None:
    """On S3 a file's version is its ETag: a month whose input object was written again with
    other bytes of the same size is ingested again, the others are left."""
    bucket = s3_server.new_bucket()
    raw, out = f"s3://{bucket}/raw", f"s3://{bucket}/ingested"
    months = ["2024-01", "2024-02"]
    generate(raw, months, securities=3, rows=1500, fmt="csv", endpoint_url=s3_server.endpoint)
    assert sorted(ingest(raw, out, months, endpoint_url=s3_server.endpoint)["months"]) == months
    source = open_storage(raw, s3_server.endpoint)
    [february] = month_files(source, "2024-02")
    body = bytearray(source.read_bytes(february.key))
    last_digit = max(body.rfind(bytes([digit])) for digit in b"0123456789")
    body[last_digit] = ord("5") if body[last_digit] != ord("5") else ord("6")  # same size, other bytes
    source.write_bytes(february.key, bytes(body))
    again = ingest(raw, out, months, endpoint_url=s3_server.endpoint, skip_unchanged=True)
    assert list(again["skipped"]) == ["2024-01"] and list(again["months"]) == ["2024-02"]


def test_shards_share_the_months_each_month_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three processes given the same months and shards 0/3, 1/3 and 2/3 ingest every month
    exactly once between them; a shard past the last month has nothing to do and says so."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    months = ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05"]
    generate(str(raw), months, securities=3, rows=600, fmt="parquet")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ingested: dict[str, list[str]] = {}
    for index in range(3):
        args = parser.parse_args(["--input", str(raw), "--output", str(out), "--months", "2024-01..2024-05",
                                  "--shard", f"{index}/3", "--json"])
        assert main(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["shard"] == f"{index}/3"
        ingested[summary["shard"]] = sorted(summary["months"])
    # Every third month from each shard's own: early and late months alike.
    assert ingested == {"0/3": ["2024-01", "2024-04"], "1/3": ["2024-02", "2024-05"], "2/3": ["2024-03"]}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == months
    for month in months:
        assert_index_matches(out, 131_072, month)

    spare = parser.parse_args(["--input", str(raw), "--output", str(out / "spare"), "--months", "2024-01..2024-02",
                               "--shard", "2/3"])
    assert main(spare) == 0
    assert capsys.readouterr().out.strip() == "shard 2/3: none of the 2 month(s) given falls to it"
    assert not (out / "spare").exists()


@pytest.mark.parametrize("bad", ["3/3", "-1/3", "1", "1/0", "a/b", "1/2/3", ""])
def test_a_bad_shard_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    argv = [sys.executable, "-m", "tickq", "ingest", "--input", str(tmp_path), "--output", str(tmp_path / "out"),
            "--months", "2024-01", f"--shard={bad}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "--shard" in line and "INDEX/COUNT" in line and "Traceback" not in done.stderr


def test_quiet_leaves_the_json_summary_alone(tmp_path: Path) -> None:
    """`--json` puts the metrics lines on stderr; `--quiet` leaves none anywhere."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [MONTH], securities=5, rows=5000, fmt="parquet")

    def ingest_cli(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tickq", "ingest", "--input", str(raw), "--output", str(out),
                "--months", MONTH, "--json", *extra]
        return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)

    loud = ingest_cli()
    assert json.loads(loud.stdout)["rows"] == 5000
    assert "ingest.month" in [json.loads(line)["event"] for line in loud.stderr.splitlines()]
    quiet = ingest_cli("--quiet")
    assert json.loads(quiet.stdout)["rows"] == 5000
    assert quiet.stderr == ""


def test_many_buckets_with_few_open_spill_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spill writers closed and reopened (new segments) still give every row, sorted."""
    import tickq.ingest.sort as ingest_sort

    monkeypatch.setattr(ingest_sort, "MAX_OPEN_SPILLS", 2)
    raw, out = tmp_path / "raw", tmp_path / "out"
    generate(str(raw), [MONTH], securities=60, rows=80_000, fmt="parquet")
    summary = ingest(str(raw), str(out), [MONTH], row_group_rows=2048, memory_budget_bytes=1 << 20)
    assert summary["months"][MONTH]["buckets"] >= 10
    assert assert_sorted(out).num_rows == 80_000
    assert_index_matches(out, 2048)
    pd.testing.assert_frame_equal(read_normalised(raw), read_normalised(out))
