"""A TLS endpoint in front of the test broker, as a broker's TLS listener or a TLS-terminating
load balancer would be: clients speak TLS to it with a certificate signed by a test CA, and it
passes the bytes on to the broker's plain AMQP port.

The broker under test has no TLS listener of its own; this lets the tests drive tickq's
``amqps://`` path (pika in the producer, aiormq everywhere else) against the real broker.
It runs on blocking sockets, one thread per direction of a connection, so that a handshake it
refuses ends with the TLS alert a broker sends (asyncio's TLS server closes without one).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import trustme


@dataclass
class TlsEndpoint:
    """A running TLS endpoint: its ``amqps://`` URL, the CA file that signs its certificate,
    a client certificate and key signed by the same CA, and the TLS sessions it has accepted."""

    url: str
    ca_file: Path
    client_cert_file: Path
    client_key_file: Path
    sessions: list[str] = field(default_factory=list)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Pass bytes from `source` to `sink` until either end closes; then close both."""
    with contextlib.suppress(OSError):
        while data := source.recv(1 << 16):
            sink.sendall(data)
    for end in (source, sink):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
        end.close()


@contextlib.contextmanager
def tls_endpoint(amqp_url: str, workdir: Path, client_certificates: bool = False) -> Iterator[TlsEndpoint]:
    """A TLS endpoint on 127.0.0.1 for the broker at `amqp_url`, for the length of the block.

    Its certificate names ``localhost``; the URL it gives keeps `amqp_url`'s credentials and
    virtual host. With `client_certificates` it accepts only clients presenting a certificate
    its CA signed (mutual TLS), as a broker with ``ssl_options.fail_if_no_peer_cert`` does."""
    broker = urlparse(amqp_url)
    ca = trustme.CA()
    ca_file = workdir / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    if client_certificates:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    client = ca.issue_cert("tickq-client@example.com")
    client_cert_file, client_key_file = workdir / "client-cert.pem", workdir / "client-key.pem"
    client.cert_chain_pems[0].write_to_path(str(client_cert_file))
    client.private_key_pem.write_to_path(str(client_key_file))

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    credentials = broker.netloc.rpartition("@")[0]
    endpoint = TlsEndpoint(
        url=urlunparse(broker._replace(scheme="amqps", netloc=f"{credentials}@localhost:{port}")),
        ca_file=ca_file, client_cert_file=client_cert_file, client_key_file=client_key_file,
    )
    open_sockets: list[socket.socket] = []

    def serve(connection: socket.socket) -> None:
        try:
            # The handshake happens here; a refused one sends its alert before raising.
            client_side = context.wrap_socket(connection, server_side=True)
        except (OSError, ssl.SSLError):
            connection.close()
            return
        endpoint.sessions.append(str(client_side.cipher()))
        broker_side = socket.create_connection((broker.hostname or "127.0.0.1", broker.port or 5672))
        open_sockets.extend((client_side, broker_side))
        threading.Thread(target=_pipe, args=(broker_side, client_side), daemon=True).start()
        _pipe(client_side, broker_side)

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener closed: the block ended
            while True:
                connection, _ = listener.accept()
                threading.Thread(target=serve, args=(connection,), name="tls-endpoint", daemon=True).start()

    acceptor = threading.Thread(target=accept, name="tls-endpoint-accept", daemon=True)
    acceptor.start()
    try:
        yield endpoint
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept
        listener.close()
        for open_socket in open_sockets:
            with contextlib.suppress(OSError):
                open_socket.shutdown(socket.SHUT_RDWR)
        acceptor.join(timeout=10)


@contextlib.contextmanager
def resetting_front(url: str, resets: int) -> Iterator[str]:
    """A TCP front for the endpoint at `url` that resets its first `resets` connections as soon
    as the client speaks, and passes later ones through; yields `url` pointed at the front.

    It stands for a broker whose TLS alert was overtaken by the reset of its close (a refusal
    under TLS 1.3 races the client's first AMQP bytes), which happens too rarely to test on
    the real endpoint."""
    target = urlparse(url)
    listener = socket.create_server(("127.0.0.1", 0))
    remaining = [resets]

    def serve(connection: socket.socket) -> None:
        if remaining[0] > 0:
            remaining[0] -= 1
            with contextlib.suppress(OSError):
                connection.recv(1 << 16)  # the client hello
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()  # with a zero linger: a reset, not a close
            return
        upstream = socket.create_connection((target.hostname or "localhost", target.port or 5671))
        threading.Thread(target=_pipe, args=(upstream, connection), daemon=True).start()
        _pipe(connection, upstream)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                threading.Thread(target=serve, args=(connection,), name="resetting-front", daemon=True).start()

    acceptor = threading.Thread(target=accept, name="resetting-front-accept", daemon=True)
    acceptor.start()
    credentials = target.netloc.rpartition("@")[0]
    try:
        yield urlunparse(target._replace(netloc=f"{credentials}@localhost:{listener.getsockname()[1]}"))
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(timeout=10)
