"""`tickq dlq list | show | replay | purge`: inspecting and replaying dead letters.

Every command takes the dead letters it needs from ``N.dead`` unacknowledged, so nothing is
lost if it dies half-way: whatever it did not settle returns to the queue. Messages that do
not match the filters are handed back unchanged, as fresh copies rather than requeued (see
`DeadLetterQueue.hand_back`). A replay publishes a fresh attempt of the job (same body, same
job id, a new attempt budget) to ``N.jobs`` and removes the dead letter only after the broker
has confirmed the new message.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from shared.broker import connect
from shared.errors import ConfigError, ErrorClass, one_line
from shared.layout import JobKey, RunLayout
from shared.settings import Settings
from shared.storage import open_storage
from shared.topology import BROKER_LIMIT_ERROR, Topology, declare

# Safety cap on dead letters held unacknowledged at once by one command.
MAX_SCAN = 200_000
# Copies handed back whose confirms are awaited together (one at a time, a quorum queue's
# fsync would allow a few hundred a second).
HAND_BACK_WINDOW = 500
# Set by the broker on each delivery: a copy handed back starts without them.
DELIVERY_HEADERS = ("x-delivery-count", "x-acquired-count")
TICKQ_HEADERS = ("x-tickq-error-class", "x-tickq-error", "x-tickq-traceback", "x-tickq-failed-at",
                 "x-tickq-worker", "x-tickq-last-error")


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, as operators see it."""

    job_id: str
    run_id: str | None
    month: str | None
    security: str | None
    date: str | None
    error_class: str
    error: str
    attempts: int
    failed_at: str | None
    worker: str | None
    traceback: str | None

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> DeadLetter:
        """Read a dead letter's headers and (if it is JSON) its body."""
        headers = message.headers or {}
        try:
            body = json.loads(message.body)
            body = body if isinstance(body, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = {}

        def text(value: Any) -> str | None:
            if value is None:
                return None
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

        error_class = text(headers.get("x-tickq-error-class"))
        error = text(headers.get("x-tickq-error"))
        if error_class is None:
            # Dead-lettered by the broker itself: its delivery limit caught a crash loop.
            error_class = str(ErrorClass.CRASH_LOOP)
            error = BROKER_LIMIT_ERROR
        try:
            attempts = int(headers.get("x-tickq-attempts", 0))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            attempts = 0
        return cls(
            job_id=str(body.get("job_id") or message.message_id or ""),
            run_id=body.get("run_id"),
            month=body.get("month"),
            security=body.get("security"),
            date=body.get("date"),
            error_class=error_class,
            error=error or "",
            attempts=attempts,
            failed_at=text(headers.get("x-tickq-failed-at")),
            worker=text(headers.get("x-tickq-worker")),
            traceback=text(headers.get("x-tickq-traceback")),
        )

    def listing(self) -> dict[str, Any]:
        """The fields of `tickq dlq list --json`."""
        return {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "month": self.month,
            "security": self.security,
            "date": self.date,
            "error_class": self.error_class,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
        }


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a command acts on."""

    run_id: str | None = None
    error_class: str | None = None
    job_ids: frozenset[str] | None = None

    def matches(self, letter: DeadLetter) -> bool:
        """Whether `letter` passes every given filter."""
        if self.run_id is not None and letter.run_id != self.run_id:
            return False
        if self.error_class is not None and letter.error_class != self.error_class:
            return False
        return not (self.job_ids is not None and letter.job_id not in self.job_ids)


class DeadLetterQueue:
    """A session on ``N.dead``: takes messages unacked, settles each explicitly."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topology = Topology(settings.namespace)
        self._connection: Any = None
        self._channel: Any = None
        self._queue: Any = None

    async def __aenter__(self) -> DeadLetterQueue:
        self._connection = await connect(self.settings, "tickq-dlq", robust=False)
        self._channel = await self._connection.channel(publisher_confirms=True)
        await declare(self._channel, self.topology)
        self._queue = await self._channel.get_queue(self.topology.dead)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing hands back every message not yet acked.
        await self._connection.close()

    async def take(self, limit: int = MAX_SCAN) -> list[AbstractIncomingMessage]:
        """Up to `limit` dead letters, held unacked by this session."""
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < limit:
            message = await self._queue.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            taken.append(message)
        return taken

    async def hand_back(self, messages: Iterable[AbstractIncomingMessage]) -> None:
        """Return dead letters to the queue unchanged, without spending their deliveries.

        A requeued message counts as one more delivery on RabbitMQ 3.x and 4.0-4.2, and from
        4.0 a quorum queue without a delivery limit of its own drops a message after 20: read
        by requeueing, twenty `tickq dlq list` would lose every dead letter. Each letter goes
        back as a fresh copy instead, and the one taken is acked once the broker confirmed the
        copy; a letter whose copy is refused is requeued. A command killed between the two
        leaves both (one job dead-lettered twice, which a replay still counts once).
        """
        pending = list(messages)
        for start in range(0, len(pending), HAND_BACK_WINDOW):
            window = pending[start : start + HAND_BACK_WINDOW]
            copied = await asyncio.gather(*(self._copy_back(m) for m in window), return_exceptions=True)
            for message, outcome in zip(window, copied, strict=True):
                if isinstance(outcome, BaseException):
                    await message.nack(requeue=True)
                else:
                    await message.ack()

    async def _copy_back(self, message: AbstractIncomingMessage) -> None:
        """Publish a copy of `message` to the dead-letter queue and wait for its confirm."""
        headers = {k: v for k, v in (message.headers or {}).items() if k not in DELIVERY_HEADERS}
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=message.correlation_id,
                message_id=message.message_id,
                timestamp=message.timestamp,
                type=message.type,
                app_id=message.app_id,
            ),
            routing_key=self.topology.dead,
            mandatory=True,
        )

    async def replay(self, message: AbstractIncomingMessage) -> None:
        """Publish a fresh attempt of the job, confirmed, then remove the dead letter."""
        headers = {
            k: v
            for k, v in (message.headers or {}).items()
            if not k.startswith("x-death") and not k.startswith("x-first-death") and not k.startswith("x-last-death")
            and k not in TICKQ_HEADERS and k not in ("x-delivery-count", "x-tickq-attempts", "x-tickq-crashes")
        }
        headers["x-tickq-replays"] = int(headers.get("x-tickq-replays", 0) or 0) + 1  # type: ignore[arg-type]
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                message.body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                headers=headers,
            ),
            routing_key=self.topology.jobs,
            mandatory=True,
        )
        self._forget_dead_record(message)
        await message.ack()

    def _forget_dead_record(self, message: AbstractIncomingMessage) -> None:
        """The job is queued again: its dead record in the run's output no longer holds."""
        letter = DeadLetter.of(message)
        if not (letter.run_id and letter.month and letter.security and letter.date):
            return
        try:
            output = json.loads(message.body)["output"]
            key = JobKey(letter.month, letter.security, letter.date)
            open_storage(output, self.settings.s3_endpoint_url).delete(RunLayout(letter.run_id).dead(key))
        except Exception as exc:  # the worker removes it on success anyway
            print(f"note: could not remove the dead record of {letter.job_id}: {one_line(exc)}", file=sys.stderr)


