"""The job message and the job events: schema, strict validation, deterministic job ids.

A job is one (month, security, trade date) of a run. Its message is JSON:
``{"v": 1, "run_id", "job_id", "month", "security", "date", "input", "output", "processor",
"params"}``. Anything that does not validate is a poison message (`PoisonError`): it is
dead-lettered at once and never retried, and none of its fields is used before validation.
"""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterable, Iterator
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import orjson

from shared.errors import PoisonError

MESSAGE_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_SIZE_BUCKETS: tuple[float, ...] = (10_000.0, 50_000.0, 200_000.0, 500_000.0, 1_000_000.0)

# A security code is any text of 1 to 64 bytes (UTF-8) without control characters or whitespace
# at either end (BRK.B, BRK/B, BHP AU Equity): storage keys hold it encoded as one path segment
# (`shared.layout.security_segment`), so no code can leave the run's prefix, and in bytes so
# that its segment, percent-encoded, stays within a file name's 255 bytes.
MAX_SECURITY_BYTES = 64
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,79}$")
MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
SESSION_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")
PROCESSOR_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_security(code: str) -> bool:
    """Whether `code` is a security code tickq can use as a job key."""
    try:
        size = len(code.encode())
    except UnicodeEncodeError:  # a lone surrogate: no text a file or message holds
        return False
    return 0 < size <= MAX_SECURITY_BYTES and code == code.strip() and not _CONTROL.search(code)


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


class JobParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The run's parameters that every job applies: time zone, filters, size buckets.

    Checked when built and when decoded (`ValueError` naming the first field in error); a
    decoded message is also checked for types and unknown fields.
    """

    market_tz: str = "UTC"
    participants: tuple[str, ...] | None = None
    venues: tuple[str, ...] | None = None
    session: str | None = None
    min_size: int | None = None
    max_size: int | None = None
    size_buckets: tuple[float, ...] = DEFAULT_SIZE_BUCKETS

    def __post_init__(self) -> None:
        _check_zone(self.market_tz)
        _check_codes("participants", self.participants)
        _check_codes("venues", self.venues)
        if self.session is not None:
            parse_session(self.session)
        for name, size in (("min_size", self.min_size), ("max_size", self.max_size)):
            if size is not None and size < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if any(type(edge) is not float for edge in self.size_buckets):
            # Integer edges (as a user or a JSON body writes them) are kept as floats, so that
            # equal parameters give equal message bodies.
            msgspec.structs.force_setattr(self, "size_buckets", _float_edges(self.size_buckets))
        _check_buckets(self.size_buckets)

    @property
    def session_minutes(self) -> tuple[int, int] | None:
        """The session as (start, end) minutes of the market day, or None."""
        return parse_session(self.session) if self.session else None

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples)."""
        result: dict[str, Any] = msgspec.json.decode(self.to_json())
        return result

    def to_json(self) -> bytes:
        """The parameters as compact JSON, as a job message holds them."""
        return _ENCODER.encode(self)

    @classmethod
    def from_json_data(cls, data: Any) -> JobParams:
        """Parameters from decoded JSON (a run's manifest), checked as a message's are."""
        return msgspec.convert(data, cls)


def _check_zone(value: str) -> None:
    if _CONTROL.search(value) or ".." in value:
        raise ValueError("market_tz is not a time zone name")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown market time zone {value!r}") from None


def _check_codes(name: str, codes: tuple[str, ...] | None) -> None:
    if codes is None:
        return
    if not codes:
        raise ValueError(f"an empty list of {name} would match nothing; omit the filter instead")
    for code in codes:
        if not code or _CONTROL.search(code) or len(code) > 64:
            raise ValueError(f"{name}: {code!r} is not a valid code")


def _float_edges(edges: tuple[float, ...]) -> tuple[float, ...]:
    if not all(isinstance(edge, (int, float)) and not isinstance(edge, bool) for edge in edges):
        raise ValueError("size bucket edges must be numbers")
    return tuple(float(edge) for edge in edges)


def _check_buckets(edges: tuple[float, ...]) -> None:
    if not edges or len(edges) > 64:
        raise ValueError("size buckets need 1 to 64 edges")
    if any(not (v > 0 and v != float("inf")) for v in edges):
        raise ValueError("size bucket edges must be positive, finite numbers")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError("size bucket edges must be strictly increasing")


def check_location(value: str, what: str) -> str:
    """`value` if it can be a job's input or output location, else `ValueError` saying why."""
    if not value or len(value) > 1024 or _CONTROL.search(value):
        raise ValueError(f"{what} must be a non-empty location without control characters")
    if ".." in value.replace("\\", "/").split("/"):
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


class JobMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One job: a (month, security, trade date) of a run, and how to compute it.

    Made by `build`, `from_body` (or `parse_job`) and `sibling`, which check every field; the
    class itself checks none, so that a worker taking thousands of jobs of one run a second
    checks only what differs between them.
    """

    v: Literal[1]
    run_id: str
    job_id: str
    month: str
    security: str
    date: str
    input: str
    output: str
    processor: str = "analytics"
    params: JobParams = msgspec.field(default_factory=JobParams)

    def check(self) -> None:
        """`ValueError` naming the first field in error, if any is."""
        _check_run_id(self.run_id)
        _check_job_key(self.month, self.security, self.date)
        check_location(self.input, "input")
        check_location(self.output, "output")
        if not PROCESSOR_RE.match(self.processor):
            raise ValueError("processor must be a lower-case name")
        _check_job_id(self.job_id, self.run_id, self.month, self.security, self.date)

    @property
    def trade_date(self) -> dt.date:
        """The job's trade date."""
        return dt.date.fromisoformat(self.date)

    def to_body(self) -> bytes:
        """The message body."""
        return _ENCODER.encode(self)

    @classmethod
    def from_body(cls, body: bytes) -> JobMessage:
        """The job in `body`, fully validated; `ValueError` (`msgspec.ValidationError` for a
        bad field) otherwise. Workers use `parse_job`, which also says what is wrong in one line."""
        job = _JOB_DECODER.decode(body)
        job.check()
        return job

    def sibling(self, security: str, date: str) -> JobMessage:
        """The job of (`security`, `date`) in this job's run and month (`ValueError` if either
        is not valid)."""
        _check_job_key(self.month, security, date)
        return msgspec.structs.replace(self, job_id=job_id_for(self.run_id, self.month, security, date),
                                       security=security, date=date)

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
        job = cls(
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
        job.check()
        return job


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
    # In the order the fields came: a run's producer writes every body alike.
    return orjson.dumps(shared)


def _job_of_known_run(template: JobMessage, data: dict[str, Any]) -> JobMessage | None:
    """The job, when its own fields pass the same checks as a full validation; else None."""
    fields: dict[str, str] = {}
    for name in _PER_JOB_FIELDS:
        value = data.get(name)
        if type(value) is not str:  # strict validation takes no other type, str subclasses included
            return None
        fields[name] = value
    try:
        _check_job_key(fields["month"], fields["security"], fields["date"])
        _check_job_id(fields["job_id"], template.run_id, fields["month"], fields["security"], fields["date"])
    except ValueError:
        return None
    return msgspec.structs.replace(template, **fields)


def run_job_bodies(first: JobMessage, keys: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, bytes]]:
    """The (job id, message body) of each (month, security, date) of `first`'s run.

    The bodies are those of `JobMessage.build(...).to_body()` for the run's fields, which
    `first` (a validated job of the run) holds; each job's own fields pass the same checks
    (`ValueError` naming the first that fails). A producer publishes thousands of jobs a
    second: validating the run's fields once instead of per job is most of a body's cost.
    """
    run = msgspec.to_builtins(first)
    for month, security, date in keys:
        _check_job_key(month, security, date)
        job_id = job_id_for(first.run_id, month, security, date)
        yield job_id, _ENCODER.encode({**run, "job_id": job_id, "month": month, "security": security, "date": date})


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
        job = JobMessage.from_body(body)
    except ValueError as exc:
        raise PoisonError(f"invalid job message: {_validation_detail(exc)}") from None
    if len(_run_templates) >= _RUN_TEMPLATES_MAX:
        del _run_templates[next(iter(_run_templates))]
    _run_templates[key] = job
    return job


def _validation_detail(exc: ValueError) -> str:
    """A validation error in one line, the field first: ``params.min_size: Expected int, got str``."""
    if not isinstance(exc, msgspec.ValidationError):
        return str(exc)  # a check's own message, which names its field
    text = str(exc).replace("`", "")
    what, _, where = text.partition(" - at $")
    where = where.lstrip(".")
    return f"{where}: {what}" if where else what


class EventJob(msgspec.Struct, frozen=True, kw_only=True):
    """One job an event reports on, with its row counts."""

    job_id: str
    month: str
    security: str
    date: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    error_class: str | None = None


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker tells the aggregator: jobs of one run that succeeded, or died.

    A worker that served a batch of jobs in one pass reports them in one event. Fields an
    older or newer worker adds are ignored.
    """

    v: Literal[1] = 1
    type: Literal["job.succeeded", "job.dead"]
    run_id: str
    output: str
    worker: str = ""
    jobs: list[EventJob]

    def __post_init__(self) -> None:
        _check_run_id(self.run_id)
        check_location(self.output, "output")

    @classmethod
    def from_body(cls, body: bytes) -> JobEvent:
        """The event in `body`; `ValueError` (`msgspec.DecodeError`) when it is not one."""
        return _EVENT_DECODER.decode(body)

    def to_body(self) -> bytes:
        """The event body."""
        return _ENCODER.encode(self)

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
        return _ENCODER.encode({
            "v": 1, "type": type, "run_id": first.run_id, "output": first.output, "worker": worker,
            "jobs": [{"job_id": job.job_id, "month": job.month, "security": job.security, "date": job.date,
                      "rows_read": figures.get("rows_read", 0), "rows_accepted": figures.get("rows_accepted", 0),
                      "rows_rejected": figures.get("rows_rejected", 0), "error_class": figures.get("error_class")}
                     for job, figures in jobs],
        })


_ENCODER = msgspec.json.Encoder()
_JOB_DECODER = msgspec.json.Decoder(JobMessage)
_EVENT_DECODER = msgspec.json.Decoder(JobEvent)
