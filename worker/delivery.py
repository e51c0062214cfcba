"""Job deliveries as the broker sends them, and the subscription that receives them.

aio-pika wraps each delivery in an ``IncomingMessage`` (fifteen properties decoded) and runs
the consumer callback in a second task of its own. At thousands of jobs a second per worker,
that was about a sixth of the worker's cost per message (measured with a worker whose jobs do
nothing). The worker takes aiormq's delivery as it is, on the channel of aio-pika's robust
connection. aio-pika restores only the consumers it made itself, so `JobSubscription`
subscribes again whenever that channel reopens after a reconnect, and after the broker
cancels the consumer (the queue was deleted): the queue is declared again first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from shared.errors import one_line
from shared.metrics import get_logger

RESUBSCRIBE_PAUSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message: what the worker reads of it, and how to settle it."""

    body: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    delivery_tag: int | None
    channel: AbstractChannel

    @classmethod
    def of(cls, message: DeliveredMessage) -> Delivery:
        """The delivery aiormq received."""
        properties = message.header.properties
        return cls(message.body, properties.headers or {}, properties.message_id, message.delivery_tag,
                   message.channel)

    async def ack(self) -> None:
        """Acknowledge this delivery alone."""
        if self.delivery_tag is not None:
            await self.channel.basic_ack(self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        """Hand this delivery back to the broker (requeued unless told otherwise)."""
        if self.delivery_tag is not None:
            await self.channel.basic_nack(self.delivery_tag, requeue=requeue)


class JobSubscription:
    """Delivers `queue`'s messages to `on_delivery` on a robust channel, across reconnects."""

    def __init__(
        self,
        channel: Any,
        queue: str,
        on_delivery: Callable[[Delivery], Awaitable[None]],
        redeclare: Callable[[], Awaitable[None]],
    ) -> None:
        self._channel = channel  # aio-pika's RobustChannel
        self._queue = queue
        self._on_delivery = on_delivery
        self._redeclare = redeclare
        self._underlay: AbstractChannel | None = None
        self._tag: str | None = None
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._log = get_logger()

    async def start(self) -> None:
        """Subscribe now, and again after every reopen of the channel."""
        self._channel.reopen_callbacks.add(self._on_reopen)
        await self._subscribe()

    async def stop(self) -> None:
        """Take no more deliveries (those in hand stay to be settled)."""
        self._stopped = True
        self._channel.reopen_callbacks.discard(self._on_reopen)
        for task in self._tasks:
            task.cancel()
        if self._underlay is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._underlay.basic_cancel(self._tag)

    async def _subscribe(self) -> None:
        underlay = await self._channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        ok = await underlay.basic_consume(self._queue, self._deliver)
        self._underlay, self._tag = underlay, ok.consumer_tag

    async def _deliver(self, message: DeliveredMessage) -> None:
        await self._on_delivery(Delivery.of(message))

    async def _on_reopen(self, _channel: Any) -> None:
        if not self._stopped:
            await self._subscribe()

    def _on_cancelled(self, frame: Any) -> None:
        if frame.consumer_tag == self._tag and not self._stopped:
            self._log.warning("worker.consumer_cancelled", queue=self._queue)
            task = asyncio.ensure_future(self._subscribe_again())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _subscribe_again(self) -> None:
        """After the broker cancelled the consumer: declare the queue again and resubscribe."""
        cancelled_on = self._underlay
        # Until subscribed again, here or by a reopen of the channel meanwhile.
        while not self._stopped and self._underlay is cancelled_on:
            try:
                await self._redeclare()
                await self._subscribe()
                return
            except Exception as exc:  # the broker or channel is back soon: try again
                self._log.warning("worker.resubscribe_failed", queue=self._queue, error=one_line(exc))
                await asyncio.sleep(RESUBSCRIBE_PAUSE_S)
