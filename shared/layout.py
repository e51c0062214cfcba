"""Where a run keeps its objects under the output location.

::

    runs/<run>/manifest.json                      parameters, expected jobs, created_at, version
    runs/<run>/job_keys.csv                       month,security,date of every expected job
    runs/<run>/job_keys/<month>.csv               the same, one month (months read row by row, not indexed)
    runs/<run>/job_keys/<month>.slices.json       what the month's large CSV files hold, slice by slice
    runs/<run>/results/<month>/<security>.<date>.<id>.arrows|.json  partial results of one batch of jobs
    runs/<run>/succeeded/<month>/<security>/<date>.json success marker (empty), written after the result
    runs/<run>/dead/<month>/<security>/<date>.json      why the job was dead-lettered
    runs/<run>/retrying/<month>/<security>/<date>.json  the job waits in a delay queue
    runs/<run>/aggregates/<table>.parquet|.csv, summary.json

A security code takes one path segment in these keys (`security_segment`): characters other
than letters, digits and `. _ - ~ = ^ + & #` and spaces are percent-encoded (`BRK/B` as
`BRK%2FB`), as is a leading dot.
"""

from __future__ import annotations

import csv
import functools
import io
import secrets
import sys
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import pyarrow as pa

from shared.errors import PermanentError
from shared.storage import Storage

# A batch result object comes in one of two formats.
#
# Columns (version 4), for processors whose partial results are columns (`finish_batch`): an
# Arrow IPC stream of one table (its buffers LZ4-compressed; earlier objects are not), one row
# per job: job_id, security, date, the row counts (`COUNT_COLUMNS`), then the processor's
# columns. The header's fields {"v", "run_id", "month", "processor", "worker", "finished_at",
# "jobs"} are the schema's metadata under `HEADER_METADATA`, "jobs" naming the rows'
# [security, date] (objects written before it are read without it). Both sides handle the
# partials as whole arrays: only the header's names are made per job in Python.
#
# JSON lines (version 3), for processors with a JSON-ready result per job: the header, with
# "jobs": [[security, date], …] naming the batch's jobs so that finding which object holds a
# job reads headers only; then {"jobs": [{"job_id", "security", "date", "counts", "data"}, …]}
# in the same order. Version 2 objects (one document: the header's fields with the full jobs)
# are still read.
RESULT_VERSION = 3
COLUMNAR_VERSION = 4
_ONE_DOCUMENT_VERSION = 2
COUNT_COLUMNS = ("rows_read", "rows_accepted", "rows_rejected", "rows_filtered")
HEADER_METADATA = b"tickq.result"
ARROW_STREAM_TYPE = "application/vnd.apache.arrow.stream"
# Every Arrow IPC stream starts with this continuation marker; a JSON object cannot.
_IPC_START = b"\xff\xff\xff\xff"


def batch_result_columns(jobs: list[tuple[str, str, str]], counts: list[dict[str, int]], data: pa.Table) -> pa.Table:
    """A columnar batch result's table: each job's (job_id, security, date), its row counts
    (`COUNT_COLUMNS`) and its row of `data` (the processor's columns)."""
    if not len(jobs) == len(counts) == data.num_rows:
        raise ValueError(f"{data.num_rows} result rows and {len(counts)} counts for {len(jobs)} jobs")
    job_ids, securities, dates = (list(column) for column in zip(*jobs, strict=True)) if jobs else ([], [], [])
    return pa.table({
        "job_id": pa.array(job_ids, pa.string()),
        "security": pa.array(securities, pa.string()),
        "date": pa.array(dates, pa.string()),
        **{name: pa.array([c[name] for c in counts], pa.int64()) for name in COUNT_COLUMNS},
        **{name: data.column(name) for name in data.column_names},
    })


def batch_result_table_body(
    header: dict[str, Any], jobs: list[tuple[str, str, str]], counts: list[dict[str, int]], data: pa.Table
) -> bytes:
    """A columnar batch result object (`batch_result_columns`) with `header` (run_id, month,
    processor, worker, finished_at) and, in it, the jobs' (security, date): finding which
    object holds a job then reads the header alone, not the columns."""
    names = [[security, date] for _, security, date in jobs]
    table = batch_result_columns(jobs, counts, data).replace_schema_metadata(
        {HEADER_METADATA: orjson.dumps({"v": COLUMNAR_VERSION, **header, "jobs": names})}
    )
    sink = pa.BufferOutputStream()
    # LZ4: a month's analytics partials (about 1.1 KB a job) take 56 % of the bytes, for a
    # millisecond or so per 512 jobs on each side; zstd takes 40 % but decompresses several
    # times slower, and the aggregator decompresses every object. Readers need not be told.
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def is_columnar(body: bytes) -> bool:
    """Whether a batch result object holds columns (version 4) rather than JSON lines."""
    return body.startswith(_IPC_START)


