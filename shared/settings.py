"""Configuration: flags override environment variables, which override defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlparse

from shared.errors import ConfigError, redact
from shared.topology import DEFAULT_RETRY_DELAYS_S

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
DEFAULT_NAMESPACE = "tickq"
# Object-store requests one process keeps in flight: a batch of 512 jobs writes 512 markers,
# and at 20-100 ms a request, 16 at a time made S3 runs latency-bound (bench/RESULTS.md).
DEFAULT_S3_REQUESTS = 64
MAX_S3_REQUESTS = 1024


@dataclass(frozen=True)
class Settings:
    """Where the broker and the object store are, and the namespace of this pipeline."""

    amqp_url: str = DEFAULT_AMQP_URL
    namespace: str = DEFAULT_NAMESPACE
    s3_endpoint_url: str | None = None
    retry_delays_s: tuple[int, ...] = DEFAULT_RETRY_DELAYS_S

    @classmethod
    def load(
        cls,
        amqp_url: str | None = None,
        namespace: str | None = None,
        s3_endpoint_url: str | None = None,
        retry_delays: str | None = None,
    ) -> Settings:
        """Settings from flags (the arguments), then the environment, then defaults."""
        settings = cls(
            amqp_url=amqp_url or os.environ.get("TICKQ_AMQP_URL") or DEFAULT_AMQP_URL,
            namespace=namespace or os.environ.get("TICKQ_NAMESPACE") or DEFAULT_NAMESPACE,
            s3_endpoint_url=s3_endpoint_url or os.environ.get("TICKQ_S3_ENDPOINT_URL") or None,
            retry_delays_s=parse_retry_delays(
                retry_delays or os.environ.get("TICKQ_RETRY_DELAYS") or ",".join(map(str, DEFAULT_RETRY_DELAYS_S))
            ),
        )
        settings.validate()
        s3_requests()  # read where each S3 client is made; checked here so a bad value stops start-up
        return settings

    def validate(self) -> None:
        """Raise `ConfigError` with a one-line message when a setting cannot work."""
        scheme = urlparse(self.amqp_url).scheme
        if scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"TICKQ_AMQP_URL must start with amqp:// or amqps:// (got {redact(self.amqp_url)!r})"
            )
        ns = self.namespace
        if not ns or len(ns) > 100 or not all(c.isalnum() or c in "-_." for c in ns):
            raise ConfigError(
                "TICKQ_NAMESPACE must be 1-100 characters of letters, digits, '-', '_' or '.'"
            )
        if self.s3_endpoint_url and urlparse(self.s3_endpoint_url).scheme not in ("http", "https"):
            raise ConfigError("TICKQ_S3_ENDPOINT_URL must be an http:// or https:// URL")

    @property
    def safe_amqp_url(self) -> str:
        """The broker URL with its credentials hidden, for logs and messages."""
        return redact(self.amqp_url)


def parse_retry_delays(text: str) -> tuple[int, ...]:
    """``5,30,120,600``: the delay tiers in seconds, growing."""
    try:
        delays = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"retry delays {text!r} must be comma-separated whole seconds") from None
    if not delays or any(d < 1 or d > 86_400 for d in delays) or list(delays) != sorted(set(delays)):
        raise ConfigError("retry delays must be growing whole seconds between 1 and 86400 (TICKQ_RETRY_DELAYS)")
    return delays


def s3_requests() -> int:
    """``TICKQ_S3_REQUESTS``: the object-store requests one process keeps in flight at most."""
    text = os.environ.get("TICKQ_S3_REQUESTS", "").strip()
    if not text:
        return DEFAULT_S3_REQUESTS
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= MAX_S3_REQUESTS:
        raise ConfigError(f"TICKQ_S3_REQUESTS must be a whole number from 1 to {MAX_S3_REQUESTS} (got {text!r})")
    return value
