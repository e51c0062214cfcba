"""Processors: `extract` returns exactly the filtered rows; a third-party processor plugs in
through the ``tickq.processors`` entry-point group."""

from __future__ import annotations

import math
from pathlib import Path

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
    from shared.messages import JobParams
    from shared.processors import analytics

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
        jobs = [analytics.AnalyticsJob(JobParams()) for _ in range(40)]
        analytics.accumulate(jobs, rows, slots)
        return [job.finish() for job in jobs]

    dense, hashed = partials(1 << 30), partials(0)
    assert len(dense[0]["groups"]["participant"]) > 100
    assert _close(dense, hashed)


def _close(left: object, right: object) -> bool:
    """Equal, floats to a relative 1e-12 (the two ways add in different orders)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_close(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_close(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, float) and isinstance(right, float):
        return math.isclose(left, right, rel_tol=1e-12)
    return left == right
