"""`tickq report` on synthetic metrics files shaped like the worker's JSON lines.

The runs are built by hand with known stage durations (upload made slow on purpose), so the
stage table, throughput, memory and bottlenecks can be checked against exact numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ConfigError
from tickq import report as rep

T0 = dt.datetime(2024, 3, 1, 9, 0, 0, tzinfo=dt.UTC)
RUN = "run-1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Every job but upload: 1.25 s; upload of job i: 2.0 + 0.1 i s; 20 jobs.
FIXED_STAGES = {
    "check": 0.1,
    "list": 0.05,
    "read": 0.5,
    "filter": 0.1,
    "compute": 0.4,
    "publish": 0.05,
    "ack": 0.05,
}
JOBS = 20
ROWS_PER_JOB = 1000
UPLOADS = [2.0 + 0.1 * i for i in range(JOBS)]
JOB_TIMES = [sum(FIXED_STAGES.values()) + u for u in UPLOADS]
UPLOAD_SHARE = sum(UPLOADS) / sum(JOB_TIMES)  # 59 / 84
WALL_S = (JOBS - 1) * 1.0 + JOB_TIMES[-1]  # job i starts at T0 + i s; the last ends last


def _ts(seconds: float) -> str:
    return (T0 + dt.timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _line(at: float, event: str, **fields: Any) -> dict[str, Any]:
    level = "error" if fields.get("outcome") == "dead_lettered" else "info"
    return {"ts": _ts(at), "level": level, "event": event, **fields}


def _job_lines(
    i: int, worker: str, stages: dict[str, float], start: float, rss_mb: float
) -> list[dict[str, Any]]:
    """A succeeded job as the worker logs it: its stage lines, then job.finished, at the end."""
    end = start + sum(stages.values())
    ids = {"component": "worker", "run_id": RUN, "job_id": f"job-{i:02d}", "worker": worker}
    lines = [_line(end, "job.stage", stage=s, duration_s=d, **ids) for s, d in stages.items()]
    lines.append(
        _line(
            end,
            "job.finished",
            outcome="succeeded",
            attempt=1,
            duration_s=sum(stages.values()),
            rows_in=ROWS_PER_JOB,
            rows_out=ROWS_PER_JOB - 10,
            rows_rejected=10,
            rows_filtered=0,
            bytes_in=2**20,
            bytes_out=4096,
            already_done=False,
            rss_mb=rss_mb,
            cpu_percent=50.0,
            **ids,
        )
    )
    return lines


def upload_bound_run() -> list[dict[str, Any]]:
    """20 jobs on two workers with upload at 70 % of job time, one retry and one dead job."""
    lines: list[dict[str, Any]] = [
        _line(0.0, "worker.started", component="worker", worker="w1:1", concurrency=2, prefetch=4),
        _line(0.0, "worker.started", component="worker", worker="w2:2", concurrency=2, prefetch=4),
        _line(
            0.0,
            "produce.discovered",
            component="producer",
            month="2024-03",
            jobs=22,
            files=1,
            rows_scanned=22_000,
            duration_s=0.5,
        ),
        _line(
            0.0,
            "produce.published",
            component="producer",
            jobs=22,
            published=22,
            publish_s=0.2,
            publish_rate=110.0,
            duration_s=0.7,
        ),
    ]
    for i in range(JOBS):
        worker = "w1:1" if i % 2 == 0 else "w2:2"
        rss = 200.0 + i if worker == "w1:1" else 150.0 + i
        lines += _job_lines(i, worker, {**FIXED_STAGES, "upload": UPLOADS[i]}, float(i), rss)
    lines.append(
        _line(
            10.0,
            "worker.heartbeat",
            component="worker",
            worker="w1:1",
            jobs_done=5,
            in_flight=2,
            rss_mb=300.0,
        )
    )
    lines.append(
        _line(
            12.0,
            "worker.heartbeat",
            component="worker",
            worker="w2:2",
            jobs_done=5,
            in_flight=1,
            rss_mb=180.0,
        )
    )
    ids = {"component": "worker", "run_id": RUN, "worker": "w2:2"}
    lines.append(
        _line(
            5.0,
            "job.finished",
            job_id="job-r",
            outcome="retry_scheduled",
            attempt=1,
            retry_in_s=5,
            error="timeout",
            duration_s=0.5,
            **ids,
        )
    )
    lines.append(
        _line(
            6.0,
            "job.finished",
            job_id="job-d",
            outcome="dead_lettered",
            attempt=1,
            error_class="permanent",
            error="missing column",
            duration_s=0.25,
            **ids,
        )
    )
    return lines


def write_jsonl(path: Path, lines: list[dict[str, Any]], noise: bool = True) -> Path:
    with path.open("w", encoding="utf-8") as f:
        if noise:
            f.write("starting worker...\n\n[1, 2]\n{not json\n")
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
        if noise:
            f.write("Traceback (most recent call last):\n")
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tickq report")
    rep.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def metrics_files(tmp_path: Path) -> list[Path]:
    """The run split across two files (one per worker, the rest in the first)."""
    lines = upload_bound_run()
    w2 = [x for x in lines if x.get("worker") == "w2:2"]
    rest = [x for x in lines if x.get("worker") != "w2:2"]
    return [write_jsonl(tmp_path / "w1.jsonl", rest), write_jsonl(tmp_path / "w2.jsonl", w2)]


# ---------------------------------------------------------------------------------------


def test_load_metrics_skips_noise_and_duplicates(metrics_files: list[Path]) -> None:
    lines = rep.load_metrics(metrics_files)
    assert len(lines) == len(upload_bound_run())
    assert all(isinstance(x, dict) for x in lines)
    # The same file passed twice (stdout capture and --metrics-file) counts once.
    assert len(rep.load_metrics([*metrics_files, metrics_files[0]])) == len(lines)


def test_load_metrics_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no metrics file"):
        rep.load_metrics([tmp_path / "absent.jsonl"])


def test_upload_bottleneck_is_named_with_its_share(metrics_files: list[Path]) -> None:
    report = rep.build_report(rep.load_metrics(metrics_files))
    assert report["bottleneck"] == "upload"
    first = report["bottlenecks"][0]
    assert first["kind"] == "dominant_stage" and first["stage"] == "upload"
    assert first["share"] == pytest.approx(UPLOAD_SHARE, abs=1e-4)
    assert round(UPLOAD_SHARE * 100) == 70
    assert first["message"] == "upload is 70% of job time"
    assert (
        "raise worker concurrency or move workers nearer the object store"
        in (first["recommendation"])
    )
    text = rep.render_text(report)
    assert "upload is 70% of job time: raise worker concurrency" in text
    # The dead job is named as a bottleneck too, with its class and what to do.
    dead = [b for b in report["bottlenecks"] if b["kind"] == "dead_letters"]
    assert len(dead) == 1 and "permanent: 1" in dead[0]["message"]
    assert "tickq dlq" in dead[0]["recommendation"]


def test_stage_table_numbers(metrics_files: list[Path]) -> None:
    report = rep.build_report(rep.load_metrics(metrics_files))
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [
        "check",
        "list",
        "read",
        "filter",
        "compute",
        "upload",
        "publish",
        "ack",
    ]
    upload = stages["upload"]
    assert upload["count"] == JOBS
    assert upload["total_s"] == pytest.approx(59.0)
    # 20 values 2.0, 2.1, ..., 3.9 with linear interpolation: p50 between the 10th and 11th,
    # p95 at rank 0.95 * 19 = 18.05.
    assert upload["p50_s"] == pytest.approx(2.95)
    assert upload["p95_s"] == pytest.approx(3.8 + 0.05 * 0.1)
    assert upload["max_s"] == pytest.approx(3.9)
    assert upload["share"] == pytest.approx(59 / 84, abs=1e-6)
    read = stages["read"]
    assert read["count"] == JOBS and read["total_s"] == pytest.approx(10.0)
    assert read["p50_s"] == pytest.approx(0.5) and read["p95_s"] == pytest.approx(0.5)
    assert read["share"] == pytest.approx(10 / 84, abs=1e-6)
    assert sum(s["share"] for s in report["stages"]) == pytest.approx(1.0, abs=1e-5)
    assert report["job_time"]["summed_s"] == pytest.approx(84.0)
    assert report["job_time"]["jobs_with_stages"] == JOBS


def test_throughput(metrics_files: list[Path]) -> None:
    t = rep.build_report(rep.load_metrics(metrics_files))["throughput"]
    assert t["wall_s"] == pytest.approx(WALL_S)
    assert t["start"] == "2024-03-01T09:00:00Z"
    assert t["by_outcome"] == {"succeeded": JOBS, "retry_scheduled": 1, "dead_lettered": 1}
    assert t["deliveries"] == JOBS + 2
    assert t["jobs_per_s"] == pytest.approx(JOBS / WALL_S, rel=1e-5)
    assert t["deliveries_per_s"] == pytest.approx((JOBS + 2) / WALL_S, rel=1e-5)
    assert t["rows_per_s"] == pytest.approx(JOBS * ROWS_PER_JOB / WALL_S, rel=1e-5)
    assert t["rows_in"] == JOBS * ROWS_PER_JOB and t["rows_rejected"] == JOBS * 10
    assert t["job_slots"] == 4
    assert t["effective_concurrency"] == pytest.approx((84 + 0.75) / WALL_S, rel=1e-5)
    assert t["dead_by_error_class"] == {"permanent": 1}


def test_the_slots_of_a_worker_resized_to_its_share_of_the_host_are_its_latest() -> None:
    """An auto-sized worker that a second one joined runs half its slots: the report's slots
    are those it ran last, not those it started with."""
    lines = [
        _line(0.0, "worker.started", component="worker", worker="w1:1", concurrency=2, prefetch=2048),
        _line(0.5, "worker.started", component="worker", worker="w2:2", concurrency=1, prefetch=1024),
        _line(1.0, "worker.resized", component="worker", worker="w1:1", concurrency=1, prefetch=1024,
              workers_on_host=2),
        *_job_lines(0, "w1:1", {"read": 0.5}, 1.0, 100.0),
        *_job_lines(1, "w2:2", {"read": 0.5}, 1.0, 100.0),
    ]
    assert rep.build_report(lines)["throughput"]["job_slots"] == 2
    assert rep.build_report(lines[:2] + lines[3:])["throughput"]["job_slots"] == 3


def test_peak_memory_per_worker(metrics_files: list[Path]) -> None:
    report = rep.build_report(rep.load_metrics(metrics_files))
    # w1's peak is a heartbeat, w2's the last of its job.finished lines.
    assert report["memory"]["peak_rss_mb_by_worker"] == {"w1:1": 300.0, "w2:2": 180.0}
    assert report["memory"]["peak_rss_mb"] == 300.0
    assert report["memory"]["limit_mb"] is None
    assert not [b for b in report["bottlenecks"] if b["kind"] == "memory"]
    assert report["workers"]["w1:1"]["jobs"] == 10
    assert report["workers"]["w2:2"]["jobs"] == 12


def test_memory_near_the_limit_is_a_bottleneck(metrics_files: list[Path]) -> None:
    report = rep.build_report(rep.load_metrics(metrics_files), memory_limit_mb=320)
    memory = [b for b in report["bottlenecks"] if b["kind"] == "memory"]
    assert len(memory) == 1
    assert memory[0]["message"] == "worker w1:1 peaked at 300 MB, 94% of the 320 MB limit"
    assert report["memory"]["peak_share_of_limit"] == pytest.approx(300 / 320, abs=1e-6)


def test_slowest_jobs(metrics_files: list[Path]) -> None:
    slowest = rep.build_report(rep.load_metrics(metrics_files))["slowest_jobs"]
    assert len(slowest) == 10
    assert [j["job_id"] for j in slowest] == [f"job-{i:02d}" for i in range(19, 9, -1)]
    assert slowest[0]["duration_s"] == pytest.approx(JOB_TIMES[-1])
    assert slowest[0]["worker"] == "w2:2" and slowest[1]["worker"] == "w1:1"
    assert slowest[0]["slowest_stage"] == "upload"
    assert slowest[0]["outcome"] == "succeeded"


def _run_with(stages: dict[str, float], jobs: int = 12) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for i in range(jobs):
        lines += _job_lines(i, "w:1", stages, float(i), 100.0)
    return lines


def test_read_bound_run_recommends_ingest() -> None:
    report = rep.build_report(_run_with({"check": 0.1, "read": 3.0, "compute": 0.5, "upload": 0.4}))
    assert report["bottleneck"] == "read"
    assert report["bottlenecks"][0]["message"] == "read is 75% of job time"
    assert "`tickq ingest`" in report["bottlenecks"][0]["recommendation"]


def test_broker_overhead_without_a_dominant_stage() -> None:
    report = rep.build_report(
        _run_with({"read": 0.35, "compute": 0.35, "upload": 0.1, "publish": 0.12, "ack": 0.08})
    )
    assert report["bottleneck"] is None
    kinds = {b["kind"]: b for b in report["bottlenecks"]}
    assert "dominant_stage" not in kinds
    assert kinds["broker"]["message"] == "publish/ack is 20% of job time"
    assert "prefetch" in kinds["broker"]["recommendation"]
    assert kinds["input"]["message"] == "read is 35% of job time"


def test_balanced_run_has_no_bottleneck() -> None:
    report = rep.build_report(_run_with({"read": 0.3, "compute": 0.35, "upload": 0.35}))
    assert report["bottleneck"] is None
    assert report["bottlenecks"] == []
    assert "none found" in rep.render_text(report)


def test_json_output_parses(metrics_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert rep.main(_args(*map(str, metrics_files), "--json")) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert data["bottleneck"] == "upload"
    assert data["throughput"]["jobs_succeeded"] == JOBS
    assert data["sources"] == [str(p) for p in metrics_files]
    assert {"stages", "memory", "slowest_jobs", "bottlenecks", "timeline"} <= set(data)


def test_text_output(metrics_files: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert rep.main(_args(*map(str, metrics_files), "--top", "3")) == 0
    out = capsys.readouterr().out
    assert "upload is 70% of job time" in out
    assert "<- bottleneck" in out
    assert "w1:1" in out and "300.0 MB" in out
    assert out.count("job-1") == 3  # the three slowest: job-19, job-18, job-17


def test_plot_writes_a_readable_png(
    metrics_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from matplotlib import image

    out = tmp_path / "plots" / "report.png"
    assert rep.main(_args(*map(str, metrics_files), "--plot", str(out), "--json")) == 0
    json.loads(capsys.readouterr().out)  # stdout stays pure JSON with --plot
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 30_000
    pixels = image.imread(out)
    assert pixels.shape[0] >= 800 and pixels.shape[1] >= 800
    assert pixels.std() > 0.05  # drawn on, not a blank canvas


def test_write_plot_from_lines_and_from_an_empty_run(tmp_path: Path) -> None:
    from matplotlib import image

    path = rep.write_plot(upload_bound_run(), tmp_path / "a.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    producer_only = [_line(0.0, "produce.published", component="producer", published=3)]
    empty = rep.write_plot(producer_only, tmp_path / "b.png")
    assert image.imread(empty).shape[0] > 0


def test_no_metrics_lines_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("nothing useful here\n")
    with pytest.raises(ConfigError, match="no JSON metrics lines"):
        rep.main(_args(str(path)))


def batched_run() -> list[dict[str, Any]]:
    """Eight jobs on one worker of one slot, served as a worker serves them: two batches of four,
    all delivered at once, the second batch run after the first. Each job's stages are its
    quarter of its batch's 1 s of work; its `wait` is how long it was queued behind the other
    batch, and its duration runs from its delivery to its ack."""
    lines: list[dict[str, Any]] = [
        _line(0.0, "worker.started", component="worker", worker="w:1", concurrency=1, prefetch=8)
    ]
    share = {"read": 0.125, "compute": 0.075, "upload": 0.05}
    for batch in range(2):
        end = batch + 1.0
        for j in range(4):
            ids = {"component": "worker", "run_id": RUN, "job_id": f"job-{batch}{j}", "worker": "w:1"}
            lines.append(_line(end, "job.finished", outcome="succeeded", attempt=1, duration_s=end,
                               stages={**share, "wait": float(batch)}, rows_in=ROWS_PER_JOB,
                               rows_out=ROWS_PER_JOB, rows_rejected=0, rows_filtered=0, bytes_in=2**20,
                               bytes_out=4096, already_done=False, rss_mb=100.0, cpu_percent=90.0, **ids))
    return lines


def test_jobs_served_in_batches_share_the_work_their_durations_overlap() -> None:
    """A job's duration holds its whole batch's run (and its wait behind the other batch), so
    the jobs' durations overlap: shares and effective concurrency come from the stages' work,
    and the wait is reported as latency, not as a share of job time."""
    report = rep.build_report(batched_run())
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["job_time"]["summed_s"] == pytest.approx(2.0)
    assert stages["read"]["share"] == pytest.approx(0.5) and stages["upload"]["share"] == pytest.approx(0.2)
    assert stages["wait"]["latency"] and stages["wait"]["share"] is None
    assert stages["wait"]["total_s"] == pytest.approx(4.0)
    t = report["throughput"]
    assert t["wall_s"] == pytest.approx(2.0)
    assert t["effective_concurrency"] == pytest.approx(1.0) and t["utilisation"] == pytest.approx(1.0)
    assert t["job_duration"]["max_s"] == pytest.approx(2.0)
    assert report["bottleneck"] == "read"
    assert [b["kind"] for b in report["bottlenecks"]] == ["dominant_stage"]
    text = rep.render_text(report)
    assert "read is 50% of job time" in text
    assert "effective concurrency 1.00 of 1 slots" in text
    assert "latency" in text.split("wait", 1)[1].splitlines()[0]


def test_a_month_pass_counts_the_rows_bytes_and_work_of_the_jobs_it_stored_ahead() -> None:
    """Jobs a pass over a month without an index stored ahead of their messages log no rows of
    their own (their messages find them done): the pass's `worker.month_pass` line carries
    them, and the report counts them once, in the run's rows, bytes and stages."""
    ids = {"component": "worker", "run_id": RUN, "worker": "w:1"}
    lines: list[dict[str, Any]] = [
        _line(1.0, "job.finished", job_id="own", outcome="succeeded", attempt=1, duration_s=1.0,
              stages={"read": 0.1, "compute": 0.1, "upload": 0.05}, rows_in=1000, rows_out=990, rows_rejected=10,
              rows_filtered=0, bytes_in=1000, bytes_out=100, already_done=False, rss_mb=100.0, **ids),
        _line(1.0, "worker.month_pass", month="2024-03", part=0, batch=1, ahead=9, rows_in=9000, rows_out=8900,
              rows_rejected=100, rows_filtered=0, bytes_in=9000, bytes_out=900,
              stages={"read": 0.9, "compute": 0.9, "upload": 0.45}, **ids),
    ]
    lines += [_line(2.0, "job.finished", job_id=f"ahead-{i}", outcome="succeeded", attempt=1, duration_s=0.5,
                    stages={"check": 0.01}, rows_in=0, rows_out=0, rows_rejected=0, rows_filtered=0, bytes_in=0,
                    bytes_out=0, already_done=True, rss_mb=100.0, **ids) for i in range(9)]
    report = rep.build_report(lines)
    t = report["throughput"]
    assert (t["rows_in"], t["rows_out"], t["rows_rejected"]) == (10_000, 9_890, 110)
    assert (t["bytes_in"], t["bytes_out"]) == (10_000, 1000)
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["read"]["total_s"] == pytest.approx(1.0) and stages["read"]["count"] == 1
    assert report["job_time"]["ahead_s"] == pytest.approx(2.25)
    assert report["job_time"]["summed_s"] == pytest.approx(2.25 + 0.25 + 0.09)
    assert sum(report["timeline"]["rows_per_s"]) * report["timeline"]["bucket_s"] == pytest.approx(10_000)
    assert "2.25 s of it in passes storing jobs ahead" in rep.render_text(report)
