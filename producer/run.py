"""A run from its parameters: discover jobs, write the manifest, publish unfinished jobs."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlparse

from producer.discover import MonthDiscovery, discover_month
from producer.publish import Outgoing, publish_confirmed
from shared.broker import connect
from shared.errors import ConfigError, PermanentError, TransientError
from shared.inputs import InputFile, sliced_files_json
from shared.layout import JobKey, RunLayout, job_keys_csv, read_job_keys
from shared.messages import JobMessage, JobParams, check_location, run_job_bodies
from shared.metrics import get_logger
from shared.processors import get_processor
from shared.runstate import RunJobs, load_state
from shared.settings import Settings
from shared.storage import Storage, open_storage
from shared.topology import Topology, declare


def tickq_version() -> str:
    """The installed tickq version."""
    try:
        return version("tickq")
    except PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "0+unknown"


def new_run_id(now: dt.datetime | None = None) -> str:
    """A fresh, sortable, readable run id."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunRequest:
    """Everything `tickq produce` was asked for."""

    input: str
    output: str
    months: tuple[str, ...]
    params: JobParams
    run_id: str
    processor: str = "analytics"
    securities: tuple[str, ...] | None = None
    dates: tuple[str, ...] | None = None

    def identity(self) -> dict[str, Any]:
        """The parameters that define the run: a rerun must match them."""
        return {
            "input": self.input,
            "output": self.output,
            "months": list(self.months),
            "processor": self.processor,
            "securities": list(self.securities) if self.securities else None,
            "dates": list(self.dates) if self.dates else None,
            "params": self.params.as_json(),
        }


@dataclass
class ProduceResult:
    """What `produce` did."""

    run_id: str
    jobs: int
    published: int = 0
    already_succeeded: int = 0
    resumed: bool = False
    months_without_input: list[str] = field(default_factory=list)
    rows_unassigned: int = 0
    # A few of the security codes that made rows unassigned (none for a resumed run).
    invalid_securities: list[str] = field(default_factory=list)


def _discover(request: RunRequest, source: Storage) -> tuple[list[JobKey], dict[str, Any], dict[str, list[InputFile]]]:
    """The run's job keys, what discovery found per month (for the manifest), and per month
    the files it read that are not Parquet, with what their slices hold."""
    log = get_logger(run_id=request.run_id)
    securities = set(request.securities) if request.securities else None
    dates = {dt.date.fromisoformat(d) for d in request.dates} if request.dates else None
    keys: list[JobKey] = []
    per_month: dict[str, Any] = {}
    without_input: list[str] = []
    sliced: dict[str, list[InputFile]] = {}
    for month in request.months:
        started = time.perf_counter()
        try:
            found: MonthDiscovery = discover_month(source, month, request.params.market_tz, securities, dates)
        except PermanentError as exc:
            if "no input for month" in str(exc):
                without_input.append(month)
                log.warning("produce.month_without_input", month=month, error=str(exc))
                continue
            raise
        month_keys = [JobKey(month, sec, day) for sec, day in sorted(found.rows)]
        keys.extend(month_keys)
        if found.sliced:
            sliced[month] = found.sliced
        per_month[month] = {
            "source": found.source,
            "files": found.files,
            "rows_scanned": found.rows_scanned,
            "rows_unassigned": found.rows_unassigned,
            "invalid_securities": sorted(found.invalid_securities)[:20],
            "jobs": len(month_keys),
        }
        log.info(
            "produce.discovered",
            month=month,
            jobs=len(month_keys),
            files=found.files,
            rows_scanned=found.rows_scanned,
            rows_unassigned=found.rows_unassigned,
            source=found.source,
            duration_s=round(time.perf_counter() - started, 3),
        )
        if found.rows_unassigned:
            # Rows in no table: said out loud, not only counted in the manifest.
            log.warning("produce.rows_unassigned", month=month, rows=found.rows_unassigned,
                        invalid_securities=per_month[month]["invalid_securities"][:5])
    return keys, {"months": per_month, "months_without_input": without_input}, sliced


def _write_month_keys(output: Storage, layout: RunLayout, keys: list[JobKey], discovery: dict[str, Any],
                      sliced: dict[str, list[InputFile]]) -> None:
    """A key file per month that has no ingest index (its jobs were found by reading every
    row): a worker serving one of its jobs reads the month whole, and computes the month's
    other jobs in the same pass (see `worker.ahead`). Beside it, what the month's files other
    than Parquet hold slice by slice (the slices of a large CSV file, or a whole file): such a
    pass over some of the month's dates reads only theirs."""
    for month, files in sliced.items():
        output.write_bytes(layout.month_slices(month), sliced_files_json(files), "application/json")
    scanned = {month for month, found in discovery["months"].items() if found["source"] == "scan"}
    by_month: dict[str, list[JobKey]] = {}
    for key in keys:
        if key.month in scanned:
            by_month.setdefault(key.month, []).append(key)
    for month, month_keys in by_month.items():
        output.write_bytes(layout.month_job_keys(month), job_keys_csv(month_keys), "text/csv")


def _messages(request: RunRequest, keys: list[JobKey], routing_key: str) -> Iterator[Outgoing]:
    """The run's job messages, in key order."""
    if not keys:
        return
    first = keys[0]
    run = JobMessage.build(run_id=request.run_id, month=first.month, security=first.security, date=first.date,
                           input=request.input, output=request.output, processor=request.processor,
                           params=request.params)
    for job_id, body in run_job_bodies(run, ((k.month, k.security, k.date) for k in keys)):
        yield Outgoing(routing_key, body, job_id)