async def _select(
    dlq: DeadLetterQueue, where: DeadLetterFilter, limit: int | None
) -> tuple[list[tuple[AbstractIncomingMessage, DeadLetter]], list[AbstractIncomingMessage]]:
    """Matching dead letters (at most `limit`) and the rest, all held unacked."""
    selected: list[tuple[AbstractIncomingMessage, DeadLetter]] = []
    others: list[AbstractIncomingMessage] = []
    for message in await dlq.take():
        letter = DeadLetter.of(message)
        if where.matches(letter) and (limit is None or len(selected) < limit):
            selected.append((message, letter))
        else:
            others.append(message)
    return selected, others


async def list_dead(settings: Settings, where: DeadLetterFilter, limit: int | None) -> list[DeadLetter]:
    """Matching dead letters; every message stays in the queue."""
    async with DeadLetterQueue(settings) as dlq:
        selected, others = await _select(dlq, where, limit)
        await dlq.hand_back([m for m, _ in selected] + others)
    return [letter for _, letter in selected]


@dataclass
class ReplayResult:
    """What a replay did."""

    replayed: list[str]
    left: int
    dry_run: bool


async def replay_dead(
    settings: Settings, where: DeadLetterFilter, limit: int | None, rate: float | None, dry_run: bool
) -> ReplayResult:
    """Replay matching dead letters, at most `rate` per second; the rest stay dead."""
    async with DeadLetterQueue(settings) as dlq:
        selected, others = await _select(dlq, where, limit)
        await dlq.hand_back(others)
        if dry_run:
            await dlq.hand_back(m for m, _ in selected)
            return ReplayResult([letter.job_id for _, letter in selected], len(others), True)
        replayed = []
        interval = 1.0 / rate if rate else 0.0
        next_at = time.monotonic()
        for message, letter in selected:
            if interval:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at = max(next_at + interval, time.monotonic())
            await dlq.replay(message)
            replayed.append(letter.job_id)
        return ReplayResult(replayed, len(others), False)


