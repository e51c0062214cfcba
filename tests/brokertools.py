"""Direct broker access for tests: publish raw messages, read the dead-letter queue."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika

from shared.topology import Topology


def publish_raw(url: str, namespace: str, bodies: list[bytes], headers: dict[str, Any] | None = None,
                queue: str | None = None, message_ids: list[str] | None = None, exchange: str = "") -> None:
    """Publish raw bodies to the namespace's job queue (or its `queue`: the routing key on
    `exchange`, the default exchange unless given), confirmed."""

    async def run() -> None:
        connection = await aio_pika.connect(url, timeout=30)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            from shared.topology import declare

            await declare(channel, Topology(namespace))
            target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
            for i, body in enumerate(bodies):
                await target.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers or {},
                                     message_id=message_ids[i] if message_ids else None),
                    routing_key=queue or Topology(namespace).jobs,
                )

    asyncio.run(run())


def declare_foreign_queue(url: str, name: str, arguments: dict[str, Any], body: bytes) -> None:
    """A durable queue `name` declared with `arguments`, not tickq's, holding one message."""

    async def run() -> None:
        connection = await aio_pika.connect(url, timeout=30)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(name, durable=True, arguments=arguments)
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=name)

    asyncio.run(run())


def drain_queue(url: str, queue: str, requeue: bool = True) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message now in `queue` (handed back afterwards unless `requeue` is False)."""

    async def run() -> list[Any]:
        connection = await aio_pika.connect(url, timeout=30)
        async with connection:
            channel = await connection.channel()
            q = await channel.get_queue(queue, ensure=False)
            got = []
            while True:
                message = await q.get(no_ack=False, fail=False, timeout=5)
                if message is None:
                    break
                got.append(message)
            for message in got:
                if requeue:
                    await message.nack(requeue=True)
                else:
                    await message.ack()
            return got

    return asyncio.run(run())


def delete_queue(url: str, queue: str) -> None:
    """Delete `queue` (its consumers are cancelled by the broker)."""

    async def run() -> None:
        connection = await aio_pika.connect(url, timeout=30)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(queue)

    asyncio.run(run())


def queue_depth(url: str, queue: str) -> int:
    """Messages ready in `queue`."""
    return _counts(url, queue)[0]


def consumers(url: str, queue: str) -> int:
    """Consumers subscribed to `queue`, as the broker counts them."""
    return _counts(url, queue)[1]


def _counts(url: str, queue: str) -> tuple[int, int]:
    """The broker's counts of `queue`: messages ready, consumers subscribed."""

    async def run() -> tuple[int, int]:
        connection = await aio_pika.connect(url, timeout=30)
        async with connection:
            channel = await connection.channel()
            declared = (await channel.declare_queue(queue, passive=True)).declaration_result
            return int(declared.message_count or 0), int(declared.consumer_count or 0)

    return asyncio.run(run())


def hold_and_drop(url: str, queue: str, times: int) -> int:
    """Take every ready message of `queue` unacked and drop the connection, `times` over.

    What the broker sees when a worker holding prefetched jobs dies: each round returns
    the messages and raises their delivery count. Returns how many messages one round held.
    """

    async def round_trip() -> int:
        connection = await aio_pika.connect(url, timeout=30)
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        held = 0
        while await q.get(no_ack=False, fail=False, timeout=5) is not None:
            held += 1
        await connection.close()
        return held

    counts = [asyncio.run(round_trip()) for _ in range(times)]
    assert len(set(counts)) == 1, f"messages held per round changed: {counts}"
    return counts[0]
