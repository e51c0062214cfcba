"""Aggregating a run from its stored job results: the one code path behind both
``tickq aggregate`` and the aggregator service, so both write identical tables.

Results are read in (security, date, month) order with a bounded window of parallel reads:
besides dates and groups, memory holds a few bytes per job: which batch object holds its
result, beside the run's state (`shared.runstate`).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from shared.errors import PermanentError
from shared.layout import (
    COUNT_COLUMNS,
    JobKey,
    RunLayout,
    batch_result_columns,
    batch_result_header,
    batch_result_jobs,
    batch_result_table,
    is_columnar,
)
from shared.messages import JobParams
from shared.metrics import get_logger
from shared.processors import Processor, StoredResult, get_processor
from shared.runstate import JobSet, RunState, load_state, read_manifest
from shared.storage import Storage
from shared.tables import TableSink

# Batch objects fetched at a time while indexing, and read ahead of the one being aggregated:
# enough parallel reads to hide an object store's latency, few enough to bound memory. The
# threads only fetch bytes; parsing stays on the aggregating thread (parsing in 16 threads
# cost a third more CPU in contention for the interpreter than it saved).
READ_WINDOW = 16
READ_AHEAD = 8
READ_THREADS = 16
# Batch objects the index pass read are kept for the results pass up to this many bytes in
# all (analytics results take about 0.6 KB a job, compressed), so a run of up to about 25,000
# jobs reads each object once: an object store's GETs are its cost. Past it, the rest are read
# again.
KEEP_BYTES = 16 << 20


@dataclass
class AggregateResult:
    """What an aggregation wrote."""

    run_id: str
    complete: bool
    expected: int
    succeeded: int
    dead: int
    missing: int
    tables: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def wait_for_run(storage: Storage, layout: RunLayout, timeout_s: float | None, poll_s: float = 1.0) -> RunState:
    """Poll until every job is accounted for (or `timeout_s` passes); the last state seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    expected = None
    while True:
        state = load_state(storage, layout, expected)
        expected = state.expected
        if state.accounted or (deadline is not None and time.monotonic() >= deadline):
            return state
        time.sleep(poll_s)


# Jobs a columnar processor folds at a time: the chunk ends where a (security, date) does.
CHUNK_JOBS = 4_096
# Batch objects a chunk holds rows of, at most, before it puts those rows together: an object
# of one job (a retried job, or jobs that came one at a time) costs tens of KB of Arrow and
# Python objects while it is held, whatever its one row weighs.
LOOSE_TABLES = 256

# What a batch object holds once opened: its results by job (JSON-ready processors), or its
# table and each job's row (columnar processors).
_Opened = TypeVar("_Opened")


