"""tickq benchmarks: each target of bench/RESULTS.md, with its comparison in the same run.

    python bench/run.py e2e       --rows 20000000 --securities 500 --workers 2
    python bench/run.py e2e       --rows 10000000 --securities 500 --workers 2 --format csv --raw-too
    python bench/run.py e2e       --rows 20000000 --securities 500 --workers 2 --format csv.gz --raw-too
    python bench/run.py e2e       --rows 20000000 --securities 500 --workers 2 --rewrite shuffled --raw-too
    python bench/run.py e2e       --rows 20000000 --securities 500 --workers 2 --rewrite int96-ts --raw-too
    python bench/run.py e2e       --input ~/orders --month 2023-07 --tz America/New_York --raw-too
    python bench/run.py scaling   --input ~/orders --month 2023-07 --tz America/New_York
    python bench/run.py per-job   --rows 1000000,20000000
    python bench/run.py batch     --rows 20000000 --securities 500 --jobs 128
    python bench/run.py memory    --rows 1000000,20000000
    python bench/run.py memory    --rows 2000000 --securities 100 --format csv
    python bench/run.py memory    --rows 1000000,100000000 --raw-too --all-jobs
    python bench/run.py producer  --jobs 10500
    python bench/run.py scaling   --rows 4000000 --securities 200
    python bench/run.py scaling   --rows 20000000 --securities 500 --concurrency auto
    python bench/run.py csv       --rows 2000000
    python bench/run.py dbn       --rows 20000000 --securities 500 --workers 2 --files 8
    python bench/run.py naive     --rows 500000 --securities 20
    python bench/run.py aggregator --jobs 1000,100000
    python bench/run.py messages  --jobs 10500,42000 --workers 2
    python bench/run.py encodings --rows 20000000 --securities 500
    python bench/run.py ingest    --rows 20000000 --securities 500 --sample 2
    python bench/run.py s3        --rows 2000000 --securities 100 --jobs 128 --sample 4 --latency-ms 20
    python bench/run.py s3-state  --jobs 60000 --sample 12 --latency-ms 50

Needs a broker at TICKQ_AMQP_URL (default localhost) and the test extras (duckdb, pandas).
Data goes under --work (default /tmp/tickq-bench); every figure is printed as a table row.
With --input, e2e, per-job, memory, scaling and ingest measure a month of your own (ingested
once under --work) instead of generated data; e2e also counts the rows of tickq's
`security_daily` that differ from DuckDB's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc

MONTH = "2024-03"
PY = sys.executable


def _tickq(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "tickq", *args], check=True, capture_output=True, text=True, env=env)


# Every namespace a benchmark used: its queues and exchanges are deleted when it ends, so that
# runs leave no queues (nor unconsumed job events) on the broker.
_NAMESPACES: list[str] = []


def _env(namespace: str) -> dict[str, str]:
    _NAMESPACES.append(namespace)
    return {**os.environ, "TICKQ_NAMESPACE": namespace}


def _drop_namespaces() -> None:
    import asyncio

    import aio_pika

    from shared.settings import Settings
    from shared.topology import Topology

    async def drop() -> None:
        connection = await aio_pika.connect(Settings.load().amqp_url, timeout=30)
        async with connection:
            channel = await connection.channel()
            for ns in _NAMESPACES:
                topology = Topology(ns)
                for queue in topology.all_queues():
                    await channel.queue_delete(queue)
                for exchange in (topology.dlx, topology.events):
                    await channel.exchange_delete(exchange)

    asyncio.run(drop())


async def _declared(amqp_url: str, topology: Any) -> None:
    """Declare `topology`'s queues and exchanges (as every tickq component does at start)."""
    import aio_pika

    from shared.topology import declare

    connection = await aio_pika.connect(amqp_url, timeout=30)
    async with connection:
        await declare(await connection.channel(), topology)


# Raw Parquet months as other tools write them: `tickq gen`'s rows rewritten with pyarrow's
# defaults (row groups of 1 Mi rows, dictionary-encoded text), in time order, sorted by
# security, or in no order; or sorted by security within each market day, with each row's own
# trade_date, or with ts as integer nanoseconds since the epoch or as INT96, as Spark writes it
# by default, whose columns carry no statistics (the last four in row groups of `tickq gen`'s
# size).
REWRITES = ("pyarrow-defaults", "by-security", "shuffled", "day-then-security", "own-trade-date", "integer-ts",
            "int96-ts")


def _data(work: Path, rows: int, securities: int, fmt: str = "parquet", ingest: bool = True,
          day_files_tz: str | None = None, rewrite: str | None = None, files: int = 1,
          tz: str = "Australia/Sydney") -> tuple[Path, Path]:
    """Generated raw data (the month in `files` files of consecutive times) and (optionally)
    its ingested layout, reused across runs; with `day_files_tz`, the layout has day files in
    that zone too; with `rewrite` (one of `REWRITES`), the raw Parquet month is that rewrite of
    the generated one."""
    raw = work / (f"raw-{fmt}-{rows}-{securities}" + (f"-{files}-files" if files > 1 else ""))
    if not raw.exists():
        _tickq("gen", "--out", str(raw), "--months", MONTH, "--rows", str(rows), "--securities", str(securities),
               "--format", fmt, "--files-per-month", str(files))
    if rewrite is not None:
        raw = _rewritten(raw, rewrite, tz)
    days = () if day_files_tz is None else ("--day-files", day_files_tz)
    laid = work / (f"ingested-{fmt}-{rows}-{securities}"
                   + ("-days-" + day_files_tz.replace("/", "-") if day_files_tz is not None else "")
                   + (f"-{rewrite}" if rewrite else ""))
    if ingest and not laid.exists():
        t0 = time.perf_counter()
        _tickq("ingest", "--input", str(raw), "--output", str(laid), "--months", MONTH, "--quiet", *days)
        _row(target="ingest", rows=rows, day_files=bool(days), seconds=round(time.perf_counter() - t0, 2))
    return raw, laid


def _rewritten(raw: Path, rewrite: str, tz: str) -> Path:
    """`raw`'s Parquet month rewritten as `rewrite` says (made once, then reused); market days
    are those of `tz`."""
    import pyarrow.parquet as pq

    by_day = rewrite in ("day-then-security", "own-trade-date")
    out = raw.with_name(f"{raw.name}-{rewrite}" + (f"-{tz.replace('/', '-')}" if by_day else ""))
    if out.exists():
        return out
    table = pq.read_table(raw / MONTH)
    by_security = [("security", "ascending"), ("ts", "ascending")]
    # The first three as pyarrow writes by default; the others in `tickq gen`'s row groups.
    options: dict[str, Any] = {}
    if rewrite not in ("pyarrow-defaults", "by-security", "shuffled"):
        footer = pq.ParquetFile(next((raw / MONTH).glob("*.parquet"))).metadata
        options["row_group_size"] = footer.row_group(0).num_rows
    if rewrite == "by-security":
        table = table.sort_by(by_security)
    elif rewrite == "shuffled":
        table = table.take(np.random.default_rng(1).permutation(table.num_rows))
    elif by_day:
        day = pc.cast(pc.local_timestamp(pc.cast(table.column("ts"), pa.timestamp("ns", tz=tz))), pa.date32())
        if rewrite == "own-trade-date":
            table = table.append_column("trade_date", day)
        else:
            table = table.append_column("day", day).sort_by([("day", "ascending"), *by_security]).drop_columns(["day"])
    elif rewrite == "integer-ts":
        table = table.set_column(table.schema.get_field_index("ts"), "ts", table.column("ts").cast(pa.int64()))
    elif rewrite == "int96-ts":
        options["use_deprecated_int96_timestamps"] = True
    (out / MONTH).mkdir(parents=True)
    pq.write_table(table, out / MONTH / "part-0000.parquet", **options)
    return out


