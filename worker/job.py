"""Executing one job: read its slice of the month, filter, compute, upload the result.

Runs on a worker thread, never on the broker connection's event loop. Data flows one way:
month files (or, for a small batch, its jobs' day files) → bounded batches of the job's
security → normalised rows of the job's trade date → run filters → processor → one result
object per batch, then each job's success marker, written last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.dayfiles import DayFiles, day_file_key, day_file_table, read_day_file, read_manifest
from shared.errors import PermanentError
from shared.inputs import (
    ALL_COLUMNS,
    ByteCounter,
    DayWindow,
    InputFile,
    ParquetCache,
    label_codes,
    month_files,
    normalise,
    pass_share,
    read_batches,
    read_units,
    with_stored_slices,
)
from shared.layout import (
    ARROW_STREAM_TYPE,
    COUNT_COLUMNS,
    JobKey,
    RunLayout,
    batch_result_body,
    batch_result_table_body,
    read_month_job_keys,
)
from shared.messages import JobMessage, JobParams
from shared.metrics import get_logger
from shared.processors import JobAccumulator, JobContext, Processor, get_processor
from shared.readahead import read_ahead
from shared.storage import Storage, open_storage
from worker.ahead import (
    MonthPasses,
    claim_month,
    month_done,
    month_parts,
    release_month,
    renewing_claim,
    wait_for_month,
)
from worker.chaos import maybe_kill

_T = TypeVar("_T")

MONTH_LISTING_TTL_S = 60.0
EPOCH = dt.date(1970, 1, 1)
NO_DAY = np.iinfo(np.int32).min
# A month where the rows of any one security lie in (nearly) all of its bytes is computed in one
# pass for all of its jobs (`worker.ahead`); on a month laid out by security a batch reads a few
# percent of it.
AHEAD_FROM_SHARE = 0.9
# Such a month is split by date (`worker.ahead.month_parts`) when a pass over its first date
# reads at most this share of it: it is in time order.
BY_DATE_SHARE = 0.5
# A month laid out by security is computed in parts of whole securities too when its row groups
# (or CSV slices) are too large to keep between batches and hold more than this many of its
# jobs each: a batch's own pass, of up to 512 jobs, would decode about as many of its
# neighbours' rows at its ends as of its own, and the next batch decode them again (pyarrow's
# default row group holds 1 Mi rows, the jobs of 25 securities of a 20 M-row month).
BY_SECURITY_UNIT_JOBS = 256
# Batches of up to this many jobs read the jobs' day files, where the month has them
# (`shared.dayfiles`), rather than the row groups holding the jobs: a day file costs a request
# and about 0.15 ms to decode, a 128 k-row group is shared by dozens of jobs.
DAY_FILE_JOBS = 8


@dataclass
class JobOutcome:
    """What a finished job reports: counts, bytes and per-stage durations."""

    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rows_filtered: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    files: int = 0
    already_done: bool = False
    # Rows (read, accepted, rejected) of the jobs this job's pass stored ahead of their
    # messages (`worker.ahead`): the worker counts them once, here, not when those come.
    rows_ahead: tuple[int, int, int] = (0, 0, 0)
    stages: dict[str, float] = field(default_factory=dict)

    def time(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage`."""
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class _Timer:
    def __init__(self, outcome: JobOutcome, stage: str) -> None:
        self._outcome, self._stage = outcome, stage

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._outcome.time(self._stage, time.perf_counter() - self._start)


_Month = tuple[str, str]  # (store, month)


class MonthListings:
    """Caches month file listings, so many jobs of one month list its files once, and what
    passes over those files can share: footers and row groups (`ParquetCache`, forgotten
    whenever a listing is renewed) and the passes that compute a whole month (`MonthPasses`)."""

    def __init__(self, ttl_s: float = MONTH_LISTING_TTL_S, passes: MonthPasses | None = None) -> None:
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._files: dict[_Month, tuple[float, list[InputFile]]] = {}
        self._days: dict[_Month, tuple[float, DayFiles | None]] = {}
        self._slices: dict[_Month, tuple[float, bytes | None]] = {}
        self.parquet = ParquetCache()
        # Whole-month passes that store jobs ahead of their messages; only worth it for a
        # process that serves many batches (a worker), not for one job on its own.
        self.passes = passes

    def files(self, storage: Storage, month: str) -> list[InputFile]:
        """The month's input files (from cache when fresh)."""

        def listed() -> list[InputFile]:
            files = month_files(storage, month)
            self.parquet.clear()
            return files

        return self._fresh(self._files, (storage.uri, month), listed)

    def day_files(self, storage: Storage, month: str) -> DayFiles | None:
        """The month's day files (`shared.dayfiles`), None when it has none; from cache when fresh."""
        return self._fresh(self._days, (storage.uri, month), lambda: read_manifest(storage, month))

    def with_slices(self, output: Storage, layout: RunLayout, month: str, files: list[InputFile]) -> list[InputFile]:
        """`files` with the slices the run's discovery recorded of those that are not Parquet,
        where it did (`shared.inputs.FileSlice`; the stored record from cache when fresh)."""

        def load() -> bytes | None:
            key = layout.month_slices(month)
            return output.read_bytes(key) if output.exists(key) else None

        stored = self._fresh(self._slices, (output.describe(layout.root), month), load)
        if stored is None:
            return files
        try:
            return with_stored_slices(files, stored)
        except PermanentError as exc:  # only the shortcut is lost: the files are read whole
            get_logger().warning("worker.slices_unreadable", month=month, error=str(exc))
            return files

    def _fresh(self, cache: dict[_Month, tuple[float, _T]], key: _Month, load: Callable[[], _T]) -> _T:
        now = time.monotonic()
        with self._lock:
            hit = cache.get(key)
            if hit and now - hit[0] < self._ttl:
                return hit[1]
        value = load()
        with self._lock:
            cache[key] = (now, value)
        return value


