"""Fixtures: a real RabbitMQ broker (one namespace per test), a real S3 API over HTTP on
127.0.0.1 (moto's server, in its own process), and helpers to run tickq as its users do.

The broker is the one at TICKQ_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/);
where none answers and Docker does, a throwaway RabbitMQ is started with testcontainers.
No broker is a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEST_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _broker_answers(url: str) -> bool:
    import aio_pika

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A reachable broker: the configured one, or a throwaway container."""
    url = os.environ.get("TICKQ_TEST_AMQP_URL", DEFAULT_TEST_AMQP_URL)
    if _broker_answers(url):
        yield url
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:
        pytest.fail(f"no RabbitMQ broker answers at {url} and testcontainers is not installed")
    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        host, port = container.get_container_host_ip(), container.get_exposed_port(5672)
        yield f"amqp://guest:guest@{host}:{port}/%2F"


@dataclass
class S3Server:
    """A moto S3 server in its own process, on 127.0.0.1."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"tickq-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API over HTTP, served by moto in a separate process."""
    port = _free_port()
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert moto, "moto_server is not installed (pip install 'moto[server]')"
    process = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            break
        time.sleep(0.1)
    else:
        process.kill()
        pytest.fail("moto server did not start")
    yield S3Server(endpoint, process)
    process.terminate()
    process.wait(timeout=10)


class TickqProcess(subprocess.Popen[str]):
    """A tickq process a test started, with the file its output goes to."""

    log_path: Path


@dataclass
class Tickq:
    """Runs the tickq command as a user would, against one test's namespace."""

    env: dict[str, str]
    namespace: str
    workdir: Path
    procs: list[TickqProcess] = field(default_factory=list)
    # Delay queues of `--retry-delays` other than the defaults, deleted with the namespace.
    retry_delays: set[int] = field(default_factory=set)

    def _note_retry_delays(self, args: tuple[str, ...]) -> None:
        if "--retry-delays" in args:
            value = args[args.index("--retry-delays") + 1]
            self.retry_delays.update(int(x) for x in value.split(","))

    def run(
        self, *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        self._note_retry_delays(args)
        result = subprocess.run(
            [sys.executable, "-m", "tickq", *args],
            env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=self.workdir,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"tickq {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                f"stderr:\n{result.stderr[-3000:]}"
            )
        return result

    def start(
        self, *args: str, log_name: str | None = None, env: dict[str, str] | None = None
    ) -> TickqProcess:
        self._note_retry_delays(args)
        log = self.workdir / f"{log_name or args[0]}-{len(self.procs)}.log"
        handle = open(log, "w")  # noqa: SIM115 - closed with the process
        proc = TickqProcess(
            [sys.executable, "-m", "tickq", *args],
            env={**self.env, **(env or {})}, stdout=handle, stderr=subprocess.STDOUT, text=True, cwd=self.workdir,
        )
        proc.log_path = log
        self.procs.append(proc)
        return proc

    def workers(self, n: int, *extra: str) -> list[TickqProcess]:
        return [
            self.start("worker", "--concurrency", "2", "--idle-exit", "3", *extra,
                       env={"TICKQ_HEARTBEAT_FILE": str(self.workdir / f"hb-{i}")})
            for i in range(n)
        ]

    def wait_all(self, procs: list[TickqProcess], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        for proc in procs:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"process {proc.args!r} did not finish; log: {log_tail(proc)}") from None

    def produce(self, *args: str) -> dict[str, Any]:
        out = self.run("produce", *args, "--json", "--quiet")
        return dict(json.loads(out.stdout))

    def deployed_run(self, data: Path, output: str, month: str, run_id: str) -> dict[str, Any]:
        """A run as deployed: the aggregator service already running, then the producer, then
        two workers; checks that the service wrote the run's tables, complete."""
        service = self.start("aggregator", "--idle-exit", "8")
        produced = self.produce("--input", str(data), "--output", output, "--months", month, "--run-id", run_id)
        self.wait_all(self.workers(2))
        self.wait_all([service], timeout=60)
        written = [line for line in log_lines(service) if line.get("event") == "aggregator.run_written"]
        assert written and written[-1]["complete"] is True and written[-1]["succeeded"] == produced["jobs"]
        return produced

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def log_tail(proc: TickqProcess, chars: int = 3000) -> str:
    return proc.log_path.read_text()[-chars:]


def log_lines(proc: TickqProcess) -> list[dict[str, Any]]:
    """The JSON lines a tickq process wrote."""
    lines = []
    for line in Path(proc.log_path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


@pytest.fixture
def namespace(amqp_url: str) -> Iterator[str]:
    """A namespace of its own for this test; its queues and exchanges are deleted after."""
    ns = f"tqtest-{uuid.uuid4().hex[:10]}"
    yield ns
    # Bounded: a broker that stopped answering fails this teardown instead of hanging the run.
    asyncio.run(asyncio.wait_for(_delete_namespace(amqp_url, ns), timeout=120))


async def _delete_namespace(url: str, ns: str) -> None:
    import aio_pika

    from shared.topology import Topology

    topology = Topology(ns)
    await _delete_queues(url, topology.all_queues())
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        for name in (topology.dlx, topology.events):
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)


async def _delete_queues(url: str, names: Iterable[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)


@pytest.fixture
def tickq(amqp_url: str, namespace: str, tmp_path: Path, s3_server: S3Server) -> Iterator[Tickq]:
    """Runs tickq in subprocesses with this test's namespace, broker and S3 endpoint."""
    env = {
        **os.environ,
        "TICKQ_AMQP_URL": amqp_url,
        "TICKQ_NAMESPACE": namespace,
        "TICKQ_S3_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        # Auto-sized workers share cores only with this test's workers, not the host's others.
        "TICKQ_HOST_DIR": str(tmp_path / "host-workers"),
    }
    runner = Tickq(env, namespace, tmp_path)
    yield runner
    runner.close()
    if runner.retry_delays:
        from shared.topology import Topology

        names = [Topology(namespace).retry_queue(d) for d in runner.retry_delays]
        asyncio.run(asyncio.wait_for(_delete_queues(amqp_url, names), timeout=120))


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """Each test starts with structlog's defaults: a test that configured it does not leak."""
    import structlog

    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """boto3 in the test process talks to the test S3 server too."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


_FAULT_FIGURES: list[dict[str, Any]] = []


@pytest.fixture
def fault_report() -> list[dict[str, Any]]:
    """Where fault-injection tests record their figures (printed at the end of the run)."""
    return _FAULT_FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FAULT_FIGURES:
        return
    terminalreporter.section("fault injection figures")
    for row in _FAULT_FIGURES:
        terminalreporter.write_line(
            f"{row['test']}: jobs={row['jobs']} faults={row['faults_injected']} lost={row['lost']} "
            f"double_counted={row['double_counted']} dead_lettered={row['dead_lettered']}"
        )
