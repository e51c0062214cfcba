"""The worker's job subscription against a real broker: deliveries keep coming after a lost
connection and after a channel the broker closed; once stopped it takes no more, and closing
hands back what was not settled."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from urllib.parse import urlparse

import pika
import pytest

from shared.broker import BrokerUnavailable, connection_parameters
from shared.topology import Topology
from tests.helpers import TcpProxy
from worker.delivery import OPEN_TIMEOUT_S, Delivery, JobSubscription


@pytest.fixture
def queue(amqp_url: str, namespace: str) -> Iterator[str]:
    """The namespace's job queue, declared as tickq declares it (quorum); deleted with the
    namespace."""
    name = Topology(namespace).jobs
    _declare_quorum(amqp_url, name)
    yield name


def _declare_quorum(amqp_url: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})


def _delete(amqp_url: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        connection.channel().queue_delete(queue)


def _publish(amqp_url: str, queue: str, *bodies: bytes) -> None:
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, message_id=body.decode()))


def _ready(amqp_url: str, queue: str) -> int:
    """Messages ready in `queue` (neither delivered nor unacked)."""
    with pika.BlockingConnection(pika.URLParameters(amqp_url)) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)


async def _until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def _bodies(got: list[Delivery]) -> list[bytes]:
    return [d.body for d in got]


async def _no_redeclare() -> None:
    raise AssertionError("the consumer was not cancelled: nothing to declare again")


@contextlib.asynccontextmanager
async def _subscribed(url: str, queue: str, redeclare: Callable[[], Awaitable[None]] = _no_redeclare
                      ) -> AsyncIterator[tuple[JobSubscription, list[Delivery]]]:
    """A started subscription to `queue` through `url`, and the deliveries it gave so far;
    closed after the block."""
    got: list[Delivery] = []
    subscription = JobSubscription(connection_parameters(url, "test"), queue, 10, got.append, redeclare)
    await subscription.start()
    try:
        yield subscription, got
    finally:
        await subscription.close()


def _proxied(amqp_url: str) -> tuple[TcpProxy, str]:
    """A proxy in front of the broker, and the URL that goes through it."""
    broker = urlparse(amqp_url)
    proxy = TcpProxy(broker.hostname or "127.0.0.1", broker.port or 5672)
    return proxy, amqp_url.replace(f"{broker.hostname}:{broker.port or 5672}", f"127.0.0.1:{proxy.port}")


async def _one_message_goes_through(amqp_url: str, queue: str, subscription: JobSubscription,
                                    got: list[Delivery]) -> None:
    """Publish one message to `queue`: the subscription receives it and acks it; then stop."""
    await asyncio.to_thread(_publish, amqp_url, queue, b"a")
    await _until(lambda: len(got) == 1)
    await got[0].ack()
    await subscription.stop()


def test_deliveries_go_on_after_the_connection_is_cut(amqp_url: str, queue: str) -> None:
    proxy, proxied = _proxied(amqp_url)

    async def scenario() -> None:
        async with _subscribed(proxied, queue) as (subscription, got):
            await asyncio.to_thread(_publish, amqp_url, queue, b"a", b"b")
            await _until(lambda: len(got) == 2)
            await got[0].ack()
            await asyncio.sleep(0.2)  # the ack reaches the broker before the cut
            assert proxy.cut() == 1  # the subscription's own connection
            await asyncio.to_thread(_publish, amqp_url, queue, b"c")
            # "b" was in hand, unacked: the broker delivers it again, on the new connection.
            await _until(lambda: sorted(_bodies(got)[2:]) == [b"b", b"c"])
            for delivery in got[2:]:
                await delivery.ack()
            await subscription.stop()

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()
    assert _ready(amqp_url, queue) == 0


def test_a_channel_the_broker_closed_is_opened_again(amqp_url: str, queue: str) -> None:
    async def scenario() -> None:
        async with _subscribed(amqp_url, queue) as (subscription, got):
            await asyncio.to_thread(_publish, amqp_url, queue, b"a")
            await _until(lambda: len(got) == 1)
            first = got[0]
            # An ack of a tag the channel never delivered: the broker closes the channel.
            assert first.delivery_tag is not None
            await first.channel.basic_ack(first.delivery_tag + 1000)
            await _until(lambda: first.channel.is_closed)
            await asyncio.to_thread(_publish, amqp_url, queue, b"b")
            await _until(lambda: sorted(_bodies(got)[1:]) == [b"a", b"b"])
            assert all(d.channel is got[1].channel and not d.channel.is_closed for d in got[1:])
            for delivery in got[1:]:
                await delivery.ack()
            await subscription.stop()

    asyncio.run(scenario())
    assert _ready(amqp_url, queue) == 0  # the acks on the new channel were taken


def test_a_changed_prefetch_bounds_the_deliveries_in_hand_and_holds_after_a_reconnect(
    amqp_url: str, queue: str
) -> None:
    """An auto-sized worker whose share of its host changes holds as many jobs as its slots."""
    proxy, proxied = _proxied(amqp_url)

    async def in_hand_settles_at(got: list[Delivery], count: int) -> None:
        await _until(lambda: len(got) >= count)
        await asyncio.sleep(0.3)  # and no more come
        assert len(got) == count

    async def scenario() -> None:
        async with _subscribed(proxied, queue) as (subscription, got):
            await asyncio.to_thread(_publish, amqp_url, queue, *(b"%d" % i for i in range(60)))
            await in_hand_settles_at(got, 10)  # the prefetch it subscribed with
            # A new consumer takes 25 more; the 10 in hand stay to be settled on the channel.
            subscription.set_prefetch(25)
            await in_hand_settles_at(got, 35)
            subscription.set_prefetch(4)
            await in_hand_settles_at(got, 39)
            for delivery in got[:35]:  # settling the earlier consumers' deliveries brings none
                await delivery.ack()
            await asyncio.sleep(0.3)
            assert len(got) == 39
            for delivery in got[35:]:  # each of the last consumer's brings one more
                await delivery.ack()
            await in_hand_settles_at(got, 43)
            assert proxy.cut() == 1
            # The 4 in hand come back, on a connection with the same prefetch.
            await in_hand_settles_at(got, 47)
            assert sorted(_bodies(got[43:])) == sorted(_bodies(got[39:43]))
            for delivery in got[43:]:
                await delivery.ack()
            await in_hand_settles_at(got, 51)
            await subscription.stop()

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_a_subscription_stopped_while_its_consumer_is_replaced_makes_no_new_one(amqp_url: str, queue: str) -> None:
    async def scenario() -> int:
        async with _subscribed(amqp_url, queue) as (subscription, got):
            await asyncio.to_thread(_publish, amqp_url, queue, *(b"%d" % i for i in range(30)))
            await _until(lambda: len(got) == 10)
            subscription.set_prefetch(20)
            await subscription.stop()
            for delivery in got:  # room for more, were any consumer left
                await delivery.ack()
            await asyncio.sleep(0.5)
            return len(got)

    assert asyncio.run(scenario()) == 10
    assert _ready(amqp_url, queue) == 20


def test_a_stopped_subscription_takes_no_more_and_closing_hands_back_the_unsettled(
    amqp_url: str, queue: str
) -> None:
    async def scenario() -> list[Delivery]:
        async with _subscribed(amqp_url, queue) as (subscription, got):
            await asyncio.to_thread(_publish, amqp_url, queue, b"a", b"b")
            await _until(lambda: len(got) == 2)
            await subscription.stop()
            await asyncio.to_thread(_publish, amqp_url, queue, b"c")
            await asyncio.sleep(0.5)
            await got[0].ack()  # deliveries in hand are still settled after the stop
            await asyncio.sleep(0.2)
        return got

    got = asyncio.run(scenario())
    assert _bodies(got) == [b"a", b"b"]
    assert _ready(amqp_url, queue) == 2  # "b", never settled, and "c", never delivered


def test_a_subscription_that_cannot_connect_says_why_in_one_line() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subscription = JobSubscription(connection_parameters(f"amqp://guest:guest@127.0.0.1:{port}/%2F", "test"),
                                   "tickq.jobs", 10, lambda _delivery: None, _no_redeclare)
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(subscription.start())
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("the worker could not subscribe to tickq.jobs: ")
    assert "Connection refused" in message  # the socket's error, not pika's wrappers' names


def test_a_queue_deleted_before_the_subscription_starts_is_declared_again_and_consumed(
    amqp_url: str, namespace: str
) -> None:
    # The worker declares the topology, then subscribes; an operator deleting the queue in
    # between must not stop the worker.
    queue = Topology(namespace).jobs
    declared: list[str] = []

    async def redeclare() -> None:
        await asyncio.to_thread(_declare_quorum, amqp_url, queue)
        declared.append(queue)

    async def scenario() -> list[Delivery]:
        async with _subscribed(amqp_url, queue, redeclare) as (subscription, got):
            await _one_message_goes_through(amqp_url, queue, subscription, got)
        return got

    assert _bodies(asyncio.run(scenario())) == [b"a"]
    assert declared == [queue]
    assert _ready(amqp_url, queue) == 0


def test_a_queue_deleted_while_the_connection_was_down_is_declared_again(amqp_url: str, queue: str) -> None:
    # No cancel reaches a consumer whose connection is down: the broker's refusal of the new
    # consumer (404) is what says the queue is gone.
    proxy, proxied = _proxied(amqp_url)
    declared: list[str] = []

    async def redeclare() -> None:
        await asyncio.to_thread(_declare_quorum, amqp_url, queue)
        declared.append(queue)  # once declared: a message published now has a queue to go to

    async def scenario() -> list[Delivery]:
        async with _subscribed(proxied, queue, redeclare) as (subscription, got):
            proxy.accepting = False
            assert proxy.cut() == 1
            await asyncio.to_thread(_delete, amqp_url, queue)
            await asyncio.sleep(1.5)  # reconnecting fails meanwhile
            proxy.accepting = True
            await _until(lambda: declared == [queue])
            await _one_message_goes_through(amqp_url, queue, subscription, got)
        return got

    try:
        assert _bodies(asyncio.run(scenario())) == [b"a"]
    finally:
        proxy.close()
    assert _ready(amqp_url, queue) == 0


def test_a_subscription_whose_queue_stays_missing_says_so_without_waiting_out_a_timeout(namespace: str,
                                                                                        amqp_url: str) -> None:
    async def nothing_declared() -> None:
        pass

    subscription = JobSubscription(connection_parameters(amqp_url, "test"), Topology(namespace).jobs, 10,
                                   lambda _delivery: None, nothing_declared)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        asyncio.run(subscription.start())
    assert time.monotonic() - started < OPEN_TIMEOUT_S  # the broker's refusal, not a timeout
    assert "NOT_FOUND - no queue" in str(raised.value) and "\n" not in str(raised.value)


def _cancel_of(tag: str | None) -> SimpleNamespace:
    """The broker's notice that it cancelled consumer `tag`, as pika hands it on."""
    return SimpleNamespace(method=SimpleNamespace(consumer_tag=tag))


