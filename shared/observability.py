"""Prometheus metrics and a tiny health/metrics HTTP server for tickq's long-running services.

`HealthServer` serves, from a daemon thread:

- ``/healthz``: 200 ``ok`` while the process's own liveness callable returns True, else 503.
  It never looks at the broker: a broker outage must not get healthy workers restarted.
- ``/readyz``: the same for an optional readiness callable (defaults to liveness).
- ``/metrics``: the Prometheus text format of one `CollectorRegistry`.

`WorkerMetrics` and `AggregatorMetrics` each own a dedicated registry (never the global one),
so that several instances can live in one process (tests, the demo) without name clashes.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from shared.errors import ConfigError

JOB_OUTCOMES = ("succeeded", "retry_scheduled", "dead_lettered")
JOB_STAGES = ("check", "list", "read", "filter", "compute", "upload", "publish", "ack")
ROW_KINDS = ("read", "accepted", "rejected")

JOB_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STAGE_DURATION_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

Probe = Callable[[], bool]


def _always_true() -> bool:
    return True


def _probe(check: Probe) -> tuple[bool, str]:
    """Run a probe; an exception counts as a failure and its one-line text is the reason."""
    try:
        return (True, "ok") if check() else (False, "unhealthy")
    except Exception as exc:  # a probe that raises is a failing probe, never a crashed server
        return False, f"unhealthy: {type(exc).__name__}: {exc}".splitlines()[0][:300]


class LivenessProbe:
    """A liveness callable fed by the process's own loop: alive while `beat` is recent.

    Call `beat()` from the loop that must keep turning (an asyncio housekeeping task, say);
    the probe reports dead once no beat arrived for `max_age_s`, so a wedged event loop gets
    the container restarted while a broker outage does not.
    """

    def __init__(self, max_age_s: float = 60.0) -> None:
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        """Record that the process is making progress."""
        self._last = time.monotonic()

    @property
    def age_s(self) -> float:
        """Seconds since the last beat."""
        return time.monotonic() - self._last

    def __call__(self) -> bool:
        return self.age_s <= self.max_age_s


class _Handler(BaseHTTPRequestHandler):
    """Routes ``/healthz``, ``/readyz`` and ``/metrics``; everything else is 404."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._respond(include_body=True)

    def do_HEAD(self) -> None:
        self._respond(include_body=False)

    def _respond(self, include_body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        owner = self.server.owner
        if path == "/healthz":
            ok, text = _probe(owner.liveness)
            self._send(
                200 if ok else 503,
                (text + "\n").encode(),
                "text/plain; charset=utf-8",
                include_body,
            )
        elif path == "/readyz":
            ok, text = _probe(owner.readiness)
            self._send(
                200 if ok else 503,
                (text + "\n").encode(),
                "text/plain; charset=utf-8",
                include_body,
            )
        elif path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(owner.registry)
            except Exception as exc:  # a broken collector must not take the server down
                body = f"metrics collection failed: {type(exc).__name__}\n".encode()
                self._send(500, body, "text/plain; charset=utf-8", include_body)
                return
            self._send(200, body, content_type, include_body)
        else:
            self._send(
                404,
                b"not found: try /healthz or /metrics\n",
                "text/plain; charset=utf-8",
                include_body,
            )

    def _send(self, status: int, body: bytes, content_type: str, include_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if include_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the JSON-lines log: stay quiet."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        super().__init__(address, _Handler)


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` from a daemon thread.

    `liveness` is the process's own check (see `LivenessProbe`); it must not depend on the
    broker. `registry` is what ``/metrics`` exposes (e.g. ``WorkerMetrics().registry``); by
    default an empty dedicated registry.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        liveness: Probe | None = None,
        readiness: Probe | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.liveness: Probe = liveness or _always_true
        self.readiness: Probe = readiness or self.liveness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port while serving (useful after ``start(0)``), else None."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def start(self, port: int, host: str = "0.0.0.0") -> int:
        """Bind `host`:`port` (0 picks a free port) and serve in a daemon thread; the port."""
        if self._server is not None:
            raise RuntimeError("HealthServer is already started")
        try:
            server = _Server((host, port), self)
        except OSError as exc:  # taken by another process, or not this user's to take
            raise ConfigError(f"cannot serve health checks on port {port}: {exc.strerror or exc}") from None
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="tickq-health",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _rss_bytes(process: psutil.Process) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(process.memory_info().rss)
        except psutil.Error:
            return float("nan")

    return read


class _Series:
    """One histogram series: a count per bucket (not cumulative) and the sum observed."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0


class _JobFigures(Collector):
    """A worker's per-job counters and histograms, as Prometheus families built at scrape time.

    prometheus_client's own metrics take a lock for every value they change: the dozen a
    finished job changes (its outcome, duration, each stage, rows) cost about 15 µs, a
    noticeable share of a job at thousands of jobs a second. Here a job takes one lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs = dict.fromkeys(JOB_OUTCOMES, 0)
        self._rows = dict.fromkeys(ROW_KINDS, 0)  # every kind a job reports
        self._duration = _Series(len(JOB_DURATION_BUCKETS) + 1)
        # Known stages are exported from the start, at zero, so that rates work from the first job.
        self._stages = {stage: _Series(len(STAGE_DURATION_BUCKETS) + 1) for stage in JOB_STAGES}

    def add(self, outcome: str, duration_s: float, stages: Mapping[str, float], rows: Mapping[str, int]) -> None:
        """Count one finished job."""
        with self._lock:
            self._jobs[outcome] = self._jobs.get(outcome, 0) + 1
            _observe(self._duration, JOB_DURATION_BUCKETS, duration_s)
            for stage, seconds in stages.items():
                series = self._stages.get(stage)
                if series is None:  # a stage not known in advance
                    series = self._stages[stage] = _Series(len(STAGE_DURATION_BUCKETS) + 1)
                _observe(series, STAGE_DURATION_BUCKETS, seconds)
            for kind, count in rows.items():
                self._rows[kind] += count

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs, rows = dict(self._jobs), dict(self._rows)
            duration = _histogram_samples(self._duration, JOB_DURATION_BUCKETS)
            stages = {name: _histogram_samples(series, STAGE_DURATION_BUCKETS) for name, series in self._stages.items()}
        counted = CounterMetricFamily("tickq_jobs", "Jobs finished, by outcome.", labels=["outcome"])
        for outcome, n in jobs.items():
            counted.add_metric([outcome], n)
        yield counted
        timed = HistogramMetricFamily("tickq_job_duration_seconds", "Wall time of one job delivery, all outcomes.")
        timed.add_metric([], *duration)
        yield timed
        staged = HistogramMetricFamily("tickq_job_stage_seconds", "Wall time of one stage of a job.", labels=["stage"])
        for stage, samples in stages.items():
            staged.add_metric([stage], *samples)
        yield staged
        processed = CounterMetricFamily(
            "tickq_rows_processed", "Input rows, by kind (read, accepted, rejected).", labels=["kind"]
        )
        for kind, n in rows.items():
            processed.add_metric([kind], n)
        yield processed


def _observe(series: _Series, bounds: tuple[float, ...], value: float) -> None:
    value = max(0.0, value)
    # A bucket counts the values at most its bound: the first bound not below the value.
    series.counts[bisect.bisect_left(bounds, value)] += 1
    series.sum += value


def _histogram_samples(series: _Series, bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """The series' cumulative buckets (``le`` as Prometheus spells it) and its sum."""
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), series.counts, strict=True):
        running += count
        cumulative.append((floatToGoString(bound), running))
    return cumulative, series.sum


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of their own.

    Feed it from the same places that log ``job.finished``: `job_finished` once per job. The
    jobs in hand are counted by `in_flight` and resident memory by psutil, both read at scrape
    time (a gauge set on every delivery and settlement cost more than the scrapes that read it).
    """

    def __init__(self, registry: CollectorRegistry | None = None, in_flight: Callable[[], int] = lambda: 0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._figures = _JobFigures()
        r.register(self._figures)
        self.jobs_in_flight = Gauge(
            "tickq_jobs_in_flight", "Jobs this worker holds right now.", registry=r
        )
        self.jobs_in_flight.set_function(in_flight)
        self.retries = Counter(
            "tickq_retries_total", "Jobs sent to a retry delay queue.", registry=r
        )
        self.dead_letters = Counter(
            "tickq_dead_letters_total",
            "Jobs dead-lettered, by error class.",
            ["error_class"],
            registry=r,
        )
        self.rss = Gauge(
            "tickq_worker_rss_bytes", "Resident memory of the worker process.", registry=r
        )
        self.rss.set_function(_rss_bytes(psutil.Process()))

    def job_finished(
        self,
        outcome: str,
        duration_s: float,
        stages: Mapping[str, float] | None = None,
        rows_read: int = 0,
        rows_accepted: int = 0,
        rows_rejected: int = 0,
        error_class: str | None = None,
    ) -> None:
        """Record one finished job delivery (any outcome) with its stage times and rows."""
        rows = {"read": rows_read, "accepted": rows_accepted, "rejected": rows_rejected}
        self._figures.add(outcome, duration_s, stages or {}, rows)
        if outcome == "retry_scheduled":
            self.retries.inc()
        elif outcome == "dead_lettered":
            self.dead_letters.labels(error_class=error_class or "unknown").inc()


class AggregatorMetrics:
    """The aggregator's Prometheus metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events = Counter(
            "tickq_aggregator_events_total", "Job events consumed, by type.", ["type"], registry=r
        )
        self.aggregations = Counter(
            "tickq_aggregations_total", "Run aggregations written.", registry=r
        )
        self.aggregation_duration = Histogram(
            "tickq_aggregation_duration_seconds",
            "Wall time of writing one run's tables.",
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.runs = Gauge(
            "tickq_aggregator_runs_tracked", "Runs the aggregator is following.", registry=r
        )
        for kind in ("job.succeeded", "job.dead"):
            self.events.labels(type=kind)

    def event(self, type_: str, n: int = 1) -> None:
        """Count `n` consumed events of `type_` (``job.succeeded``, ``job.dead``, ...)."""
        self.events.labels(type=type_).inc(n)

    def aggregated(self, duration_s: float | None = None) -> None:
        """Count one written aggregation (and its wall time when given)."""
        self.aggregations.inc()
        if duration_s is not None:
            self.aggregation_duration.observe(max(0.0, duration_s))

    def runs_tracked(self, n: int) -> None:
        """Set the number of runs being followed."""
        self.runs.set(n)
