"""What a job reports when its batch ran: counts, bytes and the time each stage took."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class JobOutcome:
    """What a finished job reports: counts, bytes and per-stage durations."""

    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    rows_filtered: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    files: int = 0
    already_done: bool = False
    # Rows (read, accepted, rejected) of the jobs this job's pass stored ahead of their
    # messages (`worker.ahead`): the worker counts them once, here, not when those come.
    rows_ahead: tuple[int, int, int] = (0, 0, 0)
    stages: dict[str, float] = field(default_factory=dict)

    def time(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage`."""
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    @classmethod
    def total(cls, outcomes: list[JobOutcome]) -> JobOutcome:
        """The rows, bytes and stage seconds of `outcomes` summed."""
        summed = cls()
        for outcome in outcomes:
            summed.rows_read += outcome.rows_read
            summed.rows_accepted += outcome.rows_accepted
            summed.rows_rejected += outcome.rows_rejected
            summed.rows_filtered += outcome.rows_filtered
            summed.bytes_in += outcome.bytes_in
            summed.bytes_out += outcome.bytes_out
            for stage, seconds in outcome.stages.items():
                summed.time(stage, seconds)
        return summed


class StageTimer:
    """A `with` block whose time is added to one stage of a job's outcome."""

    def __init__(self, outcome: JobOutcome, stage: str) -> None:
        self._outcome, self._stage = outcome, stage

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._outcome.time(self._stage, time.perf_counter() - self._start)


# What a batch gives back for each of its jobs: its outcome, or the exception that failed it.
BatchResult = JobOutcome | BaseException
