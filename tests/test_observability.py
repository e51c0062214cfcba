"""The health/metrics server over real HTTP, scraped and parsed as Prometheus would."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.observability import AggregatorMetrics, HealthServer, LivenessProbe, WorkerMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> tuple[int, str, str]:
    """Status, body and content type of a GET (HTTP errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
            return response.status, body, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers.get("Content-Type", "")


def _scrape(port: int) -> Samples:
    status, body, content_type = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def in_hand() -> list[int]:
    """The jobs a worker holds, as its metrics read them at scrape time."""
    return [2]


@pytest.fixture
def worker_metrics(in_hand: list[int]) -> WorkerMetrics:
    metrics = WorkerMetrics(in_flight=lambda: in_hand[0])
    stages = {
        "check": 0.01,
        "read": 0.2,
        "compute": 0.1,
        "upload": 0.5,
        "publish": 0.02,
        "ack": 0.003,
    }
    for _ in range(3):
        metrics.job_finished(
            "succeeded", 0.9, stages, rows_read=100, rows_accepted=95, rows_rejected=5
        )
    metrics.job_finished("retry_scheduled", 0.4)
    metrics.job_finished("dead_lettered", 0.3, error_class="permanent")
    metrics.job_finished("dead_lettered", 0.001, error_class="poison")
    return metrics


@pytest.fixture
def server(worker_metrics: WorkerMetrics) -> Iterator[tuple[HealthServer, int, list[bool]]]:
    alive = [True]
    health = HealthServer(worker_metrics.registry, liveness=lambda: alive[0])
    port = health.start(0, host="127.0.0.1")
    try:
        yield health, port, alive
    finally:
        health.stop()


def test_metrics_endpoint_counts_jobs(server: tuple[HealthServer, int, list[bool]]) -> None:
    _, port, _ = server
    s = _scrape(port)
    assert _value(s, "tickq_jobs_total", outcome="succeeded") == 3
    assert _value(s, "tickq_jobs_total", outcome="retry_scheduled") == 1
    assert _value(s, "tickq_jobs_total", outcome="dead_lettered") == 2
    assert _value(s, "tickq_retries_total") == 1
    assert _value(s, "tickq_dead_letters_total", error_class="permanent") == 1
    assert _value(s, "tickq_dead_letters_total", error_class="poison") == 1
    assert _value(s, "tickq_rows_processed_total", kind="read") == 300
    assert _value(s, "tickq_rows_processed_total", kind="accepted") == 285
    assert _value(s, "tickq_rows_processed_total", kind="rejected") == 15
    assert _value(s, "tickq_jobs_in_flight") == 2
    assert _value(s, "tickq_worker_rss_bytes") > 1 << 20
    # Histograms: every delivery is timed; stages only where the job logged them.
    assert _value(s, "tickq_job_duration_seconds_count") == 6
    assert _value(s, "tickq_job_duration_seconds_sum") == pytest.approx(3 * 0.9 + 0.4 + 0.3 + 0.001)
    assert _value(s, "tickq_job_duration_seconds_bucket", le="0.25") == 1
    assert _value(s, "tickq_job_duration_seconds_bucket", le="0.5") == 3
    assert _value(s, "tickq_job_duration_seconds_bucket", le="+Inf") == 6
    assert _value(s, "tickq_job_stage_seconds_count", stage="upload") == 3
    assert _value(s, "tickq_job_stage_seconds_sum", stage="upload") == pytest.approx(1.5)
    assert _value(s, "tickq_job_stage_seconds_bucket", stage="ack", le="0.005") == 3
    # Known stages are exported from the start, at zero, so rate() works on the first job.
    assert _value(s, "tickq_job_stage_seconds_count", stage="filter") == 0


def test_metrics_move_between_scrapes(
    server: tuple[HealthServer, int, list[bool]], worker_metrics: WorkerMetrics, in_hand: list[int]
) -> None:
    _, port, _ = server
    worker_metrics.job_finished("succeeded", 1.0, {"upload": 0.7}, rows_read=10, rows_accepted=10)
    in_hand[0] = 0
    s = _scrape(port)
    assert _value(s, "tickq_jobs_total", outcome="succeeded") == 4
    assert _value(s, "tickq_job_stage_seconds_count", stage="upload") == 4
    assert _value(s, "tickq_jobs_in_flight") == 0


def test_healthz_follows_the_liveness_callable(
    server: tuple[HealthServer, int, list[bool]],
) -> None:
    _, port, alive = server
    assert _get(f"http://127.0.0.1:{port}/healthz")[:2] == (200, "ok\n")
    alive[0] = False
    status, body, _ = _get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and body.startswith("unhealthy")
    # /metrics keeps answering: a scrape is how an operator sees why.
    assert _scrape(port)
    alive[0] = True
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    assert _get(f"http://127.0.0.1:{port}/nope")[0] == 404


def test_a_raising_liveness_callable_is_unhealthy() -> None:
    def broken() -> bool:
        raise RuntimeError("loop wedged")

    with HealthServer(liveness=broken) as health:
        port = health.start(0, host="127.0.0.1")
        status, body, _ = _get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503
    assert "loop wedged" in body


def test_stop_releases_the_port() -> None:
    health = HealthServer()
    port = health.start(0, host="127.0.0.1")
    assert health.port == port
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    health.stop()
    health.stop()  # idempotent
    assert health.port is None
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    again = HealthServer()
    assert again.start(port, host="127.0.0.1") == port
    again.stop()


def test_registries_are_dedicated() -> None:
    """Two instances in one process neither clash nor share counts (nor touch the global)."""
    from prometheus_client import REGISTRY

    a, b = WorkerMetrics(), WorkerMetrics()
    a.job_finished("succeeded", 0.1)
    assert a.registry.get_sample_value("tickq_jobs_total", {"outcome": "succeeded"}) == 1
    assert b.registry.get_sample_value("tickq_jobs_total", {"outcome": "succeeded"}) == 0
    assert REGISTRY.get_sample_value("tickq_jobs_total", {"outcome": "succeeded"}) is None


def test_aggregator_metrics_over_http() -> None:
    metrics = AggregatorMetrics()
    metrics.event("job.succeeded", 5)
    metrics.event("job.dead")
    metrics.aggregated(1.5)
    metrics.aggregated()
    metrics.runs_tracked(3)
    with HealthServer(metrics.registry) as health:
        port = health.start(0, host="127.0.0.1")
        s = _scrape(port)
    assert _value(s, "tickq_aggregator_events_total", type="job.succeeded") == 5
    assert _value(s, "tickq_aggregator_events_total", type="job.dead") == 1
    assert _value(s, "tickq_aggregations_total") == 2
    assert _value(s, "tickq_aggregator_runs_tracked") == 3
    assert _value(s, "tickq_aggregation_duration_seconds_count") == 1


def test_liveness_probe_goes_stale() -> None:
    probe = LivenessProbe(max_age_s=0.2)
    assert probe()
    time.sleep(0.3)
    assert not probe()
    probe.beat()
    assert probe() and probe.age_s < 0.2


def test_json_lines_start_without_loading_rich() -> None:
    # structlog would import rich as it loads (about 0.1 s of every process's start); tickq's
    # lines are JSON, and rich stays importable for `tickq status --watch`.
    import subprocess
    import sys

    code = (
        "import io, json, sys\n"
        "from shared.metrics import configure, get_logger\n"
        "out = io.StringIO()\n"
        "configure('worker', stream=out)\n"
        "get_logger(run_id='r').info('job.finished', rows_in=3)\n"
        "line = json.loads(out.getvalue())\n"
        "assert line['event'] == 'job.finished' and line['rows_in'] == 3 and line['component'] == 'worker'\n"
        "assert 'rich' not in sys.modules, 'rich loaded'\n"
        "import rich.progress\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_line_is_stamped_in_utc_to_the_microsecond() -> None:
    import datetime as dt
    import io
    import json

    from shared.metrics import configure, get_logger

    out = io.StringIO()
    configure("worker", stream=out)
    try:
        before = dt.datetime.now(dt.UTC)
        for i in range(3):
            get_logger().info("job.finished", n=i)
            time.sleep(0.6)  # the line's second changes between some of them
        after = dt.datetime.now(dt.UTC)
    finally:
        configure("worker")
    stamps = [json.loads(line)["ts"] for line in out.getvalue().splitlines()]
    assert all(len(ts) == len("2026-11-24T14:45:32.123456Z") and ts.endswith("Z") for ts in stamps)
    times = [dt.datetime.fromisoformat(ts) for ts in stamps]
    slack = dt.timedelta(milliseconds=1)
    assert before - slack <= times[0] < times[1] < times[2] <= after + slack
    assert times[2] - times[0] >= dt.timedelta(seconds=1.1)


def test_quiet_lines_with_nowhere_to_go_are_not_built(tmp_path: Path) -> None:
    # `--quiet` without a metrics file writes no line: building one (a worker writes one or
    # two per job) would be work for nothing. With a metrics file, quiet lines still go there.
    import json

    from shared.metrics import configure, get_logger

    built: list[str] = []

    class Rendered:
        def __repr__(self) -> str:
            built.append("line")
            return "rendered"

        __str__ = __repr__

    try:
        configure("worker", quiet=True)
        get_logger().info("job.finished", value=Rendered())
        get_logger().error("worker.failed", value=Rendered())
        assert built == []
        configure("worker", tmp_path / "metrics.jsonl", quiet=True)
        get_logger().info("job.finished", value=Rendered())
    finally:
        configure("worker")
    assert built == ["line"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["event"], line["value"]) for line in lines] == [("job.finished", "rendered")]


def test_no_line_carries_the_credentials_of_a_url(tmp_path: Path) -> None:
    # Wherever a caller puts a URL (a field, a nested mapping, a list), its user and password
    # are masked; masking never reaches across fields; a quiet line goes to the metrics file
    # and nowhere else.
    import contextlib
    import io
    import json

    from shared.metrics import configure, get_logger

    out = io.StringIO()
    try:
        configure("worker", stream=out)
        get_logger().info("worker.started", broker="amqps://tickq:s3cret@mq.example:5671/%2F",
                          inputs={"raw": ["s3://AKIA:wJal@bucket/raw", "s3://bucket/plain"]},
                          output="s3://bucket/out", owner="ops@example.com")
        configure("worker", tmp_path / "metrics.jsonl", quiet=True)
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            get_logger().info("produce.published", input="s3://key:secret@bucket/in")
    finally:
        configure("worker")
    assert "s3cret" not in out.getvalue() and "wJal" not in out.getvalue()
    line = json.loads(out.getvalue())
    assert line["broker"] == "amqps://***@mq.example:5671/%2F"
    assert line["inputs"] == {"raw": ["s3://***@bucket/raw", "s3://bucket/plain"]}
    assert (line["output"], line["owner"]) == ("s3://bucket/out", "ops@example.com")
    assert stdout.getvalue() == ""
    quiet = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert quiet["input"] == "s3://***@bucket/in"
