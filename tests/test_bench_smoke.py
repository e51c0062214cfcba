"""A smoke-sized run of each benchmark target behind bench/RESULTS.md: the scripts keep working
as the code changes, and each prints the rows it promises, with figures that agree with each
other. Nothing here is timed: speed is for the benchmarks themselves, at their full sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

Rows = list[dict[str, Any]]


def _bench(amqp_url: str, work: Path, *args: str) -> Rows:
    """The JSON rows `bench/run.py` prints for `args`, with the test broker and `work` folder."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args, "--work", str(work)],
        env={**os.environ, "TICKQ_AMQP_URL": amqp_url, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=600, cwd=work,
    )
    assert result.returncode == 0, f"bench {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _of(rows: Rows, target: str, **match: Any) -> Rows:
    return [r for r in rows if r["target"] == target and all(r.get(k) == v for k, v in match.items())]


def _end_to_end(rows: Rows) -> None:
    runs = _of(rows, "e2e")
    assert {(r["mode"], r["input"]) for r in runs} == {(m, i) for m in ("sequential", "deployed")
                                                        for i in ("ingested", "raw")}
    # The raw files and their ingested copy hold the same jobs, whichever way a run goes.
    assert {r["jobs"] for r in runs} == {20 * 21} and {r["rows"] for r in runs} == {200_000}
    for r in _of(rows, "e2e", mode="sequential"):
        assert r["tickq_s"] == pytest.approx(r["produce_s"] + r["workers_s"] + r["aggregate_s"], abs=0.02)
        assert len(r["peak_rss_mb"]) == 2 and min(r["peak_rss_mb"]) > 0
        # The table timed against DuckDB's is the one DuckDB computes.
        assert r["days_differing_from_duckdb"] == 0
    ratios = _of(rows, "e2e-ratio")
    assert len(ratios) == 4
    for r in ratios:  # the printed seconds are rounded to hundredths
        assert r["tickq_s"] / (r["duckdb_s"] + 0.006) <= r["ratio"] <= r["tickq_s"] / max(r["duckdb_s"] - 0.006, 1e-3)


def _producer(rows: Rows) -> None:
    runs = _of(rows, "producer")
    assert [r["confirm_window"] for r in runs] == [1, 100, 1000]
    assert all(r["jobs"] == 500 and r["jobs_per_s"] > 0 for r in runs)


def _aggregator(rows: Rows) -> None:
    assert [(r["jobs"], r["peak_rss_mb"] > 0) for r in _of(rows, "aggregator")] == [(50, True), (200, True)]


def _messages(rows: Rows) -> None:
    [run] = _of(rows, "messages")
    assert run["jobs"] == 200 and run["workers"] == 2 and run["worker_cpu_s"] > 0


def _per_job(rows: Rows) -> None:
    parts, days = _of(rows, "per-job", layout="parts"), _of(rows, "per-job", layout="day files")
    assert len(parts) == len(days) == 1
    # A job's own day file is about its slice; a row group of the parts holds many jobs'.
    assert days[0]["median_bytes_read_kb"] < parts[0]["median_bytes_read_kb"]
    assert days[0]["median_rows"] == parts[0]["median_rows"] > 0


def _memory(rows: Rows) -> None:
    [run] = _of(rows, "memory")
    assert run["rows"] == 200_000 and run["jobs"] > 0 and run["worker_peak_rss_mb"] > 0


def _csv(rows: Rows) -> None:
    [run] = _of(rows, "csv")
    assert run["rows"] == 50_000 and run["rows_per_cpu_s"] > 0


def _dbn(rows: Rows) -> None:
    [run] = _of(rows, "dbn")
    assert run["rows"] == 50_000 and run["rows_per_cpu_s"] > 0
    runs = _of(rows, "e2e", mode="sequential")
    # The month as one file and as three hold the same jobs.
    assert [r["input"] for r in runs] == ["dbn.zst in 1 file", "dbn.zst in 3 files"]
    assert len({r["jobs"] for r in runs}) == 1 and {r["rows"] for r in runs} == {50_000}
    for r in runs:
        assert r["tickq_s"] == pytest.approx(r["produce_s"] + r["workers_s"] + r["aggregate_s"], abs=0.02)


def _naive(rows: Rows) -> None:
    [run] = _of(rows, "naive")
    assert run["jobs"] == 3
    assert run["ratio"] == pytest.approx(run["pandas_whole_month_ms"] / run["tickq_job_ms"], abs=0.1)


def _scaling(rows: Rows) -> None:
    runs = _of(rows, "scaling")
    assert [r.get("workers") for r in runs[:4]] == [1, 2, 1, 2] and {r.get("jobs") for r in runs[:4]} == {20 * 21}
    assert [r["end_gap_s"] for r in runs[0:4:2]] == [0, 0]  # one worker waits for no other
    assert all(r["end_gap_s"] >= 0 for r in runs[1:4:2])
    assert runs[4]["speedup_2_vs_1"] > 0 and runs[4]["speedup_2_vs_1_with_startup"] > 0