async def purge_dead(settings: Settings, where: DeadLetterFilter, limit: int | None) -> list[str]:
    """Remove matching dead letters for good."""
    async with DeadLetterQueue(settings) as dlq:
        selected, others = await _select(dlq, where, limit)
        await dlq.hand_back(others)
        for message, _ in selected:
            await message.ack()
    return [letter.job_id for _, letter in selected]


# ---------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------


def _filter(args: Any) -> DeadLetterFilter:
    error_class = getattr(args, "error_class", None)
    if error_class is not None and error_class not in {str(c) for c in ErrorClass}:
        raise ConfigError(f"--error-class must be one of {', '.join(str(c) for c in ErrorClass)}")
    job_ids = getattr(args, "job_id", None)
    return DeadLetterFilter(
        run_id=getattr(args, "run", None),
        error_class=error_class,
        job_ids=frozenset(job_ids) if job_ids else None,
    )


def add_arguments(parser: Any, common: Any) -> None:
    """Add `list`, `show`, `replay` and `purge` to the `dlq` parser."""
    from tickq.cli import positive_int

    sub = parser.add_subparsers(dest="dlq_command", required=True, parser_class=type(parser))

    def filters(p: Any, job_ids: bool = True) -> None:
        p.add_argument("--run", help="only this run's dead letters")
        p.add_argument("--error-class", help="transient-exhausted, permanent, poison or crash-loop")
        if job_ids:
            p.add_argument("--job-id", nargs="+", help="only these job ids")
        p.add_argument("--limit", type=positive_int, help="act on at most N dead letters")

    p = sub.add_parser("list", help="list dead letters (they stay in the queue)")
    filters(p, job_ids=False)
    p.add_argument("--json", action="store_true", help="JSON lines")
    common(p, metrics=False)

    p = sub.add_parser("show", help="everything about one dead job: error, traceback, message")
    p.add_argument("job_id")
    common(p, metrics=False)

    p = sub.add_parser("replay", help="publish fresh attempts of dead jobs")
    filters(p)
    p.add_argument("--rate", type=float, help="at most this many replays per second")
    p.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    common(p, metrics=False)

    p = sub.add_parser("purge", help="delete dead letters for good")
    filters(p)
    p.add_argument("--yes", action="store_true", help="really delete them")
    common(p, metrics=False)


def main(args: Any, settings: Settings) -> int:
    """Run a `tickq dlq` command."""
    command = args.dlq_command
    if command == "list":
        letters = asyncio.run(list_dead(settings, _filter(args), args.limit))
        for letter in letters:
            if args.json:
                print(json.dumps(letter.listing()))
            else:
                print(f"{letter.job_id}\t{letter.error_class}\t{letter.attempts}\t{letter.error}")
        if not args.json:
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
        return 0
    if command == "show":
        letters = asyncio.run(list_dead(settings, DeadLetterFilter(job_ids=frozenset([args.job_id])), None))
        if not letters:
            raise ConfigError(f"no dead letter with job id {args.job_id!r}")
        for letter in letters:
            print(json.dumps({**letter.listing(), "worker": letter.worker, "traceback": letter.traceback}, indent=2))
        return 0
    if command == "replay":
        if args.rate is not None and args.rate <= 0:
            raise ConfigError("--rate must be a positive number of replays per second")
        result = asyncio.run(replay_dead(settings, _filter(args), args.limit, args.rate, args.dry_run))
        verb = "would replay" if result.dry_run else "replayed"
        for job_id in result.replayed:
            print(f"{verb} {job_id}")
        print(f"{verb} {len(result.replayed)}; {result.left} other dead letter(s) left in place", file=sys.stderr)
        return 0
    if command == "purge":
        if not args.yes:
            raise ConfigError("purge deletes dead letters for good: add --yes to confirm")
        purged = asyncio.run(purge_dead(settings, _filter(args), args.limit))
        print(f"purged {len(purged)} dead letter(s)", file=sys.stderr)
        return 0
    raise ConfigError(f"unknown dlq command {command!r}")  # pragma: no cover
