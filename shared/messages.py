"""The job message and the job events: schema, strict validation, deterministic job ids.

A job is one (month, security, trade date) of a run. Its message is JSON:
``{"v": 1, "run_id", "job_id", "month", "security", "date", "input", "output", "processor",
"params"}``. Anything that does not validate is a poison message (`PoisonError`): it is
dead-lettered at once and never retried, and none of its fields is used before validation.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import PoisonError

MESSAGE_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = (10_000, 50_000, 200_000, 500_000, 1_000_000)

# A security code is one safe path segment: it starts with a letter or digit and holds no
# '/', '\\', whitespace or control characters, so it can never leave the run's prefix.
# Dots are fine (BRK.B), '..' as a whole segment cannot occur because of the first letter.
SECURITY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-=^+&#]{0,63}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,79}$")
MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
SESSION_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
PROCESSOR_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_security(code: str) -> bool:
    """Whether `code` is a security code tickq can use as a job key."""
    return bool(SECURITY_RE.match(code))


def job_id_for(run_id: str, month: str, security: str, date: dt.date | str) -> str:
    """The deterministic, readable job id: ``<run>:<month>:<security>:<date>``."""
    return f"{run_id}:{month}:{security}:{date}"


def parse_session(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` as (start, end) minutes of the day; start inclusive, end exclusive.

    A start after the end wraps past midnight (``22:00-02:00``).
    """
    match = SESSION_RE.match(text)
    if not match:
        raise ValueError(f"session {text!r} must look like HH:MM-HH:MM (e.g. 10:00-16:00)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end > 24 * 60 or start == end:
        raise ValueError(f"session {text!r} must not be empty and must end by 24:00")
    return start, end


class JobParams(BaseModel):
    """The run's parameters that every job applies: time zone, filters, size buckets."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    market_tz: str = "UTC"
    participants: tuple[str, ...] | None = None
    venues: tuple[str, ...] | None = None
    session: str | None = None
    min_size: int | None = Field(default=None, ge=1)
    max_size: int | None = Field(default=None, ge=1)
    size_buckets: tuple[float, ...] = DEFAULT_SIZE_BUCKETS

    @field_validator("market_tz")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if _CONTROL.search(value) or ".." in value:
            raise ValueError("market_tz is not a time zone name")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown market time zone {value!r}") from None
        return value

    @field_validator("participants", "venues")
    @classmethod
    def _non_empty_codes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("an empty list would match nothing; omit the filter instead")
            for code in value:
                if not code or _CONTROL.search(code) or len(code) > 64:
                    raise ValueError(f"{code!r} is not a valid code")
        return value

    @field_validator("session")
    @classmethod
    def _session(cls, value: str | None) -> str | None:
        if value is not None:
            parse_session(value)
        return value

    @field_validator("size_buckets", mode="before")
    @classmethod
    def _buckets_as_floats(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
        return value

    @field_validator("size_buckets")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or len(value) > 64:
            raise ValueError("size buckets need 1 to 64 edges")
        if any(not (v > 0 and v != float("inf")) for v in value):
            raise ValueError("size bucket edges must be positive, finite numbers")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("size bucket edges must be strictly increasing")
        return value

    @model_validator(mode="after")
    def _size_bounds(self) -> JobParams:
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self

    @property
    def session_minutes(self) -> tuple[int, int] | None:
        """The session as (start, end) minutes of the market day, or None."""
        return parse_session(self.session) if self.session else None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples)."""
        return json.loads(self.model_dump_json())


def _check_location(value: str, what: str) -> str:
    if not value or len(value) > 1024 or _CONTROL.search(value):
        raise ValueError(f"{what} must be a non-empty location without control characters")
    if any(seg == ".." for seg in value.replace("\\", "/").split("/")):
        raise ValueError(f"{what} must not contain '..' segments")
    return value


def _check_run_id(value: str) -> str:
    if not RUN_ID_RE.match(value):
        raise ValueError("run_id must be 1-80 letters, digits, '.', '_' or '-'")
    return value


def _check_month(value: str) -> str:
    if not MONTH_RE.match(value):
        raise ValueError("month must be YYYY-MM")
    return value


def _check_security(value: str) -> str:
    if not is_valid_security(value):
        raise ValueError("security is not a valid security code")
    return value


def _check_date(value: str) -> str:
    try:
        parsed = dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError("date must be YYYY-MM-DD") from None
    if parsed.isoformat() != value:
        raise ValueError("date must be YYYY-MM-DD")
    return value


def _check_job_key(month: str, security: str, date: str) -> None:
    """A job's own key fields, as the model's validators check them."""
    _check_month(month)
    _check_security(security)
    _check_date(date)


def _check_job_id(job_id: str, run_id: str, month: str, security: str, date: str) -> None:
    if job_id != job_id_for(run_id, month, security, date):
        raise ValueError("job_id does not match run_id, month, security and date")


class JobMessage(BaseModel):
    """One job: a (month, security, trade date) of a run, and how to compute it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    v: Literal[1]
    run_id: str
    job_id: str
    month: str
    security: str
    date: str
    input: str
    output: str
    processor: str = "analytics"
    params: JobParams = JobParams()

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        return _check_run_id(value)

    @field_validator("month")
    @classmethod
    def _month(cls, value: str) -> str:
        return _check_month(value)

    @field_validator("security")
    @classmethod
    def _security(cls, value: str) -> str:
        return _check_security(value)

    @field_validator("date")
    @classmethod
    def _date(cls, value: str) -> str:
        return _check_date(value)

    @field_validator("input", "output")
    @classmethod
    def _location(cls, value: str) -> str:
        return _check_location(value, "location")

    @field_validator("processor")
    @classmethod
    def _processor(cls, value: str) -> str:
        if not PROCESSOR_RE.match(value):
            raise ValueError("processor must be a lower-case name")
        return value

    @model_validator(mode="after")
    def _job_id_matches(self) -> JobMessage:
        _check_job_id(self.job_id, self.run_id, self.month, self.security, self.date)
        return self

    @property
    def trade_date(self) -> dt.date:
        """The job's trade date."""
        return dt.date.fromisoformat(self.date)

    def to_body(self) -> bytes:
        """The message body."""
        return self.model_dump_json().encode()

    @classmethod
    def build(
        cls,
        *,
        run_id: str,
        month: str,
        security: str,
        date: str,
        input: str,
        output: str,
        processor: str,
        params: JobParams,
    ) -> JobMessage:
        """A validated job message with its deterministic job id."""
        return cls(
            v=1,
            run_id=run_id,
            job_id=job_id_for(run_id, month, security, date),
            month=month,
            security=security,
            date=date,
            input=input,
            output=output,
            processor=processor,
            params=params,
        )


# What differs between the jobs of one run; the rest of a message (run id, locations, processor,
# parameters) is the same for all of them.
_PER_JOB_FIELDS = ("job_id", "month", "security", "date")
_RUN_TEMPLATES_MAX = 64
# A validated message per run, keyed by the run's shared fields exactly as they arrived: a
# worker takes thousands of jobs of one run a second, and validating the run's parameters,
# locations and processor again for each was about a tenth of its cost per message.
_run_templates: dict[bytes, JobMessage] = {}


def _run_key(data: dict[str, Any]) -> bytes:
    shared = {k: v for k, v in data.items() if k not in _PER_JOB_FIELDS}
    return orjson.dumps(shared, option=orjson.OPT_SORT_KEYS)


def _job_of_known_run(template: JobMessage, data: dict[str, Any]) -> JobMessage | None:
    """The job, when its own fields pass the same checks as a full validation; else None."""
    fields: dict[str, str] = {}
    for name in _PER_JOB_FIELDS:
        value = data.get(name)
        if type(value) is not str:  # strict validation takes no other type, str subclasses included
            return None
        fields[name] = value
    job_id, month, security, date = fields.values()
    try:
        _check_job_key(month, security, date)
        _check_job_id(job_id, template.run_id, month, security, date)
    except ValueError:
        return None
    return template.model_copy(update=fields)


def run_job_bodies(first: JobMessage, keys: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, bytes]]:
    """The (job id, message body) of each (month, security, date) of `first`'s run.

    The bodies are those of `JobMessage.build(...).to_body()` for the run's fields, which
    `first` (a validated job of the run) holds; each job's own fields pass the same checks
    (`ValueError` naming the first that fails). A producer publishes thousands of jobs a
    second: validating the run's fields once instead of per job is most of a body's cost.
    """
    run = first.model_dump(mode="json")
    for month, security, date in keys:
        _check_job_key(month, security, date)
        job_id = job_id_for(first.run_id, month, security, date)
        yield job_id, orjson.dumps({**run, "job_id": job_id, "month": month, "security": security, "date": date})


