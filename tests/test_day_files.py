"""Day files (`tickq ingest --day-files ZONE`): one small file per job's rows, which jobs read
on their own or in small batches instead of the month's row groups, with identical results."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from shared.dayfiles import day_file_key, manifest_key, month_prefix
from shared.errors import PermanentError
from shared.inputs import job_dates
from shared.layout import JobKey
from shared.messages import JobMessage, JobParams
from shared.storage import S3Storage, open_storage
from tests.conftest import S3Server
from tests.helpers import discovered_keys, run_in_batches, stored_results
from tickq.gen import generate
from tickq.ingest import ingest
from worker.compute import DAY_FILE_JOBS
from worker.job import JobOutcome, MonthListings, execute_batch

MONTH = "2024-03"
TZ = "Australia/Sydney"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("days")
    generate(str(root / "raw"), [MONTH], securities=12, rows=60_000)
    ingest(str(root / "raw"), str(root / "parts"), [MONTH], row_group_rows=8_192)
    summary = ingest(str(root / "raw"), str(root / "days"), [MONTH], row_group_rows=8_192, day_files_tz=TZ)
    assert summary["months"][MONTH]["day_files_skipped"] is None
    return root


def _keys(source: Path) -> list[JobKey]:
    return discovered_keys(source, MONTH, TZ)


def _run(source: Path, output: Path, keys: list[JobKey], batch: int, market_tz: str = TZ) -> list[JobOutcome]:
    """Every job of `keys` in batches of `batch`, in key order (one process cache for all)."""
    jobs = [JobMessage.build(run_id="r1", month=MONTH, security=k.security, date=k.date, input=str(source),
                             output=str(output), processor="analytics", params=JobParams(market_tz=market_tz))
            for k in keys]
    return run_in_batches(jobs, batch, MonthListings())


def assert_same_results(got: pa.Table, expected: pa.Table) -> None:
    """Equal tables, but for the last bits of sums of prices: the parts split a job's rows
    where row groups end, a day file does not, and floating-point sums depend on the order."""
    assert got.schema == expected.schema and got.num_rows == expected.num_rows
    for name in got.column_names:
        column, wanted = got.column(name), expected.column(name)
        kind = column.type.value_type if pa.types.is_list(column.type) else column.type
        if not pa.types.is_floating(kind):
            assert column.equals(wanted), name
            continue
        if pa.types.is_list(column.type):
            assert pc.list_value_length(column).equals(pc.list_value_length(wanted)), name
            column, wanted = pc.list_flatten(column), pc.list_flatten(wanted)
        np.testing.assert_allclose(column.to_numpy(), wanted.to_numpy(), rtol=1e-12, err_msg=name)


def _day_file(root: Path, key: JobKey) -> Path:
    return root / day_file_key(key.month, key.security, key.date)


def test_each_day_file_holds_exactly_its_jobs_rows_in_the_parts_order(data: Path) -> None:
    parts = pa.concat_tables(pq.read_table(p) for p in sorted((data / "days" / MONTH).glob("part-*.parquet")))
    days = job_dates(parts.column("ts").combine_chunks(), None, TZ)
    keys = _keys(data / "days")
    files = sorted(p for p in (data / "days" / month_prefix(MONTH)).rglob("*.parquet"))
    assert len(files) == len(keys) > 200
    for key in keys[::7]:
        wanted = pc.and_(pc.equal(parts.column("security"), key.security),
                         pc.equal(days, pa.scalar(dt.date.fromisoformat(key.date), pa.date32())))
        expected = parts.filter(pc.fill_null(wanted, False))
        assert pq.read_table(_day_file(data / "days", key)).equals(expected)
    manifest = json.loads((data / "days" / manifest_key(MONTH)).read_text())
    assert manifest["market_tz"] == TZ and manifest["files"] == len(keys)
    assert manifest["parts"] == [{"key": f"{MONTH}/{p.name}", "size": p.stat().st_size}
                                 for p in sorted((data / "days" / MONTH).glob("part-*.parquet"))]
    # The parts and everything else of the layout are those of an ingest without day files.
    assert sorted(p.name for p in (data / "days" / MONTH).iterdir()) == sorted(
        p.name for p in (data / "parts" / MONTH).iterdir())


@pytest.mark.parametrize("batch", [1, DAY_FILE_JOBS])
def test_small_batches_read_their_day_files_and_store_what_the_parts_give(
    data: Path, tmp_path: Path, batch: int
) -> None:
    keys = _keys(data / "days")
    from_days = _run(data / "days", tmp_path / "days", keys, batch)
    from_parts = _run(data / "parts", tmp_path / "parts", keys, batch)

    assert_same_results(stored_results(tmp_path / "days"), stored_results(tmp_path / "parts"))
    counts = ("rows_read", "rows_accepted", "rows_rejected", "rows_filtered")
    assert [[getattr(o, c) for c in counts] for o in from_days] == [[getattr(o, c) for c in counts] for o in from_parts]
    # A batch reads its jobs' day files and nothing else: each job its share of them.
    day_bytes = [_day_file(data / "days", key).stat().st_size for key in keys]
    for start in range(0, len(keys), batch):
        share = sum(day_bytes[start:start + batch]) // len(keys[start:start + batch])
        assert {o.bytes_in for o in from_days[start:start + batch]} == {share}
    # On its own, a job reads its day file instead of a row group of each column and a footer.
    [alone] = _run(data / "parts", tmp_path / "alone", keys[len(keys) // 2:][:1], 1)
    assert alone.bytes_in > 10 * day_bytes[len(keys) // 2]


def test_larger_batches_another_zone_or_other_parts_read_the_parts(data: Path, tmp_path: Path) -> None:
    keys = _keys(data / "days")[: 7 * (DAY_FILE_JOBS + 1)]  # whole batches of one more than the limit
    larger = _run(data / "days", tmp_path / "larger", keys, DAY_FILE_JOBS + 1)
    assert [o.bytes_in for o in larger] == [o.bytes_in for o in _run(data / "parts", tmp_path / "p1", keys,
                                                                     DAY_FILE_JOBS + 1)]
    utc = _run(data / "days", tmp_path / "utc", keys, 1, market_tz="UTC")
    assert [o.bytes_in for o in utc] == [o.bytes_in for o in _run(data / "parts", tmp_path / "p2", keys, 1,
                                                                  market_tz="UTC")]
    assert stored_results(tmp_path / "utc").equals(stored_results(tmp_path / "p2"))


def test_day_files_of_other_parts_are_never_read(data: Path, tmp_path: Path) -> None:
    changed = tmp_path / "changed"
    ingest(str(data / "raw"), str(changed), [MONTH], row_group_rows=8_192, day_files_tz=TZ)
    # A file added to the month (say, a late delivery) makes the day files incomplete.
    part = next((changed / MONTH).glob("part-*.parquet"))
    pq.write_table(pq.read_table(part).slice(0, 500), changed / MONTH / "late.parquet")
    keys = _keys(data / "days")[:20]
    outcomes = _run(changed, tmp_path / "out", keys, 1)
    assert all(o.files == 2 for o in outcomes)  # both files of the month, not one day file
    # The late file repeats the first rows of the first security: its jobs count them too.
    from_days = _run(data / "days", tmp_path / "d", keys, 1)
    assert sum(o.rows_read for o in outcomes) == sum(o.rows_read for o in from_days) + 500


def test_a_job_without_a_day_file_has_no_rows_and_a_corrupt_one_fails_permanently(data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    ingest(str(data / "raw"), str(copy), [MONTH], row_group_rows=8_192, day_files_tz=TZ)
    [empty] = _run(copy, tmp_path / "out", [JobKey(MONTH, "NOPE", "2024-03-05")], 1)
    assert (empty.rows_read, empty.bytes_in) == (0, 0)
    key = _keys(copy)[0]
    _day_file(copy, key).write_bytes(b"PAR1 not a parquet file")
    job = JobMessage.build(run_id="r1", month=MONTH, security=key.security, date=key.date, input=str(copy),
                           output=str(tmp_path / "out"), processor="analytics", params=JobParams(market_tz=TZ))
    [failure] = execute_batch([job], s3_endpoint_url=None, worker_id="test", listings=MonthListings())
    assert isinstance(failure, PermanentError)
    assert "is not a readable day file" in str(failure) and "\n" not in str(failure)


def test_ingest_again_replaces_or_removes_the_day_files(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(str(data / "raw"), str(out), [MONTH], row_group_rows=8_192, day_files_tz=TZ)
    before = set((out / month_prefix(MONTH)).rglob("*.parquet"))
    stale = out / day_file_key(MONTH, "ZZZ", "2024-03-04")
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier ingest")
    in_utc = ingest(str(data / "raw"), str(out), [MONTH], row_group_rows=8_192, day_files_tz="UTC")
    after = set((out / month_prefix(MONTH)).rglob("*.parquet"))
    assert in_utc["months"][MONTH]["day_files"] == len(after) and not stale.exists()
    assert after != before  # other dates in another zone
    assert json.loads((out / manifest_key(MONTH)).read_text())["market_tz"] == "UTC"
    ingest(str(data / "raw"), str(out), [MONTH], row_group_rows=8_192)
    assert not list(open_storage(str(out)).list(month_prefix(MONTH)))


def test_a_trade_date_that_goes_back_in_time_means_no_day_files(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    lines = ["ts,security,price,size,trade_date",
             "2024-03-04T00:00:01Z,BHP,10,100,2024-03-04",
             "2024-03-04T00:00:02Z,BHP,10,100,2024-03-05",
             "2024-03-04T00:00:03Z,BHP,10,100,2024-03-04",  # back to the 4th: a split job
             "2024-03-04T00:00:04Z,CBA,10,100,2024-03-01"]
    (raw / MONTH).mkdir(parents=True)
    with gzip.open(raw / MONTH / "a.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    summary = ingest(str(raw), str(tmp_path / "out"), [MONTH], day_files_tz=TZ)
    info = summary["months"][MONTH]
    assert info["day_files"] == 0 and "BHP on 2024-03-04 are not consecutive" in info["day_files_skipped"]
    assert not list(open_storage(str(tmp_path / "out")).list(month_prefix(MONTH)))

    # The input's own trade date decides, not the zone: CBA's row is of the 1st.
    lines[3] = "2024-03-04T00:00:03Z,BHP,10,100,2024-03-05"
    with gzip.open(raw / MONTH / "a.csv.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    summary = ingest(str(raw), str(tmp_path / "out"), [MONTH], day_files_tz=TZ)
    assert summary["months"][MONTH]["day_files"] == 3
    assert pq.read_table(tmp_path / "out" / day_file_key(MONTH, "BHP", "2024-03-05")).num_rows == 2
    assert (tmp_path / "out" / day_file_key(MONTH, "CBA", "2024-03-01")).exists()


def test_an_unknown_zone_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--day-files: unknown time zone 'Mars/Olympus'"):
        ingest(str(data / "raw"), str(tmp_path / "out"), [MONTH], day_files_tz="Mars/Olympus")


def test_on_an_object_store_a_small_batch_gets_each_day_file_once_and_no_row_group(
    data: Path, tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/laid"
    summary = ingest(str(data / "raw"), uri, [MONTH], row_group_rows=8_192, day_files_tz=TZ,
                     endpoint_url=s3_server.endpoint)
    keys = _keys(data / "days")[:DAY_FILE_JOBS]
    assert summary["months"][MONTH]["day_files"] == len(_keys(data / "days"))
    gets: list[str] = []
    ranged: list[str] = []
    read_bytes, get_range = S3Storage.read_bytes, S3Storage.get_range

    def counted_read_bytes(self: S3Storage, key: str) -> bytes:
        gets.append(key)
        return read_bytes(self, key)

    def counted_get_range(self: S3Storage, key: str, start: int, length: int) -> bytes:
        ranged.append(key)
        return get_range(self, key, start, length)

    monkeypatch.setattr(S3Storage, "read_bytes", counted_read_bytes)
    monkeypatch.setattr(S3Storage, "get_range", counted_get_range)
    jobs = [JobMessage.build(run_id="r1", month=MONTH, security=k.security, date=k.date, input=uri,
                             output=str(tmp_path / "s3"), processor="analytics", params=JobParams(market_tz=TZ))
            for k in keys]
    results = execute_batch(jobs, s3_endpoint_url=s3_server.endpoint, worker_id="test", listings=MonthListings())
    assert all(isinstance(r, JobOutcome) for r in results), results
    assert sorted(gets) == sorted([manifest_key(MONTH)] + [day_file_key(MONTH, k.security, k.date) for k in keys])
    assert ranged == []
    _run(data / "days", tmp_path / "local", keys, DAY_FILE_JOBS)
    assert_same_results(stored_results(tmp_path / "s3"), stored_results(tmp_path / "local"))
