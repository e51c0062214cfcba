"""A run's progress as storage records it: expected, succeeded, dead and retrying jobs.

A run may have millions of jobs, and the aggregator service keeps the state of every run it
follows. So a run's jobs are held as numbers, not as key objects: each job is its position
in the run's jobs sorted in (security, date, month) order, the order the aggregator writes
them in, and each state is a mask over those positions: about 12 bytes a job in all.
"""

from __future__ import annotations

import itertools
import json
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from shared.errors import PermanentError
from shared.layout import JobKey, RunLayout, job_key_rows
from shared.storage import Storage

# Jobs handled at a time where a whole run's would make large temporaries (keys listed, codes).
_CHUNK = 8_192
# Keys looked up one by one rather than as arrays, at most.
_FEW = 8

Positions = npt.NDArray[np.int64]
_T = TypeVar("_T")
_Ranks = TypeVar("_Ranks", int, Positions)


def _packed(month: _Ranks, security: _Ranks, date: _Ranks, dates: int, months: int) -> _Ranks:
    """A job's code from the ranks of its month, security and date among the run's `months`
    and `dates` values (or the codes of arrays of them): codes sort as (security, date, month)."""
    return (security * dates + date) * months + month


def _unpacked(codes: Positions, dates: int, months: int) -> tuple[Positions, Positions, Positions]:
    """The (month, security, date) ranks of `codes` (`_packed`)."""
    rest, month = np.divmod(codes, months)
    security, date = np.divmod(rest, dates)
    return month, security, date


class RunNotFound(PermanentError):
    """No run of that id where it was looked for (its manifest is not there)."""


def read_manifest(storage: Storage, layout: RunLayout) -> dict[str, Any]:
    """The run's manifest; `RunNotFound` when the run does not exist there."""
    if not storage.exists(layout.manifest):
        raise RunNotFound(f"no run {layout.run_id} under {storage.describe()} (no manifest)")
    return dict(json.loads(storage.read_bytes(layout.manifest)))


