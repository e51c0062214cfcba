"""The `tickq` command: the composition root that wires producer, worker and aggregator.

Every subcommand takes the common options (broker URL, namespace, S3 endpoint, metrics
file); flags override environment variables, which override defaults. Expected failures
print one line (what went wrong, what to do) and exit 2; nothing prints a traceback unless
it is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from shared.errors import ConfigError, TickqError, one_line, redact
from shared.resources import (
    keep_pandas_unloaded,
    one_command_process,
    relieve_garbage_collector,
    spare_idle_blas_threads,
    use_returning_memory_pool,
)

if TYPE_CHECKING:  # imported where used: `tickq healthcheck` must start fast
    from shared.messages import JobParams
    from shared.settings import Settings
    from worker.host_share import HostWorkers

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INCOMPLETE = 3
DEFAULT_HEARTBEAT_FILE = "/tmp/tickq/heartbeat"
# Enough prefetched jobs for batches of ~512 jobs per execution slot, two batches deep: one
# pass over a month serves that many jobs, and each batch's own costs (its edge row groups,
# result object, event and ack) are shared by more of them. (Keep prefetch x job time far
# below the broker's consumer_timeout.)
DEFAULT_PREFETCH_PER_SLOT = 1024


# ---------------------------------------------------------------------------------------
# Argument parsing helpers: each raises ConfigError with a one-line message.
# ---------------------------------------------------------------------------------------


def _month_list(text: str) -> tuple[str, ...]:
    """``2024-01``, ``2024-01..2024-06`` or ``2024-01,2024-03``."""
    months: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if ".." in part:
            first, last = (_parse_month(p) for p in part.split("..", 1))
            if last < first:
                raise ConfigError(f"month range {part!r} ends before it starts")
            year, month = first
            while (year, month) <= last:
                months.append(f"{year:04d}-{month:02d}")
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        elif part:
            year, month = _parse_month(part)
            months.append(f"{year:04d}-{month:02d}")
    if not months:
        raise ConfigError("--months needs at least one month (YYYY-MM or YYYY-MM..YYYY-MM)")
    return tuple(dict.fromkeys(months))


def _parse_month(text: str) -> tuple[int, int]:
    try:
        parsed = dt.datetime.strptime(text.strip(), "%Y-%m")
    except ValueError:
        raise ConfigError(f"{text!r} is not a month (expected YYYY-MM)") from None
    return parsed.year, parsed.month


def _date_list(text: str) -> tuple[str, ...]:
    """``D1,D2`` or ``D1..D2``."""
    dates: list[str] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ".." in part:
                first, last = (dt.date.fromisoformat(p.strip()) for p in part.split("..", 1))
                if last < first:
                    raise ConfigError(f"date range {part!r} ends before it starts")
                dates.extend((first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1))
            elif part:
                dates.append(dt.date.fromisoformat(part).isoformat())
        except ValueError:
            raise ConfigError(f"{part!r} is not a date or date range (expected YYYY-MM-DD[..YYYY-MM-DD])") from None
    if not dates:
        raise ConfigError("--dates needs at least one date")
    return tuple(dict.fromkeys(dates))


def _codes(text: str, what: str) -> tuple[str, ...]:
    codes = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    if not codes:
        raise ConfigError(f"{what} needs at least one code")
    return codes


def _buckets(text: str) -> tuple[float, ...]:
    try:
        edges = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--size-buckets {text!r} must be comma-separated numbers") from None
    if not edges or any(not math.isfinite(e) or e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ConfigError("--size-buckets must be positive, strictly increasing notional edges")
    return edges


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with tickq's exit status (2) and one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def _common(parser: argparse.ArgumentParser, metrics: bool = True) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--amqp-url", help="broker URL (env TICKQ_AMQP_URL)")
    group.add_argument("--namespace", help="prefix of exchanges and queues (env TICKQ_NAMESPACE)")
    group.add_argument("--s3-endpoint-url", help="S3 API endpoint (env TICKQ_S3_ENDPOINT_URL)")
    if metrics:
        parser.add_argument("--metrics-file", type=Path, help="also append JSON-lines metrics to this file")
        parser.add_argument("--quiet", action="store_true",
                            help="no metrics lines (on stdout, or on stderr where stdout carries the command's output)")


def _settings(args: argparse.Namespace) -> Settings:
    from shared.settings import Settings

    return Settings.load(
        args.amqp_url, args.namespace, args.s3_endpoint_url, getattr(args, "retry_delays", None)
    )


def _configure_logs(args: argparse.Namespace, component: str, quiet: bool = False) -> None:
    from shared.metrics import configure

    metrics_file = getattr(args, "metrics_file", None)
    try:
        configure(component, metrics_file, stream=sys.stderr if quiet else None, quiet=getattr(args, "quiet", False))
    except OSError as exc:
        raise ConfigError(f"--metrics-file {metrics_file}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def _job_params(args: argparse.Namespace) -> JobParams:
    from shared.messages import DEFAULT_SIZE_BUCKETS, JobParams, parse_session

    if args.session:
        try:
            parse_session(args.session)
        except ValueError as exc:
            raise ConfigError(f"--session: {exc}") from None
    try:
        return JobParams(
            market_tz=args.market_tz,
            participants=_codes(args.participants, "--participants") if args.participants else None,
            venues=_codes(args.venues, "--venues") if args.venues else None,
            session=args.session,
            min_size=args.min_size,
            max_size=args.max_size,
            size_buckets=_buckets(args.size_buckets) if args.size_buckets else DEFAULT_SIZE_BUCKETS,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid run parameters: {exc}") from None


def _unassigned(rows: int, codes: list[str]) -> str:
    """What the producer's line says of rows no job owns (nothing when there are none)."""
    if not rows:
        return ""
    examples = f", such as {', '.join(repr(c) for c in codes)}" if codes else ""
    return (f"; {rows} rows belong to no job (no security, a security code tickq cannot use{examples}, "
            "or no trade date) and are in no table")


