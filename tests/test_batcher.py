"""The batcher's execution slots: how many batches run at once, and what holds a slot."""

from __future__ import annotations

import asyncio
import threading
import time

from shared.messages import JobMessage, JobParams
from worker.batcher import JobBatcher
from worker.job import BatchKey, BatchResult, JobOutcome

RUN = "20240101-000000-abcdef"


def _job(security: str) -> JobMessage:
    return JobMessage.build(run_id=RUN, month="2024-03", security=security, date="2024-03-04", input="/in",
                            output="/out", processor="analytics", params=JobParams())


class _Recorder:
    """An executor that notes how many batches run at once, and when each started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.started: list[float] = []

    def execute(self, jobs: list[JobMessage]) -> list[BatchResult]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.started.append(time.monotonic())
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [JobOutcome() for _ in jobs]


def test_the_next_batch_runs_while_the_last_one_is_announced_and_never_two_on_one_slot() -> None:
    async def scenario() -> tuple[_Recorder, list[float], list[float]]:
        recorder = _Recorder()
        release = asyncio.Event()
        announced_at: list[float] = []
        settled_at: list[float] = []

        async def announce(jobs: list[tuple[JobMessage, JobOutcome]]) -> bool:
            announced_at.append(time.monotonic())
            await release.wait()  # a broker slow to confirm the success event
            return True

        async def settle(settled: list[tuple[str, BatchResult]]) -> None:
            settled_at.append(time.monotonic())

        batcher: JobBatcher[str] = JobBatcher(recorder.execute, announce, settle, concurrency=1, max_batch=2)
        batcher.start()
        for i in range(6):  # three batches of two jobs (one month, one run: one key)
            batcher.submit(_job(f"S{i:03d}"), f"ticket-{i}")
        deadline = time.monotonic() + 5
        while len(recorder.started) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        release.set()
        while len(settled_at) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        batcher.stop()
        batcher.shutdown()
        return recorder, announced_at, settled_at

    recorder, announced_at, settled_at = asyncio.run(scenario())
    # All three batches ran although none was confirmed yet: announcing holds no slot.
    assert len(recorder.started) == 3
    assert max(recorder.started) < min(settled_at)
    assert len(announced_at) == 3
    # One slot: the batches ran one after another, never side by side.
    assert recorder.most_at_once == 1
    assert len(settled_at) == 3


def test_jobs_share_a_batch_key_exactly_when_run_month_and_parameters_agree() -> None:
    def job(security: str = "AAA", date: str = "2024-03-04", month: str = "2024-03",
            params: JobParams | None = None) -> JobMessage:
        return JobMessage.build(run_id=RUN, month=month, security=security, date=date, input="/in",
                                output="/out", processor="analytics", params=params or sydney)

    sydney = JobParams(market_tz="Australia/Sydney")
    first = job()
    # Another security and date, and parameters equal in value but parsed apart.
    same = job(security="BBB", date="2024-03-05", params=JobParams(market_tz="Australia/Sydney"))
    other_params = job(params=JobParams(market_tz="Australia/Sydney", min_size=10))
    other_month = job(month="2024-04", date="2024-04-01")
    assert BatchKey.of(first) == BatchKey.of(same)
    assert BatchKey.of(first) != BatchKey.of(other_params)
    assert BatchKey.of(first) != BatchKey.of(other_month)
    assert hash(BatchKey.of(first)) == hash(BatchKey.of(same))


def test_resized_slots_bound_the_batches_run_at_once_from_the_next_batch_on() -> None:
    """A worker whose share of its host changes runs fewer batches at once, or more again, up
    to the threads it has."""

    async def run_batches(batcher: JobBatcher[str], recorder: _Recorder, first: int) -> None:
        recorder.most_at_once = 0
        for i in range(first, first + 8):  # four batches of two jobs: one key
            batcher.submit(_job(f"S{i:03d}"), f"ticket-{i}")
        deadline = time.monotonic() + 5
        while (len(recorder.started) < (first + 8) // 2 or recorder.running) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)

    async def scenario() -> list[int]:
        recorder = _Recorder()

        async def announce(jobs: list[tuple[JobMessage, JobOutcome]]) -> bool:
            return True

        async def settle(settled: list[tuple[str, BatchResult]]) -> None:
            return None

        batcher: JobBatcher[str] = JobBatcher(recorder.execute, announce, settle, concurrency=2, max_batch=2)
        batcher.start()
        most: list[int] = []
        await run_batches(batcher, recorder, 0)
        most.append(recorder.most_at_once)
        batcher.resize(1)
        assert batcher.slots == 1
        await run_batches(batcher, recorder, 8)
        most.append(recorder.most_at_once)
        batcher.resize(5)  # no more than the threads it was made with
        assert batcher.slots == 2
        await run_batches(batcher, recorder, 16)
        most.append(recorder.most_at_once)
        batcher.stop()
        batcher.shutdown()
        return most

    assert asyncio.run(scenario()) == [2, 1, 2]


def test_jobs_taken_out_while_they_wait_for_a_slot_never_run_and_the_rest_do() -> None:
    async def scenario() -> tuple[list[list[str]], list[str], list[str], int]:
        ran: list[list[str]] = []
        started = threading.Event()
        release = threading.Event()
        settled: list[str] = []

        def execute(jobs: list[JobMessage]) -> list[BatchResult]:
            ran.append([job.security for job in jobs])
            started.set()
            release.wait(5)  # the one slot stays busy until the jobs are taken
            return [JobOutcome() for _ in jobs]

        async def announce(jobs: list[tuple[JobMessage, JobOutcome]]) -> bool:
            return True

        async def settle(batch: list[tuple[str, BatchResult]]) -> None:
            settled.extend(ticket for ticket, _ in batch)

        batcher: JobBatcher[str] = JobBatcher(execute, announce, settle, concurrency=1, max_batch=2)
        batcher.start()
        for i in range(2):
            batcher.submit(_job(f"S{i:03d}"), f"running-{i}")
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
        for i in range(2, 7):
            batcher.submit(_job(f"S{i:03d}"), f"waiting-{i}")
        taken = batcher.take_unstarted(3)
        left = batcher.unstarted()
        release.set()
        deadline = time.monotonic() + 5
        while len(settled) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # nothing else runs
        batcher.stop()
        batcher.shutdown()
        return ran, taken, settled, left

    ran, taken, settled, left = asyncio.run(scenario())
    # The last to arrive are taken; the running batch and the first waiting go on here.
    assert taken == ["waiting-4", "waiting-5", "waiting-6"]
    assert left == 2
    assert ran == [["S000", "S001"], ["S002", "S003"]]
    assert sorted(settled) == ["running-0", "running-1", "waiting-2", "waiting-3"]
