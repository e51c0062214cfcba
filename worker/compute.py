"""One pass over what a batch's jobs read: rows normalised, mapped to their jobs, filtered by
the run's parameters and handed to the processor, in bounded batches with no per-row Python."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shared.dayfiles import day_file_key, day_file_table, read_day_file
from shared.inputs import ALL_COLUMNS, ByteCounter, DayWindow, InputFile, label_codes, normalise, read_batches
from shared.messages import JobMessage, JobParams
from shared.processors import JobAccumulator, JobContext, Processor
from shared.storage import Storage
from worker.listings import MonthListings
from worker.outcome import JobOutcome
from worker.results import each_in_flight

EPOCH = dt.date(1970, 1, 1)
NO_DAY = np.iinfo(np.int32).min
# Batches of up to this many jobs read the jobs' day files, where the month has them
# (`shared.dayfiles`), rather than the row groups holding the jobs: a day file costs a request
# and about 0.15 ms to decode, a 128 k-row group is shared by dozens of jobs.
DAY_FILE_JOBS = 8


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


def batch_window(jobs: list[JobMessage]) -> DayWindow:
    """The UTC span of the market days of `jobs`, from the first day's start to the last day's end."""
    return _span([j.trade_date for j in jobs], jobs[0].params.market_tz)


def security_windows(jobs: list[JobMessage]) -> dict[str, DayWindow]:
    """`batch_window` of each security's jobs in `jobs`: a batch that ends or begins within a
    security's days reads only the row groups of its own days of that security."""
    days: dict[str, list[dt.date]] = {}
    for job in jobs:
        days.setdefault(job.security, []).append(job.trade_date)
    return {security: _span(own, jobs[0].params.market_tz) for security, own in days.items()}


def _span(days: list[dt.date], market_tz: str) -> DayWindow:
    """From the start of the first of `days` to the end of the last, in `market_tz`."""
    return DayWindow.spanning(min(days), max(days), market_tz)


# What a pass reads: one (batches, bytes counter) per object read.
Reads = list[tuple[Iterator[pa.RecordBatch], ByteCounter]]


def open_reads(jobs: list[JobMessage], source: Storage, files: list[InputFile], listings: MonthListings,
           batch_rows: int, whole_part: bool = False) -> Reads:
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
    reads: Reads = []
    window, own_windows = batch_window(jobs), security_windows(jobs)
    cache = listings.parquet.sharing_footers() if whole_part else listings.parquet
    for file in files:
        counter = ByteCounter()
        reads.append((read_batches(source, file, ALL_COLUMNS, security=[j.security for j in jobs], window=window,
                                   batch_rows=batch_rows, counter=counter, cache=cache,
                                   security_windows=own_windows), counter))
    return reads


def _day_file_batches(source: Storage, jobs: list[JobMessage], batch_rows: int,
                      counter: ByteCounter) -> Iterator[pa.RecordBatch]:
    """The rows of `jobs`' day files, fetched together (read when first asked for)."""
    keys = [day_file_key(job.month, job.security, job.date) for job in jobs]
    bodies: list[bytes | None] = [None] * len(keys)

    def fetch(i: int) -> None:
        bodies[i] = read_day_file(source, keys[i])

    for failure in each_in_flight(source, fetch, range(len(keys))):
        if failure is not None:
            raise failure
    tables = [day_file_table(source, key, body) for key, body in zip(keys, bodies, strict=True) if body is not None]
    counter.bytes += sum(len(body) for body in bodies if body is not None)
    if tables:
        rows = pa.concat_tables(tables).unify_dictionaries().combine_chunks()
        yield from rows.to_batches(max_chunksize=batch_rows)


def compute_jobs(
    processor: Processor,
    jobs: list[JobMessage],
    reads: Reads,
    accumulators: list[JobAccumulator],
    outcomes: list[JobOutcome],
) -> None:
    """One pass over what `reads` gives (`open_reads`) serves every job of the batch."""
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


def start_accumulators(processor: Processor, jobs: list[JobMessage], output: Storage) -> list[JobAccumulator]:
    """Accumulators for `jobs`, in order."""
    contexts = [JobContext(job=job, output=output) for job in jobs]
    # Processors whose jobs of one batch share state (vectorised) say so with `start_batch`.
    start_batch = getattr(processor, "start_batch", None)
    return start_batch(contexts) if start_batch else [processor.start_job(c) for c in contexts]
