"""Results computed ahead: one pass over a month without an index serves all of its jobs.

On a month laid out by `tickq ingest`, a batch of jobs reads only the row groups of its
securities. On a month that is not (raw CSV, DBN, Parquet in any order), every batch reads
the whole month, so a run of N batches read it N times. There, the pass a batch makes anyway
computes every job of the month the run expects (the month's key file, written by the
producer), the batch stores its own jobs' results, and the others' wait here until their
messages come to this worker. A worker then reads such a month about once, whatever its
number of jobs.

Each kept result is served once, to the message of its job, and stored exactly as a result
computed then would be: a job's result depends only on its key, the run's parameters and the
month's files, and all three are part of the key a result is kept under.

Memory stays bounded. A widened pass holds the partial results of up to `MAX_JOBS_AHEAD` jobs
(a few KB each while the pass runs, for analytics), and only one such pass runs in a
process at a time; the others make ordinary passes. Kept results are bounded by
`budget_bytes` (about 1 KB a job for analytics): the oldest month goes first, and a month that
alone exceeds it is not kept.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import pyarrow as pa

Outcome = TypeVar("Outcome")
DEFAULT_BUDGET_BYTES = 32 << 20
# The most jobs one pass computes: a month of 500 securities has about 10,500.
MAX_JOBS_AHEAD = 12_000


@dataclass
class _Month(Generic[Outcome]):
    columns: pa.Table  # the processor's result columns, one row per job computed ahead
    rows: dict[tuple[str, str], int]  # (security, date) → row of `columns`, until served
    outcomes: list[Outcome]  # each row's counts and timings
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = self.columns.nbytes


class ResultsAhead(Generic[Outcome]):
    """Job results computed ahead of their messages, per (batch key, month's files)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._months: OrderedDict[Hashable, _Month[Outcome]] = OrderedDict()
        self._passes: dict[Hashable, threading.Lock] = {}
        self._widened = threading.Lock()
        self._without_keys: set[Hashable] = set()  # months whose run has no key file for them
        self.served = 0  # jobs served from here

    def pass_lock(self, month: Hashable) -> threading.Lock:
        """Held while a batch of `month` looks here and, failing that, makes its pass: two
        slots of one worker never read the same month whole at the same time."""
        with self._lock:
            return self._passes.setdefault(month, threading.Lock())

    @contextlib.contextmanager
    def widening(self, wanted: bool = True) -> Iterator[bool]:
        """Whether a pass that `wanted` to compute jobs ahead may: True for one such pass of the
        process at a time (ordinary passes never take the turn)."""
        widened = wanted and self._widened.acquire(blocking=False)
        try:
            yield widened
        finally:
            if widened:
                self._widened.release()

    def lacks_keys(self, month: Hashable) -> bool:
        """Whether `month` was found to have no key file (an ingested month: never widened)."""
        with self._lock:
            return month in self._without_keys

    def note_lacks_keys(self, month: Hashable) -> None:
        """`month` has no key file: later batches need not look for it."""
        with self._lock:
            self._without_keys.add(month)

    def holds(self, month: Hashable) -> bool:
        """Whether results of `month` are kept (a pass then computes only what it must)."""
        with self._lock:
            return month in self._months

    def take(self, month: Hashable, keys: list[tuple[str, str]]) -> tuple[list[int], pa.Table | None, list[Outcome]]:
        """The kept results of `keys` of `month`: their positions in `keys`, their columns and
        outcomes (in that order). What is taken is no longer kept."""
        with self._lock:
            kept = self._months.get(month)
            if kept is None:
                return [], None, []
            found = [(i, row) for i, key in enumerate(keys) if (row := kept.rows.pop(key, None)) is not None]
            if not kept.rows:
                del self._months[month]
            self.served += len(found)
        if not found:
            return [], None, []
        rows = pa.array([row for _, row in found], pa.int64())
        return [i for i, _ in found], kept.columns.take(rows), [kept.outcomes[row] for _, row in found]

    def keep(self, month: Hashable, keys: list[tuple[str, str]], columns: pa.Table, outcomes: list[Outcome]) -> bool:
        """Keep the results of `keys` (rows of `columns`, in order); False when they alone
        exceed the budget and are not kept."""
        if not keys:
            return True
        kept = _Month(columns, {key: row for row, key in enumerate(keys)}, outcomes)
        if kept.nbytes > self.budget_bytes:
            return False
        with self._lock:
            self._months.pop(month, None)
            self._months[month] = kept
            while sum(m.nbytes for m in self._months.values()) > self.budget_bytes:
                self._months.popitem(last=False)
        return True

    def held_bytes(self) -> int:
        """Bytes of the result columns kept."""
        with self._lock:
            return sum(m.nbytes for m in self._months.values())
