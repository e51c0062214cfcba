"""Job messages: what the worker accepts, and that knowing a run never loosens a check."""

from __future__ import annotations

import orjson
import pytest

from shared.errors import PoisonError
from shared.messages import EventJob, JobEvent, JobMessage, JobParams, parse_job, run_job_bodies


def _body(security: str = "ABC", date: str = "2024-03-05", changes: dict[str, object] | None = None) -> bytes:
    job = JobMessage.build(run_id="r1", month="2024-03", security=security, date=date, input="/data/in",
                           output="/data/out", processor="analytics",
                           params=JobParams(market_tz="Australia/Sydney", size_buckets=(100.0, 1000.0)))
    data = orjson.loads(job.to_body())
    data.update(changes or {})
    return orjson.dumps(data)


def test_jobs_of_a_known_run_parse_to_what_full_validation_gives() -> None:
    first = parse_job(_body())
    second = parse_job(_body(security="XYZ", date="2024-03-06"))

    assert first == JobMessage.from_body(_body())
    assert second == JobMessage.from_body(_body(security="XYZ", date="2024-03-06"))
    assert (second.security, second.date, second.job_id) == ("XYZ", "2024-03-06", "r1:2024-03:XYZ:2024-03-06")
    assert second.params is first.params  # the run's parameters were validated once


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"security": " ABC"}, "invalid job message: security is not a valid security code"),
        ({"date": "2024-3-5"}, "invalid job message: date must be YYYY-MM-DD"),
        ({"month": "2024-13"}, "invalid job message: month must be YYYY-MM"),
        ({"job_id": "r1:2024-03:ABC:2024-03-06"}, "job_id does not match run_id, month, security and date"),
        ({"security": 7}, "invalid job message: security: Expected str, got int"),
        ({"extra": 1}, "invalid job message: Object contains unknown field extra"),
    ],
)
def test_a_known_run_still_rejects_a_bad_job_with_the_same_message(changes: dict[str, object], message: str) -> None:
    parse_job(_body())  # the run is known from here on

    with pytest.raises(PoisonError, match=message.replace("(", r"\(")):
        parse_job(_body(changes=changes))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"market_tz": "Mars/Olympus"}, "invalid job message: params: unknown market time zone 'Mars/Olympus'"),
        ({"market_tz": "UTC", "min_size": "5"}, "invalid job message: params.min_size: Expected int | null, got str"),
        ({"market_tz": "UTC", "size_buckets": [100, True]}, "params.size_buckets[1]: Expected float, got bool"),
        ({"market_tz": "UTC", "venues": []}, "params: an empty list of venues would match nothing"),
        ({"market_tz": "UTC", "colour": "red"}, "invalid job message: params: Object contains unknown field colour"),
    ],
)
def test_bad_run_parameters_are_poison_named_by_their_field(params: dict[str, object], message: str) -> None:
    with pytest.raises(PoisonError) as caught:
        parse_job(_body(changes={"params": params}))

    assert message in str(caught.value)


def test_a_sibling_job_is_the_job_built_for_its_key_and_checks_it() -> None:
    first = parse_job(_body())

    assert first.sibling("XYZ", "2024-03-06") == parse_job(_body(security="XYZ", date="2024-03-06"))
    with pytest.raises(ValueError, match="security is not a valid security code"):
        first.sibling("X" * 65, "2024-03-06")


def test_runs_that_differ_in_a_shared_field_are_validated_apart() -> None:
    parse_job(_body())
    data = orjson.loads(_body())
    data["params"]["size_buckets"] = [1000.0, 100.0]

    with pytest.raises(PoisonError, match="size bucket edges must be strictly increasing"):
        parse_job(orjson.dumps(data))
    data["params"]["size_buckets"] = [100, 1000]  # integers: validated (and made floats) afresh
    assert parse_job(orjson.dumps(data)).params.size_buckets == (100.0, 1000.0)


def test_a_runs_bodies_are_those_that_building_each_job_gives() -> None:
    params = JobParams(market_tz="America/New_York", size_buckets=(0.5, 100.0, 1e7), venues=("CP", "TM"),
                       participants=("P 1",), session="10:00-16:00", min_size=5)
    location = {"run_id": "r2", "input": "s3://in/x", "output": "/data/out", "processor": "extract",
                "params": params}
    keys = [("2024-03", "ABC", "2024-03-05"), ("2024-03", "BRK.B", "2024-03-06"), ("2024-04", "ABC", "2024-04-01")]
    first = JobMessage.build(month="2024-03", security="ABC", date="2024-03-05", **location)  # type: ignore[arg-type]

    bodies = list(run_job_bodies(first, keys))

    for (month, security, date), (job_id, body) in zip(keys, bodies, strict=True):
        built = JobMessage.build(month=month, security=security, date=date, **location)  # type: ignore[arg-type]
        assert body == built.to_body() and job_id == built.job_id
        assert JobMessage.from_body(body) == built


@pytest.mark.parametrize(("key", "message"), [(("2024-03", "ABC\n", "2024-03-05"), "not a valid security code"),
                                              (("2024-03", "ABC", "2024-3-5"), "date must be YYYY-MM-DD"),
                                              (("2024-13", "ABC", "2024-03-05"), "month must be YYYY-MM")])
def test_a_runs_bodies_check_each_jobs_own_fields(key: tuple[str, str, str], message: str) -> None:
    first = JobMessage.build(run_id="r1", month="2024-03", security="ABC", date="2024-03-05", input="/in",
                             output="/out", processor="analytics", params=JobParams())

    with pytest.raises(ValueError, match=message):
        list(run_job_bodies(first, [("2024-03", "ABC", "2024-03-06"), key]))


def test_an_event_body_is_what_the_event_model_gives_and_reads_back() -> None:
    succeeded = parse_job(_body())
    dead = parse_job(_body(security="XYZ", date="2024-03-06"))
    figures: list[dict[str, object]] = [{"rows_read": 10, "rows_accepted": 9, "rows_rejected": 1},
                                        {"error_class": "permanent"}]
    body = JobEvent.body_about([(succeeded, figures[0]), (dead, figures[1])], "job.succeeded", "host:1")

    model = JobEvent(type="job.succeeded", run_id="r1", output="/data/out", worker="host:1", jobs=[
        EventJob(job_id=job.job_id, month=job.month, security=job.security, date=job.date, **f)  # type: ignore[arg-type]
        for job, f in ((succeeded, figures[0]), (dead, figures[1]))])
    assert body == model.to_body()
    read = JobEvent.from_body(body)
    assert [(j.security, j.rows_read, j.rows_rejected, j.error_class) for j in read.jobs] == [
        ("ABC", 10, 1, None), ("XYZ", 0, 0, "permanent")]
