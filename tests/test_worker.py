"""The worker's promises: it survives bad messages, shuts down without losing jobs, and keeps
its broker connection through jobs longer than the heartbeat interval."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from shared.messages import JobMessage, JobParams
from shared.resources import available
from shared.topology import Topology
from tests.brokertools import consumers, delete_queue, drain_queue, hold_and_drop, publish_raw
from tests.conftest import S3Server, Tickq, TickqProcess, log_lines
from tests.helpers import FaultyS3Proxy, read_tables
from tests.reference import assert_tables_equal, reference_tables
from worker.host_share import auto_slots

MONTH = "2024-03"


def _wait_for_event(proc: TickqProcess, event: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
    """The first `event` line of `proc` with these `fields`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_lines(proc):
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items()):
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"no {event} line with {fields}; log tail: {proc.log_path.read_text()[-2000:]}")


def _job(run_id: str, month: str, security: str, date: str, input_uri: str, output_uri: str) -> JobMessage:
    return JobMessage.build(
        run_id=run_id, month=month, security=security, date=date, input=input_uri, output=output_uri,
        processor="analytics", params=JobParams(),
    )


def test_bad_messages_and_missing_input_do_not_crash_the_worker(
    tickq: Tickq, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "ok")
    good = json.loads(_job("x", MONTH, "AAA", "2024-03-04", str(data), str(output)).to_body())
    unknown_version = json.dumps({**good, "v": 2}).encode()
    too_long = "X" * 65
    invalid = json.dumps({**good, "security": too_long, "job_id": f"x:2024-03:{too_long}:2024-03-04"}).encode()
    missing_input = _job("x", "2023-01", "AAA", "2023-01-04", str(data), str(output)).to_body()
    publish_raw(amqp_url, namespace, [b"not json {", unknown_version, invalid, missing_input])

    worker = tickq.workers(1)[0]
    tickq.wait_all([worker])
    assert worker.returncode == 0

    dead = drain_queue(amqp_url, Topology(namespace).dead)
    classes = sorted(str(m.headers["x-tickq-error-class"]) for m in dead)
    assert classes == ["permanent", "poison", "poison", "poison"]
    for message in dead:
        assert message.headers["x-tickq-error"]
        assert message.headers["x-tickq-worker"]
        assert message.headers["x-tickq-failed-at"]
        assert int(str(message.headers["x-tickq-attempts"])) >= 1
    permanent = next(m for m in dead if m.headers["x-tickq-error-class"] == "permanent")
    assert "no input for month 2023-01" in str(permanent.headers["x-tickq-error"])
    assert not (output / "runs" / "x" / "succeeded").exists()
    # The good run still completed: the worker survived every bad message.
    tickq.run("aggregate", "--run", "ok", "--output", str(output))
    assert_tables_equal(read_tables(str(output), "ok"), reference_tables(str(data), [MONTH]))
    finished = [x for x in log_lines(worker) if x.get("event") == "job.finished"]
    assert sum(1 for x in finished if x["outcome"] == "succeeded") == produced["jobs"]


def test_a_worker_whose_consumer_the_broker_cancelled_declares_the_queue_again_and_goes_on(
    tickq: Tickq, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    publish_raw(amqp_url, namespace, [])  # the topology exists before the worker subscribes
    worker = tickq.start("worker", "--concurrency", "1", "--idle-exit", "5")
    # The broker's own count of the worker's consumer, whose cancelling is under test.
    deadline = time.monotonic() + 60
    while consumers(amqp_url, Topology(namespace).jobs) == 0:
        assert worker.poll() is None and time.monotonic() < deadline, worker.log_path.read_text()[-2000:]
        time.sleep(0.05)

    delete_queue(amqp_url, Topology(namespace).jobs)  # an operator's mistake: the queue is gone
    _wait_for_event(worker, "worker.consumer_cancelled")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH)
    tickq.wait_all([worker])

    assert worker.returncode == 0
    finished = [line for line in log_lines(worker) if line.get("event") == "job.finished"]
    assert len(finished) == produced["jobs"] > 0
    assert {line["outcome"] for line in finished} == {"succeeded"}


