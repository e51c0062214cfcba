"""A run's state: which jobs are missing, and when the run is accounted for."""

from __future__ import annotations

from shared.layout import JobKey
from shared.runstate import RunState


def _keys(*securities: str) -> set[JobKey]:
    return {JobKey("2024-03", security, "2024-03-04") for security in securities}


def test_a_run_is_accounted_once_every_expected_job_succeeded_or_is_dead() -> None:
    state = RunState(expected=_keys("A", "B", "C"), succeeded=_keys("A", "B"), dead=set())
    assert not state.accounted
    assert state.missing == _keys("C")
    state.dead.add(JobKey("2024-03", "C", "2024-03-04"))
    assert state.accounted
    assert not state.complete


def test_keys_outside_the_run_or_counted_twice_do_not_account_for_a_missing_job() -> None:
    # As many settled keys as expected jobs, yet one expected job is missing: a key that is not
    # the run's and a job both succeeded and dead must not make up for it.
    stray = RunState(expected=_keys("A", "B"), succeeded=_keys("A", "Z"), dead=set())
    twice = RunState(expected=_keys("A", "B"), succeeded=_keys("A"), dead=_keys("A"))
    for state in (stray, twice):
        assert not state.accounted
        assert state.missing == _keys("B")