def run_filter_mask(rows: pa.Table, params: JobParams) -> pa.Array | None:
    """Rows the run's filters keep (None when the run has no filters).

    A null participant or venue never matches a filter list.
    """
    masks: list[pa.Array] = []
    if params.participants is not None:
        masks.append(pc.is_in(rows.column("participant"), value_set=pa.array(params.participants)))
    if params.venues is not None:
        masks.append(pc.is_in(rows.column("venue"), value_set=pa.array(params.venues)))
    session = params.session_minutes
    if session is not None:
        minute = rows.column("minute_of_day")
        start, end = session
        after_start, before_end = pc.greater_equal(minute, start), pc.less(minute, end)
        # A session that wraps past midnight keeps both ends of the day.
        masks.append(pc.and_(after_start, before_end) if start < end else pc.or_(after_start, before_end))
    if params.min_size is not None:
        masks.append(pc.greater_equal(rows.column("size"), params.min_size))
    if params.max_size is not None:
        masks.append(pc.less_equal(rows.column("size"), params.max_size))
    if not masks:
        return None
    mask = masks[0]
    for extra in masks[1:]:
        mask = pc.and_(mask, extra)
    return pc.fill_null(mask, False)


@dataclass(frozen=True)
class BatchKey:
    """Jobs that can share one pass over their month: same run, input, month and parameters."""

    run_id: str
    input: str
    output: str
    month: str
    processor: str
    params: JobParams  # frozen: equal parameters hash alike, however they were parsed

    @classmethod
    def of(cls, job: JobMessage) -> BatchKey:
        """The batch a job belongs to."""
        return cls(job.run_id, job.input, job.output, job.month, job.processor, job.params)


class _Slots:
    """Maps rows to the jobs of a batch by (security, trade_date), vectorised."""

    def __init__(self, jobs: list[JobMessage]) -> None:
        self.securities = pa.array(sorted({j.security for j in jobs}), pa.string())
        days = sorted({(j.trade_date - EPOCH).days for j in jobs})
        self.first_day, self.span = days[0], days[-1] - days[0] + 1
        # Each day of the jobs' span (a month's jobs span a few dozen days) to its column of the
        # table; a day of no job, inside the span or outside it (the extra last entry), to the
        # table's extra last column.
        self.day_column = np.full(self.span + 1, len(days), dtype=np.int64)
        for column, day in enumerate(days):
            self.day_column[day - self.first_day] = column
        # (security, day) cells, row by row; the extra last row and column stay -1: rows of
        # another security or day, or of none.
        self.width = len(days) + 1
        self.table = np.full((len(self.securities) + 1) * self.width, -1, dtype=np.int64)
        row_of = {s: i for i, s in enumerate(self.securities.to_pylist())}
        for slot, job in enumerate(jobs):
            column = self.day_column[(job.trade_date - EPOCH).days - self.first_day]
            self.table[row_of[job.security] * self.width + column] = slot
        self.count = len(jobs)

    def of(self, rows: pa.Table) -> np.ndarray:
        """Each row's job slot, -1 for rows of no job in the batch."""
        codes, values = label_codes(rows.column("security"))
        # Where each distinct security's row of the table starts (the extra last row if it
        # is none of the batch's, as for a null one).
        found = pc.index_in(values, value_set=self.securities).fill_null(len(self.securities))
        row_start = np.append(found.to_numpy(zero_copy_only=False), len(self.securities)) * self.width
        days = rows.column("trade_date").combine_chunks()
        # A null date becomes a day no job can have (jobs' dates are years 1 to 9999).
        day = days.cast(pa.int32()).fill_null(NO_DAY).to_numpy(zero_copy_only=False).astype(np.int64)
        # Days before the span wrap to huge unsigned offsets: they and those after it take the
        # extra last entry.
        offset = np.minimum((day - self.first_day).view(np.uint64), self.span)
        slots: np.ndarray = self.table[row_start[codes] + self.day_column[offset]]
        return slots

    def counts(self, slots: np.ndarray) -> np.ndarray:
        """Rows per slot (rows of slot -1 are no job's)."""
        return np.bincount(slots + 1, minlength=self.count + 1)[1:]


