"""Operating a run: the demo, the status ledger, credentials kept out of every output, and the
aggregator surviving its own crash."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse, urlunparse

from shared.topology import Topology
from tests.brokertools import declare_foreign_queue, drain_queue, publish_raw, queue_depth
from tests.conftest import S3Server, Tickq, _free_port, log_lines
from tests.helpers import error_line, read_csv_tables, read_tables
from tests.reference import assert_tables_equal, reference_tables

MONTH = "2024-03"


def test_demo_runs_the_whole_pipeline_and_prints_where_the_tables_are(tickq: Tickq, tmp_path: Path) -> None:
    result = tickq.run("demo", "--rows", "20000", "--workers", "2", "--securities", "4", "--out", str(tmp_path / "d"))
    assert "tables:" in result.stdout and "0 dead" in result.stdout
    tables = next(line.split()[-1] for line in result.stdout.splitlines() if line.startswith("tables:"))
    assert (Path(tables) / "security_daily.parquet").exists()
    summary = json.loads((Path(tables) / "summary.json").read_text())
    assert summary["complete"] is True and summary["rows_read"] == 20000


def test_no_broker_is_one_clear_line_naming_the_setting(tickq: Tickq, tmp_path: Path) -> None:
    tickq.env["TICKQ_AMQP_URL"] = "amqp://someone:s3cret@127.0.0.1:1/%2F"
    result = tickq.run("demo", "--rows", "1000", "--out", str(tmp_path / "d"), check=False)
    assert result.returncode == 2
    assert "TICKQ_AMQP_URL" in result.stderr
    assert "s3cret" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_produce_without_a_broker_fails_before_it_reads_the_input_and_leaves_no_run(
    tickq: Tickq, tmp_path: Path
) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    tickq.env["TICKQ_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"
    # The broker is named even where discovery would have failed too: it was not reached.
    for source in (data, tmp_path / "no-such-input"):
        line = error_line(tickq.run("produce", "--input", str(source), "--output", str(out), "--months", MONTH,
                                    "--run-id", "r1", check=False))
        assert "no RabbitMQ broker answers" in line and "TICKQ_AMQP_URL" in line, line
    # That line is the report: the metrics on stdout add no error of a library's saying the same.
    result = tickq.run("produce", "--input", str(data), "--output", str(out), "--months", MONTH, check=False)
    assert result.returncode == 2 and '"level":"error"' not in result.stdout, result.stdout
    # No manifest of a run whose jobs were never published, for `status` to count as queued.
    assert not (out / "runs" / "r1").exists()


def test_a_broker_refusing_the_login_or_the_virtual_host_is_one_line_saying_which(
    tickq: Tickq, amqp_url: str
) -> None:
    broker = urlparse(amqp_url)
    user = unquote(broker.username or "")
    wrong_password = broker._replace(netloc=f"{broker.username}:not-the-password@{broker.hostname}:{broker.port}")
    no_vhost = broker._replace(path="/tickq-no-such-vhost")
    cases = ((urlunparse(wrong_password), f"refused the login of user '{user}'"),
             (urlunparse(no_vhost), "refused virtual host 'tickq-no-such-vhost'"))
    for url, expected in cases:
        for command in (("worker", "--idle-exit", "1"), ("dlq", "list")):
            line = error_line(tickq.run(*command, check=False, env={"TICKQ_AMQP_URL": url}), command)
            assert expected in line and "not-the-password" not in line, line


def test_an_object_store_out_of_reach_or_without_credentials_is_one_line_saying_which(
    tickq: Tickq, s3_server: S3Server
) -> None:
    bucket = s3_server.new_bucket()
    nothing_listens = f"http://127.0.0.1:{_free_port()}"
    no_credentials = {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                      "AWS_EC2_METADATA_DISABLED": "true"}
    commands = (("status", "--run", "r1", "--output", f"s3://{bucket}/out"),
                ("produce", "--input", f"s3://{bucket}/raw", "--output", f"s3://{bucket}/out", "--months", "2024-03"))
    for env, expected in (({"TICKQ_S3_ENDPOINT_URL": nothing_listens},
                           f"cannot reach the object store at {nothing_listens}"),
                          (no_credentials, "no credentials for the object store")):
        if "AWS_CONFIG_FILE" in env:
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
                tickq.env.pop(name, None)
        for command in commands:
            line = error_line(tickq.run(*command, check=False, env=env), command)
            assert expected in line, line


def test_a_taken_port_or_a_path_that_cannot_be_written_is_one_line_naming_it(
    tickq: Tickq, tmp_path: Path, amqp_url: str
) -> None:
    publish_raw(amqp_url, tickq.namespace, [])  # the namespace's queues, empty
    data = tmp_path / "data"
    tickq.run("gen", "--out", str(data), "--months", "2024-03", "--rows", "2000", "--securities", "2")
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    under_a_file = str(a_file / "out")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (("worker", "--health-port", str(port), "--idle-exit", "1"), f"health checks on port {port}: "),
            (("aggregator", "--health-port", str(port), "--idle-exit", "1"), f"health checks on port {port}: "),
            (("worker", "--metrics-file", f"{under_a_file}/m.jsonl", "--idle-exit", "1"),
             f"--metrics-file {under_a_file}/m.jsonl: Not a directory"),
            (("produce", "--input", str(data), "--output", under_a_file, "--months", "2024-03"),
             f"{a_file}/"),
            (("ingest", "--input", str(data), "--output", under_a_file, "--months", "2024-03"),
             f"{a_file}/"),
        ]
        for command, expected in cases:
            line = error_line(tickq.run(*command, check=False), command)
            assert expected in line and line.endswith(("Not a directory", "Address already in use")), line
    # The producer stopped before publishing anything.
    assert queue_depth(amqp_url, Topology(tickq.namespace).jobs) == 0


def test_a_bad_object_store_request_limit_is_one_clear_line(tickq: Tickq) -> None:
    tickq.env["TICKQ_S3_REQUESTS"] = "lots"
    result = tickq.run("worker", "--idle-exit", "1", check=False)
    assert result.returncode == 2
    assert "TICKQ_S3_REQUESTS" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_queue_of_the_namespace_declared_otherwise_is_one_clear_line_and_stays(
    tickq: Tickq, tmp_path: Path, amqp_url: str
) -> None:
    # Another tool (or a tickq that declared it otherwise) made the job queue: classic, with a
    # message in it. Every component names the clash instead of failing with a traceback.
    jobs = Topology(tickq.namespace).jobs
    declare_foreign_queue(amqp_url, jobs, {"x-max-length": 10}, b"someone else's message")
    tickq.run("gen", "--out", str(tmp_path / "data"), "--months", "2024-03", "--rows", "2000", "--securities", "2")
    commands = [
        ("produce", "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--months", "2024-03"),
        ("worker", "--idle-exit", "1"),
        ("aggregator", "--idle-exit", "1"),
        ("dlq", "list"),
    ]
    for command in commands:
        line = error_line(tickq.run(*command, check=False), command)
        assert f"queue '{jobs}'" in line and "TICKQ_NAMESPACE" in line, line
    assert [m.body for m in drain_queue(amqp_url, jobs)] == [b"someone else's message"]


def test_status_agrees_with_markers_and_dead_letters(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str
) -> None:
    data, output = tmp_path / "data", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", "2024-03..2024-04", "--rows", "3000", "--securities", "2")
    produced = tickq.produce("--input", str(data), "--output", str(output), "--months", "2024-03..2024-04",
                             "--run-id", "st")
    before = json.loads(tickq.run("status", "--run", "st", "--output", str(output), "--json", check=False).stdout)
    assert before["expected"] == produced["jobs"] and before["succeeded"] == 0 and before["complete"] is False
    assert before["queued"] == produced["jobs"]
    assert before["broker"][Topology(namespace).jobs] == produced["jobs"]
    # A letter the broker dead-lettered itself has no record without the aggregator service:
    # its job counts as queued, and the line says where to look.
    dead = Topology(namespace).dead
    publish_raw(amqp_url, namespace, [b"{}"], queue=dead)
    line = tickq.run("status", "--run", "st", "--output", str(output), check=False).stdout.strip()
    assert line.endswith("; 1 in the dead-letter queue (`tickq dlq list`)"), line
    assert len(drain_queue(amqp_url, dead, requeue=False)) == 1

    # Break April's input: its jobs die; March's succeed.
    april_jobs = sum(1 for line in (output / "runs/st/job_keys.csv").read_text().splitlines() if "2024-04," in line)
    for part in (data / "2024-04").glob("*.parquet"):
        part.write_bytes(b"not parquet")
    tickq.wait_all(tickq.workers(1))
    after = tickq.run("status", "--run", "st", "--output", str(output), "--json", check=False)
    assert after.returncode == 3
    ledger = json.loads(after.stdout)
    assert ledger["dead"] == april_jobs == len(drain_queue(amqp_url, Topology(namespace).dead))
    assert ledger["succeeded"] == produced["jobs"] - april_jobs
    assert ledger["queued"] == 0 and ledger["retrying"] == 0 and ledger["complete"] is False
    # Nothing left to do: no rate (an average since the run began would only fall from now on).
    assert ledger["rate_per_s"] is None and ledger["eta_s"] == 0.0
    missing = tickq.run("status", "--run", "st", "--output", str(output), "--missing").stdout.split()
    assert missing == []
    watched = tickq.run("status", "--run", "st", "--output", str(output), "--watch", "--interval", "0.2",
                        check=False)
    assert "succeeded" in watched.stdout  # plain lines when not on a terminal
    assert "jobs/s" not in watched.stdout and "tickq dlq replay" in watched.stdout.splitlines()[-1]


def test_reading_the_dead_letters_spends_none_of_their_deliveries(
    tickq: Tickq, amqp_url: str, namespace: str
) -> None:
    # From RabbitMQ 4.0 a quorum queue drops a message returned 20 times (its default delivery
    # limit), and up to 4.2 every requeue counts. Listing, showing, a dry run, and the letters a
    # replay or purge leaves must hand the dead letters back as they were, their count unspent.
    dead = Topology(namespace).dead
    letters: list[dict[str, Any]] = [{"v": 1, "run_id": "r", "job_id": f"r:2024-03:S{i}:2024-03-01", "month": "2024-03",
                "security": f"S{i}", "date": "2024-03-01"} for i in range(3)]
    headers = {"x-tickq-error-class": "permanent", "x-tickq-error": "unreadable parquet file", "x-tickq-attempts": 1}
    publish_raw(amqp_url, namespace, [json.dumps(x).encode() for x in letters], headers=headers, queue=dead,
                message_ids=[x["job_id"] for x in letters])
    for _ in range(2):
        assert len(tickq.run("dlq", "list", "--json").stdout.splitlines()) == 3
    tickq.run("dlq", "show", letters[0]["job_id"])
    tickq.run("dlq", "replay", "--run", "r", "--dry-run")
    tickq.run("dlq", "replay", "--run", "elsewhere")
    tickq.run("dlq", "purge", "--run", "elsewhere", "--yes")

    held = drain_queue(amqp_url, dead)
    assert sorted(m.message_id or "" for m in held) == [x["job_id"] for x in letters]
    for message in held:
        assert json.loads(message.body) in letters
        assert {k: message.headers.get(k) for k in headers} == headers
        # Taken once here: a letter handed back by requeueing would show 6 or more.
        assert message.headers.get("x-delivery-count", 0) == 0, message.headers
    assert queue_depth(amqp_url, dead) == 3


def test_credentials_never_reach_logs_dead_letters_or_errors(
    tickq: Tickq, tmp_path: Path, amqp_url: str, namespace: str
) -> None:
    secret_input = "s3://user:hunter2@bucket/in"
    body = json.dumps({"v": 1, "run_id": "sec", "job_id": "sec:2024-03:AAA:2024-03-04", "month": "2024-03",
                       "security": "AAA", "date": "2024-03-04", "input": secret_input, "output": str(tmp_path),
                       "processor": "analytics", "params": {}}).encode()
    publish_raw(amqp_url, namespace, [body])
    worker = tickq.start("worker", "--idle-exit", "3")
    tickq.wait_all([worker])
    log = worker.log_path.read_text()
    assert "hunter2" not in log
    [letter] = drain_queue(amqp_url, Topology(namespace).dead)
    headers = json.dumps({k: str(v) for k, v in letter.headers.items()})
    assert "hunter2" not in headers
    listed = tickq.run("dlq", "list", "--json").stdout + tickq.run("dlq", "show", "sec:2024-03:AAA:2024-03-04").stdout
    assert "hunter2" not in listed.replace(secret_input, "")  # the body itself is the user's own input


def test_the_aggregator_survives_its_own_crash_and_writes_the_same_tables(tickq: Tickq, tmp_path: Path) -> None:
    data, laid, output = tmp_path / "data", tmp_path / "laid", tmp_path / "out"
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "20000", "--securities", "5")
    # Ingested, so that jobs finish batch by batch (a raw month's first pass would store them all).
    tickq.run("ingest", "--input", str(data), "--output", str(laid), "--months", MONTH)
    first = tickq.start("aggregator")
    produced = tickq.produce("--input", str(laid), "--output", str(output), "--months", MONTH, "--run-id", "agg")
    half = produced["jobs"] // 2
    tickq.wait_all([tickq.start("worker", "--concurrency", "1", "--prefetch", "1", "--max-jobs", str(half))])
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)  # it has counted half the run in memory, and dies
    first.wait(timeout=10)
    assert not [x for x in log_lines(first) if x.get("event") == "aggregator.run_written"]
    tickq.wait_all(tickq.workers(2))
    second = tickq.start("aggregator", "--idle-exit", "6")
    tickq.wait_all([second], timeout=120)
    written = [x for x in log_lines(second) if x.get("event") == "aggregator.run_written"]
    assert written and written[-1]["complete"] is True and written[-1]["succeeded"] == produced["jobs"]
    from_service = read_csv_tables(str(output), "agg")
    tickq.run("aggregate", "--run", "agg", "--output", str(output))
    assert read_csv_tables(str(output), "agg") == from_service
    assert_tables_equal(read_tables(str(output), "agg"), reference_tables(str(data), [MONTH]))