def job_location(uri: str, flag: str) -> str:
    """`uri` as the run's jobs carry it; `ConfigError` naming `flag` when jobs cannot carry it.

    A local path becomes absolute (workers and the aggregator service may run in other
    folders), resolved through any '..' to the folder it names (jobs refuse '..' segments)."""
    parsed = urlparse(uri)
    through_parent = ".." in uri.replace("\\", "/").split("/")
    if parsed.scheme == "" and (through_parent or not os.path.isabs(uri)):
        uri = os.path.realpath(uri) if through_parent else os.path.abspath(uri)
    elif parsed.scheme == "file" and through_parent:
        uri = f"file://{os.path.realpath(parsed.path)}"
    try:
        return check_location(uri, flag.lstrip("-"))
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _same_request(stored: dict[str, Any], request: RunRequest) -> bool:
    """Whether a run's stored request is `request` (a run made when its local paths were kept
    as given, relative ones included, is compared with them made absolute here)."""
    stored = dict(stored)
    for key, flag in (("input", "--input"), ("output", "--output")):
        with contextlib.suppress(ConfigError, KeyError, TypeError):
            stored[key] = job_location(stored[key], flag)
    return stored == request.identity()


async def produce(request: RunRequest, settings: Settings, dry_run: bool = False) -> ProduceResult:
    """Discover (or resume) the run, write its manifest and publish every unfinished job."""
    log = get_logger(run_id=request.run_id)
    try:
        get_processor(request.processor)
    except PermanentError as exc:
        raise ConfigError(str(exc)) from None
    # Checked before anything is read or written: a location no job can carry fails the run
    # here, not after its manifest.
    request = dataclasses.replace(request, input=job_location(request.input, "--input"),
                                  output=job_location(request.output, "--output"))
    source = open_storage(request.input, settings.s3_endpoint_url)
    output = open_storage(request.output, settings.s3_endpoint_url)
    layout = RunLayout(request.run_id)
    started = time.perf_counter()
    topology = Topology(settings.namespace)
    if not dry_run:
        # Before discovery, which may read for minutes: a broker out of reach, or a namespace
        # declared otherwise, fails the run at once and leaves no manifest of a run with no jobs.
        await _declare_topology(settings, topology, request.run_id)

    resumed = output.exists(layout.manifest)
    if resumed:
        manifest = json.loads(output.read_bytes(layout.manifest))
        if not _same_request(manifest.get("request") or {}, request):
            raise ConfigError(
                f"run {request.run_id} already exists with other parameters; "
                "use the same parameters to resume it, or a new --run-id"
            )
        keys = read_job_keys(output, layout)
        discovery = {"months_without_input": manifest.get("months_without_input", [])}
        succeeded = load_state(output, layout, RunJobs.of(keys)).succeeded  # the key file read once
        todo = [key for key, done in zip(keys, succeeded.mask[succeeded.jobs.positions(keys)], strict=True)
                if not done]
    else:
        keys, discovery, sliced = _discover(request, source)
        if not keys:
            raise ConfigError(
                f"no jobs found for months {', '.join(request.months)} under {source.describe()}"
                " (check --input, --months, --securities and --dates)"
            )
        todo = keys

    result = ProduceResult(
        run_id=request.run_id,
        jobs=len(keys),
        already_succeeded=len(keys) - len(todo),
        resumed=resumed,
        months_without_input=list(discovery.get("months_without_input", [])),
        rows_unassigned=sum(m.get("rows_unassigned", 0) for m in discovery.get("months", {}).values()),
        invalid_securities=sorted({code for m in discovery.get("months", {}).values()
                                   for code in m.get("invalid_securities", [])})[:5],
    )
    if dry_run:
        return result

    if not resumed:
        _write_month_keys(output, layout, keys, discovery, sliced)
        output.write_bytes(layout.job_keys, job_keys_csv(keys), "text/csv")
        manifest = {
            "run_id": request.run_id,
            "tickq_version": tickq_version(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "request": request.identity(),
            "jobs": len(keys),
            "job_keys": "job_keys.csv",
            **discovery,
        }
        # The manifest is written last: its presence means the key file is complete.
        output.write_bytes(layout.manifest, json.dumps(manifest, indent=2).encode(), "application/json")

    outgoing = _messages(request, todo, topology.jobs)
    publish_started = time.perf_counter()
    result.published = await asyncio.get_running_loop().run_in_executor(
        None, publish_confirmed, settings.amqp_url, outgoing, f"tickq-producer {request.run_id}"
    )
    elapsed = time.perf_counter() - publish_started
    if result.published != len(todo):  # never reported as a run in full when a job is not on the queue
        raise TransientError(f"published {result.published} of the run's {len(todo)} unfinished jobs; "
                             "run the same command again to publish the rest")
    log.info(
        "produce.published",
        jobs=result.jobs,
        published=result.published,
        already_succeeded=result.already_succeeded,
        resumed=resumed,
        publish_s=round(elapsed, 3),
        publish_rate=round(result.published / elapsed, 1) if elapsed > 0 else None,
        duration_s=round(time.perf_counter() - started, 3),
    )
    return result


async def _declare_topology(settings: Settings, topology: Topology, run_id: str) -> None:
    """Declare the namespace's queues and exchanges, as every component does before using them."""
    connection = await connect(settings, f"tickq-producer {run_id}")
    try:
        channel = await connection.channel()
        await declare(channel, topology)
    finally:
        await connection.close()
