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

import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

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
        server = _Server((host, port), self)
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


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of their own.

    Feed it from the same places that log ``job.finished`` / ``job.stage``: `job_finished`
    once per job and `in_flight` whenever the number of jobs in hand changes. The resident
    memory gauge is read with psutil at scrape time.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs = Counter(
            "tickq_jobs_total", "Jobs finished, by outcome.", ["outcome"], registry=r
        )
        self.job_duration = Histogram(
            "tickq_job_duration_seconds",
            "Wall time of one job delivery, all outcomes.",
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "tickq_job_stage_seconds",
            "Wall time of one stage of a job.",
            ["stage"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.jobs_in_flight = Gauge(
            "tickq_jobs_in_flight", "Jobs this worker holds right now.", registry=r
        )
        self.retries = Counter(
            "tickq_retries_total", "Jobs sent to a retry delay queue.", registry=r
        )
        self.dead_letters = Counter(
            "tickq_dead_letters_total",
            "Jobs dead-lettered, by error class.",
            ["error_class"],
            registry=r,
        )
        self.rows = Counter(
            "tickq_rows_processed_total",
            "Input rows, by kind (read, accepted, rejected).",
            ["kind"],
            registry=r,
        )
        self.rss = Gauge(
            "tickq_worker_rss_bytes", "Resident memory of the worker process.", registry=r
        )
        self.rss.set_function(_rss_bytes(psutil.Process()))
        # Export every known series at zero from the start, so rates work from the first scrape;
        # the labelled children are kept, since looking one up costs more than using it.
        self._jobs_by_outcome = {outcome: self.jobs.labels(outcome=outcome) for outcome in JOB_OUTCOMES}
        self._stage_by_name = {stage: self.stage_duration.labels(stage=stage) for stage in JOB_STAGES}
        self._rows_by_kind = {kind: self.rows.labels(kind=kind) for kind in ROW_KINDS}

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
        jobs = self._jobs_by_outcome.get(outcome) or self.jobs.labels(outcome=outcome)
        jobs.inc()
        self.job_duration.observe(max(0.0, duration_s))
        for stage, seconds in (stages or {}).items():
            child = self._stage_by_name.get(stage) or self.stage_duration.labels(stage=stage)
            child.observe(max(0.0, seconds))
        if outcome == "retry_scheduled":
            self.retries.inc()
        elif outcome == "dead_lettered":
            self.dead_letters.labels(error_class=error_class or "unknown").inc()
        for kind, count in (
            ("read", rows_read),
            ("accepted", rows_accepted),
            ("rejected", rows_rejected),
        ):
            if count > 0:
                self._rows_by_kind[kind].inc(count)

    def stage(self, stage: str, seconds: float) -> None:
        """Record one stage time on its own (when stages are not passed to `job_finished`)."""
        self.stage_duration.labels(stage=stage).observe(max(0.0, seconds))

    def in_flight(self, n: int) -> None:
        """Set the number of jobs this worker holds."""
        self.jobs_in_flight.set(n)


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
