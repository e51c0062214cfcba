"""`tickq report`: read the JSON-lines metrics of a run and say where its time went.

The input is what every component writes to stdout and to ``--metrics-file``: one JSON
object per line. The report uses the worker's ``job.finished`` lines (``outcome``,
``duration_s``, ``stages``, rows, ``rss_mb``, ``worker``; or one ``job.stage`` line per stage,
as earlier versions wrote them), its ``worker.month_pass`` lines (what a pass over a month
without an index spent on the jobs it stored ahead of their messages) and
``worker.heartbeat`` lines (``rss_mb``), plus, where present, ``worker.started``
(concurrency, prefetch), ``worker.auto_sized`` (memory), ``produce.*`` and
``aggregate.written``.

A worker serves its jobs in batches: a job's stages are its share of its batch's work, while
its ``duration_s`` runs from its delivery to its ack, its batch's whole run included. So the
stage table (count, total, p50, p95, max) gives each stage's share of the workers' timed work
(the stages' sum), and ``wait`` (a job queued in its worker behind other batches) is shown as
latency, with no share; throughput is measured over the wall span of the job lines. The report
also gives peak memory per worker, the slowest jobs, and named bottlenecks, each with a
recommendation. ``--json`` prints the report dict; ``--plot FILE.png`` draws throughput,
stage shares and memory over time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from shared.errors import ConfigError

STAGES = ("check", "list", "read", "filter", "compute", "upload", "publish", "ack")
# Stages that measure how long a job waited, not work done: summed over jobs that wait side by
# side, they would outweigh everything else.
LATENCY_STAGES = ("wait",)
ROW_FIELDS = ("rows_in", "rows_out", "rows_rejected", "rows_filtered", "bytes_in", "bytes_out")
OUTCOMES = ("succeeded", "retry_scheduled", "dead_lettered")

DOMINANT_SHARE = 0.40
"""A stage above this share of job time is *the* bottleneck."""
INPUT_SHARE = 0.30
"""list + read above this share: jobs spend their time getting at their input."""
BROKER_SHARE = 0.15
"""publish + ack above this share: broker round trips weigh on every job."""
RETRY_SHARE = 0.05
"""Retried deliveries above this share of all deliveries."""
MEMORY_NEAR = 0.80
"""Peak resident memory above this fraction of the limit."""
LOW_UTILISATION = 0.50
"""Workers busy less than this fraction of their job slots over the wall span."""
SLOWEST = 10
MAX_BUCKETS = 60
NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)

RECOMMENDATIONS: dict[str, str] = {
    "check": "the success-marker lookup waits on the object store: move workers nearer the "
    "object store or raise worker concurrency to overlap the latency",
    "list": "every job lists the month's input: run `tickq ingest` so jobs read only their slice",
    "read": "run `tickq ingest` so jobs read only their slice, and keep workers near the "
    "object store",
    "filter": "row filtering is CPU-bound: run `tickq ingest` so jobs scan only their slice, "
    "or add CPUs / worker replicas",
    "compute": "CPU-bound: add worker replicas or CPUs (`--concurrency auto` runs one job per CPU)",
    "upload": "raise worker concurrency or move workers nearer the object store",
    "publish": "broker overhead: raise --prefetch so the next delivery is already waiting, and "
    "keep the broker near the workers on fast disks (confirms wait for quorum fsync)",
    "ack": "broker overhead: raise --prefetch so the next delivery is already waiting, and "
    "keep the broker near the workers on fast disks",
    "retries": "transient failures (object store or broker throttling, timeouts): read the "
    "`error` of the retry lines; lower worker concurrency if the store throttles",
    "dead_letters": "the run is incomplete: inspect them with `tickq dlq list`, fix the cause, "
    "then `tickq dlq replay`",
    "memory": "lower --concurrency (or the batch size) or raise the container's memory limit "
    "before it is OOM-killed",
    "starved": "jobs arrive slower than workers finish them: the producer or the broker is the "
    "limit, or jobs are so small that per-job overhead dominates; use fewer workers or larger "
    "jobs",
}


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _parse_lines(stream: Iterable[str], out: list[dict[str, Any]], seen: set[str]) -> None:
    for raw in stream:
        text = raw.strip()
        if not text.startswith("{"):
            continue
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        # The same line captured twice (stdout and --metrics-file) counts once.
        key = json.dumps(obj, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        out.append(obj)


def load_metrics(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every JSON object line of `paths` (``-`` is stdin, ``.gz`` is read compressed).

    Lines that are not JSON objects (tracebacks, shell noise) are skipped, and a line that
    appears twice (the same stdout captured and written to a metrics file) counts once. A
    missing or unreadable file is a `ConfigError`.
    """
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in paths:
        if str(item) == "-":
            _parse_lines(sys.stdin, lines, seen)
            continue
        path = Path(item)
        try:
            with _open(path) as stream:
                _parse_lines(stream, lines, seen)
        except FileNotFoundError:
            raise ConfigError(
                f"no metrics file {path}: pass files written with --metrics-file"
            ) from None
        except (OSError, EOFError) as exc:
            raise ConfigError(f"cannot read metrics file {path}: {exc}") from None
    return lines


