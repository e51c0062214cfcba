"""tickq over ``amqps://``: every component speaks TLS to the broker, trusting a private CA
through ``SSL_CERT_FILE``, and a TLS failure is named for what it is, in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Tickq
from tests.helpers import error_line, read_tables
from tests.reference import assert_tables_equal, reference_tables
from tests.tlsproxy import TlsEndpoint, tls_endpoint

MONTH = "2024-03"


@pytest.fixture
def tls(amqp_url: str, tmp_path: Path) -> Iterator[TlsEndpoint]:
    with tls_endpoint(amqp_url, tmp_path) as endpoint:
        yield endpoint


@pytest.fixture
def untrusting(tickq: Tickq) -> Tickq:
    """The test's tickq with no private CA configured by the environment it came from."""
    tickq.env.pop("SSL_CERT_FILE", None)
    return tickq


def test_a_whole_run_over_amqps_with_a_private_ca(untrusting: Tickq, tls: TlsEndpoint, tmp_path: Path) -> None:
    tickq = untrusting
    data, output = tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "20000", "--securities", "4")
    tickq.env.update(TICKQ_AMQP_URL=tls.url, SSL_CERT_FILE=str(tls.ca_file))
    tickq.deployed_run(data, output, MONTH, "tls")
    assert_tables_equal(read_tables(output, "tls"), reference_tables(str(data), [MONTH]))
    status = json.loads(tickq.run("status", "--run", "tls", "--output", output, "--json").stdout)
    assert status["complete"] is True
    assert status["broker"] is not None  # status read the queue depths over TLS too
    assert tickq.run("dlq", "list").returncode == 0
    # The aggregator, the producer (its declaring and its publishing connection), two
    # workers, status and dlq: each came through the TLS endpoint, none around it.
    assert len(tls.sessions) >= 7


def test_a_broker_certificate_this_machine_does_not_trust_is_named_with_the_fix(
    untrusting: Tickq, tls: TlsEndpoint, tmp_path: Path
) -> None:
    untrusting.run("gen", "--out", str(tmp_path / "data"), "--months", MONTH, "--rows", "2000", "--securities", "2")
    env = {"TICKQ_AMQP_URL": tls.url}
    produced = untrusting.run("produce", "--input", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
                              "--months", MONTH, check=False, env=env)
    worker = untrusting.run("worker", "--idle-exit", "1", check=False, env=env)
    for result in (produced, worker):
        line = error_line(result)
        assert "presented a TLS certificate this machine does not trust" in line and "SSL_CERT_FILE" in line, line
        assert "guest:guest" not in line


def test_a_certificate_for_another_host_and_a_port_without_tls_are_named(
    untrusting: Tickq, tls: TlsEndpoint, tmp_path: Path, amqp_url: str
) -> None:
    # The endpoint's certificate names localhost only.
    by_address = tls.url.replace("@localhost:", "@127.0.0.1:")
    # The broker's own port speaks plain AMQP.
    plain_port = amqp_url.replace("amqp://", "amqps://", 1)
    for url, expected in ((by_address, "does not name that host"), (plain_port, "check that the port takes TLS")):
        result = untrusting.run("worker", "--idle-exit", "1", check=False,
                                env={"TICKQ_AMQP_URL": url, "SSL_CERT_FILE": str(tls.ca_file)})
        assert expected in error_line(result), result.stderr
