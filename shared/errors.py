"""tickq's error classes, in one place.

Every failure a job can meet is one of three kinds, and the kind decides where the job ends up:

- `TransientError`: the world was briefly unavailable (broker, object store, network, a
  timeout, throttling). Retried in-process for blips, then through the delay queues, then
  dead-lettered as ``transient-exhausted``.
- `PermanentError`: the job itself cannot succeed as asked (missing input, unreadable file,
  missing required column, invalid parameters). Dead-lettered at once as ``permanent``.
- `PoisonError`: the message cannot even be understood (bad JSON, unknown version, a field
  that fails validation). Dead-lettered at once as ``poison``.

Messages are one line and never carry credentials.
"""

from __future__ import annotations

import re
import socket
from enum import StrEnum


class ErrorClass(StrEnum):
    """Where a failed job ends up; the values are the ``x-tickq-error-class`` header."""

    TRANSIENT_EXHAUSTED = "transient-exhausted"
    PERMANENT = "permanent"
    POISON = "poison"
    CRASH_LOOP = "crash-loop"


class TickqError(Exception):
    """Base of tickq's expected failures: the message is one line, safe to log."""


class TransientError(TickqError):
    """Worth retrying later: the cause is outside the job."""


class PermanentError(TickqError):
    """Will fail the same way every time: dead-letter at once."""


class PoisonError(TickqError):
    """The message itself is unusable: dead-letter at once."""


class ConfigError(TickqError):
    """A usage or configuration error of a command (exit status 2)."""


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(:[^/@\s]*)?@")


def redact(text: str) -> str:
    """`text` with any ``user:password@`` in URLs replaced, so it is safe to log."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)


def one_line(exc: BaseException, limit: int = 500) -> str:
    """A single safe line describing `exc`."""
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, TickqError):
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(redact(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_transient(exc: BaseException) -> bool:
    """Whether an exception from outside tickq's own classes is worth retrying."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, TickqError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    try:
        from botocore.exceptions import (
            ConnectionClosedError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError)):
            return True
    except ImportError:  # pragma: no cover - boto3 is a dependency
        pass
    return False