# Benchmarks that can run on a month of your own (--input) instead of generated data.
OWN_MONTH_TARGETS = ("e2e", "per-job", "memory", "scaling", "ingest")


@dataclass(frozen=True)
class Month:
    """A month to measure: its raw files (under `raw`, as `tickq produce --input` takes them),
    its name and its rows."""

    raw: Path
    name: str
    rows: int


def _months(args: argparse.Namespace, fmt: str = "parquet") -> list[Month]:
    """The months a target measures: the month given with --input, else one generated month of
    each --rows (made once, then reused)."""
    if args.input is not None:
        return [_own_month(args)]
    return [Month(_data(args.work, rows, args.securities, fmt, ingest=False, rewrite=args.rewrite, tz=args.tz)[0],
                  MONTH, rows)
            for rows in (int(r) for r in str(args.rows).split(","))]


def _own_month(args: argparse.Namespace) -> Month:
    """The month of --input: --month, or the only month there."""
    from shared.errors import PermanentError
    from shared.inputs import month_files
    from shared.storage import open_storage

    root = args.input.resolve()
    if not root.is_dir():
        raise SystemExit(f"bench: --input {args.input} is not a local folder (the benchmarks read local files)")
    name = args.month
    if name is None:
        found = sorted({m.group(0) for m in (re.match(r"\d{4}-\d{2}", p.name) for p in root.iterdir()) if m})
        if len(found) != 1:
            raise SystemExit(f"bench: {root} holds {len(found)} months ({', '.join(found[:6]) or 'none'}): "
                             "say which with --month YYYY-MM")
        name = found[0]
    try:
        files = month_files(open_storage(str(root)), name)
    except PermanentError as exc:  # tickq's own one-line error: no input for that month
        raise SystemExit(f"bench: {exc}") from None
    return Month(root, name, _own_rows(root, name, [f.key for f in files]))


def _own_rows(root: Path, month: str, keys: list[str]) -> int:
    """The month's rows: Parquet footers' counts, or DuckDB counting a CSV file's lines (once,
    untimed); a DBN month's rows are counted from its ingested copy (`_ingested`)."""
    import pyarrow.parquet as pq

    rows = 0
    for key in keys:
        if key.endswith(".parquet"):
            rows += pq.ParquetFile(root / key).metadata.num_rows
        elif ".csv" in key:
            import duckdb

            con = duckdb.connect()
            counted = con.sql(f"SELECT count(*) FROM read_csv({str(root / key)!r})").fetchall()
            rows += int(counted[0][0])
        else:
            return 0
    return rows


def _ingested(args: argparse.Namespace, month: Month, day_files_tz: str | None = None,
              fmt: str = "parquet") -> tuple[Month, Path]:
    """`month` laid out by `tickq ingest` (with day files in `day_files_tz` when given), made
    once and reused while the raw files stay as they are; the month with its rows counted when
    its raw files could not say (DBN). `fmt` is a generated month's format."""
    if args.input is None:
        return month, _data(args.work, month.rows, args.securities, fmt, day_files_tz=day_files_tz,
                            rewrite=args.rewrite, tz=args.tz)[1]
    import hashlib

    import pyarrow.parquet as pq

    from shared.inputs import month_files
    from shared.storage import open_storage

    stats = [(f.key, (month.raw / f.key).stat()) for f in month_files(open_storage(str(month.raw)), month.name)]
    digest = hashlib.sha256(repr((str(month.raw), month.name, day_files_tz,
                                  [(k, st.st_size, st.st_mtime_ns) for k, st in stats])).encode()).hexdigest()
    laid = args.work / f"ingested-own-{month.name}-{digest[:12]}"
    if not laid.exists():
        days = () if day_files_tz is None else ("--day-files", day_files_tz)
        shutil.rmtree(str(laid) + ".partial", ignore_errors=True)
        t0 = time.perf_counter()
        _tickq("ingest", "--input", str(month.raw), "--output", str(laid) + ".partial", "--months", month.name,
               "--quiet", *days)
        os.rename(str(laid) + ".partial", laid)  # a stopped ingest is not taken for a finished one
        _row(target="ingest", input=str(month.raw), month=month.name, day_files=bool(days),
             seconds=round(time.perf_counter() - t0, 2))
    if not month.rows:
        parts = (laid / month.name).glob("part-*.parquet")
        month = dataclasses.replace(month, rows=sum(pq.ParquetFile(p).metadata.num_rows for p in parts))
    return month, laid


def _row(**fields: Any) -> None:
    print(json.dumps(fields))


def _run_workers(
    n: int, env: dict[str, str], extra: tuple[str, ...] = (), metrics: list[Path] | None = None
) -> tuple[float, list[float]]:
    """Start n workers (each writing `metrics[i]` when given), wait until they exit (idle),
    return wall seconds and peak RSS (MB)."""
    started = time.perf_counter()
    procs = [subprocess.Popen([PY, "-m", "tickq", "worker", "--idle-exit", "1", "--quiet", *extra,
                               *(("--metrics-file", str(metrics[i])) if metrics else ())], env=env)
             for i in range(n)]
    peaks = [0.0] * n
    handles = [psutil.Process(p.pid) for p in procs]
    while any(p.poll() is None for p in procs):
        for i, h in enumerate(handles):
            try:
                rss = h.memory_info().rss + sum(c.memory_info().rss for c in h.children(recursive=True))
                peaks[i] = max(peaks[i], rss / 2**20)
            except psutil.Error:
                pass
        time.sleep(0.05)
    # The idle-exit second is not work: take it off the wall time.
    return time.perf_counter() - started - 1.0, peaks


@dataclass(frozen=True)
class DuckDbReference:
    """DuckDB's `security_daily` over a month's raw files in one process: the comparison."""

    sql: str
    tz: str

    def run(self) -> tuple[float, pa.Table]:
        """Seconds DuckDB takes to compute the table, and the table."""
        import duckdb

        con = duckdb.connect()
        con.execute(f"SET TimeZone='{self.tz}'")
        started = time.perf_counter()
        table = con.sql(self.sql).to_arrow_table()
        return time.perf_counter() - started, table


