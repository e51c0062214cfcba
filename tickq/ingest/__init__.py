"""`tickq ingest`: rewrite raw monthly files into the layout that makes per-job reads cheap.

For each month M, every input file of M (anything `shared.inputs.read_batches` reads: Parquet,
CSV, CSV.gz, DBN) is rewritten as Parquet under ``<output>/M/part-NNNNN.parquet``:

- rows sorted by (security, ts) across the whole month (null securities last, null ts last
  within a security), so a job's rows sit in a few consecutive row groups;
- ``security`` as a plain ``string`` column (an Arrow dictionary column would defeat row-group
  pruning by statistics), statistics on the columns rows are pruned by (security, ts,
  trade_date), row groups of `row_group_rows` rows, lz4, ts and size delta-encoded, the text
  columns and price dictionary-encoded;
- a sidecar ``<output>/M/_index.json`` (ignored by the input reader, like every ``_`` file)
  listing per file and per row group: rows, byte offset and size, security min/max and ts
  min/max, so that a reader can go straight to the row groups of a security;
- a key sidecar ``<output>/M/_keys.parquet`` (`shared.monthkeys`): rows per (security, UTC
  quarter hour of ts[, trade_date]), null keys included, and the parts it describes, so that
  job discovery reads it instead of the key columns of every row. It is counted from the
  sorted output as it is written, never from the whole month in memory;
- with ``--day-files ZONE``, one small Parquet file per (security, trade date in ZONE) under
  ``<output>/_days/M/`` (`shared.dayfiles`), cut from the sorted output as it is written, so
  that a job read on its own reads about its own rows.

Values. Ingest never drops a row and never changes what a run computes: every column goes
through the same element-wise normalisation a worker applies (`shared.inputs`), and that
normalisation is idempotent, so a run over ingested data yields exactly the tables, and the
same read / accepted / rejected counts, as a run over the raw data. Concretely the columns are
``ts`` (``timestamp[ns, tz=UTC]``; unparseable text becomes null), ``security`` (string,
as is: empty and null stay so), ``price`` (float64; text that is not a number becomes null),
``size`` (int64; values that are not integers become null), ``side`` (``B``/``S``/null: ``A``,
``BUY``, ``SELL`` in any case are mapped as the worker maps them), ``participant`` and
``venue`` (string, as is) and ``trade_date`` (date32, only when some input file of the month
has that column; unparseable dates become null, so the worker derives them from ts, as it
would have). Rows that the contract rejects stay in the data and are rejected by the worker.
Other columns are not kept.

Memory stays bounded whatever the month's size (an external sort):

1. pass 1 reads only the ``security`` column and counts rows per security;
2. securities are cut, in sort order, into contiguous ranges ("buckets") small enough to sort
   in memory within `memory_budget_bytes`;
3. pass 2 reads the month in bounded batches, normalises them and spills each row to its
   bucket's temporary Arrow IPC file (lz4) on local disk (decoding and spill writes run on
   threads of their own);
4. each bucket in turn is loaded and sorted, on a thread of its own, while the previous one
   is appended to the output; a bucket that would not fit (one security with more rows than
   a bucket holds) is sorted in runs that are merged. Rows with equal (security, ts) keep
   their input order either way.

The distinct securities of a month are held in memory (pass 1), and local temporary disk
must hold the month's spill and one output file.

Writing a month replaces the ingest output (``part-*.parquet``, ``_index.json``,
``_keys.parquet``, day files) of an earlier ingest of that month; do not run jobs on a month
while it is being ingested.

Months are ingested one after another, each on its own: a month that fails (no input, an
unreadable file, the store failing) is reported and the next goes on. A history is ingested
side by side by several processes (pods of an indexed Kubernetes Job, say), each given the
same ``--months`` and its own ``--shard INDEX/COUNT``: shard i takes every COUNT-th month from
the i-th, so that each gets early and late months alike (later months are usually the
larger). With ``--skip-unchanged`` a month already ingested from the same input files with the
same options is left as it is, so that all the shards can be run again after some failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from shared.dayfiles import DayFiles, DayFilesWriter, day_file_key, manifest_key, month_prefix, read_manifest
from shared.errors import ConfigError, PermanentError, TickqError, one_line
from shared.inputs import InputFile, month_files
from shared.messages import JobParams
from shared.monthkeys import KEYS_NAME, KeysWriter, part_record
from shared.readahead import read_ahead
from shared.storage import Storage, open_storage
from tickq.ingest.output import (
    DEFAULT_MAX_FILE_ROWS,
    DEFAULT_ROW_GROUP_ROWS,
    INDEX_NAME,
    INDEX_VERSION,
    OUTPUT_SCHEMA,
    PART_RE,
    Output,
    file_entry,
    read_index,
)
from tickq.ingest.sort import (
    DEFAULT_MEMORY_BUDGET,
    SORT_FACTOR,
    Spill,
    count_securities,
    plan_buckets,
    sorted_buckets,
    spill_month,
)

__all__ = ["INDEX_NAME", "OUTPUT_SCHEMA", "add_arguments", "ingest", "main", "read_index"]


def _publish_day_files(target: Storage, month: str, days: DayFilesWriter | None) -> tuple[int, int]:
    """Store the day files `days` wrote (several requests in flight where the store waits on the
    network), then delete the month's day files this ingest did not write; how many were
    stored, and their bytes."""
    stored, keep = 0, set()
    if days is not None:
        written = days.close()
        local_path = days.path

        def store(key: tuple[str, str]) -> int:
            path = local_path(*key)
            size = path.stat().st_size
            target.write_file(day_file_key(month, *key), path, content_type="application/vnd.apache.parquet")
            path.unlink()
            return size

        with ThreadPoolExecutor(max_workers=max(1, target.parallel_requests)) as pool:
            stored = sum(pool.map(store, written))
        keep = {day_file_key(month, *key) for key in written}
        shutil.rmtree(days.directory, ignore_errors=True)
    for obj in list(target.list(month_prefix(month))):
        if obj.key not in keep:
            target.delete(obj.key)
    return len(keep), stored


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ingest_month(
    source: Storage,
    target: Storage,
    month: str,
    files: list[InputFile],
    work: Path,
    row_group_rows: int,
    budget: int,
    max_file_rows: int,
    day_files_tz: str | None,
) -> dict[str, Any]:
    """Ingest `month` from its input `files`, spilling and writing in `work` (an empty local
    folder of its own, which the caller removes); the month's entry of the summary."""
    started = time.perf_counter()
    counts, nulls = count_securities(source, files)
    plan = plan_buckets(counts, nulls, budget, row_group_rows)
    counted = time.perf_counter()

    spill = Spill(work)
    has_date, rows, table_bytes = spill_month(source, files, plan, spill, budget)
    if rows != plan.rows:
        raise PermanentError(f"input of {month} changed while being ingested")
    spilled = time.perf_counter()

    schema = OUTPUT_SCHEMA
    if not has_date:
        schema = schema.remove(schema.get_field_index("trade_date"))
    out = Output(month, work, schema, row_group_rows, max_file_rows)
    row_bytes = table_bytes / rows if rows else plan.row_bytes
    sort_rows = max(row_group_rows, int(budget / SORT_FACTOR / row_bytes))
    keys = KeysWriter(work / KEYS_NAME, with_trade_date=has_date)
    keys_s = days_s = 0.0
    days = DayFilesWriter(work / "days", schema, day_files_tz) if day_files_tz else None

    def emit(table: pa.Table) -> None:
        nonlocal keys_s, days_s
        counted_at = time.perf_counter()
        keys.add(table)
        cut_at = time.perf_counter()
        keys_s += cut_at - counted_at
        if days is not None:
            days.add(table)
            days_s += time.perf_counter() - cut_at
        out.append(table)

    # Buckets are sorted on a thread of their own while the main thread writes the previous
    # one: sorting and Parquet encoding both release the interpreter lock.
    for table in read_ahead(sorted_buckets(spill, plan, sort_rows, work), depth=1):
        emit(table)
        del table
    parts = out.close()
    entries = [file_entry(part, month) for part in parts]
    keys.close(month, [part_record(p.key, p.path, e["rows"]) for p, e in zip(parts, entries, strict=True)])
    sorted_at = time.perf_counter()

    # No day file may be read against parts it was not cut from: the manifest goes first.
    target.delete(manifest_key(month))
    written = set()
    for part in parts:
        target.write_file(part.key, part.path, content_type="application/vnd.apache.parquet")
        written.add(part.key)
        part.path.unlink()
    # Each part's version as the store now lists it: a part written again since, even at the
    # same size, then no longer matches the index (`_made_from`).
    versions = {obj.key: obj.version for obj in target.list(f"{month}/") if obj.key in written}
    for entry in entries:
        entry["version"] = versions.get(entry["key"], "")
    index = {
        "version": INDEX_VERSION,
        "month": month,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "sorted_by": ["security", "ts"],
        "rows": rows,
        "row_group_rows": row_group_rows,
        "columns": schema.names,
        "inputs": _inputs_entry(files),
        "files": entries,
    }
    target.write_bytes(
        f"{month}/{INDEX_NAME}", json.dumps(index, indent=1).encode(), "application/json"
    )
    # Written after the parts it describes; a reader checks them before trusting it.
    target.write_file(f"{month}/{KEYS_NAME}", keys.path, content_type="application/vnd.apache.parquet")
    keys_bytes = keys.path.stat().st_size
    keys.path.unlink()
    day_count, day_bytes = _publish_day_files(target, month, days)
    if days is not None and days.abandoned is None:
        day_files = DayFiles(month, days.market_tz, tuple((e["key"], e["bytes"]) for e in entries))
        target.write_bytes(manifest_key(month), day_files.manifest(day_count), "application/json")
    removed, foreign = [], []
    for obj in target.list(f"{month}/"):
        name = obj.key[len(month) + 1 :]
        if obj.key in written or name == INDEX_NAME:
            continue
        if PART_RE.match(name):
            target.delete(obj.key)
            removed.append(target.describe(obj.key))
        elif not name.rsplit("/", 1)[-1].startswith((".", "_")):
            foreign.append(target.describe(obj.key))
    done = time.perf_counter()
    return {
        "rows": rows,
        "securities": len(counts) + (1 if nulls else 0),
        "input_files": len(files),
        "input_bytes": sum(f.size for f in files),
        "files": [target.describe(p.key) for p in parts],
        "bytes": sum(e["bytes"] for e in entries),
        "row_groups": sum(len(e["row_groups"]) for e in entries),
        "buckets": plan.buckets,
        "merged_buckets": sum(1 for n in plan.bucket_rows if n > sort_rows),
        "spill_bytes": spill.bytes,
        "keys_bytes": keys_bytes,
        "day_files": day_count,
        "day_files_bytes": day_bytes,
        "day_files_skipped": days.abandoned if days is not None else None,
        "removed": removed,
        "other_files": foreign,
        "seconds": {
            "count": round(counted - started, 3),
            "spill": round(spilled - counted, 3),
            "sort_write": round(sorted_at - spilled, 3),
            "keys": round(keys_s, 3),
            "day_files": round(days_s, 3),
            "upload": round(done - sorted_at, 3),
            "total": round(done - started, 3),
        },
    }