def _split_by_slot(rows: pa.Table, slots: np.ndarray) -> Iterator[tuple[int, pa.Table]]:
    """Contiguous per-job slices of `rows` (every slot >= 0)."""
    order = np.argsort(slots, kind="stable")
    ordered = rows.take(pa.array(order))
    sorted_slots = slots[order]
    bounds = np.flatnonzero(np.diff(sorted_slots)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(sorted_slots)]))
    for begin, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(sorted_slots[begin]), ordered.slice(begin, end - begin)


def _batch_window(jobs: list[JobMessage]) -> DayWindow:
    tz = jobs[0].params.market_tz
    first = DayWindow.of(min(j.trade_date for j in jobs), tz)
    last = DayWindow.of(max(j.trade_date for j in jobs), tz)
    return DayWindow(first.start_ns, last.end_ns)


_Reads = list[tuple[Iterator[pa.RecordBatch], ByteCounter]]


def _reads(jobs: list[JobMessage], source: Storage, files: list[InputFile], listings: MonthListings,
           batch_rows: int, whole_part: bool = False) -> _Reads:
    """What a pass for `jobs` reads, one (batches, bytes counter) per object read: the jobs'
    day files for a small batch of a month that has them, else the month's files (only the row
    groups that may hold the jobs' rows). A pass over a `whole_part` of a month keeps none of
    the row groups it decodes for the next batch."""
    first = jobs[0]
    if len(jobs) <= DAY_FILE_JOBS:
        days = listings.day_files(source, first.month)
        if days is not None and days.serve(first.params.market_tz, files):
            counter = ByteCounter()
            return [(_day_file_batches(source, jobs, batch_rows, counter), counter)]
    reads: _Reads = []
    window = _batch_window(jobs)
    cache = listings.parquet.sharing_footers() if whole_part else listings.parquet
    for file in files:
        counter = ByteCounter()
        reads.append((read_batches(source, file, ALL_COLUMNS, security=[j.security for j in jobs], window=window,
                                   batch_rows=batch_rows, counter=counter, cache=cache), counter))
    return reads


def _day_file_batches(source: Storage, jobs: list[JobMessage], batch_rows: int,
                      counter: ByteCounter) -> Iterator[pa.RecordBatch]:
    """The rows of `jobs`' day files, fetched together (read when first asked for)."""
    keys = [day_file_key(job.month, job.security, job.date) for job in jobs]
    bodies: list[bytes | None] = [None] * len(keys)

    def fetch(i: int) -> None:
        bodies[i] = read_day_file(source, keys[i])

    for failure in _each(source, fetch, range(len(keys))):
        if failure is not None:
            raise failure
    tables = [day_file_table(source, key, body) for key, body in zip(keys, bodies, strict=True) if body is not None]
    counter.bytes += sum(len(body) for body in bodies if body is not None)
    if tables:
        rows = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
        yield from rows.to_batches(max_chunksize=batch_rows)


def _compute(
    processor: Processor,
    jobs: list[JobMessage],
    reads: _Reads,
    accumulators: list[JobAccumulator],
    outcomes: list[JobOutcome],
) -> None:
    """One pass over what `reads` gives (`_reads`) serves every job of the batch."""
    params = jobs[0].params
    slots_of = _Slots(jobs)
    # Processors that can take many jobs' rows at once (vectorised) say so with `add_many`.
    add_many = getattr(processor, "add_many", None)
    share = 1.0 / len(jobs)
    bytes_in = 0
    stage = {"read": 0.0, "filter": 0.0, "compute": 0.0}
    counts = {name: np.zeros(len(jobs), dtype=np.int64) for name in ("read", "rejected", "filtered", "accepted")}
    for batches, counter in reads:
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            stage["read"] += time.perf_counter() - start
            if batch is None:
                break
            start = time.perf_counter()
            rows, valid = normalise(batch, params.market_tz)
            slots = slots_of.of(rows)
            read = accepted = slots_of.counts(slots)
            keep = slots >= 0
            valid_np = valid.to_numpy(zero_copy_only=False)
            if not valid_np.all():
                keep &= valid_np
                accepted = slots_of.counts(np.where(keep, slots, -1))
                counts["rejected"] += read - accepted
            mask = run_filter_mask(rows, params)
            if mask is not None:
                keep &= mask.to_numpy(zero_copy_only=False)
                passed = slots_of.counts(np.where(keep, slots, -1))
                counts["filtered"] += accepted - passed
                accepted = passed
            counts["read"] += read
            counts["accepted"] += accepted
            stage["filter"] += time.perf_counter() - start
            if not keep.any():
                continue
            start = time.perf_counter()
            kept = rows if keep.all() else rows.filter(pa.array(keep))
            if add_many is not None:
                add_many(accumulators, kept, slots[keep])
            else:
                for slot, part in _split_by_slot(kept, slots[keep]):
                    accumulators[slot].add(part)
            stage["compute"] += time.perf_counter() - start
        bytes_in += counter.bytes
    for i, outcome in enumerate(outcomes):
        outcome.rows_read += int(counts["read"][i])
        outcome.rows_rejected += int(counts["rejected"][i])
        outcome.rows_filtered += int(counts["filtered"][i])
        outcome.rows_accepted += int(counts["accepted"][i])
        outcome.files = len(reads)
        outcome.bytes_in = int(bytes_in * share)
        for name, seconds in stage.items():
            outcome.time(name, seconds * share)


