"""Executing a batch of jobs of one month: read their slice of the month, filter, compute,
upload the results.

Runs on a worker thread, never on the broker connection's event loop. Data flows one way:
month files (or, for a small batch, its jobs' day files) → bounded batches of the jobs'
securities → normalised rows of the jobs' trade dates → run filters → processor
(`worker.compute`) → one result object per batch, then each job's success marker, written
last (`worker.results`). A month without an index is computed in whole parts that batches
claim (`worker.passes`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from shared.layout import RunLayout
from shared.messages import JobMessage, JobParams
from shared.processors import JobAccumulator, get_processor
from shared.storage import open_storage
from worker.compute import compute_jobs, open_reads, start_accumulators
from worker.listings import MonthListings
from worker.outcome import BatchResult, JobOutcome
from worker.passes import MonthPass, month_pass_columns
from worker.results import done_job_ids, records_to_clear, store_results

__all__ = ["BatchKey", "BatchResult", "JobOutcome", "MonthListings", "execute_batch", "execute_isolated", "execute_job"]


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
        done = done_job_ids(output, layout, jobs)
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
            month = MonthPass(processor, source, files, output, layout, listings, listings.passes, batch_rows,
                              worker_id, now)
            order, finished = month_pass_columns(month, todo_jobs, [outcomes[i] for i in todo])
            todo = [todo[i] for i in order]
            todo_jobs = [jobs[i] for i in todo]
            accumulators: list[JobAccumulator] = []
        else:
            accumulators = start_accumulators(processor, todo_jobs, output)
            reads = open_reads(todo_jobs, source, files, listings, batch_rows)
            compute_jobs(processor, todo_jobs, reads, accumulators, [outcomes[i] for i in todo])
        if not todo:
            return list(outcomes)
        stale = records_to_clear(output, layout, todo_jobs)
    except Exception as exc:  # the whole batch fails the same way
        return [exc if not outcomes[i].already_done else outcomes[i] for i in range(len(jobs))]

    results: list[BatchResult] = list(outcomes)
    failures = store_results(processor, todo_jobs, accumulators, [outcomes[i] for i in todo], output, layout, stale,
                             worker_id, now, finished)
    for i, failure in zip(todo, failures, strict=True):
        if failure is not None:
            results[i] = failure
    return results


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
