"""The aggregator service: follows job events and writes each run's tables once all of its
jobs are accounted for (succeeded or dead), and again when a replay changes the outcome.

Events only tell it *when* to aggregate; *what* it aggregates always comes from the stored
results (`aggregator.tables.aggregate_run`), so a duplicate event, a replay of a job that had
in fact succeeded, or the service's own crash and restart cannot count a job twice. An event
is acked only after its effect is durable: on a crash it is redelivered, and the run's state
is rebuilt from storage when the service first sees it again.

The event queue is bounded (`shared.topology`): when the service falls far behind, or is not
running at all, the oldest events are dropped. So a run that stays unaccounted with no event
for `resync_after_s` has its state read again from storage, and is aggregated if that shows
every job accounted for.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from aggregator.tables import RunState, aggregate_run, load_state, read_manifest
from shared.broker import connect
from shared.errors import ErrorClass, PoisonError, one_line
from shared.layout import JobKey, RunLayout
from shared.messages import JobEvent, parse_job
from shared.metrics import get_logger
from shared.observability import AggregatorMetrics, HealthServer, LivenessProbe
from shared.runstate import RunNotFound, record_dead
from shared.settings import Settings
from shared.storage import open_storage
from shared.topology import BROKER_LIMIT_ERROR, Topology, declare

EVENT_PREFETCH = 200
HEARTBEAT_INTERVAL_S = 10.0
FORGET_WRITTEN_AFTER_S = 3600.0
DEFAULT_RESYNC_AFTER_S = 60.0
# A stalled run (no job finishing) is read again less and less often: reading a large run's
# state lists every marker.
MAX_RESYNC_INTERVAL_S = 3600.0
# Pauses between tries of an event while storage or the broker fails (the last one repeats).
RETRY_PAUSES_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


@dataclass
class _Run:
    output: str
    run_id: str
    state: RunState
    written_signature: tuple[int, int] | None = None
    touched: float = 0.0
    synced: float = 0.0
    resync_interval: float = 0.0

    def signature(self) -> tuple[int, int]:
        return (len(self.state.succeeded), len(self.state.dead))


class AggregatorService:
    """Consumes ``N.events.aggregator`` and aggregates runs as they complete."""

    def __init__(
        self,
        settings: Settings,
        idle_exit_s: float | None = None,
        heartbeat_file: Path | None = None,
        health_port: int | None = None,
        resync_after_s: float = DEFAULT_RESYNC_AFTER_S,
    ) -> None:
        self.settings = settings
        self.resync_after_s = resync_after_s
        self.topology = Topology(settings.namespace)
        self.idle_exit_s = idle_exit_s
        self.heartbeat_file = heartbeat_file
        self.log = get_logger()
        self.runs: dict[tuple[str, str], _Run] = {}
        self.aggregations = 0
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._last_activity = time.monotonic()
        self.metrics = AggregatorMetrics()
        self._liveness = LivenessProbe(max_age_s=6 * HEARTBEAT_INTERVAL_S)
        self._health_port = health_port

    def stop(self, reason: str) -> None:
        """Stop consuming; unacked events go back to the queue."""
        if not self._stopping.is_set():
            self.log.info("aggregator.stopping", reason=reason)
            self._stopping.set()

    async def run(self) -> None:
        """Consume events until stopped."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        health = None
        if self._health_port is not None:
            health = HealthServer(self.metrics.registry, liveness=self._liveness)
            health.start(self._health_port)
        connection = await connect(self.settings, "tickq-aggregator")
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=EVENT_PREFETCH)
            await declare(channel, self.topology)
            queue = await channel.get_queue(self.topology.aggregator_events)
            self.log.info("aggregator.started", queue=self.topology.aggregator_events)
            tag = await queue.consume(self._on_event)
            housekeeping = asyncio.create_task(self._housekeeping())
            await self._stopping.wait()
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            async with self._lock:  # let the event in hand finish
                housekeeping.cancel()
        finally:
            with contextlib.suppress(Exception):
                await connection.close()
            if health is not None:
                health.stop()
        self.log.info("aggregator.stopped", aggregations=self.aggregations)

    async def _housekeeping(self) -> None:
        last_beat = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_INTERVAL_S:
                last_beat = now
                self._liveness.beat()
                self.metrics.runs_tracked(len(self.runs))
                if self.heartbeat_file is not None:
                    self.heartbeat_file.parent.mkdir(parents=True, exist_ok=True)
                    self.heartbeat_file.touch()
                self.log.info("aggregator.heartbeat", runs_tracked=len(self.runs), aggregations=self.aggregations)
                self._forget_old_runs(now)
            if not self._lock.locked():
                await self._resync_quiet_runs(now)
            idle = self.idle_exit_s is not None and now - self._last_activity >= self.idle_exit_s
            if idle and not self._lock.locked():
                self.stop("idle")
            await asyncio.sleep(0.2)

    def _forget_old_runs(self, now: float) -> None:
        for key, run in list(self.runs.items()):
            if run.written_signature is not None and now - run.touched > FORGET_WRITTEN_AFTER_S:
                del self.runs[key]

    async def _resync_quiet_runs(self, now: float) -> None:
        """Read again from storage the state of runs left unaccounted with no recent event."""
        quiet = [
            run for run in self.runs.values()
            if not run.state.accounted
            and now - max(run.touched, run.synced) >= max(run.resync_interval, self.resync_after_s)
        ]
        for run in quiet:
            async with self._lock:
                run.synced = time.monotonic()
                known = run.signature()
                try:
                    await self._aggregate_if_accounted(run)
                except Exception as exc:  # storage trouble: the next resync tries again
                    self.log.warning("aggregator.resync_failed", run_id=run.run_id, error=one_line(exc))
                stalled = run.signature() == known
                self.log.info("aggregator.resynced", run_id=run.run_id, events_missed=not stalled,
                              accounted=run.state.accounted)
                run.resync_interval = (
                    min(2 * max(run.resync_interval, self.resync_after_s), MAX_RESYNC_INTERVAL_S) if stalled else 0.0
                )

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        self._last_activity = time.monotonic()
        async with self._lock:
            try:
                event = self._event_of(message)
            except ValueError as exc:
                self.log.warning("aggregator.bad_event", error=one_line(exc))
                await message.ack()
                return
            if event is None:  # a dead letter its worker recorded and announced itself
                await message.ack()
                return
            self.metrics.event(event.type, len(event.jobs))
            if not await self._handle(event, dead_letter=message.routing_key == self.topology.dead):
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)
                return
            with contextlib.suppress(Exception):
                await message.ack()
            self._last_activity = time.monotonic()

    async def _handle(self, event: JobEvent, dead_letter: bool) -> bool:
        """Apply `event` (and record a broker's dead letter), trying again while storage or the
        broker fails; False when the service stops first and the event must go back.

        The event is held, not requeued, between tries: a requeue counts as a delivery on
        RabbitMQ 4.0-4.2, whose quorum queues drop a message after 20 (the default limit),
        so an outage of a minute would lose the events that came in during it.
        """
        for attempt in itertools.count(1):
            try:
                if dead_letter:
                    await self._record_broker_dead_letter(event)
                await self._apply(event)
                return True
            except RunNotFound as exc:  # the run is not (any more) where the event says
                self.log.warning("aggregator.event_dropped", run_id=event.run_id, error=one_line(exc))
                return True
            except Exception as exc:  # storage or broker trouble, access refused included
                pause = RETRY_PAUSES_S[min(attempt, len(RETRY_PAUSES_S)) - 1]
                self.log.warning("aggregator.event_failed", run_id=event.run_id, error=one_line(exc),
                                 attempt=attempt, retry_in_s=pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                if self._stopping.is_set():
                    return False
        raise AssertionError("unreachable")  # pragma: no cover

    def _event_of(self, message: AbstractIncomingMessage) -> JobEvent | None:
        """The job event `message` carries; for a copy of a dead letter (`shared.topology`),
        a job.dead event when the broker made it at its delivery limit, else None. Raises
        `ValueError` when the message is neither an event nor a job."""
        if message.routing_key != self.topology.dead:
            return JobEvent.from_body(message.body)
        if "x-tickq-error-class" in (message.headers or {}):
            return None  # a worker's: it wrote the dead record and sent a job.dead event
        try:
            job = parse_job(message.body)
        except PoisonError as exc:
            raise ValueError(f"a dead letter of no job: {exc}") from None
        return JobEvent.from_body(JobEvent.body_about([(job, {"error_class": str(ErrorClass.CRASH_LOOP)})],
                                                      "job.dead", "broker"))

    async def _record_broker_dead_letter(self, event: JobEvent) -> None:
        """Write the dead record of a job the broker dead-lettered itself: status, the one-shot
        aggregate and a resync read the run's dead jobs from those records, and no worker
        wrote one (the job's workers died before they could look at it)."""
        storage = open_storage(event.output, self.settings.s3_endpoint_url)
        layout = RunLayout(event.run_id)
        now = dt.datetime.now(dt.UTC).isoformat()
        loop = asyncio.get_running_loop()
        # `RunNotFound` when the run is not there: no record is left in a folder of no run.
        await loop.run_in_executor(None, read_manifest, storage, layout)
        for job in event.jobs:
            record = {"job_id": job.job_id, "worker": "broker", "at": now, "error_class": str(ErrorClass.CRASH_LOOP),
                      "error": BROKER_LIMIT_ERROR, "attempts": 0, "failed_at": now}
            key = JobKey(job.month, job.security, job.date)
            await loop.run_in_executor(None, record_dead, storage, layout, key, record)
            self.log.warning("aggregator.recorded_dead", run_id=event.run_id, job_id=job.job_id,
                             error_class=str(ErrorClass.CRASH_LOOP), error=BROKER_LIMIT_ERROR)

    async def _apply(self, event: JobEvent) -> None:
        loop = asyncio.get_running_loop()
        key = (event.output, event.run_id)
        run = self.runs.get(key)
        if run is None:
            storage = open_storage(event.output, self.settings.s3_endpoint_url)
            layout = RunLayout(event.run_id)
            await loop.run_in_executor(None, read_manifest, storage, layout)
            state = await loop.run_in_executor(None, load_state, storage, layout)
            run = self.runs[key] = _Run(event.output, event.run_id, state)
        positions = run.state.expected.positions((job.month, job.security, job.date) for job in event.jobs)
        positions = positions[positions >= 0]  # a job that is not the run's changes nothing
        if event.type == "job.succeeded":
            run.state.succeeded.add_at(positions)
            run.state.dead.remove_at(positions)
        else:  # dead, unless it succeeded after all
            run.state.dead.add_at(positions[~run.state.succeeded.mask[positions]])
        run.touched = time.monotonic()
        run.resync_interval = 0.0
        if run.state.accounted and run.written_signature != run.signature():
            await self._aggregate_if_accounted(run)

    async def _aggregate_if_accounted(self, run: _Run) -> None:
        """Read the run's state from storage; write its tables if every job is accounted for."""
        loop = asyncio.get_running_loop()
        storage = open_storage(run.output, self.settings.s3_endpoint_url)
        state = await loop.run_in_executor(None, load_state, storage, RunLayout(run.run_id), run.state.expected)
        run.state = state
        if state.accounted and run.written_signature != run.signature():
            result = await loop.run_in_executor(None, aggregate_run, storage, run.run_id, state)
            run.written_signature = run.signature()
            self.aggregations += 1
            self.metrics.aggregated(result.summary.get("aggregate_duration_s"))
            self.log.info(
                "aggregator.run_written",
                run_id=run.run_id,
                complete=result.complete,
                succeeded=result.succeeded,
                dead=result.dead,
            )


async def run_aggregator(
    settings: Settings,
    idle_exit_s: float | None = None,
    heartbeat_file: Path | None = None,
    health_port: int | None = None,
    resync_after_s: float = DEFAULT_RESYNC_AFTER_S,
) -> None:
    """Run the aggregator service until stopped."""
    await AggregatorService(settings, idle_exit_s, heartbeat_file, health_port, resync_after_s).run()
