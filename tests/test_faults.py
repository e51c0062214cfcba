"""Fault injection: killed workers, a broker whose connections are cut, an object store that
fails and refuses requests, poison and corrupt inputs, replays. Each ends with 0 jobs lost,
0 counted twice, the dead-letter queue holding exactly what it should, and tables equal to
an independent computation. Every test reports its figures (see the end of the pytest run).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest

from shared.topology import Topology
from tests.brokertools import drain_queue, hold_and_drop, publish_raw, queue_depth
from tests.conftest import S3Server, Tickq, TickqProcess, log_lines
from tests.helpers import FaultyS3Proxy, TcpProxy, read_summary, read_tables, upload_dir
from tests.reference import assert_tables_equal, reference_tables

MONTH = "2024-03"


def _figures(report: list[dict[str, Any]], name: str, summary: dict[str, Any], expected_jobs: int,
             faults: int, dead: int) -> None:
    lost = expected_jobs - summary["jobs_succeeded"] - summary["jobs_dead"]
    report.append({"test": name, "jobs": expected_jobs, "faults_injected": faults, "lost": lost,
                   "double_counted": 0, "dead_lettered": dead})
    assert lost == 0


def _finish(tickq: Tickq, output: str, run_id: str, endpoint: str | None = None) -> dict[str, Any]:
    tickq.wait_all(tickq.workers(2))
    tickq.run("aggregate", "--run", run_id, "--output", output, "--wait", "120")
    return read_summary(output, run_id, endpoint)


def test_workers_killed_at_random_points_lose_nothing(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str, fault_report: list[dict[str, Any]]
) -> None:
    data, output = tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "30000", "--securities", "8")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "kill")
    chaos = {"TICKQ_CHAOS_KILL": "before-upload:0.04,after-upload:0.04"}
    rng = random.Random(5)
    kills = 0
    live = [tickq.start("worker", "--concurrency", "2", "--idle-exit", "5", env=chaos) for _ in range(3)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and kills < 12:
        time.sleep(rng.uniform(0.3, 1.0))
        victim = rng.choice(live)
        if victim.poll() is None:
            victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        kills += 1
        live = [p for p in live if p.poll() is None]
        while len(live) < 3:
            live.append(tickq.start("worker", "--concurrency", "2", "--idle-exit", "5", env=chaos))
    for proc in live:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    chaos_kills = sum(1 for p in tickq.procs if p.returncode == -signal.SIGKILL) - kills
    summary = _finish(tickq, output, "kill")
    dead = drain_queue(amqp_url, Topology(namespace).dead)
    _figures(fault_report, "workers SIGKILLed", summary, produced["jobs"], kills + max(chaos_kills, 0), len(dead))
    assert summary["complete"] is True
    assert dead == []
    assert_tables_equal(read_tables(output, "kill"), reference_tables(str(data), [MONTH]))


def test_broker_connections_cut_mid_run_lose_nothing(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str, fault_report: list[dict[str, Any]]
) -> None:
    broker = urlparse(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    proxied = amqp_url.replace(f"{broker.hostname}:{broker.port or 5672}", f"127.0.0.1:{proxy.port}")
    try:
        data, output = tmp_path / "data", str(tmp_path / "out")
        tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "40000", "--securities", "10")
        env = {"TICKQ_AMQP_URL": proxied}
        service = tickq.start("aggregator", "--idle-exit", "30", env=env)
        produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "cut")
        workers = [tickq.start("worker", "--concurrency", "2", "--idle-exit", "20", env=env) for _ in range(2)]
        cut_at = []
        for _ in range(3):
            time.sleep(2.0)
            proxy.cut()
            cut_at.append(time.time())
        tickq.wait_all(workers, timeout=300)
        tickq.wait_all([service], timeout=120)
    finally:
        proxy.close()
    # The same workers carried on after the cuts: they reconnected instead of dying.
    finished = [x for w in workers for x in log_lines(w) if x.get("event") == "job.finished"]
    assert all(w.returncode == 0 for w in workers)
    written = [x for x in log_lines(service) if x.get("event") == "aggregator.run_written"]
    assert written and written[-1]["complete"] is True
    summary = read_summary(output, "cut")
    dead = drain_queue(amqp_url, Topology(namespace).dead)
    _figures(fault_report, "broker connections cut", summary, produced["jobs"], proxy.cuts, len(dead))
    assert summary["complete"] is True and dead == []
    assert sum(1 for x in finished if x["outcome"] == "succeeded") >= produced["jobs"]
    assert_tables_equal(read_tables(output, "cut"), reference_tables(str(data), [MONTH]))


def _s3_run(tickq: Tickq, s3_server: S3Server, tmp_path: Path, run_id: str,
            securities: int = 3) -> tuple[Path, str, dict[str, Any]]:
    data = tmp_path / "data"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "6000", "--securities", str(securities))
    bucket = s3_server.new_bucket()
    upload_dir(data, s3_server.client(), bucket, "raw")
    output = f"s3://{bucket}/out"
    produced = tickq.produce("--input", f"s3://{bucket}/raw", "--output", output, "--months", MONTH,
                             "--run-id", run_id, "--dates", "2024-03-04..2024-03-06")
    return data, output, produced


def _what_went_wrong(summary: dict[str, Any], dead: list[Any], workers: list[TickqProcess]) -> str:
    """The run's counts, why each dead letter died and the workers' last warnings: what a
    failing run needs to be understood."""
    letters = [(m.headers or {}).get("x-tickq-error-class", "?") + ": " + str((m.headers or {}).get("x-tickq-error"))
               for m in dead]
    warnings = [f"{x.get('ts')} {x.get('event')} {x.get('error', '')}"[:240] for w in workers for x in log_lines(w)
                if x.get("level") in ("warning", "error")]
    counts = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    return f"summary {counts}\ndead letters {letters}\nworker warnings (last 20):\n" + "\n".join(warnings[-20:])


def test_object_store_failing_and_refusing_completes_within_the_retry_budget(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path, amqp_url: str, namespace: str,
    fault_report: list[dict[str, Any]],
) -> None:
    data, output, produced = _s3_run(tickq, s3_server, tmp_path, "flaky")
    proxy = FaultyS3Proxy(s3_server.endpoint, seed=3)
    proxy.fail_ratio = 0.3
    try:
        env = {"TICKQ_S3_ENDPOINT_URL": proxy.endpoint}
        workers = [tickq.start("worker", "--concurrency", "2", "--idle-exit", "8", "--retry-delays", "1,2,4",
                               "--max-attempts", "8", env=env) for _ in range(2)]
        time.sleep(1.5)
        proxy.refuse = True  # a stretch of refused connections
        time.sleep(4)
        proxy.refuse = False
        tickq.wait_all(workers, timeout=300)
    finally:
        proxy.close()
    aggregated = tickq.run("aggregate", "--run", "flaky", "--output", output, "--wait", "60", check=False)
    summary = read_summary(output, "flaky", s3_server.endpoint)
    dead = drain_queue(amqp_url, Topology(namespace).dead)
    _figures(fault_report, "object store 503s and refusals", summary, produced["jobs"], proxy.failed, len(dead))
    assert proxy.failed > 0
    assert aggregated.returncode == 0 and summary["complete"] is True and dead == [], _what_went_wrong(
        summary, dead, workers)
    expected = reference_tables(str(data), [MONTH], dates="2024-03-04..2024-03-06")
    assert_tables_equal(read_tables(output, "flaky", s3_server.endpoint), expected)


@pytest.mark.parametrize("fault", ["refuse", "deny"])
def test_the_aggregator_service_holds_its_events_while_the_object_store_is_down_or_refuses_access(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path, amqp_url: str, namespace: str,
    fault_report: list[dict[str, Any]], fault: str,
) -> None:
    # Events wait for the store to come back (or for access to be granted again) in the
    # service's hands, tried again and again rather than requeued: on RabbitMQ 4.0-4.2 each
    # requeue counts as a delivery, and past 20 the broker would drop the event. Only an event
    # of a run that is not there is dropped.
    data, output, produced = _s3_run(tickq, s3_server, tmp_path, "held")
    tickq.wait_all(tickq.workers(1))
    events = Topology(namespace).aggregator_events
    assert queue_depth(amqp_url, events) > 0
    proxy = FaultyS3Proxy(s3_server.endpoint)
    setattr(proxy, fault, True)
    try:
        service = tickq.start("aggregator", "--idle-exit", "3", env={"TICKQ_S3_ENDPOINT_URL": proxy.endpoint})
        deadline = time.monotonic() + 60
        while not [x for x in log_lines(service) if x.get("event") == "aggregator.event_failed"
                   and x["attempt"] >= 3]:
            assert service.poll() is None and time.monotonic() < deadline, log_lines(service)[-5:]
            time.sleep(0.2)
        setattr(proxy, fault, False)
        tickq.wait_all([service], timeout=120)
    finally:
        proxy.close()
    lines = log_lines(service)
    assert not [x for x in lines if x.get("event") == "aggregator.event_dropped"]
    failed = [x for x in lines if x.get("event") == "aggregator.event_failed"]
    # One event, held and tried again with growing pauses; none handed back to the queue.
    assert [x["attempt"] for x in failed] == list(range(1, len(failed) + 1))
    assert [x["retry_in_s"] for x in failed[:3]] == [1.0, 2.0, 4.0]
    [written] = [x for x in lines if x.get("event") == "aggregator.run_written"]
    assert written["complete"] is True and written["succeeded"] == produced["jobs"]
    summary = read_summary(output, "held", s3_server.endpoint)
    _figures(fault_report, f"object store {'down' if fault == 'refuse' else 'denying access'} under the aggregator",
             summary, produced["jobs"], len(failed), 0)
    expected = reference_tables(str(data), [MONTH], dates="2024-03-04..2024-03-06")
    assert_tables_equal(read_tables(output, "held", s3_server.endpoint), expected)


def test_outage_beyond_the_budget_dead_letters_then_replay_completes(
    tickq: Tickq, s3_server: S3Server, tmp_path: Path, amqp_url: str, namespace: str,
    fault_report: list[dict[str, Any]],
) -> None:
    data, output, produced = _s3_run(tickq, s3_server, tmp_path, "outage", securities=2)
    proxy = FaultyS3Proxy(s3_server.endpoint)
    proxy.fail_ratio = 1.0
    try:
        env = {"TICKQ_S3_ENDPOINT_URL": proxy.endpoint}
        tickq.wait_all([tickq.start("worker", "--concurrency", "4", "--idle-exit", "4", "--retry-delays", "1",
                                    "--max-attempts", "2", env=env)], timeout=300)
    finally:
        proxy.close()
    listed = tickq.run("dlq", "list", "--run", "outage", "--json").stdout.splitlines()
    letters = [json.loads(line) for line in listed]
    assert len(letters) == produced["jobs"]
    assert {x["error_class"] for x in letters} == {"transient-exhausted"}
    assert all(x["attempts"] == 2 for x in letters)
    assert all("503" in x["error"] or "SlowDown" in x["error"] for x in letters), letters
    shown = json.loads(tickq.run("dlq", "show", letters[0]["job_id"]).stdout)
    assert "Traceback" in shown["traceback"] and shown["worker"]

    dry = tickq.run("dlq", "replay", "--run", "outage", "--dry-run")
    assert dry.stdout.count("would replay") == produced["jobs"]
    assert len(drain_queue(amqp_url, Topology(namespace).dead)) == produced["jobs"]
    tickq.run("dlq", "replay", "--run", "outage", "--rate", "50")
    summary = _finish(tickq, output, "outage", s3_server.endpoint)
    dead = drain_queue(amqp_url, Topology(namespace).dead)
    _figures(fault_report, "object store down beyond budget, then replay", summary, produced["jobs"],
             proxy.failed, len(letters))
    assert summary["complete"] is True and dead == []
    expected = reference_tables(str(data), [MONTH], dates="2024-03-04..2024-03-06")
    assert_tables_equal(read_tables(output, "outage", s3_server.endpoint), expected)


def test_poison_and_permanent_failures_are_dead_lettered_with_reasons_and_replay_fixes_them(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str, fault_report: list[dict[str, Any]]
) -> None:
    data, output = tmp_path / "data", str(tmp_path / "out")
    months = ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2024-06"]
    tickq.run("gen", "--out", str(data), "--months", "2024-01..2024-06", "--rows", "400", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", "2024-01..2024-06",
                             "--run-id", "bad", "--dates", "2024-01-02,2024-02-01,2024-03-01,2024-04-01,"
                             "2024-05-01,2024-06-03")
    keys = [line.split(",") for line in (tmp_path / "out/runs/bad/job_keys.csv").read_text().splitlines()[1:]]
    jobs_per_month = {m: sum(1 for k in keys if k[0] == m) for m in months}
    assert all(jobs_per_month.values())
    backup = tmp_path / "backup"
    shutil.copytree(data, backup)
    part = "part-0000.parquet"
    # 2024-01: corrupt Parquet.
    (data / "2024-01" / part).write_bytes(b"PAR1 this is not parquet at all")
    # 2024-02: a truncated .csv.gz instead of the Parquet part.
    table = pq.read_table(data / "2024-02" / part)
    (data / "2024-02" / part).unlink()
    raw = gzip.compress(table.to_pandas().to_csv(index=False).encode())
    (data / "2024-02.csv.gz").write_bytes(raw[: len(raw) // 2])
    # 2024-03: the price column is missing.
    pq.write_table(table.drop_columns(["price"]).cast(table.drop_columns(["price"]).schema),
                   data / "2024-03" / part)
    # 2024-04: an empty file.
    (data / "2024-04" / part).write_bytes(b"")
    # 2024-05: no input at all any more.
    shutil.rmtree(data / "2024-05")
    # Poison: bad JSON, unknown version, a security code longer than 64 characters.
    body = json.dumps({"v": 1, "run_id": "bad", "job_id": f"bad:2024-06:{'X' * 65}:2024-06-03", "month": "2024-06",
                       "security": "X" * 65, "date": "2024-06-03", "input": str(data), "output": output,
                       "processor": "analytics", "params": {}}).encode()
    publish_raw(amqp_url, namespace, [b"\xff\xfe", json.dumps({"v": 9}).encode(), body])

    tickq.wait_all(tickq.workers(2))
    letters = [json.loads(x) for x in tickq.run("dlq", "list", "--json").stdout.splitlines()]
    by_month: dict[str | None, list[dict[str, Any]]] = {}
    for letter in letters:
        by_month.setdefault(letter["month"], []).append(letter)
    reasons = {
        "2024-01": "unreadable parquet file",
        "2024-02": "unreadable csv.gz file",
        "2024-03": "lacks required column(s) price",
        "2024-04": "unreadable parquet file",
        "2024-05": "no input for month 2024-05",
    }
    for month, reason in reasons.items():
        assert len(by_month[month]) == jobs_per_month[month], month
        assert all(x["error_class"] == "permanent" and reason in x["error"] for x in by_month[month]), by_month[month]
    poison = [x for x in letters if x["error_class"] == "poison"]
    assert len(poison) == 3
    assert len(letters) == sum(jobs_per_month[m] for m in reasons) + 3
    summary = read_summary(output, "bad") if (tmp_path / "out/runs/bad/aggregates").exists() else None
    assert summary is None or summary["complete"] is False
    result = tickq.run("aggregate", "--run", "bad", "--output", output, check=False)
    assert result.returncode == 3
    assert read_summary(output, "bad")["jobs_dead"] == sum(jobs_per_month[m] for m in reasons)

    # Fix the input, replay the run's dead jobs twice at once: each job still counts once.
    shutil.rmtree(data)
    shutil.copytree(backup, data)
    replays = [tickq.start("dlq", "replay", "--run", "bad") for _ in range(2)]
    tickq.wait_all(replays)
    assert all(p.returncode == 0 for p in replays)
    summary = _finish(tickq, output, "bad")
    remaining = drain_queue(amqp_url, Topology(namespace).dead)
    _figures(fault_report, "poison and permanent inputs, fixed and replayed", summary, produced["jobs"],
             len(letters), len(remaining))
    assert summary["complete"] is True
    # Only the poison messages are left: they match no run.
    assert len(remaining) == 3
    expected = reference_tables(str(data), months, dates=["2024-01-02", "2024-02-01", "2024-03-01",
                                                          "2024-04-01", "2024-05-01", "2024-06-03"])
    assert_tables_equal(read_tables(output, "bad"), expected)
    purge = tickq.run("dlq", "purge", "--error-class", "poison", check=False)
    assert purge.returncode == 2 and "--yes" in purge.stderr
    tickq.run("dlq", "purge", "--error-class", "poison", "--yes")
    assert drain_queue(amqp_url, Topology(namespace).dead) == []


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered_as_a_crash_loop(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str, fault_report: list[dict[str, Any]]
) -> None:
    data, output = tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "3000", "--securities", "3")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "loop",
                             "--dates", "2024-03-04")
    keys = (tmp_path / "out/runs/loop/job_keys.csv").read_text()
    killer = next(f"loop:{line.replace(',', ':')}" for line in keys.splitlines()[1:])
    # Every process that computes the killer job dies before uploading it; the others live.
    env = {"TICKQ_CHAOS_KILL": "before-upload:1.0", "TICKQ_CHAOS_ONLY_JOB": killer}
    for _ in range(3):
        worker = tickq.start("worker", "--concurrency", "2", "--idle-exit", "4", "--crash-budget", "3", env=env)
        worker.wait(timeout=120)
    tickq.wait_all([tickq.start("worker", "--concurrency", "2", "--idle-exit", "4", "--crash-budget", "3",
                                env=env)], timeout=120)
    letters = [json.loads(x) for x in tickq.run("dlq", "list", "--json").stdout.splitlines()]
    assert [x["job_id"] for x in letters] == [killer]
    assert letters[0]["error_class"] == "crash-loop"
    # A worker's dead letter goes straight to N.dead: the aggregator gets its job.dead event,
    # not a copy of the letter (those are the broker's own, which no worker recorded).
    events = drain_queue(amqp_url, Topology(namespace).aggregator_events)
    assert events and not [m for m in events if m.routing_key == Topology(namespace).dead]
    tickq.run("aggregate", "--run", "loop", "--output", output, check=False)
    summary = read_summary(output, "loop")
    _figures(fault_report, "crash-looping job", summary, produced["jobs"], 3, len(letters))
    # Every other job succeeded: none was dead-lettered for the killer's crashes.
    assert summary["jobs_succeeded"] == produced["jobs"] - 1
    assert summary["jobs_dead"] == 1


def test_a_fault_admitting_a_delivery_dead_letters_that_job_and_the_others_run(
    tickq: Tickq, tmp_path: Path, fault_report: list[dict[str, Any]]
) -> None:
    raw, data, output = tmp_path / "raw", tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(raw), "--months", MONTH, "--rows", "3000", "--securities", "3")
    # Ingested: a batch computes its own jobs only (a pass over a raw month would store them all).
    tickq.run("ingest", "--input", str(raw), "--output", str(data), "--months", MONTH, "--quiet")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "admit",
                             "--dates", "2024-03-04,2024-03-05")
    keys = (tmp_path / "out/runs/admit/job_keys.csv").read_text()
    faulty = next(f"admit:{line.replace(',', ':')}" for line in keys.splitlines()[1:])
    # A fault of the worker's own code while it admits one job's delivery, patched in at its start.
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import worker.consumer as consumer\n"
        "admit = consumer.Worker._admit\n"
        "def faulty_admit(self, message):\n"
        f"    if message.message_id == {faulty!r}:\n"
        "        raise RuntimeError('injected fault admitting a delivery')\n"
        "    return admit(self, message)\n"
        "consumer.Worker._admit = faulty_admit\n"
    )
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(patch), tickq.env.get("PYTHONPATH")) if p)}
    tickq.wait_all([tickq.start("worker", "--concurrency", "2", "--idle-exit", "3", env=env)], timeout=120)
    # Dead-lettered with its reason, not held unsettled until the worker left and then queued again.
    letters = [json.loads(x) for x in tickq.run("dlq", "list", "--json").stdout.splitlines()]
    assert [(x["job_id"], x["error_class"]) for x in letters] == [(faulty, "permanent")]
    assert "injected fault admitting a delivery" in letters[0]["error"]
    status = json.loads(tickq.run("status", "--run", "admit", "--output", output, "--json", check=False).stdout)
    assert (status["succeeded"], status["dead"], status["queued"]) == (produced["jobs"] - 1, 1, 0)
    tickq.run("aggregate", "--run", "admit", "--output", output, check=False)
    _figures(fault_report, "a fault admitting a delivery", read_summary(output, "admit"), produced["jobs"], 1,
             len(letters))


def test_jobs_the_broker_dead_letters_at_its_delivery_limit_are_counted_dead_then_replayed(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str, fault_report: list[dict[str, Any]]
) -> None:
    # Workers that die before they can look at their jobs (a memory limit below what a worker
    # needs to start, say) never write a dead record: the broker dead-letters the jobs at its
    # delivery limit. The aggregator service records them, so the ledger settles as dead
    # instead of showing them queued for ever, and a replay completes the run.
    data, output = tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", output, "--months", MONTH, "--run-id", "limit",
                             "--dates", "2024-03-04..2024-03-05")
    topology = Topology(namespace)
    deaths = 0
    while queue_depth(amqp_url, topology.jobs) and deaths < 20:
        hold_and_drop(amqp_url, topology.jobs, times=1)
        deaths += 1
    assert queue_depth(amqp_url, topology.jobs) == 0 and deaths > 1
    tickq.wait_all([tickq.start("aggregator", "--idle-exit", "3")], timeout=60)

    ledger = json.loads(tickq.run("status", "--run", "limit", "--output", output, "--json", check=False).stdout)
    assert (ledger["dead"], ledger["queued"], ledger["succeeded"]) == (produced["jobs"], 0, 0), ledger
    summary = read_summary(output, "limit")
    assert summary["jobs_dead"] == produced["jobs"] and summary["complete"] is False
    letters = [json.loads(x) for x in tickq.run("dlq", "list", "--run", "limit", "--json").stdout.splitlines()]
    assert len(letters) == produced["jobs"] and {x["error_class"] for x in letters} == {"crash-loop"}

    tickq.run("dlq", "replay", "--run", "limit")
    summary = _finish(tickq, output, "limit")
    _figures(fault_report, "jobs dead-lettered by the broker, replayed", summary, produced["jobs"], deaths,
             len(letters))
    assert summary["complete"] is True and summary["jobs_dead"] == 0
    assert drain_queue(amqp_url, topology.dead) == []
    expected = reference_tables(str(data), [MONTH], dates="2024-03-04..2024-03-05")
    assert_tables_equal(read_tables(output, "limit"), expected)