class _ResultReader:
    """Each of `jobs`' results once, in the run's order, from the batch result objects.

    A job may be in several batch objects (it ran again after a crash, a lost marker or a
    replay); the copy finished last counts, so aggregating again gives identical tables. An
    index pass reads every batch object once to learn which one holds each job; the results
    pass takes them in the order they are first needed, a bounded window ahead (reading again
    only those the index pass could not keep within `KEEP_BYTES`), and drops each once all of
    its jobs are out. Batches hold consecutive jobs of the queue, which
    the producer publishes in key order, so only a few are open at a time.

    Results come one by one (`results`) or, for processors that fold columns
    (``aggregate_tables``), as tables of consecutive jobs (`tables`).
    """

    def __init__(self, storage: Storage, layout: RunLayout, jobs: JobSet, processor: Processor) -> None:
        self._storage, self._layout, self._jobs, self._processor = storage, layout, jobs, processor
        self.counts = dict.fromkeys(COUNT_COLUMNS, 0)

    def _corrupt(self, name: str, exc: ValueError) -> PermanentError:
        return PermanentError(f"job results {self._storage.describe(name)}: {exc}")

    def _index(self, pool: ThreadPoolExecutor) -> tuple[list[str], npt.NDArray[np.int32], dict[int, bytes]]:
        """The batch objects, the number of the one holding the result that counts for each
        wanted job (by the job's position in the run; -1 for other jobs), and the bodies kept
        for the results pass by object number (up to `KEEP_BYTES`)."""
        run, wanted = self._jobs.jobs, self._jobs.mask
        names = list(self._storage.keys(self._layout.results_prefix))
        holder = np.full(len(run), -1, dtype=np.int32)  # a few bytes a job, not a dict entry
        copies: list[tuple[str, str]] = []  # (finished_at, name) of each object, to compare copies by
        kept: dict[int, bytes] = {}
        kept_bytes = 0
        for start in range(0, len(names), READ_WINDOW):
            window = names[start : start + READ_WINDOW]
            for name, body in zip(window, pool.map(self._storage.read_bytes, window), strict=True):
                try:
                    header, keys = batch_result_header(body)
                except ValueError as exc:
                    raise self._corrupt(name, exc) from None
                number, month = len(copies), header["month"]
                copies.append((str(header["finished_at"]), name))
                positions = run.positions((month, security, date) for security, date in keys)
                positions = positions[positions >= 0]
                positions = positions[wanted[positions]]
                _hold_newest(holder, copies, number, positions)
                if kept_bytes + len(body) <= KEEP_BYTES:
                    kept[number] = body
                    kept_bytes += len(body)
        missing = np.flatnonzero(wanted & (holder < 0))
        if len(missing):
            first = run.key(int(missing[0]))  # positions are in aggregation order
            raise PermanentError(
                f"{len(missing)} succeeded job(s) have no stored result, e.g. {first.month} {first.security} "
                f"{first.date}: the results under {self._storage.describe(self._layout.results_prefix)} were removed"
            )
        return names, holder, kept

    def _placed(self, open_batch: Callable[[str, bytes], _Opened]) -> Iterator[tuple[JobKey, _Opened]]:
        """Every wanted job, in order, with the opened batch object holding its result."""
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="tickq-read") as pool:
            names, holder, kept = self._index(pool)
            remaining, upcoming = self._needs(len(names), holder)
            kept = {number: body for number, body in kept.items() if remaining[number]}
            reading: deque[tuple[int, Future[bytes]]] = deque()
            open_batches: dict[int, _Opened] = {}
            for key, number in self._holders(holder):
                while number not in open_batches:
                    while len(reading) < READ_AHEAD and (ahead := next(upcoming, None)) is not None:
                        reading.append((ahead, self._body(pool, ahead, kept, names[ahead])))
                    read_number, future = reading.popleft()
                    try:
                        open_batches[read_number] = open_batch(names[read_number], future.result())
                    except ValueError as exc:
                        raise self._corrupt(names[read_number], exc) from None
                yield key, open_batches[number]
                remaining[number] -= 1
                if not remaining[number]:
                    del open_batches[number]

    def _needs(self, objects: int, holder: npt.NDArray[np.int32]) -> tuple[npt.NDArray[np.int64], Iterator[int]]:
        """How many wanted jobs each object holds, and the objects' numbers in the order first
        needed."""
        remaining = np.zeros(objects, dtype=np.int64)
        first_needed: dict[int, None] = {}  # a dict keeps the order its keys came in
        for positions in self._jobs.position_chunks():
            numbers, first, count = np.unique(holder[positions], return_index=True, return_counts=True)
            remaining[numbers] += count
            first_needed.update(dict.fromkeys(numbers[np.argsort(first)].tolist()))
        return remaining, iter(first_needed)

    def _holders(self, holder: npt.NDArray[np.int32]) -> Iterator[tuple[JobKey, int]]:
        """Each wanted job, in order, with the number of the object holding its result."""
        for positions in self._jobs.position_chunks():
            yield from zip(self._jobs.jobs.keys(positions), holder[positions].tolist(), strict=True)

    def _body(self, pool: ThreadPoolExecutor, number: int, kept: dict[int, bytes], name: str) -> Future[bytes]:
        """The body of batch object `number` (named `name`): the one the index pass kept, else read now."""
        body = kept.pop(number, None)
        if body is None:
            return pool.submit(self._storage.read_bytes, name)
        ready: Future[bytes] = Future()
        ready.set_result(body)
        return ready

    def results(self) -> Iterator[StoredResult]:
        """Each job's result, one by one."""

        def by_job(name: str, body: bytes) -> dict[tuple[str, str], StoredResult]:
            if is_columnar(body):
                raise ValueError(f"it holds columns, which processor {self._processor.name!r} does not read")
            header, jobs = batch_result_jobs(body)
            month = header["month"]
            try:
                return {(e["security"], e["date"]): StoredResult(month, e["security"], e["date"], e["counts"],
                                                                 e["data"]) for e in jobs}
            except (KeyError, TypeError) as exc:
                raise ValueError(f"its jobs are corrupt ({type(exc).__name__})") from None

        for key, batch in self._placed(by_job):
            result = batch[(key.security, key.date)]
            for column in self.counts:
                self.counts[column] += int(result.counts.get(column, 0))
            yield result

    def tables(self) -> Iterator[pa.Table]:
        """Results as tables of about `CHUNK_JOBS` consecutive jobs: month, security, date, the
        row counts, then the processor's columns; a (security, date) is never split."""
        pending: list[tuple[JobKey, pa.Table, int]] = []
        loose_from = 0  # where the entries not yet put together start
        loose: set[int] = set()  # their tables
        for key, (table, rows) in self._placed(self._opened_table):
            if len(pending) >= CHUNK_JOBS and (key.security, key.date) != (pending[-1][0].security,
                                                                          pending[-1][0].date):
                yield self._chunk(pending)
                pending, loose_from = [], 0
                loose.clear()
            pending.append((key, table, rows[(key.security, key.date)]))
            loose.add(id(table))  # unique: `pending` holds every one of them
            if len(loose) > LOOSE_TABLES:
                together = _in_order(pending[loose_from:])
                pending[loose_from:] = [(k, together, i) for i, (k, _, _) in enumerate(pending[loose_from:])]
                loose_from = len(pending)
                loose.clear()
        if pending:
            yield self._chunk(pending)

    def _opened_table(self, name: str, body: bytes) -> tuple[pa.Table, dict[tuple[str, str], int]]:
        """A batch object as a table of `security`, `date`, the counts and the processor's
        columns, and each job's row. JSON results (earlier versions) are turned into columns."""
        if is_columnar(body):
            _, table = batch_result_table(body)
        else:
            _, jobs = batch_result_jobs(body)
            as_columns = getattr(self._processor, "results_table", None)
            if as_columns is None:
                raise ValueError(f"it holds JSON results, which processor {self._processor.name!r} does not read")
            try:
                table = batch_result_columns(
                    [(job.get("job_id", ""), job["security"], job["date"]) for job in jobs],
                    [{name: int(job["counts"].get(name, 0)) for name in COUNT_COLUMNS} for job in jobs],
                    as_columns([job["data"] for job in jobs]),
                )
            except (KeyError, TypeError, ValueError, pa.ArrowException) as exc:
                raise ValueError(f"its jobs are corrupt ({type(exc).__name__})") from None
        table = table.drop_columns(["job_id"])
        securities, dates = table.column("security").to_pylist(), table.column("date").to_pylist()
        return table, {job: row for row, job in enumerate(zip(securities, dates, strict=True))}

    def _chunk(self, placed: list[tuple[JobKey, pa.Table, int]]) -> pa.Table:
        """The rows of `placed` jobs, in order (`_in_order`), with their month; counted."""
        chunk = _in_order(placed)
        for column in self.counts:
            self.counts[column] += int(pc.sum(chunk.column(column)).as_py() or 0)
        return chunk.add_column(0, "month", pa.array([key.month for key, _, _ in placed], pa.string()))