def test_auto_sized_workers_on_one_host_share_its_cores_and_take_them_back(
    tickq: Tickq, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    """Two workers left at `--concurrency auto` on one host run its cores between them, not
    each all of them; the one left takes them all again. Jobs go on meanwhile, each once."""
    resources = available()
    alone, shared = (auto_slots(resources.cpus, resources.memory_bytes, n) for n in (1, 2))
    if alone == shared:
        pytest.skip(f"{resources.cpus} CPU(s): an auto-sized worker runs one slot with or without others")
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "20000", "--securities", "5")
    publish_raw(amqp_url, namespace, [])  # the topology exists before the workers subscribe
    jobs = Topology(namespace).jobs
    first = tickq.start("worker", "--concurrency", "auto", "--idle-exit", "120")
    _wait_for_event(first, "worker.started", concurrency=alone, prefetch=1024 * alone, workers_on_host=1)

    second = tickq.start("worker", "--concurrency", "auto", "--idle-exit", "120")
    _wait_for_event(second, "worker.started", concurrency=shared, prefetch=1024 * shared, workers_on_host=2)
    _wait_for_event(first, "worker.resized", concurrency=shared, prefetch=1024 * shared, workers_on_host=2)
    time.sleep(0.5)
    # The first worker's consumer was replaced by one of the new prefetch, not added to.
    assert consumers(amqp_url, jobs) == 2

    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "shared")
    tickq.run("aggregate", "--run", "shared", "--output", str(output), "--wait", "120")
    assert_tables_equal(read_tables(str(output), "shared"), reference_tables(str(data), [MONTH]))

    second.send_signal(signal.SIGTERM)
    tickq.wait_all([second])
    _wait_for_event(first, "worker.resized", concurrency=alone, prefetch=1024 * alone, workers_on_host=1)
    # The second worker's place went with it: only the first one's is left.
    assert [name.split("-")[0] for name in os.listdir(tmp_path / "host-workers")] == [str(first.pid)]

    # A worker of a fixed concurrency counts too: it uses the host's cores as well.
    fixed = tickq.start("worker", "--concurrency", "1", "--idle-exit", "120")
    deadline = time.monotonic() + 60
    while sum(1 for line in log_lines(first) if line.get("event") == "worker.resized") < 3:
        assert time.monotonic() < deadline, first.log_path.read_text()[-2000:]
        time.sleep(0.1)
    resized = [line for line in log_lines(first) if line.get("event") == "worker.resized"]
    assert (resized[-1]["concurrency"], resized[-1]["workers_on_host"]) == (shared, 2)
    for proc in (fixed, first):
        proc.send_signal(signal.SIGTERM)
    tickq.wait_all([fixed, first])
    finished = [line for proc in (first, second, fixed) for line in log_lines(proc)
                if line.get("event") == "job.finished"]
    assert len(finished) == produced["jobs"] > 0
    assert {line["outcome"] for line in finished} == {"succeeded"}


def test_jobs_whose_holders_died_more_than_the_crash_budget_run_isolated_and_succeed(
    tickq: Tickq, amqp_url: str, namespace: str, tmp_path: Path
) -> None:
    # A delivery count says a worker holding the job died or lost its connection; every job
    # it had prefetched shares that, so it is no evidence against any one of them.
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH,
                             "--run-id", "held", "--dates", "2024-03-04..2024-03-06")
    assert hold_and_drop(amqp_url, Topology(namespace).jobs, times=6) == produced["jobs"]

    worker = tickq.start("worker", "--concurrency", "2", "--idle-exit", "3", "--crash-budget", "5",
                         env={"TICKQ_LOG_LEVEL": "debug"})
    tickq.wait_all([worker])
    assert drain_queue(amqp_url, Topology(namespace).dead) == []
    started = [x for x in log_lines(worker) if x.get("event") == "job.started"]
    # Each job was renewed once (a fresh copy carrying its 6 returns), then ran isolated.
    assert len(started) == produced["jobs"]
    assert all(x["returns"] == 6 and x["isolated"] is True for x in started), started
    tickq.run("aggregate", "--run", "held", "--output", str(output))
    expected = reference_tables(str(data), [MONTH], dates="2024-03-04..2024-03-06")
    assert_tables_equal(read_tables(str(output), "held"), expected)