class RunJobs(Set[JobKey]):
    """A run's expected jobs, each a position in (security, date, month) order.

    A job's code packs the ranks of its security, date and month among the run's sorted
    values, so sorting the codes sorts the jobs in that order, and a job's position is where
    its code is in them. Iterating gives the jobs in that order.
    """

    def __init__(self, months: Sequence[str], securities: Sequence[str], dates: Sequence[str],
                 codes: Positions) -> None:
        # Interned: the keys handed out repeat a few months, dates and securities many times.
        self.months = [sys.intern(m) for m in months]
        self.securities = [sys.intern(s) for s in securities]
        self.dates = [sys.intern(d) for d in dates]
        self._rank = ({m: i for i, m in enumerate(self.months)}, {s: i for i, s in enumerate(self.securities)},
                      {d: i for i, d in enumerate(self.dates)})
        self._codes = codes

    @classmethod
    def of(cls, keys: Iterable[tuple[str, str, str]]) -> RunJobs:
        """The jobs of `keys`, each (month, security, date); duplicates once."""
        first_seen: tuple[dict[str, int], dict[str, int], dict[str, int]] = ({}, {}, {})
        months_seen, securities_seen, dates_seen = first_seen
        ids = array("i")  # each job's month, security and date, numbered as first seen
        append = ids.append
        for month, security, date in keys:
            append(months_seen.setdefault(month, len(months_seen)))
            append(securities_seen.setdefault(security, len(securities_seen)))
            append(dates_seen.setdefault(date, len(dates_seen)))
        months, securities, dates = (sorted(seen) for seen in first_seen)
        # Each value's rank among the sorted values, by its number (dicts keep the order seen).
        ranks = [np.array([rank[value] for value in seen], dtype=np.int64)
                 for seen, rank in zip(first_seen, ({v: i for i, v in enumerate(values)}
                                                    for values in (months, securities, dates)), strict=True)]
        numbered = np.frombuffer(ids, dtype=np.int32).reshape(-1, 3)
        codes = np.empty(len(numbered), dtype=np.int64)
        for start in range(0, len(codes), _CHUNK):
            month_rank, security_rank, date_rank = (rank[numbered[start : start + _CHUNK, i]]
                                                    for i, rank in enumerate(ranks))
            codes[start : start + _CHUNK] = _packed(month_rank, security_rank, date_rank, len(dates), len(months))
        codes.sort()
        return cls(months, securities, dates, codes[np.diff(codes, prepend=-1) != 0])  # each job once

    def position(self, key: tuple[str, str, str]) -> int:
        """The position of `key` (month, security, date), or -1 when it is not one of the run's jobs."""
        months, securities, dates = self._rank
        month, security, date = months.get(key[0]), securities.get(key[1]), dates.get(key[2])
        if month is None or security is None or date is None:
            return -1
        code = _packed(month, security, date, len(self.dates), len(self.months))
        at = int(np.searchsorted(self._codes, code))
        return at if at < len(self._codes) and self._codes[at] == code else -1

    def positions(self, keys: Iterable[tuple[str, str, str]]) -> Positions:
        """The positions of `keys` (month, security, date each), -1 for those not the run's."""
        keys = list(keys)
        if len(keys) <= _FEW:  # a retried job's own result object, say: arrays cost more than they save
            return np.array([self.position(key) for key in keys], dtype=np.int64)
        months, securities, dates = self._rank
        month, security, date = array("q"), array("q"), array("q")
        for key_month, key_security, key_date in keys:
            month.append(months.get(key_month, -1))
            security.append(securities.get(key_security, -1))
            date.append(dates.get(key_date, -1))
        ranks = [np.frombuffer(ids, dtype=np.int64) for ids in (month, security, date)]
        known = (ranks[0] >= 0) & (ranks[1] >= 0) & (ranks[2] >= 0)
        codes = _packed(ranks[0], ranks[1], ranks[2], len(self.dates), len(self.months))
        if not len(self._codes):
            return np.full(len(codes), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        return np.where(known & (self._codes[at] == codes), at, -1)

    def key(self, position: int) -> JobKey:
        """The job at `position`."""
        return next(self.keys(np.array([position])))

    def keys(self, positions: Positions) -> Iterator[JobKey]:
        """The jobs at `positions`, in their order."""
        months, securities, dates = self.months, self.securities, self.dates
        for start in range(0, len(positions), _CHUNK):  # a chunk of plain ints at a time
            month, security, date = _unpacked(self._codes[positions[start : start + _CHUNK]], len(dates), len(months))
            for m, s, d in zip(month.tolist(), security.tolist(), date.tolist(), strict=True):
                yield JobKey(months[m], securities[s], dates[d])

    def __len__(self) -> int:
        return len(self._codes)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, JobKey) and self.position(key) >= 0

    def __iter__(self) -> Iterator[JobKey]:
        for start in range(0, len(self), _CHUNK):
            yield from self.keys(np.arange(start, min(start + _CHUNK, len(self)), dtype=np.int64))

    @classmethod
    def _from_iterable(cls, items: Iterable[_T]) -> set[_T]:
        return set(items)  # set operations (-, &, |) give plain sets


class JobSet(Set[JobKey]):
    """Some of a run's jobs (a mask over its positions); iterates in the run's order."""

    def __init__(self, jobs: RunJobs, mask: npt.NDArray[np.bool_]) -> None:
        self.jobs = jobs
        self.mask = mask
        self._count = int(np.count_nonzero(mask))

    def position_chunks(self) -> Iterator[Positions]:
        """The positions of these jobs, in order, a chunk at a time."""
        for start in range(0, len(self.mask), _CHUNK):
            yield np.flatnonzero(self.mask[start : start + _CHUNK]) + start

    def add(self, key: JobKey) -> None:
        """Add one of the run's jobs; `KeyError` for a job that is not the run's."""
        position = self.jobs.position(key)
        if position < 0:
            raise KeyError(key)
        self.add_at(np.array([position]))

    def discard(self, key: JobKey) -> None:
        """Remove `key` if it is here."""
        position = self.jobs.position(key)
        if position >= 0:
            self.remove_at(np.array([position]))

    def add_at(self, positions: Positions) -> None:
        """Add the jobs at `positions` of the run's jobs."""
        added = np.unique(positions[~self.mask[positions]])
        self.mask[added] = True
        self._count += len(added)

    def remove_at(self, positions: Positions) -> None:
        """Remove the jobs at `positions` of the run's jobs, where they are here."""
        removed = np.unique(positions[self.mask[positions]])
        self.mask[removed] = False
        self._count -= len(removed)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, JobKey):
            return False
        position = self.jobs.position(key)
        return position >= 0 and bool(self.mask[position])

    def __iter__(self) -> Iterator[JobKey]:
        for positions in self.position_chunks():
            yield from self.jobs.keys(positions)

    @classmethod
    def _from_iterable(cls, items: Iterable[_T]) -> set[_T]:
        return set(items)


