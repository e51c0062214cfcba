"""A batch's part in the passes over a month without an index (`worker.ahead`): the parts it
claims, computed and stored whole, and the parts it waits for."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from shared.errors import PermanentError
from shared.inputs import DayWindow, InputFile, ParquetCache, pass_share, read_units
from shared.layout import JobKey, RunLayout, read_month_job_keys
from shared.messages import JobMessage
from shared.metrics import get_logger
from shared.processors import Processor
from shared.readahead import read_ahead
from shared.storage import Storage
from worker.ahead import (
    MonthPasses,
    claim_month,
    month_done,
    month_parts,
    release_month,
    renewing_claim,
    wait_for_month,
)
from worker.compute import compute_jobs, open_reads, start_accumulators
from worker.listings import MonthListings
from worker.outcome import JobOutcome
from worker.results import done_job_ids, jobs_not_done, month_records_to_clear, store_results

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
# A month whose securities' rows lie in a few percent of it each may still be no month for
# batches to read their own: sorted by security within each day (daily files, or a month file
# in date order), a security's rows are one piece a day, and a batch of some securities reads
# a row group or two of every day. Where batches of a worker's default size (its prefetch of
# 1,024 jobs a slot, in halves) reading for themselves would read the month more than
# REREAD_LIMIT times over, passes compute it in parts, as a month in time order.
TYPICAL_BATCH_JOBS = 512
REREAD_LIMIT = 2.0


@dataclass(frozen=True)
class MonthPass:
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


def month_pass_columns(
    month: MonthPass, jobs: list[JobMessage], outcomes: list[JobOutcome]
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
        done = done_job_ids(output, layout, [jobs[i] for i in left])
        for i in left:
            outcomes[i].already_done = jobs[i].job_id in done
        left = [i for i in left if jobs[i].job_id not in done]
    if left:
        tables.append(_pass_columns(month.processor, [jobs[i] for i in left], [outcomes[i] for i in left],
                                    month.source, month.files, output, month.listings, month.batch_rows))
        positions += left
    return positions, pa.concat_tables(tables) if tables else None


def _claimed_pass(month: MonthPass, jobs: list[JobMessage], outcomes: list[JobOutcome],
                  part: _Part) -> pa.Table | None:
    """The pass over a part of the month this batch claimed: it stores the results of the
    part's other jobs not done yet, marks the part done and returns the columns of the batch's
    own jobs in the part (None: the part had nothing left to compute); a pass that fails
    releases its claim."""
    first, output, layout = jobs[0], month.output, month.layout
    own, own_outcomes = [jobs[i] for i in part.own], [outcomes[i] for i in part.own]
    try:
        extra = jobs_not_done(output, layout, _messages(first, part.others))  # a resumed run keeps what it stored
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
    # The jobs stored ahead report here what their pass read, wrote and spent: their own
    # messages find them done.
    ahead = JobOutcome.total(extra_outcomes)
    before = outcomes[0].rows_ahead
    outcomes[0].rows_ahead = (before[0] + ahead.rows_read, before[1] + ahead.rows_accepted,
                              before[2] + ahead.rows_rejected)
    get_logger().info("worker.month_pass", run_id=first.run_id, month=first.month, part=part.index, batch=len(own),
                      ahead=len(extra), rows_in=ahead.rows_read, rows_out=ahead.rows_accepted,
                      rows_rejected=ahead.rows_rejected, rows_filtered=ahead.rows_filtered, bytes_in=ahead.bytes_in,
                      bytes_out=ahead.bytes_out, stages={stage: round(s, 6) for stage, s in ahead.stages.items()})
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
    accumulators = start_accumulators(processor, jobs, output)
    reads = open_reads(jobs, source, files, listings, batch_rows, whole_part)
    if whole_part:
        reads = [(read_ahead(batches), counter) for batches, counter in reads]
    compute_jobs(processor, jobs, reads, accumulators, outcomes)
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
    stale = month_records_to_clear(output, layout, jobs[0].month) if jobs else set()
    for start in range(0, len(jobs), AHEAD_OBJECT_JOBS):
        chunk = jobs[start:start + AHEAD_OBJECT_JOBS]
        failures = store_results(processor, chunk, [], outcomes[start:start + len(chunk)], output, layout, stale,
                                 worker_id, now, columns.slice(start, len(chunk)))
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
    try:
        keys = read_month_job_keys(output, layout, first.month)
    except PermanentError as exc:  # only the shortcut is lost: the batch's own jobs go on
        get_logger().warning("worker.month_keys_unreadable", month=first.month, error=str(exc))
        return []
    if not keys:  # removed since, or none
        return []
    # Whether the month is laid out by security, not what this batch's own pass would read:
    # on a month in time order, a first batch of a few dates reads part of it, but the run's
    # jobs read all of it, and passes for them all are the least the run can read.
    by_security = (pass_share(source, files, [first.security], None, listings.parquet) < AHEAD_FROM_SHARE
                   and _batch_reads(source, files, keys, listings.parquet) <= REREAD_LIMIT)
    if by_security and not _units_too_large(source, files, listings.parquet, len(keys)):
        passes.note_never_claimed(run_month)  # each batch reads its own row groups, wasting little
        return []
    by_date = not by_security and pass_share(
        source, files, [first.security], DayWindow.of(dt.date.fromisoformat(min(k.date for k in keys)),
                                                      first.params.market_tz), listings.parquet) <= BY_DATE_SHARE
    position = {(job.security, job.date): i for i, job in enumerate(jobs)}  # distinct (`execute_batch`)
    parts = []
    rows = read_units(source, files, listings.parquet)[1]
    for index, keys_of_part in enumerate(month_parts(keys, by_date, by_security, rows)):
        own = [position[k.security, k.date] for k in keys_of_part if (k.security, k.date) in position]
        others = [k for k in keys_of_part if (k.security, k.date) not in position]
        if others:
            parts.append(_Part(index, own, others))
    # The parts holding the batch's jobs first; then the others, which the batch claims where no
    # one has, rather than wait idle for the passes over its own (a small batch of a few dates).
    return sorted(parts, key=lambda part: not part.own)


def _batch_reads(source: Storage, files: list[InputFile], keys: list[JobKey], cache: ParquetCache) -> float:
    """How many times over batches of `TYPICAL_BATCH_JOBS` of the month's `keys` (in key order,
    security by security) would read it, each reading for itself: its first batch's share of
    the month, once per batch."""
    batch = keys[:TYPICAL_BATCH_JOBS]
    share = pass_share(source, files, sorted({key.security for key in batch}), None, cache)
    return share * len(keys) / len(batch)


def _units_too_large(source: Storage, files: list[InputFile], cache: ParquetCache, jobs: int) -> bool:
    """Whether the row groups (or CSV slices) of a month laid out by security, of `jobs` jobs,
    are too large for batches to read their own: kept by no cache between batches, and holding
    more than `BY_SECURITY_UNIT_JOBS` jobs each."""
    units, rows = read_units(source, files, cache)
    return rows > units * cache.max_group_rows and jobs > units * BY_SECURITY_UNIT_JOBS


def _messages(first: JobMessage, keys: list[JobKey]) -> list[JobMessage]:
    """The messages of the jobs of `keys`, in `first`'s run, month and parameters."""
    return [first.sibling(key.security, key.date) for key in keys]
