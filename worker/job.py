"""Executing one job: read its slice of the month, filter, compute, upload the result.

Runs on a worker thread, never on the broker connection's event loop. Data flows one way:
month files → bounded batches of the job's security → normalised rows of the job's trade
date → run filters → processor → result object, then the success marker, written last.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from shared.inputs import ALL_COLUMNS, ByteCounter, DayWindow, InputFile, month_files, normalise, read_batches
from shared.layout import JobKey, RunLayout
from shared.messages import JobMessage, JobParams
from shared.processors import JobContext, get_processor
from shared.storage import Storage, open_storage
from worker.chaos import maybe_kill

MONTH_LISTING_TTL_S = 60.0


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


class MonthListings:
    """Caches month file listings, so many jobs of one month list its files once."""

    def __init__(self, ttl_s: float = MONTH_LISTING_TTL_S) -> None:
        self._ttl = ttl_s
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], tuple[float, list[InputFile]]] = {}

    def files(self, storage: Storage, month: str) -> list[InputFile]:
        """The month's input files (from cache when fresh)."""
        key = (storage.uri, month)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit and now - hit[0] < self._ttl:
                return hit[1]
        files = month_files(storage, month)
        with self._lock:
            self._cache[key] = (now, files)
        return files


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


def _job_rows(
    job: JobMessage, storage: Storage, files: list[InputFile], outcome: JobOutcome, batch_rows: int
) -> Iterator[pa.Table]:
    """The job's accepted rows after the run's filters, batch by batch; counts as it goes."""
    params = job.params
    window = DayWindow.of(job.trade_date, params.market_tz)
    day = pa.scalar(job.trade_date, pa.date32())
    for file in files:
        counter = ByteCounter()
        batches = read_batches(
            storage, file, ALL_COLUMNS, security=job.security, window=window,
            batch_rows=batch_rows, counter=counter,
        )
        outcome.files += 1
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            outcome.time("read", time.perf_counter() - start)
            if batch is None:
                break
            start = time.perf_counter()
            rows, valid = normalise(batch, params.market_tz)
            in_job = pc.fill_null(pc.equal(rows.column("trade_date"), day), False)
            read = pc.sum(in_job).as_py() or 0
            if not read:
                outcome.time("filter", time.perf_counter() - start)
                continue
            accepted = pc.and_(in_job, valid)
            n_accepted = pc.sum(accepted).as_py() or 0
            outcome.rows_read += read
            outcome.rows_rejected += read - n_accepted
            rows = rows.filter(accepted)
            keep = run_filter_mask(rows, params)
            if keep is not None:
                before = rows.num_rows
                rows = rows.filter(keep)
                outcome.rows_filtered += before - rows.num_rows
            outcome.rows_accepted += rows.num_rows
            outcome.time("filter", time.perf_counter() - start)
            if rows.num_rows:
                yield rows
        outcome.bytes_in += counter.bytes


def execute_job(
    job: JobMessage,
    *,
    s3_endpoint_url: str | None,
    worker_id: str,
    listings: MonthListings,
    batch_rows: int = 65_536,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> JobOutcome:
    """Compute `job` and store its result and success marker; idempotent.

    A job whose success marker already exists (a redelivery after success) is not computed
    again. Raises `PermanentError` or a transient error; never acks anything itself.
    """
    outcome = JobOutcome()
    layout = RunLayout(job.run_id)
    key = JobKey(job.month, job.security, job.date)
    output = open_storage(job.output, s3_endpoint_url)
    with _Timer(outcome, "check"):
        if output.exists(layout.marker(key)):
            outcome.already_done = True
            return outcome
    processor = get_processor(job.processor)
    source = open_storage(job.input, s3_endpoint_url)
    with _Timer(outcome, "list"):
        files = listings.files(source, job.month)
    accumulator = processor.start_job(JobContext(job=job, output=output))
    for rows in _job_rows(job, source, files, outcome, batch_rows):
        start = time.perf_counter()
        accumulator.add(rows)
        outcome.time("compute", time.perf_counter() - start)
    with _Timer(outcome, "compute"):
        data = accumulator.finish()
    result = {
        "v": 1,
        "run_id": job.run_id,
        "job_id": job.job_id,
        "month": job.month,
        "security": job.security,
        "date": job.date,
        "processor": job.processor,
        "counts": {
            "rows_read": outcome.rows_read,
            "rows_accepted": outcome.rows_accepted,
            "rows_rejected": outcome.rows_rejected,
            "rows_filtered": outcome.rows_filtered,
        },
        "data": data,
    }
    body = json.dumps(result, separators=(",", ":"), allow_nan=True).encode()
    marker = json.dumps(
        {"job_id": job.job_id, "worker": worker_id, "finished_at": now().isoformat(), "counts": result["counts"]},
        separators=(",", ":"),
    ).encode()
    maybe_kill("before-upload", job.job_id)
    with _Timer(outcome, "upload"):
        output.write_bytes(layout.result(key), body, "application/json")
        # The marker is written last: a marker always means a complete result.
        output.write_bytes(layout.marker(key), marker, "application/json")
        output.delete(layout.dead(key))
        output.delete(layout.retrying(key))
    outcome.bytes_out = len(body) + len(marker)
    maybe_kill("after-upload", job.job_id)
    return outcome


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
