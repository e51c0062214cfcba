"""The RabbitMQ topology of one namespace, declared idempotently by every component.

::

    producer ──► N.jobs (quorum, delivery limit) ──► workers
                   │  ▲                          │
       broker DLX  │  └── N.retry.<delay> ◄──────┤ transient failure (TTL, dead-letters back)
                   ▼                             │
                 N.dlx ──► N.dead ◄──────────────┘ permanent / poison / exhausted / crash loop
                   │
                   └──────────┐ (a copy of each dead letter the broker makes at its limit)
    workers ──► N.events (topic) ──► N.events.aggregator ──► aggregator
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError

# Workers dead-letter a crash-looping job themselves, with tickq's headers, once it has
# killed its isolation child `crash budget` times. A delivery count only says that a worker
# holding the job died or lost its connection, which every job it had prefetched shares, so
# workers renew a job's count well before the broker's limit (`worker.consumer`); the limit is
# the backstop for a message that kills its worker before the worker can look at it.
DEFAULT_CRASH_BUDGET = 5
BROKER_DELIVERY_LIMIT = 8
# What a dead letter the broker made at that limit says (it carries none of tickq's headers).
BROKER_LIMIT_ERROR = "the broker's delivery limit was reached (the job's workers kept dying)"
DEFAULT_RETRY_DELAYS_S: tuple[int, ...] = (5, 30, 120, 600)
# Job events kept for the aggregator service at most (a few hundred bytes each).
EVENTS_MAX_LENGTH = 200_000


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every exchange and queue in namespace `ns`."""

    ns: str
    retry_delays_s: tuple[int, ...] = field(default=DEFAULT_RETRY_DELAYS_S)

    @property
    def jobs(self) -> str:
        """The quorum queue of jobs."""
        return f"{self.ns}.jobs"

    @property
    def dlx(self) -> str:
        """The dead-letter exchange."""
        return f"{self.ns}.dlx"

    @property
    def dead(self) -> str:
        """The dead-letter queue."""
        return f"{self.ns}.dead"

    @property
    def events(self) -> str:
        """The topic exchange of job events."""
        return f"{self.ns}.events"

    @property
    def aggregator_events(self) -> str:
        """The aggregator's queue of job events."""
        return f"{self.ns}.events.aggregator"

    def retry_queue(self, delay_s: int) -> str:
        """The delay queue that holds a job for `delay_s` seconds."""
        return f"{self.ns}.retry.{delay_s}s"

    def jobs_arguments(self) -> dict[str, Any]:
        """Arguments of the job queue."""
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": self.dlx,
            "x-dead-letter-routing-key": self.dead,
            "x-delivery-limit": BROKER_DELIVERY_LIMIT,
            # At-least-once dead-lettering: a crash-looping job is never dropped on the way.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def retry_arguments(self, delay_s: int) -> dict[str, Any]:
        """Arguments of a delay queue: expire after the delay, back onto the job queue."""
        return {
            "x-queue-type": "quorum",
            "x-message-ttl": delay_s * 1000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.jobs,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def dead_arguments(self) -> dict[str, Any]:
        """Arguments of the dead-letter queue."""
        return {"x-queue-type": "quorum"}

    def events_arguments(self) -> dict[str, Any]:
        """Arguments of the aggregator's event queue: bounded, dropping the oldest events.

        Events only say when to aggregate (stored results and markers are the truth, and the
        aggregator service reads them again for a run whose events went missing). Unbounded,
        the queue would keep every event of every run aggregated with `tickq aggregate` alone.
        """
        return {"x-queue-type": "quorum", "x-max-length": EVENTS_MAX_LENGTH, "x-overflow": "drop-head"}

    def all_queues(self) -> list[str]:
        """Every queue of the namespace."""
        return [self.jobs, self.dead, self.aggregator_events] + [
            self.retry_queue(d) for d in self.retry_delays_s
        ]


class TopologyConflict(ConfigError):
    """The broker already has one of the namespace's queues or exchanges, declared otherwise."""


async def declare(channel: Any, topology: Topology) -> None:
    """Declare every exchange, queue and binding of `topology` on an aio-pika channel.

    Declarations are idempotent: every component calls this at start and after reconnecting.
    Raises `TopologyConflict` when a queue or exchange of the namespace exists with other
    arguments or another type (made by another tool, or by a tickq that declared it otherwise):
    the broker refuses the declaration, and only the operator can say which one should stay.
    """
    from aio_pika.exceptions import ChannelPreconditionFailed

    try:
        await _declare(channel, topology)
    except ChannelPreconditionFailed as exc:
        refusal = str(exc).removeprefix("PRECONDITION_FAILED - ")
        raise TopologyConflict(
            f"the broker refused the topology of namespace {topology.ns} ({refusal}); use another "
            "TICKQ_NAMESPACE, or delete that queue or exchange once it holds nothing you need"
        ) from None


async def _declare(channel: Any, topology: Topology) -> None:
    from aio_pika import ExchangeType

    dlx = await channel.declare_exchange(topology.dlx, ExchangeType.DIRECT, durable=True)
    dead = await channel.declare_queue(topology.dead, durable=True, arguments=topology.dead_arguments())
    await dead.bind(dlx, routing_key=topology.dead)
    await channel.declare_queue(topology.jobs, durable=True, arguments=topology.jobs_arguments())
    for delay in topology.retry_delays_s:
        await channel.declare_queue(
            topology.retry_queue(delay), durable=True, arguments=topology.retry_arguments(delay)
        )
    events = await channel.declare_exchange(topology.events, ExchangeType.TOPIC, durable=True)
    agg = await channel.declare_queue(
        topology.aggregator_events, durable=True, arguments=topology.events_arguments()
    )
    await agg.bind(events, routing_key="job.#")
    # The dead letters the broker makes at its delivery limit reach the aggregator too: no
    # worker wrote their dead records, and the aggregator writes them. (Workers publish theirs
    # straight to N.dead, with their records written.)
    await agg.bind(dlx, routing_key=topology.dead)
