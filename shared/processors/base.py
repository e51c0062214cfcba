"""The processor interface: what a run computes per job and how job results combine.

A processor has two halves. The worker half (`start_job` → `JobAccumulator`) sees a job's
accepted rows in bounded batches and returns a small, JSON-ready partial result. The
aggregator half (`aggregate`) reads every job's partial result, in job-key order, and writes
the run's tables. Partial results must be mergeable (sums, counts, min/max, first/last) so
that the tables do not depend on how the run was split or in which order jobs finished.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import pyarrow as pa

from shared.messages import JobMessage, JobParams
from shared.storage import Storage
from shared.tables import TableSink


@dataclass(frozen=True)
class JobContext:
    """What a processor may use while computing one job."""

    job: JobMessage
    output: Storage


@dataclass(frozen=True)
class StoredResult:
    """One job's stored result, as the aggregator reads it."""

    month: str
    security: str
    date: str
    counts: dict[str, int]
    data: dict[str, Any]


class JobAccumulator(Protocol):
    """Accumulates one job's accepted rows."""

    def add(self, rows: pa.Table) -> None:
        """Take a batch of accepted rows (`shared.inputs.NORMALISED_SCHEMA`)."""
        ...

    def finish(self) -> dict[str, Any]:
        """The job's partial result: small and JSON-ready."""
        ...


class Processor(Protocol):
    """A per-job computation and the aggregation of its results.

    A processor may also offer ``start_batch(contexts)``, accumulators for the jobs of one
    batch that may share state, and ``add_many(accumulators, rows, slots)``: the rows of many
    jobs of one batch at once, ``slots[i]`` indexing `accumulators` for row i. Workers use
    them when present (one vectorised pass instead of one per job) and otherwise call
    `start_job` and `add` per job.

    A processor whose results are columns may offer ``finish_batch(accumulators) -> pa.Table``
    (one row per accumulator; stored as the batch's Arrow result object),
    ``aggregate_tables(chunks, params, sink)`` (in place of `aggregate`: tables of consecutive
    jobs, month, security, date and the row counts first) and ``results_table(datas)`` (JSON
    partial results of earlier versions as those columns). See docs/processors.md.
    """

    name: str

    def start_job(self, context: JobContext) -> JobAccumulator:
        """A fresh accumulator for one job."""
        ...

    def aggregate(
        self, results: Iterable[StoredResult], params: JobParams, sink: TableSink
    ) -> dict[str, Any]:
        """Write the run's tables from results in (month, security, date) order.

        Returns run totals for ``summary.json``.
        """
        ...