def cmd_produce(args: argparse.Namespace) -> int:
    from producer.run import RunRequest, new_run_id, produce

    settings = _settings(args)
    _configure_logs(args, "producer", quiet=args.json)
    run_id = args.run_id or new_run_id()
    from shared.messages import RUN_ID_RE

    if not RUN_ID_RE.match(run_id):
        raise ConfigError("--run-id must be 1-80 letters, digits, '.', '_' or '-' and start with a letter or digit")
    request = RunRequest(
        input=args.input,
        output=args.output,
        months=_month_list(args.months),
        params=_job_params(args),
        run_id=run_id,
        processor=args.processor,
        securities=_codes(args.securities, "--securities") if args.securities else None,
        dates=_date_list(args.dates) if args.dates else None,
    )
    result = asyncio.run(produce(request, settings, dry_run=args.dry_run))
    if args.json:
        print(json.dumps({"run_id": result.run_id, "jobs": result.jobs, "published": result.published}))
    else:
        verb = "would publish" if args.dry_run else "published"
        count = result.jobs - result.already_succeeded if args.dry_run else result.published
        print(
            f"run {result.run_id}: {result.jobs} jobs, {verb} {count}"
            + (f", {result.already_succeeded} already succeeded" if result.already_succeeded else "")
            + _unassigned(result.rows_unassigned, result.invalid_securities),
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.host_share import HostWorkers, default_folder

    # Every worker counts among its host's workers (those at `auto` run their share of it),
    # from before the slow imports below, so that workers started together see each other
    # from their first job.
    host = HostWorkers(default_folder())
    host.join()
    try:
        return _run_worker(args, host)
    finally:
        host.leave()


def _run_worker(args: argparse.Namespace, host: HostWorkers) -> int:
    from shared.metrics import get_logger
    from shared.resources import available
    from worker.consumer import AutoSizing, WorkerOptions, run_worker
    from worker.host_share import auto_slots

    settings = _settings(args)
    _configure_logs(args, "worker")
    auto = None
    if args.concurrency == "auto":
        resources = available()
        # The most slots: one per CPU the process may use and per 256 MB of its memory. The
        # worker runs its share of them among the host's workers (`worker.host_share`).
        concurrency = auto_slots(resources.cpus, resources.memory_bytes)
        get_logger().info("worker.auto_sized", concurrency=concurrency, cpus=resources.cpus,
                          memory_mb=resources.memory_bytes >> 20, host_folder=str(host.folder))
        if host.error is not None:
            get_logger().warning("worker.host_folder_unusable", host_folder=str(host.folder), error=host.error,
                                 consequence="this worker counts itself alone on its host")
        auto = AutoSizing(resources.cpus, resources.memory_bytes, host,
                          None if args.prefetch else DEFAULT_PREFETCH_PER_SLOT)
    else:
        try:
            concurrency = positive_int(args.concurrency)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--concurrency: {exc} (or 'auto')") from None
    options = WorkerOptions(
        concurrency=concurrency,
        retry_delays_s=settings.retry_delays_s,
        max_attempts=args.max_attempts,
        crash_budget=args.crash_budget,
        prefetch=args.prefetch or DEFAULT_PREFETCH_PER_SLOT * concurrency,
        max_jobs=args.max_jobs,
        idle_exit_s=args.idle_exit,
        shutdown_timeout_s=args.shutdown_timeout,
        heartbeat_file=Path(os.environ.get("TICKQ_HEARTBEAT_FILE", DEFAULT_HEARTBEAT_FILE)),
        health_port=args.health_port,
        auto=auto,
    )
    relieve_garbage_collector()  # start-up is done: what is alive now lives as long as the worker
    stats = asyncio.run(run_worker(settings, options))
    if stats.abandoned:
        # Jobs past the shutdown timeout are back in the queue; their threads must not keep
        # the process alive until the orchestrator kills it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


def cmd_aggregator(args: argparse.Namespace) -> int:
    from aggregator.service import run_aggregator

    settings = _settings(args)
    _configure_logs(args, "aggregator")
    heartbeat = Path(os.environ.get("TICKQ_HEARTBEAT_FILE", DEFAULT_HEARTBEAT_FILE))
    relieve_garbage_collector()  # start-up is done: what is alive now lives as long as the service
    asyncio.run(run_aggregator(settings, args.idle_exit, heartbeat, args.health_port, args.resync_after))
    return EXIT_OK


def cmd_aggregate(args: argparse.Namespace) -> int:
    from aggregator.tables import aggregate_run, read_manifest, wait_for_run
    from shared.layout import RunLayout
    from shared.storage import open_storage

    settings = _settings(args)
    _configure_logs(args, "aggregator", quiet=True)
    storage = open_storage(args.output, settings.s3_endpoint_url)
    layout = RunLayout(args.run)
    read_manifest(storage, layout)
    state = None
    if args.wait is not None:
        state = wait_for_run(storage, layout, None if args.wait == 0 else args.wait)
    result = aggregate_run(storage, args.run, state)
    where = storage.describe(layout.aggregates)
    status = "complete" if result.complete else f"incomplete ({result.dead} dead, {result.missing} missing)"
    print(f"run {args.run}: {result.succeeded}/{result.expected} jobs, {status}; tables in {where}")
    return EXIT_OK if result.complete else EXIT_INCOMPLETE


def cmd_gen(args: argparse.Namespace) -> int:
    from tickq.gen import generate

    settings = _settings(args)
    summary = generate(
        args.out,
        list(_month_list(args.months)),
        securities=args.securities,
        rows=args.rows,
        fmt=args.format,
        seed=args.seed,
        market_tz=args.market_tz,
        endpoint_url=settings.s3_endpoint_url,
        files_per_month=args.files_per_month,
    )
    print(json.dumps(summary, default=str) if args.json else f"wrote {args.out}: {_gen_line(summary)}")
    return EXIT_OK


def _gen_line(summary: dict[str, Any]) -> str:
    rows = summary.get("rows_per_month") or summary.get("rows") or {}
    total = sum(rows.values()) if isinstance(rows, dict) else rows
    return f"{total} rows, {len(summary.get('files', []))} files"


def cmd_demo(args: argparse.Namespace) -> int:
    from tickq.demo import run_demo

    settings = _settings(args)
    return run_demo(settings, rows=args.rows, workers=args.workers, securities=args.securities, out=args.out)


def cmd_dlq(args: argparse.Namespace) -> int:
    from tickq import dlq

    return dlq.main(args, _settings(args))


def cmd_status(args: argparse.Namespace) -> int:
    from tickq import status

    return status.main(args, _settings(args))


def cmd_healthcheck(args: argparse.Namespace) -> int:
    path = Path(os.environ.get("TICKQ_HEARTBEAT_FILE", DEFAULT_HEARTBEAT_FILE))
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        print(f"unhealthy: no heartbeat file {path}", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: last heartbeat {age:.0f}s ago (limit {args.max_age:.0f}s)", file=sys.stderr)
        return 1
    print(f"healthy: last heartbeat {age:.0f}s ago")
    return EXIT_OK


# ---------------------------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `tickq` argument parser; given the `command` about to run, the other subcommands
    whose options live in their own modules are listed without loading those modules."""

    def full(name: str) -> bool:
        return command is None or command == name

    parser = _Parser(prog="tickq", description="Distributed analytics over monthly market-data files.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("produce", help="discover a run's jobs and publish them")
    p.add_argument("--input", required=True, help="input location (s3://bucket/prefix or a path)")
    p.add_argument("--output", required=True, help="output location (s3://bucket/prefix or a path)")
    p.add_argument("--months", required=True, help="YYYY-MM, YYYY-MM..YYYY-MM or a comma list")
    p.add_argument("--securities", help="only these securities (A,B,...)")
    p.add_argument("--dates", help="only these trade dates (D1,D2 or D1..D2)")
    p.add_argument("--run-id", help="run id (default: generated); the same id resumes a run")
    p.add_argument("--market-tz", default="UTC", help="market time zone (default UTC)")
    p.add_argument("--participants", help="only these participants (P1,P2)")
    p.add_argument("--venues", help="only these venues (CP,TM)")
    p.add_argument("--session", help="market-time window HH:MM-HH:MM (start inclusive, end exclusive)")
    p.add_argument("--min-size", type=positive_int, help="smallest size kept (inclusive)")
    p.add_argument("--max-size", type=positive_int, help="largest size kept (inclusive)")
    p.add_argument("--size-buckets", help="notional bucket edges (default 10000,50000,200000,500000,1000000)")
    p.add_argument("--processor", default="analytics", help="per-job computation (default analytics)")
    p.add_argument("--dry-run", action="store_true", help="discover and count jobs, publish nothing")
    p.add_argument("--json", action="store_true", help='print {"run_id": ..., "jobs": N}')
    _common(p)
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("worker", help="consume and compute jobs")
    p.add_argument("--concurrency", default="auto", help="jobs at once, or 'auto' (CPUs and memory)")
    p.add_argument("--prefetch", type=positive_int,
                   help=f"unacked jobs held; jobs of one month among them share a pass over its input "
                        f"(default {DEFAULT_PREFETCH_PER_SLOT} x concurrency)")
    p.add_argument("--max-jobs", type=positive_int, help="exit after this many jobs")
    p.add_argument("--idle-exit", type=_seconds, help="exit after this many idle seconds")
    p.add_argument("--shutdown-timeout", type=_seconds, default=120.0,
                   help="on SIGTERM, seconds to finish jobs in hand before requeueing them (default 120)")
    p.add_argument("--max-attempts", type=positive_int, default=5,
                   help="attempts a job gets for transient failures before it is dead-lettered (default 5)")
    p.add_argument("--crash-budget", type=positive_int, default=5,
                   help="deliveries a job may kill its worker on before it is dead-lettered (default 5)")
    p.add_argument("--retry-delays", help="delay tiers in seconds (env TICKQ_RETRY_DELAYS, default 5,30,120,600)")
    p.add_argument("--health-port", type=int, help="serve /healthz and /metrics on this port")
    _common(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("aggregator", help="the aggregation service: writes runs' tables as they complete")
    p.add_argument("--idle-exit", type=_seconds, help="exit after this many idle seconds")
    p.add_argument("--health-port", type=int, help="serve /healthz and /metrics on this port")
    p.add_argument("--resync-after", type=_seconds, default=60.0,
                   help="read a run's state again from storage after this many seconds without an event "
                        "while it is unaccounted (events dropped from the bounded queue) (default %(default)g)")
    _common(p)
    p.set_defaults(func=cmd_aggregator)

    p = sub.add_parser("aggregate", help="write a run's tables from its stored job results")
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--output", required=True, help="the run's output location")
    p.add_argument("--wait", nargs="?", const=0.0, type=_seconds,
                   help="wait until every job succeeded or died (optionally at most SECONDS)")
    _common(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("gen", help="write synthetic monthly order data")
    p.add_argument("--out", required=True, help="where to write (s3://bucket/prefix or a path)")
    p.add_argument("--months", required=True, help="YYYY-MM or YYYY-MM..YYYY-MM")
    p.add_argument("--securities", type=positive_int, default=20, help="securities (default 20)")
    p.add_argument("--rows", type=positive_int, default=200_000, help="rows per month (default 200000)")
    p.add_argument("--format", choices=["parquet", "csv", "csv.gz", "dbn", "dbn.zst"], default="parquet")
    p.add_argument("--files-per-month", type=positive_int, default=1,
                   help="files per month, of consecutive times (default 1)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--market-tz", default="Australia/Sydney", help="market time zone of the session")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    _common(p, metrics=False)
    p.set_defaults(func=cmd_gen)

    p = sub.add_parser("demo", help="a whole run on synthetic data on this machine")
    p.add_argument("--rows", type=positive_int, default=500_000, help="rows of synthetic data (default 500000)")
    p.add_argument("--workers", type=positive_int, default=2, help="worker processes (default 2)")
    p.add_argument("--securities", type=positive_int, default=20, help="securities (default 20)")
    p.add_argument("--out", default="./tickq-demo", help="where data and results go (default ./tickq-demo)")
    _common(p, metrics=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ingest", help="rewrite raw monthly files into sorted, indexed Parquet for cheap jobs")
    if full("ingest"):
        from tickq import ingest

        ingest.add_arguments(p)
        _common(p)
        p.set_defaults(func=ingest.main)

    p = sub.add_parser("status", help="a run's ledger: expected, succeeded, dead, retrying, queued")
    if full("status"):
        from tickq import status

        status.add_arguments(p)
        _common(p, metrics=False)
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("report", help="stage breakdown, throughput, memory and bottlenecks from metrics files")
    if full("report"):
        from tickq import report

        report.add_arguments(p)
        p.set_defaults(func=report.main)

    p = sub.add_parser("dlq", help="list, show, replay or purge dead-lettered jobs")
    if full("dlq"):
        from tickq import dlq

        dlq.add_arguments(p, _common)
        p.set_defaults(func=cmd_dlq)

    p = sub.add_parser("healthcheck", help="exit 0 if this container's tickq process is alive")
    p.add_argument("--max-age", type=_seconds, default=60.0, help="heartbeat age limit (default 60 s)")
    p.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tickq` console script."""
    # Library warnings go through the JSON-lines metrics once a command configures them;
    # until then they are not printed as bare lines next to tickq's one-line errors.
    logging.getLogger().addHandler(logging.NullHandler())
    use_returning_memory_pool()
    spare_idle_blas_threads()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["healthcheck"] and not {"-h", "--help"} & set(argv):
        # Docker and Kubernetes run this every few seconds: skip building the full parser.
        health = argparse.ArgumentParser(prog="tickq healthcheck")
        health.add_argument("--max-age", type=_seconds, default=60.0)
        return cmd_healthcheck(health.parse_args(argv[1:]))
    keep_pandas_unloaded()
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except TickqError as exc:
        print(f"tickq {args.command}: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        if exc.filename is None:
            raise  # not the file system: a fault to be reported in full
        # A local path the command was pointed at cannot be read or written (a missing or
        # read-only folder, a full disk): the user's to fix, said in one line.
        print(f"tickq {args.command}: {redact(str(exc.filename))}: {exc.strerror or type(exc).__name__}",
              file=sys.stderr)
        return EXIT_ERROR


def run() -> int:
    """Entry point of the `tickq` console script and of ``python -m tickq``: `main` in a
    process that ends with the command."""
    one_command_process()
    relieve_garbage_collector()  # already for the imports, which allocate tens of thousands of objects
    code = main()
    # The process ends now: the interpreter's last collection need not walk what is left.
    relieve_garbage_collector()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
