"""Processors: `extract` returns exactly the filtered rows; a third-party processor plugs in
through the ``tickq.processors`` entry-point group."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import Tickq
from tests.helpers import read_summary
from tests.reference import accepted_rows

MONTH = "2024-03"


def test_extract_run_writes_exactly_the_filtered_rows(tickq: Tickq, tmp_path: Path) -> None:
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "20000", "--securities", "6")
    tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "cp",
                  "--processor", "extract", "--venues", "CP", "--market-tz", "Australia/Sydney",
                  "--securities", "BHP,CBA,AAA,BRK.B")
    tickq.wait_all(tickq.workers(2))
    tickq.run("aggregate", "--run", "cp", "--output", str(output))

    partitions = ds.partitioning(pa.schema([("security", pa.string()), ("trade_date", pa.date32())]), flavor="hive")
    extracted = ds.dataset(output / "runs/cp/extract", format="parquet", partitioning=partitions).to_table()
    expected = accepted_rows(str(data), [MONTH], market_tz="Australia/Sydney", venues=["CP"],
                             securities=["BHP", "CBA", "AAA", "BRK.B"])
    assert len(expected) > 0
    assert extracted.num_rows == len(expected)
    ours = extracted.to_pandas()
    columns = ["ts", "security", "price", "size", "venue"]
    key = ["security", "ts", "price", "size"]
    left = ours[columns].sort_values(key).reset_index(drop=True)
    right = expected[columns].sort_values(key).reset_index(drop=True)
    left["ts"] = pd.to_datetime(left["ts"], utc=True)
    right["ts"] = pd.to_datetime(right["ts"], utc=True)
    pd.testing.assert_frame_equal(left, right, check_dtype=False)
    counts = pq.read_table(output / "runs/cp/aggregates/extract_counts.parquet").to_pandas()
    assert int(counts["rows"].sum()) == len(expected)
    assert read_summary(str(output), "cp")["complete"] is True


def test_a_third_party_processor_registered_by_entry_point(tickq: Tickq, tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugins"
    dist = plugin_dir / "tickq_peak-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tickq-peak\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[tickq.processors]\npeak = tests.plugin_processor:PeakProcessor\n")
    tickq.env["PYTHONPATH"] = f"{plugin_dir}:{tickq.env['PYTHONPATH']}"

    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "8000", "--securities", "3")
    tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "pk",
                  "--processor", "peak")
    tickq.wait_all(tickq.workers(1))
    tickq.run("aggregate", "--run", "pk", "--output", str(output))
    peak = pq.read_table(output / "runs/pk/aggregates/peak.parquet").to_pandas()
    rows = accepted_rows(str(data), [MONTH])
    expected = rows.groupby(["security", "trade_date"])["price"].max()
    assert len(peak) == len(expected)
    for record in peak.itertuples():
        assert record.max_price == expected[(record.security, record.trade_date)]
    assert int(peak["cp_orders"].sum()) == int((rows["venue"] == "CP").sum())


def test_many_distinct_groups_are_accumulated_by_hashing_with_the_same_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A participant column with very many distinct values is grouped by hashing instead of
    # into a dense (job x participant) table; both ways must give every job the same partials.
    from shared.inputs import normalise
    from shared.messages import JobMessage, JobParams
    from shared.processors import JobContext, analytics

    def _job(security: str) -> JobMessage:
        return JobMessage.build(run_id="r", month=MONTH, security=security, date="2024-03-04", input="/in",
                                output="/out", processor="analytics", params=JobParams())

    rng = np.random.default_rng(11)
    n = 20_000
    raw = pa.record_batch({
        "ts": pa.array(1_709_251_200_000_000_000 + rng.integers(0, 20 * 86_400 * 10**9, n), pa.int64()),
        "security": pa.array(rng.choice(["AAA", "BHP"], n)),
        "price": pa.array(rng.uniform(1, 100, n)),
        "size": pa.array(rng.integers(1, 5_000, n)),
        "side": pa.array([("B", "S", None)[i % 3] for i in rng.integers(0, 3, n)]),
        "participant": pa.array([None if i % 97 == 0 else f"P{i % 3_000}" for i in range(n)]),
        "venue": pa.array([("CP", "TM", None)[i % 3] for i in rng.integers(0, 3, n)]),
    })
    rows, _ = normalise(raw, "Australia/Sydney")
    slots = rng.integers(0, 40, n)

    def partials(dense_cells: int) -> list[dict]:
        monkeypatch.setattr(analytics, "DENSE_CELLS", dense_cells)
        processor = analytics.AnalyticsProcessor()
        contexts = [JobContext(job=_job(f"S{i}"), output=None) for i in range(40)]  # type: ignore[arg-type]
        jobs = processor.start_batch(contexts)
        for start in range(0, n, n // 4):  # rows arrive in several batches
            processor.add_many(jobs, rows.slice(start, n // 4), slots[start : start + n // 4])
        one_by_one = [processor.start_job(context) for context in contexts]
        for slot, job in enumerate(one_by_one):
            job.add(rows.filter(pa.array(slots == slot)))
        assert _close([job.finish() for job in jobs], [job.finish() for job in one_by_one])
        # Rows in runs of one job (input sorted by security and time) are reduced per run first.
        order = np.argsort(slots, kind="stable")
        in_runs = processor.start_batch(contexts)
        processor.add_many(in_runs, rows.take(pa.array(order)), slots[order])
        assert _close([job.finish() for job in jobs], [job.finish() for job in in_runs])
        # The batch's columns (what the worker stores) hold exactly what each job's JSON form does.
        assert processor.finish_batch(jobs).equals(analytics.results_table([job.finish() for job in jobs]))
        return [job.finish() for job in jobs]

    dense, hashed = partials(1 << 30), partials(0)
    # Cells merged as they come (bounded memory on unsorted input) give the same partials.
    monkeypatch.setattr(analytics, "COMPACT_CELLS", 0)
    assert _close(partials(1 << 30), dense)
    assert len(dense[0]["groups"]["participant"]["keys"]) > 100
    assert _close(dense, hashed)


def test_a_jobs_partials_are_those_of_adding_its_rows_in_turn_whoever_shares_its_batches() -> None:
    # A job is computed alone, in a batch of a few, or in a month pass of thousands, from rows
    # sorted by job or interleaved: its partials, sums of floats included, must be to the bit
    # those of adding its rows one at a time in input order, so a job run again gives the
    # same result whichever way the worker served it.
    from shared.inputs import normalise
    from shared.messages import JobParams
    from shared.processors.analytics import BatchPartials

    rng = np.random.default_rng(23)
    n, jobs = 30_000, 300
    raw = pa.record_batch({
        "ts": pa.array(1_709_251_200_000_000_000 + rng.integers(0, 86_400 * 10**9, n), pa.int64()),
        "security": pa.array(["AAA"] * n),
        "price": pa.array(rng.uniform(1, 100, n)),
        "size": pa.array(rng.integers(1, 5_000, n)),
        "side": pa.array([("B", "S", None)[i] for i in rng.integers(0, 3, n)]),
        "participant": pa.array([None if i == 11 else f"P{i}" for i in rng.integers(0, 12, n)]),
        "venue": pa.array([("CP", "TM")[i] for i in rng.integers(0, 2, n)]),
    })
    rows, _ = normalise(raw, "Australia/Sydney")
    slots = rng.integers(0, jobs, n)
    params = JobParams()

    expected = [_added_in_turn(rows.filter(pa.array(slots == slot))) for slot in range(jobs)]

    def served(order: np.ndarray, batch_rows: int) -> list[dict]:
        partials = BatchPartials(params, jobs)
        for start in range(0, n, batch_rows):
            part = order[start:start + batch_rows]
            partials.add(rows.take(pa.array(part)), slots[part])
        return [partials.result(slot) for slot in range(jobs)]

    every = np.arange(n)
    by_job = np.argsort(slots, kind="stable")
    for order, batch_rows in ((every, n), (every, 500), (by_job, 7_000), (by_job, 64)):
        assert [result["day"] for result in served(order, batch_rows)] == [e["day"] for e in expected]
        for result, wanted in zip(served(order, batch_rows), expected, strict=True):
            assert result["groups"]["participant"] == wanted["participant"]
    for slot in range(0, jobs, 37):  # alone, in batches of a few rows
        alone = BatchPartials(params, 1)
        own = rows.filter(pa.array(slots == slot))
        for start in range(0, own.num_rows, 9):
            part = own.slice(start, 9)
            alone.add(part, np.zeros(part.num_rows, dtype=np.int64))
        assert alone.result(0)["day"] == expected[slot]["day"]
        assert alone.result(0)["groups"]["participant"] == expected[slot]["participant"]


def test_volumes_stay_exact_integers_beyond_what_a_float_holds() -> None:
    # The contract's integers are exact: sizes near 2**52 differ in their last units, which a
    # sum taken in float64 (np.bincount's weights, say) would round away.
    from shared.inputs import normalise
    from shared.messages import JobParams
    from shared.processors.analytics import BatchPartials

    rng = np.random.default_rng(7)
    n = 2_000
    size = (1 << 52) + rng.integers(1, 1_000, n)
    raw = pa.record_batch({
        "ts": pa.array(1_709_251_200_000_000_000 + rng.integers(0, 86_400 * 10**9, n), pa.int64()),
        "security": pa.array(["AAA"] * n),
        "price": pa.array(rng.uniform(1, 100, n)),
        "size": pa.array(size),
        "side": pa.array([("B", "S")[i] for i in rng.integers(0, 2, n)]),
        "participant": pa.array([f"P{i}" for i in rng.integers(0, 3, n)]),
        "venue": pa.array(["CP"] * n),
    })
    rows, _ = normalise(raw, "UTC")
    slots = rng.integers(0, 3, n)
    partials = BatchPartials(JobParams(), 3)
    partials.add(rows, slots)
    for slot in range(3):
        wanted = _added_in_turn(rows.filter(pa.array(slots == slot)))
        result = partials.result(slot)
        for name in ("records", "volume", "buy_volume", "sell_volume"):
            assert result["day"][name] == wanted["day"][name], name
        assert result["groups"]["participant"]["volume"] == wanted["participant"]["volume"]


def _added_in_turn(rows: pa.Table) -> dict[str, Any]:
    """A job's day summary and participant cells, adding its rows one at a time."""
    day: dict[str, Any] = {"records": 0, "volume": 0, "notional": 0.0, "low": math.inf, "high": -math.inf,
                           "buy_volume": 0, "sell_volume": 0, "first_ts": None, "last_ts": None}
    cells: dict[str | None, list[Any]] = {}
    ts = rows.column("ts").cast(pa.int64()).to_pylist()
    for i, (price, size, side, who) in enumerate(zip(*(rows.column(c).to_pylist() for c in (
            "price", "size", "side", "participant")), strict=True)):
        day["records"] += 1
        day["volume"] += size
        day["notional"] += price * size
        day["low"], day["high"] = min(day["low"], price), max(day["high"], price)
        day["buy_volume"] += size if side == "B" else 0
        day["sell_volume"] += size if side == "S" else 0
        day["first_ts"] = ts[i] if day["first_ts"] is None else min(day["first_ts"], ts[i])
        day["last_ts"] = ts[i] if day["last_ts"] is None else max(day["last_ts"], ts[i])
        cell = cells.setdefault(who, [0, 0, 0.0])
        cell[0], cell[1], cell[2] = cell[0] + 1, cell[1] + size, cell[2] + price * size
    keys = sorted(cells, key=lambda k: (k is None, k or ""))
    return {"day": day, "participant": {"keys": keys, "records": [cells[k][0] for k in keys],
                                        "volume": [cells[k][1] for k in keys],
                                        "notional": [cells[k][2] for k in keys]}}