def _hold_newest(holder: npt.NDArray[np.int32], copies: list[tuple[str, str]], number: int,
                 positions: npt.NDArray[np.int64]) -> None:
    """Make object `number` the holder of the jobs at `positions` that no object holds yet or
    whose holder's copy is older than its own (`copies`: each object's (finished_at, name))."""
    held = holder[positions]
    replaces = held < 0
    if not replaces.all():  # some of these jobs are in objects read before
        earlier = np.unique(held[~replaces])
        newer = np.array([copies[number] > copies[h] for h in earlier.tolist()], dtype=bool)
        replaces[~replaces] = newer[np.searchsorted(earlier, held[~replaces])]
    holder[positions[replaces]] = number


def _in_order(placed: list[tuple[JobKey, pa.Table, int]]) -> pa.Table:
    """The rows of `placed` jobs, in order: each table's rows taken at once (the table itself
    when they are all of it, a slice where they are consecutive, the usual case), then put in
    the jobs' order where they were not (jobs of one security stored by passes over different
    dates interleave their tables)."""
    groups: dict[int, tuple[pa.Table, list[int], list[int]]] = {}
    for position, (_, table, row) in enumerate(placed):
        _, rows, positions = groups.setdefault(id(table), (table, [], []))
        rows.append(row)
        positions.append(position)
    parts = []
    where = np.empty(len(placed), dtype=np.int64)
    taken = 0
    for table, rows, positions in groups.values():
        if rows == list(range(rows[0], rows[0] + len(rows))):
            parts.append(table if len(rows) == table.num_rows else table.slice(rows[0], len(rows)))
        else:
            parts.append(table.take(pa.array(rows)))
        where[positions] = np.arange(taken, taken + len(rows))
        taken += len(rows)
    together = pa.concat_tables(parts).combine_chunks()
    if not np.array_equal(where, np.arange(len(placed))):
        together = together.take(pa.array(where))
    return together


