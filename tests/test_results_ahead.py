"""A month without an index is read about once per run, not once per batch or worker: the
first batch to claim the month computes and stores every expected job of it in its pass, the
others wait for that pass and find their jobs stored, exactly as passes of their own would have
stored them."""

from __future__ import annotations

import gzip
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from producer.discover import discover_month
from shared.inputs import ALL_COLUMNS, job_dates, month_files, pass_share, read_batches, sliced_files_json
from shared.layout import JobKey, RunLayout, job_keys_csv
from shared.messages import JobMessage, JobParams
from shared.metrics import configure
from shared.storage import LocalStorage, open_storage
from tests.helpers import discovered_keys, run_in_batches, store_at, stored_results
from tickq.gen import generate
from tickq.ingest import ingest
from worker.ahead import (
    CLAIM_STALE_S,
    MAX_JOBS_AHEAD,
    PART_ROWS,
    RELEASE_PAUSE_S,
    WAIT_POLL_MAX_S,
    WAIT_POLL_S,
    MonthPasses,
    claim_month,
    month_done,
    month_parts,
    release_month,
    renewing_claim,
    wait_for_month,
)
from worker.compute import batch_window
from worker.job import JobOutcome, MonthListings, execute_batch
from worker.passes import AHEAD_FROM_SHARE

MONTH = "2024-03"
TZ = "Australia/Sydney"
BATCH = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ahead")
    generate(str(root / "raw"), [MONTH], securities=12, rows=60_000)
    # Raw Parquet in no order (no statistics can exclude a row group) and in more row groups
    # than a reader keeps between passes.
    for part in (root / "raw" / MONTH).glob("*.parquet"):
        table = pq.read_table(part)
        shuffled = table.take(np.random.default_rng(3).permutation(table.num_rows))
        pq.write_table(shuffled, part, row_group_size=4_096)
    generate(str(root / "csv"), [MONTH], securities=12, rows=60_000, fmt="csv")
    ingest(str(root / "raw"), str(root / "laid"), [MONTH], row_group_rows=8_192)
    return root


def _keys(source: str) -> list[JobKey]:
    return discovered_keys(source, MONTH, TZ)


def _jobs(source: str, output: str, keys: list[JobKey], run_id: str = "r1",
          params: JobParams | None = None) -> list[JobMessage]:
    return [JobMessage.build(run_id=run_id, month=MONTH, security=k.security, date=k.date, input=source,
                             output=output, processor="analytics", params=params or JobParams(market_tz=TZ))
            for k in keys]


def _run(source: str, output: str, keys: list[JobKey], listings: MonthListings, with_key_file: bool = True,
         run_id: str = "r1", params: JobParams | None = None) -> list[JobOutcome]:
    """Every job of `keys` in batches of `BATCH`, in key order; the outcomes, in key order."""
    layout = RunLayout(run_id)
    if with_key_file:
        open_storage(output).write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    return run_in_batches(_jobs(source, output, keys, run_id, params), BATCH, listings)


def _three_batches(data: Path) -> tuple[str, list[JobKey]]:
    """The raw month and its first three batches' jobs."""
    source = str(data / "raw")
    return source, _keys(source)[: 3 * BATCH]


def _stored_alone(source: str, keys: list[JobKey], output: Path, run_id: str = "r1",
                  params: JobParams | None = None) -> pa.Table:
    """What `keys` store computed batch by batch, each batch reading for itself (no month pass)."""
    _run(source, str(output), keys, MonthListings(), run_id=run_id, params=params)
    return stored_results(str(output), run_id)


def _month_bytes(source: Path) -> int:
    return sum(f.size for f in month_files(open_storage(str(source)), MONTH))


class _Counted(io.RawIOBase):
    """A file whose reads add their bytes to `tally[key]`."""

    def __init__(self, raw: Any, key: str, tally: dict[str, int], lock: threading.Lock) -> None:
        self.raw, self.key, self.tally, self.lock = raw, key, tally, lock

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return int(self.raw.seek(offset, whence))

    def tell(self) -> int:
        return int(self.raw.tell())

    def readinto(self, buffer: Any) -> int:
        n = int(self.raw.readinto(buffer))
        with self.lock:
            self.tally[self.key] = self.tally.get(self.key, 0) + n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read from each key through every later `LocalStorage.open_read` (from any thread)."""
    tally: dict[str, int] = {}
    lock = threading.Lock()
    original = LocalStorage.open_read

    def open_read(self: LocalStorage, key: str) -> _Counted:
        return _Counted(original(self, key), key, tally, lock)

    monkeypatch.setattr(LocalStorage, "open_read", open_read)
    return tally


def _times_read(source: str, tally: dict[str, int]) -> float:
    """How many times over the month's files were read, in bytes."""
    return sum(tally.values()) / _month_bytes(Path(source))


def _claims(output: Path, run_id: str = "r1") -> list[str]:
    return sorted(o.key for o in open_storage(str(output)).list(f"runs/{run_id}/month_passes/"))


def _written(root: Path, key: str, claim: dict[str, Any], at: float) -> None:
    """`claim` stored at `key` under the local store `root`, as last written at `at` (the
    store's clock: the file's modification time), whatever time the claim itself says."""
    open_storage(str(root)).write_bytes(key, json.dumps(claim).encode())
    os.utime(root / key, (at, at))