_requests_lock = threading.Lock()
_requests: ThreadPoolExecutor | None = None


def _each(storage: Storage, call: Callable[[_T], None], items: Sequence[_T]) -> list[Exception | None]:
    """`call` on every item, and what each raised (None: done). On a store whose requests wait
    on the network, up to its `parallel_requests` are in flight at once: a batch's markers and
    listings would otherwise cost one round trip each, end to end."""

    def outcome(item: _T) -> Exception | None:
        try:
            call(item)
            return None
        except Exception as exc:  # reported per item: the caller decides what fails
            return exc

    if storage.parallel_requests <= 1 or len(items) <= 1:
        return [outcome(item) for item in items]
    global _requests
    with _requests_lock:
        if _requests is None:
            _requests = ThreadPoolExecutor(max_workers=storage.parallel_requests, thread_name_prefix="tickq-store")
    return list(_requests.map(outcome, items))


def _listed(output: Storage, prefixes: tuple[str, ...], jobs: list[JobMessage]) -> set[str]:
    """Keys under each of `prefixes` for the batch's securities: one listing per (prefix,
    security), not per job."""
    month = jobs[0].month
    securities = sorted({j.security for j in jobs})
    return _keys_under(output, [f"{prefix}{month}/{security}/" for prefix in prefixes for security in securities])


def _keys_under(output: Storage, prefixes: list[str]) -> set[str]:
    """Every key under any of `prefixes`, their listings all in flight together where the store
    allows."""
    found: set[str] = set()
    lock = threading.Lock()

    def list_prefix(prefix: str) -> None:
        keys = set(output.keys(prefix))
        with lock:
            found.update(keys)

    for failure in _each(output, list_prefix, prefixes):
        if failure is not None:
            raise failure
    return found


