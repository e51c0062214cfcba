"""Publishing jobs with publisher confirms, a window of them in flight at once.

Waiting for each confirm in turn is bound by the broker's fsync (a few hundred messages a
second on a quorum queue); keeping a window of unconfirmed publishes in flight lets the
broker batch its writes. A publish that is not confirmed (nacked, returned, or lost with the
connection) is published again: a duplicate job is harmless, a lost one is not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import aio_pika

from shared.errors import TransientError, one_line
from shared.messages import JobMessage
from shared.metrics import get_logger

DEFAULT_WINDOW = 1000
PUBLISH_TRIES = 5


async def publish_jobs(channel: Any, queue: str, jobs: Iterable[JobMessage], window: int = DEFAULT_WINDOW) -> int:
    """Publish every job to `queue` (through the default exchange); returns the count.

    Raises `TransientError` when a job could not be confirmed after several tries.
    """
    log = get_logger()
    exchange = channel.default_exchange
    in_flight: set[asyncio.Task[None]] = set()
    published = 0

    async def publish_one(job: JobMessage) -> None:
        message = aio_pika.Message(
            job.to_body(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=job.job_id,
        )
        for attempt in range(1, PUBLISH_TRIES + 1):
            try:
                await exchange.publish(message, routing_key=queue, mandatory=True)
                return
            except Exception as exc:
                if attempt == PUBLISH_TRIES:
                    raise TransientError(
                        f"job {job.job_id} was not confirmed by the broker after {attempt} tries: {one_line(exc)}"
                    ) from None
                log.warning("publish.retry", job_id=job.job_id, attempt=attempt, error=one_line(exc))
                await asyncio.sleep(min(0.2 * 2**attempt, 5.0))

    for job in jobs:
        if len(in_flight) >= window:
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            in_flight -= done
            for task in done:
                task.result()
        in_flight.add(asyncio.create_task(publish_one(job)))
        published += 1
    if in_flight:
        done, _ = await asyncio.wait(in_flight)
        for task in done:
            task.result()
    return published