def parse_job(body: bytes) -> JobMessage:
    """The job in a message body, or `PoisonError` saying in one line what is wrong."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise PoisonError(f"message of {len(body)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PoisonError(f"message body is not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise PoisonError("message body is not a JSON object")
    if data.get("v") != MESSAGE_VERSION:
        raise PoisonError(f"unknown message version {data.get('v')!r} (this worker reads v{MESSAGE_VERSION})")
    key = _run_key(data)
    template = _run_templates.get(key)
    if template is not None and (job := _job_of_known_run(template, data)) is not None:
        return job
    # A run not seen yet, or a job that fails a check: the full validation decides, and names
    # the first field in error.
    try:
        job = JobMessage.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise PoisonError(f"invalid job message: {where}: {first.get('msg', 'invalid')}") from None
    if len(_run_templates) >= _RUN_TEMPLATES_MAX:
        del _run_templates[next(iter(_run_templates))]
    _run_templates[key] = job
    return job


class EventJob(BaseModel):
    """One job an event reports on, with its row counts."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    month: str
    security: str
    date: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    error_class: str | None = None


class JobEvent(BaseModel):
    """What a worker tells the aggregator: jobs of one run that succeeded, or died.

    A worker that served a batch of jobs in one pass reports them in one event.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = 1
    type: Literal["job.succeeded", "job.dead"]
    run_id: str
    output: str
    worker: str = ""
    jobs: list[EventJob]

    def to_body(self) -> bytes:
        """The event body."""
        return self.model_dump_json().encode()

    @staticmethod
    def body_about(
        jobs: list[tuple[JobMessage, dict[str, Any]]],
        type: Literal["job.succeeded", "job.dead"],
        worker: str,
    ) -> bytes:
        """The body of the event that tells what became of `jobs` (of one run), each with its
        figures (``rows_read``, ``rows_accepted``, ``rows_rejected``, ``error_class``).

        The same bytes as the event's model gives (`to_body`), written straight from the jobs,
        which were validated with their messages: a model per job was most of an event's cost.
        """
        first = jobs[0][0]
        return orjson.dumps({
            "v": 1, "type": type, "run_id": first.run_id, "output": first.output, "worker": worker,
            "jobs": [{"job_id": job.job_id, "month": job.month, "security": job.security, "date": job.date,
                      "rows_read": figures.get("rows_read", 0), "rows_accepted": figures.get("rows_accepted", 0),
                      "rows_rejected": figures.get("rows_rejected", 0), "error_class": figures.get("error_class")}
                     for job, figures in jobs],
        })

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        if not RUN_ID_RE.match(value):
            raise ValueError("run_id must be 1-80 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("output")
    @classmethod
    def _location(cls, value: str) -> str:
        return _check_location(value, "output")
