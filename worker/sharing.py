"""Idle workers take the jobs busy workers hold but have not started.

A worker prefetches about a thousand jobs per slot, so that one pass over a month serves
hundreds of them. While the queue holds jobs that costs nothing; once it runs dry, the jobs a
worker holds behind a running batch are work that another worker, idle by then, could do, and
the run ends when its busiest worker is done. A worker added to a run whose queue the others
have already drawn into their prefetch would find nothing at all.

So a worker with nothing in hand says so, once each time it runs out of work (and once after it
starts), on the events exchange under `IDLE_ROUTING_KEY`. Every other worker holding jobs that
wait for a slot returns half of them to the queue as fresh copies (`worker.consumer`), and the
idle worker's free prefetch takes them. Each worker hears the notices on an exclusive queue of
its own. A notice lost or unheeded costs balance, never a job.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika

from shared.errors import one_line
from shared.metrics import get_logger
from shared.topology import Topology

IDLE_ROUTING_KEY = "worker.idle"
# How long a worker must stay without jobs before it says so: the broker refills a worker's
# prefetch within a millisecond or two of its acks while the queue holds jobs.
IDLE_AFTER_S = 0.01
# A worker fed a trickle of jobs (retries coming back one by one) runs out of work after each:
# its notices still go out, but `worker.idle` is logged at info at most this often.
IDLE_LOG_EVERY_S = 10.0


class IdleNotices:
    """Says when this worker is idle, and hears when others are (`on_idle` gets their names)."""

    def __init__(self, topology: Topology, identity: str, on_idle: Callable[[str], None]) -> None:
        self._topology = topology
        self._identity = identity
        self._on_idle = on_idle
        self._exchange: Any = None
        self._log = get_logger(worker=identity)
        self._logged_at: float | None = None  # when `worker.idle` was last logged at info
        self._unlogged = 0  # notices sent since then

    async def start(self, connection: Any) -> None:
        """Hear and send notices on a channel of their own on `connection` (a robust one).

        Best effort: a broker that refuses the notices' queue leaves the worker working, only
        without sharing, and the channel that jobs are announced and settled on untouched.
        The queue is named here, not by the broker: a robust channel declares it again under
        the same name after reconnecting, and the broker refuses names it would have made.
        """
        try:
            channel = await connection.channel(publisher_confirms=False)
            events = await channel.get_exchange(self._topology.events)
            queue = await channel.declare_queue(
                f"{self._topology.ns}.idle-workers.{uuid.uuid4().hex[:16]}", exclusive=True, auto_delete=True
            )
            await queue.bind(events, routing_key=IDLE_ROUTING_KEY)
            await queue.consume(self._heard, no_ack=True)
        except Exception as exc:
            self._log.warning("worker.idle_notices_unavailable", error=one_line(exc))
            return
        self._exchange = events

    async def announce(self) -> None:
        """Tell the other workers that this one has nothing in hand (best effort)."""
        if self._exchange is None:
            return
        notice = aio_pika.Message(b"", app_id=self._identity, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        self._log_idle()
        try:
            await self._exchange.publish(notice, routing_key=IDLE_ROUTING_KEY)
        except Exception as exc:  # balance only: the jobs are safe either way
            self._log.debug("worker.idle_notice_unsent", error=one_line(exc))

    def _log_idle(self) -> None:
        """`worker.idle` at info the first time and then at most every `IDLE_LOG_EVERY_S`,
        with the notices sent in between (`since_last`); at debug otherwise."""
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < IDLE_LOG_EVERY_S:
            self._unlogged += 1
            self._log.debug("worker.idle")
            return
        self._log.info("worker.idle", since_last=self._unlogged)
        self._logged_at, self._unlogged = now, 0

    async def _heard(self, message: Any) -> None:
        idle = message.app_id
        if not idle or idle == self._identity:
            return
        try:
            self._on_idle(idle)
        except Exception as exc:  # a fault of tickq's own: kept from the broker connection
            self._log.error("worker.idle_notice_failed", idle_worker=idle, error=one_line(exc), exc_info=True)
