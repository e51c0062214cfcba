"""`tickq demo`: a whole run on synthetic data on this machine, against the configured broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from shared.broker import BrokerUnavailable, connect
from shared.errors import ConfigError
from shared.settings import Settings
from tickq.cli import DEFAULT_PREFETCH_PER_SLOT


async def _probe(settings: Settings) -> None:
    connection = await connect(settings, "tickq-demo-probe", robust=False, timeout=5)
    await connection.close()


@contextlib.contextmanager
def _broker(settings: Settings) -> Iterator[Settings]:
    """The configured broker, or a throwaway one in Docker when none answers and Docker can."""
    try:
        asyncio.run(_probe(settings))
        yield settings
        return
    except BrokerUnavailable as exc:
        if not _docker_available():
            raise ConfigError(
                f"{exc}; e.g. `docker run -d -p 5672:5672 rabbitmq:3.13-management` "
                "or `apt-get install rabbitmq-server`"
            ) from None
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:
        raise ConfigError(
            "no broker answers at TICKQ_AMQP_URL; install the docker extra (pip install 'tickq[docker]') "
            "to let the demo start one, or start RabbitMQ yourself"
        ) from None
    print("no broker answered; starting a throwaway RabbitMQ in Docker…", file=sys.stderr)
    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        yield Settings(f"amqp://guest:guest@{host}:{port}/%2F", settings.namespace, settings.s3_endpoint_url)


def _docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0


def run_demo(settings: Settings, rows: int, workers: int, securities: int, out: str) -> int:
    """Generate data, produce, run `workers` worker processes, aggregate, print a summary."""
    with _broker(settings) as broker:
        root = Path(out).resolve()
        data, results, logs = root / "data", root / "results", root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TICKQ_AMQP_URL": broker.amqp_url, "TICKQ_NAMESPACE": broker.namespace}
        tickq = [sys.executable, "-m", "tickq"]
        started = time.perf_counter()
        print(f"generating {rows} rows of synthetic orders into {data} …", file=sys.stderr)
        subprocess.run([*tickq, "gen", "--out", str(data), "--months", "2024-03",
                        "--rows", str(rows), "--securities", str(securities)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        produced = subprocess.run(
            [*tickq, "produce", "--input", str(data), "--output", str(results), "--months", "2024-03",
             "--market-tz", "Australia/Sydney", "--json", "--quiet", "--metrics-file", str(logs / "producer.jsonl")],
            env=env, check=True, capture_output=True, text=True,
        )
        run = json.loads(produced.stdout)
        print(f"run {run['run_id']}: {run['jobs']} jobs published; starting {workers} workers …", file=sys.stderr)
        # A worker's default prefetch (a thousand jobs a slot) would hand a demo's few hundred
        # jobs all to the worker subscribed first: share them out instead.
        share = -(-run["jobs"] // workers)
        prefetch = ["--prefetch", str(share)] if share < DEFAULT_PREFETCH_PER_SLOT else []
        procs = [
            subprocess.Popen(
                [*tickq, "worker", "--idle-exit", "3", *prefetch, "--quiet",
                 "--metrics-file", str(logs / f"worker-{i}.jsonl")],
                env={**env, "TICKQ_HEARTBEAT_FILE": str(logs / f"worker-{i}.alive")},
            )
            for i in range(workers)
        ]
        try:
            aggregated = subprocess.run(
                [*tickq, "aggregate", "--run", run["run_id"], "--output", str(results), "--wait", "600"],
                env=env, capture_output=True, text=True,
            )
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=150)
        if aggregated.returncode not in (0, 3):
            raise ConfigError(aggregated.stderr.strip() or "aggregation failed")
        summary = json.loads((results / "runs" / run["run_id"] / "aggregates" / "summary.json").read_text())
        elapsed = time.perf_counter() - started
        print(f"tables:   {results / 'runs' / run['run_id'] / 'aggregates'}")
        succeeded, expected, dead = summary["jobs_succeeded"], summary["jobs_expected"], summary["jobs_dead"]
        print(f"jobs:     {succeeded}/{expected} succeeded, {dead} dead")
        print(f"rows:     {summary['rows_read']} read, {summary['rows_accepted']} accepted, "
              f"{summary['rows_rejected']} rejected")
        totals = summary["totals"]
        print(f"totals:   volume {totals['volume']:,}, notional {totals['notional']:,.2f}")
        print(f"metrics:  {logs}  (JSON lines)")
        print(f"time:     {elapsed:.1f} s")
        return 0 if summary["complete"] else 3