def _inputs_entry(files: list[InputFile]) -> list[dict[str, Any]]:
    """The index's record of the input files a month was ingested from."""
    return [{"key": f.key, "size": f.size, "format": f.format, "version": f.version} for f in files]


def _made_from(target: Storage, month: str, files: list[InputFile], row_group_rows: int,
               day_files_tz: str | None) -> str | None:
    """When `month`'s ingest output was made from exactly `files` (keys, sizes and versions as
    the store lists them), in row groups of `row_group_rows`, with day files for `day_files_tz`
    where asked, and is whole (every part its index names, at the size and version it had when
    written, no other part, and its key sidecar): the time its index was written. Else None:
    the month is to be ingested."""
    try:
        index = read_index(target, month)
    except ValueError:  # not JSON: an index cut short
        return None
    if (index is None or index.get("version") != INDEX_VERSION or index.get("row_group_rows") != row_group_rows
            or index.get("inputs") != _inputs_entry(files) or not all(f.version for f in files)):
        return None  # (without versions, a file written again at the same size would pass)
    listed = {obj.key: (obj.size, obj.version) for obj in target.list(f"{month}/")}
    parts = {entry["key"]: (entry["bytes"], entry.get("version")) for entry in index["files"]}
    found = {key: seen for key, seen in listed.items() if PART_RE.match(key[len(month) + 1:])}
    if found != parts or f"{month}/{KEYS_NAME}" not in listed:
        return None
    if day_files_tz is not None:
        days = read_manifest(target, month)
        cut_from = [InputFile(key, size, "parquet") for key, (size, _) in parts.items()]
        if days is None or not days.serve(day_files_tz, cut_from):
            return None
    return str(index.get("created_at", ""))


