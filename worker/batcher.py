"""Serving several jobs of one month in one pass over its input, and announcing them together.

Each job keeps its own message, ack and outcome; what is shared is the work. Jobs handed to
`JobBatcher.submit` wait a moment in a queue per `BatchKey` (same run, input, month and
parameters); whenever an execution slot is free, the largest waiting batch (up to
`max_batch` jobs) runs on a worker thread. The batch's successes are announced to the
aggregator in one confirmed event; then the whole batch goes to the caller's settler at once,
each job's ticket with its own outcome or exception, so that the jobs of a batch are settled
together (one coroutine per batch, not one waiting per job). A transient failure of some jobs
retries just those, in-process, with short jittered pauses, before the settler moves them to
the retry queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from shared.errors import is_transient
from shared.messages import JobMessage
from shared.metrics import get_logger
from worker.job import BatchKey, BatchResult, JobOutcome

IN_PROCESS_TRIES = 3
LINGER_S = 0.002


class HandedBack(Exception):
    """The worker is stopping and never started this job: return it to the queue."""


class NotAnnounced(Exception):
    """The job succeeded but its success event was not confirmed: it must run again."""


Executor = Callable[[list[JobMessage]], list[BatchResult]]
# Publishes one confirmed success event for jobs of a batch; False when not confirmed.
Announcer = Callable[[list[tuple[JobMessage, JobOutcome]]], Awaitable[bool]]
# What the caller hands in with each job, and gets back with its outcome.
Ticket = TypeVar("Ticket")
# Settles the jobs of a batch: each ticket with its announced outcome, or the exception that
# failed it (`NotAnnounced`, `HandedBack` or the job's own). Must not raise.
Settler = Callable[[list[tuple[Ticket, BatchResult]]], Coroutine[Any, Any, None]]


class _Slots:
    """Execution slots, taken by the one dispatcher and given back by batches; their number
    may change while batches run (a batch past a lowered number finishes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy = 0
        self._freed = asyncio.Event()

    async def acquire(self) -> None:
        while self._busy >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        self._busy += 1

    def release(self) -> None:
        self._busy -= 1
        self._freed.set()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._freed.set()


class JobBatcher(Generic[Ticket]):
    """Groups jobs by `BatchKey` and runs batches on `concurrency` threads (`resize` runs them
    on fewer, down to one)."""

    def __init__(self, execute: Executor, announce: Announcer, settle: Settler[Ticket], concurrency: int,
                 max_batch: int) -> None:
        self._execute = execute
        self._announce = announce
        self._settle = settle
        self._max_batch = max(1, max_batch)
        self._threads = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="tickq-job")
        self._slots = _Slots(concurrency)
        self._waiting: dict[BatchKey, list[tuple[JobMessage, Ticket, float]]] = {}
        self._wake = asyncio.Event()
        self._stopped = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._log = get_logger()

    def start(self) -> None:
        """Start dispatching batches."""
        self._dispatcher = asyncio.create_task(self._dispatch())

    def submit(self, job: JobMessage, ticket: Ticket) -> None:
        """Queue `job` for a batch; its `ticket` reaches the settler with its outcome.

        Raises `HandedBack` once the batcher is stopped: the job was never started.
        """
        if self._stopped:
            raise HandedBack()
        self._waiting.setdefault(BatchKey.of(job), []).append((job, ticket, time.monotonic()))
        self._wake.set()

    def stop(self) -> None:
        """Start no more batches; jobs still waiting are settled as handed back."""
        self._stopped = True
        waiting: list[tuple[Ticket, BatchResult]] = [
            (ticket, HandedBack()) for entries in self._waiting.values() for _, ticket, _ in entries
        ]
        self._waiting.clear()
        if waiting:
            self._track(asyncio.create_task(self._settle(waiting)))
        if self._dispatcher is not None:
            self._dispatcher.cancel()

    def unstarted(self) -> int:
        """Jobs waiting for a slot."""
        return sum(map(len, self._waiting.values()))

    def take_unstarted(self, count: int) -> list[Ticket]:
        """Take up to `count` jobs that wait for a slot out of the batcher (the last to arrive
        of its largest batches), for the caller to return to the queue: they never start here."""
        taken: list[Ticket] = []
        for key in sorted(self._waiting, key=lambda k: len(self._waiting[k]), reverse=True):
            if len(taken) >= count:
                break
            waiting = self._waiting[key]
            keep = max(0, len(waiting) - (count - len(taken)))
            taken += [ticket for _, ticket, _ in waiting[keep:]]
            if keep:
                del waiting[keep:]
            else:
                del self._waiting[key]
        return taken

    @property
    def slots(self) -> int:
        """Batches that may run at once."""
        return self._slots.limit

    def resize(self, slots: int) -> None:
        """Run up to `slots` batches at once (between one and the threads the batcher has)."""
        self._slots.resize(max(1, min(slots, self._threads)))

    def in_progress(self) -> set[asyncio.Task[None]]:
        """Batches still running or being settled: a draining worker waits for them."""
        return {task for task in self._running if not task.done()}

    def _track(self, task: asyncio.Task[None]) -> None:
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def shutdown(self) -> None:
        """Release the threads (jobs still running finish in the background)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _dispatch(self) -> None:
        while not self._stopped:
            await self._wake.wait()
            self._wake.clear()
            # A prefetch burst arrives message by message: let it gather into batches.
            await asyncio.sleep(LINGER_S)
            while self._waiting and not self._stopped:
                await self._slots.acquire()
                if not self._waiting or self._stopped:
                    self._slots.release()
                    break
                key = max(self._waiting, key=lambda k: len(self._waiting[k]))
                waiting = self._waiting[key]
                batch, rest = waiting[: self._max_batch], waiting[self._max_batch :]
                if rest:
                    self._waiting[key] = rest
                else:
                    del self._waiting[key]
                self._log.debug("batch.started", jobs=len(batch), waiting=self.unstarted())
                self._track(asyncio.create_task(self._run_batch(batch)))

    async def _run_batch(self, batch: list[tuple[JobMessage, Ticket, float]]) -> None:
        settled: list[tuple[Ticket, BatchResult]] = []
        try:
            jobs = [job for job, _, _ in batch]
            started = time.monotonic()
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._pool, self._with_retries, jobs)
            finally:
                # The slot is the thread: the next batch runs while this one is announced and settled.
                self._slots.release()
            succeeded = [(job, r) for job, r in zip(jobs, results, strict=True) if isinstance(r, JobOutcome)]
            announced_at = time.monotonic()
            announced = bool(succeeded) and await self._announce(succeeded)
            publish_s = (time.monotonic() - announced_at) / max(1, len(succeeded))
            for (_, ticket, queued_at), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    settled.append((ticket, result))
                elif not announced:
                    settled.append((ticket, NotAnnounced()))
                else:
                    result.time("wait", started - queued_at)  # queued behind other batches
                    result.time("publish", publish_s)
                    settled.append((ticket, result))
        except BaseException as exc:  # the executor itself failed: every job learns why
            failure = exc if isinstance(exc, Exception) else RuntimeError(str(exc))
            settled = [(ticket, failure) for _, ticket, _ in batch]
            if not isinstance(exc, Exception):
                await self._settle(settled)
                raise
        await self._settle(settled)

    def _with_retries(self, jobs: list[JobMessage]) -> list[BatchResult]:
        """Runs on a worker thread: jobs that fail transiently are tried again, a few times."""
        results: list[BatchResult] = self._execute(jobs)
        for attempt in range(1, IN_PROCESS_TRIES):
            again = [i for i, r in enumerate(results) if isinstance(r, BaseException) and is_transient(r)]
            if not again:
                break
            time.sleep(random.uniform(0, min(2.0, 0.2 * 2**attempt)))
            with contextlib.suppress(Exception):
                for i, result in zip(again, self._execute([jobs[i] for i in again]), strict=True):
                    results[i] = result
        return results
