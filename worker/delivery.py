"""Job deliveries as the broker sends them, and the subscription that receives them.

The worker takes its jobs on a pika connection of its own, on the worker's event loop
(`AsyncioConnection`), and publishes through aio-pika's robust connection. Receiving a message
is the one broker cost every job pays in the worker, and pika decodes a delivery's three
frames in about a third of aiormq's CPU (12-13 µs against 41-44 µs a message, consuming alone,
acking every 512th with ``multiple``): see bench/RESULTS.md.

`JobSubscription` keeps consuming across lost connections and closed channels (it opens them
again at once, then every `RESUBSCRIBE_PAUSE_S` while that fails) and after the broker cancels
the consumer or refuses it for want of a queue (the queue was deleted: it is declared again
first). Deliveries in hand when their channel closed cannot be acked any more; the broker
redelivers them. A reply the subscription waits for fails as soon as its channel or connection
closes, with the broker's reason, rather than at a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.channel import Channel
from pika.exceptions import ChannelClosedByBroker

from shared.broker import BrokerUnavailable
from shared.errors import one_line
from shared.metrics import get_logger

RESUBSCRIBE_PAUSE_S = 1.0
START_ATTEMPTS = 3
OPEN_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 5.0


class SettlingChannel:
    """A consuming channel's acks and nacks, as coroutines (what `worker.acks` awaits)."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    @property
    def is_closed(self) -> bool:
        """Whether the channel closed: its deliveries can no longer be settled."""
        return bool(self._channel.is_closed)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Ack up to `delivery_tag` (that one alone unless `multiple`)."""
        self._channel.basic_ack(delivery_tag, multiple)

    async def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        """Hand deliveries back to the broker."""
        self._channel.basic_nack(delivery_tag, multiple, requeue)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message: what the worker reads of it, and how to settle it."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    delivery_tag: int | None
    channel: Any  # a `SettlingChannel`, or anything with its coroutines and `is_closed`

    async def ack(self) -> None:
        """Acknowledge this delivery alone."""
        if self.delivery_tag is not None:
            await self.channel.basic_ack(self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        """Hand this delivery back to the broker (requeued unless told otherwise)."""
        if self.delivery_tag is not None:
            await self.channel.basic_nack(self.delivery_tag, requeue=requeue)


class JobSubscription:
    """Hands `queue`'s messages to `on_delivery` (on the event loop, as they arrive), `prefetch`
    at most unsettled, on a connection of its own, across reconnects."""

    def __init__(
        self,
        parameters: pika.ConnectionParameters,
        queue: str,
        prefetch: int,
        on_delivery: Callable[[Delivery], None],
        redeclare: Callable[[], Awaitable[None]],
    ) -> None:
        self._parameters = parameters
        self._queue = queue
        self._prefetch = prefetch
        self._on_delivery = on_delivery
        self._redeclare = redeclare
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._settler: SettlingChannel | None = None
        self._tag: str | None = None
        self._stopped = False
        self._closed: asyncio.Future[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._renewal: asyncio.Future[None] | None = None
        self._consumer_prefetch: int | None = None  # the prefetch the consumer was made with
        self._redeclare_pending = False
        self._starting = False
        self._replies: set[asyncio.Future[Any]] = set()
        self._log = get_logger()

    async def start(self) -> None:
        """Connect and subscribe; raises `BrokerUnavailable` when `START_ATTEMPTS` tries fail.

        A queue deleted since the worker declared it is declared again; a connection the broker
        drops while refusing the consumer is made again."""
        self._starting = True
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    if await self._try_subscribing():
                        return
                    error = "the broker cancelled the consumer as it was made"
                except Exception as exc:
                    error = one_line(_innermost(exc))
                if attempt == START_ATTEMPTS:
                    await self.close()
                    raise BrokerUnavailable(f"the worker could not subscribe to {self._queue}: {error}")
                self._log.warning("worker.subscribe_failed", queue=self._queue, attempt=attempt, error=error)
                await asyncio.sleep(RESUBSCRIBE_PAUSE_S)
        finally:
            self._starting = False

    def set_prefetch(self, prefetch: int) -> None:
        """Hold up to `prefetch` unsettled deliveries from now on, and after reconnecting.

        RabbitMQ fixes a consumer's prefetch when the consumer is made, so the consumer is
        replaced on its channel: deliveries in hand stay there to be settled (until they are,
        the old consumer's and the new one's add up)."""
        self._prefetch = prefetch
        if not self._starting and (self._renewal is None or self._renewal.done()):
            self._renewal = asyncio.ensure_future(self._renew_consumer())

    async def _renew_consumer(self) -> None:
        """Replace the consumer with one of the current prefetch, on the same channel. A channel
        or connection lost meanwhile is left to the recovery, which subscribes with it."""
        with contextlib.suppress(Exception):
            while not self._stopped:
                channel, tag = self._channel, self._tag
                if channel is None or not channel.is_open or tag is None or self._consumer_prefetch == self._prefetch:
                    return
                cancelled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._tag = None  # stopping now has no consumer to cancel, and none is made
                channel.basic_cancel(tag, callback=functools.partial(_on_reply, cancelled))
                await self._reply(cancelled)
                if self._stopped or channel.is_closed or channel is not self._channel or self._tag is not None:
                    return
                await self._consume(channel)

    async def stop(self) -> None:
        """Take no more deliveries (those in hand stay to be settled until `close`)."""
        self._stopped = True
        for task in (self._recovery, self._renewal):
            if task is not None:
                task.cancel()
        channel, tag = self._channel, self._tag
        if channel is None or tag is None or not channel.is_open:
            return
        cancelled = asyncio.get_running_loop().create_future()
        with contextlib.suppress(Exception):
            channel.basic_cancel(tag, callback=lambda _frame: _resolve(cancelled, None))
            await asyncio.wait_for(cancelled, CLOSE_TIMEOUT_S)

    async def close(self) -> None:
        """Close the connection: deliveries not settled by now go back to the queue."""
        self._stopped = True
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        with contextlib.suppress(Exception):
            if not connection.is_closing:
                connection.close()
            if self._closed is not None:
                await asyncio.wait_for(asyncio.shield(self._closed), CLOSE_TIMEOUT_S)

    # -- opening -----------------------------------------------------------------------

    async def _subscribe(self) -> None:
        """A channel on an open connection (connecting first when there is none), consuming."""
        if self._connection is None or not self._connection.is_open:
            await self._connect()
        assert self._connection is not None
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Channel] = loop.create_future()
        channel = self._connection.channel(on_open_callback=lambda channel: _resolve(opened, channel))
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        await self._reply(opened)
        await self._consume(channel)

    async def _consume(self, channel: Channel) -> None:
        """A consumer on `channel`, with the current prefetch."""
        loop = asyncio.get_running_loop()
        prefetch = self._prefetch
        qos: asyncio.Future[None] = loop.create_future()
        channel.basic_qos(prefetch_count=prefetch, callback=lambda _frame: _resolve(qos, None))
        await self._reply(qos)
        consuming: asyncio.Future[None] = loop.create_future()
        if channel is not self._channel or self._settler is None:
            # One settler per channel: the coalescer gathers acks per settler, and a multiple
            # ack covers every earlier delivery of the channel.
            self._channel, self._settler = channel, SettlingChannel(channel)
        # The channel's settler goes with each of its deliveries.
        deliver = functools.partial(self._deliver, self._settler)
        self._tag = channel.basic_consume(self._queue, deliver, callback=lambda _frame: _resolve(consuming, None))
        self._consumer_prefetch = prefetch
        await self._reply(consuming)

    async def _reply(self, future: asyncio.Future[Any]) -> Any:
        """The broker's reply `future` stands for; it fails when the channel or connection
        asked closes first (`_fail_replies`)."""
        self._replies.add(future)
        try:
            return await asyncio.wait_for(future, OPEN_TIMEOUT_S)
        finally:
            self._replies.discard(future)

    def _fail_replies(self, reason: BaseException) -> None:
        # One opening runs at a time (the start, or the recovery), so a reply still awaited
        # is almost always the closed channel's or connection's; a late close of an older one
        # fails it needlessly, and the opener tries again.
        for future in self._replies:
            if not future.done():
                future.set_exception(reason)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()

        def on_open_error(_connection: Any, error: BaseException | str) -> None:
            failure = error if isinstance(error, BaseException) else ConnectionError(str(error))
            if not opened.done():
                opened.set_exception(failure)
            _resolve(closed, None)

        def on_closed(connection: Any, reason: BaseException) -> None:
            _resolve(closed, None)
            self._on_connection_closed(connection, reason)

        self._connection = AsyncioConnection(
            self._parameters,
            on_open_callback=lambda _connection: _resolve(opened, None),
            on_open_error_callback=on_open_error,
            on_close_callback=on_closed,
            custom_ioloop=loop,
        )
        self._closed = closed
        try:
            await asyncio.wait_for(opened, OPEN_TIMEOUT_S)
        except BaseException:
            connection = self._connection
            if not (connection.is_closed or connection.is_closing):  # still opening (timed out)
                with contextlib.suppress(Exception):
                    connection.close()
            raise

    # -- deliveries --------------------------------------------------------------------

    def _deliver(self, settler: SettlingChannel, _channel: Channel, method: Any, properties: Any,
                 body: bytes) -> None:
        self._on_delivery(Delivery(body, properties.headers or {}, properties.message_id, method.delivery_tag,
                                   settler))

    # -- recovering --------------------------------------------------------------------

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        if connection is not self._connection:
            return
        self._fail_replies(reason)
        if not self._stopped:
            self._log.warning("worker.consumer_connection_lost", queue=self._queue, reason=one_line(reason))
            self._recover(redeclare=False)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if isinstance(reason, ChannelClosedByBroker) and reason.reply_code == 404:
            self._redeclare_pending = True  # the queue is gone: no consumer until it is declared
        self._fail_replies(reason)
        # A channel the broker closed on an open connection (a lost connection closes its
        # channels too, and is recovered as a whole). One still opening is the opener's to retry.
        if channel is self._channel and not self._stopped and self._connection is not None \
                and self._connection.is_open:
            self._log.warning("worker.consumer_channel_closed", queue=self._queue, reason=one_line(reason))
            self._recover(redeclare=False)

    def _on_cancelled(self, frame: Any) -> None:
        # A late notice of a consumer replaced since is none of this one's business.
        if not self._stopped and frame.method.consumer_tag == self._tag:
            self._log.warning("worker.consumer_cancelled", queue=self._queue)
            self._recover(redeclare=True)

    def _recover(self, redeclare: bool) -> None:
        """Subscribe again, after declaring the queue again when the broker cancelled the
        consumer or found no queue; until it works or the subscription stops. A loss while a
        recovery runs is left to it: it goes round again if its new consumer is the one lost.
        While the subscription starts, `start` does its own retrying."""
        self._tag = None
        self._redeclare_pending = self._redeclare_pending or redeclare
        if self._starting:
            return
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.ensure_future(self._subscribe_again())

    async def _subscribe_again(self) -> None:
        while not self._stopped:
            try:
                if await self._try_subscribing():
                    return
            except Exception as exc:  # the broker is back soon: try again
                self._log.warning("worker.resubscribe_failed", queue=self._queue, error=one_line(_innermost(exc)))
                await asyncio.sleep(RESUBSCRIBE_PAUSE_S)

    async def _try_subscribing(self) -> bool:
        """One try at consuming: the queue declared again where it went, then a consumer (on
        the open channel when only the consumer was cancelled). False when the new consumer
        was cancelled or its channel closed before the try was done."""
        if self._redeclare_pending:
            await self._redeclare()
        channel = self._channel
        if channel is not None and channel.is_open:
            await self._consume(channel)
        else:
            await self._subscribe()
        if self._tag is None:
            return False
        self._redeclare_pending = False
        return True


def _innermost(exc: BaseException) -> BaseException:
    """What a failed pika connection attempt comes down to: pika wraps the socket's error in a
    connector's (`exception`), that in the workflow's (`exceptions`), that in an
    `AMQPConnectionError` (its argument)."""
    for _ in range(8):  # a chain is short; this bounds a cyclic one
        inner = getattr(exc, "exception", None)
        if not isinstance(inner, BaseException):
            wrapped = list(getattr(exc, "exceptions", ())) or [a for a in exc.args if isinstance(a, BaseException)]
            inner = wrapped[-1] if wrapped else None
        if inner is None:
            break
        exc = inner
    return exc


def _on_reply(future: asyncio.Future[None], _frame: Any) -> None:
    _resolve(future, None)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
