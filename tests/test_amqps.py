"""tickq over ``amqps://``: every component speaks TLS to the broker, trusting a private CA
through ``SSL_CERT_FILE``, and a TLS failure is named for what it is, in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import Tickq
from tests.helpers import error_line, read_tables
from tests.reference import assert_tables_equal, reference_tables
from tests.tlsproxy import TlsEndpoint, resetting_front, tls_endpoint

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
    for line in _produce_and_work_refused(untrusting, tmp_path, tls.url):
        assert "presented a TLS certificate this machine does not trust" in line and "SSL_CERT_FILE" in line, line
        assert "guest:guest" not in line


def _produce_and_work_refused(tickq: Tickq, tmp_path: Path, url: str) -> list[str]:
    """The one-line errors of `tickq produce` and `tickq worker` with the broker at `url`."""
    data = tmp_path / "data"
    if not data.exists():
        tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "2000", "--securities", "2")
    env = {"TICKQ_AMQP_URL": url}
    produced = tickq.run("produce", "--input", str(data), "--output", str(tmp_path / "out"), "--months", MONTH,
                         check=False, env=env)
    worker = tickq.run("worker", "--idle-exit", "1", check=False, env=env)
    return [error_line(produced), error_line(worker)]


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


@pytest.fixture
def mutual_tls(amqp_url: str, tmp_path: Path) -> Iterator[TlsEndpoint]:
    """A TLS endpoint that accepts only clients with a certificate its CA signed."""
    with tls_endpoint(amqp_url, tmp_path, client_certificates=True) as endpoint:
        yield endpoint


def _with_files(url: str, **files: Path | str) -> str:
    """`url` naming TLS files in its query, as a user writes TICKQ_AMQP_URL."""
    return url + "?" + "&".join(f"{name}={path}" for name, path in files.items())


def test_a_whole_run_over_mutual_tls_with_the_files_named_in_the_url(
    untrusting: Tickq, mutual_tls: TlsEndpoint, tmp_path: Path
) -> None:
    tickq, tls = untrusting, mutual_tls
    data, output = tmp_path / "data", str(tmp_path / "out")
    tickq.run("gen", "--out", str(data), "--months", MONTH, "--rows", "20000", "--securities", "4")
    # No SSL_CERT_FILE: the URL names the CA, and the client certificate the endpoint asks for.
    tickq.env["TICKQ_AMQP_URL"] = _with_files(tls.url, cafile=tls.ca_file, certfile=tls.client_cert_file,
                                              keyfile=tls.client_key_file)
    tickq.deployed_run(data, output, MONTH, "mtls")
    assert_tables_equal(read_tables(output, "mtls"), reference_tables(str(data), [MONTH]))
    assert json.loads(tickq.run("status", "--run", "mtls", "--output", output, "--json").stdout)["complete"] is True
    assert tickq.run("dlq", "list").returncode == 0
    # The producer's publishing connection (pika) presented the certificate too.
    assert len(tls.sessions) >= 7


def test_a_broker_that_wants_a_client_certificate_is_named_with_the_fix(
    untrusting: Tickq, mutual_tls: TlsEndpoint, tmp_path: Path
) -> None:
    tls = mutual_tls
    stranger = trustme.CA().issue_cert("stranger@example.com")  # signed by a CA the endpoint does not trust
    stranger_cert, stranger_key = tmp_path / "stranger-cert.pem", tmp_path / "stranger-key.pem"
    stranger.cert_chain_pems[0].write_to_path(str(stranger_cert))
    stranger.private_key_pem.write_to_path(str(stranger_key))
    for url in (_with_files(tls.url, cafile=tls.ca_file),
                _with_files(tls.url, cafile=tls.ca_file, certfile=stranger_cert, keyfile=stranger_key)):
        for line in _produce_and_work_refused(untrusting, tmp_path, url):
            assert "wants a client certificate it trusts" in line and "certfile=" in line, line
    assert tls.sessions == []  # no connection got through


def test_a_refusal_whose_alert_a_reset_overtook_is_still_named(
    untrusting: Tickq, mutual_tls: TlsEndpoint, tmp_path: Path
) -> None:
    # Once reset, tickq asks the broker again, sending nothing it could reset over.
    with resetting_front(_with_files(mutual_tls.url, cafile=mutual_tls.ca_file), resets=1) as url:
        result = untrusting.run("worker", "--idle-exit", "1", check=False, env={"TICKQ_AMQP_URL": url})
    assert "wants a client certificate it trusts" in error_line(result), result.stderr
    # A broker that resets every connection is not taken for one that refused a certificate.
    with resetting_front(_with_files(mutual_tls.url, cafile=mutual_tls.ca_file), resets=2) as url:
        result = untrusting.run("worker", "--idle-exit", "1", check=False, env={"TICKQ_AMQP_URL": url})
    assert "no RabbitMQ broker answers" in error_line(result), result.stderr
    assert mutual_tls.sessions == []


def test_tls_files_that_cannot_be_used_are_named_before_connecting(
    untrusting: Tickq, mutual_tls: TlsEndpoint, tmp_path: Path
) -> None:
    tls = mutual_tls
    other_key = tmp_path / "other-key.pem"
    trustme.CA().issue_cert("other@example.com").private_key_pem.write_to_path(str(other_key))
    cases = {
        "no such file": (_with_files(tls.url, certfile=tmp_path / "missing.pem", keyfile=tls.client_key_file),
                         "cannot use the client certificate certfile="),
        "a key of another certificate": (_with_files(tls.url, certfile=tls.client_cert_file, keyfile=other_key),
                                         "the key does not belong to the certificate"),
        "a key without its certificate": (_with_files(tls.url, keyfile=tls.client_key_file),
                                          "names a keyfile without a certfile"),
        "a CA file that holds no certificate": (_with_files(tls.url, cafile=tls.client_key_file),
                                                "cannot use cafile="),
    }
    for case, (url, expected) in cases.items():
        for command in (("worker", "--idle-exit", "1"), ("dlq", "list")):
            result = untrusting.run(*command, check=False, env={"TICKQ_AMQP_URL": url})
            assert expected in error_line(result), (case, command, result.stderr)
    assert tls.sessions == []