def _already_done(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> set[str]:
    """Job ids of the batch whose success marker exists."""
    keys = {j.job_id: layout.marker(JobKey(j.month, j.security, j.date)) for j in jobs}
    if len(jobs) == 1:
        return {job_id for job_id, key in keys.items() if output.exists(key)}
    listed = _listed(output, (layout.succeeded_prefix,), jobs)
    return {job_id for job_id, key in keys.items() if key in listed}


def _not_done(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> list[JobMessage]:
    """`jobs` (of one month) without a success marker, from one listing of the month's markers."""
    done = set(output.keys(f"{layout.succeeded_prefix}{jobs[0].month}/"))
    return [j for j in jobs if layout.marker(JobKey(j.month, j.security, j.date)) not in done]


def _records_to_clear(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> set[str]:
    """Dead and retry records of the batch's securities: a job that now succeeds clears its own."""
    return _listed(output, (layout.dead_prefix, layout.retrying_prefix), jobs)


def _month_records_to_clear(output: Storage, layout: RunLayout, month: str) -> set[str]:
    """Every dead and retry record of `month`: two listings for the thousands of jobs a pass
    stores ahead, where such records are few (one listing per security made thousands, each a
    request on S3)."""
    return _keys_under(output, [f"{layout.dead_prefix}{month}/", f"{layout.retrying_prefix}{month}/"])


BatchResult = JobOutcome | BaseException


def execute_batch(
    jobs: list[JobMessage],
    *,
    s3_endpoint_url: str | None,
    worker_id: str,
    listings: MonthListings,
    batch_rows: int = 65_536,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> list[BatchResult]:
    """Compute jobs of one `BatchKey` in one pass; store their results, then each marker.

    Returns, per job, its outcome or the exception that failed it. Idempotent: a job whose
    success marker already exists is not computed again, and a job the batch holds twice (a
    message published again while the first copy was still queued) is computed once: its
    later copies find it done, as they would in a later batch. Never acks anything itself.
    """
    distinct = list({job.job_id: job for job in jobs}.values())
    results = _execute_distinct(distinct, s3_endpoint_url, worker_id, listings, batch_rows, now)
    if len(distinct) == len(jobs):
        return results
    by_id = {job.job_id: result for job, result in zip(distinct, results, strict=True)}
    served: set[str] = set()
    repeated: list[BatchResult] = []
    for job in jobs:
        result = by_id[job.job_id]
        if job.job_id in served and isinstance(result, JobOutcome):
            result = JobOutcome(already_done=True)
        served.add(job.job_id)
        repeated.append(result)
    return repeated


def _execute_distinct(jobs: list[JobMessage], s3_endpoint_url: str | None, worker_id: str, listings: MonthListings,
                      batch_rows: int, now: Callable[[], dt.datetime]) -> list[BatchResult]:
    """`execute_batch` of jobs that are all different."""
    first = jobs[0]
    layout = RunLayout(first.run_id)
    outcomes = [JobOutcome() for _ in jobs]
    try:
        output = open_storage(first.output, s3_endpoint_url)
        start = time.perf_counter()
        done = _already_done(output, layout, jobs)
        for outcome in outcomes:
            outcome.time("check", (time.perf_counter() - start) / len(jobs))
        todo = [i for i, job in enumerate(jobs) if job.job_id not in done]
        for i, job in enumerate(jobs):
            outcomes[i].already_done = job.job_id in done
        if not todo:
            return list(outcomes)
        processor = get_processor(first.processor)
        source = open_storage(first.input, s3_endpoint_url)
        start = time.perf_counter()
        files = listings.with_slices(output, layout, first.month, listings.files(source, first.month))
        for i in todo:
            outcomes[i].time("list", (time.perf_counter() - start) / len(todo))
        todo_jobs = [jobs[i] for i in todo]
        finished: pa.Table | None = None
        if listings.passes is not None and hasattr(processor, "finish_batch"):
            month = _MonthPass(processor, source, files, output, layout, listings, listings.passes, batch_rows,
                               worker_id, now)
            order, finished = _month_pass_columns(month, todo_jobs, [outcomes[i] for i in todo])
            todo = [todo[i] for i in order]
            todo_jobs = [jobs[i] for i in todo]
            accumulators: list[JobAccumulator] = []
        else:
            accumulators = _start(processor, todo_jobs, output)
            _compute(processor, todo_jobs, _reads(todo_jobs, source, files, listings, batch_rows), accumulators,
                     [outcomes[i] for i in todo])
        if not todo:
            return list(outcomes)
        stale = _records_to_clear(output, layout, todo_jobs)
    except Exception as exc:  # the whole batch fails the same way
        return [exc if not outcomes[i].already_done else outcomes[i] for i in range(len(jobs))]

    results: list[BatchResult] = list(outcomes)
    for i, failure in zip(todo, _store(processor, todo_jobs, accumulators, [outcomes[i] for i in todo], output, layout,
                                       stale, worker_id, now, finished), strict=True):
        if failure is not None:
            results[i] = failure
    return results


def _start(processor: Processor, jobs: list[JobMessage], output: Storage) -> list[JobAccumulator]:
    """Accumulators for `jobs`, in order."""
    contexts = [JobContext(job=job, output=output) for job in jobs]
    # Processors whose jobs of one batch share state (vectorised) say so with `start_batch`.
    start_batch = getattr(processor, "start_batch", None)
    return start_batch(contexts) if start_batch else [processor.start_job(c) for c in contexts]


@dataclass(frozen=True)
class _MonthPass:
    """What a batch's passes over a month not laid out by security work with."""

    processor: Processor
    source: Storage
    files: list[InputFile]
    output: Storage
    layout: RunLayout
    listings: MonthListings
    passes: MonthPasses
    batch_rows: int
    worker_id: str
    now: Callable[[], dt.datetime]


def _month_pass_columns(
    month: _MonthPass, jobs: list[JobMessage], outcomes: list[JobOutcome]
) -> tuple[list[int], pa.Table | None]:
    """The result columns of `jobs` still to store (a columnar processor's), one row per job,
    and their positions in `jobs`. On a month not laid out by security, the batch claims each
    part of the month that no one has, and computes and stores all of that part's expected jobs
    not yet done in one pass; for the parts other workers claimed, it waits for their passes and
    then computes only its jobs they did not store (`worker.ahead`); those they did are marked
    already done. A part whose claim went stale while the batch waited (its worker died) or
    was released (its pass failed) is claimed by the batch, which makes the pass again."""
    first, output, layout = jobs[0], month.output, month.layout
    positions: list[int] = []
    tables: list[pa.Table] = []

    def pass_if_claimed(part: _Part) -> bool:
        with month.passes.widening():  # one claimed pass at a time in a process, claimed when it can start
            claimed = claim_month(output, layout, first.month, part.index, month.worker_id, month.passes)
            columns = _claimed_pass(month, jobs, outcomes, part) if claimed else None
            if columns is not None:
                tables.append(columns)
                positions.extend(part.own)
        return claimed

    waiting: list[_Part] = []
    for part in _month_parts(jobs, month.source, month.files, output, layout, month.listings, month.passes):
        if not pass_if_claimed(part) and part.own:
            waiting.append(part)
    for part in waiting:  # claimed elsewhere: their passes store these jobs too, most likely
        if not wait_for_month(output, layout, first.month, part.index):
            pass_if_claimed(part)  # the claim is gone or stale: its pass was not made
    covered = set(positions)
    left = [i for i in range(len(jobs)) if i not in covered]
    if waiting and left:
        done = _already_done(output, layout, [jobs[i] for i in left])
        for i in left:
            outcomes[i].already_done = jobs[i].job_id in done
        left = [i for i in left if jobs[i].job_id not in done]
    if left:
        tables.append(_pass_columns(month.processor, [jobs[i] for i in left], [outcomes[i] for i in left],
                                    month.source, month.files, output, month.listings, month.batch_rows))
        positions += left
    return positions, pa.concat_tables(tables) if tables else None


def _claimed_pass(month: _MonthPass, jobs: list[JobMessage], outcomes: list[JobOutcome],
                  part: _Part) -> pa.Table | None:
    """The pass over a part of the month this batch claimed: it stores the results of the
    part's other jobs not done yet, marks the part done and returns the columns of the batch's
    own jobs in the part (None: the part had nothing left to compute); a pass that fails
    releases its claim."""
    first, output, layout = jobs[0], month.output, month.layout
    own, own_outcomes = [jobs[i] for i in part.own], [outcomes[i] for i in part.own]
    try:
        extra = _not_done(output, layout, _messages(first, part.others))  # a resumed run keeps what it stored
        if not own and not extra:  # a part claimed only to help, all of it stored since
            month_done(output, layout, first.month, part.index, month.passes)
            return None
        extra_outcomes = [JobOutcome() for _ in extra]
        preparing = _prepare_markers(output, layout, extra)
        with renewing_claim(output, layout, first.month, part.index, month.worker_id):
            columns = _pass_columns(month.processor, own + extra, own_outcomes + extra_outcomes, month.source,
                                    month.files, output, month.listings, month.batch_rows, whole_part=True)
            preparing.join()
            _store_ahead(month.processor, extra, extra_outcomes, columns.slice(len(own)), output, layout,
                         month.worker_id, month.now)
        month_done(output, layout, first.month, part.index, month.passes)
    except BaseException:
        release_month(output, layout, first.month, part.index, month.passes)
        raise
    # The jobs stored ahead report their rows here: their own messages find them done.
    rows_in, rows_out, rejected = (sum(o.rows_read for o in extra_outcomes),
                                   sum(o.rows_accepted for o in extra_outcomes),
                                   sum(o.rows_rejected for o in extra_outcomes))
    before = outcomes[0].rows_ahead
    outcomes[0].rows_ahead = (before[0] + rows_in, before[1] + rows_out, before[2] + rejected)
    get_logger().info("worker.month_pass", run_id=first.run_id, month=first.month, part=part.index, batch=len(own),
                      ahead=len(extra), rows_in=rows_in, rows_out=rows_out)
    return columns.slice(0, len(own))


def _prepare_markers(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> threading.Thread:
    """Get the store ready for `jobs`' markers on a thread of its own (on a local disk, their
    folders are made while the pass computes, on a core it leaves idle)."""
    keys = [layout.marker(JobKey(job.month, job.security, job.date)) for job in jobs]

    def prepare() -> None:
        with contextlib.suppress(Exception):  # only a hint: storing the markers reports what fails
            output.prepare(keys)

    thread = threading.Thread(target=prepare, name="tickq-prepare-markers", daemon=True)
    thread.start()
    return thread


def _pass_columns(processor: Processor, jobs: list[JobMessage], outcomes: list[JobOutcome], source: Storage,
                  files: list[InputFile], output: Storage, listings: MonthListings, batch_rows: int,
                  whole_part: bool = False) -> pa.Table:
    """One pass computing `jobs`; their result columns, in order. A pass over a `whole_part`
    of a month decodes its input on a thread of its own, on a core it would leave idle."""
    accumulators = _start(processor, jobs, output)
    reads = _reads(jobs, source, files, listings, batch_rows, whole_part)
    if whole_part:
        reads = [(read_ahead(batches), counter) for batches, counter in reads]
    _compute(processor, jobs, reads, accumulators, outcomes)
    start = time.perf_counter()
    columns: pa.Table = processor.finish_batch(accumulators)  # type: ignore[attr-defined]
    for outcome in outcomes:
        outcome.time("compute", (time.perf_counter() - start) / len(outcomes))
    return columns


# Jobs per result object a pass over a month, or a part of one, stores for the jobs beyond its
# own batch (in key order). The aggregator walks a run's jobs security by security and keeps the
# objects that hold the next ones open: one per part of each month, so they are kept small.
AHEAD_OBJECT_JOBS = 512


def _store_ahead(processor: Processor, jobs: list[JobMessage], outcomes: list[JobOutcome], columns: pa.Table,
                 output: Storage, layout: RunLayout, worker_id: str, now: Callable[[], dt.datetime]) -> None:
    """Store the results of jobs computed ahead of their messages, as their own batches
    would have; raises what failed any of them."""
    stale = _month_records_to_clear(output, layout, jobs[0].month) if jobs else set()
    for start in range(0, len(jobs), AHEAD_OBJECT_JOBS):
        chunk = jobs[start:start + AHEAD_OBJECT_JOBS]
        failures = _store(processor, chunk, [], outcomes[start:start + len(chunk)], output, layout, stale, worker_id,
                          now, columns.slice(start, len(chunk)))
        failure = next((f for f in failures if f is not None), None)
        if failure is not None:
            raise failure


@dataclass(frozen=True)
class _Part:
    """A part of the month's expected jobs that holds some of a batch's: its number among the
    month's parts, the positions in the batch of the batch's jobs in it, and its other jobs."""

    index: int
    own: list[int]
    others: list[JobKey]


def _month_parts(
    jobs: list[JobMessage], source: Storage, files: list[InputFile], output: Storage, layout: RunLayout,
    listings: MonthListings, passes: MonthPasses,
) -> list[_Part]:
    """When the month is not laid out by security, or is in row groups too large for a batch:
    the parts of the month's expected jobs (`worker.ahead.month_parts`) that hold jobs besides
    the batch's, those holding some of the batch's first; else none."""
    first = jobs[0]
    # A month the producer found indexed (or a run of an earlier version) has no key file:
    # looked for once per worker, so that its batches skip the share below; so is a month
    # laid out for batches to read their own.
    run_month = (output.uri, first.run_id, first.month)
    if passes.never_claimed(run_month):
        return []
    if not output.exists(layout.month_job_keys(first.month)):
        passes.note_never_claimed(run_month)
        return []
    # Whether the month is laid out by security, not what this batch's own pass would read:
    # on a month in time order, a first batch of a few dates reads part of it, but the run's
    # jobs read all of it, and passes for them all are the least the run can read.
    by_security = pass_share(source, files, [first.security], None, listings.parquet) < AHEAD_FROM_SHARE
    try:
        keys = read_month_job_keys(output, layout, first.month)
    except PermanentError as exc:  # only the shortcut is lost: the batch's own jobs go on
        get_logger().warning("worker.month_keys_unreadable", month=first.month, error=str(exc))
        return []
    if not keys:  # removed since, or none
        return []
    if by_security and not _units_too_large(source, files, listings.parquet, len(keys)):
        passes.note_never_claimed(run_month)  # each batch reads its own row groups, wasting little
        return []
    by_date = not by_security and pass_share(
        source, files, [first.security], DayWindow.of(dt.date.fromisoformat(min(k.date for k in keys)),
                                                      first.params.market_tz), listings.parquet) <= BY_DATE_SHARE
    position = {(job.security, job.date): i for i, job in enumerate(jobs)}  # distinct (`execute_batch`)
    parts = []
    for index, keys_of_part in enumerate(month_parts(keys, by_date, by_security)):
        own = [position[k.security, k.date] for k in keys_of_part if (k.security, k.date) in position]
        others = [k for k in keys_of_part if (k.security, k.date) not in position]
        if others:
            parts.append(_Part(index, own, others))
    # The parts holding the batch's jobs first; then the others, which the batch claims where no
    # one has, rather than wait idle for the passes over its own (a small batch of a few dates).
    return sorted(parts, key=lambda part: not part.own)


def _units_too_large(source: Storage, files: list[InputFile], cache: ParquetCache, jobs: int) -> bool:
    """Whether the row groups (or CSV slices) of a month laid out by security, of `jobs` jobs,
    are too large for batches to read their own: kept by no cache between batches, and holding
    more than `BY_SECURITY_UNIT_JOBS` jobs each."""
    units, rows = read_units(source, files, cache)
    return rows > units * cache.max_group_rows and jobs > units * BY_SECURITY_UNIT_JOBS


def _messages(first: JobMessage, keys: list[JobKey]) -> list[JobMessage]:
    """The messages of the jobs of `keys`, in `first`'s run, month and parameters."""
    return [first.sibling(key.security, key.date) for key in keys]


def _job_counts(outcome: JobOutcome) -> dict[str, int]:
    return {name: getattr(outcome, name) for name in COUNT_COLUMNS}


def _json_results(
    header: dict[str, Any],
    jobs: list[JobMessage],
    accumulators: list[JobAccumulator],
    outcomes: list[JobOutcome],
    failures: list[Exception | None],
) -> tuple[list[int], bytes]:
    """The JSON batch result of the jobs whose `finish` succeeded (the others' failures are set)."""
    entries: list[dict[str, Any]] = []
    stored: list[int] = []
    for i, (job, accumulator, outcome) in enumerate(zip(jobs, accumulators, outcomes, strict=True)):
        try:
            with _Timer(outcome, "compute"):
                data = accumulator.finish()
        except Exception as exc:  # this job alone failed to finish
            failures[i] = exc
            continue
        entries.append({"job_id": job.job_id, "security": job.security, "date": job.date,
                        "counts": _job_counts(outcome), "data": data})
        stored.append(i)
    return stored, batch_result_body(header, entries) if entries else b""


def _store(
    processor: Processor,
    jobs: list[JobMessage],
    accumulators: list[JobAccumulator],
    outcomes: list[JobOutcome],
    output: Storage,
    layout: RunLayout,
    stale: set[str],
    worker_id: str,
    now: Callable[[], dt.datetime],
    finished: pa.Table | None = None,
) -> list[Exception | None]:
    """Write the batch's results as one object, then each job's success marker.

    Returns, per job, what failed it (None for a stored job). One object per batch rather than
    per job: a stored object costs a request (S3) or an inode (a local disk), a marker only a
    directory entry locally. A columnar processor's results are its `finish_batch` of the
    accumulators, or `finished` when they were taken already.
    """
    failures: list[Exception | None] = [None] * len(jobs)
    header = {"run_id": jobs[0].run_id, "month": jobs[0].month, "processor": jobs[0].processor,
              "worker": worker_id, "finished_at": now().isoformat()}
    # Processors whose results are columns say so with `finish_batch` (one row per job).
    finish_batch = getattr(processor, "finish_batch", None)
    if finish_batch is not None:
        start = time.perf_counter()
        try:
            columns = finished if finished is not None else finish_batch(accumulators)
            body = batch_result_table_body(header, [(job.job_id, job.security, job.date) for job in jobs],
                                           [_job_counts(outcome) for outcome in outcomes], columns)
        except Exception as exc:  # the batch's results cannot be taken: every job fails alike
            return [exc] * len(jobs)
        for outcome in outcomes:
            outcome.time("compute", (time.perf_counter() - start) / len(jobs))
        stored = list(range(len(jobs)))
        columnar = True
    else:
        stored, body = _json_results(header, jobs, accumulators, outcomes, failures)
        columnar = False
    if not stored:
        return failures
    first = jobs[stored[0]]
    maybe_kill("before-upload", [jobs[i].job_id for i in stored])
    start = time.perf_counter()
    try:
        output.write_bytes(layout.batch_result(first.month, first.security, first.date, columnar), body,
                           ARROW_STREAM_TYPE if columnar else "application/x-ndjson")
    except Exception as exc:  # nothing of the batch is stored: every job fails alike
        for i in stored:
            failures[i] = exc
        return failures

    def mark(i: int) -> None:
        job = jobs[i]
        key = JobKey(job.month, job.security, job.date)
        # The marker comes after the result: a marker always means a stored result.
        output.mark(layout.marker(key))
        for record in (layout.dead(key), layout.retrying(key)):
            if record in stale:
                output.delete(record)

    for i, failure in zip(stored, _each(output, mark, stored), strict=True):
        failures[i] = failure  # this job alone failed to store, or None
        outcomes[i].bytes_out = len(body) // len(stored)
    maybe_kill("after-upload", [jobs[i].job_id for i in stored])
    upload_s = (time.perf_counter() - start) / len(stored)
    for i in stored:
        outcomes[i].time("upload", upload_s)
    return failures


def execute_job(
    job: JobMessage,
    *,
    s3_endpoint_url: str | None,
    worker_id: str,
    listings: MonthListings,
    batch_rows: int = 65_536,
) -> JobOutcome:
    """One job on its own (`execute_batch` of one); raises what failed it."""
    [result] = execute_batch(
        [job], s3_endpoint_url=s3_endpoint_url, worker_id=worker_id, listings=listings, batch_rows=batch_rows
    )
    if isinstance(result, BaseException):
        raise result
    return result


def execute_isolated(body: bytes, s3_endpoint_url: str | None, worker_id: str, batch_rows: int) -> JobOutcome:
    """`execute_job` in a child process: a job that kills its process kills only this one."""
    from shared.messages import parse_job

    return execute_job(
        parse_job(body),
        s3_endpoint_url=s3_endpoint_url,
        worker_id=worker_id,
        listings=MonthListings(),
        batch_rows=batch_rows,
    )
