"""Aggregating a run from its stored job results: the one code path behind both
``tickq aggregate`` and the aggregator service, so both write identical tables.

Results are read in (security, date, month) order with a bounded window of parallel reads:
besides dates and groups, memory holds one small index entry per job (which batch object
holds its result), as the run's state holds one key per job.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shared.errors import PermanentError
from shared.layout import JobKey, RunLayout, batch_result_header, batch_result_jobs
from shared.messages import JobParams
from shared.metrics import get_logger
from shared.processors import StoredResult, get_processor
from shared.runstate import RunState, load_state, read_manifest
from shared.storage import Storage
from shared.tables import TableSink

# Batch objects fetched at a time while indexing, and read ahead of the one being aggregated:
# enough parallel reads to hide an object store's latency, few enough to bound memory. The
# threads only fetch bytes; parsing stays on the aggregating thread (parsing in 16 threads
# cost a third more CPU in contention for the interpreter than it saved).
READ_WINDOW = 16
READ_AHEAD = 8
READ_THREADS = 16


@dataclass
class AggregateResult:
    """What an aggregation wrote."""

    run_id: str
    complete: bool
    expected: int
    succeeded: int
    dead: int
    missing: int
    tables: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def wait_for_run(storage: Storage, layout: RunLayout, timeout_s: float | None, poll_s: float = 1.0) -> RunState:
    """Poll until every job is accounted for (or `timeout_s` passes); the last state seen."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = load_state(storage, layout)
        if state.accounted or (deadline is not None and time.monotonic() >= deadline):
            return state
        time.sleep(poll_s)


def _aggregation_order(key: JobKey) -> tuple[str, str, str]:
    return (key.security, key.date, key.month)


class _ResultReader:
    """Each succeeded job's result once, in the order of `keys`, from the batch result objects.

    A job may be in several batch objects (it ran again after a crash, a lost marker or a
    replay); the copy finished last counts, so aggregating again gives identical tables. An
    index pass reads every batch object once to learn which one holds each job; the results
    pass reads them again in the order they are first needed, a bounded window ahead, and
    drops each once all of its jobs are out. Batches hold consecutive jobs of the queue, which
    the producer publishes in key order, so only a few are open at a time.
    """

    def __init__(self, storage: Storage, layout: RunLayout, keys: list[JobKey]) -> None:
        self._storage, self._layout, self._keys = storage, layout, keys
        self.counts = {"rows_read": 0, "rows_accepted": 0, "rows_rejected": 0, "rows_filtered": 0}

    def _corrupt(self, name: str, exc: ValueError) -> PermanentError:
        return PermanentError(f"job results {self._storage.describe(name)}: {exc}")

    def _index(self, pool: ThreadPoolExecutor) -> dict[JobKey, str]:
        """Which batch object holds the result that counts, for every wanted job (headers only)."""
        wanted = set(self._keys)
        chosen: dict[JobKey, tuple[str, str]] = {}
        names = [o.key for o in self._storage.list(self._layout.results_prefix)]
        for start in range(0, len(names), READ_WINDOW):
            window = names[start : start + READ_WINDOW]
            for name, body in zip(window, pool.map(self._storage.read_bytes, window), strict=True):
                try:
                    header, keys = batch_result_header(body)
                except ValueError as exc:
                    raise self._corrupt(name, exc) from None
                copy = (str(header["finished_at"]), name)
                for security, date in keys:
                    key = JobKey(header["month"], security, date)
                    if key in wanted and copy > chosen.get(key, ("", "")):
                        chosen[key] = copy
        missing = wanted - chosen.keys()
        if missing:
            first = min(missing, key=_aggregation_order)
            raise PermanentError(
                f"{len(missing)} succeeded job(s) have no stored result, e.g. {first.month} {first.security} "
                f"{first.date}: the results under {self._storage.describe(self._layout.results_prefix)} were removed"
            )
        return {key: name for key, (_, name) in chosen.items()}

    def _results_in(self, name: str, body: bytes, chosen: dict[JobKey, str]) -> dict[JobKey, StoredResult]:
        try:
            header, jobs = batch_result_jobs(body)
        except ValueError as exc:
            raise self._corrupt(name, exc) from None
        month = header["month"]
        found: dict[JobKey, StoredResult] = {}
        for entry in jobs:
            key = JobKey(month, entry["security"], entry["date"])
            if chosen.get(key) == name:
                found[key] = StoredResult(month, key.security, key.date, entry["counts"], entry["data"])
        return found

    def __iter__(self) -> Iterator[StoredResult]:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="tickq-read") as pool:
            chosen = self._index(pool)
            remaining = Counter(chosen[key] for key in self._keys)
            upcoming = iter(dict.fromkeys(chosen[key] for key in self._keys))  # in order of first need
            reading: deque[tuple[str, Future[bytes]]] = deque()
            open_batches: dict[str, dict[JobKey, StoredResult]] = {}
            for key in self._keys:
                name = chosen[key]
                while name not in open_batches:
                    while len(reading) < READ_AHEAD and (next_name := next(upcoming, None)) is not None:
                        reading.append((next_name, pool.submit(self._storage.read_bytes, next_name)))
                    read_name, future = reading.popleft()
                    open_batches[read_name] = self._results_in(read_name, future.result(), chosen)
                result = open_batches[name].pop(key)
                remaining[name] -= 1
                if not remaining[name]:
                    del open_batches[name]
                for field_name in self.counts:
                    self.counts[field_name] += int(result.counts.get(field_name, 0))
                yield result