def _rows_unassigned(manifest: dict[str, Any]) -> int:
    return sum(int(m.get("rows_unassigned", 0)) for m in manifest.get("months", {}).values())


def _key_json(key: JobKey, run_id: str) -> dict[str, str]:
    return {"job_id": f"{run_id}:{key.month}:{key.security}:{key.date}", "month": key.month,
            "security": key.security, "date": key.date}


def aggregate_run(storage: Storage, run_id: str, state: RunState | None = None) -> AggregateResult:
    """Write the run's tables and ``summary.json`` from its stored results."""
    started = time.perf_counter()
    layout = RunLayout(run_id)
    manifest = read_manifest(storage, layout)
    state = state or load_state(storage, layout)
    request = manifest["request"]
    params = JobParams.from_json_data(request["params"])
    processor = get_processor(request["processor"])
    reader = _ResultReader(storage, layout, state.succeeded, processor)
    sink = TableSink(storage, layout.aggregates)
    # Processors that fold columns say so with `aggregate_tables` (see `shared.processors.base`).
    aggregate_tables = getattr(processor, "aggregate_tables", None)
    if aggregate_tables is not None:
        totals = aggregate_tables(reader.tables(), params, sink)
    else:
        totals = processor.aggregate(reader.results(), params, sink)
    unassigned = _rows_unassigned(manifest)
    dead_records = _dead_details(storage, layout, state.dead, run_id)
    summary = {
        "run_id": run_id,
        "tickq_version": manifest.get("tickq_version"),
        "parameters": request,
        "jobs_expected": len(state.expected),
        "jobs_succeeded": len(state.succeeded),
        "jobs_dead": len(state.dead),
        "jobs_missing": len(state.missing),
        "complete": state.complete,
        "dead_jobs": dead_records,
        "missing_jobs": [_key_json(k, run_id) for k in itertools.islice(state.missing, 1000)],
        "rows_read": reader.counts["rows_read"] + unassigned,
        "rows_accepted": reader.counts["rows_accepted"],
        "rows_rejected": reader.counts["rows_rejected"] + unassigned,
        "rows_filtered": reader.counts["rows_filtered"],
        "rows_unassigned": unassigned,
        "totals": totals,
        "created_at": manifest.get("created_at"),
        "aggregated_at": dt.datetime.now(dt.UTC).isoformat(),
        "wall_time_s": _wall_time(manifest.get("created_at")),
        "aggregate_duration_s": round(time.perf_counter() - started, 3),
        "tables": sink.written,
    }
    # summary.json is written last: its presence means every table is complete.
    storage.write_bytes(
        f"{layout.aggregates}/summary.json", json.dumps(summary, indent=2, default=str).encode(), "application/json"
    )
    get_logger(run_id=run_id).info(
        "aggregate.written",
        jobs_merged=len(state.succeeded),
        jobs_dead=len(state.dead),
        complete=state.complete,
        tables=len(sink.written),
        duration_s=summary["aggregate_duration_s"],
    )
    return AggregateResult(
        run_id=run_id,
        complete=state.complete,
        expected=len(state.expected),
        succeeded=len(state.succeeded),
        dead=len(state.dead),
        missing=len(state.missing),
        tables=list(sink.written),
        summary=summary,
    )


def _wall_time(created_at: str | None) -> float | None:
    if not created_at:
        return None
    return round((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created_at)).total_seconds(), 3)


def _dead_details(storage: Storage, layout: RunLayout, keys: Iterable[JobKey], run_id: str) -> list[dict[str, Any]]:
    details = []
    for key in keys:
        entry: dict[str, Any] = _key_json(key, run_id)
        try:
            record = json.loads(storage.read_bytes(layout.dead(key)))
            entry.update({k: record.get(k) for k in ("error_class", "error", "attempts", "failed_at")})
        except (PermanentError, json.JSONDecodeError):
            pass
        details.append(entry)
    return details