def ingest(
    input_uri: str,
    output_uri: str,
    months: list[str] | tuple[str, ...],
    endpoint_url: str | None = None,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    max_file_rows: int = DEFAULT_MAX_FILE_ROWS,
    tmp_dir: str | Path | None = None,
    day_files_tz: str | None = None,
    skip_unchanged: bool = False,
) -> dict[str, Any]:
    """Rewrite `months` of `input_uri` under `output_uri` (see the module doc); a summary.

    The summary has ``input``, ``output``, ``rows`` (total), ``seconds``, ``peak_rss_mb`` and
    ``months``: per month ``rows``, ``securities``, ``input_files``, ``input_bytes``, ``files``
    (URIs written), ``bytes``, ``row_groups``, ``buckets``, ``merged_buckets``,
    ``spill_bytes``, ``keys_bytes`` (the key sidecar), ``day_files`` and ``day_files_bytes``
    (with `day_files_tz`: the day files written, `shared.dayfiles`), ``day_files_skipped`` (why
    a month got none although asked, else null), ``removed`` (stale parts deleted),
    ``other_files`` (files in the output month that are not ingest output: a run would read
    them too) and ``seconds`` per stage (``keys``, counting the key sidecar, is part of
    ``sort_write``, and so is ``day_files``, cutting the day files); and ``failed``: per month
    that could not be ingested (no input, an unreadable file, the store failing), why, in one
    line. A failed month does not stop the others: its spill is removed
    and the next month goes on. With `skip_unchanged`, a month whose output was made from the
    same input files with the same options, and is whole, is left as it is: ``skipped`` names
    each such month with the time it was ingested. Raises `ValueError` for bad arguments.
    """
    if row_group_rows < 1:
        raise ValueError("row_group_rows must be at least 1")
    if memory_budget_bytes < 1 << 20:
        raise ValueError("memory_budget_bytes must be at least 1 MiB")
    months = list(dict.fromkeys(months))
    if not months:
        raise ValueError("give at least one month")
    if day_files_tz is not None:
        try:
            JobParams(market_tz=day_files_tz)
        except ValueError:
            raise ValueError(f"--day-files: unknown time zone {day_files_tz!r} (e.g. UTC, Australia/Sydney)") from None
    source = open_storage(input_uri, endpoint_url=endpoint_url)
    target = open_storage(output_uri, endpoint_url=endpoint_url)
    if source.describe() == target.describe():
        raise ValueError("the output location must differ from the input location")
    started = time.perf_counter()
    per_month: dict[str, Any] = {}
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tickq-ingest-", dir=tmp_dir) as tmp:
        for month in months:
            try:
                files = month_files(source, month)
                made = _made_from(target, month, files, row_group_rows, day_files_tz) if skip_unchanged else None
                if made is not None:
                    skipped[month] = made
                    continue
                work = Path(tempfile.mkdtemp(prefix=f"{month}-", dir=tmp))
                try:
                    per_month[month] = _ingest_month(
                        source, target, month, files, work, row_group_rows, memory_budget_bytes,
                        max_file_rows, day_files_tz,
                    )  # fmt: skip
                finally:  # the month's spill, whatever became of it: room for the next month
                    shutil.rmtree(work, ignore_errors=True)
            except TickqError as exc:  # this month's input or store; a local disk failing stops all
                failed[month] = one_line(exc)
    return {
        "input": source.describe(),
        "output": target.describe(),
        "rows": sum(m["rows"] for m in per_month.values()),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "months": per_month,
        "failed": failed,
        "skipped": skipped,
    }


