"""The worker's broker side: where every job is acked, retried or dead-lettered.

One asyncio event loop owns the broker connections, the one jobs arrive on
(`worker.delivery`) and the one everything is published on (so heartbeats keep flowing however
long a job runs); jobs execute on a thread pool. For each delivery:

1. parse and validate the message; a poison message is dead-lettered at once;
2. a job whose holders died twice runs in an isolation child; one that killed its child
   `crash budget` times is dead-lettered as ``crash-loop``;
3. execute the job on a worker thread (result, then success marker), with the other jobs of
   its month in hand (`worker.batcher`); the jobs of a batch are settled together;
4. success: publish ``job.succeeded`` and wait for the broker's confirm, then ack (acks of
   jobs that finish together go out as one ``multiple`` ack: `worker.acks`);
   transient failure: publish the job to a delay queue (confirmed), then ack, or dead-letter
   it as ``transient-exhausted`` once its attempt budget is spent;
   permanent failure: dead-letter it (confirmed), then ack.

A publish always completes before the ack of the message it replaces, never the reverse: a
crash in between leaves a duplicate, which the deterministic job id makes harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Awaitable, Coroutine
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import psutil

from shared.broker import connect, connection_parameters
from shared.errors import ErrorClass, PermanentError, PoisonError, is_transient, one_line, redact
from shared.layout import JobKey, RunLayout
from shared.messages import JobEvent, JobMessage, parse_job
from shared.metrics import get_logger
from shared.observability import HealthServer, LivenessProbe, WorkerMetrics
from shared.runstate import record_dead
from shared.settings import Settings
from shared.storage import open_storage
from shared.topology import (
    BROKER_DELIVERY_LIMIT,
    DEFAULT_CRASH_BUDGET,
    DEFAULT_RETRY_DELAYS_S,
    Topology,
    declare,
)
from worker.acks import AckCoalescer
from worker.ahead import MonthPasses
from worker.batcher import HandedBack, JobBatcher, NotAnnounced
from worker.delivery import Delivery, JobSubscription
from worker.host_share import HostWorkers, auto_slots
from worker.isolation import IsolationChildren
from worker.job import BatchResult, JobOutcome, MonthListings, execute_batch, execute_isolated
from worker.sharing import IDLE_AFTER_S, IdleNotices

TRACEBACK_LIMIT = 4000
HEARTBEAT_INTERVAL_S = 10.0
HOUSEKEEPING_S = 0.2
HOST_COUNT_S = 1.0  # how often an auto-sized worker counts the host's workers again
ISOLATE_AFTER_RETURNS = 2
# A redelivered job is renewed (a fresh copy carrying its returns, then an ack) at this
# count, half the broker's limit: innocent jobs prefetched by dying workers never reach it.
RENEW_AT_DELIVERIES = BROKER_DELIVERY_LIMIT // 2


@dataclass(frozen=True)
class AutoSizing:
    """`--concurrency auto`: what the process may use, shared with the host's other workers."""

    cpus: float
    memory_bytes: int
    host: HostWorkers
    # The prefetch per slot, following the slots; None when `--prefetch` fixed it.
    prefetch_per_slot: int | None


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker consumes: concurrency, prefetch, budgets and exit conditions."""

    concurrency: int = 2
    prefetch: int = 4
    max_jobs: int | None = None
    idle_exit_s: float | None = None
    shutdown_timeout_s: float = 120.0
    crash_budget: int = DEFAULT_CRASH_BUDGET
    max_attempts: int = 5
    retry_delays_s: tuple[int, ...] = DEFAULT_RETRY_DELAYS_S
    batch_rows: int = 65_536
    heartbeat_file: Path | None = None
    health_port: int | None = None
    # Set for `--concurrency auto`: `concurrency` is then the most slots, and the worker runs
    # its share of them (`worker.host_share`).
    auto: AutoSizing | None = None


@dataclass(slots=True)
class _InHand:
    """A job handed to the batcher: what settling it takes once its batch ran."""

    message: Delivery
    job: JobMessage
    started: float
    attempt: int


@dataclass
class _Stats:
    done: int = 0
    succeeded: int = 0
    retried: int = 0
    dead: int = 0
    in_flight: int = 0
    abandoned: int = 0
    last_activity: float = field(default_factory=time.monotonic)


def worker_identity() -> str:
    """``host:pid``: names this worker in dead letters, markers and metrics."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _delivery_count(message: Delivery) -> int:
    """How many times the broker delivered this message before (quorum queues count)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _returns(message: Delivery) -> int:
    """Deliveries of this job that ended with their worker gone, renewed copies included."""
    return _delivery_count(message) + _header_int(message, "x-tickq-returns")


def _header_int(message: Delivery, name: str) -> int:
    """A non-negative integer header, 0 when absent or malformed."""
    value = (message.headers or {}).get(name, 0)
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _job_or_none(message: Delivery) -> JobMessage | None:
    """The delivery's job, or None when it cannot be read (reading it may be what failed)."""
    try:
        return parse_job(message.body)
    except Exception:
        return None