def _slow_run(tickq: Tickq, s3_server: S3Server, tmp_path: Path, delay_s: float,
              run_id: str) -> tuple[Path, str, FaultyS3Proxy, dict[str, Any]]:
    data, laid = tmp_path / "data", tmp_path / "laid"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "3000", "--securities", "2",
              "--format", "csv")
    # Ingested, so that every batch reads its own jobs' rows through the slow store (a raw
    # month's first pass would compute all of its jobs at once).
    tickq.run("ingest", "--input", str(data), "--output", str(laid), "--months", MONTH)
    bucket = s3_server.new_bucket()
    s3 = s3_server.client()
    for path in laid.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"raw/{path.relative_to(laid).as_posix()}")
    proxy = FaultyS3Proxy(s3_server.endpoint)
    proxy.delay_s = delay_s
    output = f"s3://{bucket}/out"
    produced = tickq.produce("--input", f"s3://{bucket}/raw", "--output", output, "--months", MONTH,
                             "--run-id", run_id, "--dates", "2024-03-04..2024-03-05")
    return data, output, proxy, produced


def test_sigterm_finishes_the_job_in_hand_and_loses_nothing(tickq: Tickq, s3_server: S3Server, tmp_path: Path) -> None:
    data, output, proxy, produced = _slow_run(tickq, s3_server, tmp_path, 0.3, "term")
    try:
        worker = tickq.start("worker", "--concurrency", "1", "--prefetch", "3",
                             env={"TICKQ_S3_ENDPOINT_URL": proxy.endpoint, "TICKQ_LOG_LEVEL": "debug"})
        started = _wait_for_event(worker, "job.started")
        # A job is logged as started when it reaches the batcher; one whose batch has not begun
        # when SIGTERM comes is handed back, by design. Signal once its batch runs (the first).
        _wait_for_event(worker, "batch.started")
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=120)
        assert worker.returncode == 0
        lines = log_lines(worker)
        finished = [x for x in lines if x.get("event") == "job.finished"]
        received = {x["job_id"] for x in lines if x.get("event") == "job.started"}
        # The jobs in hand were finished, not abandoned; the others went back to the queue.
        assert started["job_id"] in {x["job_id"] for x in finished}
        assert {x["job_id"] for x in finished} <= received
        assert all(x["outcome"] == "succeeded" for x in finished)
        assert len(finished) < produced["jobs"]
    finally:
        proxy.close()
    tickq.wait_all(tickq.workers(1))
    tickq.run("aggregate", "--run", "term", "--output", output)
    expected = reference_tables(str(data), [MONTH], dates=["2024-03-04", "2024-03-05"])
    assert len(expected["security_daily"]) == produced["jobs"]
    assert_tables_equal(read_tables(output, "term", s3_server.endpoint), expected)


def test_a_worker_started_late_takes_jobs_the_busy_one_holds_but_has_not_started(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path
) -> None:
    data, output, proxy, produced = _slow_run(tickq, s3_server, tmp_path, 0.5, "share")
    assert produced["jobs"] == 4
    try:
        # The busy worker draws all four jobs into its prefetch: a batch of two runs (slowly,
        # through the slow store), two wait for its one slot. The queue is empty.
        busy = tickq.start("worker", "--concurrency", "1", "--prefetch", "4", "--idle-exit", "3",
                           env={"TICKQ_S3_ENDPOINT_URL": proxy.endpoint, "TICKQ_LOG_LEVEL": "debug"})
        _wait_for_event(busy, "batch.started", jobs=2)
        late = tickq.start("worker", "--concurrency", "1", "--idle-exit", "3")
        tickq.wait_all([busy, late], timeout=300)
    finally:
        proxy.close()
    # Half of the two waiting, then (when the late worker is idle again, if the busy one's
    # batch still runs) the other.
    shared = [x["jobs"] for x in log_lines(busy) if x.get("event") == "worker.jobs_shared"]
    assert shared in ([1], [1, 1]), shared
    done = {name: [x for x in log_lines(proc) if x.get("event") == "job.finished"]
            for name, proc in (("busy", busy), ("late", late))}
    # Before: 0, the busy worker held every job to the end.
    assert len(done["late"]) == sum(shared)
    assert len(done["busy"]) == produced["jobs"] - sum(shared)
    # Each job ran once, on one worker, and the run's tables are whole.
    assert all(x["outcome"] == "succeeded" for x in done["busy"] + done["late"])
    assert len({x["job_id"] for x in done["busy"] + done["late"]}) == produced["jobs"]
    tickq.run("aggregate", "--run", "share", "--output", output)
    expected = reference_tables(str(data), [MONTH], dates=["2024-03-04", "2024-03-05"])
    assert_tables_equal(read_tables(output, "share", s3_server.endpoint), expected)