SMOKE: list[tuple[tuple[str, ...], Callable[[Rows], None]]] = [
    (("e2e", "--rows", "200000", "--securities", "20", "--workers", "2", "--raw-too"), _end_to_end),
    # A month whose rows carry their own trade_date: DuckDB's table takes it too.
    (("e2e", "--rows", "200000", "--securities", "20", "--workers", "2", "--raw-too", "--rewrite", "own-trade-date"),
     _end_to_end),
    # ts as INT96, without statistics: DuckDB's table reads it as a time without zone, as tickq does.
    (("e2e", "--rows", "200000", "--securities", "20", "--workers", "2", "--raw-too", "--rewrite", "int96-ts"),
     _end_to_end),
    (("producer", "--jobs", "500"), _producer),
    (("aggregator", "--jobs", "50,200"), _aggregator),
    (("messages", "--jobs", "200", "--workers", "2"), _messages),
    (("per-job", "--rows", "200000", "--securities", "20", "--sample", "3"), _per_job),
    (("memory", "--rows", "200000", "--securities", "20"), _memory),
    (("csv", "--rows", "50000"), _csv),
    (("dbn", "--rows", "50000", "--securities", "10", "--files", "3"), _dbn),
    (("naive", "--rows", "20000", "--securities", "4", "--sample", "3"), _naive),
    (("scaling", "--rows", "200000", "--securities", "20"), _scaling),
]


def _own_month(root: Path) -> Path:
    """A month as another tool might write it: `tickq gen`'s rows of July 2023 in two Parquet
    files, `ts` as integer nanoseconds, no `side` column, a column tickq does not use, and rows
    tickq rejects where DuckDB's usual filter would not (no time, an infinite price, half a
    share)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    generated = root / "generated"
    subprocess.run([sys.executable, "-m", "tickq", "gen", "--out", str(generated), "--months", "2023-07",
                    "--rows", "60000", "--securities", "6"], check=True, capture_output=True, cwd=ROOT)
    table = pq.read_table(generated / "2023-07")
    table = table.set_column(0, "ts", table.column("ts").cast(pa.int64())).drop_columns(["side"])
    table = table.append_column("order_id", pa.array(range(table.num_rows)))
    ts, price = table.column("ts").to_numpy().copy(), table.column("price").to_numpy().copy()
    size = table.column("size").to_numpy().astype(np.float64)
    price[1::997], size[2::991] = np.inf, size[2::991] + 0.5
    table = table.set_column(0, "ts", pa.array(ts, mask=np.arange(len(ts)) % 983 == 0))
    table = table.set_column(table.schema.get_field_index("price"), "price", pa.array(price))
    table = table.set_column(table.schema.get_field_index("size"), "size", pa.array(size))
    own = root / "own"
    (own / "2023-07").mkdir(parents=True)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), own / "2023-07" / "a.parquet")
    pq.write_table(table.slice(half), own / "2023-07" / "b.parquet")
    return own


def test_the_end_to_end_benchmark_runs_on_a_month_of_your_own(amqp_url: str, tmp_path: Path) -> None:
    own = _own_month(tmp_path)
    rows = _bench(amqp_url, tmp_path, "e2e", "--input", str(own), "--workers", "2", "--raw-too")
    runs = _of(rows, "e2e")
    assert {(r["mode"], r["input"]) for r in runs} == {(m, i) for m in ("sequential", "deployed")
                                                        for i in ("ingested", "raw")}
    # Its rows counted from its own files; six securities on each of July 2023's 21 weekdays.
    assert {r["rows"] for r in runs} == {60_000} and {r["jobs"] for r in runs} == {6 * 21}
    # DuckDB reads its integer times and drops its bad rows as tickq does: the same table.
    assert [r["days_differing_from_duckdb"] for r in _of(rows, "e2e", mode="sequential")] == [0, 0]
    assert len(_of(rows, "e2e-ratio")) == 4


def test_a_benchmark_says_which_month_of_your_own_to_measure(tmp_path: Path) -> None:
    for month in ("2023-01", "2023-02"):
        (tmp_path / "in" / month).mkdir(parents=True)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "scaling", "--input",
                             str(tmp_path / "in"), "--work", str(tmp_path)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"bench: {tmp_path / 'in'} holds 2 months (2023-01, 2023-02): say which with --month YYYY-MM")


def _smoke_id(args: tuple[str, ...]) -> str:
    """The target, and the rewrite of its month where one is asked for."""
    return f"{args[0]}-{args[args.index('--rewrite') + 1]}" if "--rewrite" in args else args[0]


@pytest.mark.parametrize(("args", "check"), SMOKE, ids=[_smoke_id(args) for args, _ in SMOKE])
def test_a_benchmark_target_at_smoke_size_prints_consistent_rows(
    args: tuple[str, ...], check: Callable[[Rows], None], amqp_url: str, tmp_path: Path
) -> None:
    check(_bench(amqp_url, tmp_path, *args))
