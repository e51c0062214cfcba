"""On an object store a batch's requests cost round trips: a row group is one GET, and a
batch's markers and listings are in flight together rather than one after another."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from shared.inputs import ALL_COLUMNS, ByteCounter, ParquetCache, month_files, read_batches
from shared.layout import JobKey, RunLayout
from shared.messages import JobMessage, JobParams
from shared.storage import S3Storage, open_storage
from tests.conftest import S3Server
from tests.helpers import upload_dir
from tickq.gen import generate
from tickq.ingest import ingest
from worker.job import MonthListings, execute_batch

MONTH = "2024-03"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    generate(str(root / "raw"), [MONTH], securities=12, rows=60_000)
    ingest(str(root / "raw"), str(root / "laid"), [MONTH], row_group_rows=8_192)
    return root / "laid"


def _counting_gets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    gets: list[tuple[int, int]] = []
    original = S3Storage.get_range

    def get_range(self: S3Storage, key: str, start: int, length: int) -> bytes:
        gets.append((start, length))
        return original(self, key, start, length)

    monkeypatch.setattr(S3Storage, "get_range", get_range)
    return gets


def test_a_row_group_is_one_ranged_get(
    ingested: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.new_bucket()
    upload_dir(ingested, s3_server.client(), bucket, "laid")
    s3 = open_storage(f"s3://{bucket}/laid", s3_server.endpoint)
    local = open_storage(str(ingested))
    [s3_file] = month_files(s3, MONTH)
    [local_file] = month_files(local, MONTH)
    security = ["BHP", "BRK.B"]  # neighbours in sort order
    gets = _counting_gets(monkeypatch)

    def read(storage: Any, file: Any, cache: ParquetCache) -> tuple[pa.Table, int]:
        counter = ByteCounter()
        batches = read_batches(storage, file, ALL_COLUMNS, security=security, counter=counter, cache=cache)
        return pa.Table.from_batches(list(batches)).combine_chunks(), counter.bytes

    s3_rows, s3_bytes = read(s3, s3_file, ParquetCache())
    local_rows, local_bytes = read(local, local_file, ParquetCache())

    assert s3_rows.num_rows > 0 and s3_rows.equals(local_rows)
    footer_gets = 2  # the footer's length, then the footer
    row_group_gets = len(gets) - footer_gets
    assert 1 <= row_group_gets <= 3, gets  # two neighbouring securities' rows span at most three groups
    assert s3_bytes == sum(length for _, length in gets)  # bytes fetched, each counted once
    assert s3_bytes <= local_bytes + 64 * 1024  # no more than the chunks themselves (and the footer)


def test_a_batch_marks_its_jobs_concurrently_and_one_failed_marker_fails_one_job(
    ingested: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    output = f"s3://{bucket}/out"
    params = JobParams(market_tz="Australia/Sydney")
    dates = [f"2024-03-{d:02d}" for d in (4, 5, 6, 7, 8, 11, 12, 13)]
    jobs = [JobMessage.build(run_id="r1", month=MONTH, security="BHP", date=d, input=str(ingested),
                             output=output, processor="analytics", params=params) for d in dates]
    layout = RunLayout("r1")
    doomed = layout.marker(JobKey(MONTH, "BHP", dates[3]))
    in_flight, most = 0, 0
    lock = threading.Lock()
    original = S3Storage.mark

    def mark(self: S3Storage, key: str) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            time.sleep(0.05)  # a round trip to a distant store
            if key == doomed:
                raise OSError("connection reset by peer")
            original(self, key)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(S3Storage, "mark", mark)
    results = execute_batch(jobs, s3_endpoint_url=s3_server.endpoint, worker_id="test", listings=MonthListings())

    failed = [job.date for job, result in zip(jobs, results, strict=True) if isinstance(result, BaseException)]
    assert failed == [dates[3]]
    assert most > 1  # markers were in flight together
    store = open_storage(output, s3_server.endpoint)
    marked = {o.key for o in store.list(layout.succeeded_prefix)}
    assert marked == {layout.marker(JobKey(MONTH, "BHP", d)) for d in dates if d != dates[3]}
