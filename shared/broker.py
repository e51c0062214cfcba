"""Connecting to RabbitMQ: one place for URLs, TLS, timeouts and the error users see."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika

from shared.errors import TransientError
from shared.settings import Settings

HEARTBEAT_S = 30


class BrokerUnavailable(TransientError):
    """No broker answered at the configured URL."""


def _url_with_options(url: str, connection_name: str) -> str:
    sep = "&" if "?" in url else "?"
    extra = []
    if "heartbeat=" not in url:
        extra.append(f"heartbeat={HEARTBEAT_S}")
    if "name=" not in url:
        extra.append(f"name={connection_name}")
    return url + (sep + "&".join(extra) if extra else "")


async def connect(settings: Settings, name: str, *, robust: bool = True, timeout: float = 10) -> Any:
    """A connection to the broker; `robust` connections reconnect and redeclare by themselves.

    Raises `BrokerUnavailable` with a one-line message naming TICKQ_AMQP_URL when no broker
    answers. ``amqps://`` URLs use TLS with the system's trust store.
    """
    url = _url_with_options(settings.amqp_url, name)
    factory = aio_pika.connect_robust if robust else aio_pika.connect
    try:
        return await asyncio.wait_for(factory(url, timeout=timeout), timeout=timeout + 5)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
        raise BrokerUnavailable(
            f"no RabbitMQ broker answers at {settings.safe_amqp_url} "
            f"({type(exc).__name__}); start one or point TICKQ_AMQP_URL at yours"
        ) from None
