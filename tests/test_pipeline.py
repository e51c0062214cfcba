"""Whole runs through the real broker and a real S3 API, checked against an independent
computation of every table (tests/reference.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.layout import batch_result_header
from shared.topology import Topology
from tests.brokertools import publish_raw, queue_depth
from tests.conftest import S3Server, Tickq, _delete_namespace, log_lines
from tests.helpers import read_csv_tables, read_summary, read_tables, upload_dir
from tests.reference import assert_tables_equal, reference_counts, reference_tables

MONTH = "2024-03"


def _gen(tickq: Tickq, out: Path, *extra: str, rows: int = 60_000, securities: int = 8) -> Path:
    tickq.run("gen", "--out", str(out), "--months", MONTH, "--rows", str(rows),
              "--securities", str(securities), *extra)
    return out


def _run(tickq: Tickq, input_uri: str, output_uri: str, *params: str, workers: int = 2,
         months: str = MONTH, run_id: str = "run1") -> dict:
    produced = tickq.produce("--input", input_uri, "--output", output_uri, "--months", months,
                             "--run-id", run_id, *params)
    assert produced["run_id"] == run_id
    tickq.wait_all(tickq.workers(workers))
    tickq.run("aggregate", "--run", run_id, "--output", output_uri, "--wait", "120")
    return produced


def test_whole_run_on_local_storage_equals_independent_computation(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data")
    produced = _run(tickq, str(data), str(tmp_path / "out"), "--market-tz", "Australia/Sydney")

    expected = reference_tables(str(data), [MONTH], market_tz="Australia/Sydney")
    assert produced["jobs"] == len(expected["security_daily"])
    assert_tables_equal(read_tables(str(tmp_path / "out"), "run1"), expected)
    summary = read_summary(str(tmp_path / "out"), "run1")
    counts = reference_counts(str(data), [MONTH], market_tz="Australia/Sydney")
    assert summary["complete"] is True
    assert summary["jobs_expected"] == summary["jobs_succeeded"] == produced["jobs"]
    assert summary["jobs_dead"] == 0
    assert summary["rows_read"] == counts["rows_read"]
    assert summary["rows_accepted"] == counts["rows_accepted"]
    assert summary["rows_rejected"] == counts["rows_rejected"]


FILTERS = (
    "--market-tz", "Australia/Sydney",
    "--participants", "P01,P02,P03,P05",
    "--venues", "CP,TM",
    "--session", "10:15-15:45",
    "--min-size", "50",
    "--max-size", "200000",
    "--size-buckets", "5000,25000,100000,750000",
)


def test_whole_run_on_s3_with_filters_equals_independent_computation(
    tickq: Tickq, tmp_path: Path, s3_server: S3Server
) -> None:
    data = _gen(tickq, tmp_path / "data", "--format", "csv.gz")
    bucket = s3_server.new_bucket()
    upload_dir(data, s3_server.client(), bucket, "raw")
    output = f"s3://{bucket}/results"
    _run(tickq, f"s3://{bucket}/raw", output, *FILTERS)

    expected = reference_tables(
        str(data), [MONTH], market_tz="Australia/Sydney", participants=["P01", "P02", "P03", "P05"],
        venues=["CP", "TM"], session="10:15-15:45", min_size=50, max_size=200_000,
        size_buckets=[5000, 25000, 100000, 750000],
    )
    actual = read_tables(output, "run1", s3_server.endpoint)
    assert_tables_equal(actual, expected)
    assert len(actual["by_size_bucket"]) == 5
    summary = read_summary(output, "run1", s3_server.endpoint)
    assert summary["complete"] is True
    assert summary["rows_filtered"] > 0


def test_security_codes_of_any_shape_run_on_s3_and_equal_independent_computation(
    tickq: Tickq, tmp_path: Path, s3_server: S3Server
) -> None:
    generated = _gen(tickq, tmp_path / "generated", rows=20_000, securities=4)
    table = pq.read_table(generated / MONTH / "part-0000.parquet")
    # Codes as other systems write them: Bloomberg's, a share class after a slash, any letters.
    renamed = dict(zip(sorted(set(table.column("security").to_pylist())),
                       ["BHP AU Equity", "BRK/B", "Ørsted:CO", ".."], strict=True))
    codes = pa.array([renamed[code] for code in table.column("security").to_pylist()])
    data = tmp_path / "data"
    (data / MONTH).mkdir(parents=True)
    pq.write_table(table.set_column(table.schema.get_field_index("security"), "security", codes),
                   data / MONTH / "part-0000.parquet")
    wanted = ["BHP AU Equity", "BRK/B", "Ørsted:CO"]
    bucket = s3_server.new_bucket()
    upload_dir(data, s3_server.client(), bucket, "raw")
    output = f"s3://{bucket}/results"
    produced = _run(tickq, f"s3://{bucket}/raw", output, "--market-tz", "Australia/Sydney",
                    "--securities", ",".join(wanted))

    expected = reference_tables(str(data), [MONTH], market_tz="Australia/Sydney", securities=wanted)
    assert produced["jobs"] == len(expected["security_daily"]) > 0
    assert set(expected["security_daily"]["security"]) == set(wanted)
    assert_tables_equal(read_tables(output, "run1", s3_server.endpoint), expected)
    assert read_summary(output, "run1", s3_server.endpoint)["rows_unassigned"] == 0

    # Ingested with day files, which small batches read: the same jobs from files of their own.
    laid = tmp_path / "laid"
    tickq.run("ingest", "--input", str(data), "--output", str(laid), "--months", MONTH, "--quiet",
              "--day-files", "Australia/Sydney")
    assert len(list((laid / "_days" / MONTH).iterdir())) == 4 + 1  # a folder a code, and the manifest
    dates = "2024-03-04,2024-03-05"
    _run(tickq, str(laid), str(tmp_path / "out"), "--market-tz", "Australia/Sydney", "--securities", "BRK/B,..",
         "--dates", dates, run_id="days")
    expected = reference_tables(str(data), [MONTH], market_tz="Australia/Sydney", securities=["BRK/B", ".."],
                                dates=dates.split(","))
    assert len(expected["security_daily"]) == 4
    assert_tables_equal(read_tables(str(tmp_path / "out"), "days"), expected)


def test_rows_no_job_can_own_are_said_in_the_producers_line_and_log(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=2_000, securities=2)
    table = pq.read_table(data / MONTH / "part-0000.parquet").slice(0, 30)
    codes = [" PADDED"] * 10 + ["X" * 65] * 5 + [None] * 5 + ["OK"] * 10
    pq.write_table(table.set_column(table.schema.get_field_index("security"), "security", pa.array(codes)),
                   data / MONTH / "part-0001.parquet")
    result = tickq.run("produce", "--input", str(data), "--output", str(tmp_path / "out"), "--months", MONTH,
                       "--run-id", "odd", "--dry-run")
    line = result.stderr.strip().splitlines()[-1]
    assert line.endswith(f"; 20 rows belong to no job (no security, a security code tickq cannot use, such as "
                         f"' PADDED', '{'X' * 40}', or no trade date) and are in no table")
    logged = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    warned = [x for x in logged if x.get("event") == "produce.rows_unassigned"]
    assert [(x["month"], x["rows"]) for x in warned] == [(MONTH, 20)]


def _write_mixed_month(root: Path) -> None:
    """Parquet parts in the month folder plus a .csv.gz beside it, across Sydney's DST end
    (2024-04-07 03:00 AEDT -> 02:00 AEST), with side spellings, nulls and bad rows."""
    month = root / "2024-04"
    (month / "nested").mkdir(parents=True)
    ts = pd.to_datetime([
        "2024-04-06T12:59:59Z",  # 23:59:59 AEDT on the 6th
        "2024-04-06T13:00:00Z",  # 00:00 AEDT on the 7th
        "2024-04-06T15:30:00Z",  # 02:30 AEDT on the 7th (before the change)
        "2024-04-06T16:30:00Z",  # 02:30 AEST on the 7th (after the change)
        "2024-04-07T23:10:00Z",  # 09:10 AEST on the 8th
        "2024-04-08T01:00:00Z",
    ], utc=True)
    part1 = pa.table({
        "ts": pa.array(ts.as_unit("ns"), pa.timestamp("ns", tz="UTC")),
        "security": ["BHP", "BHP", "BRK.B", "BHP", "CBA", "CBA"],
        "price": [45.5, 45.6, 410.25, 45.7, 120.0, 121.5],
        "size": pa.array([100, 2500, 30, 700, 1200, 40], pa.int64()),
        "side": ["B", "sell", "A", "Buy", None, "x"],
        "participant": ["P01", None, "P02", "P01", "P03", None],
        "venue": ["CP", "TM", None, "TM", "CP", "TM"],
        "extra": [1, 2, 3, 4, 5, 6],
    })
    pq.write_table(part1, month / "part-a.parquet")
    naive = pa.table({  # naive timestamps are UTC
        "ts": pa.array(pd.to_datetime(["2024-04-07T00:30:00", "2024-04-07T05:00:00"]).as_unit("us")),
        "security": ["BHP", "CBA"],
        "price": [46.0, 0.0],  # the second row is rejected: price <= 0
        "size": [300, 10],
    })
    pq.write_table(naive, month / "nested" / "part-b.parquet")
    csv_text = "\n".join([
        "ts,security,price,size,side,participant,venue",
        "2024-04-07T23:30:00Z,BHP,45.9,150,BUY,P02,CP",
        "1712534400000000000,CBA,121.0,80,s,,",      # integer ns; null participant and venue
        "2024-04-08T10:00:00+10:00,BHP,46.1,60,S,P01,TM",
        "2024-04-08T01:00:00Z,BHP,,10,B,P01,TM",    # rejected: null price
        "2024-04-08T01:00:00Z,BHP,46.0,-5,B,P01,TM",  # rejected: size <= 0
        "2024-04-08T01:00:00Z,BHP,46.0,1.5,B,P01,TM",  # rejected: size not an integer
        "2024-04-08T01:00:00Z,BHP,inf,1,B,P01,TM",  # rejected: price not finite
        "2024-04-08T01:00:00Z,BHP,46.0,abc,B,P01,TM",  # rejected: size unparseable
    ]) + "\n"
    with gzip.open(root / "2024-04.csv.gz", "wt") as f:
        f.write(csv_text)


def test_mixed_formats_dst_sides_nulls_and_rejected_rows(tickq: Tickq, tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_mixed_month(data)
    output = tmp_path / "out"
    _run(tickq, str(data), str(output), "--market-tz", "Australia/Sydney", months="2024-04", workers=1)

    expected = reference_tables(str(data), ["2024-04"], market_tz="Australia/Sydney")
    actual = read_tables(str(output), "run1")
    assert_tables_equal(actual, expected)
    daily = actual["security_daily"].set_index(["security", "trade_date"])
    import datetime as dt

    # 12:59:59Z is still the 6th in Sydney; 13:00Z is the 7th; both 02:30s are the 7th.
    assert daily.loc[("BHP", dt.date(2024, 4, 6)), "records"] == 1
    assert daily.loc[("BHP", dt.date(2024, 4, 7)), "records"] == 3  # 13:00Z, 16:30Z, 00:30Z naive
    hours = actual["timeseries_hourly"]
    on_7th = hours[hours["trade_date"] == dt.date(2024, 4, 7)].set_index("hour")
    assert on_7th.loc[2, "records"] == 2  # the repeated 02:00 hour holds both 02:30s
    summary = read_summary(str(output), "run1")
    assert summary["rows_rejected"] == 6
    assert summary["rows_accepted"] == 6 + 1 + 3
    participants = actual["by_participant"]
    assert participants["participant"].isna().sum() == 1  # null is its own group


def test_same_run_id_again_publishes_only_unfinished_jobs_and_changes_nothing(
    tickq: Tickq, tmp_path: Path
) -> None:
    data = _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    output = str(tmp_path / "out")
    first = _run(tickq, str(data), output)
    tables_before = read_csv_tables(output, "run1")

    again = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "run1")
    assert again == {"run_id": "run1", "jobs": first["jobs"], "published": 0}

    # Lose two jobs' success markers: a rerun publishes exactly those two.
    markers = sorted((tmp_path / "out" / "runs" / "run1" / "succeeded").rglob("*.json"))
    for marker in markers[:2]:
        marker.unlink()
    rerun = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "run1")
    assert rerun["published"] == 2
    tickq.wait_all(tickq.workers(1))
    # Those two jobs' results are now stored twice (first batch, then the rerun's): each counts once.
    stored = [key for batch in (tmp_path / "out" / "runs" / "run1" / "results").rglob("*.arrows")
              for key in batch_result_header(batch.read_bytes())[1]]
    assert len(stored) == first["jobs"] + 2
    tickq.run("aggregate", "--run", "run1", "--output", output, "--wait", "60")
    assert read_csv_tables(output, "run1") == tables_before

    other = tickq.run("produce", "--input", str(data), "--output", output, "--months", MONTH,
                      "--run-id", "run1", "--min-size", "10", check=False)
    assert other.returncode == 2
    assert "already exists with other parameters" in other.stderr
    assert "Traceback" not in other.stderr


def test_paths_through_dot_dot_name_their_folders_and_every_job_runs(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    (tmp_path / "elsewhere").mkdir()
    # Jobs carry no '..' segment: the producer resolves such a local path before anything is written.
    produced = _run(tickq, str(tmp_path / "elsewhere" / ".." / "data"), str(tmp_path / "elsewhere" / ".." / "out"))
    assert produced["published"] == produced["jobs"] > 0
    manifest = json.loads((tmp_path / "out" / "runs" / "run1" / "manifest.json").read_text())
    assert manifest["request"]["input"] == str(data) and manifest["request"]["output"] == str(tmp_path / "out")
    summary = read_summary(str(tmp_path / "out"), "run1")
    assert summary["complete"] is True and summary["jobs_succeeded"] == produced["jobs"]


def test_relative_paths_reach_workers_elsewhere_as_absolute_ones_and_a_rerun_matches(
    tickq: Tickq, tmp_path: Path
) -> None:
    _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    # Relative to the producer's folder; the worker runs in another one.
    produced = tickq.produce("--input", "data", "--output", "out", "--months", MONTH, "--run-id", "rel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "tickq", "worker", "--idle-exit", "2", "--quiet"], env=tickq.env,
                   cwd=elsewhere, check=True, timeout=300)
    tickq.run("aggregate", "--run", "rel", "--output", "out")
    summary = read_summary(str(tmp_path / "out"), "rel")
    assert summary["complete"] is True and summary["jobs_succeeded"] == produced["jobs"] > 0
    assert not (elsewhere / "out").exists()
    manifest_path = tmp_path / "out" / "runs" / "rel" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert (manifest["request"]["input"], manifest["request"]["output"]) == (str(tmp_path / "data"),
                                                                            str(tmp_path / "out"))
    rerun = ("--input", "data", "--output", "out", "--months", MONTH, "--run-id", "rel")
    assert tickq.produce(*rerun)["published"] == 0
    # A run whose manifest kept its paths as given (before they were made absolute) resumes too.
    manifest["request"].update(input="data", output="out")
    manifest_path.write_text(json.dumps(manifest))
    assert tickq.produce(*rerun)["published"] == 0


def test_an_object_store_location_through_dot_dot_is_refused_before_anything_is_written(
    tickq: Tickq, tmp_path: Path
) -> None:
    data = _gen(tickq, tmp_path / "data", rows=1_000, securities=2)
    result = tickq.run("produce", "--input", str(data), "--output", "s3://results/runs/../other", "--months", MONTH,
                       check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "tickq produce: --output: output must not contain '..' segments"


def test_a_job_delivered_twice_is_counted_once(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    output = str(tmp_path / "out")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "dup")
    # The producer's rerun publishes every unfinished job a second time: all are duplicates.
    again = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "dup")
    assert again["published"] == produced["jobs"]
    workers = tickq.workers(2)
    tickq.wait_all(workers)
    tickq.run("aggregate", "--run", "dup", "--output", output)
    assert_tables_equal(read_tables(output, "dup"), reference_tables(str(data), [MONTH]))
    finished = [line for w in workers for line in log_lines(w) if line.get("event") == "job.finished"]
    assert len(finished) == 2 * produced["jobs"]
    assert sum(1 for line in finished if line.get("already_done")) >= 1
    assert sum(1 for line in finished if line["outcome"] == "succeeded") == 2 * produced["jobs"]


def test_aggregator_service_writes_the_same_tables_as_aggregate(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    output = str(tmp_path / "out")
    tickq.deployed_run(data, output, MONTH, "svc")
    from_service = read_csv_tables(output, "svc")
    tickq.run("aggregate", "--run", "svc", "--output", output)
    assert read_csv_tables(output, "svc") == from_service
    assert_tables_equal(read_tables(output, "svc"), reference_tables(str(data), [MONTH]))


def test_aggregator_service_writes_a_run_whose_later_events_it_never_got(
    tickq: Tickq, tmp_path: Path, amqp_url: str
) -> None:
    # The event queue drops its oldest events when it is full. The service reads the state of
    # a run that stays unaccounted with no event for --resync-after seconds again from storage.
    data = _gen(tickq, tmp_path / "data", rows=20_000, securities=4)
    # Ingested, so that jobs finish batch by batch (a raw month's first pass would store them all).
    laid = tmp_path / "laid"
    tickq.run("ingest", "--input", str(data), "--output", str(laid), "--months", MONTH)
    output = str(tmp_path / "out")
    args = ("--input", str(laid), "--output", output, "--months", MONTH, "--run-id", "lost")
    produced = tickq.produce(*args)
    tickq.wait_all([tickq.start("worker", "--concurrency", "1", "--prefetch", "1", "--max-jobs", "3")])
    service = tickq.start("aggregator", "--idle-exit", "120", "--resync-after", "1")
    events = Topology(tickq.namespace).aggregator_events
    deadline = time.monotonic() + 60
    while queue_depth(amqp_url, events) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queue_depth(amqp_url, events) == 0  # the service has seen the first jobs' events
    # The other jobs run in another namespace: their events never reach this service.
    other = f"{tickq.namespace}-other"
    try:
        tickq.run("produce", *args, "--quiet", env={"TICKQ_NAMESPACE": other})
        tickq.wait_all([tickq.start("worker", "--idle-exit", "3", env={"TICKQ_NAMESPACE": other})])
    finally:
        asyncio.run(_delete_namespace(amqp_url, other))
    deadline = time.monotonic() + 120
    while not [x for x in log_lines(service) if x.get("event") == "aggregator.run_written"]:
        assert service.poll() is None and time.monotonic() < deadline, log_lines(service)[-5:]
        time.sleep(0.2)
    service.send_signal(signal.SIGTERM)
    tickq.wait_all([service], timeout=60)
    lines = log_lines(service)
    assert any(x["event"] == "aggregator.resynced" and x["events_missed"] for x in lines)
    [written] = [x for x in lines if x.get("event") == "aggregator.run_written"]
    assert written["complete"] is True and written["succeeded"] == produced["jobs"]
    assert_tables_equal(read_tables(output, "lost"), reference_tables(str(data), [MONTH]))


def test_aggregator_service_drops_an_event_of_a_run_that_is_not_there(
    tickq: Tickq, tmp_path: Path, amqp_url: str
) -> None:
    # A run whose output was deleted (or an event naming a wrong place) cannot be aggregated
    # however often the event comes back: the service says so once and goes on.
    event = {"v": 1, "type": "job.succeeded", "run_id": "gone", "output": str(tmp_path / "nowhere"), "worker": "w",
             "jobs": [{"job_id": f"gone:{MONTH}:AAA:2024-03-04", "month": MONTH, "security": "AAA",
                       "date": "2024-03-04"}]}
    events = Topology(tickq.namespace).aggregator_events
    publish_raw(amqp_url, tickq.namespace, [json.dumps(event).encode()], queue=events)
    service = tickq.start("aggregator", "--idle-exit", "2")
    tickq.wait_all([service], timeout=60)
    assert queue_depth(amqp_url, events) == 0
    [dropped] = [x for x in log_lines(service) if x.get("event") == "aggregator.event_dropped"]
    assert dropped["run_id"] == "gone" and "no run gone" in dropped["error"]


def test_aggregator_service_leaves_no_record_for_a_broker_dead_letter_of_a_run_that_is_not_there(
    tickq: Tickq, tmp_path: Path, amqp_url: str
) -> None:
    nowhere = tmp_path / "nowhere"
    job = {"v": 1, "run_id": "gone", "job_id": f"gone:{MONTH}:AAA:2024-03-04", "month": MONTH, "security": "AAA",
           "date": "2024-03-04", "input": str(tmp_path / "data"), "output": str(nowhere), "processor": "analytics",
           "params": {}}
    topology = Topology(tickq.namespace)
    # As the broker dead-letters a job at its delivery limit: through N.dlx, no tickq headers.
    publish_raw(amqp_url, tickq.namespace, [json.dumps(job).encode()], queue=topology.dead, exchange=topology.dlx)
    service = tickq.start("aggregator", "--idle-exit", "2")
    tickq.wait_all([service], timeout=60)
    assert queue_depth(amqp_url, topology.aggregator_events) == 0
    [dropped] = [x for x in log_lines(service) if x.get("event") == "aggregator.event_dropped"]
    assert dropped["run_id"] == "gone" and not nowhere.exists()
    assert not [x for x in log_lines(service) if x.get("event") == "aggregator.recorded_dead"]


def test_summary_and_exit_status_when_jobs_are_missing(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=5_000, securities=2)
    output = str(tmp_path / "out")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "part")
    result = tickq.run("aggregate", "--run", "part", "--output", output, "--wait", "1", check=False)
    assert result.returncode == 3
    summary = json.loads((tmp_path / "out" / "runs" / "part" / "aggregates" / "summary.json").read_text())
    assert summary["complete"] is False
    assert summary["jobs_missing"] == produced["jobs"]


def test_damaged_or_removed_results_fail_aggregation_with_one_line(tickq: Tickq, tmp_path: Path) -> None:
    data = _gen(tickq, tmp_path / "data", rows=5_000, securities=2)
    output = str(tmp_path / "out")
    _run(tickq, str(data), output, workers=1, run_id="dmg")
    batches = sorted((tmp_path / "out" / "runs" / "dmg" / "results").rglob("*.arrows"))
    assert batches

    good = batches[0].read_bytes()
    batches[0].write_bytes(good[: len(good) // 2])
    corrupt = tickq.run("aggregate", "--run", "dmg", "--output", output, check=False)
    assert corrupt.returncode == 2
    assert "are corrupt" in corrupt.stderr and batches[0].name in corrupt.stderr
    assert "Traceback" not in corrupt.stderr and len(corrupt.stderr.strip().splitlines()) == 1

    for batch in batches:
        batch.unlink()
    removed = tickq.run("aggregate", "--run", "dmg", "--output", output, check=False)
    assert removed.returncode == 2
    assert "have no stored result" in removed.stderr
    assert "Traceback" not in removed.stderr and len(removed.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--months", "2024-13"), "is not a month"),
        (("--months", "2024-03", "--session", "25:00-26:00"), "--session"),
        (("--months", "2024-03", "--market-tz", "Mars/Olympus"), "parameters: unknown market time zone 'Mars/Olympus'"),
        (("--months", "2024-03", "--size-buckets", "5,1"), "strictly increasing"),
        (("--months", "2024-03", "--min-size", "10", "--max-size", "5"), "parameters: min_size must not exceed"),
        (("--months", "2024-03", "--processor", "nope"), "unknown processor"),
        (("--months", "2024-05"), "no jobs found"),
    ],
)
def test_bad_run_parameters_fail_with_one_line(
    tickq: Tickq, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    data = _gen(tickq, tmp_path / "data", rows=1_000, securities=2)
    result = tickq.run("produce", "--input", str(data), "--output", str(tmp_path / "out"), *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_run_over_dbn_input_matches_the_same_orders_in_parquet(tickq: Tickq, tmp_path: Path) -> None:
    parquet = _gen(tickq, tmp_path / "pq", rows=20_000, securities=4)
    dbn = _gen(tickq, tmp_path / "dbn", "--format", "dbn.zst", rows=20_000, securities=4)
    _run(tickq, str(parquet), str(tmp_path / "out"), "--market-tz", "Australia/Sydney", run_id="pq")
    _run(tickq, str(dbn), str(tmp_path / "out"), "--market-tz", "Australia/Sydney", run_id="dbn")
    from_parquet = read_tables(str(tmp_path / "out"), "pq")
    from_dbn = read_tables(str(tmp_path / "out"), "dbn")
    # DBN carries no participant and its venue is the publisher's: compare everything else.
    shared = ["security_daily", "by_security", "by_date", "by_hour", "by_size_bucket",
              "timeseries_hourly", "timeseries_daily"]
    assert_tables_equal({n: from_dbn[n] for n in shared}, {n: from_parquet[n] for n in shared})


def test_a_raw_month_gets_a_key_file_for_its_workers_and_an_ingested_one_does_not(
    tickq: Tickq, tmp_path: Path
) -> None:
    from shared.layout import RunLayout, read_job_keys, read_month_job_keys
    from shared.storage import open_storage
    from tickq.ingest import ingest

    data = _gen(tickq, tmp_path / "data")
    ingest(str(data), str(tmp_path / "laid"), [MONTH])
    _run(tickq, str(data), str(tmp_path / "raw-out"), "--market-tz", "Australia/Sydney", run_id="raw")
    _run(tickq, str(tmp_path / "laid"), str(tmp_path / "laid-out"), "--market-tz", "Australia/Sydney", run_id="laid")

    raw_out, laid_out = open_storage(str(tmp_path / "raw-out")), open_storage(str(tmp_path / "laid-out"))
    # Workers served the raw month's jobs from passes over the whole month (the key file says
    # which jobs to compute ahead); the ingested month's batches read their own row groups.
    assert read_month_job_keys(raw_out, RunLayout("raw"), MONTH) == read_job_keys(raw_out, RunLayout("raw"))
    assert read_month_job_keys(laid_out, RunLayout("laid"), MONTH) is None
    expected = reference_tables(str(data), [MONTH], market_tz="Australia/Sydney")
    assert_tables_equal(read_tables(str(tmp_path / "raw-out"), "raw"), expected)
    assert_tables_equal(read_tables(str(tmp_path / "laid-out"), "laid"), expected)