def _attempts(message: Delivery) -> int:
    """Attempts this job already spent on transient failures."""
    return _header_int(message, "x-tickq-attempts")


async def _counted(settling: Awaitable[None]) -> bool:
    """`settling` (a dead letter, say), after which the delivery counts as handled."""
    await settling
    return True


class Worker:
    """Consumes jobs from ``N.jobs`` until stopped, idle or done with `max_jobs`."""

    def __init__(self, settings: Settings, options: WorkerOptions) -> None:
        self.settings = settings
        self.options = options
        self.topology = Topology(settings.namespace, options.retry_delays_s)
        self.identity = worker_identity()
        self.log = get_logger(worker=self.identity)
        self.stats = _Stats()
        self._listings = MonthListings(passes=MonthPasses())
        self._acks = AckCoalescer()
        self._isolation = IsolationChildren(options.concurrency)
        self._batcher: JobBatcher[_InHand] = JobBatcher(
            self._execute_batch,
            self._announce,
            self._settle_batch,
            options.concurrency,
            max(1, options.prefetch // (2 * options.concurrency)),
        )
        self._stopping = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._process = psutil.Process()
        self._process.cpu_percent()
        self._usage_at = 0.0
        self._usage_cache = (0.0, 0.0)
        self._drained = False
        # Fed only where a health port serves them: a job's figures cost a few microseconds of
        # its message's handling, and without a port no one reads them.
        self.metrics = (WorkerMetrics(in_flight=lambda: self.stats.in_flight)
                        if options.health_port is not None else None)
        self._liveness = LivenessProbe(max_age_s=6 * HEARTBEAT_INTERVAL_S)
        self._health: HealthServer | None = None
        self._channel: Any = None
        self._events: Any = None
        self._subscription: JobSubscription | None = None
        self._workers_on_host = 1
        self._notices = IdleNotices(self.topology, self.identity, self._share_with)
        self._idle_check: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Stop taking jobs; jobs in hand finish (or are requeued at the shutdown timeout)."""
        if not self._stopping.is_set():
            self.log.info("worker.stopping", reason=reason, in_flight=self.stats.in_flight)
            self._stopping.set()

    async def run(self) -> _Stats:
        """Consume until stopped; returns the worker's counts."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop, signal.Signals(sig).name)
        if self.options.health_port is not None and self.metrics is not None:
            self._health = HealthServer(self.metrics.registry, liveness=self._liveness)
            self._health.start(self.options.health_port)
        connection = await connect(self.settings, f"tickq-worker {self.identity}")
        subscription: JobSubscription | None = None
        try:
            self._channel = await connection.channel(publisher_confirms=True)
            await declare(self._channel, self.topology)
            self._events = await self._channel.get_exchange(self.topology.events)
            await self._notices.start(connection)
            self._resize_to_host(announce=False)
            subscription = JobSubscription(
                connection_parameters(self.settings.amqp_url, f"tickq-worker {self.identity} jobs"),
                self.topology.jobs,
                self._prefetch(),
                self._receive,
                lambda: declare(self._channel, self.topology),
            )
            self._subscription = subscription
            self._batcher.start()
            await subscription.start()
            self.log.info(  # consuming: the broker has the worker's consumer
                "worker.started",
                queue=self.topology.jobs,
                concurrency=self._batcher.slots,
                prefetch=self._prefetch(),
                broker=self.settings.safe_amqp_url,
                **({"workers_on_host": self._workers_on_host} if self.options.auto else {}),
            )
            housekeeping = asyncio.create_task(self._housekeeping())
            self._idle_soon()  # a worker added to a run the others hold in their prefetch
            await self._stopping.wait()
            await subscription.stop()
            self._batcher.stop()
            await self._drain()
            self._drained = True
            housekeeping.cancel()
        finally:
            if subscription is not None:
                await subscription.close()
            with contextlib.suppress(Exception):
                await connection.close()
            self._batcher.shutdown()
            self._isolation.close()
            if self._health is not None:
                self._health.stop()
        self.log.info(
            "worker.stopped",
            jobs_done=self.stats.done,
            succeeded=self.stats.succeeded,
            retried=self.stats.retried,
            dead_lettered=self.stats.dead,
            ack_frames=self._acks.frames,
        )
        return self.stats

    async def _drain(self) -> None:
        """Let the jobs in hand finish, up to the shutdown timeout."""
        deadline = time.monotonic() + self.options.shutdown_timeout_s
        # Deliveries that arrive while the consumer is being cancelled get handlers of their
        # own (they are handed back): wait again until nothing is left.
        while pending := self._in_progress():
            _, still = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if still and time.monotonic() >= deadline:
                # Closing the connection hands their messages back to the broker for redelivery.
                self.stats.abandoned = max(len(still), self.stats.in_flight)
                self.log.warning("worker.shutdown_timeout", jobs_requeued=self.stats.abandoned)
                return

    def _in_progress(self) -> set[asyncio.Task[Any]]:
        """Deliveries being handled and batches being run or settled."""
        return {t for t in self._handlers if not t.done()} | self._batcher.in_progress()

    async def _housekeeping(self) -> None:
        """Heartbeat file and line, the slots' share of the host, idle exit; beats on while
        jobs in hand drain."""
        last_beat = last_count = 0.0
        while not self._drained:
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_INTERVAL_S:
                last_beat = now
                self._beat()
            if now - last_count >= HOST_COUNT_S:
                last_count = now
                self._resize_to_host(announce=True)
            idle = self.options.idle_exit_s
            quiet = self.stats.in_flight == 0 and not self._waiting() and not self._stopping.is_set()
            pause = HOUSEKEEPING_S
            if idle is not None and quiet:
                idle_for = now - self.stats.last_activity
                if idle_for >= idle:
                    self.stop("idle")
                # Wake when the idle time is up, not up to a pause later.
                pause = min(pause, max(0.0, idle - idle_for) + 0.001)
            await asyncio.sleep(pause)

    def _prefetch(self) -> int:
        """The prefetch for the slots the worker runs now."""
        auto = self.options.auto
        if auto is None or auto.prefetch_per_slot is None:
            return self.options.prefetch
        return auto.prefetch_per_slot * self._batcher.slots

    def _resize_to_host(self, announce: bool) -> None:
        """An auto-sized worker runs its share of the cores among the host's workers, with the
        prefetch of that many slots (deliveries in hand beyond it are kept and run)."""
        auto = self.options.auto
        if auto is None or self._stopping.is_set():
            return
        self._workers_on_host = workers = auto.host.count()
        slots = min(self.options.concurrency, auto_slots(auto.cpus, auto.memory_bytes, workers))
        if slots == self._batcher.slots:
            return
        self._batcher.resize(slots)
        if self._subscription is not None:
            self._subscription.set_prefetch(self._prefetch())
        if announce:
            self.log.info("worker.resized", concurrency=slots, prefetch=self._prefetch(), workers_on_host=workers)

    def _waiting(self) -> bool:
        return bool(self._in_progress())

    def _beat(self) -> None:
        self._liveness.beat()
        if self.options.heartbeat_file is not None:
            path = self.options.heartbeat_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        self.log.info(
            "worker.heartbeat",
            jobs_done=self.stats.done,
            in_flight=self.stats.in_flight,
            rss_mb=round(self._process.memory_info().rss / 2**20, 1),
        )

    # -- one delivery ------------------------------------------------------------------

    def _receive(self, message: Delivery) -> None:
        """A delivery arrived: registered for its ack at once, then admitted (`_admit`). Only
        a delivery that needs more than joining a batch gets a task of its own, which the
        drain waits for: a task for every delivery cost about a quarter of the worker's CPU
        for the message of a job a pass had already stored."""
        self._acks.delivered(message)
        self.stats.last_activity = time.monotonic()
        if self._stopping.is_set():
            self._spawn(self._hand_back(message))
            return
        self.stats.in_flight += 1
        try:
            handling = self._admit(message)
        except Exception as exc:  # a fault of tickq's own: kept from the broker connection's reader
            self.log.error("worker.delivery_failed", message_id=message.message_id, error=one_line(exc),
                           exc_info=True)
            # Dead-lettered with the fault, to be replayed once it is mended: held unsettled, the
            # delivery would stay in hand until the connection closed, and then come back.
            handling = _counted(self._dead_letter(message, _job_or_none(message), ErrorClass.PERMANENT, exc,
                                                  time.perf_counter()))
        if handling is not None:
            self._spawn(self._settle_handling(handling))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _settle_handling(self, handling: Coroutine[Any, Any, bool]) -> None:
        try:
            handled = await handling
        except BaseException:
            self._finished(False)
            raise
        self._finished(handled)

    def _finished(self, counted: bool) -> None:
        """A delivery in hand is settled; `counted` unless it was handed back unstarted."""
        self.stats.in_flight -= 1
        self.stats.last_activity = time.monotonic()
        if self.stats.in_flight == 0 and not self._stopping.is_set():
            self._idle_soon()
        if not counted:
            return
        self.stats.done += 1
        if self.options.max_jobs is not None and self.stats.done >= self.options.max_jobs:
            self.stop("max-jobs")

    async def _hand_back(self, message: Delivery) -> None:
        """Return a job this worker never started as a fresh copy, then ack the original."""
        if await self._copy_back(message):
            await self._settle(self._acks.ack(message), "ack after hand-back")
        else:
            await self._settle(self._requeue(message), "requeue after failed hand-back")

    async def _copy_back(self, message: Delivery) -> bool:
        """Publish a fresh copy of a job this worker never started (confirmed: True).

        A plain requeue would raise the job's delivery count. The copy starts the broker's
        count afresh and carries the job's returns (deliveries that ended with their worker
        gone), so that a suspect stays one.
        """
        headers = self._carried_headers(message)
        if returns := _returns(message):
            headers["x-tickq-returns"] = returns
        return await self._publish(
            self._channel.default_exchange, message.body, self.topology.jobs, message.message_id or "", headers
        )

    # -- sharing with idle workers (`worker.sharing`) ----------------------------------------

    def _share_with(self, idle_worker: str) -> None:
        """Another worker has nothing to do: return half the jobs waiting for a slot here."""
        if self._stopping.is_set():
            return
        hands = self._batcher.take_unstarted((self._batcher.unstarted() + 1) // 2)
        if hands:
            self._spawn(self._share(hands, idle_worker))

    async def _share(self, hands: list[_InHand], idle_worker: str) -> None:
        """Hand `hands` back as fresh copies, every copy confirmed before any original is acked:
        this worker's prefetch stays full meanwhile, so the broker gives the copies to workers
        with room, the idle one first."""
        began = time.perf_counter()
        copied = await asyncio.gather(*(self._copy_back(hand.message) for hand in hands))
        returned = [hand.message for hand, ok in zip(hands, copied, strict=True) if ok]
        if returned:
            await self._settle(self._acks.ack_all(returned), "ack after sharing")
        for hand, ok in zip(hands, copied, strict=True):
            if not ok:
                await self._settle(self._requeue(hand.message), "requeue after failed hand-back")
            self._finished(False)
        self.log.info("worker.jobs_shared", jobs=len(returned), idle_worker=idle_worker,
                      seconds=round(time.perf_counter() - began, 3))

    def _idle_soon(self) -> None:
        """Tell the other workers if this one stays without jobs for a moment."""
        if self._idle_check is not None and not self._idle_check.done():
            return
        self._idle_check = asyncio.get_running_loop().create_task(self._announce_if_idle())

    async def _announce_if_idle(self) -> None:
        await asyncio.sleep(IDLE_AFTER_S)
        if self.stats.in_flight == 0 and not self._stopping.is_set():
            await self._notices.announce()

    def _admit(self, message: Delivery) -> Coroutine[Any, Any, bool] | None:
        """Where a delivery goes. None: its job joined a batch, which settles it
        (`_settle_batch`). Otherwise the handling it needs, to run in a task: a dead letter
        (poison, a spent crash budget), a hand-back (due for a fresh copy, or the batcher has
        stopped), or a run in isolation; its result is False when the job was handed back
        unstarted."""
        started = time.perf_counter()
        try:
            job = parse_job(message.body)
        except PoisonError as exc:
            return _counted(self._dead_letter(message, None, ErrorClass.POISON, exc, started))
        deliveries = _delivery_count(message)
        returns = _returns(message)
        crashes = _header_int(message, "x-tickq-crashes")
        if crashes >= self.options.crash_budget:
            # Counted by a worker with a larger budget: this worker's budget is spent.
            return _counted(self._dead_letter_crash_loop(message, job, crashes, started))
        if deliveries >= RENEW_AT_DELIVERIES:
            return self._handed_back(message)
        attempt = _attempts(message) + 1
        # A job that was in hand when two workers died may be what killed them: run it in a
        # child process, so that if it kills again only it is blamed. (One death is most
        # often someone else's job: those run as usual, with their month's batch.)
        suspect = returns >= ISOLATE_AFTER_RETURNS or crashes > 0
        self.log.debug("job.started", run_id=job.run_id, job_id=job.job_id, attempt=attempt, returns=returns,
                       isolated=suspect)
        hand = _InHand(message, job, started, attempt)
        if suspect:
            return self._run_isolated(hand, crashes)
        try:
            self._batcher.submit(job, hand)
        except HandedBack:
            return self._handed_back(message)
        return None

    async def _handed_back(self, message: Delivery) -> bool:
        await self._hand_back(message)
        return False

    async def _run_isolated(self, hand: _InHand, crashes: int) -> bool:
        """Run a suspect job in an isolation child and settle it."""
        message, job, started = hand.message, hand.job, hand.started
        try:
            outcome = await self._execute_isolated(message.body)
        except BrokenProcessPool:
            await self._requeue_after_crash(message, job, crashes + 1, started)
            return True
        except Exception as exc:
            return await self._failed(hand, exc)
        publish_start = time.perf_counter()
        if not await self._announce([(job, outcome)]):
            await self._settle(self._requeue(message), "requeue after failed event publish")
            return True
        outcome.time("publish", time.perf_counter() - publish_start)
        await self._succeeded([(hand, outcome)])
        return True

    async def _settle_batch(self, settled: list[tuple[_InHand, BatchResult]]) -> None:
        """The jobs of a batch, each with its announced outcome or what failed it: successes
        are acked together, failures go their own ways at the same time."""
        succeeded = [(hand, result) for hand, result in settled if isinstance(result, JobOutcome)]
        failed = [(hand, result) for hand, result in settled if not isinstance(result, JobOutcome)]
        acking = asyncio.gather(self._succeeded(succeeded), return_exceptions=True) if succeeded else None
        counted = await asyncio.gather(*(self._failed(hand, exc) for hand, exc in failed), return_exceptions=True)
        for (hand, _), outcome in zip(failed, counted, strict=True):
            self._finished(outcome is not False)
            if isinstance(outcome, BaseException):
                self.log.error("job.settle_failed", job_id=hand.job.job_id, error=one_line(outcome))
        if acking is None:
            return
        [error] = await acking
        for _ in succeeded:
            self._finished(True)
        if isinstance(error, BaseException):
            self.log.error("batch.settle_failed", jobs=len(succeeded), error=one_line(error))

    async def _succeeded(self, done: list[tuple[_InHand, JobOutcome]]) -> None:
        """Ack jobs whose success is stored and announced (in as few frames as may be), then
        log each."""
        ack_start = time.perf_counter()
        acked = await self._settle(self._acks.ack_all([hand.message for hand, _ in done]), "ack")
        ack_s = (time.perf_counter() - ack_start) / max(1, len(done))  # split evenly, as a batch's other stages
        for hand, outcome in done:
            outcome.time("ack", ack_s)
            if acked:
                self.stats.succeeded += 1
            self._log_job(hand.job, "succeeded", outcome, hand.started, hand.attempt)

    async def _failed(self, hand: _InHand, exc: BaseException) -> bool:
        """A job that did not succeed: handed back (False), or requeued, retried later or
        dead-lettered by the class of what failed it (True)."""
        message, job, started, attempt = hand.message, hand.job, hand.started, hand.attempt
        if isinstance(exc, HandedBack):
            await self._hand_back(message)
            return False
        if isinstance(exc, NotAnnounced):
            await self._settle(self._requeue(message), "requeue after failed event publish")
        elif is_transient(exc):
            if attempt >= self.options.max_attempts:
                await self._dead_letter(message, job, ErrorClass.TRANSIENT_EXHAUSTED, exc, started)
            else:
                await self._retry_later(message, job, attempt, exc, started)
        else:
            await self._dead_letter(message, job, ErrorClass.PERMANENT, exc, started)
        return True

    async def _announce(self, jobs: list[tuple[JobMessage, JobOutcome]]) -> bool:
        """One confirmed ``job.succeeded`` event per run for these jobs, before any is acked."""
        by_run: dict[tuple[str, str], list[tuple[JobMessage, dict[str, Any]]]] = {}
        for job, outcome in jobs:
            figures = {"rows_read": outcome.rows_read, "rows_accepted": outcome.rows_accepted,
                       "rows_rejected": outcome.rows_rejected}
            by_run.setdefault((job.run_id, job.output), []).append((job, figures))
        for reported in by_run.values():
            event = JobEvent.body_about(reported, "job.succeeded", self.identity)
            if not await self._publish(self._events, event, "job.succeeded", reported[0][0].job_id, {}):
                return False
        return True

    def _execute_batch(self, jobs: list[JobMessage]) -> list[BatchResult]:
        """Runs on a worker thread: one pass over the month serves the whole batch."""
        return execute_batch(
            jobs,
            s3_endpoint_url=self.settings.s3_endpoint_url,
            worker_id=self.identity,
            listings=self._listings,
            batch_rows=self.options.batch_rows,
        )

    async def _execute_isolated(self, body: bytes) -> JobOutcome:
        """Run a suspect job in an isolation child (`worker.isolation`)."""
        return await self._isolation.run(
            execute_isolated, body, self.settings.s3_endpoint_url, self.identity, self.options.batch_rows
        )

    async def _dead_letter_crash_loop(
        self, message: Delivery, job: JobMessage, crashes: int, started: float
    ) -> None:
        crash = PermanentError(f"job killed its process {crashes} times")
        await self._dead_letter(message, job, ErrorClass.CRASH_LOOP, crash, started)

    async def _requeue_after_crash(
        self, message: Delivery, job: JobMessage, crashes: int, started: float
    ) -> None:
        """The job killed its child process: count the crash on the job and queue it again."""
        # Only crashes in isolation count here: redeliveries after a worker died are shared by
        # every job that worker had prefetched, and would condemn innocent jobs with the guilty.
        if crashes >= self.options.crash_budget:
            await self._dead_letter_crash_loop(message, job, crashes, started)
            return
        headers = self._carried_headers(message)
        headers["x-tickq-crashes"] = crashes
        if not await self._publish(
            self._channel.default_exchange, message.body, self.topology.jobs, job.job_id, headers
        ):
            await self._settle(self._requeue(message), "requeue after failed crash requeue")
            return
        await self._settle(self._acks.ack(message), "ack after crash requeue")
        self.log.warning(
            "job.finished", run_id=job.run_id, job_id=job.job_id, outcome="crashed", crashes=crashes,
            duration_s=round(time.perf_counter() - started, 6),
        )

    def _log_job(self, job: JobMessage, outcome_name: str, outcome: JobOutcome, started: float, attempt: int) -> None:
        duration = time.perf_counter() - started
        ahead_read, ahead_accepted, ahead_rejected = outcome.rows_ahead
        if self.metrics is not None:
            self.metrics.job_finished(
                outcome_name, duration, outcome.stages, outcome.rows_read + ahead_read,
                outcome.rows_accepted + ahead_accepted, outcome.rows_rejected + ahead_rejected,
            )
        if not self.log.is_enabled_for(logging.INFO):  # the line would go nowhere: not built
            return
        rss_mb, cpu_percent = self._usage()
        self.log.info(
            "job.finished",
            run_id=job.run_id,
            job_id=job.job_id,
            outcome=outcome_name,
            attempt=attempt,
            duration_s=round(duration, 6),
            stages={stage: round(seconds, 6) for stage, seconds in outcome.stages.items()},
            rows_in=outcome.rows_read,
            rows_out=outcome.rows_accepted,
            rows_rejected=outcome.rows_rejected,
            rows_filtered=outcome.rows_filtered,
            bytes_in=outcome.bytes_in,
            bytes_out=outcome.bytes_out,
            already_done=outcome.already_done,
            rss_mb=rss_mb,
            cpu_percent=cpu_percent,
        )

    def _usage(self) -> tuple[float, float]:
        """Resident memory (MB) and CPU share of this process, sampled at most once a second."""
        now = time.monotonic()
        if now - self._usage_at >= 1.0:
            self._usage_at = now
            self._usage_cache = (round(self._process.memory_info().rss / 2**20, 1), self._process.cpu_percent())
        return self._usage_cache

    # -- publishing and settling -------------------------------------------------------

    async def _publish(
        self, exchange: Any, body: bytes, routing_key: str, message_id: str, headers: dict[str, Any]
    ) -> bool:
        """Publish persistently with the mandatory flag and wait for the broker's confirm."""
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            headers=headers,
        )
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
            return True
        except Exception as exc:  # connection lost, nack, unroutable: the caller requeues
            self.log.warning("publish.failed", routing_key=routing_key, error=one_line(exc))
            return False

    async def _requeue(self, message: Delivery) -> None:
        """Nack with requeue; only once the nack is out may a multiple ack span this delivery."""
        try:
            await message.nack(requeue=True)
        finally:
            self._acks.settled_otherwise(message)

    async def _settle(self, action: Awaitable[Any], what: str) -> bool:
        """Ack or nack; on a lost channel the broker redelivers the message anyway."""
        try:
            await action
            return True
        except Exception as exc:
            self.log.warning("settle.failed", action=what, error=one_line(exc))
            return False

    @staticmethod
    def _carried_headers(message: Delivery) -> dict[str, Any]:
        return {
            k: v
            for k, v in (message.headers or {}).items()
            if not k.startswith("x-death") and k not in ("x-delivery-count", "x-first-death-exchange",
                                                          "x-first-death-queue", "x-first-death-reason",
                                                          "x-last-death-exchange", "x-last-death-queue",
                                                          "x-last-death-reason")
        }

    async def _retry_later(
        self, message: Delivery, job: JobMessage, attempt: int, exc: BaseException, started: float
    ) -> None:
        delays = self.options.retry_delays_s
        delay = delays[min(attempt - 1, len(delays) - 1)]
        headers = self._carried_headers(message)
        headers.update({"x-tickq-attempts": attempt, "x-tickq-last-error": one_line(exc)})
        published = await self._publish(
            self._channel.default_exchange, message.body, self.topology.retry_queue(delay), job.job_id, headers
        )
        if not published:
            await self._settle(self._requeue(message), "requeue after failed retry publish")
            return
        await self._record(job, "retrying", {"attempt": attempt, "retry_in_s": delay, "error": one_line(exc)})
        if await self._settle(self._acks.ack(message), "ack after retry"):
            self.stats.retried += 1
        if self.metrics is not None:
            self.metrics.job_finished("retry_scheduled", time.perf_counter() - started)
        self.log.warning(
            "job.finished",
            run_id=job.run_id,
            job_id=job.job_id,
            outcome="retry_scheduled",
            attempt=attempt,
            retry_in_s=delay,
            error=one_line(exc),
            duration_s=round(time.perf_counter() - started, 6),
        )

    async def _dead_letter(
        self,
        message: Delivery,
        job: JobMessage | None,
        error_class: ErrorClass,
        exc: BaseException,
        started: float,
    ) -> None:
        headers = self._carried_headers(message)
        attempts = _attempts(message) + 1
        tb = "".join(traceback.format_exception(exc))
        headers.update(
            {
                "x-tickq-error-class": str(error_class),
                "x-tickq-error": one_line(exc),
                "x-tickq-traceback": redact(tb)[-TRACEBACK_LIMIT:],
                "x-tickq-attempts": attempts,
                "x-tickq-worker": self.identity,
                "x-tickq-failed-at": dt.datetime.now(dt.UTC).isoformat(),
            }
        )
        message_id = job.job_id if job else (message.message_id or "")
        # Straight to the dead-letter queue, not through the broker's dead-letter exchange: that
        # one also copies what it carries to the aggregator, which records the broker's own.
        published = await self._publish(
            self._channel.default_exchange, message.body, self.topology.dead, message_id, headers
        )
        if not published:
            await self._settle(self._requeue(message), "requeue after failed dead-letter publish")
            return
        if job is not None:
            await self._record_dead(job, error_class, exc, attempts)
        if await self._settle(self._acks.ack(message), "ack after dead-letter"):
            self.stats.dead += 1
        if self.metrics is not None:
            self.metrics.job_finished("dead_lettered", time.perf_counter() - started, error_class=str(error_class))
        self.log.error(
            "job.finished",
            run_id=job.run_id if job else None,
            job_id=message_id or None,
            outcome="dead_lettered",
            error_class=str(error_class),
            error=one_line(exc),
            attempt=attempts,
            duration_s=round(time.perf_counter() - started, 6),
        )

    async def _record(self, job: JobMessage, kind: str, record: dict[str, Any]) -> None:
        """Store a dead or retrying record for `job` (best effort: the queues hold the truth)."""
        key = JobKey(job.month, job.security, job.date)
        layout = RunLayout(job.run_id)
        record = {"job_id": job.job_id, "worker": self.identity, "at": dt.datetime.now(dt.UTC).isoformat(), **record}

        def write() -> None:
            storage = open_storage(job.output, self.settings.s3_endpoint_url)
            if kind == "dead":
                record_dead(storage, layout, key, record)
            else:
                storage.write_bytes(layout.retrying(key), json.dumps(record).encode(), "application/json")

        try:
            await asyncio.get_running_loop().run_in_executor(None, write)
        except Exception as exc:
            self.log.warning("job.record_failed", job_id=job.job_id, record=kind, error=one_line(exc))

    async def _record_dead(self, job: JobMessage, error_class: ErrorClass, exc: BaseException, attempts: int) -> None:
        """Tell storage and the aggregator that the job is dead."""
        await self._record(job, "dead", {"error_class": str(error_class), "error": one_line(exc), "attempts": attempts,
                                         "failed_at": dt.datetime.now(dt.UTC).isoformat()})
        event = JobEvent.body_about([(job, {"error_class": str(error_class)})], "job.dead", self.identity)
        await self._publish(self._events, event, "job.dead", job.job_id, {})


async def run_worker(settings: Settings, options: WorkerOptions) -> _Stats:
    """Run one worker until it stops."""
    return await Worker(settings, options).run()
