"""A run's state: which jobs are missing, and when the run is accounted for; read from its key
file and records the same on a local disk and on S3, listed in one go or month by month."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.layout import JobKey, RunLayout, job_keys_csv
from shared.runstate import RunState, load_state, read_run_jobs
from shared.storage import LocalStorage, Storage, open_storage

MONTHS = ("2024-01", "2024-02", "2024-03")


def _keys(*securities: str) -> set[JobKey]:
    return {JobKey("2024-03", security, "2024-03-04") for security in securities}


def test_a_run_is_accounted_once_every_expected_job_succeeded_or_is_dead() -> None:
    state = RunState.of(expected=_keys("A", "B", "C"), succeeded=_keys("A", "B"))
    assert not state.accounted
    assert state.missing == _keys("C")
    state.dead.add(JobKey("2024-03", "C", "2024-03-04"))
    assert state.accounted
    assert not state.complete


def test_keys_outside_the_run_or_counted_twice_do_not_account_for_a_missing_job() -> None:
    # As many settled keys as expected jobs, yet one expected job is missing: a key that is not
    # the run's and a job both succeeded and dead must not make up for it.
    stray = RunState.of(expected=_keys("A", "B"), succeeded=_keys("A", "Z"))
    twice = RunState.of(expected=_keys("A", "B"), succeeded=_keys("A"), dead=_keys("A"))
    for state in (stray, twice):
        assert not state.accounted
        assert state.missing == _keys("B")


def _a_run(store: Storage, layout: RunLayout) -> tuple[set[JobKey], set[JobKey], set[JobKey], set[JobKey]]:
    """Three months of expected jobs with markers, dead and retry records; what each state holds."""
    expected = [JobKey(month, security, f"{month}-{day:02d}") for month in MONTHS for security in ("BHP", "CBA")
                for day in (4, 5, 6)]
    store.write_bytes(layout.job_keys, job_keys_csv(expected))
    succeeded = set(expected[::2])
    dead = {expected[1], expected[9]}
    retrying = {expected[3], expected[15]}
    for key in succeeded:
        store.mark(layout.marker(key))
    for key in dead:
        store.write_bytes(layout.dead(key), b"{}")
    for key in retrying | {expected[0]}:  # a retry record left beside a success: the success counts
        store.write_bytes(layout.retrying(key), b"{}")
    # Records of no expected job, in an expected month and in another one: not the run's.
    store.mark(layout.marker(JobKey("2024-02", "XYZ", "2024-02-05")))
    store.mark(layout.marker(JobKey("2023-12", "BHP", "2023-12-04")))
    return set(expected), succeeded, dead, retrying


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_runs_state_is_read_whole_whether_its_records_are_listed_at_once_or_by_month(
    tmp_path: Path, where: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        uri, endpoint = f"s3://{server.new_bucket()}/out", server.endpoint
    else:
        uri, endpoint = str(tmp_path), None
    store, layout = open_storage(uri, endpoint), RunLayout("r1")
    states = _a_run(store, layout)
    listed: list[str] = []
    listing = store.keys

    def recording(prefix: str = "") -> Any:
        listed.append(prefix)
        return listing(prefix)

    monkeypatch.setattr(store, "keys", recording)
    state = load_state(store, layout)
    assert (state.expected, state.succeeded, state.dead, state.retrying) == states
    markers = sorted(p for p in listed if p.startswith(layout.succeeded_prefix))
    if where == "s3":  # requests in parallel: one listing per month of the run, all in flight together
        assert markers == [f"{layout.succeeded_prefix}{month}/" for month in MONTHS]
    else:  # a local disk, one request at a time: one walk of the prefix
        assert markers == [layout.succeeded_prefix]

    monkeypatch.setenv("TICKQ_S3_REQUESTS", "1")  # one at a time on S3 too: one listing of each prefix
    again = load_state(open_storage(uri, endpoint), layout)
    assert (again.expected, again.succeeded, again.dead, again.retrying) == states


# Security codes of every shape: each keeps one path segment of its keys, inside the run.
ODD_CODES = ("BRK/B", "BHP AU Equity", "..", ".tickq-marker", "A%2FB", "Ørsted:CO", "a,b", "株" * 21)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_records_of_security_codes_of_any_shape_stay_in_the_run_and_are_read_back_as_they_were(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        uri, endpoint = f"s3://{server.new_bucket()}/out", server.endpoint
    else:
        uri, endpoint = str(tmp_path / "out"), None
    store, layout = open_storage(uri, endpoint), RunLayout("r1")
    expected = [JobKey("2024-03", code, day) for code in ODD_CODES for day in ("2024-03-04", "2024-03-05")]
    store.write_bytes(layout.job_keys, job_keys_csv(expected))
    for key in expected[::2]:
        store.mark(layout.marker(key))
    store.write_bytes(layout.dead(expected[1]), b"{}")
    for key in expected:
        assert layout.marker(key).split("/")[:4] == ["runs", "r1", "succeeded", "2024-03"]
        assert len(layout.marker(key).split("/")) == 6
    state = load_state(store, layout)
    assert state.expected == set(expected)
    assert state.succeeded == set(expected[::2]) and state.dead == {expected[1]}
    assert state.missing == set(expected[3::2])
    if where == "local":  # nothing was written outside the output folder, nor hidden in it
        assert {p.name for p in tmp_path.iterdir()} == {"out"}
        assert len(list((tmp_path / "out" / "runs" / "r1" / "succeeded" / "2024-03").iterdir())) == len(ODD_CODES)


def test_a_runs_jobs_come_in_security_date_month_order_and_unknown_keys_have_no_position(tmp_path: Path) -> None:
    # Securities that look like numbers or hold a dot, a date in two months'
    # files, and a job listed twice: the key file's own order is not the run's.
    keys = [JobKey("2024-02", "0007", "2024-02-01"), JobKey("2024-01", "BRK.B", "2024-01-31"),
            JobKey("2024-02", "0007", "2024-01-31"), JobKey("2024-01", "0007", "2024-01-31"),
            JobKey("2024-01", "BRK.B", "2024-01-31")]
    store, layout = LocalStorage(tmp_path), RunLayout("r1")
    store.write_bytes(layout.job_keys, job_keys_csv(keys))
    jobs = read_run_jobs(store, layout)
    in_order = [JobKey("2024-01", "0007", "2024-01-31"), JobKey("2024-02", "0007", "2024-01-31"),
                JobKey("2024-02", "0007", "2024-02-01"), JobKey("2024-01", "BRK.B", "2024-01-31")]
    assert list(jobs) == in_order and len(jobs) == 4
    assert [jobs.position(k) for k in in_order] == [0, 1, 2, 3]
    assert [jobs.key(p) for p in range(4)] == in_order
    # Not the run's: a month, security and date it knows but not together; a month and a
    # security it does not know.
    strangers = [JobKey("2024-01", "0007", "2024-02-01"), JobKey("2024-03", "0007", "2024-01-31"),
                 JobKey("2024-01", "A", "2024-01-31")]
    assert jobs.positions([*strangers, in_order[2]]).tolist() == [-1, -1, -1, 2]
    assert not any(k in jobs for k in strangers)

    state = load_state(store, layout, jobs)
    assert not state.succeeded and state.missing == set(in_order)
    state.succeeded.add(in_order[3])
    state.dead.add(in_order[1])
    state.dead.discard(strangers[0])  # not the run's: nothing to remove
    assert list(state.missing) == [in_order[0], in_order[2]] and len(state.missing) == 2
    with pytest.raises(KeyError):
        state.succeeded.add(strangers[0])
    # As an event of several jobs applies: a job reported twice counts once.
    state.succeeded.add_at(np.array([0, 0, 3]))
    state.dead.remove_at(np.array([0, 1, 1]))
    assert (len(state.succeeded), len(state.dead)) == (2, 0) and list(state.succeeded) == [in_order[0], in_order[3]]
    assert list(state.missing) == in_order[1:3] and not state.accounted


def test_a_runs_state_holds_a_few_bytes_a_job(tmp_path: Path) -> None:
    # The aggregator service keeps the state of every run it follows, for runs of millions of
    # jobs: key objects in sets took about 180 bytes a job.
    store, layout = LocalStorage(tmp_path), RunLayout("r1")
    keys = [JobKey(f"2024-{m:02d}", f"S{s:04d}", f"2024-{m:02d}-{d:02d}")
            for m in range(1, 7) for s in range(400) for d in range(1, 22)]
    store.write_bytes(layout.job_keys, job_keys_csv(keys))
    for key in keys[::500]:
        store.mark(layout.marker(key))
    tracemalloc.start()
    try:
        state = load_state(store, layout)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(state.expected) == len(keys) == 50_400 and len(state.succeeded) == len(keys[::500])
    assert held / len(keys) < 20