def batch_result_table(body: bytes) -> tuple[dict[str, Any], pa.Table]:
    """A columnar batch result object's header and its jobs' table (zero-copy on `body` where
    it is not compressed); `ValueError` when it is not one."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(body))
        header = _columnar_header(reader.schema)
        table = reader.read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"its columns are corrupt ({str(exc).splitlines()[0]})") from None
    missing = {"job_id", "security", "date", *COUNT_COLUMNS} - set(table.column_names)
    if missing:
        raise ValueError(f"it is corrupt (no {', '.join(sorted(missing))})")
    return header, table


def _columnar_header(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(HEADER_METADATA)
    if raw is None:
        raise ValueError("it has no tickq header")
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"its header is corrupt ({exc.msg})") from None
    if not isinstance(header, dict) or header.get("v") != COLUMNAR_VERSION:
        raise ValueError("its header is corrupt (not format 4)")
    missing = {"month", "finished_at"} - header.keys()
    if missing:
        raise ValueError(f"it is corrupt (no {', '.join(sorted(missing))})")
    return header


def batch_result_body(header: dict[str, Any], jobs: list[dict[str, Any]]) -> bytes:
    """A batch result object of `jobs` with `header` (run_id, month, processor, worker, finished_at)."""
    keys = [[job["security"], job["date"]] for job in jobs]
    return orjson.dumps({"v": RESULT_VERSION, **header, "jobs": keys}) + b"\n" + orjson.dumps({"jobs": jobs})


def batch_result_header(body: bytes) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A batch result object's header and its jobs' (security, date), in either format;
    `ValueError` when it is not a result object this version reads."""
    if is_columnar(body):
        try:
            header = _columnar_header(pa.ipc.open_stream(pa.py_buffer(body)).schema)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"its columns are corrupt ({str(exc).splitlines()[0]})") from None
        if "jobs" not in header:  # written before headers named their jobs: read the columns
            header, table = batch_result_table(body)
            return header, list(zip(table.column("security").to_pylist(), table.column("date").to_pylist(),
                                    strict=True))
    else:
        header = _versioned(body.partition(b"\n")[0])
    missing = {"month", "finished_at", "jobs"} - header.keys()
    if missing:
        raise ValueError(f"its header is corrupt (no {', '.join(sorted(missing))})")
    try:
        if header["v"] == _ONE_DOCUMENT_VERSION:
            return header, [(job["security"], job["date"]) for job in header["jobs"]]
        return header, [(security, date) for security, date in header["jobs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"its header is corrupt ({type(exc).__name__} in its jobs)") from None


def batch_result_jobs(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A JSON batch result object's header and its jobs, each with counts and data."""
    line, _, rest = body.partition(b"\n")
    header = _versioned(line)
    if header["v"] == _ONE_DOCUMENT_VERSION:
        return header, header["jobs"]
    try:
        jobs: list[dict[str, Any]] = orjson.loads(rest)["jobs"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"its jobs are corrupt ({type(exc).__name__})") from None
    return header, jobs


def _versioned(line: bytes) -> dict[str, Any]:
    try:
        header = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"corrupt ({exc.msg})") from None
    version = header.get("v") if isinstance(header, dict) else None
    if version not in (RESULT_VERSION, _ONE_DOCUMENT_VERSION, COLUMNAR_VERSION):
        raise ValueError(f"format {version!r}, this tickq reads {_ONE_DOCUMENT_VERSION} to {COLUMNAR_VERSION}")
    return header


# Kept as they are in a key's security segment (with letters, digits and `_ . - ~`): every
# character security codes could hold before they could hold any, so their keys stay the same.
_SEGMENT_SAFE = "=^+&# "


@functools.lru_cache(maxsize=8192)  # a key a job, from a few thousand codes
def security_segment(security: str) -> str:
    """`security` as one path segment of a storage key: never '.', '..', hidden or holding a '/'."""
    segment = urllib.parse.quote(security, safe=_SEGMENT_SAFE)
    return "%2E" + segment[1:] if segment.startswith(".") else segment


def security_of_segment(segment: str) -> str:
    """The security code a key's segment (`security_segment`) stands for."""
    return urllib.parse.unquote(segment)


class JobKey(NamedTuple):
    """The key of one job. A tuple: sets and dicts of a run's keys (a million for a large run)
    hash and compare them in C."""

    month: str
    security: str
    date: str

    def path(self) -> str:
        """The key's relative path, shared by result, marker and dead record."""
        return f"{self.month}/{security_segment(self.security)}/{self.date}.json"


@dataclass(frozen=True)
class RunLayout:
    """Object keys of one run, relative to the output location."""

    run_id: str

    @property
    def root(self) -> str:
        """The run's prefix."""
        return f"runs/{self.run_id}"

    @property
    def manifest(self) -> str:
        """The run manifest."""
        return f"{self.root}/manifest.json"

    @property
    def job_keys(self) -> str:
        """The CSV of every expected job key."""
        return f"{self.root}/job_keys.csv"

    def month_job_keys(self, month: str) -> str:
        """The CSV of one month's expected job keys (written for months without an index, whose
        jobs a worker serves in one pass over the month)."""
        return f"{self.root}/job_keys/{month}.csv"

    def month_slices(self, month: str) -> str:
        """What the month's input files other than Parquet hold, slice by slice
        (`shared.inputs.FileSlice`), written with the month's key file when discovery read them."""
        return f"{self.root}/job_keys/{month}.slices.json"

    def month_pass_claim(self, month: str, part: int) -> str:
        """Created by the one worker that computes a part of a month's expected jobs in one
        pass; the others wait for its results rather than read the month too."""
        return f"{self.root}/month_passes/{month}/{part}.claim"

    def month_pass_done(self, month: str, part: int) -> str:
        """Written once the claimed pass over a part of a month has stored its results."""
        return f"{self.root}/month_passes/{month}/{part}.done"

    @property
    def results_prefix(self) -> str:
        """Prefix of the batch result objects."""
        return f"{self.root}/results/"

    def batch_result(self, month: str, security: str, date: str, columnar: bool = False) -> str:
        """A new, unique name for the results of a batch whose first job is (`security`, `date`).

        Named after its first job, so that a listing comes roughly in job-key order.
        """
        suffix = "arrows" if columnar else "json"
        return f"{self.results_prefix}{month}/{security_segment(security)}.{date}.{secrets.token_hex(6)}.{suffix}"

    @property
    def succeeded_prefix(self) -> str:
        """Prefix of the success markers."""
        return f"{self.root}/succeeded/"

    def marker(self, key: JobKey) -> str:
        """A job's success marker."""
        return f"{self.succeeded_prefix}{key.path()}"

    @property
    def dead_prefix(self) -> str:
        """Prefix of the dead-job records."""
        return f"{self.root}/dead/"

    def dead(self, key: JobKey) -> str:
        """A dead job's record."""
        return f"{self.dead_prefix}{key.path()}"

    @property
    def retrying_prefix(self) -> str:
        """Prefix of the records of jobs waiting in a delay queue."""
        return f"{self.root}/retrying/"

    def retrying(self, key: JobKey) -> str:
        """A retrying job's record."""
        return f"{self.retrying_prefix}{key.path()}"

    @property
    def aggregates(self) -> str:
        """Prefix of the aggregate tables."""
        return f"{self.root}/aggregates"

    @staticmethod
    def jobs_of_records(object_keys: Iterable[str], prefix: str) -> Iterator[tuple[str, str, str]]:
        """The (month, security, date) of each marker, dead or retry record under `prefix`."""
        start = len(prefix)
        for object_key in object_keys:
            month, segment, name = object_key[start:].split("/")
            yield month, security_of_segment(segment), name.removesuffix(".json")


def job_keys_csv(keys: list[JobKey]) -> bytes:
    """The key file's content for `keys`."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "security", "date"])
    for key in keys:
        writer.writerow([key.month, key.security, key.date])
    return out.getvalue().encode()


def read_job_keys(storage: Storage, layout: RunLayout) -> list[JobKey]:
    """The run's expected job keys, from its key file."""
    return _parse_job_keys(storage, layout.job_keys)


def read_month_job_keys(storage: Storage, layout: RunLayout, month: str) -> list[JobKey] | None:
    """One month's expected job keys, or None when the run has no key file for it."""
    key = layout.month_job_keys(month)
    if not storage.exists(key):  # a month with an index, or a run of an earlier version
        return None
    return _parse_job_keys(storage, key)


def _parse_job_keys(storage: Storage, key: str) -> list[JobKey]:
    # Interned: a run's keys repeat a few months, dates and securities many times over.
    return [JobKey(sys.intern(month), sys.intern(security), sys.intern(date))
            for month, security, date in job_key_rows(storage, key)]


def job_key_rows(storage: Storage, key: str) -> Iterator[tuple[str, str, str]]:
    """The (month, security, date) rows of key file `key`, one by one."""
    # Decoded as read: a StringIO of the whole file would hold it at 4 bytes a character.
    rows = csv.reader(io.TextIOWrapper(io.BytesIO(storage.read_bytes(key)), encoding="utf-8", newline=""))
    header = next(rows, [])
    if not {"month", "security", "date"} <= set(header):
        raise PermanentError(f"{storage.describe(key)} is not a job key file (its header is {header})")
    month, security, date = (header.index(name) for name in ("month", "security", "date"))
    return ((row[month], row[security], row[date]) for row in rows)
