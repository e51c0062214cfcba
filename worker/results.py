"""Storing a batch's results (one object), then each job's success marker; and finding which
jobs of a batch are stored already, and which of their dead and retry records to clear."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pyarrow as pa

from shared.layout import (
    ARROW_STREAM_TYPE,
    COUNT_COLUMNS,
    JobKey,
    RunLayout,
    batch_result_body,
    batch_result_table_body,
    security_segment,
)
from shared.messages import JobMessage
from shared.processors import JobAccumulator, Processor
from shared.storage import Storage
from worker.chaos import maybe_kill
from worker.outcome import JobOutcome, StageTimer

_T = TypeVar("_T")


_requests_lock = threading.Lock()
_requests: ThreadPoolExecutor | None = None


def each_in_flight(storage: Storage, call: Callable[[_T], None], items: Sequence[_T]) -> list[Exception | None]:
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
    return _keys_under(output, [f"{prefix}{month}/{security_segment(security)}/" for prefix in prefixes
                                for security in securities])


def _keys_under(output: Storage, prefixes: list[str]) -> set[str]:
    """Every key under any of `prefixes`, their listings all in flight together where the store
    allows."""
    found: set[str] = set()
    lock = threading.Lock()

    def list_prefix(prefix: str) -> None:
        keys = set(output.keys(prefix))
        with lock:
            found.update(keys)

    for failure in each_in_flight(output, list_prefix, prefixes):
        if failure is not None:
            raise failure
    return found


def done_job_ids(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> set[str]:
    """Job ids of the batch whose success marker exists."""
    keys = {j.job_id: layout.marker(JobKey(j.month, j.security, j.date)) for j in jobs}
    if len(jobs) == 1:
        return {job_id for job_id, key in keys.items() if output.exists(key)}
    listed = _listed(output, (layout.succeeded_prefix,), jobs)
    return {job_id for job_id, key in keys.items() if key in listed}


def jobs_not_done(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> list[JobMessage]:
    """`jobs` (of one month) without a success marker, from one listing of the month's markers."""
    done = set(output.keys(f"{layout.succeeded_prefix}{jobs[0].month}/"))
    return [j for j in jobs if layout.marker(JobKey(j.month, j.security, j.date)) not in done]


def records_to_clear(output: Storage, layout: RunLayout, jobs: list[JobMessage]) -> set[str]:
    """Dead and retry records of the batch's securities: a job that now succeeds clears its own."""
    return _listed(output, (layout.dead_prefix, layout.retrying_prefix), jobs)


def month_records_to_clear(output: Storage, layout: RunLayout, month: str) -> set[str]:
    """Every dead and retry record of `month`: two listings for the thousands of jobs a pass
    stores ahead, where such records are few (one listing per security made thousands, each a
    request on S3)."""
    return _keys_under(output, [f"{layout.dead_prefix}{month}/", f"{layout.retrying_prefix}{month}/"])


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
            with StageTimer(outcome, "compute"):
                data = accumulator.finish()
        except Exception as exc:  # this job alone failed to finish
            failures[i] = exc
            continue
        entries.append({"job_id": job.job_id, "security": job.security, "date": job.date,
                        "counts": _job_counts(outcome), "data": data})
        stored.append(i)
    return stored, batch_result_body(header, entries) if entries else b""


def store_results(
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

    for i, failure in zip(stored, each_in_flight(output, mark, stored), strict=True):
        failures[i] = failure  # this job alone failed to store, or None
        outcomes[i].bytes_out = len(body) // len(stored)
    maybe_kill("after-upload", [jobs[i].job_id for i in stored])
    upload_s = (time.perf_counter() - start) / len(stored)
    for i in stored:
        outcomes[i].time("upload", upload_s)
    return failures
