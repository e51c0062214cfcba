"""Test helpers: running jobs in batches and reading what they stored, reading a run's tables
and summary, moving files to S3, and an HTTP proxy that slows down or fails requests to the S3
server (for long jobs and outages)."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import random
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from producer.discover import discover_month
from shared.inputs import normalise
from shared.layout import JobKey, RunLayout, batch_result_table
from shared.messages import JobMessage
from shared.storage import Storage, open_storage
from worker.job import JobOutcome, MonthListings, execute_batch

TABLE_NAMES = (
    "security_daily",
    "by_security",
    "by_date",
    "by_participant",
    "by_hour",
    "by_size_bucket",
    "by_venue",
    "timeseries_hourly",
    "timeseries_daily",
)


def decoded(table: pa.Table) -> pa.Table:
    """`table` with its label (dictionary) columns as plain strings, to compare values."""
    fields = [pa.field(f.name, f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))


def store_at(where: str, tmp_path: Path, request: Any) -> Storage:
    """A fresh store for a test parametrised over `where`: "local" (under `tmp_path`) or "s3"
    (a new bucket of the session's S3 server, through pytest's `request`)."""
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        return open_storage(f"s3://{server.new_bucket()}/out", server.endpoint)
    return open_storage(str(tmp_path))


def discovered_keys(source: str | Path, month: str, market_tz: str) -> list[JobKey]:
    """The jobs the producer finds in `month` of `source`, in key order."""
    found = discover_month(open_storage(str(source)), month, market_tz)
    return [JobKey(month, security, day) for security, day in sorted(found.rows)]


def run_in_batches(jobs: list[JobMessage], batch: int, listings: MonthListings) -> list[JobOutcome]:
    """`jobs` through `execute_batch` in batches of `batch`, in order (as a worker's prefetch
    holds them); their outcomes, in order. Every job must succeed."""
    outcomes: list[JobOutcome] = []
    for start in range(0, len(jobs), batch):
        for result in execute_batch(jobs[start:start + batch], s3_endpoint_url=None, worker_id="test",
                                    listings=listings):
            assert isinstance(result, JobOutcome), result
            outcomes.append(result)
    return outcomes


def stored_results(output: str | Path, run_id: str = "r1") -> pa.Table:
    """Every job's stored row (columnar result and counts) of a run, sorted by job id."""
    store = open_storage(str(output))
    tables = [batch_result_table(store.read_bytes(o.key))[1].replace_schema_metadata(None)
              for o in store.list(RunLayout(run_id).results_prefix)]
    return pa.concat_tables(tables).sort_by("job_id")


def read_tables(output: str, run_id: str, endpoint: str | None = None) -> dict[str, pd.DataFrame]:
    """Every aggregate table of a run, from its Parquet files."""
    storage = open_storage(output, endpoint)
    tables = {}
    for name in TABLE_NAMES:
        with storage.open_read(f"runs/{run_id}/aggregates/{name}.parquet") as f:
            tables[name] = pq.read_table(f).to_pandas()
    return tables


def read_csv_tables(output: str, run_id: str) -> dict[str, bytes]:
    """Every aggregate table's CSV bytes (to compare reruns byte for byte)."""
    storage = open_storage(output)
    return {n: storage.read_bytes(f"runs/{run_id}/aggregates/{n}.csv") for n in TABLE_NAMES}


def read_summary(output: str, run_id: str, endpoint: str | None = None) -> dict[str, Any]:
    """A run's summary.json."""
    storage = open_storage(output, endpoint)
    return dict(json.loads(storage.read_bytes(f"runs/{run_id}/aggregates/summary.json")))


def upload_dir(local: Path, s3_client: Any, bucket: str, prefix: str) -> None:
    """Copy a local directory tree to ``s3://bucket/prefix``."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


class FaultyS3Proxy:
    """An HTTP proxy in front of an S3 server that can delay, fail or refuse requests.

    `delay_s` sleeps before forwarding each request; `fail_ratio` answers that share of
    requests with 503 SlowDown; `refuse` closes connections without answering; `deny` answers
    every request with 403 AccessDenied.
    """

    def __init__(self, upstream: str, seed: int = 1) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.delay_s = 0.0
        self.fail_ratio = 0.0
        self.refuse = False
        self.deny = False
        self.requests = 0
        self.failed = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                import time

                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy._random.random() < proxy.fail_ratio
                    refuse, deny = proxy.refuse, proxy.deny
                length = int(self.headers.get("Content-Length", 0) or 0)
                body = self.rfile.read(length) if length else b""
                if refuse:
                    with proxy._lock:
                        proxy.failed += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if fail or deny:
                    with proxy._lock:
                        proxy.failed += 1
                    code, status = ("AccessDenied", 403) if deny else ("SlowDown", 503)
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer carries the object's length, not the (empty) body's.
                declared = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", declared or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class TcpProxy:
    """A TCP proxy (for the broker) that can cut every connection through it at once."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.cuts = 0
        self.accepting = True
        self._lock = threading.Lock()
        self._pairs: list[tuple[Any, Any]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self.accepting:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: Any, target: Any) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for s in (source, target):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def cut(self) -> int:
        """Drop every open connection, as a broker restart or a network fault would."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self.cuts += 1
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


def normalised_rows(batches: list[pa.RecordBatch], market_tz: str) -> list[dict[str, Any]]:
    """Every row of `batches` as a worker sees it, with its verdict ("valid"), NaN made comparable."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        table, valid = normalise(batch, market_tz)
        for row, ok in zip(table.to_pylist(), valid.to_pylist(), strict=True):
            row["valid"] = ok
            rows.append({k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return rows


def error_line(result: subprocess.CompletedProcess[str], what: object = "") -> str:
    """The one line a tickq command that failed as expected wrote on stderr (exit status 2)."""
    assert result.returncode == 2, (what, result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, (what, result.stderr)
    return lines[0]