# ---------------------------------------------------------------------------------------
# Building the report
# ---------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _ts(line: Mapping[str, Any]) -> float | None:
    """The line's ``ts`` as POSIX seconds (naive timestamps are UTC)."""
    value = line.get("ts")
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def _ratio(num: float, den: float | None) -> float | None:
    return _r(num / den) if den else None


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:.0f}%"


def _percentiles(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return float(p50), float(p95)


def _job_key(line: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(line.get("worker")), str(line.get("run_id")), str(line.get("job_id")))


def _bucket_size(span_s: float) -> float:
    for size in NICE_BUCKETS_S:
        if span_s / size <= MAX_BUCKETS:
            return float(size)
    return float(math.ceil(span_s / MAX_BUCKETS))


def _stage_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = (*STAGES, *LATENCY_STAGES)
    return [s for s in known if s in names] + sorted(names - set(known))


def _work_s(per_stage: Mapping[str, float]) -> float:
    """The seconds of work among a job's (or a pass's) stages: all but the latency ones."""
    return sum(seconds for stage, seconds in per_stage.items() if stage not in LATENCY_STAGES)


@dataclass
class _Tally:
    """What one pass over the metrics lines gathers, by kind of line."""

    stage_values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    stages_by_job: dict[tuple[str, str, str], dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    finished: list[tuple[float | None, Mapping[str, Any]]] = field(default_factory=list)
    memory_samples: dict[str, list[tuple[float | None, float]]] = field(default_factory=lambda: defaultdict(list))
    # Every job line's ts and every job's start (ts - duration_s): the wall span.
    job_times: list[float] = field(default_factory=list)
    capacity: dict[str, int] = field(default_factory=dict)
    prefetch: dict[str, int] = field(default_factory=dict)
    auto_memory: list[float] = field(default_factory=list)
    producer: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    aggregator: dict[str, Any] = field(default_factory=dict)
    # What passes over months without an index did for the jobs they stored ahead.
    ahead_stages: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    ahead_totals: Counter[str] = field(default_factory=Counter)
    ahead_rows: list[tuple[float | None, float]] = field(default_factory=list)

    def add(self, line: Mapping[str, Any]) -> None:
        """Take in one metrics line."""
        event, ts = line.get("event"), _ts(line)
        if event == "job.stage":
            self._job_stage(line, ts)
        elif event == "job.finished":
            self._job_finished(line, ts)
        elif event == "worker.month_pass":
            self._month_pass(line, ts)
        elif event == "worker.started" and isinstance(line.get("worker"), str):
            if (c := _num(line.get("concurrency"))) is not None:
                self.capacity[line["worker"]] = int(c)
            if (p := _num(line.get("prefetch"))) is not None:
                self.prefetch[line["worker"]] = int(p)
        elif event == "worker.resized" and isinstance(line.get("worker"), str):
            # The worker's share of its host changed: the latest counts (its first slots
            # are in `worker.started`).
            if (c := _num(line.get("concurrency"))) is not None:
                self.capacity[line["worker"]] = int(c)
            if (p := _num(line.get("prefetch"))) is not None:
                self.prefetch[line["worker"]] = int(p)
        elif event == "worker.auto_sized":
            if (m := _num(line.get("memory_mb"))) is not None and m > 0:
                self.auto_memory.append(m)
        elif event == "produce.discovered":
            for name in ("jobs", "files", "rows_scanned", "duration_s"):
                self.producer[f"discovered_{name}"] += _num(line.get(name)) or 0.0
        elif event == "produce.published":
            for name in ("published", "publish_s"):
                self.producer[name] += _num(line.get(name)) or 0.0
        elif event == "aggregate.written":
            self._aggregated(line)
        if event in ("job.finished", "worker.heartbeat"):
            rss, worker = _num(line.get("rss_mb")), line.get("worker")
            if rss is not None and isinstance(worker, str):
                self.memory_samples[worker].append((ts, rss))

    def _add_stage(self, line: Mapping[str, Any], stage: object, seconds: float | None) -> None:
        if isinstance(stage, str) and seconds is not None:
            self.stage_values[stage].append(seconds)
            self.stages_by_job[_job_key(line)][stage] += seconds

    def _job_stage(self, line: Mapping[str, Any], ts: float | None) -> None:
        self._add_stage(line, line.get("stage"), _num(line.get("duration_s")))
        if ts is not None:
            self.job_times.append(ts)

    def _job_finished(self, line: Mapping[str, Any], ts: float | None) -> None:
        self.finished.append((ts, line))
        per_job = line.get("stages")
        if isinstance(per_job, dict):  # stages carried on the job's own line
            for stage, value in per_job.items():
                self._add_stage(line, stage, _num(value))
        if ts is not None:
            self.job_times.append(ts)
            duration = _num(line.get("duration_s"))
            if duration is not None:
                self.job_times.append(ts - duration)

    def _month_pass(self, line: Mapping[str, Any], ts: float | None) -> None:
        for name in ROW_FIELDS:
            self.ahead_totals[name] += int(_num(line.get(name)) or 0)
        self.ahead_rows.append((ts, _num(line.get("rows_in")) or 0.0))
        per_stage = line.get("stages")
        if isinstance(per_stage, dict):
            for stage, value in per_stage.items():
                if isinstance(stage, str) and (seconds := _num(value)) is not None:
                    self.ahead_stages[stage] += seconds

    def _aggregated(self, line: Mapping[str, Any]) -> None:
        self.aggregator["aggregations"] = self.aggregator.get("aggregations", 0) + 1
        self.aggregator["duration_s"] = self.aggregator.get("duration_s", 0.0) + (_num(line.get("duration_s")) or 0.0)
        self.aggregator["last_complete"] = line.get("complete")
        self.aggregator["last_jobs_merged"] = line.get("jobs_merged")
        self.aggregator["last_jobs_dead"] = line.get("jobs_dead")

    @property
    def span(self) -> tuple[float | None, float | None]:
        """The first and last instants of the job lines."""
        return (min(self.job_times), max(self.job_times)) if self.job_times else (None, None)

    @property
    def job_time_s(self) -> float:
        """The timed work of the jobs that logged their stages and of the passes ahead."""
        return sum(_work_s(per_stage) for per_stage in self.stages_by_job.values()) + _work_s(self.ahead_stages)


def build_report(
    lines: Iterable[Mapping[str, Any]],
    memory_limit_mb: float | None = None,
    top: int = SLOWEST,
) -> dict[str, Any]:
    """The report of `lines` (as `load_metrics` returns them) as a JSON-ready dict.

    Keys: ``lines``, ``throughput``, ``stages``, ``job_time``, ``memory``, ``workers``,
    ``slowest_jobs``, ``bottleneck`` (the stage above 40 % of job time, or None),
    ``bottlenecks`` (``kind``, ``message``, ``recommendation``, ``share`` and ``stage`` where
    it applies; the dominant stage first), ``pipeline`` and ``timeline`` (for `write_plot`).

    Shares are of *job time*, the workers' timed work: the stages' seconds of the jobs that
    logged them (latency stages aside), and of the passes that stored jobs ahead of their
    messages (``worker.month_pass``), whose rows and bytes count among the run's too. The same
    work, with the ``duration_s`` of job lines that logged no stages, over the wall span is the
    effective concurrency. The wall span starts at the earliest job line or job start
    (``ts - duration_s`` of a ``job.finished`` line) and ends at the last job line.
    ``jobs_per_s`` counts succeeded jobs, ``deliveries_per_s`` every ``job.finished`` line
    (retries included).
    """
    lines = list(lines)
    tally = _Tally()
    for line in lines:
        tally.add(line)
    job_time_s = tally.job_time_s
    report: dict[str, Any] = {
        "lines": len(lines),
        "throughput": _throughput(tally, job_time_s),
        "stages": _stages(tally, job_time_s),
        "job_time": {
            "summed_s": _r(job_time_s),
            "ahead_s": _r(_work_s(tally.ahead_stages)),
            "jobs_with_stages": len(tally.stages_by_job),
        },
        **_memory(tally, memory_limit_mb),
        "slowest_jobs": _slowest(tally, top),
        "pipeline": {
            "producer": {k: _r(v) for k, v in sorted(tally.producer.items())} or None,
            "aggregator": tally.aggregator or None,
        },
    }
    report["bottlenecks"] = _bottlenecks(report)
    dominant = [b for b in report["bottlenecks"] if b["kind"] == "dominant_stage"]
    report["bottleneck"] = dominant[0]["stage"] if dominant else None
    report["timeline"] = _timeline(tally.finished, tally.ahead_rows, tally.memory_samples, *tally.span)
    return report


def _throughput(tally: _Tally, job_time_s: float) -> dict[str, Any]:
    """Jobs, rows and bytes per second over the job lines' wall span, outcomes, durations."""
    start, end = tally.span
    wall_s = (end - start) if start is not None and end is not None else None
    wall = wall_s if wall_s and wall_s > 0 else None
    by_outcome: Counter[str] = Counter()
    rows = Counter[str](tally.ahead_totals)
    durations: list[float] = []
    dead_classes: Counter[str] = Counter()
    # The workers' work: the job time, and the duration of each job line that logged no stages.
    work_s = job_time_s
    for _, line in tally.finished:
        outcome = str(line.get("outcome", "unknown"))
        by_outcome[outcome] += 1
        duration = _num(line.get("duration_s"))
        if duration is not None:
            durations.append(duration)
            if _job_key(line) not in tally.stages_by_job:
                work_s += duration
        if outcome == "succeeded":
            for name in ROW_FIELDS:
                rows[name] += int(_num(line.get(name)) or 0)
        elif outcome == "dead_lettered":
            dead_classes[str(line.get("error_class") or "unknown")] += 1
    deliveries = sum(by_outcome.values())
    succeeded = by_outcome.get("succeeded", 0)
    slots = sum(tally.capacity.values()) if tally.capacity else None
    p50, p95 = _percentiles(durations)
    return {
        "start": _iso(start),
        "end": _iso(end),
        "wall_s": _r(wall_s),
        "deliveries": deliveries,
        "jobs_succeeded": succeeded,
        "by_outcome": {o: by_outcome.get(o, 0) for o in OUTCOMES}
        | {o: n for o, n in sorted(by_outcome.items()) if o not in OUTCOMES},
        "jobs_per_s": _ratio(succeeded, wall),
        "deliveries_per_s": _ratio(deliveries, wall),
        "rows_per_s": _ratio(rows["rows_in"], wall),
        "mb_in_per_s": _ratio(rows["bytes_in"] / 2**20, wall),
        "effective_concurrency": _ratio(work_s, wall),
        "job_slots": slots,
        "utilisation": _ratio(work_s, wall * slots) if wall and slots else None,
        "retry_share": _ratio(by_outcome.get("retry_scheduled", 0), deliveries),
        "dead_share": _ratio(by_outcome.get("dead_lettered", 0), deliveries),
        "dead_by_error_class": dict(sorted(dead_classes.items())),
        **{name: rows[name] for name in ROW_FIELDS},
        "job_duration": {
            "count": len(durations),
            "mean_s": _ratio(sum(durations), len(durations)),
            "p50_s": _r(p50),
            "p95_s": _r(p95),
            "max_s": _r(max(durations)) if durations else None,
        },
    }


def _stages(tally: _Tally, job_time_s: float) -> list[dict[str, Any]]:
    """Per stage: count, mean and percentiles of the job lines; totals and shares with the work
    of the passes ahead too."""
    stages: list[dict[str, Any]] = []
    for stage in _stage_order([*tally.stage_values, *tally.ahead_stages]):
        values = tally.stage_values.get(stage, [])
        total = sum(values) + tally.ahead_stages.get(stage, 0.0)
        s50, s95 = _percentiles(values)
        stages.append(
            {
                "stage": stage,
                "count": len(values),
                "total_s": _r(total),
                "mean_s": _ratio(sum(values), len(values)),
                "p50_s": _r(s50),
                "p95_s": _r(s95),
                "max_s": _r(max(values)) if values else None,
                "share": None if stage in LATENCY_STAGES else _ratio(total, job_time_s),
                "latency": stage in LATENCY_STAGES,
            }
        )
    return stages


def _memory(tally: _Tally, memory_limit_mb: float | None) -> dict[str, Any]:
    """``memory`` (peaks against the limit) and ``workers`` (jobs, peak, CPU, slots each)."""
    limit = memory_limit_mb if memory_limit_mb else (min(tally.auto_memory) if tally.auto_memory else None)
    peaks = {w: max(v for _, v in samples) for w, samples in tally.memory_samples.items()}
    worker_jobs: Counter[str] = Counter()
    worker_cpu: dict[str, list[float]] = defaultdict(list)
    for _, line in tally.finished:
        worker = line.get("worker")
        if isinstance(worker, str):
            worker_jobs[worker] += 1
            if (cpu := _num(line.get("cpu_percent"))) is not None:
                worker_cpu[worker].append(cpu)
    workers = {
        w: {
            "jobs": worker_jobs.get(w, 0),
            "peak_rss_mb": _r(peaks.get(w), 1),
            "mean_cpu_percent": _r(float(np.mean(worker_cpu[w])), 1) if worker_cpu[w] else None,
            "concurrency": tally.capacity.get(w),
            "prefetch": tally.prefetch.get(w),
        }
        for w in sorted(set(peaks) | set(worker_jobs) | set(tally.capacity))
    }
    memory = {
        "peak_rss_mb_by_worker": {w: _r(peaks[w], 1) for w in sorted(peaks)},
        "peak_rss_mb": _r(max(peaks.values()), 1) if peaks else None,
        "limit_mb": _r(limit, 1),
        "peak_share_of_limit": _ratio(max(peaks.values()), limit) if peaks and limit else None,
    }
    return {"memory": memory, "workers": workers}


def _slowest(tally: _Tally, top: int) -> list[dict[str, Any]]:
    """The `top` longest job lines, each with its slowest stage."""
    timed = [(d, ts, line) for ts, line in tally.finished if (d := _num(line.get("duration_s"))) is not None]
    timed.sort(key=lambda item: item[0], reverse=True)
    slowest: list[dict[str, Any]] = []
    for duration, ts, line in timed[: max(0, top)]:
        per_stage = tally.stages_by_job.get(_job_key(line)) or {}
        slowest.append(
            {
                "job_id": line.get("job_id"),
                "run_id": line.get("run_id"),
                "worker": line.get("worker"),
                "outcome": line.get("outcome"),
                "attempt": line.get("attempt"),
                "duration_s": _r(duration),
                "rows_in": line.get("rows_in"),
                "slowest_stage": max(per_stage, key=lambda s: per_stage[s]) if per_stage else None,
                "ts": _iso(ts),
            }
        )
    return slowest


def _finding(
    kind: str,
    message: str,
    recommendation: str,
    share: float | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "kind": kind,
        "message": message,
        "recommendation": recommendation,
        "share": _r(share, 4),
    }
    if stage is not None:
        item["stage"] = stage
    return item


def _bottlenecks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Named bottlenecks, each with a recommendation: the dominant stage first, then the
    others by severity (dead letters, then the largest shares)."""
    shares = {s["stage"]: s["share"] or 0.0 for s in report["stages"] if not s["latency"]}
    first: list[dict[str, Any]] = []
    ranked: list[tuple[float, dict[str, Any]]] = []
    dominant = None
    if shares:
        top = max(shares, key=lambda s: shares[s])
        if shares[top] > DOMINANT_SHARE:
            dominant = top
            advice = RECOMMENDATIONS.get(top, "the dominant stage: make it cheaper first")
            message = f"{top} is {_pct(shares[top])} of job time"
            first.append(_finding("dominant_stage", message, advice, shares[top], top))

    input_share = shares.get("read", 0.0) + shares.get("list", 0.0)
    if input_share > INPUT_SHARE and dominant not in ("read", "list"):
        name = "list + read" if "list" in shares else "read"
        message = f"{name} is {_pct(input_share)} of job time"
        item = _finding("input", message, RECOMMENDATIONS["read"], input_share, "read")
        ranked.append((input_share, item))
    broker_share = shares.get("publish", 0.0) + shares.get("ack", 0.0)
    if broker_share > BROKER_SHARE and dominant not in ("publish", "ack"):
        prefetches = sorted({w["prefetch"] for w in report["workers"].values() if w["prefetch"]})
        now = f" (prefetch is {', '.join(map(str, prefetches))})" if prefetches else ""
        message = f"publish/ack is {_pct(broker_share)} of job time"
        advice = RECOMMENDATIONS["publish"] + now
        ranked.append((broker_share, _finding("broker", message, advice, broker_share, "publish")))

    t = report["throughput"]
    retry_share, dead_share = t["retry_share"], t["dead_share"]
    if retry_share is not None and retry_share > RETRY_SHARE:
        retries = t["by_outcome"]["retry_scheduled"]
        message = f"{_pct(retry_share)} of deliveries were retries ({retries})"
        advice = RECOMMENDATIONS["retries"]
        ranked.append((retry_share, _finding("retries", message, advice, retry_share)))
    if dead_share:
        classes = ", ".join(f"{c}: {n}" for c, n in t["dead_by_error_class"].items())
        dead = t["by_outcome"]["dead_lettered"]
        jobs = "job was" if dead == 1 else "jobs were"
        message = f"{dead} {jobs} dead-lettered ({_pct(dead_share)} of deliveries; {classes})"
        advice = RECOMMENDATIONS["dead_letters"]
        ranked.append((1.0 + dead_share, _finding("dead_letters", message, advice, dead_share)))

    limit = report["memory"]["limit_mb"]
    if limit:
        for worker, peak in report["memory"]["peak_rss_mb_by_worker"].items():
            near = peak / limit if peak is not None else 0.0
            if near >= MEMORY_NEAR:
                message = (
                    f"worker {worker} peaked at {peak:.0f} MB, {_pct(near)} of the "
                    f"{limit:.0f} MB limit"
                )
                ranked.append((near, _finding("memory", message, RECOMMENDATIONS["memory"], near)))
    busy = t["utilisation"]
    if busy is not None and busy < LOW_UTILISATION and t["deliveries"] >= 10:
        message = f"workers were busy {_pct(busy)} of their {t['job_slots']} job slots"
        item = _finding("starved", message, RECOMMENDATIONS["starved"], busy)
        ranked.append((LOW_UTILISATION - busy, item))

    ranked.sort(key=lambda pair: pair[0], reverse=True)
    return first + [item for _, item in ranked]


def _timeline(
    finished: Sequence[tuple[float | None, Mapping[str, Any]]],
    ahead_rows: Sequence[tuple[float | None, float]],
    memory_samples: Mapping[str, Sequence[tuple[float | None, float]]],
    start: float | None,
    end: float | None,
) -> dict[str, Any]:
    """Bucketed series for the plot: jobs/s per outcome, rows/s (those of passes that stored
    jobs ahead when the pass ended), and memory per worker."""
    if start is None or end is None:
        return {
            "start": None,
            "bucket_s": None,
            "t_s": [],
            "jobs_per_s": {},
            "rows_per_s": [],
            "memory_mb": {},
        }
    span = max(end - start, 1e-9)
    size = _bucket_size(span)
    count = max(1, math.ceil(span / size))

    def index(ts: float) -> int:
        return min(count - 1, max(0, int((ts - start) / size)))

    jobs: dict[str, list[float]] = {o: [0.0] * count for o in OUTCOMES}
    rows = [0.0] * count
    for ts, line in finished:
        if ts is None:
            continue
        outcome = str(line.get("outcome", "unknown"))
        series = jobs.setdefault(outcome, [0.0] * count)
        series[index(ts)] += 1 / size
        if outcome == "succeeded":
            rows[index(ts)] += (_num(line.get("rows_in")) or 0.0) / size
    for ts, rows_in in ahead_rows:
        if ts is not None:
            rows[index(ts)] += rows_in / size
    memory: dict[str, list[list[float]]] = {}
    for worker in sorted(memory_samples):
        peaks: dict[int, float] = {}
        for ts, mb in memory_samples[worker]:
            if ts is not None:
                i = index(ts)
                peaks[i] = max(peaks.get(i, 0.0), mb)
        memory[worker] = [
            [round((i + 0.5) * size, 3), round(mb, 1)] for i, mb in sorted(peaks.items())
        ]
    return {
        "start": _iso(start),
        "bucket_s": size,
        "t_s": [round(i * size, 3) for i in range(count)],
        "jobs_per_s": {
            o: [round(v, 6) for v in s] for o, s in jobs.items() if any(s) or o in OUTCOMES
        },
        "rows_per_s": [round(v, 3) for v in rows],
        "memory_mb": memory,
    }


# ---------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def render_text(report: Mapping[str, Any]) -> str:
    """The report as plain text for a terminal."""
    t = report["throughput"]
    out: list[str] = []
    span = (
        f"from {t['start']} to {t['end']} (wall {_fmt(t['wall_s'], 1)} s)"
        if t["start"]
        else ("no timestamped job lines" if t["deliveries"] else "no job lines")
    )
    out.append(f"tickq report: {report['lines']} lines, {t['deliveries']} job deliveries, {span}")

    out += ["", "Throughput"]
    outcomes = ", ".join(f"{o} {n}" for o, n in t["by_outcome"].items())
    out.append(f"  jobs        {outcomes}")
    out.append(
        f"  jobs/s      {_fmt(t['jobs_per_s'])} succeeded ({_fmt(t['deliveries_per_s'])} "
        f"deliveries/s)   rows/s {_count(t['rows_per_s'])}   MB/s in {_fmt(t['mb_in_per_s'], 2)}"
    )
    jd = t["job_duration"]
    out.append(
        f"  latency     p50 {_fmt(jd['p50_s'])} s, p95 {_fmt(jd['p95_s'])} s, max "
        f"{_fmt(jd['max_s'])} s from delivery to ack; effective concurrency "
        f"{_fmt(t['effective_concurrency'], 2)}" + (f" of {t['job_slots']} slots" if t["job_slots"] else "")
    )
    out.append(
        f"  rows        in {t['rows_in']}, out {t['rows_out']}, "
        f"rejected {t['rows_rejected']}, filtered {t['rows_filtered']}"
    )

    jt = report["job_time"]
    ahead = f"; {_fmt(jt['ahead_s'], 2)} s of it in passes storing jobs ahead" if jt["ahead_s"] else ""
    out += [
        "",
        f"Stages (share of {_fmt(jt['summed_s'], 2)} s of job time, the workers' timed work, "
        f"{jt['jobs_with_stages']} jobs{ahead})",
    ]
    if report["stages"]:
        out.append(
            f"  {'stage':<10}{'count':>8}{'total_s':>12}{'p50_s':>10}{'p95_s':>10}"
            f"{'max_s':>10}{'share':>8}"
        )
        for s in report["stages"]:
            mark = "  <- bottleneck" if s["stage"] == report["bottleneck"] else ""
            share = "latency" if s["latency"] else _pct(s["share"])
            out.append(
                f"  {s['stage']:<10}{s['count']:>8}{_fmt(s['total_s'], 3):>12}"
                f"{_fmt(s['p50_s']):>10}{_fmt(s['p95_s']):>10}{_fmt(s['max_s']):>10}{share:>8}{mark}"
            )
    else:
        out.append("  no job.stage lines")

    m = report["memory"]
    limit = f" (limit {m['limit_mb']:.0f} MB)" if m["limit_mb"] else ""
    out += ["", f"Memory: peak RSS per worker{limit}"]
    if m["peak_rss_mb_by_worker"]:
        for worker, peak in sorted(m["peak_rss_mb_by_worker"].items(), key=lambda kv: -kv[1]):
            jobs = report["workers"].get(worker, {}).get("jobs", 0)
            out.append(f"  {worker:<32}{peak:>10.1f} MB  ({jobs} jobs)")
    else:
        out.append("  no rss_mb samples")

    out += ["", f"Slowest jobs (top {len(report['slowest_jobs'])})"]
    for j in report["slowest_jobs"]:
        stage = f"  [{j['slowest_stage']}]" if j["slowest_stage"] else ""
        out.append(
            f"  {_fmt(j['duration_s']):>10} s  {j['outcome'] or '-':<16}"
            f"{j['worker'] or '-':<24}{j['job_id'] or '-'}{stage}"
        )

    pipeline = report["pipeline"]
    if pipeline["producer"] or pipeline["aggregator"]:
        out += ["", "Pipeline"]
        if p := pipeline["producer"]:
            out.append(
                f"  producer    discovered {_count(p.get('discovered_jobs'))} jobs in "
                f"{_fmt(p.get('discovered_duration_s'), 2)} s, published "
                f"{_count(p.get('published'))} in {_fmt(p.get('publish_s'), 2)} s"
            )
        if a := pipeline["aggregator"]:
            out.append(
                f"  aggregator  {a['aggregations']} aggregations, "
                f"{_fmt(a['duration_s'], 2)} s; last complete: {a['last_complete']}"
            )

    out += ["", "Bottlenecks"]
    if report["bottlenecks"]:
        out += [f"  * {b['message']}: {b['recommendation']}" for b in report["bottlenecks"]]
    else:
        out.append("  none found: no stage above 40% of job time, no retries or dead letters")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------

_COLOURS = {"succeeded": "#2e7d32", "retry_scheduled": "#f9a825", "dead_lettered": "#c62828"}


def write_plot(
    report_or_lines: Mapping[str, Any] | Iterable[Mapping[str, Any]], path: str | Path
) -> Path:
    """Write a PNG with throughput over time, stage shares and memory per worker; its path.

    Takes a report from `build_report`, or metric lines (built into one). Headless: it draws
    on an Agg canvas and never touches pyplot's global state.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise ConfigError("--plot needs matplotlib: pip install 'matplotlib>=3.8'") from None
    if isinstance(report_or_lines, Mapping) and "timeline" in report_or_lines:
        report: Mapping[str, Any] = report_or_lines
    else:
        report = build_report(list(report_or_lines))  # type: ignore[arg-type]
    path = Path(path)
    t, tl = report["throughput"], report["timeline"]

    fig = Figure(figsize=(11, 12), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, height_ratios=[1.1, 1.0, 1.1])
    title = f"tickq report: {t['jobs_succeeded']} jobs succeeded"
    if t["jobs_per_s"] is not None:
        title += f", {t['jobs_per_s']:.2f} jobs/s over {t['wall_s']:.1f} s"
    if report["bottleneck"]:
        share = next(s["share"] for s in report["stages"] if s["stage"] == report["bottleneck"])
        title += f"\nbottleneck: {report['bottleneck']} ({_pct(share)} of job time)"
    fig.suptitle(title, fontsize=13, fontweight="bold")

    # 1. throughput over time, stacked by outcome, rows/s on a second axis.
    ax = axes[0]
    if tl["t_s"]:
        x = np.asarray(tl["t_s"], dtype=float)
        width = float(tl["bucket_s"])
        bottom = np.zeros(len(x))
        for outcome, series in tl["jobs_per_s"].items():
            values = np.asarray(series, dtype=float)
            if not values.any():
                continue
            ax.bar(
                x,
                values,
                width=width,
                bottom=bottom,
                align="edge",
                label=outcome,
                color=_COLOURS.get(outcome, "#607d8b"),
                alpha=0.85,
            )
            bottom += values
        ax.set_xlim(0, x[-1] + width)
        rows_ax = ax.twinx()
        rows_ax.plot(
            x + width / 2,
            tl["rows_per_s"],
            color="#1565c0",
            marker=".",
            linewidth=1.2,
            label="rows/s (right)",
        )
        rows_ax.set_ylabel("rows per second")
        # Headroom above the bars keeps the legend clear of the data.
        ax.set_ylim(0, max(float(bottom.max()), 1e-9) * 1.35)
        rows_ax.set_ylim(0, max(max(tl["rows_per_s"], default=0.0), 1e-9) * 1.35)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = rows_ax.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, loc="upper left", fontsize=9, ncol=4)
    else:
        ax.text(0.5, 0.5, "no job.finished lines", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Job throughput ({_fmt(tl['bucket_s'], 0)} s buckets)")
    ax.set_xlabel(f"seconds since the first job (start {tl['start'] or '-'})")
    ax.set_ylabel("jobs per second")
    ax.grid(axis="y", alpha=0.3)

    # 2. stage breakdown: share of job time (the workers' timed work).
    ax = axes[1]
    stages = [s for s in report["stages"] if not s["latency"]]
    names = [s["stage"] for s in stages]
    shares = [(s["share"] or 0.0) * 100 for s in stages]
    if names:
        colours = ["#c62828" if n == report["bottleneck"] else "#546e7a" for n in names]
        ypos = np.arange(len(names))
        bars = ax.barh(ypos, shares, color=colours)
        ax.set_yticks(ypos, labels=names)
        ax.invert_yaxis()
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in shares], padding=3, fontsize=9)
        ax.set_xlim(0, max(100.0, max(shares) * 1.1))
        ax.axvline(
            DOMINANT_SHARE * 100,
            color="#c62828",
            linestyle=":",
            linewidth=1,
            label=f"dominant above {DOMINANT_SHARE:.0%}",
        )
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no job.stage lines", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(
        f"Stage breakdown (share of {_fmt(report['job_time']['summed_s'], 1)} s of job time)"
    )
    ax.set_xlabel("% of job time")
    ax.set_ylabel("stage")
    ax.grid(axis="x", alpha=0.3)

    # 3. memory per worker over time.
    ax = axes[2]
    series = tl["memory_mb"]
    if series:
        ranked = sorted(series, key=lambda w: -max(mb for _, mb in series[w]))
        for worker in ranked:
            points = np.asarray(series[worker], dtype=float)
            shown = worker in ranked[:8]
            ax.plot(
                points[:, 0],
                points[:, 1],
                marker=".",
                linewidth=1.2,
                label=worker if shown else "_nolegend_",
            )
        limit = report["memory"]["limit_mb"]
        if limit:
            ax.axhline(
                limit, color="#c62828", linestyle="--", linewidth=1, label=f"limit {limit:.0f} MB"
            )
        ax.legend(
            loc="upper left",
            fontsize=8,
            title=f"top 8 of {len(ranked)}" if len(ranked) > 8 else None,
        )
        ax.set_ylim(bottom=0)
        if tl["t_s"]:
            ax.set_xlim(0, tl["t_s"][-1] + tl["bucket_s"])
    else:
        ax.text(0.5, 0.5, "no rss_mb samples", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Resident memory per worker (peak per bucket)")
    ax.set_xlabel("seconds since the first job")
    ax.set_ylabel("RSS (MB)")
    ax.grid(alpha=0.3)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# ---------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `tickq report`."""
    parser.add_argument(
        "files",
        nargs="+",
        metavar="METRICS.jsonl",
        help="JSON-lines metrics files (from --metrics-file or captured stdout; "
        "'-' reads stdin, .gz is read compressed)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also write a PNG: throughput over time, stage shares, memory",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--memory-limit-mb",
        type=float,
        metavar="MB",
        help="memory limit per worker for the memory check (default: what "
        "`worker.auto_sized` logged, if any)",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=SLOWEST,
        metavar="N",
        help=f"slowest jobs listed (default {SLOWEST})",
    )


def main(args: argparse.Namespace) -> int:
    """Run `tickq report`: 0 on success; `ConfigError` (exit 2) when nothing can be read."""
    lines = load_metrics(args.files)
    if not lines:
        raise ConfigError(
            f"no JSON metrics lines in {', '.join(map(str, args.files))}: pass files written "
            "with --metrics-file"
        )
    limit = getattr(args, "memory_limit_mb", None)
    if limit is not None and limit <= 0:
        raise ConfigError("--memory-limit-mb must be positive")
    report = build_report(lines, memory_limit_mb=limit, top=getattr(args, "top", SLOWEST))
    report["sources"] = [str(f) for f in args.files]
    plot = getattr(args, "plot", None)
    if plot is not None:
        try:
            write_plot(report, plot)
        except OSError as exc:
            raise ConfigError(f"cannot write plot {plot}: {exc}") from None
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        sys.stdout.write(render_text(report))
    if plot is not None:
        print(f"plot written to {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
