"""A TLS endpoint in front of the test broker, as a broker's TLS listener or a TLS-terminating
load balancer would be: clients speak TLS to it with a certificate signed by a test CA, and it
passes the bytes on to the broker's plain AMQP port.

The broker under test has no TLS listener of its own; this lets the tests drive tickq's
``amqps://`` path (pika in the producer, aiormq everywhere else) against the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import trustme


@dataclass
class TlsEndpoint:
    """A running TLS endpoint: its ``amqps://`` URL, the CA file that signs its certificate,
    and how many TLS sessions it has accepted."""

    url: str
    ca_file: Path
    sessions: list[str] = field(default_factory=list)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_endpoint(amqp_url: str, workdir: Path) -> Iterator[TlsEndpoint]:
    """A TLS endpoint on 127.0.0.1 for the broker at `amqp_url`, for the length of the block.

    Its certificate names ``localhost``; the URL it gives keeps `amqp_url`'s credentials and
    virtual host."""
    broker = urlparse(amqp_url)
    ca = trustme.CA()
    ca_file = workdir / "test-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)

    loop = asyncio.new_event_loop()
    endpoint = TlsEndpoint(url="", ca_file=ca_file)

    async def accept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # Called once the TLS handshake has succeeded.
        endpoint.sessions.append(str(client_writer.get_extra_info("cipher")))
        upstream_reader, upstream_writer = await asyncio.open_connection(broker.hostname, broker.port or 5672)
        await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))

    server = loop.run_until_complete(asyncio.start_server(accept, "127.0.0.1", 0, ssl=context))
    port = server.sockets[0].getsockname()[1]
    credentials = broker.netloc.rpartition("@")[0]
    endpoint.url = urlunparse(broker._replace(scheme="amqps", netloc=f"{credentials}@localhost:{port}"))
    thread = threading.Thread(target=loop.run_forever, name="tls-endpoint", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