def test_a_consumer_the_broker_cancels_while_it_is_being_subscribed_again_is_subscribed_once_more() -> None:
    # The broker cancels the consumer (its queue was deleted); the recovery declares the queue
    # and subscribes; its new consumer is cancelled too before the recovery is done. Nothing
    # may be left consuming nothing: the recovery goes round again, declaring once more.
    async def scenario() -> tuple[list[str], list[str], str | None, bool]:
        declared: list[str] = []
        consumed: list[str] = []

        async def redeclare() -> None:
            declared.append("queue")

        subscription = JobSubscription(pika.ConnectionParameters(), "jobs", 10, lambda _d: None, redeclare)

        async def consume(_channel: object) -> None:
            tag = f"consumer-{len(consumed) + 1}"
            consumed.append(tag)
            subscription._tag = tag
            if len(consumed) == 1:  # cancelled again as soon as it is made
                subscription._on_cancelled(_cancel_of(tag))

        subscription._channel = SimpleNamespace(is_open=True)
        subscription._consume = consume  # type: ignore[method-assign,assignment]
        subscription._tag = "consumer-0"
        subscription._on_cancelled(_cancel_of("consumer-0"))
        assert subscription._recovery is not None
        await asyncio.wait_for(subscription._recovery, 5)
        # A late notice for a consumer replaced since changes nothing.
        subscription._on_cancelled(_cancel_of("consumer-1"))
        idle = subscription._recovery.done()
        return declared, consumed, subscription._tag, idle

    declared, consumed, tag, idle = asyncio.run(scenario())
    assert consumed == ["consumer-1", "consumer-2"]
    assert declared == ["queue", "queue"]
    assert tag == "consumer-2" and idle
