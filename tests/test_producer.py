"""The producer's publisher: a window of outstanding confirms, nothing lost when the connection
drops in the middle of it, and an error making the messages never taken for the end of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import pytest

from producer.publish import Outgoing, publish_confirmed
from shared.topology import Topology
from tests.brokertools import publish_raw, queue_depth
from tests.helpers import TcpProxy


def test_publishes_survive_a_dropped_connection_and_none_is_lost(amqp_url: str, namespace: str) -> None:
    publish_raw(amqp_url, namespace, [])  # declares the namespace's queues
    queue = Topology(namespace).jobs
    broker = urlparse(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    proxied = amqp_url.replace(f"{broker.hostname}:{broker.port or 5672}", f"127.0.0.1:{proxy.port}")
    total = 60_000
    messages = (Outgoing(queue, b'{"n": %d}' % i, f"m-{i}") for i in range(total))

    def cut_soon() -> None:
        time.sleep(0.3)
        proxy.cut()

    cutter = threading.Thread(target=cut_soon)
    cutter.start()
    started = time.monotonic()
    try:
        confirmed = publish_confirmed(proxied, messages, "test-producer", window=500)
        elapsed = time.monotonic() - started
        cuts = proxy.cuts
    finally:
        cutter.join()
        proxy.close()
    assert cuts == 1 and elapsed > 0.3  # the connection dropped while jobs were in flight
    assert confirmed == total
    # Every message is in the queue; a message whose confirm was lost with the connection may
    # be there twice, which the deterministic job id makes harmless.
    deadline = time.monotonic() + 10
    while queue_depth(amqp_url, queue) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    assert queue_depth(amqp_url, queue) >= total


def test_an_error_making_the_messages_fails_the_publish_instead_of_ending_it(amqp_url: str, namespace: str) -> None:
    publish_raw(amqp_url, namespace, [])  # declares the namespace's queues
    queue = Topology(namespace).jobs

    def messages() -> Iterator[Outgoing]:
        for i in range(2_500):
            yield Outgoing(queue, b'{"n": %d}' % i, f"m-{i}")
        raise ValueError("input must not contain '..' segments")

    # Before, pika logged the error and the publish returned the count confirmed so far.
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        publish_confirmed(amqp_url, messages(), "test-producer", window=1_000)
