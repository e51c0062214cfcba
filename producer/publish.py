"""Publishing jobs with publisher confirms, a window of them in flight at once.

Waiting for each confirm in turn is bound by the broker's fsync (a few hundred messages a
second on a quorum queue); keeping a window of unconfirmed publishes in flight lets the broker
batch its writes. The publisher runs pika's `SelectConnection` event loop (callbacks, no
per-message task or future), which keeps Python's share per message at a few microseconds,
and gathers the frames of the publishes it makes at once into one write (pika would send each
frame of each message with a system call of its own).

A publish that is not confirmed (nacked, or lost with the connection) is published again, on a
new connection if need be: a duplicate job is harmless, a lost one is not. A message the broker
returns as unroutable (the queue is gone) fails the whole publish, and so does an error raised
while the messages are made: it reaches the caller, never a count of what got out before it.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection

from shared.broker import connection_parameters
from shared.errors import TransientError, redact
from shared.metrics import get_logger

DEFAULT_WINDOW = 1000
RECONNECT_TRIES = 8


@dataclass(frozen=True)
class Outgoing:
    """One message to publish through the default exchange."""

    routing_key: str
    body: bytes
    message_id: str


class _GatheringConnection(SelectConnection):
    """A `SelectConnection` that can gather the frames of many publishes into one write.

    pika hands the transport each frame of a message on its own (method, header, body), and the
    transport sends each with a system call of its own: three per job. Gathered, a window of
    publishes leaves in a few large writes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._gathered: list[bytes] | None = None
        super().__init__(*args, **kwargs)

    @contextlib.contextmanager
    def gathering(self) -> Iterator[None]:
        """Frames output inside this block are written as one, when it ends (inside another
        such block, when the outer one ends: frames must leave in the order they were made)."""
        if self._gathered is not None:
            yield
            return
        gathered: list[bytes] = []
        self._gathered = gathered
        try:
            yield
        finally:
            self._gathered = None
            if gathered and self.is_open:
                super()._adapter_emit_data(b"".join(gathered))

    def _adapter_emit_data(self, data: bytes) -> None:
        # pika's documented hook for a connection adapter's output.
        if self._gathered is not None:
            self._gathered.append(data)
        else:
            super()._adapter_emit_data(data)


class ConfirmedPublisher:
    """Publishes an iterable of messages, keeping at most `window` unconfirmed."""

    def __init__(self, params: pika.URLParameters, window: int = DEFAULT_WINDOW) -> None:
        self._params = params
        self._window = window
        self._log = get_logger()
        self._source: Iterator[Outgoing] = iter(())
        self._again: collections.deque[Outgoing] = collections.deque()
        self._unconfirmed: dict[int, Outgoing] = {}
        self._next_tag = 1
        self._confirmed = 0
        self._returned: list[str] = []
        self._exhausted = False
        self._failure: BaseException | None = None
        self._connection: _GatheringConnection | None = None
        self._channel: Any = None
        self._closing = False

    def publish_all(self, messages: Iterable[Outgoing]) -> int:
        """Publish every message; returns how many were confirmed.

        Raises `TransientError` when the broker stays unreachable or returns a message.
        """
        self._source = iter(messages)
        for attempt in range(1, RECONNECT_TRIES + 1):
            self._run_connection()
            if self._failure is not None:
                raise self._failure
            if self._done():
                return self._confirmed
            # The connection dropped: publish everything unconfirmed again on a new one.
            self._again.extendleft(reversed(list(self._unconfirmed.values())))
            self._unconfirmed.clear()
            self._log.warning("publish.reconnect", attempt=attempt, pending=len(self._again))
            time.sleep(min(0.5 * 2**attempt, 10.0))
        raise TransientError(f"the broker at {redact(self._params_url())} kept dropping the connection")

    def _params_url(self) -> str:
        return f"amqp://{self._params.host}:{self._params.port}/"

    def _done(self) -> bool:
        return self._exhausted and not self._again and not self._unconfirmed

    def _run_connection(self) -> None:
        self._closing = False
        self._next_tag = 1
        self._connection = _GatheringConnection(
            self._params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_close,
        )
        self._connection.ioloop.start()

    # -- callbacks (all on the ioloop) --------------------------------------------------

    def _on_open(self, connection: SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: SelectConnection, error: BaseException) -> None:
        connection.ioloop.stop()

    def _on_close(self, connection: SelectConnection, reason: BaseException) -> None:
        connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_return_callback(self._on_return)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(self._on_confirm, callback=lambda _: self._pump())

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if not self._closing and self._connection is not None and self._connection.is_open:
            self._connection.close()

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._returned.append(str(properties.message_id))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [t for t in self._unconfirmed if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        nacked = isinstance(method, pika.spec.Basic.Nack)
        for tag in tags:
            message = self._unconfirmed.pop(tag, None)
            if message is None:
                continue
            if nacked:
                self._again.append(message)
            else:
                self._confirmed += 1
        if self._returned:
            self._failure = TransientError(
                f"the broker returned {len(self._returned)} job(s) as unroutable (first: {self._returned[0]}); "
                "is the job queue declared?"
            )
            self._finish()
            return
        self._pump()

    def _pump(self) -> None:
        """Publish until the window is full or nothing is left; close when all confirmed."""
        assert self._connection is not None
        with self._connection.gathering():
            while len(self._unconfirmed) < self._window:
                try:
                    message = self._take()
                except Exception as exc:
                    # Raised again by publish_all: pika would log an error escaping its callback and
                    # carry on, and the source, closed by its error, would then read as exhausted.
                    self._failure = exc
                    break
                if message is None:
                    break
                self._channel.basic_publish(
                    "",
                    message.routing_key,
                    message.body,
                    pika.BasicProperties(
                        content_type="application/json", delivery_mode=2, message_id=message.message_id
                    ),
                    mandatory=True,
                )
                self._unconfirmed[self._next_tag] = message
                self._next_tag += 1
        # Closed once the gathered frames are out.
        if self._failure is not None or self._done():
            self._finish()

    def _take(self) -> Outgoing | None:
        if self._again:
            return self._again.popleft()
        if self._exhausted:
            return None
        message = next(self._source, None)
        if message is None:
            self._exhausted = True
        return message

    def _finish(self) -> None:
        self._closing = True
        if self._connection is not None and self._connection.is_open:
            self._connection.close()


def publish_confirmed(amqp_url: str, messages: Iterable[Outgoing], name: str, window: int = DEFAULT_WINDOW) -> int:
    """Publish `messages` with a window of outstanding confirms; returns the count confirmed."""
    publisher = ConfirmedPublisher(connection_parameters(amqp_url, name), window)
    return publisher.publish_all(messages)