@pytest.mark.parametrize("fmt", ["raw", "csv"])
def test_a_month_without_an_index_is_read_once_and_every_job_stores_what_a_pass_of_its_own_gives(
    data: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(data / fmt)
    keys = _keys(source)
    assert len(keys) > 10 * BATCH
    tally = _count_reads(monkeypatch)
    served = _run(source, str(tmp_path / "ahead"), keys, MonthListings(passes=MonthPasses()))
    served_reads = _times_read(source, tally)
    tally.clear()
    alone = _run(source, str(tmp_path / "alone"), keys, MonthListings())

    assert stored_results(str(tmp_path / "ahead")).equals(stored_results(str(tmp_path / "alone")))
    # The first batch's pass read the month once and stored every job.
    assert 1 <= served_reads <= 1.1
    assert _times_read(source, tally) >= 10  # once per batch
    assert [o.already_done for o in served] == [False] * BATCH + [True] * (len(keys) - BATCH)
    assert not any(o.already_done for o in alone)
    assert _claims(tmp_path / "ahead") == [f"runs/r1/month_passes/{MONTH}/0.{kind}" for kind in ("claim", "done")]
    assert sum(o.bytes_in for o in alone) >= 10 * _month_bytes(data / fmt)


def test_a_pass_reports_what_it_spent_on_the_jobs_it_stored_ahead(data: Path, tmp_path: Path) -> None:
    """The pass's `worker.month_pass` line carries the rows, bytes and stage seconds of the jobs
    it stored ahead of their messages, whose own outcomes count none: with the batches' own
    outcomes, every row of the month once, and the bytes of one read of it."""
    source = str(data / "raw")
    keys = _keys(source)
    metrics = tmp_path / "metrics.jsonl"
    configure("worker", metrics, quiet=True)
    try:
        served = _run(source, str(tmp_path / "ahead"), keys, MonthListings(passes=MonthPasses()))
    finally:
        configure("worker")
    [line] = [event for event in map(json.loads, metrics.read_text().splitlines())
              if event["event"] == "worker.month_pass"]
    alone = _run(source, str(tmp_path / "alone"), keys, MonthListings())

    assert line["ahead"] == len(keys) - BATCH and line["batch"] == BATCH
    for field, counted in (("rows_in", "rows_read"), ("rows_out", "rows_accepted"),
                           ("rows_rejected", "rows_rejected"), ("rows_filtered", "rows_filtered")):
        assert line[field] + sum(getattr(o, counted) for o in served) == sum(getattr(o, counted) for o in alone)
    assert line["rows_in"] > 0
    month = _month_bytes(data / "raw")
    assert 0.9 * month <= line["bytes_in"] + sum(o.bytes_in for o in served) <= 1.1 * month
    assert line["bytes_out"] > 0
    assert all(line["stages"][stage] > 0 for stage in ("read", "filter", "compute", "upload"))


def test_a_month_in_time_order_is_claimed_by_a_first_batch_of_a_few_dates(data: Path, tmp_path: Path) -> None:
    """Raw input sorted by time: a batch of one date's jobs would read a slice of the month, but
    the run's jobs read all of it, so the first batch's pass computes every job."""
    source = _in_time_order(data, tmp_path / "by-time")
    keys = _keys(str(source))
    day = keys[len(keys) // 2].date
    first = [k for k in keys if k.date == day]
    storage = open_storage(str(source))
    window = batch_window(_jobs(str(source), str(tmp_path / "out"), first))
    assert pass_share(storage, month_files(storage, MONTH), [k.security for k in first], window) < 0.2

    output = tmp_path / "out"
    open_storage(str(output)).write_bytes(RunLayout("r1").month_job_keys(MONTH), job_keys_csv(keys))
    listings = MonthListings(passes=MonthPasses())
    opening = run_in_batches(_jobs(str(source), str(output), first), BATCH, listings)
    rest = run_in_batches(_jobs(str(source), str(output), [k for k in keys if k.date != day]), BATCH, listings)

    assert not any(o.already_done for o in opening) and all(o.already_done for o in rest)
    assert _claims(output) == [f"runs/r1/month_passes/{MONTH}/0.{kind}" for kind in ("claim", "done")]
    assert stored_results(str(output)).equals(_stored_alone(str(source), keys, tmp_path / "ref"))


@pytest.mark.parametrize("group_rows", [20_000, 1_000])
def test_a_month_sorted_by_security_in_large_row_groups_is_claimed_in_parts_of_whole_securities(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_rows: int
) -> None:
    """Raw input sorted by security (as a tool writing one security after another makes it): in
    row groups too large to keep between batches and of many jobs each, a batch's own pass would
    decode mostly its neighbours' rows, and the next batch decode them again, so passes over
    parts of whole securities compute the month, which is read about once; in row groups of a
    few jobs each, every batch reads its own."""
    source = tmp_path / "by-security"
    for part in (data / "raw" / MONTH).glob("*.parquet"):
        (source / MONTH).mkdir(parents=True, exist_ok=True)
        table = pq.read_table(part).sort_by([("security", "ascending"), ("ts", "ascending")])
        pq.write_table(table, source / MONTH / part.name, row_group_size=group_rows)
    keys = _keys(str(source))
    monkeypatch.setattr("worker.ahead.PART_JOBS", len(keys) // 3)
    monkeypatch.setattr("worker.passes.BY_SECURITY_UNIT_JOBS", BATCH)
    listings, each_alone = MonthListings(passes=MonthPasses()), MonthListings()
    for kept in (listings, each_alone):  # a row group of more rows than this is never kept
        kept.parquet.max_group_rows = 5_000
    tally = _count_reads(monkeypatch)
    outcomes = _run(str(source), str(tmp_path / "out"), keys, listings)
    reads = _times_read(str(source), tally)
    tally.clear()
    _run(str(source), str(tmp_path / "ref"), keys, each_alone)
    alone, reads_alone = stored_results(str(tmp_path / "ref")), _times_read(str(source), tally)

    assert stored_results(str(tmp_path / "out")).equals(alone)
    if group_rows == 20_000:  # three row groups of about 80 jobs each
        assert _claims(tmp_path / "out") == sorted(f"runs/r1/month_passes/{MONTH}/{p}.{kind}"
                                                   for p in range(3) for kind in ("claim", "done"))
        parts = month_parts(keys, by_date=False, by_security=True)
        assert [len({k.security for k in part}) for part in parts] == [4, 4, 4]  # whole securities
        assert sum(o.already_done for o in outcomes) > len(keys) // 2
        # Each part's pass reads its row groups, and at most one of the next part's.
        assert 1 <= reads <= 2 and reads_alone >= 4
    else:  # sixty row groups of about four jobs each: read as batches read them alone
        assert not _claims(tmp_path / "out") and not any(o.already_done for o in outcomes)
        assert reads == pytest.approx(reads_alone, rel=0.05)


@pytest.mark.parametrize("order", ["day-then-security", "security"])
def test_a_month_sorted_by_security_within_each_day_is_computed_in_parts_of_whole_dates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    """Sorted by security within each day (daily files, or a month file in date order), a
    security's rows lie in one piece a day: a batch of a few securities reads a row group of
    every day, and batches reading for themselves would read the month many times over, so
    passes over parts of whole dates compute it, reading it about once. Sorted by security over
    the whole month, every batch reads its own rows."""
    raw, source = tmp_path / "raw", tmp_path / order
    generate(str(raw), [MONTH], securities=60, rows=60_000)
    for part in (raw / MONTH).glob("*.parquet"):
        table = pq.read_table(part)
        by_security = [("security", "ascending"), ("ts", "ascending")]
        if order == "day-then-security":
            table = table.append_column("day", job_dates(table.column("ts").combine_chunks(), None, TZ))
            table = table.sort_by([("day", "ascending"), *by_security]).drop_columns(["day"])
        else:
            table = table.sort_by(by_security)
        (source / MONTH).mkdir(parents=True)
        pq.write_table(table, source / MONTH / part.name, row_group_size=1_000)  # about 20 securities' days each
    keys = _keys(str(source))
    monkeypatch.setattr("worker.ahead.PART_JOBS", len(keys) // 3)
    monkeypatch.setattr("worker.passes.TYPICAL_BATCH_JOBS", 4 * 21)  # four securities' jobs
    tally = _count_reads(monkeypatch)
    outcomes = _run(str(source), str(tmp_path / "out"), keys, MonthListings(passes=MonthPasses()))
    reads = _times_read(str(source), tally)

    assert stored_results(str(tmp_path / "out")).equals(_stored_alone(str(source), keys, tmp_path / "ref"))
    if order == "day-then-security":
        parts = month_parts(keys, by_date=True)
        assert _claims(tmp_path / "out") == sorted(f"runs/r1/month_passes/{MONTH}/{p}.{kind}"
                                                   for p in range(len(parts)) for kind in ("claim", "done"))
        assert sum(o.already_done for o in outcomes) > len(keys) // 2
        assert reads <= 1.5
    else:
        assert not _claims(tmp_path / "out") and not any(o.already_done for o in outcomes)
        assert reads <= 1.5


# How a month in time order stores when its rows were: ts as timestamps, as integer nanoseconds
# since the epoch, or with each row's own trade date besides.
TIME_SHAPES = ["timestamp", "integer-ns", "own-trade-date"]


def _in_time_order(data: Path, target: Path, shape: str = "timestamp") -> Path:
    """The raw month sorted by time, in row groups of 4,096 rows, stored in `shape`
    (`TIME_SHAPES`)."""
    for part in (data / "raw" / MONTH).glob("*.parquet"):
        (target / MONTH).mkdir(parents=True, exist_ok=True)
        table = pq.read_table(part).sort_by("ts")
        if shape == "integer-ns":
            table = table.set_column(table.schema.get_field_index("ts"), "ts", table.column("ts").cast(pa.int64()))
        elif shape == "own-trade-date":
            table = table.append_column("trade_date", job_dates(table.column("ts").combine_chunks(), None, TZ))
        pq.write_table(table, target / MONTH / part.name, row_group_size=4_096)
    return target


def _in_date_parts(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int, shape: str = "timestamp"
) -> tuple[Path, list[JobKey]]:
    """The month in time order and its keys, split into about `parts` parts of whole dates."""
    source = _in_time_order(data, tmp_path / "by-time", shape)
    keys = _keys(str(source))
    monkeypatch.setattr("worker.ahead.PART_JOBS", len(keys) // parts)
    return source, keys


def test_a_month_is_split_by_date_in_time_order_and_by_key_order_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.ahead.PART_JOBS", 2_000)
    keys = [JobKey(MONTH, f"S{s:03d}", f"{MONTH}-{d:02d}") for s in range(300) for d in (1, 4, 5, 6, 7, 8, 11, 12)]
    by_date = month_parts(keys, by_date=True)
    assert [len(part) for part in by_date] == [1200, 1200]  # 2,400 jobs: parts of about 2,000 at most
    assert [sorted({k.date for k in part}) for part in by_date] == [
        [f"{MONTH}-{d:02d}" for d in (1, 4, 5, 6)], [f"{MONTH}-{d:02d}" for d in (7, 8, 11, 12)]]
    assert [k for part in by_date for k in part] == sorted(keys, key=lambda k: k.date > f"{MONTH}-06")
    assert month_parts(keys, by_date=False) == [keys]  # up to MAX_JOBS_AHEAD in key order
    # A month of many rows a job is split by its rows too: parts of about PART_ROWS rows.
    by_rows = month_parts(keys, by_date=True, rows=4 * PART_ROWS)
    assert [sorted({k.date for k in part}) for part in by_rows] == [
        [f"{MONTH}-{d:02d}" for d in days] for days in ((1, 4), (5, 6), (7, 8), (11, 12))]
    assert month_parts(keys, by_date=True, rows=PART_ROWS) == by_date  # the jobs' parts, when more
    one_big_date = [JobKey(MONTH, f"S{s:05d}", f"{MONTH}-01") for s in range(MAX_JOBS_AHEAD + 1)]
    assert [len(part) for part in month_parts(one_big_date, by_date=True)] == [MAX_JOBS_AHEAD, 1]
    assert month_parts([], by_date=True) == month_parts([], by_date=False) == []


@pytest.mark.parametrize("shape", TIME_SHAPES)
def test_a_month_in_time_order_is_read_once_in_parts_of_whole_dates(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """A first batch holding jobs of every date claims every part in turn, and each part's pass
    reads only the row groups of its dates: the statistics of ts tell them, stored as
    timestamps or as integer nanoseconds, or of the rows' own trade_date where they have one."""
    source, keys = _in_date_parts(data, tmp_path, monkeypatch, 4, shape)
    parts = month_parts(keys, by_date=True)
    assert len(parts) >= 4
    output = tmp_path / "out"
    open_storage(str(output)).write_bytes(RunLayout("r1").month_job_keys(MONTH), job_keys_csv(keys))
    tally = _count_reads(monkeypatch)
    batch = 2 * BATCH  # the first batch holds jobs of every date
    assert {k.date for k in keys[:batch]} == {k.date for k in keys}
    outcomes = run_in_batches(_jobs(str(source), str(output), keys), batch, MonthListings(passes=MonthPasses()))

    assert 1 <= _times_read(str(source), tally) <= 1.3  # each part's dates, and the row groups between two parts
    assert [o.already_done for o in outcomes] == [False] * batch + [True] * (len(keys) - batch)
    assert _claims(tmp_path / "out") == sorted(f"runs/r1/month_passes/{MONTH}/{p}.{kind}"
                                               for p in range(len(parts)) for kind in ("claim", "done"))
    assert stored_results(str(tmp_path / "out")).equals(_stored_alone(str(source), keys, tmp_path / "ref"))


@pytest.mark.parametrize("fmt", ["dbn.zst", "csv.gz"])
def test_a_month_of_files_read_whole_is_read_once_in_parts_of_whole_dates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Files that can only be read whole (DBN, gzip-compressed CSV), each of a few consecutive
    days, as a vendor's daily files are: discovery records what each holds, and each part's
    pass reads only the files of its dates, so the workers share the month."""
    source, output = tmp_path / "files", tmp_path / "out"
    generate(str(source), [MONTH], securities=12, rows=60_000, fmt=fmt, files_per_month=6)
    storage = open_storage(str(source))
    found = discover_month(storage, MONTH, TZ)
    keys = [JobKey(MONTH, security, day) for security, day in sorted(found.rows)]
    monkeypatch.setattr("worker.ahead.PART_JOBS", len(keys) // 3)
    parts = month_parts(keys, by_date=True)
    assert len(parts) >= 3
    # One slice a file, the whole of it, with the range of its rows' instants.
    assert [(f.key, [(p.start, p.end) for p in f.slices]) for f in found.sliced] == [
        (f.key, [(0, f.size)]) for f in month_files(storage, MONTH)]
    assert sum(p.rows for f in found.sliced for p in f.slices) == found.rows_scanned
    assert all(f.slices[0].ts is not None and not f.cut for f in found.sliced)
    layout = RunLayout("r1")
    open_storage(str(output)).write_bytes(layout.month_slices(MONTH), sliced_files_json(found.sliced))
    open_storage(str(output)).write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    tally = _count_reads(monkeypatch)
    batch = 2 * BATCH  # the first batch holds jobs of every date
    assert {k.date for k in keys[:batch]} == {k.date for k in keys}
    outcomes = run_in_batches(_jobs(str(source), str(output), keys), batch, MonthListings(passes=MonthPasses()))

    # Each file once, and those that hold the last date of one part and the first of the next twice.
    assert 1 <= _times_read(str(source), tally) <= 1.5
    assert [o.already_done for o in outcomes] == [False] * batch + [True] * (len(keys) - batch)
    assert _claims(output) == sorted(f"runs/r1/month_passes/{MONTH}/{p}.{kind}"
                                     for p in range(len(parts)) for kind in ("claim", "done"))
    assert stored_results(str(output)).equals(_stored_alone(str(source), keys, tmp_path / "ref"))


def test_a_month_of_one_file_per_security_is_read_by_each_batch_for_its_own_securities(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One gzip-compressed CSV file per security, as some vendors deliver a month: discovery
    records each file's securities, so a batch reads only its own securities' files and no
    pass over the month is needed; the workers share the month from their first batches."""
    source, output = tmp_path / "per-security", tmp_path / "out"
    rows = pa.Table.from_batches(list(read_batches(open_storage(str(data / "csv")),
                                                   month_files(open_storage(str(data / "csv")), MONTH)[0],
                                                   ALL_COLUMNS)))
    (source / MONTH).mkdir(parents=True)
    for security in pc.unique(rows.column("security")).to_pylist():
        with gzip.open(source / MONTH / f"{security}.csv.gz", "wb") as out:
            pacsv.write_csv(rows.filter(pc.equal(rows.column("security"), security)), out)
    found = discover_month(open_storage(str(source)), MONTH, TZ)
    keys = [JobKey(MONTH, security, day) for security, day in sorted(found.rows)]
    layout, store = RunLayout("r1"), open_storage(str(output))
    store.write_bytes(layout.month_slices(MONTH), sliced_files_json(found.sliced))
    store.write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    dates = len({k.date for k in keys})
    assert len(keys) == 12 * dates  # every security trades every date: batches of whole securities
    tally = _count_reads(monkeypatch)
    for file in month_files(open_storage(str(source)), MONTH):  # each file once, whole
        for _ in read_batches(open_storage(str(source)), file, ALL_COLUMNS):
            pass
    once = dict(tally)
    tally.clear()
    outcomes = run_in_batches(_jobs(str(source), str(output), keys), 3 * dates, MonthListings(passes=MonthPasses()))

    assert not _claims(output) and not any(o.already_done for o in outcomes)
    assert tally == once  # each file by the one batch of its security
    assert stored_results(str(output)).equals(_stored_alone(str(data / "csv"), keys, tmp_path / "ref"))


def test_a_batch_claims_the_parts_no_one_has_and_waits_for_the_others(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _in_date_parts(data, tmp_path, monkeypatch, 4)
    busy = month_parts(keys, by_date=True)[1]
    output = tmp_path / "out"
    store, layout = open_storage(str(output)), RunLayout("r1")
    elsewhere = MonthPasses()  # another worker's, its pass over part 1 under way
    assert claim_month(store, layout, MONTH, 1, "elsewhere", elsewhere)
    waited: list[float] = []

    def finish_elsewhere(seconds: float) -> None:  # ...which ends, having stored nothing here
        waited.append(seconds)
        month_done(store, layout, MONTH, 1, elsewhere)

    monkeypatch.setattr("worker.ahead._pause", finish_elsewhere)
    tried: list[int] = []  # the parts claims were tried for
    claim = claim_month

    def spied(*args: Any) -> bool:
        tried.append(args[3])
        return claim(*args)

    monkeypatch.setattr("worker.passes.claim_month", spied)
    store.write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    batch = 2 * BATCH  # the first batch holds jobs of every date
    outcomes = run_in_batches(_jobs(str(source), str(output), keys), batch, MonthListings(passes=MonthPasses()))

    # The first batch made the passes over every other part, then waited for part 1 once; the
    # jobs of part 1 were computed by their own batches.
    assert len(waited) == 1
    in_busy = {(k.security, k.date) for k in busy}
    # Part 1 was tried by the first batch before it waited (not again once its pass was done),
    # and by each later batch holding its jobs.
    later = [keys[i:i + batch] for i in range(batch, len(keys), batch)]
    assert tried.count(1) == 1 + sum(any((k.security, k.date) in in_busy for k in chunk) for chunk in later)
    assert [o.already_done for o in outcomes[batch:]] == [(k.security, k.date) not in in_busy for k in keys[batch:]]
    assert not any(o.already_done for o in outcomes[:batch])
    assert stored_results(str(output)).equals(_stored_alone(str(source), keys, tmp_path / "ref"))


def test_a_batch_whose_parts_are_all_claimed_makes_the_pass_over_a_part_no_one_has(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _in_date_parts(data, tmp_path, monkeypatch, 2)
    first, second = month_parts(keys, by_date=True)
    output = tmp_path / "out"
    store, layout = open_storage(str(output)), RunLayout("r1")
    store.write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    elsewhere = MonthPasses()
    assert claim_month(store, layout, MONTH, 0, "elsewhere", elsewhere)
    monkeypatch.setattr("worker.ahead._pause", lambda seconds: month_done(store, layout, MONTH, 0, elsewhere))
    # A small batch of the first part's dates: rather than wait idle, it makes the second part's pass.
    outcomes = run_in_batches(_jobs(str(source), str(output), first[:3]), BATCH, MonthListings(passes=MonthPasses()))

    assert not any(o.already_done for o in outcomes)
    assert json.loads(store.read_bytes(layout.month_pass_claim(MONTH, 1)))["worker"] == "test"
    assert store.exists(layout.month_pass_done(MONTH, 1))
    marked = {o.key for o in store.list(layout.succeeded_prefix)}
    assert marked == {layout.marker(k) for k in [*first[:3], *second]}
    assert outcomes[0].rows_ahead[0] > 0


def test_a_free_part_whose_jobs_are_all_done_is_marked_done_without_a_pass(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second part's jobs were stored by batches of their own (its pass failed and was
    released, say): a batch of the first part claims the second too and finds nothing to compute."""
    source, keys = _in_date_parts(data, tmp_path, monkeypatch, 2)
    first, second = month_parts(keys, by_date=True)
    output = tmp_path / "out"
    run_in_batches(_jobs(str(source), str(output), second), BATCH, MonthListings())
    store, layout = open_storage(str(output)), RunLayout("r1")
    store.write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    outcomes = run_in_batches(_jobs(str(source), str(output), first[:3]), BATCH, MonthListings(passes=MonthPasses()))

    assert not any(o.already_done for o in outcomes)
    assert store.exists(layout.month_pass_done(MONTH, 0)) and store.exists(layout.month_pass_done(MONTH, 1))
    assert stored_results(str(output)).equals(_stored_alone(str(source), keys, tmp_path / "ref"))


def test_an_ingested_month_is_not_read_whole(data: Path, tmp_path: Path) -> None:
    source = data / "laid"
    keys = _keys(str(source))
    storage = open_storage(str(source))
    files = month_files(storage, MONTH)
    few = sorted({k.security for k in keys})[:2]
    assert pass_share(storage, files, few, None) < AHEAD_FROM_SHARE
    assert pass_share(open_storage(str(data / "raw")), month_files(open_storage(str(data / "raw")), MONTH),
                      few, None) == 1.0

    outcomes = _run(str(source), str(tmp_path / "out"), keys, MonthListings(passes=MonthPasses()))
    assert not any(o.already_done for o in outcomes) and not _claims(tmp_path / "out")  # each batch read its own
    assert sum(o.bytes_in for o in outcomes) < _month_bytes(source) * 2


def test_without_the_month_key_file_each_batch_makes_its_own_pass(data: Path, tmp_path: Path) -> None:
    source = str(data / "raw")
    keys = _keys(source)[: 4 * BATCH]
    outcomes = _run(source, str(tmp_path / "no-keys"), keys, MonthListings(passes=MonthPasses()), with_key_file=False)

    assert not any(o.already_done for o in outcomes) and not _claims(tmp_path / "no-keys")
    assert stored_results(str(tmp_path / "no-keys")).equals(_stored_alone(source, keys, tmp_path / "ref"))


def test_a_month_of_more_jobs_than_one_pass_computes_is_claimed_in_parts(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = str(data / "raw")
    keys = _keys(source)
    monkeypatch.setattr("worker.ahead.MAX_JOBS_AHEAD", 3 * BATCH + 5)  # parts do not end with batches
    outcomes = _run(source, str(tmp_path / "parts"), keys, MonthListings(passes=MonthPasses()))

    assert stored_results(str(tmp_path / "parts")).equals(_stored_alone(source, keys, tmp_path / "ref"))
    parts = -(-len(keys) // (3 * BATCH + 5))
    assert _claims(tmp_path / "parts") == sorted(f"runs/r1/month_passes/{MONTH}/{p}.{kind}"
                                                 for p in range(parts) for kind in ("claim", "done"))
    # A batch straddling two parts computes its jobs of the next part, which that part's pass
    # then stores again (the same result): computed at most twice, never lost.
    assert sum(not o.already_done for o in outcomes) <= parts * 2 * BATCH


def test_passes_are_claimed_per_run_and_parameters(data: Path, tmp_path: Path) -> None:
    source, keys = _three_batches(data)
    listings = MonthListings(passes=MonthPasses())
    output = str(tmp_path / "out")
    _run(source, output, keys[:BATCH], listings, run_id="r1")  # computes and stores the rest of r1
    # Another run with other parameters over the same month: nothing of r1 may serve it.
    other = JobParams(market_tz=TZ, min_size=500)
    outcomes = _run(source, output, keys[BATCH:], listings, run_id="r2", params=other)

    assert stored_results(output, "r2").equals(_stored_alone(source, keys[BATCH:], tmp_path / "ref", "r2", other))
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * BATCH  # r2's own pass
    assert len(_claims(tmp_path / "out", "r2")) == 2


def test_two_slots_of_one_worker_read_a_month_once(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = str(data / "raw")
    keys = _keys(source)
    output = str(tmp_path / "out")
    layout = RunLayout("r1")
    open_storage(output).write_bytes(layout.month_job_keys(MONTH), job_keys_csv(keys))
    tally = _count_reads(monkeypatch)
    jobs = [JobMessage.build(run_id="r1", month=MONTH, security=k.security, date=k.date, input=source,
                             output=output, processor="analytics", params=JobParams(market_tz=TZ)) for k in keys]
    listings = MonthListings(passes=MonthPasses())
    batches = [jobs[i:i + BATCH] for i in range(0, len(jobs), BATCH)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda batch: execute_batch(batch, s3_endpoint_url=None, worker_id="test",
                                                            listings=listings), batches))

    assert all(isinstance(r, JobOutcome) for batch in results for r in batch)
    assert 1 <= _times_read(source, tally) <= 1.25  # one pass, and a footer for each slot (two passes: 2)
    marked = {o.key for o in open_storage(output).list(layout.succeeded_prefix)}
    assert marked == {layout.marker(k) for k in keys}


def test_workers_that_find_the_month_claimed_wait_for_its_pass_and_compute_only_what_it_did_not_store(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _three_batches(data)
    output = tmp_path / "out"
    store, layout = open_storage(str(output)), RunLayout("r1")
    elsewhere = MonthPasses()  # another worker's
    assert claim_month(store, layout, MONTH, 0, "elsewhere", elsewhere)  # its pass, under way
    waited: list[float] = []

    def finish_elsewhere(seconds: float) -> None:  # ...which ends while this one waits
        waited.append(seconds)
        if len(waited) == 3:
            month_done(store, layout, MONTH, 0, elsewhere)

    monkeypatch.setattr("worker.ahead._pause", finish_elsewhere)
    outcomes = _run(source, str(output), keys, MonthListings(passes=MonthPasses()))

    # The other pass stored nothing here, so each batch computed its own jobs after waiting.
    assert len(waited) == 3 and not any(o.already_done for o in outcomes)
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))


def test_a_failed_pass_releases_its_claim_and_nothing_of_it_is_lost(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _three_batches(data)
    output = tmp_path / "out"

    def store_fails(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("worker.passes._store_ahead", store_fails)
    with pytest.raises(AssertionError, match="disk full"):
        _run(source, str(output), keys, MonthListings(passes=MonthPasses()))
    assert not _claims(output)  # released: the batch failed, and its messages will come again
    assert not list(open_storage(str(output)).list(RunLayout("r1").succeeded_prefix))
    monkeypatch.undo()
    outcomes = _run(source, str(output), keys, MonthListings(passes=MonthPasses()))
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (2 * BATCH)


def test_a_claim_its_failed_pass_could_not_release_is_taken_back_by_the_workers_next_batch(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _three_batches(data)
    output = tmp_path / "out"
    passes = MonthPasses()

    def store_fails(*args: object) -> None:
        raise OSError("connection reset")

    def delete_fails(self: LocalStorage, key: str) -> None:
        raise ConnectionRefusedError("connection refused")

    pauses: list[float] = []
    monkeypatch.setattr("worker.passes._store_ahead", store_fails)
    monkeypatch.setattr(LocalStorage, "delete", delete_fails)
    monkeypatch.setattr("worker.ahead._pause", pauses.append)
    with pytest.raises(AssertionError, match="connection reset"):  # the pass's failure, not the release's
        _run(source, str(output), keys, MonthListings(passes=passes))
    assert _claims(output)  # left behind, after a try and two more
    assert pauses == [RELEASE_PAUSE_S, 2 * RELEASE_PAUSE_S]
    monkeypatch.undo()

    def no_waiting(seconds: float) -> None:
        raise AssertionError("waited for a claim of its own")

    monkeypatch.setattr("worker.ahead._pause", no_waiting)
    outcomes = _run(source, str(output), keys, MonthListings(passes=passes))
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (2 * BATCH)


def test_a_claim_whose_worker_died_is_taken_over_and_its_pass_made_once(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _three_batches(data)
    output = tmp_path / "out"
    # A worker that died mid-pass: its claim was last renewed longer ago than CLAIM_STALE_S.
    died = time.time() - CLAIM_STALE_S - 1
    _written(output, RunLayout("r1").month_pass_claim(MONTH, 0), {"worker": "gone", "claimed_at": died}, died)

    def no_waiting(seconds: float) -> None:
        raise AssertionError("waited for a dead worker's claim")

    monkeypatch.setattr("worker.ahead._pause", no_waiting)
    outcomes = _run(source, str(output), keys, MonthListings(passes=MonthPasses()))

    # The first batch made the dead worker's pass: every later job was stored by it.
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (2 * BATCH)
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))
    assert _claims(output) == [f"runs/r1/month_passes/{MONTH}/0.{kind}" for kind in ("claim", "done")]


def test_a_batch_waiting_on_a_claim_whose_worker_dies_makes_the_pass_itself(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, keys = _three_batches(data)
    output = tmp_path / "out"
    # Another worker's claim, renewed a moment ago; that worker dies and never renews it.
    alive_until = time.time() + 1.0
    renewed = alive_until - CLAIM_STALE_S
    _written(output, RunLayout("r1").month_pass_claim(MONTH, 0), {"worker": "dies", "claimed_at": renewed}, renewed)
    monkeypatch.setattr("worker.ahead._pause", lambda seconds: time.sleep(0.05))
    outcomes = _run(source, str(output), keys, MonthListings(passes=MonthPasses()))

    # The first batch waited until the claim went stale, then made the pass over the whole part
    # (rather than its own jobs alone, leaving the part to the next batch).
    assert time.time() > alive_until
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (2 * BATCH)
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))
    assert _claims(output) == [f"runs/r1/month_passes/{MONTH}/0.{kind}" for kind in ("claim", "done")]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_worker_takes_back_only_its_own_claim_on_a_pass_no_slot_of_it_makes(
    tmp_path: Path, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_at(where, tmp_path, request)
    layout = RunLayout("r1")
    passes = MonthPasses()
    assert claim_month(store, layout, MONTH, 0, "a", passes)
    assert not claim_month(store, layout, MONTH, 0, "a", passes)  # a second slot of "a": its pass runs
    assert not claim_month(store, layout, MONTH, 0, "b", MonthPasses())  # another worker's claim
    release_month(store, layout, MONTH, 0, passes)
    assert claim_month(store, layout, MONTH, 0, "a", passes)  # released: claimed afresh

    left_behind = MonthPasses()  # "a" restarted (or its release failed): no pass of it holds the claim
    assert claim_month(store, layout, MONTH, 0, "a", left_behind)
    assert not claim_month(store, layout, MONTH, 0, "a", left_behind)
    month_done(store, layout, MONTH, 0, left_behind)
    assert not claim_month(store, layout, MONTH, 0, "a", MonthPasses())  # done: nothing to take back

    store.write_bytes(layout.month_pass_claim(MONTH, 1), b"not json")
    assert not claim_month(store, layout, MONTH, 1, "a", MonthPasses())

    died = {"worker": "b", "claimed_at": time.time()}  # "b"'s claim, never renewed
    store.write_bytes(layout.month_pass_claim(MONTH, 2), json.dumps(died).encode())
    monkeypatch.setattr("worker.ahead.CLAIM_STALE_S", 1.0)  # S3 says when an object was written to the second
    time.sleep(2.1)
    assert claim_month(store, layout, MONTH, 2, "a", MonthPasses())  # "b" died: "a" takes its claim over
    assert not claim_month(store, layout, MONTH, 2, "b", MonthPasses())  # now "a"'s live claim


def test_a_pass_over_a_resumed_run_computes_only_the_jobs_not_yet_done(data: Path, tmp_path: Path) -> None:
    source = str(data / "raw")
    keys = _keys(source)
    output = tmp_path / "out"
    done_before = 2 * BATCH
    _run(source, str(output), keys[:done_before], MonthListings())  # an earlier worker's batches
    open_storage(str(output)).write_bytes(RunLayout("r1").month_job_keys(MONTH), job_keys_csv(keys))
    jobs = _jobs(source, str(output), keys[done_before:])
    outcomes = run_in_batches(jobs, BATCH, MonthListings(passes=MonthPasses()))

    # Every job stored once: the pass left the jobs done before alone.
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))
    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (len(jobs) - BATCH)
    assert outcomes[0].rows_ahead[0] == sum(o.rows_read for o in _run(source, str(tmp_path / "rest"),
                                                                         keys[done_before + BATCH:], MonthListings()))


def test_jobs_that_succeed_clear_their_dead_and_retry_records_the_pass_listing_them_once_for_the_month(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replayed dead job or a job between retries may succeed in a batch of its own or be
    stored ahead by another batch's pass: either way its record goes. The pass finds the records
    of every job it stores in two listings of the month, not two per security."""
    source = str(data / "raw")
    keys = _keys(source)
    output = tmp_path / "out"
    store, layout = open_storage(str(output)), RunLayout("r1")
    own, ahead = keys[0], keys[len(keys) // 2]  # in the first batch; stored ahead by its pass
    assert own not in keys[BATCH:] and ahead in keys[BATCH:]
    records = [layout.dead(own), layout.retrying(ahead), layout.dead(keys[-1])]
    for record in records:
        store.write_bytes(record, b"{}")
    listed: list[str] = []
    original = LocalStorage.keys

    def keys_of(self: LocalStorage, prefix: str = "") -> Iterator[str]:
        listed.append(prefix)
        return original(self, prefix)

    monkeypatch.setattr(LocalStorage, "keys", keys_of)
    outcomes = _run(source, str(output), keys, MonthListings(passes=MonthPasses()))

    assert [o.already_done for o in outcomes] == [False] * BATCH + [True] * (len(keys) - BATCH)
    assert not any(store.exists(record) for record in records)
    assert all(store.exists(layout.marker(key)) for key in (own, ahead, keys[-1]))
    record_listings = [p for p in listed if p.startswith((layout.dead_prefix, layout.retrying_prefix))]
    first_batch = sorted({k.security for k in keys[:BATCH]})
    assert sorted(record_listings) == sorted(
        [f"{layout.dead_prefix}{MONTH}/", f"{layout.retrying_prefix}{MONTH}/"]  # the pass, for its jobs ahead
        + [f"{prefix}{MONTH}/{security}/" for prefix in (layout.dead_prefix, layout.retrying_prefix)
           for security in first_batch]  # the first batch, for its own jobs
    )
    assert len({k.security for k in keys}) > len(first_batch)


@pytest.mark.parametrize("fmt", ["laid", "raw"])
def test_a_job_a_batch_holds_twice_is_computed_and_stored_once(data: Path, tmp_path: Path, fmt: str) -> None:
    # A resumed `produce` can publish a job again while its first message is still queued, and
    # one prefetch can hand both copies to one batch.
    source = str(data / fmt)
    keys = _keys(source)[:BATCH]
    output = tmp_path / "out"
    open_storage(str(output)).write_bytes(RunLayout("r1").month_job_keys(MONTH), job_keys_csv(keys))
    jobs = _jobs(source, str(output), keys)
    results = execute_batch([*jobs[:6], jobs[3], *jobs[6:]], s3_endpoint_url=None, worker_id="test",
                            listings=MonthListings(passes=MonthPasses()))

    assert all(isinstance(r, JobOutcome) for r in results), results
    first, again = results[3], results[6]
    assert isinstance(first, JobOutcome) and isinstance(again, JobOutcome)
    assert not first.already_done and first.rows_read > 0
    # The second copy finds the job done, as it would in a later batch: its rows count once.
    assert again.already_done and (again.rows_read, again.rows_ahead) == (0, (0, 0, 0))
    assert stored_results(str(output)).equals(_stored_alone(source, keys, tmp_path / "ref"))


def test_a_claim_is_won_once_and_waiting_ends_when_its_pass_is_done_released_or_stale(tmp_path: Path) -> None:
    store, layout = open_storage(str(tmp_path)), RunLayout("r1")
    a, b, c = MonthPasses(), MonthPasses(), MonthPasses()  # three workers
    assert claim_month(store, layout, MONTH, 0, "a", a)
    assert not claim_month(store, layout, MONTH, 0, "b", b)
    assert claim_month(store, layout, MONTH, 1, "b", b)  # another part
    assert json.loads(store.read_bytes(layout.month_pass_claim(MONTH, 0)))["worker"] == "a"
    claimed_at = json.loads(store.read_bytes(layout.month_pass_claim(MONTH, 0)))["claimed_at"]

    sleeps: list[float] = []

    ended: list[bool] = []  # each wait's answer: done (True), or free to claim

    def wait(part: int, now: float, then: Callable[[], None] | None = None, after: int = 2) -> int:
        """How many times waiting on `part` sleeps, the clock at `now`, `then` happening on sleep `after`."""
        sleeps.clear()

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) == after and then is not None:
                then()
            assert len(sleeps) < 100, "still waiting"

        ended.append(wait_for_month(store, layout, MONTH, part, stale_s=60, clock=lambda: now, sleep=sleep))
        return len(sleeps)

    assert wait(0, claimed_at + 1, lambda: month_done(store, layout, MONTH, 0, a), after=12) == 12
    # Looks come less and less often while the pass runs, but never less than every half second.
    assert sleeps[0] == WAIT_POLL_S and sleeps == sorted(sleeps) and max(sleeps) == WAIT_POLL_MAX_S
    assert wait(0, claimed_at + 1) == 0  # done: no wait at all
    store.delete(layout.month_pass_done(MONTH, 0))
    assert wait(0, claimed_at + 1, lambda: month_done(store, layout, MONTH, 0, a)) == 2
    assert wait(0, claimed_at + 1) == 0  # done: no wait at all
    assert wait(1, claimed_at + 1, lambda: release_month(store, layout, MONTH, 1, b)) == 2
    assert wait(2, claimed_at + 1) == 0  # never claimed
    assert claim_month(store, layout, MONTH, 3, "c", c)
    long_ago = time.time() - 3600
    os.utime(tmp_path / layout.month_pass_claim(MONTH, 3), (long_ago, long_ago))
    assert wait(3, claimed_at + 1) == 0  # its worker died long ago
    # Done, done, done, done, then released, never claimed and stale: only the last three are free.
    assert ended == [True] * 4 + [False] * 3


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_claim_is_stale_by_the_stores_clock_not_by_the_time_its_worker_wrote_in_it(
    tmp_path: Path, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers' clocks differ. A claim renewed just now by a worker whose clock runs an hour
    behind is live; one left by a dead worker whose clock ran an hour ahead goes stale all the
    same: how long ago a claim was written is the store's to say."""
    store = store_at(where, tmp_path, request)
    layout, elsewhere = RunLayout("r1"), MonthPasses()
    behind = {"worker": "b", "claimed_at": time.time() - 3600}
    store.write_bytes(layout.month_pass_claim(MONTH, 0), json.dumps(behind).encode())
    assert not claim_month(store, layout, MONTH, 0, "a", MonthPasses())
    looks: list[float] = []

    def sleep(seconds: float) -> None:  # the live claim's pass ends on the third look
        looks.append(seconds)
        if len(looks) == 3:
            month_done(store, layout, MONTH, 0, elsewhere)

    assert wait_for_month(store, layout, MONTH, 0, sleep=sleep) and len(looks) == 3

    ahead = {"worker": "c", "claimed_at": time.time() + 3600}
    store.write_bytes(layout.month_pass_claim(MONTH, 1), json.dumps(ahead).encode())
    monkeypatch.setattr("worker.ahead.CLAIM_STALE_S", 1.0)  # S3 says when an object was written to the second
    time.sleep(2.1)

    def no_waiting(seconds: float) -> None:
        raise AssertionError("waited for a dead worker's claim")

    assert not wait_for_month(store, layout, MONTH, 1, stale_s=1.0, sleep=no_waiting)
    assert claim_month(store, layout, MONTH, 1, "a", MonthPasses())


def test_waiting_for_a_pass_outlasts_looks_the_store_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, layout, elsewhere = open_storage(str(tmp_path)), RunLayout("r1"), MonthPasses()
    assert claim_month(store, layout, MONTH, 0, "a", elsewhere)
    now = float(json.loads(store.read_bytes(layout.month_pass_claim(MONTH, 0)))["claimed_at"]) + 1
    failing = {"looks": 5}
    exists = LocalStorage.exists

    def flaky_exists(self: LocalStorage, key: str) -> bool:
        if failing["looks"]:
            failing["looks"] -= 1
            raise ConnectionResetError("connection reset by peer")
        return exists(self, key)

    monkeypatch.setattr(LocalStorage, "exists", flaky_exists)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        nonlocal now
        sleeps.append(seconds)
        now += seconds
        if len(sleeps) == 8:
            month_done(store, layout, MONTH, 0, elsewhere)

    wait_for_month(store, layout, MONTH, 0, stale_s=60, clock=lambda: now, sleep=sleep)
    # Five failed looks, each pause twice the last, then looks at the usual pace until the pass was done.
    assert sleeps == [0.2, 0.4, 0.8, 1.6, 3.2] + [WAIT_POLL_MAX_S] * 3

    # Looks failing for longer than a claim may go unrenewed: the wait ends with their error.
    store.delete(layout.month_pass_done(MONTH, 0))
    failing["looks"] = 1_000

    def slow_sleep(seconds: float) -> None:
        nonlocal now
        now += 5

    with pytest.raises(ConnectionResetError):
        wait_for_month(store, layout, MONTH, 0, stale_s=60, clock=lambda: now, sleep=slow_sleep)
    assert failing["looks"] == 1_000 - 14  # a look every 5 s, until one fails more than 60 s after the first


def test_a_claimed_pass_renews_its_claim_while_it_runs(tmp_path: Path) -> None:
    store, layout = open_storage(str(tmp_path)), RunLayout("r1")
    assert claim_month(store, layout, MONTH, 0, "a", MonthPasses())

    def renewed_at() -> float:
        return float(json.loads(store.read_bytes(layout.month_pass_claim(MONTH, 0)))["claimed_at"])

    first = renewed_at()
    with renewing_claim(store, layout, MONTH, 0, "a", every_s=0.01):
        deadline = time.monotonic() + 5
        while renewed_at() == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert renewed_at() > first
    last = renewed_at()
    time.sleep(0.05)
    assert renewed_at() == last  # renewals end with the pass
