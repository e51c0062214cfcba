"""Connecting to RabbitMQ: one place for URLs, TLS, timeouts and the error users see."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aio_pika

from shared.errors import ConfigError, TransientError
from shared.settings import Settings

HEARTBEAT_S = 30


class BrokerUnavailable(TransientError):
    """No broker answered at the configured URL."""


class BrokerTlsError(ConfigError):
    """A broker answered at an ``amqps://`` URL, but TLS with it failed: trying again will not
    help until the URL or the trusted certificates change."""


# OpenSSL's verify codes for a certificate that does not name the host or address connected to.
_NAME_MISMATCHES = (62, 64)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind a failed connection (aiormq chains it to its own), if TLS failed."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; this bounds a cyclic one
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_error(safe_url: str, failure: ssl.SSLError) -> BrokerTlsError:
    """What to tell a user whose TLS connection to the broker at `safe_url` failed."""
    if isinstance(failure, ssl.SSLCertVerificationError):
        why = str(failure.verify_message).rstrip(".")
        if failure.verify_code in _NAME_MISMATCHES:
            return BrokerTlsError(
                f"the broker's TLS certificate at {safe_url} does not name that host ({why}); "
                "connect by a name the certificate holds"
            )
        return BrokerTlsError(
            f"the broker at {safe_url} presented a TLS certificate this machine does not trust ({why}); "
            "point SSL_CERT_FILE at the CA certificate that signed it"
        )
    return BrokerTlsError(
        f"TLS with the broker at {safe_url} failed ({failure.reason or failure}); check that the port "
        "takes TLS (amqps:// is usually port 5671, amqp:// 5672)"
    )


def _url_with_options(url: str, connection_name: str) -> str:
    sep = "&" if "?" in url else "?"
    extra = []
    if "heartbeat=" not in url:
        extra.append(f"heartbeat={HEARTBEAT_S}")
    if "name=" not in url:
        extra.append(f"name={connection_name}")
    return url + (sep + "&".join(extra) if extra else "")


async def connect(settings: Settings, name: str, *, robust: bool = True, timeout: float = 10) -> Any:
    """A connection to the broker; `robust` connections reconnect and redeclare by themselves.

    Raises `BrokerUnavailable` with a one-line message naming TICKQ_AMQP_URL when no broker
    answers, and `BrokerTlsError` when one answers an ``amqps://`` URL but TLS fails. TLS
    trusts the system's certificates, or those of the file ``SSL_CERT_FILE`` names.
    """
    url = _url_with_options(settings.amqp_url, name)
    factory = aio_pika.connect_robust if robust else aio_pika.connect
    try:
        return await asyncio.wait_for(factory(url, timeout=timeout), timeout=timeout + 5)
    except (TimeoutError, OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
        if failure := _tls_failure(exc):
            raise _tls_error(settings.safe_amqp_url, failure) from None
        raise BrokerUnavailable(
            f"no RabbitMQ broker answers at {settings.safe_amqp_url} "
            f"({type(exc).__name__}); start one or point TICKQ_AMQP_URL at yours"
        ) from None