def _rows_unassigned(manifest: dict[str, Any]) -> int:
    return sum(int(m.get("rows_unassigned", 0)) for m in manifest.get("months", {}).values())


def _key_json(key: JobKey, run_id: str) -> dict[str, str]:
    return {"job_id": f"{run_id}:{key.month}:{key.security}:{key.date}", "month": key.month,
            "security": key.security, "date": key.date}


def aggregate_run(storage: Storage, run_id: str, state: RunState | None = None) -> AggregateResult:
    """Write the run's tables and ``summary.json`` from its stored results."""
    started = time.perf_counter()
    layout = RunLayout(run_id)
    manifest = read_manifest(storage, layout)
    state = state or load_state(storage, layout)
    request = manifest["request"]
    params = JobParams.model_validate_json(json.dumps(request["params"]))
    processor = get_processor(request["processor"])
    keys = sorted(state.succeeded, key=_aggregation_order)
    reader = _ResultReader(storage, layout, keys)
    sink = TableSink(storage, layout.aggregates)
    totals = processor.aggregate(reader, params, sink)
    unassigned = _rows_unassigned(manifest)
    dead_records = _dead_details(storage, layout, sorted(state.dead, key=_aggregation_order), run_id)
    summary = {
        "run_id": run_id,
        "tickq_version": manifest.get("tickq_version"),
        "parameters": request,
        "jobs_expected": len(state.expected),
        "jobs_succeeded": len(state.succeeded),
        "jobs_dead": len(state.dead),
        "jobs_missing": len(state.missing),
        "complete": state.complete,
        "dead_jobs": dead_records,
        "missing_jobs": [_key_json(k, run_id) for k in sorted(state.missing, key=_aggregation_order)][:1000],
        "rows_read": reader.counts["rows_read"] + unassigned,
        "rows_accepted": reader.counts["rows_accepted"],
        "rows_rejected": reader.counts["rows_rejected"] + unassigned,
        "rows_filtered": reader.counts["rows_filtered"],
        "rows_unassigned": unassigned,
        "totals": totals,
        "created_at": manifest.get("created_at"),
        "aggregated_at": dt.datetime.now(dt.UTC).isoformat(),
        "wall_time_s": _wall_time(manifest.get("created_at")),
        "aggregate_duration_s": round(time.perf_counter() - started, 3),
        "tables": sink.written,
    }
    # summary.json is written last: its presence means every table is complete.
    storage.write_bytes(
        f"{layout.aggregates}/summary.json", json.dumps(summary, indent=2, default=str).encode(), "application/json"
    )
    get_logger(run_id=run_id).info(
        "aggregate.written",
        jobs_merged=len(keys),
        jobs_dead=len(state.dead),
        complete=state.complete,
        tables=len(sink.written),
        duration_s=summary["aggregate_duration_s"],
    )
    return AggregateResult(
        run_id=run_id,
        complete=state.complete,
        expected=len(state.expected),
        succeeded=len(state.succeeded),
        dead=len(state.dead),
        missing=len(state.missing),
        tables=list(sink.written),
        summary=summary,
    )


def _wall_time(created_at: str | None) -> float | None:
    if not created_at:
        return None
    return round((dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(created_at)).total_seconds(), 3)


def _dead_details(storage: Storage, layout: RunLayout, keys: Iterable[JobKey], run_id: str) -> list[dict[str, Any]]:
    details = []
    for key in keys:
        entry: dict[str, Any] = _key_json(key, run_id)
        try:
            record = json.loads(storage.read_bytes(layout.dead(key)))
            entry.update({k: record.get(k) for k in ("error_class", "error", "attempts", "failed_at")})
        except (PermanentError, json.JSONDecodeError):
            pass
        details.append(entry)
    return details