def test_sigterm_past_the_shutdown_timeout_requeues_the_job(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path
) -> None:
    data, output, proxy, _ = _slow_run(tickq, s3_server, tmp_path, 1.0, "abandon")
    try:
        worker = tickq.start("worker", "--concurrency", "1", "--prefetch", "1", "--shutdown-timeout", "0.5",
                             env={"TICKQ_S3_ENDPOINT_URL": proxy.endpoint, "TICKQ_LOG_LEVEL": "debug"})
        # Signal once the job runs (its batch started): a job still waiting for its batch is
        # handed back at once, by design, with no timeout to pass.
        _wait_for_event(worker, "batch.started")
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        assert worker.returncode == 0
        assert _wait_for_event(worker, "worker.shutdown_timeout")["jobs_requeued"] == 1
    finally:
        proxy.close()
    tickq.wait_all(tickq.workers(1))
    tickq.run("aggregate", "--run", "abandon", "--output", output)
    expected = reference_tables(str(data), [MONTH], dates=["2024-03-04", "2024-03-05"])
    assert_tables_equal(read_tables(output, "abandon", s3_server.endpoint), expected)


def test_a_job_longer_than_two_heartbeats_keeps_its_connection(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path, amqp_url: str
) -> None:
    heartbeat_s = 2
    _, _, proxy, produced = _slow_run(tickq, s3_server, tmp_path, 1.0, "long")
    try:
        url = amqp_url + ("&" if "?" in amqp_url else "?") + f"heartbeat={heartbeat_s}"
        worker = tickq.start("worker", "--concurrency", "1", "--prefetch", "1", "--idle-exit", "3",
                             env={"TICKQ_S3_ENDPOINT_URL": proxy.endpoint, "TICKQ_AMQP_URL": url,
                                  "TICKQ_LOG_LEVEL": "debug"})
        tickq.wait_all([worker], timeout=300)
    finally:
        proxy.close()
    lines = log_lines(worker)
    finished = [x for x in lines if x.get("event") == "job.finished"]
    assert len(finished) == produced["jobs"]
    assert all(x["outcome"] == "succeeded" for x in finished)
    assert min(x["duration_s"] for x in finished) > 2 * heartbeat_s
    # Every ack went through on the connection the job arrived on: none failed or repeated.
    assert not [x for x in lines if x.get("event") in ("settle.failed", "publish.failed")]
    started = [x for x in lines if x.get("event") == "job.started"]
    assert len(started) == produced["jobs"]
    assert all(x["returns"] == 0 for x in started)  # none was redelivered


def test_worker_serves_health_and_prometheus_metrics_while_it_works(tickq: Tickq, tmp_path: Path) -> None:
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "4000", "--securities", "3")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "prom")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = tickq.start("worker", "--concurrency", "2", "--idle-exit", "15", "--health-port", str(port))
    deadline = time.monotonic() + 60
    succeeded = 0.0
    while time.monotonic() < deadline and succeeded < produced["jobs"]:
        time.sleep(0.5)
        try:
            health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        assert health.status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        succeeded = samples.get(("tickq_jobs_total", (("outcome", "succeeded"),)), 0.0)
    assert succeeded == produced["jobs"]
    rows_read = samples[("tickq_rows_processed_total", (("kind", "read"),))]
    assert rows_read == 4000
    assert samples[("tickq_worker_rss_bytes", ())] > 0
    assert samples[("tickq_job_duration_seconds_count", ())] == produced["jobs"]
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=60)


def test_log_level_hides_debug_lines_by_default_and_rejects_unknown_levels(tickq: Tickq, tmp_path: Path) -> None:
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "500", "--securities", "1")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "lvl")
    worker = tickq.start("worker", "--idle-exit", "2")
    tickq.wait_all([worker], timeout=120)
    events = [x["event"] for x in log_lines(worker)]
    assert events.count("job.finished") == produced["jobs"]
    assert "job.started" not in events  # a debug line
    bad = tickq.start("worker", env={"TICKQ_LOG_LEVEL": "chatty"})
    tickq.wait_all([bad], timeout=60)
    assert bad.returncode == 2
    assert "TICKQ_LOG_LEVEL must be one of debug, info, warning, error" in bad.log_path.read_text()