def _close(left: object, right: object) -> bool:
    """Equal, floats to a relative 1e-12 (the two ways add in different orders)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_close(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_close(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right, rel_tol=1e-12)
    return left == right


def test_group_sums_do_not_depend_on_result_format(tmp_path: Path) -> None:
    # Job results keep their groups as columns; results of earlier versions hold rows. The
    # aggregator sums both alike.
    from shared.messages import JobParams
    from shared.processors import StoredResult, analytics
    from shared.storage import open_storage
    from shared.tables import TableSink

    rng = np.random.default_rng(5)
    results = []
    for security in ("AAA", "BHP"):
        for day in ("2024-03-04", "2024-03-05"):
            groups = {}
            for dim, keys in (("participant", ["P1", "P2", None]), ("venue", ["CP", None]), ("hour", [9, 10, 15]),
                              ("size_bucket", [0, 2])):
                groups[dim] = {"keys": keys, "records": rng.integers(1, 9, len(keys)).tolist(),
                               "volume": rng.integers(1, 999, len(keys)).tolist(),
                               "notional": rng.uniform(1, 1e6, len(keys)).tolist()}
            records = sum(groups["hour"]["records"])
            day_part = analytics.DaySummary(records, sum(groups["hour"]["volume"]), sum(groups["hour"]["notional"]),
                                            1.0, 2.0, 1, 1, 1, 2).to_json()
            results.append(StoredResult(MONTH, security, day, {}, {"day": day_part, "groups": groups}))

    def as_rows(result: StoredResult) -> StoredResult:
        groups = {dim: [list(cell) for cell in zip(*columns.values(), strict=True)]
                  for dim, columns in result.data["groups"].items()}
        return StoredResult(result.month, result.security, result.date, {}, {**result.data, "groups": groups})

    def tables(name: str, parts: list[StoredResult]) -> dict[str, pd.DataFrame]:
        storage = open_storage(str(tmp_path / name))
        analytics.AnalyticsProcessor().aggregate(parts, JobParams(), TableSink(storage, "t/"))
        return {t: pq.read_table(tmp_path / name / "t" / f"{t}.parquet").to_pandas() for t in analytics.TABLES}

    columns = tables("columns", results)
    rows = tables("rows", [as_rows(r) for r in results])
    participants = pq.read_table(tmp_path / "columns/t/by_participant.parquet").column("participant")
    assert participants.to_pylist() == ["P1", "P2", None]
    assert columns["timeseries_hourly"]["records"].sum() == sum(sum(r.data["groups"]["hour"]["records"])
                                                                for r in results)
    for name, expected in columns.items():
        pd.testing.assert_frame_equal(rows[name], expected, rtol=1e-12)


def test_group_sums_equal_adding_each_cell_in_turn_across_calls() -> None:
    from shared.processors.analytics import _GroupSums

    rng = np.random.default_rng(5)
    sums, expected = _GroupSums(), dict[str | None, list[Any]]()
    for _ in range(40):  # many calls, each with its own codes, a key's cells split across them
        n = int(rng.integers(1, 6))
        keys = [None, *(f"P{k}" for k in rng.permutation(4)[:3].tolist())]
        codes = rng.integers(0, len(keys), n)
        records, volume = rng.integers(1, 100, n), rng.integers(1, 10**12, n)
        notional = rng.random(n) * 1e7
        sums.add(codes, keys, records, volume, notional)
        for code, r, v, amount in zip(codes.tolist(), records.tolist(), volume.tolist(), notional.tolist(),
                                      strict=True):
            total = expected.setdefault(keys[code], [0, 0, 0.0])
            total[0], total[1], total[2] = total[0] + r, total[1] + v, total[2] + amount

    totals = sums.totals()
    assert totals.keys() == expected.keys()
    for key, (records, volume, notional) in expected.items():
        assert (totals[key].records, totals[key].volume, totals[key].notional) == (records, volume, notional)


def test_tables_are_those_of_merging_day_summaries_in_turn_whatever_the_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The aggregator folds chunks of job results with numpy; its sums must be, to the bit, those
    # of merging the jobs' day summaries one at a time in key order, however the run is cut into
    # chunks: a security's days spread over chunks, a day in two months' files, jobs without rows.
    from shared.messages import JobParams
    from shared.processors import StoredResult, analytics
    from shared.storage import open_storage
    from shared.tables import TableSink

    rng = np.random.default_rng(8)
    results = []
    for security in ("AAA", "BHP", "CBA"):
        for date in (f"2024-03-{d:02d}" for d in range(1, 12)):
            for month in ("2024-02", "2024-03") if date == "2024-03-01" else (MONTH,):
                records = int(rng.integers(0, 4)) * int(rng.integers(1, 1000))
                data: dict[str, Any] = {
                    "day": None,
                    "groups": {d: {"keys": [], "records": [], "volume": [], "notional": []}
                               for d in analytics.GROUP_DIMENSIONS},
                }
                if records:
                    volume = int(rng.integers(records, 10**9))
                    notional = float(rng.random() * 1e9)
                    low = float(rng.uniform(1, 10))
                    data["day"] = analytics.DaySummary(records, volume, notional, low, low + float(rng.random()),
                                                       volume // 3, volume // 4, int(rng.integers(0, 10**9)),
                                                       int(rng.integers(10**9, 2 * 10**9))).to_json()
                    data["groups"]["hour"] = {"keys": [10, 11], "records": [records, 0], "volume": [volume, 0],
                                              "notional": [notional * 0.3, notional * 0.7]}
                results.append(StoredResult(month, security, date, {}, data))

    def tables(name: str, chunk_jobs: int) -> dict[str, pd.DataFrame]:
        monkeypatch.setattr(analytics, "RESULT_CHUNK_JOBS", chunk_jobs)
        storage = open_storage(str(tmp_path / name))
        analytics.AnalyticsProcessor().aggregate(results, JobParams(), TableSink(storage, "t/"))
        return {t: pq.read_table(tmp_path / name / "t" / f"{t}.parquet").to_pandas() for t in analytics.TABLES}

    whole = tables("whole", 10**6)
    for chunk_jobs in (1, 2, 5):
        for name, frame in tables(f"chunks-{chunk_jobs}", chunk_jobs).items():
            pd.testing.assert_frame_equal(frame, whole[name], check_exact=True)

    days: dict[tuple[str, str], analytics.DaySummary] = {}
    for result in results:  # in key order already
        if result.data["day"]:
            day = days.setdefault((result.security, result.date), analytics.DaySummary())
            day.merge_day(analytics.DaySummary.from_json(result.data["day"]))
    per_security: dict[str, analytics.DaySummary] = {}
    per_date: dict[str, analytics.DaySummary] = {}
    for (security, date), day in days.items():
        per_security.setdefault(security, analytics.DaySummary()).merge_day(day)
        per_date.setdefault(date, analytics.DaySummary()).merge_day(day)
    daily = whole["security_daily"]
    assert daily["notional"].tolist() == [day.notional for day in days.values()]
    assert daily["records"].tolist() == [day.records for day in days.values()]
    assert whole["by_security"]["notional"].tolist() == [s.notional for s in per_security.values()]
    assert whole["by_security"]["days"].tolist() == [
        sum(1 for security, _ in days if security == name) for name in per_security]
    assert whole["by_date"]["notional"].tolist() == [per_date[d].notional for d in sorted(per_date)]
    assert whole["by_date"]["low"].tolist() == [per_date[d].low for d in sorted(per_date)]
