"""structlog configured to emit JSON lines: one object per line, to stdout and optionally a file.

Every line carries ``ts``, ``level``, ``event`` and ``component``; job lines add ``run_id``
and ``job_id`` (bound with `structlog.contextvars` or passed as fields). Field names are a
stable contract documented in the README.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any

import orjson

from shared.errors import ConfigError, redact


class _HideRich(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "rich" or name.startswith("rich."):
            raise ImportError("rich is not loaded by structlog in tickq")


def _import_structlog() -> ModuleType:
    """structlog, imported without letting it load rich.

    As it loads, structlog imports rich (when installed) for its console renderer and
    traceback formatting: about 0.1 s of every tickq process's start (measured with
    ``python -X importtime``), for features tickq does not use, since its lines are JSON.
    rich stays importable: `tickq status --watch` imports it for its progress bar.
    """
    if "rich" in sys.modules or "structlog" in sys.modules:
        import structlog as loaded

        return loaded
    finder = _HideRich()
    sys.meta_path.insert(0, finder)
    try:
        import structlog as loaded
    finally:
        sys.meta_path.remove(finder)
    return loaded


if TYPE_CHECKING:
    import structlog
else:
    structlog = _import_structlog()

_lock = threading.Lock()


class _JsonLinesSink:
    """Writes each rendered line to `stream` (stdout; none when quiet) and, when configured,
    to a metrics file."""

    def __init__(self, stream: IO[str] | None, metrics_file: Path | None) -> None:
        self._stream = stream
        self._file: IO[str] | None = None
        if metrics_file is not None:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(metrics_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def msg(self, message: str) -> None:
        line = message + "\n"
        with _lock:
            # A closed or broken output (a gone terminal, a full disk) must never take the
            # component down: the line is dropped.
            if self._stream is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._stream.write(line)
                    self._stream.flush()
            if self._file is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._file.write(line)

    # structlog calls the method named after the level; every level writes the same way.
    debug = info = warning = warn = error = critical = exception = log = msg


class _SinkFactory:
    def __init__(self, sink: _JsonLinesSink) -> None:
        self._sink = sink

    def __call__(self, *args: Any) -> _JsonLinesSink:
        return self._sink


def _redacted(value: Any) -> Any:
    """`value` with the credentials of every URL in its strings (nested ones too) masked."""
    if isinstance(value, str):
        return redact(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: _redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redacted(item) for item in value]
    return value


def _component_adder(component: str) -> Any:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("component", component)
        return event

    return add


class _UtcTimestamp:
    """``ts``: the time in UTC, ISO 8601 to the microsecond (``2026-11-24T14:45:32.123456Z``).

    structlog's `TimeStamper` builds and formats a datetime per line (about 4 µs); a worker
    writes thousands of lines a second, whose date and time of day change once a second.
    """

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        cached = self._second  # one read and one write of a tuple: safe across threads
        if cached[0] != second:
            cached = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        event["ts"] = f"{cached[1]}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _drop_line(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    raise structlog.DropEvent


def _serialise(obj: Any, **kwargs: Any) -> str:
    """A line with no URL credentials in it, whatever a caller passed in.

    Most lines hold no URL at all: one search of the rendered line tells, where looking at
    every field first cost a quarter of a job line's time. Masking works field by field, so
    that it never spans two fields of the line."""
    line = _dumps(obj, **kwargs)
    if "://" in line:
        line = _dumps(_redacted(obj), **kwargs)
    return line


def _dumps(obj: Any, **kwargs: Any) -> str:
    # orjson renders a job line about ten times faster than the standard library, which
    # matters at thousands of lines a second; what it refuses (integers beyond 64 bits)
    # goes the standard way.
    default = kwargs.get("default", str)
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"), default=default)


LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def log_level() -> int:
    """The level of lines written: ``TICKQ_LOG_LEVEL`` (debug, info, warning, error; default info)."""
    name = os.environ.get("TICKQ_LOG_LEVEL", "info").strip().lower()
    if name not in LOG_LEVELS:
        raise ConfigError(f"TICKQ_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)} (got {name[:20]!r})")
    return LOG_LEVELS[name]


def configure(
    component: str, metrics_file: str | Path | None = None, stream: IO[str] | None = None, quiet: bool = False
) -> None:
    """Route structlog to JSON lines for `component`: to `stream` (default stdout) unless
    `quiet`, and to the metrics file when given.

    Lines below `log_level()` cost nothing: the filtering logger turns them into no-ops, as it
    does every line when `quiet` leaves them nowhere to go.
    """
    level = log_level()
    sink = _JsonLinesSink(None if quiet else (stream or sys.stdout), Path(metrics_file) if metrics_file else None)
    nowhere = quiet and metrics_file is None
    structlog.configure(
        # Where no line goes anywhere, none is built (a worker writes one or two per job):
        # every level below critical is filtered out, so those calls are no-ops.
        processors=[_drop_line] if nowhere else [
            structlog.contextvars.merge_contextvars,
            _component_adder(component),
            structlog.processors.add_log_level,
            _UtcTimestamp(),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_serialise),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL if nowhere else level),
        logger_factory=_SinkFactory(sink),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    route_library_logs()


class _ToStructlog(logging.Handler):
    """Library log records (aio-pika reconnects, botocore warnings) as tickq JSON lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = record.levelname.lower()
            log = structlog.get_logger().bind(logger=record.name)
            getattr(log, level if level in ("debug", "info", "warning", "error", "critical") else "info")(
                "library.log", message=redact(record.getMessage())[:500]
            )
        except Exception:  # logging must never take a component down
            pass


# pika logs each failed connection attempt as four to eight error lines from these; tickq
# says itself, in one line, when it cannot connect and what it does next (a worker's
# `worker.resubscribe_failed`, the producer's `publish.reconnect`, a command's one-line error).
_PIKA_CONNECTING = ("pika.adapters.utils.connection_workflow", "pika.adapters.utils.io_services_utils",
                    "pika.adapters.base_connection")


def _not_a_failed_connect(record: logging.LogRecord) -> bool:
    # aiormq logs each connection attempt that fails as an error of its own; tickq's one-line
    # error says it at start, and aio-pika's "Reconnect attempt failed" while reconnecting.
    return not str(record.msg).startswith("error when creating transport")


def route_library_logs(level: int = logging.WARNING) -> None:
    """Send warnings of the libraries tickq uses through structlog instead of bare stderr."""
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, _ToStructlog)]
    handler = _ToStructlog(level)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _PIKA_CONNECTING:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    aiormq = logging.getLogger("aiormq.connection")
    if _not_a_failed_connect not in aiormq.filters:
        aiormq.addFilter(_not_a_failed_connect)


def get_logger(**fields: Any) -> Any:
    """A structlog logger with `fields` bound."""
    return structlog.get_logger().bind(**fields)