def shard(text: str) -> tuple[int, int]:
    """``--shard INDEX/COUNT``, with 0 <= INDEX < COUNT, as (index, count)."""
    index, slash, count = text.partition("/")
    try:
        parsed = (int(index), int(count)) if slash else None
    except ValueError:
        parsed = None
    if parsed is None or not 0 <= parsed[0] < parsed[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT with 0 <= INDEX < COUNT (e.g. 0/4)")
    return parsed


def months_of_shard(months: Sequence[str], index: int, count: int) -> list[str]:
    """The months shard `index` of `count` ingests: every `count`-th of `months` from the
    `index`-th. Every month falls to exactly one shard."""
    return list(months[index::count])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tickq ingest`` (the connection options are the caller's)."""
    from tickq.cli import positive_int

    parser.add_argument("--input", required=True, help="raw input (s3://bucket/prefix or a path)")
    parser.add_argument("--output", required=True, help="where ingested months go (not --input)")
    parser.add_argument("--months", required=True, help="YYYY-MM, YYYY-MM..YYYY-MM or a comma list")
    parser.add_argument(
        "--row-group-rows", type=positive_int, default=DEFAULT_ROW_GROUP_ROWS,
        help=f"rows per Parquet row group (default {DEFAULT_ROW_GROUP_ROWS})",
    )  # fmt: skip
    parser.add_argument(
        "--memory-mb", type=positive_int, default=DEFAULT_MEMORY_BUDGET >> 20,
        help="memory for sorting, in MiB (default 256); the rest spills to local disk",
    )  # fmt: skip
    parser.add_argument(
        "--day-files", metavar="ZONE",
        help="also write one small file per (security, trade date in ZONE, the runs' --market-tz), "
        "so that jobs read on their own or in small batches read about their own rows",
    )  # fmt: skip
    parser.add_argument("--tmp-dir", help="local directory for spill files (default: system temp)")
    parser.add_argument(
        "--skip-unchanged", action="store_true",
        help="leave a month whose ingest output was made from the same input files (names, sizes, "
        "versions) with the same options, and is whole",
    )  # fmt: skip
    parser.add_argument(
        "--shard", type=shard, metavar="INDEX/COUNT",
        help="ingest only every COUNT-th of --months from the INDEX-th (0-based): COUNT processes, "
        "each with its own INDEX, share the months",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _report_empty_shard(args: argparse.Namespace, endpoint: str | None, given: int) -> None:
    """Say that this process's `--shard` holds none of the `given` months."""
    from shared.metrics import get_logger

    name = f"{args.shard[0]}/{args.shard[1]}"
    get_logger().info("ingest.shard_empty", shard=name, months_given=given)
    if args.json:
        where = {key: open_storage(uri, endpoint_url=endpoint).describe()
                 for key, uri in (("input", args.input), ("output", args.output))}
        nothing = {"rows": 0, "seconds": 0.0, "months": {}, "failed": {}, "skipped": {}}
        print(json.dumps({**where, **nothing, "shard": name}))
    else:
        print(f"shard {name}: none of the {given} month(s) given falls to it")


def main(args: argparse.Namespace) -> int:
    """Run ``tickq ingest``: exit 0 when every month is ingested (or left unchanged), 3 when
    some are and others failed (each failed month one line on stderr). Raises
    `shared.errors.TickqError` when none is, or for other expected failures."""
    from shared.metrics import configure
    from tickq.cli import EXIT_INCOMPLETE, EXIT_OK, _month_list

    metrics_file = getattr(args, "metrics_file", None)
    configure("ingest", metrics_file, stream=sys.stderr, quiet=getattr(args, "quiet", False))
    endpoint = getattr(args, "s3_endpoint_url", None) or os.environ.get("TICKQ_S3_ENDPOINT_URL")
    months = list(_month_list(args.months))
    if args.shard is not None:
        given = len(months)
        months = months_of_shard(months, *args.shard)
        if not months:  # more shards than months: this one has nothing to do
            _report_empty_shard(args, endpoint or None, given)
            return EXIT_OK
    try:
        summary = ingest(
            args.input, args.output, months, endpoint_url=endpoint or None,
            row_group_rows=args.row_group_rows, memory_budget_bytes=args.memory_mb << 20,
            tmp_dir=args.tmp_dir, day_files_tz=args.day_files, skip_unchanged=args.skip_unchanged,
        )  # fmt: skip
    except ValueError as exc:
        if isinstance(exc, pa.ArrowException):
            raise
        raise ConfigError(str(exc)) from None
    failed = summary["failed"]
    if failed and not summary["months"] and not summary["skipped"]:
        # Nothing is in place: the command failed, in one line as every command does.
        first = next(iter(failed.values()))
        raise PermanentError(first if len(failed) == 1 else f"{first} (and {len(failed) - 1} more month(s) failed)")
    if args.shard is not None:
        summary["shard"] = f"{args.shard[0]}/{args.shard[1]}"
    _log_summary(summary)
    _print_summary(summary, args.json)
    return EXIT_INCOMPLETE if failed else EXIT_OK


def _log_summary(summary: dict[str, Any]) -> None:
    """The summary as metrics lines: one per month, then the whole."""
    from shared.metrics import get_logger

    log = get_logger()
    for month, info in summary["months"].items():
        log.info(
            "ingest.month", month=month, rows=info["rows"], files=len(info["files"]),
            row_groups=info["row_groups"], bytes=info["bytes"], buckets=info["buckets"], day_files=info["day_files"],
            seconds=info["seconds"]["total"],
        )  # fmt: skip
        if info["day_files_skipped"]:
            log.warning("ingest.day_files_skipped", month=month, reason=info["day_files_skipped"])
        for uri in info["other_files"]:
            log.warning("ingest.other_file", month=month, uri=uri,
                        note="not ingest output: a run over the output reads it too")  # fmt: skip
    for month, made in summary["skipped"].items():
        log.info("ingest.month_unchanged", month=month, ingested_at=made)
    for month, error in summary["failed"].items():
        log.error("ingest.month_failed", month=month, error=error)
    log.info("ingest.done", rows=summary["rows"], seconds=summary["seconds"], failed=len(summary["failed"]),
             peak_rss_mb=summary["peak_rss_mb"])  # fmt: skip


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    """The summary on stdout (a line, or JSON), and each failed month's line on stderr."""
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        files = sum(len(m["files"]) for m in summary["months"].values())
        skipped, failed = len(summary["skipped"]), len(summary["failed"])
        print(
            f"ingested {len(summary['months'])} month(s), {summary['rows']} rows into {files} file(s) "
            f"under {summary['output']} in {summary['seconds']:.1f}s"
            + (f"; {skipped} unchanged month(s) left as they were" if skipped else "")
            + (f"; {failed} month(s) failed" if failed else "")
        )
    for month, error in summary["failed"].items():
        print(f"tickq ingest: {month}: {error}", file=sys.stderr)