def _duckdb_reference(month: Month, tz: str) -> DuckDbReference:
    """The query computing `month`'s `security_daily` as tickq does, fitted to its files (read
    here once, untimed): their `ts` type, side spellings and price type, and tickq's rejection
    rules beyond the usual three where some row breaks them."""
    import duckdb

    files, reader = _duckdb_source(month)
    con = duckdb.connect()
    source = f"{reader}({files!r})"
    columns = {name: kind for name, kind, *_ in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    ts = _duckdb_instant(columns.get("ts", ""), month)
    side = _duckdb_side(con, source, columns)
    # Products in double precision, as tickq computes them (DuckDB keeps FLOAT * BIGINT a FLOAT).
    price = "price" if columns.get("price") == "DOUBLE" else "CAST(price AS DOUBLE)"
    kept = f"price > 0 AND size > 0 AND security <> ''{_duckdb_more_rules(con, source, columns, ts, price)}"
    return DuckDbReference(f"""
        SELECT security, {_duckdb_trade_date(columns, ts, tz)} AS trade_date, count(*) AS records,
               sum(size) AS volume, sum({price} * size) AS notional, sum({price} * size) / sum(size) AS vwap,
               avg(size) AS avg_size, min({price}) AS low, max({price}) AS high,
               sum(CASE WHEN {side} = 'B' THEN size ELSE 0 END) AS buy_volume,
               sum(CASE WHEN {side} = 'S' THEN size ELSE 0 END) AS sell_volume, min(ts) AS first_ts,
               max(ts) AS last_ts
        FROM {source}
        WHERE {kept}
        GROUP BY ALL ORDER BY ALL
    """, tz)


def _duckdb_trade_date(columns: dict[str, str], ts: str, tz: str) -> str:
    """A DuckDB expression of a row's trade date as tickq takes it: the row's own trade_date
    where the file has one and it reads as a date, else the market date of its instant `ts`."""
    derived = f"CAST(timezone('{tz}', {ts}) AS DATE)"
    return f"coalesce(TRY_CAST(trade_date AS DATE), {derived})" if "trade_date" in columns else derived


def _duckdb_more_rules(con: Any, source: str, columns: dict[str, str], ts: str, price: str) -> str:
    """tickq's rejection rules the usual `price > 0 AND size > 0 AND security <> ''` leaves out
    (a null time, a price not finite, a size not whole), as more of the WHERE clause; nothing
    when no row of the month breaks them, as in generated months."""
    whole = "size = floor(size)" if columns.get("size") in ("DOUBLE", "FLOAT") or "DECIMAL" in columns.get(
        "size", "") else "true"
    rules = f"{ts} IS NOT NULL AND isfinite({price}) AND {whole}"
    broken = con.sql(f"SELECT count(*) FROM {source} WHERE price > 0 AND size > 0 AND security <> '' "
                     f"AND NOT coalesce({rules}, false)").fetchall()[0][0]
    return f" AND {rules}" if broken else ""


def _differing_days(reference: pa.Table, ours: pa.Table) -> int:
    """How many (security, trade_date) rows of tickq's `security_daily` differ from DuckDB's
    `reference` (rows only one of them has included): the counts and volumes exactly, prices and
    notional to 1e-9, first and last times to the microsecond (DuckDB's own precision)."""

    def keyed(table: pa.Table) -> dict[tuple[Any, Any], tuple[Any, ...]]:
        columns = [table.column(name).to_pylist() for name in ("security", "trade_date")]
        # As float64 on both sides (DuckDB sums integers in 128 bits, and sums a size column of
        # floats as floats): exact for the counts and volumes below 2^53 that are compared.
        values = [table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
                  for name in ("records", "volume", "buy_volume", "sell_volume", "notional", "low", "high")]
        values += [_microseconds(table.column(name)) for name in ("first_ts", "last_ts")]
        return {(sec, day): tuple(v[i] for v in values) for i, (sec, day) in enumerate(zip(*columns, strict=True))}

    theirs, mine = keyed(reference), keyed(ours)
    differing = len(theirs.keys() ^ mine.keys())
    for key in theirs.keys() & mine.keys():
        a, b = theirs[key], mine[key]
        if a[:4] != b[:4] or a[7:] != b[7:] or not np.allclose(a[4:7], b[4:7], rtol=1e-9, atol=0):
            differing += 1
    return differing


def _microseconds(column: pa.ChunkedArray) -> np.ndarray:
    """Instants (timestamps of any unit, or integers of nanoseconds) as integer microseconds."""
    per_us = {"s": 1e-6, "ms": 1e-3, "us": 1, "ns": 1000}
    unit = column.type.unit if pa.types.is_timestamp(column.type) else "ns"
    values = column.cast(pa.int64()).to_numpy(zero_copy_only=False)
    if per_us[unit] >= 1:
        return values // int(per_us[unit])
    return values * int(1 / per_us[unit])


def _duckdb_side(con: Any, source: str, columns: dict[str, str]) -> str:
    """A DuckDB expression of each row's side as tickq reads it: B, S or neither. A month whose
    sides are all B, S or null (most feeds, and `tickq gen`) is read as it is; other spellings
    (any case of BUY, SELL and A, blanks around) are mapped, as tickq maps them."""
    if "side" not in columns:
        return "NULL"
    spellings = {row[0] for row in con.sql(f"SELECT DISTINCT side FROM {source}").fetchall()}
    if spellings <= {"B", "S", None}:
        return "side"
    upper = "upper(trim(CAST(side AS VARCHAR)))"
    return f"CASE WHEN {upper} IN ('B', 'BUY') THEN 'B' WHEN {upper} IN ('S', 'SELL', 'A') THEN 'S' END"


def _duckdb_source(month: Month) -> tuple[list[str], str]:
    """`month`'s raw files and the DuckDB function that reads them (one format a month)."""
    from shared.inputs import month_files
    from shared.storage import open_storage

    files = month_files(open_storage(str(month.raw)), month.name)
    formats = {f.format for f in files}
    if formats == {"parquet"}:
        return [str(month.raw / f.key) for f in files], "read_parquet"
    if formats <= {"csv", "csv.gz"}:
        return [str(month.raw / f.key) for f in files], "read_csv"
    raise SystemExit(f"bench: DuckDB, the comparison, reads Parquet or CSV; month {month.name} of {month.raw} "
                     f"holds {', '.join(sorted(formats))} (ingest it with `tickq ingest` and measure the "
                     "ingested folder)")


def _duckdb_instant(kind: str, month: Month) -> str:
    """A DuckDB expression of the instant in `ts`, a column of DuckDB type `kind`, as tickq reads
    it: an instant as it is, a time without zone as UTC, an integer as nanoseconds since the epoch."""
    if kind.startswith("TIMESTAMPTZ") or kind.startswith("TIMESTAMP WITH TIME ZONE"):
        return "ts"
    if kind.startswith("TIMESTAMP"):
        return "timezone('UTC', ts)"
    if kind in ("BIGINT", "HUGEINT", "UBIGINT"):
        return "timezone('UTC', make_timestamp_ns(ts))"
    raise SystemExit(f"bench: DuckDB reads the ts column of month {month.name} of {month.raw} as "
                     f"{kind or 'missing'}; the comparison takes an instant, a time or nanoseconds since the epoch")


def cmd_e2e(args: argparse.Namespace) -> None:
    [month] = _months(args, args.format)
    query = _duckdb_reference(month, args.tz)  # a month DuckDB cannot read is refused before anything runs
    month, laid = _ingested(args, month, day_files_tz=args.tz if args.day_files else None, fmt=args.format)
    for label, source in (("ingested", laid), ("raw", month.raw)) if args.raw_too else (("ingested", laid),):
        # This machine's speed drifts by tens of percent within minutes: DuckDB runs right
        # before and right after each tickq run, and each ratio uses the mean of the two. A
        # first, untimed run reads the files into the page cache, as tickq's ingest did.
        _, reference = query.run()
        before, _ = query.run()
        tickq_s = _e2e_sequential(args, month, label, source, reference)
        middle, _ = query.run()
        deployed_s = _e2e_deployed(args, month, label, source)
        after, _ = query.run()
        for mode, seconds, duck in (("sequential", tickq_s, (before + middle) / 2),
                                    ("deployed", deployed_s, (middle + after) / 2)):
            _row(target="e2e-ratio", mode=mode, input=label, tickq_s=round(seconds, 2), duckdb_s=round(duck, 2),
                 ratio=round(seconds / duck, 2), duckdb_runs_s=[round(before, 2), round(middle, 2), round(after, 2)])


def _children_cpu_s() -> float:
    """CPU seconds (user and system) of this process's children that have exited."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _e2e_sequential(args: argparse.Namespace, month: Month, label: str, source: Path,
                    reference: pa.Table | None = None) -> float:
    """Each stage alone: produce, then workers until the queue is empty, then `tickq aggregate`.
    Each stage's CPU seconds too: on a host whose speed drifts, they compare runs more steadily
    than wall time (the workers' include their idle second, which costs next to nothing). With
    DuckDB's `reference` table, the rows of tickq's that differ from it."""
    env = _env(f"bench-{uuid.uuid4().hex[:8]}")
    out = args.work / f"out-{uuid.uuid4().hex[:8]}"
    c0, t0 = _children_cpu_s(), time.perf_counter()
    produced = json.loads(_tickq("produce", "--input", str(source), "--output", str(out), "--months", month.name,
                                 "--market-tz", args.tz, "--json", "--quiet", env=env).stdout)
    c1, t1 = _children_cpu_s(), time.perf_counter()
    # Workers at their default, `auto`: they share this machine's cores among themselves.
    work_s, peaks = _run_workers(args.workers, env, ("--concurrency", "auto"))
    c2, t2 = _children_cpu_s(), time.perf_counter()
    _tickq("aggregate", "--run", produced["run_id"], "--output", str(out), env=env)
    c3, t3 = _children_cpu_s(), time.perf_counter()
    total = (t1 - t0) + work_s + (t3 - t2)
    _row(target="e2e", mode="sequential", input=label, rows=month.rows, jobs=produced["jobs"],
         workers=args.workers, produce_s=round(t1 - t0, 2), workers_s=round(work_s, 2),
         aggregate_s=round(t3 - t2, 2), tickq_s=round(total, 2), rows_per_s=round(month.rows / total),
         cpu_s={"produce": round(c1 - c0, 2), "workers": round(c2 - c1, 2), "aggregate": round(c3 - c2, 2)},
         peak_rss_mb=[round(p) for p in peaks], **_agreement(reference, out, produced))
    shutil.rmtree(out, ignore_errors=True)
    return total


def _agreement(reference: pa.Table | None, out: Path, produced: dict[str, Any]) -> dict[str, int]:
    """With DuckDB's `reference`, the rows of the run's `security_daily` (under `out`) that differ."""
    if reference is None:
        return {}
    import pyarrow.parquet as pq

    ours = pq.read_table(out / "runs" / produced["run_id"] / "aggregates" / "security_daily.parquet")
    return {"days_differing_from_duckdb": _differing_days(reference, ours)}


def _e2e_deployed(args: argparse.Namespace, month: Month, label: str, source: Path) -> float:
    """As deployed: workers and the aggregator service already run; from `tickq produce` until
    the run's summary.json (written last, after every table) exists."""
    env = _env(f"bench-{uuid.uuid4().hex[:8]}")
    out = args.work / f"out-{uuid.uuid4().hex[:8]}"
    run_id = f"e2e-{uuid.uuid4().hex[:8]}"
    services = [subprocess.Popen([PY, "-m", "tickq", "aggregator", "--quiet"], env=env)]
    services += [subprocess.Popen([PY, "-m", "tickq", "worker", "--quiet", "--concurrency", "auto"], env=env)
                 for _ in range(args.workers)]
    time.sleep(3.0)  # services connected and waiting, as in a deployment
    summary = out / "runs" / run_id / "aggregates" / "summary.json"
    try:
        t0 = time.perf_counter()
        produced = json.loads(_tickq("produce", "--input", str(source), "--output", str(out), "--months",
                                     month.name, "--market-tz", args.tz, "--run-id", run_id, "--json", "--quiet",
                                     env=env).stdout)
        t1 = time.perf_counter()
        while not (summary.exists() and json.loads(summary.read_text())["complete"]):
            if any(p.poll() is not None for p in services):
                raise SystemExit("a service exited during the run")
            time.sleep(0.02)
        t2 = time.perf_counter()
    finally:
        for proc in services:
            proc.terminate()
        for proc in services:
            proc.wait(timeout=60)
    total = t2 - t0
    _row(target="e2e", mode="deployed", input=label, rows=month.rows, jobs=produced["jobs"], workers=args.workers,
         produce_s=round(t1 - t0, 2), tables_after_produce_s=round(t2 - t1, 2), tickq_s=round(total, 2),
         rows_per_s=round(month.rows / total))
    shutil.rmtree(out, ignore_errors=True)
    return total


def cmd_per_job(args: argparse.Namespace) -> None:
    """Sampled jobs, each on its own (a fresh process cache), on the month's parts and on its
    day files (`tickq ingest --day-files`), in turn; bytes read against the slice's share of
    the month's bytes (its rows times the parts' bytes per row)."""
    from shared.messages import JobMessage, JobParams
    from worker.job import MonthListings, execute_batch

    for month in _months(args):
        _, days = _ingested(args, month, day_files_tz=args.tz)
        month, parts = _ingested(args, month)
        rows = month.rows
        keys = [line.split(",") for line in _job_keys(parts, args, month.name)]
        sample = keys[:: max(1, len(keys) // args.sample)][: args.sample]
        file_bytes = sum(p.stat().st_size for p in (parts / month.name).glob("part-*.parquet"))
        figures: dict[str, dict[str, list[float]]] = {}
        for name, security, date in sample:
            for layout, laid in (("parts", parts), ("day files", days)):
                out = args.work / f"perjob-{uuid.uuid4().hex[:8]}"
                listings = MonthListings()  # each job alone: nothing kept from the previous one
                job = JobMessage.build(run_id="perjob", month=name, security=security, date=date, input=str(laid),
                                       output=str(out), processor="analytics", params=JobParams(market_tz=args.tz))
                # The process clock, not psutil's times: those count in ticks of 10 ms, and a
                # job's CPU is a few milliseconds.
                c0, t0 = time.process_time(), time.perf_counter()
                [outcome] = execute_batch([job], s3_endpoint_url=None, worker_id="bench", listings=listings)
                t1, c1 = time.perf_counter(), time.process_time()
                assert not isinstance(outcome, BaseException), outcome
                seen = figures.setdefault(layout, {"ms": [], "cpu_ms": [], "bytes": [], "slice_rows": []})
                seen["ms"].append((t1 - t0) * 1000)
                seen["cpu_ms"].append((c1 - c0) * 1000)
                seen["bytes"].append(outcome.bytes_in)
                seen["slice_rows"].append(outcome.rows_read)
                shutil.rmtree(out, ignore_errors=True)
        for layout, seen in figures.items():
            slice_bytes = statistics.median(seen["slice_rows"]) * file_bytes / rows
            _row(target="per-job", layout=layout, rows=rows, jobs_sampled=len(sample),
                 month_mb=round(file_bytes / 2**20, 1), median_ms=round(statistics.median(seen["ms"]), 2),
                 median_cpu_ms=round(statistics.median(seen["cpu_ms"]), 2),
                 median_rows=statistics.median(seen["slice_rows"]),
                 median_bytes_read_kb=round(statistics.median(seen["bytes"]) / 1024, 2),
                 median_slice_kb=round(slice_bytes / 1024, 2),
                 read_to_slice=round(statistics.median(seen["bytes"]) / max(1.0, slice_bytes), 1))


def cmd_batch(args: argparse.Namespace) -> None:
    """Every job of the month through `execute_batch` in one process, in batches of --jobs (in key
    order, as a worker's prefetch holds them): the data pass without the broker."""
    from shared.messages import JobMessage, JobParams
    from worker.job import MonthListings, execute_batch

    _, laid = _data(args.work, int(args.rows), args.securities)
    out = args.work / f"batch-{uuid.uuid4().hex[:8]}"
    params = JobParams(market_tz=args.tz)
    jobs = [JobMessage.build(run_id="batch", month=month, security=security, date=date, input=str(laid),
                             output=str(out), processor="analytics", params=params)
            for month, security, date in (line.split(",") for line in _job_keys(laid, args, MONTH))]
    listings = MonthListings()
    stages: dict[str, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    for start in range(0, len(jobs), args.jobs):
        for result in execute_batch(jobs[start : start + args.jobs], s3_endpoint_url=None, worker_id="bench",
                                    listings=listings):
            assert not isinstance(result, BaseException), result
            for stage, seconds in result.stages.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    _row(target="batch", rows=int(args.rows), jobs=len(jobs), batch_jobs=args.jobs, seconds=round(seconds, 2),
         cpu_s=round(cpu, 2), cpu_ms_per_job=round(cpu / len(jobs) * 1000, 3),
         stages_s={stage: round(total, 2) for stage, total in stages.items()})
    shutil.rmtree(out, ignore_errors=True)


def _job_keys(laid: Path, args: argparse.Namespace, month: str) -> list[str]:
    env = _env(f"bench-{uuid.uuid4().hex[:8]}")
    out = args.work / f"keys-{uuid.uuid4().hex[:8]}"
    _tickq("produce", "--input", str(laid), "--output", str(out), "--months", month, "--market-tz", args.tz,
           "--run-id", "keys", "--dry-run", "--quiet", env=env)
    from producer.discover import discover_month
    from shared.storage import open_storage

    found = discover_month(open_storage(str(laid)), month, args.tz)
    shutil.rmtree(out, ignore_errors=True)
    return [f"{month},{s},{d}" for s, d in sorted(found.rows)]


def cmd_memory(args: argparse.Namespace) -> None:
    for month in _months(args, args.format):
        if args.input is None and args.format in ("csv", "csv.gz"):
            # Every job of a raw (not ingested) CSV month: each batch streams the whole file.
            _worker_peak(args, month, f"raw {args.format}", month.raw, ())
            continue
        month, laid = _ingested(args, month)
        # The 20 largest securities' jobs, or with --all-jobs every job of the month (on a raw
        # month: the passes over its parts, each holding thousands of jobs' partial results).
        securities = () if args.all_jobs else ("--securities", ",".join(_top_securities(laid, month.name, 20)))
        for label, source in (("ingested", laid), ("raw", month.raw)) if args.raw_too else (("ingested", laid),):
            _worker_peak(args, month, label, source, securities)


def _worker_peak(args: argparse.Namespace, month: Month, label: str, source: Path,
                 produce_args: tuple[str, ...]) -> None:
    """One worker of two slots over a run of `source`'s jobs: its peak RSS."""
    env = _env(f"bench-{uuid.uuid4().hex[:8]}")
    out = args.work / f"mem-{uuid.uuid4().hex[:8]}"
    produced = json.loads(_tickq("produce", "--input", str(source), "--output", str(out), "--months", month.name,
                                 "--market-tz", args.tz, *produce_args, "--json", "--quiet", env=env).stdout)
    work_s, peaks = _run_workers(1, env, ("--concurrency", "2"))
    _row(target="memory", input=label, rows=month.rows, jobs=produced["jobs"], worker_peak_rss_mb=round(max(peaks)),
         seconds=round(work_s, 2))
    shutil.rmtree(out, ignore_errors=True)


def _top_securities(laid: Path, month: str, n: int) -> list[str]:
    import pyarrow.dataset as ds

    table = ds.dataset(str(laid / month), format="parquet").to_table(columns=["security"])
    counts = table.group_by("security").aggregate([([], "count_all")]).sort_by([("count_all", "descending")])
    return [str(s) for s in counts.column("security").to_pylist()[:n]]


def cmd_producer(args: argparse.Namespace) -> None:
    import asyncio

    from producer.publish import Outgoing, publish_confirmed
    from shared.messages import JobMessage, JobParams
    from shared.settings import Settings
    from shared.topology import Topology

    ns = f"bench-{uuid.uuid4().hex[:8]}"
    _env(ns)  # dropped at the end
    settings, topology = Settings.load(namespace=ns), Topology(ns)
    asyncio.run(_declared(settings.amqp_url, topology))
    days = [f"2024-03-{d:02d}" for d in range(1, 29)]
    messages = [
        Outgoing(topology.jobs, JobMessage.build(run_id="pub", month=MONTH, security=f"S{i % 500:03d}",
                                                 date=days[(i // 500) % len(days)], input="/in", output="/out",
                                                 processor="analytics", params=JobParams()).to_body(), f"pub-{i}")
        for i in range(args.jobs)
    ]
    for window in (1, 100, 1000):
        count = min(args.jobs, 500) if window == 1 else args.jobs
        t0 = time.perf_counter()
        publish_confirmed(settings.amqp_url, messages[:count], "bench", window=window)
        seconds = time.perf_counter() - t0
        _row(target="producer", jobs=count, confirm_window=window, seconds=round(seconds, 3),
             jobs_per_s=round(count / seconds))


def _stored_run(out: Path, jobs: int) -> str:
    """A run of `jobs` succeeded jobs as workers leave it: manifest, keys, batch results, markers."""
    import datetime as dt
    import random

    from shared.layout import JobKey, RunLayout, batch_result_table_body, job_keys_csv
    from shared.messages import JobParams
    from shared.processors.analytics import results_table
    from shared.storage import LocalStorage

    run_id = f"agg-{jobs}"
    layout, storage = RunLayout(run_id), LocalStorage(out)
    days = [f"2024-03-{d:02d}" for d in range(1, 32) if dt.date(2024, 3, d).weekday() < 5]
    keys = [JobKey(MONTH, f"S{i // len(days):05d}", days[i % len(days)]) for i in range(jobs)]
    rng = random.Random(7)
    params = JobParams()
    for start in range(0, jobs, 128):
        entries: list[dict[str, Any]] = []
        for key in keys[start : start + 128]:
            records = rng.randint(500, 5000)
            values: tuple[tuple[str, list[Any]], ...] = (
                ("participant", [f"P{p:02d}" for p in range(10)]), ("venue", ["CP", "TM"]),
                ("hour", list(range(10, 17))), ("size_bucket", list(range(6))))
            groups = {  # as the worker writes them: columns per dimension
                dim: {"keys": group_keys, "records": [records // n] * n, "volume": [records * 500 // n] * n,
                      "notional": [records * 5e4 / n] * n}
                for dim, group_keys in values
                for n in (len(group_keys),)
            }
            day = {"records": records, "volume": records * 500, "notional": records * 5e4, "low": 9.5, "high": 10.5,
                   "buy_volume": records * 250, "sell_volume": records * 250, "first_ts": 1709251200000000000,
                   "last_ts": 1709272800000000000}
            counts = {"rows_read": records, "rows_accepted": records, "rows_rejected": 0, "rows_filtered": 0}
            entries.append({"job_id": f"{run_id}:{key.month}:{key.security}:{key.date}", "security": key.security,
                            "date": key.date, "counts": counts, "data": {"day": day, "groups": groups}})
        first = keys[start]
        header = {"run_id": run_id, "month": MONTH, "processor": "analytics", "worker": "bench",
                  "finished_at": dt.datetime.now(dt.UTC).isoformat()}
        # As the worker stores them: one row per job, the partials as columns.
        body = batch_result_table_body(header, [(e["job_id"], e["security"], e["date"]) for e in entries],
                                       [e["counts"] for e in entries], results_table([e["data"] for e in entries]))
        storage.write_bytes(layout.batch_result(MONTH, first.security, first.date, columnar=True), body)
    for key in keys:
        storage.mark(layout.marker(key))
    storage.write_bytes(layout.job_keys, job_keys_csv(keys))
    request = {"input": "/in", "output": str(out), "months": [MONTH], "processor": "analytics", "securities": None,
               "dates": None, "params": params.as_json()}
    manifest = {"run_id": run_id, "created_at": dt.datetime.now(dt.UTC).isoformat(), "request": request, "jobs": jobs}
    storage.write_bytes(layout.manifest, json.dumps(manifest).encode())
    return run_id


def cmd_aggregator(args: argparse.Namespace) -> None:
    """`tickq aggregate` over runs of different sizes: wall time and peak RSS."""
    for jobs in (int(j) for j in str(args.jobs).split(",")):
        out = args.work / f"agg-{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        run_id = _stored_run(out, jobs)
        started = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "tickq", "aggregate", "--run", run_id, "--output", str(out), "--quiet"],
                                stdout=subprocess.DEVNULL)
        handle, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, handle.memory_info().rss / 2**20)
            time.sleep(0.02)
        if proc.returncode != 0:
            raise SystemExit(f"tickq aggregate exited with {proc.returncode}")
        _row(target="aggregator", jobs=jobs, seconds=round(time.perf_counter() - started, 2),
             peak_rss_mb=round(peak))
        shutil.rmtree(out, ignore_errors=True)


def _broker_process() -> psutil.Process | None:
    """RabbitMQ's Erlang VM, when it runs on this machine (its CPU is part of a job's cost)."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "beam.smp":
            return proc
    return None


def _cpu_s(proc: psutil.Process | None) -> float | None:
    if proc is None:
        return None
    times = proc.cpu_times()
    return times.user + times.system


def _spent(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 2)


def cmd_messages(args: argparse.Namespace) -> None:
    """A job's fixed cost, its message alone: every job of a stored, finished run is published
    again (the bodies `tickq produce` makes), and `--workers` workers of one slot consume them,
    each message finding its job done, as the messages of jobs a month's pass stored ahead do.
    Workers' CPU per message net of their start-up (the same workers on an empty queue), and
    RabbitMQ's CPU to take the publishes and to deliver them, when it runs here."""
    import asyncio

    from producer.publish import Outgoing, publish_confirmed
    from shared.layout import RunLayout
    from shared.messages import JobMessage, JobParams, run_job_bodies
    from shared.runstate import read_run_jobs
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.topology import Topology

    broker = _broker_process()
    for jobs in (int(j) for j in str(args.jobs).split(",")):
        out = args.work / f"msgs-{jobs}"
        shutil.rmtree(out, ignore_errors=True)
        run_id = _stored_run(out, jobs)
        keys = sorted(read_run_jobs(LocalStorage(out), RunLayout(run_id)))
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        env = _env(ns)
        settings, topology = Settings.load(namespace=ns), Topology(ns)
        asyncio.run(_declared(settings.amqp_url, topology))
        c0 = _children_cpu_s()
        _run_workers(args.workers, env, ("--concurrency", "1"))
        startup_cpu = _children_cpu_s() - c0
        first = JobMessage.build(run_id=run_id, month=keys[0].month, security=keys[0].security, date=keys[0].date,
                                 input="/in", output=str(out), processor="analytics", params=JobParams())
        messages = [Outgoing(topology.jobs, body, job_id)
                    for job_id, body in run_job_bodies(first, ((k.month, k.security, k.date) for k in keys))]
        b0 = _cpu_s(broker)
        publish_confirmed(settings.amqp_url, messages, "bench")
        b1, c1 = _cpu_s(broker), _children_cpu_s()
        work_s, _ = _run_workers(args.workers, env, ("--concurrency", "1"))
        b2, c2 = _cpu_s(broker), _children_cpu_s()
        worker_cpu = c2 - c1
        _row(target="messages", jobs=jobs, workers=args.workers, seconds=round(work_s, 2),
             jobs_per_s=round(jobs / work_s), worker_cpu_s=round(worker_cpu, 2),
             worker_startup_cpu_s=round(startup_cpu, 2),
             worker_cpu_us_per_message=round(1e6 * (worker_cpu - startup_cpu) / jobs, 1),
             broker_publish_cpu_s=_spent(b0, b1), broker_deliver_cpu_s=_spent(b1, b2))
        shutil.rmtree(out, ignore_errors=True)


def _consuming_seconds(metrics: list[Path]) -> tuple[float, float]:
    """From the first worker's start of consuming to the last job finished, in the workers'
    metrics: the run without interpreter start-up and shutdown. And the run's end: how long
    the worker that finished first waited for the last one (0 for one worker)."""
    import datetime as dt

    started, last_jobs = [], []
    for path in metrics:
        finished = []
        for line in path.read_text().splitlines():
            event = json.loads(line)
            at = dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()
            if event["event"] == "worker.started":
                started.append(at)
            elif event["event"] == "job.finished":
                finished.append(at)
        if finished:
            last_jobs.append(max(finished))
    return max(last_jobs) - min(started), max(last_jobs) - min(last_jobs)


def cmd_scaling(args: argparse.Namespace) -> None:
    [month] = _months(args)
    month, laid = _ingested(args, month)
    wall: dict[int, list[float]] = {1: [], 2: []}
    consuming: dict[int, list[float]] = {1: [], 2: []}
    # Alternated, twice: this machine's speed drifts within minutes.
    for workers in (1, 2, 1, 2):
        env = _env(f"bench-{uuid.uuid4().hex[:8]}")
        out = args.work / f"scale-{uuid.uuid4().hex[:8]}"
        produced = json.loads(_tickq("produce", "--input", str(laid), "--output", str(out), "--months", month.name,
                                     "--market-tz", args.tz, "--json", "--quiet", env=env).stdout)
        metrics = [out / f"worker-{i}.jsonl" for i in range(workers)]
        prefetch = ("--prefetch", str(args.prefetch)) if args.prefetch else ()
        work_s, _ = _run_workers(workers, env, ("--concurrency", args.concurrency, *prefetch), metrics)
        consuming_s, end_gap_s = _consuming_seconds(metrics)
        wall[workers].append(produced["jobs"] / work_s)
        consuming[workers].append(produced["jobs"] / consuming_s)
        # end_gap_s: the worker done first waiting for the other's last batch (see README).
        _row(target="scaling", workers=workers, jobs=produced["jobs"], seconds=round(work_s, 2),
             jobs_per_s=round(wall[workers][-1], 1), consuming_s=round(consuming_s, 2),
             consuming_jobs_per_s=round(consuming[workers][-1], 1), end_gap_s=round(end_gap_s, 2))
        shutil.rmtree(out, ignore_errors=True)
    _row(target="scaling", speedup_2_vs_1=round(statistics.mean(consuming[2]) / statistics.mean(consuming[1]), 2),
         speedup_2_vs_1_with_startup=round(statistics.mean(wall[2]) / statistics.mean(wall[1]), 2))


@contextlib.contextmanager
def _moto_server() -> Any:
    """A moto S3 server on 127.0.0.1 for the length of the block: its endpoint URL."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moto = shutil.which("moto_server", path=str(Path(PY).parent)) or "moto_server"
    server = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def cmd_s3(args: argparse.Namespace) -> None:
    """Batches of jobs against S3 with a round-trip delay: a moto server behind a proxy that
    waits --latency-ms before each request, as a distant object store would. What a batch
    costs in wall time when every request is a round trip; figures per batch of --jobs."""
    import boto3

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.helpers; PYTHONPATH first
    from shared.messages import JobMessage, JobParams
    from tests.helpers import FaultyS3Proxy, upload_dir
    from worker.job import MonthListings, execute_batch

    _, laid = _data(args.work, int(args.rows), args.securities)
    keys = [line.split(",") for line in _job_keys(laid, args, MONTH)][: args.sample * args.jobs]
    with _moto_server() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        upload_dir(laid, client, "bench", "laid")
        proxy = FaultyS3Proxy(endpoint)
        proxy.delay_s = args.latency_ms / 1000
        params = JobParams(market_tz=args.tz)
        jobs = [JobMessage.build(run_id="s3", month=month, security=security, date=date, input="s3://bench/laid",
                                 output="s3://bench/out", processor="analytics", params=params)
                for month, security, date in keys]
        listings = MonthListings()
        times = []
        proxy.requests = 0
        for start in range(0, len(jobs), args.jobs):
            t0 = time.perf_counter()
            for result in execute_batch(jobs[start : start + args.jobs], s3_endpoint_url=proxy.endpoint,
                                        worker_id="bench", listings=listings):
                assert not isinstance(result, BaseException), result
            times.append(time.perf_counter() - t0)
        _row(target="s3", latency_ms=args.latency_ms, batches=len(times), batch_jobs=args.jobs,
             median_batch_s=round(statistics.median(times), 3), jobs_per_s=round(len(jobs) / sum(times), 1),
             requests_per_batch=round(proxy.requests / len(times), 1))
        proxy.close()


def cmd_s3_state(args: argparse.Namespace) -> None:
    """Reading a run's state (what `tickq status` and the aggregator do) from S3 with a
    round-trip delay: --jobs success markers over --sample months, listed in one go (one
    request at a time, `TICKQ_S3_REQUESTS=1`) and month by month in parallel (the default)."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from shared.layout import JobKey, RunLayout, job_keys_csv
    from shared.runstate import load_state
    from shared.storage import open_storage

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests.helpers; PYTHONPATH first
    from tests.helpers import FaultyS3Proxy

    months = [f"{2010 + i // 12}-{i % 12 + 1:02d}" for i in range(args.sample)]
    per_month = args.jobs // len(months)
    keys = [JobKey(month, f"S{i // 21:04d}", f"{month}-{i % 21 + 1:02d}") for month in months
            for i in range(per_month)]
    with _moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        store, layout = open_storage("s3://bench/out", endpoint), RunLayout("state")
        store.write_bytes(layout.job_keys, job_keys_csv(keys))
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda key: store.mark(layout.marker(key)), keys))
        proxy = FaultyS3Proxy(endpoint)
        proxy.delay_s = args.latency_ms / 1000
        for requests in ("1", "64", "1", "64"):  # alternated
            os.environ["TICKQ_S3_REQUESTS"] = requests
            through = open_storage("s3://bench/out", proxy.endpoint)
            proxy.requests = 0
            t0 = time.perf_counter()
            state = load_state(through, layout)
            seconds = time.perf_counter() - t0
            assert len(state.succeeded) == len(keys)
            _row(target="s3-state", latency_ms=args.latency_ms, jobs=len(keys), months=len(months),
                 requests_in_flight=int(requests), seconds=round(seconds, 3), requests=proxy.requests)
        os.environ.pop("TICKQ_S3_REQUESTS")
        proxy.close()


def cmd_encodings(args: argparse.Namespace) -> None:
    """Decoding cost and size of one row group per Parquet encoding: the ingested month's first
    20 row groups rewritten each way, then every column read back as a worker reads it (labels
    as dictionaries), best of three passes."""
    import pyarrow.parquet as pq

    from shared.inputs import LABEL_COLUMNS

    _, laid = _data(args.work, int(args.rows), args.securities)
    source = pq.ParquetFile(next((laid / MONTH).glob("part-*.parquet")))
    table = pa.Table.from_batches([b for g in range(min(20, source.num_row_groups))
                                   for b in source.iter_batches(row_groups=[g])])
    labels = [c for c in LABEL_COLUMNS if c in table.column_names]
    delta = {"ts": "DELTA_BINARY_PACKED", "size": "DELTA_BINARY_PACKED"}
    variants: dict[str, dict[str, Any]] = {
        "zstd (fifth session)": {"compression": "zstd", "use_dictionary": labels},
        "lz4": {"compression": "lz4", "use_dictionary": labels},
        "zstd, delta ts and size, dictionary price": {"compression": "zstd", "use_dictionary": [*labels, "price"],
                                                      "column_encoding": delta},
        "lz4, delta ts and size, dictionary price (ingest)": {"compression": "lz4",
                                                              "use_dictionary": [*labels, "price"],
                                                              "column_encoding": delta},
    }
    for name, options in variants.items():
        path = args.work / "encoding.parquet"
        pq.write_table(table, path, row_group_size=128 * 1024, write_statistics=True, **options)
        parquet = pq.ParquetFile(path, pre_buffer=False, read_dictionary=labels)
        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            for group in range(parquet.num_row_groups):
                parquet.read_row_group(group, use_threads=False)
            best = min(best, (time.process_time() - c0) / parquet.num_row_groups)
        meta = parquet.metadata.row_group(0)
        size = sum(meta.column(i).total_compressed_size for i in range(meta.num_columns))
        _row(target="encodings", encoding=name, ms_per_row_group=round(best * 1000, 2), kb_per_row_group=size // 1024)
        path.unlink()


def cmd_csv(args: argparse.Namespace) -> None:
    raw, _ = _data(args.work, args.rows, args.securities, fmt="csv", ingest=False)
    _decoding(raw, "csv", args.tz)


def _decoding(raw: Path, target: str, tz: str) -> None:
    """The raw month's rows into the pipeline (read and normalised) on this thread: a row of
    rows per second and per CPU-second."""
    from shared.inputs import ALL_COLUMNS, month_files, normalise, read_batches
    from shared.storage import open_storage

    storage = open_storage(str(raw))
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for file in month_files(storage, MONTH):
        for batch in read_batches(storage, file, ALL_COLUMNS):
            table, _ = normalise(batch, tz)
            rows += table.num_rows
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    _row(target=target, rows=rows, seconds=round(seconds, 2), rows_per_s=round(rows / seconds),
         rows_per_cpu_s=round(rows / cpu))


def cmd_dbn(args: argparse.Namespace) -> None:
    """A raw Databento month (`.dbn.zst`): its decoding into the pipeline (rows per CPU-second,
    as `csv`), then tickq stage by stage with `--workers` workers, on the month as one file and
    as `--files` files of consecutive days, in turn (DuckDB reads no DBN: no ratio here)."""
    months = {files: _data(args.work, args.rows, args.securities, fmt="dbn.zst", ingest=False, files=files)[0]
              for files in (1, args.files)}
    _decoding(months[1], "dbn", args.tz)
    for files, source in months.items():
        label = f"dbn.zst in {files} file{'s' if files > 1 else ''}"
        _e2e_sequential(args, Month(source, MONTH, args.rows), label, source)


def _measured(argv: list[str]) -> tuple[float, float, float, str]:
    """Run `argv`; its wall seconds, CPU seconds, peak RSS (MB, polled) and stdout."""
    c0, t0 = _children_cpu_s(), time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        handle, peak = psutil.Process(proc.pid), 0.0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, handle.memory_info().rss / 2**20)
            time.sleep(0.05)
        seconds, cpu = time.perf_counter() - t0, _children_cpu_s() - c0
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, argv, out.read(), err.read())
        return seconds, cpu, peak, out.read()


def cmd_ingest(args: argparse.Namespace) -> None:
    """`tickq ingest` of a raw month (with --day-files, in --tz too), `--sample` times, each
    after DuckDB rewrites the same files sorted by (security, ts) into one Parquet file: the
    same sort and rewrite in one process, with every core and the memory it wants."""
    [month] = _months(args, args.format)
    days = ("--day-files", args.tz) if args.day_files else ()
    files, reader = _duckdb_source(month)
    for _ in range(args.sample):
        out = args.work / f"ingest-{uuid.uuid4().hex[:8]}"
        out.mkdir()
        copy = f"COPY (SELECT * FROM {reader}({files!r}) ORDER BY security, ts) TO '{out}/duck.parquet'"
        duck_s, duck_cpu, duck_peak, _ = _measured([PY, "-c", f"import duckdb; duckdb.connect().execute({copy!r})"])
        seconds, cpu, peak, stdout = _measured([PY, "-m", "tickq", "ingest", "--input", str(month.raw), "--output",
                                                str(out / "tickq"), "--months", month.name, "--json", "--quiet",
                                                *days])
        summary = json.loads(stdout)
        _row(target="ingest", rows=summary["rows"], format="parquet" if reader == "read_parquet" else "csv",
             day_files=bool(days),
             seconds=round(seconds, 2), cpu_s=round(cpu, 2), rows_per_s=round(summary["rows"] / seconds),
             peak_rss_mb=round(peak), stages_s=summary["months"][month.name]["seconds"],
             duckdb_s=round(duck_s, 2), duckdb_cpu_s=round(duck_cpu, 2), duckdb_peak_rss_mb=round(duck_peak),
             ratio=round(seconds / duck_s, 2))
        shutil.rmtree(out, ignore_errors=True)


def cmd_naive(args: argparse.Namespace) -> None:
    """What tickq avoids: each job reading the whole month with pandas."""
    import pandas as pd

    raw, laid = _data(args.work, args.rows, args.securities)
    keys = [k.split(",") for k in _job_keys(laid, args, MONTH)][: args.sample]
    t0 = time.perf_counter()
    for _, security, date in keys:
        frame = pd.read_parquet(raw / MONTH)
        local = frame["ts"].dt.tz_convert(args.tz).dt.date.astype(str)
        _ = frame[(frame["security"] == security) & (local == date)]["size"].sum()
    naive = (time.perf_counter() - t0) / len(keys)
    from shared.messages import JobMessage, JobParams
    from worker.job import MonthListings, execute_batch

    out = args.work / f"naive-{uuid.uuid4().hex[:8]}"
    listings = MonthListings()
    t0 = time.perf_counter()
    for month, security, date in keys:
        job = JobMessage.build(run_id="naive", month=month, security=security, date=date, input=str(laid),
                               output=str(out), processor="analytics", params=JobParams(market_tz=args.tz))
        execute_batch([job], s3_endpoint_url=None, worker_id="bench", listings=listings)
    ours = (time.perf_counter() - t0) / len(keys)
    _row(target="naive", rows=args.rows, jobs=len(keys), pandas_whole_month_ms=round(naive * 1000, 1),
         tickq_job_ms=round(ours * 1000, 1), ratio=round(naive / ours, 1))
    shutil.rmtree(out, ignore_errors=True)


def _compile_project() -> None:
    """Bytecode for tickq's own modules, as the image has it (its build compiles everything):
    an editable checkout under PYTHONDONTWRITEBYTECODE would otherwise compile them again in
    every process the benchmarks start (about 0.1 s each). The processes import tickq from the
    working directory when it holds a checkout (another version run for comparison), else from
    this one: both are compiled."""
    import compileall

    for root in dict.fromkeys((Path.cwd().resolve(), Path(__file__).resolve().parents[1])):
        for package in ("shared", "producer", "worker", "aggregator", "tickq"):
            if (root / package / "__init__.py").is_file():
                compileall.compile_dir(str(root / package), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=["e2e", "per-job", "batch", "memory", "producer", "scaling", "csv", "dbn",
                                           "naive", "aggregator", "messages", "s3", "s3-state", "encodings", "ingest"])
    parser.add_argument("--rows", default="2000000")
    parser.add_argument("--securities", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", default="10500",
                        help="producer: jobs; batch: jobs per batch; aggregator, messages: a comma-separated list; "
                             "s3-state: the run's jobs")
    parser.add_argument("--sample", type=int, default=None,
                        help="jobs (per-job, naive) or batches (s3) to time (default 50); s3-state: the run's "
                             "months (default 50); ingest: runs (default 1)")
    parser.add_argument("--tz", default="Australia/Sydney")
    parser.add_argument("--files", type=int, default=8,
                        help="dbn: the month also as this many files of consecutive days (default 8)")
    parser.add_argument("--format", choices=["parquet", "csv", "csv.gz"], default="parquet",
                        help="memory: csv or csv.gz measures a worker over a raw CSV month; e2e and ingest: the "
                             "raw month's format (one file: csv.gz cannot be cut, so one worker reads it)")
    parser.add_argument("--rewrite", choices=REWRITES, default=None,
                        help="e2e: the raw Parquet month as another tool or feed writes it: pyarrow's defaults, "
                             "sorted by security, shuffled, sorted by security within each day, with its own "
                             "trade_date, ts as integer nanoseconds or as INT96")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="s3: delay before each request")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="scaling: each worker's --prefetch (default: the worker's own)")
    parser.add_argument("--concurrency", default="1",
                        help="scaling: each worker's --concurrency (default 1, a slot per core and per worker on 2 "
                             "cores; `auto` is the worker's own default)")
    parser.add_argument("--raw-too", action="store_true",
                        help="e2e, memory: also run on the raw (not ingested) files")
    parser.add_argument("--all-jobs", action="store_true",
                        help="memory: every job of the month, not the 20 largest securities' jobs")
    parser.add_argument("--day-files", action="store_true",
                        help="e2e, ingest: ingest with day files in --tz (`tickq ingest --day-files`)")
    parser.add_argument("--input", type=Path, default=None,
                        help=f"{', '.join(OWN_MONTH_TARGETS)}: measure a month of your own instead of generated "
                             "data: a local folder laid out as `tickq produce --input` takes it (--rows, "
                             "--securities, --format and --rewrite then do not apply)")
    parser.add_argument("--month", default=None,
                        help="with --input: the month to measure (default: the only month there)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tickq-bench"))
    args = parser.parse_args()
    if args.input is not None and args.target not in OWN_MONTH_TARGETS:
        parser.error(f"--input: {args.target} measures generated data only (--input serves "
                     f"{', '.join(OWN_MONTH_TARGETS)})")
    if args.rewrite is not None and args.format != "parquet":
        parser.error("--rewrite: of the Parquet month only (--format parquet)")
    if args.month is not None and args.input is None:
        parser.error("--month: only with --input (generated data is one month, " + MONTH + ")")
    args.work.mkdir(parents=True, exist_ok=True)
    _compile_project()
    if args.target in ("e2e", "scaling", "csv", "dbn", "naive", "ingest"):
        args.rows = int(args.rows)
    if args.target not in ("aggregator", "messages"):
        args.jobs = int(args.jobs)
    if args.sample is None:
        args.sample = 1 if args.target == "ingest" else 50
    try:
        {"e2e": cmd_e2e, "per-job": cmd_per_job, "batch": cmd_batch, "memory": cmd_memory, "producer": cmd_producer,
         "scaling": cmd_scaling, "csv": cmd_csv, "dbn": cmd_dbn, "naive": cmd_naive, "aggregator": cmd_aggregator,
         "messages": cmd_messages, "s3": cmd_s3, "s3-state": cmd_s3_state, "encodings": cmd_encodings,
         "ingest": cmd_ingest}[args.target](args)
    finally:
        _drop_namespaces()


if __name__ == "__main__":
    main()
