"""Aggregating a run from its stored job results: the one code path behind both
``tickq aggregate`` and the aggregator service, so both write identical tables.

Results are read in (security, date, month) order with a bounded window of parallel reads,
so memory grows with the number of dates and groups, not with the number of jobs.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.errors import PermanentError
from shared.layout import JobKey, RunLayout
from shared.messages import JobParams
from shared.metrics import get_logger
from shared.processors import StoredResult, get_processor
from shared.runstate import RunState, load_state, read_manifest
from shared.storage import Storage
from shared.tables import TableSink

READ_WINDOW = 256
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
    """Reads stored results in order, a bounded window at a time, counting rows."""

    def __init__(self, storage: Storage, layout: RunLayout, keys: list[JobKey]) -> None:
        self._storage, self._layout, self._keys = storage, layout, keys
        self.counts = {"rows_read": 0, "rows_accepted": 0, "rows_rejected": 0, "rows_filtered": 0}
        self.last_finished_at: str | None = None

    def _read(self, key: JobKey) -> StoredResult:
        location = self._layout.result(key)
        try:
            raw = orjson.loads(self._storage.read_bytes(location))
        except orjson.JSONDecodeError as exc:
            raise PermanentError(f"job result {self._storage.describe(location)} is corrupt: {exc.msg}") from None
        return StoredResult(key.month, key.security, key.date, dict(raw["counts"]), dict(raw["data"]))

    def __iter__(self) -> Iterator[StoredResult]:
        with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="tickq-read") as pool:
            for start in range(0, len(self._keys), READ_WINDOW):
                for result in pool.map(self._read, self._keys[start : start + READ_WINDOW]):
                    for name in self.counts:
                        self.counts[name] += int(result.counts.get(name, 0))
                    yield result


def _rows_unassigned(manifest: dict[str, Any]) -> int:
    return sum(int(m.get("rows_unassigned", 0)) for m in manifest.get("months", {}).values())


def _key_json(key: JobKey, run_id: str) -> dict[str, str]:
    return {"job_id": f"{run_id}:{key.month}:{key.security}:{key.date}", **key.__dict__}


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