def test_worker_process_leaves_pandas_unloaded_returns_freed_arrow_memory_and_starts_no_blas_threads(
    tickq: Tickq, tmp_path: Path
) -> None:
    """Two choices that keep a worker's resident memory near 200 MB rather than 300 MB, and one
    that spares its start-up the BLAS threads numpy would spin up for nothing."""
    import subprocess
    import sys

    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "3000", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", MONTH, "--run-id", "lean")
    script = (
        "import json, os, sys\n"
        "from tickq.cli import main\n"
        f"code = main(['worker', '--max-jobs', '{produced['jobs']}', '--idle-exit', '5', '--quiet'])\n"
        "import pyarrow as pa\n"
        "print(json.dumps({'code': code, 'pandas': 'pandas' in sys.modules,"
        " 'pool': pa.default_memory_pool().backend_name, 'blas_threads': os.environ.get('OPENBLAS_NUM_THREADS')}))\n"
    )
    env = {k: v for k, v in tickq.env.items() if k not in ("ARROW_DEFAULT_MEMORY_POOL", "OPENBLAS_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tickq.workdir)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "pandas": False, "pool": "jemalloc", "blas_threads": "1"}, done.stderr[-2000:]
    assert len(list((output / "runs" / "lean" / "succeeded").rglob("*.json"))) == produced["jobs"]


def test_a_broker_refusing_the_idle_notices_leaves_the_worker_working_without_them() -> None:
    import asyncio

    import structlog.testing

    from worker.sharing import IdleNotices

    class Refusing:
        async def channel(self, publisher_confirms: bool = True) -> Any:
            raise PermissionError("ACCESS_REFUSED - queue.declare not allowed")

    heard: list[str] = []
    notices = IdleNotices(Topology("ns"), "host:1", heard.append)

    async def scenario() -> None:
        await notices.start(Refusing())  # raises nothing: the worker starts
        await notices.announce()  # sends nothing, raises nothing

    with structlog.testing.capture_logs() as logs:
        asyncio.run(scenario())
    assert [(x["event"], x["error"]) for x in logs if x["log_level"] == "warning"] == [
        ("worker.idle_notices_unavailable", "PermissionError: ACCESS_REFUSED - queue.declare not allowed")]
    assert heard == []


def test_a_worker_fed_a_trickle_of_jobs_says_it_is_idle_every_time_but_logs_it_at_info_rarely(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries coming back one by one leave a worker idle after each job: every time its notice
    goes out (another worker may hold jobs for it), but its log shows one `worker.idle` line at
    info per `IDLE_LOG_EVERY_S`, counting the notices sent since the last one."""
    import asyncio

    import structlog.testing

    from worker import sharing

    sent: list[str] = []

    class Exchange:
        async def publish(self, message: Any, routing_key: str) -> None:
            sent.append(routing_key)

    class Queue:
        async def bind(self, exchange: Any, routing_key: str) -> None: ...

        async def consume(self, callback: Any, no_ack: bool) -> None: ...

    class Channel:
        async def get_exchange(self, name: str) -> Exchange:
            return Exchange()

        async def declare_queue(self, name: str, exclusive: bool, auto_delete: bool) -> Queue:
            return Queue()

    class Connection:
        async def channel(self, publisher_confirms: bool = True) -> Channel:
            return Channel()

    clock = [1000.0]
    monkeypatch.setattr(sharing.time, "monotonic", lambda: clock[0])
    notices = sharing.IdleNotices(Topology("ns"), "host:1", lambda idle: None)

    async def trickle() -> None:
        await notices.start(Connection())
        for _ in range(3):
            await notices.announce()
            clock[0] += 1.0
        clock[0] += sharing.IDLE_LOG_EVERY_S
        await notices.announce()

    with structlog.testing.capture_logs() as logs:
        asyncio.run(trickle())
    assert sent == [sharing.IDLE_ROUTING_KEY] * 4
    assert [(x["log_level"], x.get("since_last")) for x in logs if x["event"] == "worker.idle"] == [
        ("info", 0), ("debug", None), ("debug", None), ("info", 2)]