@dataclass
class RunState:
    """Which of a run's expected jobs succeeded, are dead, or are still missing.

    `succeeded`, `dead` and `retrying` hold expected jobs only, none in two of them: a job with
    a success marker counts as succeeded whatever other records it has, then dead."""

    expected: RunJobs
    succeeded: JobSet
    dead: JobSet
    retrying: JobSet

    @classmethod
    def of(cls, expected: Iterable[JobKey], succeeded: Iterable[JobKey] = (), dead: Iterable[JobKey] = (),
           retrying: Iterable[JobKey] = ()) -> RunState:
        """The state of a run of `expected` jobs from lists of keys; keys of other jobs are not
        the run's and are left out."""
        jobs = RunJobs.of(expected)
        return _state(jobs, *(_found(jobs, jobs.positions(keys)) for keys in (succeeded, dead, retrying)))

    @property
    def missing(self) -> JobSet:
        """Jobs neither succeeded nor dead."""
        return JobSet(self.expected, ~(self.succeeded.mask | self.dead.mask))

    @property
    def accounted(self) -> bool:
        """Every expected job has succeeded or is dead."""
        # The aggregator asks on every event of a run: while fewer jobs are settled than
        # expected some must be missing, which the counts tell without looking at any job.
        if len(self.succeeded) + len(self.dead) < len(self.expected):
            return False
        return not self.missing

    @property
    def complete(self) -> bool:
        """Every expected job succeeded."""
        return len(self.succeeded) == len(self.expected)


def _found(jobs: RunJobs, positions: Positions) -> npt.NDArray[np.bool_]:
    mask = np.zeros(len(jobs), dtype=bool)
    mask[positions[positions >= 0]] = True
    return mask


def _state(jobs: RunJobs, succeeded: npt.NDArray[np.bool_], dead: npt.NDArray[np.bool_],
           retrying: npt.NDArray[np.bool_]) -> RunState:
    dead &= ~succeeded
    retrying &= ~(succeeded | dead)
    return RunState(jobs, JobSet(jobs, succeeded), JobSet(jobs, dead), JobSet(jobs, retrying))


def record_dead(storage: Storage, layout: RunLayout, key: JobKey, record: dict[str, Any]) -> None:
    """Write the job's dead record (JSON `record`); its retry record, if any, no longer holds."""
    storage.write_bytes(layout.dead(key), json.dumps(record).encode(), "application/json")
    storage.delete(layout.retrying(key))


def read_run_jobs(storage: Storage, layout: RunLayout) -> RunJobs:
    """The run's expected jobs, from its key file."""
    return RunJobs.of(job_key_rows(storage, layout.job_keys))


def load_state(storage: Storage, layout: RunLayout, expected: RunJobs | None = None) -> RunState:
    """The run's job states from its key file, success markers and dead and retry records.

    A caller that read the key file before may pass its `expected` jobs: the producer writes
    that file once, before the run's first job, and never changes it.
    """
    jobs = read_run_jobs(storage, layout) if expected is None else expected
    masks = [_found(jobs, _listed_positions(storage, layout, prefix, jobs))
             for prefix in (layout.succeeded_prefix, layout.dead_prefix, layout.retrying_prefix)]
    return _state(jobs, *masks)


def _listed_positions(storage: Storage, layout: RunLayout, prefix: str, jobs: RunJobs) -> Positions:
    """The positions of the jobs with a record under `prefix` (-1 for records of no job of
    the run): in one listing, or, on a store that takes requests in parallel, in one listing
    per month of the run, all in flight together. An S3 listing pages 1,000 keys a round
    trip, so one listing of a run of a million jobs makes a thousand round trips end to end;
    by month, a run of years makes one per 1,000 jobs of its largest month. Records of other
    months are not looked for."""
    if len(jobs.months) <= 1 or storage.parallel_requests <= 1:
        return _positions_of_records(jobs, layout, prefix, storage.keys(prefix))

    def listed(month: str) -> Positions:
        return _positions_of_records(jobs, layout, prefix, storage.keys(f"{prefix}{month}/"))

    with ThreadPoolExecutor(max_workers=min(storage.parallel_requests, len(jobs.months))) as pool:
        return np.concatenate(list(pool.map(listed, jobs.months)))


def _positions_of_records(jobs: RunJobs, layout: RunLayout, prefix: str, object_keys: Iterable[str]) -> Positions:
    records = layout.jobs_of_records(object_keys, prefix)
    chunks = [np.empty(0, dtype=np.int64)]
    while chunk := list(itertools.islice(records, _CHUNK)):
        chunks.append(jobs.positions(chunk))
    return np.concatenate(chunks)
